"""Continual learning as in the paper: MNIST first, then Fashion-MNIST, one model and one store.

One fit: the training loader's batch sampler serves MNIST batches for the first ``--switch-step`` steps
and Fashion-MNIST batches afterwards (one shared 10-way head). A memory row's step therefore says which
task wrote it, and :func:`lightning_dualform.analysis.task_mass` with ``by="step"`` splits each test
input's attention between the two tasks. The per-step-bucket mass of ``DualInference.attend`` shows how
the attention of MNIST test inputs spreads over training time. MNIST test accuracy is measured at the
switch and at the end (forgetting).

Defaults: the embedded MNIST and Fashion-MNIST sets, 150 + 150 steps, 800-unit MLP.

Outputs in ``--out``: ``continual.h5``, ``votes.md`` (vote table, task shares, accuracies), ``task_mass.png``,
``mass_over_steps.png``, ``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png``, ``summary.json``.

    python examples/continual.py --out runs/continual --max-steps 600 --switch-step 300
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from typing_extensions import override

import common
from lightning_dualform.analysis import markdown_table, task_mass
from lightning_dualform.datasets import FASHION_CLASSES, MNIST_CLASSES

TASKS = ("MNIST", "Fashion-MNIST")


class TaskSwitchBatches(torch.utils.data.Sampler):
    """``first_steps`` shuffled batches of ``first`` indices, then ``second_steps`` of ``second`` (reshuffled per pass)."""

    def __init__(self, first: np.ndarray, second: np.ndarray, first_steps: int, second_steps: int, batch_size: int, seed: int) -> None:
        self.parts = [(np.asarray(first), first_steps), (np.asarray(second), second_steps)]
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(self.seed)
        for pool, steps in self.parts:
            order = np.zeros(0, np.int64)
            for _ in range(steps):
                if len(order) < self.batch_size:
                    order = np.concatenate([order, rng.permutation(pool)])
                batch, order = order[: self.batch_size], order[self.batch_size:]
                yield batch.tolist()

    def __len__(self) -> int:
        return sum(steps for _, steps in self.parts)


class ContinualClassifier(common.Classifier):
    """Measures MNIST test accuracy when the task switches (plain forward under no_grad: nothing is recorded)."""

    def __init__(self, *args: Any, mnist_test: common.IndexedTensors, switch_step: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.mnist_test, self.switch_step = mnist_test, switch_step
        self.accuracy_at_switch = float("nan")

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step == self.switch_step:
            with torch.no_grad():
                pred = self(self.mnist_test.x).argmax(1)
            self.accuracy_at_switch = float((pred == self.mnist_test.y).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    p.add_argument("--switch-step", type=int, default=None, help="step at which training moves to Fashion-MNIST (default: half)")
    p.add_argument("--hidden", type=int, default=800, help="width of the two hidden layers")
    p.add_argument("--buckets", type=int, default=20, help="step buckets of the mass-over-training figure")
    args = p.parse_args(argv)
    out = common.prepare_out(args, "continual")
    switch = args.switch_step if args.switch_step is not None else args.max_steps // 2
    if not 0 < switch < args.max_steps:
        print(f"continual: --switch-step {switch} must lie strictly between 0 and --max-steps {args.max_steps}", file=sys.stderr)
        return 2
    pl.seed_everything(args.seed, verbose=False)
    m = common.embedded_split("mnist", args.seed)
    f = common.embedded_split("fashion_mnist", args.seed)
    m_train, f_train = common.image_tensors(m[0], m[1]), common.image_tensors(f[0], f[1])
    m_test, f_test = common.image_tensors(m[2], m[3]), common.image_tensors(f[2], f[3])
    n_m = len(m_train)
    train_set = torch.utils.data.ConcatDataset([m_train, f_train])
    sampler = TaskSwitchBatches(np.arange(n_m), n_m + np.arange(len(f_train)), switch, args.max_steps - switch, args.batch_size, args.seed)
    train = torch.utils.data.DataLoader(train_set, batch_sampler=sampler)
    test = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([m_test, f_test]), batch_size=256)
    model = ContinualClassifier(common.mlp(784, args.hidden), lr=args.lr, momentum=args.momentum, mnist_test=m_test, switch_step=switch)
    store = os.path.join(out, "continual.h5")
    common.fit_and_test(args, model, store, train, test)
    with torch.no_grad():
        acc_m = float((model(m_test.x).argmax(1) == m_test.y).float().mean())
        acc_f = float((model(f_test.x).argmax(1) == f_test.y).float().mean())

    half = max(1, args.queries // 2)
    examples = np.concatenate([np.arange(min(half, len(m_test))), len(m_test) + np.arange(min(half, len(f_test)))])
    classes = tuple(f"{d}/{c}" for d, c in zip(MNIST_CLASSES, FASHION_CLASSES))

    def per_task(di: Any, run: Any) -> dict[str, Any]:
        is_mnist = run.index < len(m_test)
        tasks = {TASKS[0]: range(0, switch), TASKS[1]: range(switch, args.max_steps)}
        rows, groups, shares, over_time = [], {}, {}, {}
        for name in run.layers:
            share = task_mass(di, name, run.keys[name], tasks, by="step").share("absolute")
            for test_task, sel in ((TASKS[0], is_mnist), (TASKS[1], ~is_mnist)):
                mean = share[sel].mean(0)
                rows.append([name, f"{test_task} test ({int(sel.sum())})", f"{100 * mean[0]:.1f}", f"{100 * mean[1]:.1f}"])
                groups[f"{name}\n{test_task} test"] = {f"on {t} steps": float(mean[i]) for i, t in enumerate(TASKS)}
                shares[f"{name}/{test_task}"] = mean.tolist()
            mass = run.results[name].mass["step"]
            absm = mass.absolute.double().numpy()
            frac = absm / absm.sum(1, keepdims=True)
            over_time[name] = (np.asarray(mass.edges), frac[is_mnist].mean(0), frac[~is_mnist].mean(0))
        common.plot_bars(groups, os.path.join(out, "task_mass.png"), "Share of attention (|k·q|) on each task's steps", "share of mass")
        _plot_over_time(over_time, switch, os.path.join(out, "mass_over_steps.png"))
        md = (f"\n## Attention per task\n\nMNIST test accuracy: {100 * model.accuracy_at_switch:.1f}% after MNIST (step {switch}), "
              f"{100 * acc_m:.1f}% at the end; Fashion-MNIST test accuracy at the end: {100 * acc_f:.1f}%.\n\n"
              "Mean share (percent) of each test input's absolute attention on the rows written in each phase.\n\n"
              + markdown_table(["layer", "test inputs", f"on {TASKS[0]} steps", f"on {TASKS[1]} steps"], rows))
        with open(os.path.join(out, "votes.md"), "a") as fh:
            fh.write(md)
        return {"task_share": shares, "mnist_accuracy_at_switch": model.accuracy_at_switch, "mnist_accuracy_end": acc_m,
                "fashion_accuracy_end": acc_f, "switch_step": switch}

    summary = common.analyse_classifier(
        store, out, args, classes=classes, to_image=lambda x: np.asarray(x).reshape(28, 28),
        title="Continual: MNIST, then Fashion-MNIST", examples=examples, more=per_task, step_buckets=args.buckets,
        extra={"test_accuracy": model.accuracy},
    )
    print(f"continual: MNIST accuracy {100 * summary['mnist_accuracy_at_switch']:.1f}% at the switch, {100 * acc_m:.1f}% at the end; "
          f"outputs in {out}")
    print(open(os.path.join(out, "votes.md")).read())
    return 0


def _plot_over_time(over_time: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], switch: int, path: str) -> None:
    plt = common._plt()
    fig, axes = plt.subplots(1, len(over_time), figsize=(3.4 * len(over_time), 2.6), squeeze=False)
    for ax, (name, (edges, mn, fa)) in zip(axes[0], over_time.items()):
        ax.stairs(mn, edges, label="MNIST test", color="tab:blue")
        ax.stairs(fa, edges, label="Fashion test", color="tab:orange")
        ax.axvline(switch, color="gray", ls=":", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("share of |attention|", fontsize=8)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("Where in training the attention of test inputs goes (dotted: task switch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
