"""Multi-task learning as in the paper: MNIST and Fashion-MNIST mixed in every batch, one shared 10-way head.

Digit ``d`` and clothing class ``d`` share output unit ``d``. The training set is the concatenation
``[MNIST train | Fashion-MNIST train]``, so a memory row's dataset index says which task wrote it:
:func:`lightning_dualform.analysis.task_mass` sums each test input's attention over the rows of each
task. The paper's finding: test inputs of one task attend almost only to training patterns of the same task.

Defaults: the embedded 10,000-image MNIST and Fashion-MNIST sets (8,000 + 8,000 training images),
300 steps. ``--fashion-path`` takes an npz with more Fashion-MNIST images (e.g. the 70,000-image file).

Outputs in ``--out``: ``multitask.h5``, ``votes.md`` (vote table and the task-mass table), ``task_mass.png``,
``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png``, ``summary.json``.

    python examples/multitask.py --out runs/multitask
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch

import common
from lightning_dualform.analysis import markdown_table, task_mass
from lightning_dualform.datasets import FASHION_CLASSES, MNIST_CLASSES

TASKS = ("MNIST", "Fashion-MNIST")


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    p.add_argument("--hidden", type=int, default=800, help="width of the two hidden layers")
    p.add_argument("--fashion-path", default=None, help="npz with more Fashion-MNIST images (default: the embedded 10k)")
    p.add_argument("--limit", type=int, default=None, help="training images per task")
    args = p.parse_args(argv)
    out = common.prepare_out(args, "multitask")
    pl.seed_everything(args.seed, verbose=False)
    try:
        m = common.embedded_split("mnist", args.seed)
        f = common.embedded_split("fashion_mnist", args.seed, args.fashion_path)
    except (FileNotFoundError, ValueError) as err:
        print(f"multitask: {err}", file=sys.stderr)
        return 2
    lim = args.limit
    m_train, f_train = common.image_tensors(m[0][:lim], m[1][:lim]), common.image_tensors(f[0][:lim], f[1][:lim])
    m_test, f_test = common.image_tensors(m[2], m[3]), common.image_tensors(f[2], f[3])
    n_m, n_f = len(m_train), len(f_train)
    train_set = torch.utils.data.ConcatDataset([m_train, f_train])  # index < n_m: MNIST
    test_set = torch.utils.data.ConcatDataset([m_test, f_test])
    train, test = common.loaders(args, train_set, test_set)
    model = common.Classifier(common.mlp(784, args.hidden), lr=args.lr, momentum=args.momentum)
    store = os.path.join(out, "multitask.h5")
    common.fit_and_test(args, model, store, train, test)

    # as many test inputs of each task; the query set is [MNIST test | Fashion-MNIST test]
    half = max(1, args.queries // 2)
    examples = np.concatenate([np.arange(min(half, len(m_test))), len(m_test) + np.arange(min(half, len(f_test)))])
    classes = tuple(f"{d}/{c}" for d, c in zip(MNIST_CLASSES, FASHION_CLASSES))
    tasks = {TASKS[0]: range(0, n_m), TASKS[1]: range(n_m, n_m + n_f)}

    def per_task(di: Any, run: Any) -> dict[str, Any]:
        is_mnist = run.index < len(m_test)
        rows, groups, shares = [], {}, {}
        for name in run.layers:
            share = task_mass(di, name, run.keys[name], tasks).share("absolute")
            for test_task, sel in ((TASKS[0], is_mnist), (TASKS[1], ~is_mnist)):
                mean = share[sel].mean(0)
                rows.append([name, f"{test_task} test ({int(sel.sum())})", f"{100 * mean[0]:.1f}", f"{100 * mean[1]:.1f}"])
                groups[f"{name}\n{test_task} test"] = {f"on {t} rows": float(mean[i]) for i, t in enumerate(TASKS)}
                shares[f"{name}/{test_task}"] = mean.tolist()
        common.plot_bars(groups, os.path.join(out, "task_mass.png"), "Share of attention (|k·q|) per training task",
                         "share of mass")
        md = "\n## Attention per task\n\nMean share (percent) of each test input's absolute attention on the training " \
             "rows of each task.\n\n" + markdown_table(["layer", "test inputs", f"on {TASKS[0]}", f"on {TASKS[1]}"], rows)
        with open(os.path.join(out, "votes.md"), "a") as fh:
            fh.write(md)
        return {"task_share": shares}

    summary = common.analyse_classifier(
        store, out, args, classes=classes, to_image=lambda x: np.asarray(x).reshape(28, 28),
        title="Multi-task: MNIST + Fashion-MNIST, shared head", examples=examples, more=per_task,
        extra={"test_accuracy": model.accuracy, "train_examples": {"MNIST": n_m, "Fashion-MNIST": n_f}},
    )
    print(f"multitask: test accuracy {100 * model.accuracy:.1f}% (both tasks) after {summary['steps']} steps; outputs in {out}")
    print(open(os.path.join(out, "votes.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
