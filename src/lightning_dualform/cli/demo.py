"""The demo behind ``lightning-dualform demo``: the paper's MLP on the embedded MNIST digits.

Irie, Csordás and Schmidhuber (ICML 2022) train a 784-800-800-10 ReLU MLP with SGD (momentum 0.9,
gradient clipping 1.0, batch 128) and read its linear layers as attention over training patterns. This
module trains that model with :class:`~lightning_dualform.DualFormCallback`, records the test queries,
attends over the memory and draws the answer, in under a minute on a laptop CPU.

Example::

    from lightning_dualform.cli.demo import run_demo
    summary = run_demo("demo/", epochs=2)
    summary["accuracy"], summary["store_bytes"], summary["certificate"]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_dualform.cli.inputs import PROG, UsageError, positive
from lightning_dualform.cli.output import human_bytes, note, progress
from lightning_dualform.datasets import ImageDataModule
from lightning_dualform.record.callback import DualFormCallback

log = logging.getLogger(__name__)

#: Learning rate of the demo. The paper's other settings are kept (momentum 0.9, clipping 1.0, batch 128);
#: 0.05 reaches about 91% test accuracy on the 8,000 embedded training digits in 2 epochs (0.01 reaches 73%
#: after one). Each epoch adds about 130 MB of float32 rows to the store (measured: 127.6 MB; the callback's plan
#: says 129.7 MB).
DEMO_LR = 0.05
#: Learning rate of the demo with ``optimizer="adamw"`` (weight decay 0.01).
DEMO_ADAMW_LR = 1e-3
DEMO_SEED = 0
#: digits of the embedded MNIST (:mod:`lightning_dualform.datasets`): the most ``--limit`` can take
DEMO_DIGITS = 10_000
#: the seeds numpy takes
MAX_SEED = 2**32 - 1
DEMO_OPTIMIZERS = ("sgd", "adamw")


class Classifier(pl.LightningModule):
    """Any ``nn.Module`` classifier trained by SGD with momentum (or AdamW) on cross-entropy (used by the demo
    and the examples). ``test_step`` returns the logits, so the callback stores each test query's prediction.

    Args:
        net: the network; its ``nn.Linear`` layers are what the callback records.
        lr: learning rate.
        momentum: SGD momentum.
        optimizer: ``"sgd"`` or ``"adamw"`` (``torch.optim.AdamW``, weight decay 0.01).
    """

    def __init__(self, net: nn.Module, lr: float, momentum: float = 0.9, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.optimizer_name = lr, momentum, optimizer
        self.correct, self.seen = 0, 0

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    @override
    def on_test_epoch_start(self) -> None:
        self.correct, self.seen = 0, 0

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.correct += int((logits.argmax(1) == y).sum())
        self.seen += int(y.shape[0])
        return logits

    @property
    def accuracy(self) -> float:
        """Accuracy over the last ``trainer.test``."""
        return self.correct / max(1, self.seen)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class PaperMLP(Classifier):
    """784-800-800-10 ReLU MLP trained by SGD with momentum (the paper's MNIST model), or AdamW.

    Args:
        lr: learning rate.
        momentum: SGD momentum.
        hidden: width of the two hidden layers.
        optimizer: ``"sgd"`` or ``"adamw"``.
    """

    def __init__(self, lr: float = DEMO_LR, momentum: float = 0.9, hidden: int = 800, classes: int = 10,
                 optimizer: str = "sgd") -> None:
        net = nn.Sequential(
            nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )
        super().__init__(net, lr, momentum, optimizer)
        self.save_hyperparameters()

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def pick_queries(label: np.ndarray, prediction: np.ndarray, n: int = 3) -> list[int]:
    """Positions of ``n`` test queries worth a picture: correct ones, and the first mistake when there is one."""
    wrong = np.flatnonzero(label != prediction)
    right = np.flatnonzero(label == prediction)
    picks = list(right[: max(0, n - (1 if len(wrong) else 0))]) + list(wrong[:1])
    if len(picks) < n:  # too few of one kind
        picks += [i for i in range(len(label)) if i not in picks][: n - len(picks)]
    return sorted(int(i) for i in picks[:n])


def run_demo(
    out: str | os.PathLike = "demo",
    *,
    epochs: int = 2,
    limit: int | None = None,
    lr: float | None = None,
    seed: int = DEMO_SEED,
    top_k: int = 5,
    quiet: bool = False,
    progress: bool = False,
    plot: bool = True,
    echo: Callable[[str], None] = print,
    optimizer: str = "sgd",
) -> dict[str, Any]:
    """Train, record, test, attend and draw; returns the summary (also written to ``out/summary.json``).

    Args:
        out: folder for ``mnist.h5``, ``attend.png`` and ``summary.json`` (created; an old store is replaced).
        epochs: training epochs.
        limit: use only this many of the 10,000 digits (80% train, 20% test), e.g. for tests.
        lr: learning rate (default: 0.05 for SGD, 1e-3 for AdamW; SGD's momentum 0.9, gradient clipping 1.0 and
            batch 128 are fixed).
        seed: seeds the split, the shuffle and the initial weights.
        top_k: training patterns shown per query and layer.
        quiet: no Lightning messages.
        progress: show Lightning's progress bar and the attention bars.
        plot: draw ``attend.png`` (needs matplotlib).
        echo: where the progress lines go.
        optimizer: ``"sgd"`` (the paper's) or ``"adamw"`` (``torch.optim.AdamW``, weight decay 0.01: exact too; each
            training digit's attention weight then depends on the unit, and the picture ranks by it).

    Raises:
        ValueError: a bad ``epochs``, ``limit`` or ``top_k``.
        OSError: ``out`` cannot be created or written.
    """
    from lightning_dualform.attend.inference import DualInference

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`demo --epochs {epochs}`: expected a positive integer.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 10 <= limit <= DEMO_DIGITS):
        raise ValueError(
            f"`demo --limit {limit}`: expected an integer from 10 to {DEMO_DIGITS:,} (examples in all, 80% of them for "
            "training)."
        )
    if optimizer not in DEMO_OPTIMIZERS:
        raise ValueError(f"`demo --optimizer {optimizer}`: expected one of {DEMO_OPTIMIZERS}.")
    if lr is None:
        lr = DEMO_ADAMW_LR if optimizer == "adamw" else DEMO_LR
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"{out}: the output folder is not writable; pass another one with --out.")
    store = os.path.join(out, "mnist.h5")
    t0 = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = ImageDataModule("mnist", batch_size=128, test_fraction=0.2, seed=seed, limit=limit)
    dm.setup()
    train_set, test_set = dm.train_set, dm.test_set
    assert train_set is not None and test_set is not None  # setup() made both
    model = PaperMLP(lr=lr, optimizer=optimizer)
    cb = DualFormCallback(store, record_queries=("test",), overwrite=True)
    echo(
        f"demo: training a 784-800-800-10 MLP with {'AdamW' if optimizer == 'adamw' else 'SGD'} on {len(train_set)} "
        f"MNIST digits for {epochs} epoch(s), recording into {store}"
    )
    with _lightning_quiet(quiet):
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            gradient_clip_val=1.0,
            callbacks=[cb],
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            deterministic=True,
        )
        trainer.fit(model, datamodule=dm)
        t_fit = time.perf_counter() - t0
        trainer.test(model, datamodule=dm, verbose=False)
    store_path = cb.store_path
    assert store_path is not None  # fit recorded into it
    accuracy = model.accuracy
    summary: dict[str, Any] = {
        "store": store,
        "epochs": epochs,
        "train_examples": len(train_set),
        "test_examples": len(test_set),
        "optimizer": optimizer,
        "lr": lr,
        "momentum": 0.9 if optimizer == "sgd" else None,
        "gradient_clip_val": 1.0,
        "batch_size": 128,
        "seed": seed,
        "accuracy": accuracy,
        "store_bytes": os.path.getsize(store_path),
        "certificate": {k: {"rel_err": v["rel_err"], "exact": bool(v["exact"]), "tolerance": v["tolerance"]}
                        for k, v in cb.certificate.items()},
        "fit_seconds": t_fit,
    }
    echo(f"demo: test accuracy {100 * accuracy:.1f}% on {len(test_set)} digits; attending ...")
    with DualInference(store_path, device="cpu", progress=progress) as di:
        qs = di.store.queries("test")
        picks = pick_queries(qs.label, qs.prediction)
        from lightning_dualform.query_runs import attend_queries  # shared with `attend`

        run = attend_queries(di, split="test", positions=picks, top_k=min(top_k, 5), contribution_to="pred")
        summary["queries"] = {
            "index": run.index.tolist(),
            "label": run.label.tolist(),
            "prediction": run.prediction.tolist(),
        }
        summary["dual_rel_err"] = {k: r.max_rel_err for k, r in run.results.items()}
        # which examples: with the trained model at hand, first-order influence on each prediction's margin through
        # every recorded layer leads the picture (attention, the paper's view, follows)
        from lightning_dualform.cli.which_examples import model_influence

        influence = model_influence(di, model, qs.inputs_at(np.asarray(picks)), "first_order", min(top_k, 5))
        summary["influence"] = {"label": influence["label"], "proponents": [
            [p["index"] for p in q["proponents"]] for q in influence["queries"]]}
        if plot:
            from lightning_dualform.plots import plot_attention

            png = os.path.join(out, "attend.png")
            plot_attention(run, di.store, png, by="pattern", class_names=dm.classes, influence=influence)
            summary["plot"] = png
    summary["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def cmd_demo(args: argparse.Namespace) -> int:
    """``lightning-dualform demo``: check the options, run :func:`run_demo`, print its summary."""
    positive(args.epochs, "--epochs")
    if args.lr is not None and not 0 < args.lr < float("inf"):  # (a NaN step size trains NaN weights)
        raise UsageError(f"--lr {args.lr}: expected a positive, finite learning rate.")
    if args.limit is not None and args.limit < 10:
        raise UsageError(f"--limit {args.limit}: expected at least 10 digits.")
    if args.limit is not None and args.limit > DEMO_DIGITS:
        raise UsageError(f"--limit {args.limit}: the demo has {DEMO_DIGITS:,} digits; use --limit {DEMO_DIGITS} or "
                         "less (or leave it out for all of them).")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed {args.seed}: expected an integer from 0 to {MAX_SEED} (numpy's seeds).")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a file; pass a folder.")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(args.out) and (not os.path.isdir(parent) or not os.access(parent, os.W_OK)):
        raise UsageError(f"--out {args.out}: cannot create this folder here; choose another path.")
    if os.path.isdir(args.out) and not os.access(args.out, os.W_OK):
        raise UsageError(f"--out {args.out}: the folder is not writable; choose another one.")
    if not args.no_plot:
        from lightning_dualform.plots import require_matplotlib

        require_matplotlib()

    def echo(msg: str) -> None:
        note(args, msg)

    s = run_demo(args.out, epochs=args.epochs, limit=args.limit, lr=args.lr, seed=args.seed, optimizer=args.optimizer,
                 quiet=args.quiet, progress=progress(args), plot=not args.no_plot, echo=echo)
    cert = s["certificate"]
    worst = max((c["rel_err"] for c in cert.values()), default=float("nan"))
    exact = all(c["exact"] for c in cert.values())
    print(f"demo finished in {s['seconds']:.0f} s (training {s['fit_seconds']:.0f} s)")
    opt = f"SGD lr {s['lr']:g} momentum 0.9" if s["optimizer"] == "sgd" else f"AdamW lr {s['lr']:g} weight decay 0.01"
    print(
        f"  data       {s['train_examples']} training / {s['test_examples']} test MNIST digits, "
        f"{s['epochs']} epoch(s), {opt}, clipping 1.0, batch 128"
    )
    print(f"  accuracy   {100 * s['accuracy']:.1f}% on the test digits")
    print(f"  store      {s['store']} ({human_bytes(s['store_bytes'])})")
    print(f"  exactness  {'exact' if exact else 'NOT exact'}: rebuilt weights within {worst:.1e} relative "
          "(" + ", ".join(f"{k} {c['rel_err']:.1e}" for k, c in cert.items()) + ")")
    if "plot" in s:
        print(f"  picture    {s['plot']} (test digits {', '.join(str(i) for i in s['queries']['index'])})")
    print(f"next: {PROG} info {s['store']}")
    print(f"      {PROG} attend {s['store']} --split test --top-k 5 --plot top.png --json top.json")
    print(f"      {PROG} verify {s['store']}")
    return 0


class _lightning_quiet:
    """Silence Lightning's info lines (and the worker-count warning) for the demo when asked."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._levels: list[tuple[logging.Logger, int]] = []
        self._warn: Any = None

    def __enter__(self) -> None:
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*(deterministic|torch.use_deterministic).*")
        warnings.filterwarnings("ignore", message=".*no `validation_step`.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        if self.quiet:
            for name in ("lightning.pytorch", "lightning.fabric", "lightning_dualform", "lightning"):
                lg = logging.getLogger(name)
                self._levels.append((lg, lg.level))
                lg.setLevel(logging.WARNING)

    def __exit__(self, *exc: Any) -> None:
        for lg, level in self._levels:
            lg.setLevel(level)
        self._warn.__exit__(*exc)
