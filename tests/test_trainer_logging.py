"""The callback tells the Trainer's loggers what it records: metrics under dualform/, and pictures."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TRAINER_KW, MLP, IndexedDataset, loader
from lightning.pytorch.loggers import CSVLogger, Logger

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dualform import DualFormAttentionLogger, DualFormCallback


class _ImageLogger(Logger):
    """A logger that takes images (as W&B's does, through ``log_image``) and keeps everything it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict] = []
        self.images: list[tuple[str, np.ndarray, int]] = []

    @property
    def name(self) -> str:
        return "spy"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_image(self, key, images, step=None) -> None:
        self.images += [(key, np.asarray(im), step) for im in images]


class _Validated(MLP):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def test_a_csv_logger_gets_dualform_columns(tmp_path):
    cb = DualFormCallback(tmp_path / "s.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", log_every_n_steps=2,
                        logger=CSVLogger(tmp_path / "logs", name="run"),
                        **{k: v for k, v in TRAINER_KW.items() if k != "logger"})
    trainer.fit(MLP(), loader(IndexedDataset(n=64), 16))
    with open(trainer.logger.experiment.metrics_file_path) as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    assert {"dualform/rows", "dualform/rows/net.0", "dualform/store_bytes", "dualform/writer_wait_s"} <= columns
    assert {"dualform/certificate/net.0/rel_err", "dualform/certificate/net.2/exact"} <= columns
    rows_logged = [float(r["dualform/rows"]) for r in rows if r.get("dualform/rows")]
    assert rows_logged == sorted(rows_logged) and rows_logged[-1] == 2 * 64 * 2  # two layers, 2 epochs of 64
    exact = [r["dualform/certificate/net.0/exact"] for r in rows if r.get("dualform/certificate/net.0/exact")]
    assert exact == ["1.0"]


def test_without_a_logger_nothing_is_logged_and_nothing_changes(tmp_path):
    with pytest.deprecated_call(match="DualFormAttentionLogger"):
        cb = DualFormCallback(tmp_path / "s.h5", log_attention_every_n_epochs=1)
    L.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", **TRAINER_KW).fit(
        _Validated(), loader(IndexedDataset(n=32), 16), loader(IndexedDataset(n=16, seed=1), 8, shuffle=False))
    assert all(c["exact"] for c in cb.certificate.values())


def test_a_logger_that_takes_images_gets_the_attention_picture(tmp_path):
    spy = _ImageLogger()
    with pytest.deprecated_call(match="DualFormAttentionLogger"):  # (the alias runs the callback of its own)
        cb = DualFormCallback(tmp_path / "s.h5", log_attention_every_n_epochs=2, log_attention_queries=3)
    trainer = L.Trainer(max_epochs=4, callbacks=[cb], accelerator="cpu", logger=spy, log_every_n_steps=1,
                        **{k: v for k, v in TRAINER_KW.items() if k != "logger"})
    trainer.fit(_Validated(), loader(IndexedDataset(n=32), 16), loader(IndexedDataset(n=16, seed=1), 8, shuffle=False))
    assert [(key, step) for key, _, step in spy.images] == [("dualform/attention", 4), ("dualform/attention", 8)]
    image = spy.images[0][1]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    assert any("dualform/rows" in m for m in spy.metrics)
    assert all(c["exact"] for c in cb.certificate.values())  # the mid-fit attention changed nothing


class _Logged(MLP):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)  # Lightning's own rows carry the epoch
        return loss


def test_dualform_rows_carry_the_epoch_and_come_every_log_every_n_steps(tmp_path):
    """Every dualform/ row says its epoch, as Lightning's rows do, and the store's progress comes every
    log_every_n_steps optimizer steps (and at each epoch's end), with the rows recorded by then."""
    cb = DualFormCallback(tmp_path / "s.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", log_every_n_steps=2,
                        logger=CSVLogger(tmp_path / "logs", name="run"),
                        **{k: v for k, v in TRAINER_KW.items() if k != "logger"})
    trainer.fit(_Logged(), loader(IndexedDataset(n=64), 16))  # 4 steps per epoch
    with open(trainer.logger.experiment.metrics_file_path) as fh:
        rows = list(csv.DictReader(fh))
    progress = [r for r in rows if r.get("dualform/rows")]
    assert [int(r["step"]) for r in progress] == [2, 4, 6, 8]
    for r in progress:  # two layers, 16 rows per step each; epoch of the step just taken
        step = int(r["step"])
        assert float(r["dualform/rows"]) == 2 * 16 * step and int(r["epoch"]) == (step - 1) // 4, r
    cert = [r for r in rows if r.get("dualform/certificate/net.0/rel_err")]
    assert len(cert) == 1 and int(cert[0]["epoch"]) == 1  # the last epoch that trained
    assert all(r["epoch"] != "" for r in rows)


def test_the_attention_logger_stands_beside_the_recording_callback(tmp_path):
    spy = _ImageLogger()
    cb = DualFormCallback(tmp_path / "s.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb, DualFormAttentionLogger(every_n_epochs=1, queries=2)],
                        accelerator="cpu", logger=spy, **{k: v for k, v in TRAINER_KW.items() if k != "logger"})
    trainer.fit(_Validated(), loader(IndexedDataset(n=32), 16), loader(IndexedDataset(n=16, seed=1), 8, shuffle=False))
    assert [(key, step) for key, _, step in spy.images] == [("dualform/attention", 2), ("dualform/attention", 4)]
    assert all(c["exact"] for c in cb.certificate.values())


def test_the_attention_logger_needs_a_recording_callback(tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs"):
        DualFormAttentionLogger(every_n_epochs=0)
    trainer = L.Trainer(max_epochs=1, callbacks=[DualFormAttentionLogger()], accelerator="cpu", **TRAINER_KW)
    with pytest.raises(MisconfigurationException, match="no DualFormCallback"):
        trainer.fit(_Validated(), loader(IndexedDataset(n=32), 16), _val())
    two = [DualFormCallback(tmp_path / "a.h5"), DualFormCallback(tmp_path / "b.h5"), DualFormAttentionLogger()]
    trainer = L.Trainer(max_epochs=1, callbacks=two, accelerator="cpu", **TRAINER_KW)
    with pytest.raises(MisconfigurationException, match="store=..."):
        trainer.fit(_Validated(), loader(IndexedDataset(n=32), 16), _val())


def _val():
    return loader(IndexedDataset(n=16, seed=1), 8, shuffle=False)
