"""``LightningCLI``: a YAML config names ``DualFormCallback`` under ``trainer.callbacks`` with its arguments,
and the run records an exact store (a tiny model and datamodule defined here, and the example config of
``docs/examples/lightning_cli.yaml`` with the demo's model)."""

from __future__ import annotations

import os
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning_utilities.core.imports import RequirementCache
from torch import nn

from helpers import IndexedDataset, dual_output, real_output, rel_err
from lightning_dualform import DualFormCallback, DualInference, StoreReader

if not RequirementCache("jsonargparse[signatures]>=4.27.7"):
    pytest.skip(
        "LightningCLI needs jsonargparse[signatures] (in the dev extra: pip install -e '.[dev]')",
        allow_module_level=True,
    )

from lightning.pytorch.cli import LightningCLI  # noqa: E402

DOCS_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "examples", "lightning_cli.yaml"
)


class TinyModel(L.LightningModule):
    """6-hidden-3 classifier trained by SGD with momentum.

    Args:
        hidden: width of the hidden layer.
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(self, hidden: int = 8, lr: float = 0.1, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 10.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class TinyData(L.LightningDataModule):
    """Inputs that carry their own dataset index (see ``helpers.IndexedDataset``).

    Args:
        n: training examples.
        batch_size: examples per batch.
    """

    def __init__(self, n: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self):
        return torch.utils.data.DataLoader(IndexedDataset(n=self.n), batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(IndexedDataset(n=20, seed=1), batch_size=8)


def _run(args: list[str], **kw) -> LightningCLI:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LightningCLI(args=args, save_config_kwargs={"overwrite": True}, **kw)


def test_a_config_names_the_callback_and_records_an_exact_store(tmp_path) -> None:
    store = tmp_path / "tiny.h5"
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2, "accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
            "enable_checkpointing": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
            "gradient_clip_val": 0.5,
            "callbacks": [{"class_path": "lightning_dualform.DualFormCallback",
                           "init_args": {"path": str(store), "record_queries": ["test"], "commit_seconds": 5.0,
                                         "layers": ["net.0", "net.2"]}}],
        },
        "model": {"hidden": 8, "lr": 0.1},
        "data": {"n": 96, "batch_size": 16},
    }
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cli = _run(["fit", "--config", str(cfg)], model_class=TinyModel, datamodule_class=TinyData)
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, DualFormCallback)]
    assert len(cbs) == 1
    cb = cbs[0]
    assert cb.path == str(store) and tuple(cb.record_queries) == ("test",)  # the others show in the store below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    with StoreReader(store) as s:
        assert s.complete and s.layers == ["net.0", "net.2"] and s.last_step == 12
        assert s.layer("net.0").n_rows == 2 * 96 and s.query_splits == ["test"]
        assert s.queries("test").n == 20
    # the memory rebuilds the trained layers: against the real model, computed from the raw file
    x = torch.randn(7, 6)
    assert rel_err(dual_output(str(store), "net.0", x), real_output(cli.model.net[0], x)) <= 1e-5
    h = torch.randn(7, 8)
    assert rel_err(dual_output(str(store), "net.2", h), real_output(cli.model.net[2], h)) <= 1e-5


def test_the_example_config_with_the_demo_model(tmp_path, monkeypatch) -> None:
    """docs/examples/lightning_cli.yaml as the docs run it (fit, then test from the last checkpoint), on 300
    digits for one epoch."""
    monkeypatch.chdir(tmp_path)  # the config's paths are relative: runs/cli-mnist...
    small = ["--data.init_args.limit", "300", "--trainer.max_epochs", "1"]
    cli = _run(["fit", "--config", DOCS_CONFIG, *small])
    assert type(cli.model).__name__ == "PaperMLP"
    _run(["test", "--config", DOCS_CONFIG, *small, "--ckpt_path", "last"])
    store = tmp_path / "runs" / "cli-mnist.h5"
    with DualInference(str(store), device="cpu", accumulate=torch.float64) as di:
        assert di.complete and di.layers == ["net.0", "net.2", "net.4"]
        assert di.store.queries("test").n == 60 and di.store.queries("test").inputs.shape == (60, 784)
        errors = di.verify(n_samples=32)
        assert max(errors.values()) <= 1e-5, errors
        x = torch.from_numpy(np.random.default_rng(0).random((5, 784), dtype=np.float32))
        res = di.attend("net.0", x, top_k=3)
    assert rel_err(res.dual, real_output(cli.model.net[0], x)) <= 1e-5
