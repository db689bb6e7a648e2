"""The floor of recording a fit on this machine: what keeping its rows and writing their bytes costs, alone.

:class:`FloorRecorder` is the least a recorder of exact float32 rows can do: forward hooks keep each
tracked layer's input (its keys: a linear layer's rows, a convolution's maps) and a tensor hook its output
gradient (its values), a thread takes each step's tensors and, in the ``bytes`` floor, writes them with
``os.pwrite`` into one file, with ``fdatasync`` every 64 MiB (then dropping the synced pages from the page
cache, ``POSIX_FADV_DONTNEED``) and ``fsync`` at fit end, as the store does (``floor:bytes-cached`` keeps them
cached, as the store did before Dec 7 2026's eighth session);
the first epoch's inputs are written once, as the store keeps them. No checksum, HDF5, dataset index,
gradient check or certificate. The ``refs`` floor hands the tensors to the thread, which drops them: the
cost of keeping them alive and of the hooks alone.

Each round fits the baseline (no callback), the library's defaults (``DualFormCallback``: float32, no
compression, the certificate as training goes) and the two floors, in an order rotated between rounds; each
ratio is a fit's wall time over the same round's baseline, and the median over rounds is reported. The gap
between the library and the ``bytes`` floor is what the library's own work costs; the ``bytes`` floor is what
no recorder of these rows through the page cache can go below on this machine.

Usage::

    python benchmarks/floor.py --model mlp --examples 24000 --epochs 2 --repeats 3
    python benchmarks/floor.py --model resnet18 --steps 20 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import machine, median, write_json  # noqa: E402
from torch import nn  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402

#: bytes written between two fdatasync calls (the store's writeback cadence, store/_writeback.py)
SYNC_EVERY = 64 * 2**20


class FloorRecorder(pl.Callback):
    """Keep every ``nn.Linear``/``nn.Conv2d`` input and output gradient of each step; with ``write``, write
    their raw bytes (and the first epoch's inputs) to ``path`` on a thread. See the module docstring."""

    def __init__(self, path: str, write: bool, drop_synced: bool = True) -> None:
        self.path, self.write, self.drop_synced = path, write, drop_synced
        self._rows: list[torch.Tensor] = []
        self._queue: queue.Queue = queue.Queue(maxsize=16)
        self._hooks: list[Any] = []
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._error: BaseException | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.write:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._thread = threading.Thread(target=self._run, name="floor-writer", daemon=True)
        self._thread.start()
        for m in pl_module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                self._hooks.append(m.register_forward_hook(self._forward))

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        self._rows.append(inputs[0].detach())
        output.register_hook(self._rows.append)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.current_epoch == 0:  # each example's input once (the store keeps them)
            self._rows.append(batch[0])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        rows, self._rows = self._rows, []
        self._queue.put(rows)

    def _run(self) -> None:
        offset = since_sync = dropped_to = 0
        try:
            while (rows := self._queue.get()) is not None:
                if self._fd < 0:
                    continue
                for t in rows:
                    data = memoryview(t.contiguous().numpy()).cast("B")
                    while data:
                        n = os.pwrite(self._fd, data, offset)
                        offset, since_sync, data = offset + n, since_sync + n, data[n:]
                if since_sync >= SYNC_EVERY:
                    os.fdatasync(self._fd)
                    if self.drop_synced:
                        os.posix_fadvise(self._fd, dropped_to, offset - dropped_to, os.POSIX_FADV_DONTNEED)
                        dropped_to = offset
                    since_sync = 0
        except BaseException as err:  # raised at fit end
            self._error = err

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self._hooks:
            h.remove()
        self._queue.put(None)
        assert self._thread is not None
        self._thread.join()
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
        if self._error is not None:
            raise self._error


def mlp_fit(examples: int, epochs: int) -> Callable[[list], float]:
    """The paper's MLP on real Fashion-MNIST (benchmarks/overhead.py's fit): returns ``fit(callbacks) -> s``."""
    from common import FASHION_70K, MLP, trainer
    from overhead import make_datamodule

    dm = make_datamodule(FASHION_70K, examples, 128, 0)

    def fit(callbacks: list) -> float:
        tr = trainer(epochs, callbacks)
        t0 = time.perf_counter()
        tr.fit(MLP(), datamodule=dm)
        return time.perf_counter() - t0

    return fit


def resnet_fit(steps: int, batch: int) -> Callable[[list], float]:
    """benchmarks/real_models.py's ResNet-18 for 32x32: returns ``fit(callbacks) -> s``."""
    import real_models

    def fit(callbacks: list) -> float:
        task, _ = real_models.model("resnet18")
        tr = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=callbacks)
        dl = torch.utils.data.DataLoader(real_models.data("resnet18", steps * batch), batch_size=batch, shuffle=True)
        t0 = time.perf_counter()
        tr.fit(task, dl)
        return time.perf_counter() - t0

    return fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="mlp", choices=["mlp", "resnet18"])
    ap.add_argument("--examples", type=int, default=24000, help="(mlp) training images")
    ap.add_argument("--epochs", type=int, default=2, help="(mlp) epochs")
    ap.add_argument("--steps", type=int, default=20, help="(resnet18) optimizer steps")
    ap.add_argument("--batch-size", type=int, default=32, help="(resnet18) examples per step")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (baseline, library, floors)")
    ap.add_argument("--workdir", default=None, help="where the store and the floor's file go (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    fit = mlp_fit(args.examples, args.epochs) if args.model == "mlp" else resnet_fit(args.steps, args.batch_size)
    work = tempfile.mkdtemp(prefix="dualform-floor-", dir=args.workdir)
    store, raw = os.path.join(work, "store.h5"), os.path.join(work, "floor.bin")
    variants: dict[str, Callable[[], list]] = {
        "library": lambda: [DualFormCallback(store, overwrite=True)],
        "floor:bytes": lambda: [FloorRecorder(raw, write=True)],
        "floor:bytes-cached": lambda: [FloorRecorder(raw, write=True, drop_synced=False)],
        "floor:refs": lambda: [FloorRecorder(raw, write=False)],
    }
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    baselines: list[float] = []
    try:
        fit([])  # warm-up: imports, the allocator, the data
        for r in range(args.repeats):
            names = list(variants)
            names = names[r % len(names):] + names[: r % len(names)]
            base = fit([])
            baselines.append(base)
            for name in names:
                ratios[name].append(fit(variants[name]()) / base)
                for p in (store, raw):
                    if os.path.exists(p):
                        os.remove(p)
            print(f"round {r}: baseline {base:.2f} s, " + ", ".join(f"{v} {x[-1]:.3f}" for v, x in ratios.items()),
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {v: median(x) for v, x in ratios.items()}
    print("median ratio: " + ", ".join(f"{v} {x:.3f}" for v, x in summary.items()))
    write_json(args.out, f"floor_{args.model}.json", {"machine": machine(), "args": vars(args), "baseline_s": baselines,
                                                      "ratios": ratios, "median": summary})


if __name__ == "__main__":
    main()
