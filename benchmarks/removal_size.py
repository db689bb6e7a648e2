"""How big a change each influence method predicts when examples are removed, against retraining without them.

The LDS (``lds.py``) scores how well a method *ranks* the effect of dropping examples (a rank correlation); this
measures the *size*: for each test query, the ``--k`` examples a method ranks as its strongest proponents are
given loss weight 0 and the model is retrained (same initialisation, batches and order: MAGIC's single-model
setting); the change of the query's margin is compared with the method's prediction, minus the sum of the dropped
examples' scores. Also ``--k`` random examples, as the scale of doing nothing in particular.

    python benchmarks/removal_size.py --optimizer sgd --train 1000 --epochs 3 --test 20 --k 5

Prints per method the mean actual change, the mean predicted change, the median ratio predicted / actual and the
correlation over queries; the JSON (``removal_size.json``) has every query's numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import write_json  # noqa: E402
from lds import REPO, Recipe, fit, load_data, margins, orders  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=("sgd", "sgd-momentum", "adamw"), default="sgd")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW's eps")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=20)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=5, help="examples removed per query")
    p.add_argument("--methods", default="first_order,metagradient")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # (the retrainings must be reproducible to the bit)
    from lightning_dualform.attribute import influence

    recipe = Recipe(args.optimizer, args.eps, 0.0, None, args.batch)
    xtr, ytr, xte, yte = load_data(args.train, args.test)
    spe = -(-args.train // args.batch)
    batches = orders(args.train, args.epochs, args.batch, seed=1)
    store = os.path.join(tempfile.mkdtemp(), "base.h5")
    base = fit(xtr, ytr, batches, recipe, 0, record=store, steps_per_epoch=spe)
    m0 = margins(base, xte, yte)

    def retrained_change(drop: np.ndarray) -> np.ndarray:
        w = torch.ones(len(ytr))
        w[torch.as_tensor(drop)] = 0.0
        return margins(fit(xtr, ytr, batches, recipe, 0, weights=w), xte, yte) - m0

    result: dict = {"args": vars(args), "load": os.getloadavg(), "methods": {}}
    rng = np.random.default_rng(0)
    rand = [retrained_change(rng.choice(len(ytr), args.k, replace=False))[q] for q in range(args.test)]
    result["random_mean_abs_change"] = float(np.mean(np.abs(rand)))
    print(f"{args.k} random examples removed: mean |change| of the margin {np.mean(np.abs(rand)):.4f}", flush=True)
    for method in args.methods.split(","):
        t = time.perf_counter()
        inf = influence(store, base, xte, yte, method=method, dtype=torch.float64)
        seconds = time.perf_counter() - t
        scores = inf.scores.numpy()
        examples = np.asarray(inf.examples)
        actual, predicted = [], []
        for q in range(args.test):
            top = np.argsort(-scores[q])[: args.k]  # the strongest proponents: removing them lowers the margin
            predicted.append(-float(scores[q, top].sum()))
            actual.append(float(retrained_change(examples[top])[q]))
        a, pr = np.asarray(actual), np.asarray(predicted)
        ratio = pr / np.where(np.abs(a) > 1e-12, a, np.nan)
        row = {"actual": a.tolist(), "predicted": pr.tolist(), "mean_actual": float(a.mean()),
               "mean_predicted": float(pr.mean()), "median_ratio": float(np.nanmedian(ratio)),
               "corr": float(np.corrcoef(a, pr)[0, 1]), "seconds": seconds}
        result["methods"][method] = row
        print(f"{method:>13}: removing each query's top {args.k}: mean change {a.mean():+.4f}, predicted "
              f"{pr.mean():+.4f}; median predicted/actual {row['median_ratio']:.2f}, correlation {row['corr']:.3f} "
              f"({seconds:.1f} s)", flush=True)
    write_json(args.out, "removal_size", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
