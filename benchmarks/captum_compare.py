"""Against the peer: top-10 proponents per test input, ours (a written store) versus Captum's ``TracInCPFast``.

1. Fit the paper's MNIST MLP (784-800-800-10, ReLU, SGD lr 0.05 momentum 0.9, ``gradient_clip_val=1.0``,
   batch 128, the demo's settings) on the 8,000 embedded MNIST training digits for ``--epochs`` (3), with
   ``DualFormCallback(layers=["net.4"])`` recording the last layer and ``ModelCheckpoint`` saving one
   checkpoint per epoch. Not timed (printed for context).
2. For the first ``--queries`` (1,000) test digits, time side by side, ``--repeats`` (3) interleaved rounds
   in rotated order, medians reported:

   - ours: open the store with ``DualInference``, compute the last layer's inputs with the final model
     (one forward) and ``attend("net.4", h, top_k=10, contribution_to="pred", per_example=...)``, with and
     without ``per_example`` (without it the proponents are memory rows, one per presentation, not
     examples summed over epochs);
   - Captum: ``TracInCPFast(model, "net.4", train_set, checkpoints, loss_fn=CrossEntropyLoss(reduction=
     "sum"), batch_size=128)`` and ``influence((x, y), k=10, proponents=True)``; construction included.

3. Agreement of the top-10 proponent sets per test input (ours per example vs Captum), and, untimed,
   with ours ranking by contribution to the true label's logit instead of the prediction's.

The two do not measure the same thing. TracInCP sums, over the checkpoints, the learning rate times the dot
product of the last layer's loss gradients of the training and the test example (``(dL/dz . dL'/dz') (h . h')``)
at that checkpoint's weights. Ours is the exact dual-form contribution of each training example to the
test input's predicted logit: every recorded update ``c_w (k . q) v[unit]`` of the real trajectory
(momentum, clipping included), summed over the example's presentations in all epochs.

Captum is a benchmark-only dependency: ``pip install captum``. Without it the script times ours alone and
says why Captum is missing.

Usage::

    python benchmarks/captum_compare.py                       # about 2-4 minutes on a 2-core CPU
    python benchmarks/captum_compare.py --queries 200 --epochs 1 --repeats 1   # quick
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, median, write_json  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from lightning_dualform import DualFormCallback, DualInference  # noqa: E402
from lightning_dualform.datasets import ImageDataModule  # noqa: E402
from lightning_dualform.cli.demo import DEMO_LR, PaperMLP  # noqa: E402

LAYER = "net.4"  # the last Linear of PaperMLP


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "lightning_dualform"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=".*(does not have many workers|no `validation_step`|deterministic|LeafSpec).*"
    )


def build(workdir: str, epochs: int, seed: int) -> dict[str, Any]:
    """Fit with the callback on the last layer and one checkpoint per epoch; returns paths and the model."""
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = ImageDataModule("mnist", batch_size=128, test_fraction=0.2, seed=seed)
    dm.setup()
    model = PaperMLP(lr=DEMO_LR)
    store = os.path.join(workdir, "mnist_last.h5")
    ckpt_dir = os.path.join(workdir, "ckpt")
    cb = DualFormCallback(store, layers=[LAYER], overwrite=True)
    ck = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch}", auto_insert_metric_name=False,
                         save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, gradient_clip_val=1.0, callbacks=[cb, ck], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=True,
    )
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    ckpts = sorted((os.path.join(ckpt_dir, f) for f in os.listdir(ckpt_dir) if f.endswith(".ckpt")),
                   key=lambda p: int(os.path.basename(p)[5:-5]))
    if len(ckpts) != epochs:
        raise RuntimeError(f"expected {epochs} checkpoints in {ckpt_dir}, found {ckpts}")
    model.eval()
    return {"dm": dm, "model": model, "store": cb.store_path, "ckpts": ckpts, "fit_s": fit_s,
            "certificate": {k: float(v["rel_err"]) for k, v in cb.certificate.items()},
            "store_bytes": os.path.getsize(cb.store_path), "ckpt_bytes": sum(os.path.getsize(c) for c in ckpts)}


def ours(store: str, model: PaperMLP, x: torch.Tensor, top_k: int, per_example: bool,
         contribution_to: Any = "pred") -> Any:
    """Everything a user does with a written store: open it, one forward for the queries, one pass."""
    with torch.no_grad():
        h = model.net[:4](x)  # inputs of net.4 under the final weights
    with DualInference(store, device="cpu") as di:
        return di.attend(LAYER, h, top_k=top_k, contribution_to=contribution_to, per_example=per_example)


def lightning_ckpt_loader() -> Callable[[torch.nn.Module, str], float]:
    """Captum ``checkpoints_load_func`` for Lightning ``.ckpt`` files: loads the weights, returns SGD's lr.

    Captum calls it once per checkpoint *per training batch*; the file is read once per loader (a fresh
    loader per timed run), the weights copied in on every call, as Captum intends.
    """
    cache: dict[str, tuple[dict[str, torch.Tensor], float]] = {}

    def load(model: torch.nn.Module, path: str) -> float:
        if path not in cache:
            ck = torch.load(path, map_location="cpu", weights_only=False)
            cache[path] = (ck["state_dict"], float(ck["optimizer_states"][0]["param_groups"][0]["lr"]))
        state, lr = cache[path]
        model.load_state_dict(state)
        return lr

    return load


def captum_run(ckpts: list[str], train_set: Any, x: torch.Tensor, y: torch.Tensor, top_k: int) -> Any:
    from captum.influence import TracInCPFast

    model = PaperMLP(lr=DEMO_LR)  # a model of its own: Captum loads each checkpoint into it
    tracin = TracInCPFast(model, LAYER, train_set, ckpts, checkpoints_load_func=lightning_ckpt_loader(),
                          loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=128)
    return tracin.influence((x, y), k=top_k, proponents=True)


def overlap(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per row, how many indices two ``(n, k)`` tensors share (padding ``-1`` never matches)."""
    out = np.empty(a.shape[0], dtype=np.int64)
    for i, (ra, rb) in enumerate(zip(a.tolist(), b.tolist())):
        out[i] = len({j for j in ra if j >= 0} & {j for j in rb if j >= 0})
    return out


