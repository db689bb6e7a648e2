"""What an influence table costs beside one uncached ``attend`` pass over the same layers, and the metagradient
beside the fit.

Issue 23's cost targets: the first-order table for 1,000 queries x 10,000 examples within 2x one uncached
``attend`` pass over the same layers (``DualInference.explain``: every tracked layer, its per-example sums on);
the metagradient at most 3x the fit's time per query, queries batched. The store: the MNIST MLP 784-128-128-10
trained on the 10,000 MNIST images (``--epochs``, batch 64) by SGD and by AdamW, recorded by ``DualFormRecorder``.

For an element-wise rule (AdamW) the script also counts the multiply-adds each needs and times their floor: a row
of step ``s`` scores ``(g_q (.) v)^T Q_s (x_q (.) k)`` for every query, ``d_out x d_in`` multiply-adds per query and
row at each layer (``Q_s`` is a dense matrix), where ``attend``'s unit score needs ``d_in``
(``(Q_s[u] (.) k) . x_q`` for the query's one unit ``u``). The floor is the one product per step and layer that the
table cannot avoid, ``(n, d_in) x (d_in, B d_out)``, timed alone on random data of the same shapes.

    python benchmarks/influence_cost.py --queries 1000 --epochs 1 --meta-queries 100 --meta-examples 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO  # noqa: E402
from lds import fit, load_data, orders  # noqa: E402


def _floor(store, n: int) -> dict:
    """Multiply-adds of the first-order table and of ``attend``'s unit scores over every layer's rows, and the time
    of the table's unavoidable products, ``(n, d_in) x (d_in, B d_out)`` per step and layer, in float32."""
    fo = att = 0
    t = 0.0
    gen = torch.Generator().manual_seed(0)
    for name in store.layers:
        lay = store.layer(name)
        fo += n * lay.n_rows * lay.d_out * lay.d_in
        att += n * lay.n_rows * lay.d_in
        b = max(1, round(lay.n_rows / store.n_steps))
        x = torch.randn(n, lay.d_in, generator=gen)
        w = torch.randn(b * lay.d_out, lay.d_in, generator=gen)
        timed = min(store.n_steps, 20)
        start = time.perf_counter()
        for _ in range(timed):
            x @ w.t()
        t += (time.perf_counter() - start) * store.n_steps / timed
    return {"first_order_macs": fo, "attend_macs": att, "macs_ratio": fo / att, "gemm_floor_f32_s": t}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--examples", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--optimizers", default="sgd,adamw")
    p.add_argument("--meta-queries", type=int, default=100)
    p.add_argument("--meta-examples", type=int, default=1000)
    p.add_argument("--meta-epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    from lightning_dualform import DualInference
    from lightning_dualform.attribute import influence

    work = tempfile.mkdtemp()
    out: dict = {"args": vars(args), "load": os.getloadavg(), "runs": {}}
    x, y, _, _ = load_data(min(args.examples, 9000), 0)
    x, y = x[: args.examples], y[: args.examples]
    q, qy = x[: args.queries] + 0.01, y[: args.queries]
    for opt in args.optimizers.split(","):
        path = os.path.join(work, f"{opt}.h5")
        batches = orders(len(y), args.epochs, 64, seed=1)
        model = fit(x, y, batches, opt, 0, record=path, steps_per_epoch=-(-len(y) // 64))
        row: dict = {}
        for r in range(args.repeats):
            with DualInference(path) as di:
                t = time.perf_counter()
                di.explain(model, q, top_k=10, method=None)  # the attend passes alone (explain leads with influence)
                row.setdefault("attend_s", []).append(time.perf_counter() - t)
                for dt, key in ((torch.float32, "first_order_f32_s"), (torch.float64, "first_order_f64_s")):
                    t = time.perf_counter()
                    di.influence(model, q, qy, dtype=dt)
                    row.setdefault(key, []).append(time.perf_counter() - t)
        row = {k: min(v) for k, v in row.items()}
        row["ratio_f32"] = row["first_order_f32_s"] / row["attend_s"]
        row["ratio_f64"] = row["first_order_f64_s"] / row["attend_s"]
        with DualInference(path) as di:
            if di.store.form == "element-wise":
                row.update(_floor(di.store, len(q)))
                row["floor_share_f32"] = row["gemm_floor_f32_s"] / row["first_order_f32_s"]
        print(opt, {k: round(v, 3) for k, v in row.items()}, f"load {os.getloadavg()[0]:.1f}", flush=True)
        out["runs"][opt] = row
        # the metagradient beside the fit (MAGIC's setting: fewer examples, a few epochs)
        mx, my = x[: args.meta_examples], y[: args.meta_examples]
        mb = orders(len(my), args.meta_epochs, 64, seed=2)
        mpath = os.path.join(work, f"{opt}-meta.h5")
        t = time.perf_counter()
        fit(mx, my, mb, opt, 0)
        t_fit = time.perf_counter() - t
        mmodel = fit(mx, my, mb, opt, 0, record=mpath, steps_per_epoch=-(-len(my) // 64))
        mq, mqy = x[-args.meta_queries:], y[-args.meta_queries:]
        t = time.perf_counter()
        res = influence(mpath, mmodel, mq, mqy, method="metagradient", query_batch=args.meta_queries)
        t_meta = time.perf_counter() - t
        meta = {"fit_s": t_fit, "metagradient_s": t_meta, "per_query_over_fit": t_meta / args.meta_queries / t_fit,
                "grad_error": res.replay.grad_error, "final_error": res.replay.max_final_error}
        print(opt, "metagradient", {k: round(v, 4) if isinstance(v, float) else v for k, v in meta.items()},
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        out["runs"][opt]["metagradient"] = meta
    os.makedirs(args.out, exist_ok=True)
    json.dump(out, open(os.path.join(args.out, "influence_cost.json"), "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
