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
