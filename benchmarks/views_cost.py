"""What leading with influence costs the views (issue 23, "Defaults and views"), side by side in one process.

- ``attend``: :func:`~lightning_dualform.cli.attend.attend_run` alone (the paper's view) against it plus the
  store-only influence through the output layer (:func:`~lightning_dualform.cli.which_examples.store_influence`),
  which is what ``lightning-dualform attend`` and the viewer's ``/api/attend`` now compute.
- ``explain``: ``DualInference.explain(model, x, method=None)`` (attention only, the old default) against the
  default (first-order influence through every tracked layer, then the attention).

Rounds alternate the variants so that a busy machine stretches both alike. Run on the demo's store::

    lightning-dualform demo --out demo/
    python benchmarks/views_cost.py demo/mnist.h5 --queries 8 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="the demo's store (lightning-dualform demo --out DIR)")
    p.add_argument("--queries", type=int, default=8, help="recorded test queries per call")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from lightning_dualform import DualInference
    from lightning_dualform.cli.attend import attend_run
    from lightning_dualform.cli.demo import PaperMLP
    from lightning_dualform.cli.influence import load_final_weights
    from lightning_dualform.cli.which_examples import store_influence

    times: dict[str, list[float]] = {k: [] for k in ("attend", "attend + influence", "explain, method=None",
                                                        "explain (default)")}
    with DualInference(args.store, device="cpu") as di:
        model = PaperMLP()
        load_final_weights(model, di.store)
        qs = di.store.queries("test")
        x = torch.as_tensor(qs.inputs_at(np.arange(args.queries))).float()
        index = f"{int(qs.index[0])}:{int(qs.index[args.queries - 1]) + 1}"
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            run = attend_run(di, args.store, index=index, top_k=5)
            t1 = time.perf_counter()
            store_influence(di, run, 5)
            t2 = time.perf_counter()
            times["attend"].append(t1 - t0)
            times["attend + influence"].append(t2 - t0)
            t0 = time.perf_counter()
            di.explain(model, x, top_k=5, method=None)
            t1 = time.perf_counter()
            di.explain(model, x, top_k=5)
            t2 = time.perf_counter()
            times["explain, method=None"].append(t1 - t0)
            times["explain (default)"].append(t2 - t1)
    load = os.getloadavg()
    print(f"{args.store}: {args.queries} queries, {args.rounds} rounds, load average {load[0]:.1f} {load[1]:.1f}")
    print("| variant | median s | min s |")
    print("| --- | --- | --- |")
    for k, v in times.items():
        print(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f} |")


if __name__ == "__main__":
    main()
