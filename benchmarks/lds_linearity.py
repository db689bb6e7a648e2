"""Is the trained model a smooth function of the examples' loss weights? (MAGIC's "metasmoothness".)

A derivative predicts retraining only where the final margin is close to linear in the loss weights over the range
a drop spans. This script trains ``benchmarks/lds.py``'s single-model setting once (recorded), computes the
metagradient and the first-order scores of ``--test`` queries, and retrains with one random 5% of the examples
down-weighted by ``t`` (``w = 1 - t``) for each ``t`` of ``--ts``. For each ``t`` it reports the finite difference
``(margin(t) - margin(0)) / t`` against the metagradient's prediction ``-sum`` of the dropped examples' scores: the
correlation over queries and the relative error (the largest deviation over the largest prediction).

- At small ``t`` the finite difference *is* the derivative: it must equal the metagradient (to ``O(t)``), or the
  sweep is wrong; in float32 the retraining's own rounding (``reproducible_max_abs_diff`` of ``lds.py`` under
  another thread count: 1e-7 to 1e-6 on these margins) swamps ``t`` below about 1e-4, so use ``--dtype float64``.
- Between that and ``t = 1`` (a drop), the training's roughness shows: a smooth training keeps the correlation near
  1 at every ``t``; a rough one loses it beyond some ``t`` and a 5% drop is then predicted by no derivative.

    python benchmarks/lds_linearity.py --optimizer adamw --dtype float64
    python benchmarks/lds_linearity.py --optimizer adamw --eps 1e-4 --warmup 0.25 --dtype float64
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of the steps of linear learning-rate warm-up")
    p.add_argument("--lr", type=float, default=None, help="the learning rate (default: lds.py's for the optimizer)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64", help="of the model and the data")
    p.add_argument("--ts", default="1e-7,1e-5,1e-3,1e-2,0.1,0.5,1", help="down-weightings t, comma-separated")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lightning_dualform import StoreReader
    from lightning_dualform.attribute import influence

    dt = getattr(torch, args.dtype)
    recipe = lds.Recipe(args.optimizer, args.eps, args.warmup, args.lr, args.batch)
    make_model = lds.make_model
    lds.make_model = lambda seed: make_model(seed).to(dt)
    xtr, ytr, xte, yte = lds.load_data(args.train, args.test)
    xtr, xte = xtr.to(dt), xte.to(dt)
    batches = lds.orders(args.train, args.epochs, args.batch, seed=1)
    path = os.path.join(tempfile.mkdtemp(), "run.h5")
    model = lds.fit(xtr, ytr, batches, recipe, 0, record=path, steps_per_epoch=-(-args.train // args.batch))
    with StoreReader(path, probe=False) as store:
        mg = influence(store, model, xte, yte, method="metagradient", query_batch=args.test).scores.numpy()
        fo = influence(store, model, xte, yte).scores.numpy()
    base = lds.margins(model, xte, yte)
    drop = np.random.default_rng(0).choice(args.train, args.train // 20, replace=False)
    pm, pf = -mg[:, drop].sum(1), -fo[:, drop].sum(1)
    rows = []
    print(f"{recipe.tag}, {args.dtype}: metagradient's prediction per unit of t {np.round(pm[:4], 4)}")
    for t in (float(v) for v in args.ts.split(",")):
        w = torch.ones(args.train, dtype=dt)
        w[drop] = 1 - t
        d = (lds.margins(lds.fit(xtr, ytr, batches, recipe, 0, weights=w), xte, yte) - base) / t
        row = {"t": t, "corr_metagradient": float(np.corrcoef(d, pm)[0, 1]),
               "corr_first_order": float(np.corrcoef(d, pf)[0, 1]),
               "rel_err_metagradient": float(np.abs(d - pm).max() / np.abs(pm).max())}
        rows.append(row)
        print(f"t={t:g}: finite difference {np.round(d[:4], 4)}; correlation with the metagradient "
              f"{row['corr_metagradient']:.3f} (relative error {row['rel_err_metagradient']:.1e}), with first order "
              f"{row['corr_first_order']:.3f}", flush=True)
    if args.out:
        json.dump({"args": vars(args), "recipe": recipe.tag, "load": os.getloadavg(), "rows": rows},
                  open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