def agreement(ov: np.ndarray, k: int) -> dict[str, float]:
    return {
        "mean_shared_of_k": float(ov.mean()),
        "mean_fraction": float(ov.mean() / k),
        "median_shared": float(np.median(ov)),
        "queries_with_any_shared": float((ov > 0).mean()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="training epochs (= checkpoints for Captum) (default: 3)")
    p.add_argument(
        "--queries", type=int, default=1000, help="test inputs (the first of the test split) (default: 1000)"
    )
    p.add_argument("--top-k", type=int, default=10, help="proponents per test input (default: 10)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="split, shuffle and initial weights (default: 0)")
    p.add_argument(
        "--workdir", default=None, help="where the store and checkpoints go (default: a temporary directory, deleted)"
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder for captum_compare.json (default: benchmarks/results)")
    args = p.parse_args(argv)
    _quiet()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load {info['loadavg_at_start']}, commit {info['commit']}, {info['date']}", flush=True)
    try:
        import captum

        captum_version, captum_error = captum.__version__, None
        from captum.influence import TracInCPFast  # noqa: F401
    except Exception as err:  # ImportError, or a version clash surfacing at import
        captum_version, captum_error = None, f"{type(err).__name__}: {err}"
        print(
            f"Captum is not available ({captum_error}); install it with `pip install captum`. Timing ours alone.",
            flush=True,
        )
    info["captum"] = captum_version

    workdir = args.workdir or tempfile.mkdtemp(prefix="dualform-captum-")
    os.makedirs(workdir, exist_ok=True)
    try:
        b = build(workdir, args.epochs, args.seed)
        dm, model = b["dm"], b["model"]
        n_train = len(dm.train_set)
        q = min(args.queries, len(dm.test_set))
        x, y = dm.test_set[torch.arange(q)]  # ImageDataset indexes tensors: (q, 784), (q,)
        print(
            f"fit: {n_train} training digits x {args.epochs} epochs in {b['fit_s']:.1f} s (callback + checkpoints); "
            f"store {b['store_bytes'] / 2**20:.1f} MiB, checkpoints {b['ckpt_bytes'] / 2**20:.1f} MiB, certificate "
            f"{b['certificate']}; {q} test queries",
            flush=True,
        )

        runs: dict[str, Callable[[], Any]] = {
            "ours_per_example": lambda: ours(b["store"], model, x, args.top_k, True),
            "ours_rows": lambda: ours(b["store"], model, x, args.top_k, False),
        }
        if captum_error is None:
            runs["captum"] = lambda: captum_run(b["ckpts"], dm.train_set, x, y, args.top_k)
        # warm-up (C kernel build/cache, page cache, Captum imports), not timed
        ours(b["store"], model, x[:8], args.top_k, True)
        times: dict[str, list[float]] = {k: [] for k in runs}
        results: dict[str, Any] = {}
        names = list(runs)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                t0 = time.perf_counter()
                results[name] = runs[name]()
                times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in names)
                  + f" (load {os.getloadavg()[0]:.1f})", flush=True)
        med = {k: median(v) for k, v in times.items()}

        ex = results["ours_per_example"]
        report: dict[str, Any] = {
            "machine": info,
            "args": vars(args),
            "train_examples": n_train,
            "queries": q,
            "epochs": args.epochs,
            "fit_seconds": b["fit_s"],
            "store_bytes": b["store_bytes"],
            "ckpt_bytes": b["ckpt_bytes"],
            "certificate": b["certificate"],
            "rounds": times,
            "median_seconds": med,
            "ours_max_rel_err": float(ex.max_rel_err),
            "captum_error": captum_error,
        }
        print(f"\nmedian of {args.repeats} rounds, top-{args.top_k} proponents of {q} test inputs over {n_train} "
              f"training digits ({n_train * args.epochs} rows of {LAYER}):")
        print(f"  ours, per example (summed over epochs): {med['ours_per_example']:.2f} s")
        print(f"  ours, per row (no per-example sums):    {med['ours_rows']:.2f} s")
        print(f"  (ours: dual vs primal max relative error {ex.max_rel_err:.1e})")
        if captum_error is None:
            cap = results["captum"]
            cap_idx = cap.indices if hasattr(cap, "indices") else cap[0]
            ratio = med["captum"] / med["ours_per_example"]
            # per-round ratios too: a load spike hits one round's pair rather than one side of the medians
            round_ratio = median([c / o for c, o in zip(times["captum"], times["ours_per_example"])])
            print(f"  Captum TracInCPFast ({args.epochs} checkpoints): {med['captum']:.2f} s  ->  "
                  f"Captum / ours {ratio:.1f}x (per example), {med['captum'] / med['ours_rows']:.1f}x (per row); "
                  f"median of round ratios {round_ratio:.1f}x")
            # untimed: ours by contribution to the true label's logit, closer to TracIn's loss gradient
            by_label = ours(b["store"], model, x, args.top_k, True, contribution_to=y)
            k = args.top_k
            ov_pred = overlap(ex.proponent_examples.index, cap_idx)
            ov_label = overlap(by_label.proponent_examples.index, cap_idx)
            ov_rows = overlap(results["ours_rows"].proponents.index, cap_idx)
            agree = {
                "pred": agreement(ov_pred, k), "label": agreement(ov_label, k), "rows_pred": agreement(ov_rows, k),
                "chance_mean_shared": k * k / n_train,
            }
            for key, res in (("pred", ex), ("label", by_label)):
                top1 = res.proponent_examples.index[:, 0].tolist()
                agree[key]["queries_with_top1_in_other"] = float(
                    np.mean([t in set(c) for t, c in zip(top1, cap_idx.tolist())])
                )
            report.update(
                {
                    "captum_seconds": med["captum"],
                    "ratio_captum_over_ours": ratio,
                    "median_round_ratio": round_ratio,
                    "ratio_captum_over_ours_rows": med["captum"] / med["ours_rows"],
                    "agreement": agree,
                }
            )
            print(f"agreement of the top-{k} proponent sets with Captum (chance: {k * k / n_train:.3f} shared of {k}):")
            for key, label in (("pred", "ours, predicted logit (timed)"), ("label", "ours, true label's logit"),
                               ("rows_pred", "ours per row, predicted logit")):
                a = agree[key]
                extra = (f", Captum's top-{k} holds our top-1 in {100 * a['queries_with_top1_in_other']:.0f}%"
                         if key != "rows_pred" else "")
                print(
                    f"  {label}: {a['mean_shared_of_k']:.2f} of {k} shared on average "
                    f"(median {a['median_shared']:.0f}), "
                    f"any shared in {100 * a['queries_with_any_shared']:.0f}% of queries{extra}"
                )
        write_json(args.out, "captum_compare.json", report)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
