"""Shared pieces of the benchmarks: the paper's MLP, a quiet Trainer, timing helpers, machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The 70,000-image Fashion-MNIST file (not in the repository: see ../shared/data/README.md).
FASHION_70K = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "fashion_mnist_npm70k.npz"))


class MLP(pl.LightningModule):
    """The paper's MLP: 784-800-800-10, ReLU, SGD with momentum (Irie et al. 2022, MNIST setting)."""

    def __init__(self, lr: float = 3e-3, momentum: float = 0.9, hidden: int = 800, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )
        self.lr, self.momentum = lr, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def trainer(epochs: int, callbacks: list | None = None, accelerator: str = "cpu", **kw: Any) -> pl.Trainer:
    """A Trainer that does nothing but train: no logger, checkpoints, validation or progress bar."""
    return pl.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=1.0, callbacks=callbacks or [], **kw,
    )


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    import h5py
    import lightning

    import lightning_dualform

    return {
        "lightning_dualform": lightning_dualform.__version__,
        "library_path": os.path.dirname(lightning_dualform.__file__),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def write_json(out_dir: str, name: str, result: Any) -> str:
    """Write a benchmark's result as ``out_dir/name`` (the directory made if needed), say so, return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"\nwrote {path}")
    return path
