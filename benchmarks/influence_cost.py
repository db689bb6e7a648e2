"""What an influence table costs beside one uncached ``attend`` pass over the same layers, and the metagradient
beside the fit.

Issue 23's cost targets: the first-order table for 1,000 queries x 10,000 examples within 2x one uncached
``attend`` pass over the same layers (``DualInference.explain``: every tracked layer, its per-example sums on);
the metagradient at most 3x the fit's time per query, queries batched. The store: the MNIST MLP 784-128-128-10
trained on the 10,000 MNIST images (``--epochs``, batch 64) by SGD and by AdamW, recorded by ``DualFormRecorder``.

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
