"""Is the trained model a smooth function of the examples' loss weights? (MAGIC's "metasmoothness".)

A derivative predicts retraining only where the final margin is close to linear in the loss weights over the
range a drop spans. This script trains ``benchmarks/lds.py``'s single-model setting once, computes the
metagradient and the first-order scores of ``--test`` queries, and retrains with one random 5% of the examples
down-weighted by ``t`` (``w = 1 - t``) for several ``t``: for a smooth training, ``(margin(t) - margin(0)) / t``
is the same for every ``t`` and equals ``-sum`` of the dropped examples' metagradients.

    python benchmarks/lds_linearity.py --optimizer adamw --eps 1e-8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lds  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=("sgd", "sgd-momentum", "adamw"), default="adamw")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW's eps")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    from lightning_dualform import StoreReader
    from lightning_dualform.attribute import influence

    orig = lds.make_opt
    lds.make_opt = lambda name, ps: (torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, eps=args.eps)
                                     if name == "adamw" else orig(name, ps))
    xtr, ytr, xte, yte = lds.load_data(args.train, args.test)
    batches = lds.orders(args.train, args.epochs, 64, seed=1)
    path = os.path.join(tempfile.mkdtemp(), "run.h5")
    model = lds.fit(xtr, ytr, batches, args.optimizer, 0, record=path, steps_per_epoch=-(-args.train // 64))
    with StoreReader(path, probe=False) as store:
        mg = influence(store, model, xte, yte, method="metagradient").scores.numpy()
        fo = influence(store, model, xte, yte).scores.numpy()
    base = lds.margins(model, xte, yte)
    drop = np.random.default_rng(0).choice(args.train, args.train // 20, replace=False)
    pm, pf = -mg[:, drop].sum(1), -fo[:, drop].sum(1)
    print(f"{args.optimizer} (eps {args.eps:g}): predicted per unit of t, metagradient {np.round(pm[:5], 4)}")
    for t in (0.01, 0.1, 0.5, 1.0):
        w = torch.ones(args.train)
        w[drop] = 1 - t
        d = (lds.margins(lds.fit(xtr, ytr, batches, args.optimizer, 0, weights=w), xte, yte) - base) / t
        print(f"t={t}: (margin(t) - margin(0)) / t {np.round(d[:5], 4)}; correlation with the metagradient "
              f"{np.corrcoef(d, pm)[0, 1]:.3f}, with first order {np.corrcoef(d, pf)[0, 1]:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
