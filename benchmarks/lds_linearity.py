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
    python benchmarks/lds_linearity.py --optimizer adamw --moments-only

For AdamW it also reports where the run's steps sit against ``eps``: the share of (step, weight entry) pairs whose
bias-corrected ``sqrt(v_hat)`` is below 1e-6 ... 1e-3 (entries whose second moment is still exactly 0 left out).
Below ``eps`` a step is close to linear in its gradient, ``lr g / eps``; far above it the step is ``lr m_hat /
sqrt(v_hat)``, which is scale-free: a near-cancellation of a few examples' gradients still moves the weight by up to
``lr``, and dropping one of them can flip the whole step.
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


MOMENT_THRESHOLDS = (1e-6, 1e-5, 1e-4, 1e-3)


def small_moment_shares(recipe: "lds.Recipe", x: torch.Tensor, y: torch.Tensor, batches: list) -> dict[str, list]:
    """Per parameter, the share of (step, entry) pairs of an Adam-family run whose ``sqrt(v_hat)`` is below each of
    :data:`MOMENT_THRESHOLDS` (entries with ``v = 0`` left out)."""
    model = lds.make_model(0).to(x.dtype)
    opt, sched = recipe.make(model.parameters(), len(batches))
    below = {n: np.zeros(len(MOMENT_THRESHOLDS)) for n, _ in model.named_parameters()}
    total = dict.fromkeys(below, 0)
    for idx in batches:
        idx = torch.as_tensor(idx)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
        for n, p in model.named_parameters():
            st = opt.state[p]
            v = st["exp_avg_sq"] / (1 - opt.param_groups[0]["betas"][1] ** float(st["step"]))
            r = v[v > 0].sqrt()
            total[n] += r.numel()
            below[n] += np.array([float((r < t).sum()) for t in MOMENT_THRESHOLDS])
    return {n: (below[n] / max(total[n], 1)).tolist() for n in below}


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
    p.add_argument("--moments-only", action="store_true", help="AdamW: only the shares of small second moments")
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
    moments = None
    if recipe.optimizer == "adamw":
        moments = small_moment_shares(recipe, xtr, ytr, batches)
        print(f"{recipe.tag}: share of (step, entry) pairs with sqrt(v_hat) below {MOMENT_THRESHOLDS}:")
        for n, shares in moments.items():
            print(f"  {n:10s} {np.round(shares, 3).tolist()}")
        if args.moments_only:
            return 0
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
               "rel_err_metagradient": float(np.abs(d - pm).max() / np.abs(pm).max()),
               # > 1: the derivative overshoots what the down-weighting did (a step that saturates, as Adam's does)
               "scale_metagradient": float(np.abs(pm).mean() / max(np.abs(d).mean(), 1e-300))}
        rows.append(row)
        print(f"t={t:g}: finite difference {np.round(d[:4], 4)}; correlation with the metagradient "
              f"{row['corr_metagradient']:.3f} (relative error {row['rel_err_metagradient']:.1e}), with first order "
              f"{row['corr_first_order']:.3f}; mean |prediction| / mean |finite difference| "
              f"{row['scale_metagradient']:.3g}", flush=True)
    if args.out:
        json.dump({"args": vars(args), "recipe": recipe.tag, "load": os.getloadavg(), "rows": rows,
                   "small_moment_shares": moments},
                  open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
