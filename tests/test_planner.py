"""The store-size planner: printed at the first step, within 10% of what is written, refuses a full disk."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset
from lightning_dualform import DualFormCallback
from lightning_dualform.errors import DiskSpaceError
from lightning_dualform.record.planner import estimate


@pytest.mark.parametrize("dtype,chunk_rows", [("float32", 256), ("float16", 256), ("float32", None)])
def test_estimate_within_ten_percent_of_bytes_written(tmp_path, dtype, chunk_rows, caplog):
    ds = IndexedDataset(n=3000, d=64)
    model = MLP(d=64, hidden=48)
    cb = DualFormCallback(tmp_path / "p.h5", dtype=dtype, chunk_rows=chunk_rows)
    with caplog.at_level("INFO"):
        L.Trainer(max_epochs=3, callbacks=[cb], **TRAINER_KW).fit(
            model, torch.utils.data.DataLoader(ds, batch_size=100)
        )
    assert "store plan" in caplog.text
    written = os.path.getsize(cb.store_path)
    assert cb.plan.epochs == 3 and cb.plan.steps_per_epoch == 30
    assert abs(cb.plan.total_bytes - written) / written <= 0.10, (cb.plan.total_bytes, written)


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import lightning_dualform.record.planner as planner

    monkeypatch.setattr(planner, "free_bytes", lambda d: 10_000)
    cb = DualFormCallback(tmp_path / "big.h5")
    trainer = L.Trainer(max_epochs=5, callbacks=[cb], **TRAINER_KW)
    with pytest.raises(DiskSpaceError, match=r"needs about .* GB .* free .*check_disk=False"):
        trainer.fit(MLP(), torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    assert trainer.global_step == 0 and not os.path.exists(tmp_path / "big.h5")
    ok = DualFormCallback(tmp_path / "big.h5", check_disk=False)
    L.Trainer(max_epochs=1, callbacks=[ok], **TRAINER_KW).fit(
        MLP(), torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    )
    assert os.path.exists(tmp_path / "big.h5")


def test_estimate_arithmetic():
    plan = estimate({"a": 128, "e": 640}, {"a": ("linear", 784, 800, True), "e": ("embedding", 100, 16, False)},
                    itemsize=4, steps_per_epoch=10, epochs=2)
    assert plan.layers[0].bytes_per_row == 784 * 4 + 800 * 4 + 32
    assert plan.layers[1].bytes_per_row == 8 + 16 * 4 + 32
    assert plan.bytes_per_epoch == 10 * (128 * (784 * 4 + 800 * 4 + 32) + 640 * (8 + 64 + 32))


def test_automatic_chunks_are_about_half_a_megabyte():
    from lightning_dualform.store.format import chunk_rows_for

    assert chunk_rows_for(784 * 4, 800 * 4) == 128  # 400 KiB
    assert chunk_rows_for(784 * 2, 800 * 2) == 256
    assert chunk_rows_for(8, 16 * 4) == 8192  # embedding token ids and 16-wide values
    assert chunk_rows_for(1, 1) == 65536 and chunk_rows_for(10**7, 4) == 64  # clamped
    assert chunk_rows_for(3, 3, chunk_rows=100) == 100


class _Stream(torch.utils.data.IterableDataset):
    """Examples without a length (the loader cannot say how many steps an epoch has)."""

    def __iter__(self):
        ds = IndexedDataset(n=200, d=64)
        return iter(zip(ds.x, ds.y))


def test_a_loader_without_a_length_plans_max_steps_or_says_the_size_is_unknown(tmp_path, caplog):
    cb = DualFormCallback(tmp_path / "s.h5", check_disk=True)
    with caplog.at_level("INFO"):
        L.Trainer(max_steps=10, callbacks=[cb], **TRAINER_KW).fit(
            MLP(d=64, hidden=48), torch.utils.data.DataLoader(_Stream(), batch_size=10))
    assert cb.plan.steps_per_epoch == 10 and cb.plan.epochs == 1  # (it planned 0 B and never checked the disk)
    written = os.path.getsize(cb.store_path)
    assert abs(cb.plan.total_bytes - written) / written <= 0.10, (cb.plan.total_bytes, written)
    unknown = estimate({"a": 128}, {"a": ("linear", 784, 800, True)}, itemsize=4, steps_per_epoch=0,
                       epochs=float("inf"))
    assert "the run's length is not known" in unknown.describe() and " 0 B" not in unknown.describe()
