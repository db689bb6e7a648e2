"""A repeated ``attend`` with ``DualInference(cache=...)`` against the bare matrix products and against the
same call without a cache.

On the store of ``benchmarks/attend.py`` (the paper's MLP 784-800-800-10 after 3 epochs on 40,000
Fashion-MNIST images, 120,000 rows per layer), for 1,000 held-out queries per layer (``attend.py``'s
settings: top-10, per-example sums, mass; contributions to the predicted logit at ``net.4``), each of
``--repeat`` rounds times, one after the other:

  (b)  the products alone on the layer's rows in memory: ``S = Q K^T; (S c) V`` (``attend.py``'s (b)),
  (b1) ``S = Q K^T`` alone (the one product of a pass whose ``dual`` comes from the certificate's sums),
  (u)  ``attend`` without a cache (the store in the page cache: every pass reads and checks it again),
  (a)  ``attend`` with a cache that already holds the layer (the first pass, which filled it, is timed
       apart as (a0)).

It checks that (a) and (u) give the same answer bit for bit, and prints medians, (a)/(b), (a)/(b1), (u)/(b).

Run:  python benchmarks/cache.py [--store /tmp/dualform-bench/attend.h5] [--layers net.0 net.4] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attend import DATA, build_store, queries_for  # noqa: E402
from common import machine, median, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/dualform-bench/attend.h5")
    p.add_argument("--data", default=DATA)
    p.add_argument("--layers", nargs="*", default=["net.0", "net.4"])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    if not os.path.exists(args.store):
        build_store(args.store, 40_000, 3, args.data)

    from lightning_dualform import DualInference

    facts = machine()
    print(
        f"{facts['cpu']}, {facts['cores']} cores, torch threads {facts['torch_threads']}, load "
        f"{facts['loadavg_at_start']}, commit {facts['commit']}, {facts['date']}"
    )
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    qs = queries_for(args.store, args.data, args.queries)
    results: dict = {"machine": facts, "layers": {}}
    plain = DualInference(args.store, device=dev)
    cached = DualInference(args.store, device=dev, cache="auto")
    print("layer  (b) s  (b1) s  (u) no cache s  (a0) first s  (a) cached s  (a)/(b)  (a)/(b1)  (u)/(b)  same answer")
    for name in args.layers:
        lay = plain.layer(name)
        q = qs[name]
        unit = "pred" if name == "net.4" else None
        rows = lay.read(0, lay.n_rows, ("keys", "values", "step"))
        coef = lay.coefficients()
        k = torch.from_numpy(rows["keys"]).to(dev)
        v = torch.from_numpy(rows["values"]).to(dev)
        c = torch.from_numpy(coef.c_w[rows["step"] - coef.first_step]).float().to(dev)
        qd = q.to(dev)
        del rows

        def products() -> None:
            s = torch.matmul(qd, k.t())
            torch.matmul(s * c, v)
            sync()

        def product() -> None:
            torch.matmul(qd, k.t())
            sync()

        def attend(di: DualInference):
            out = di.attend(name, q, top_k=args.top_k, contribution_to=unit, per_example=True)
            sync()
            return out

        plain.attend(name, q[:8], top_k=args.top_k)  # metadata pass, not timed
        t = time.perf_counter()
        first = attend(cached)
        t_first = time.perf_counter() - t
        ts: dict[str, list[float]] = {"b": [], "b1": [], "u": [], "a": []}
        same = True
        for _ in range(args.repeat):
            for key, fn in (("b", products), ("b1", product)):
                t = time.perf_counter()
                fn()
                ts[key].append(time.perf_counter() - t)
            t = time.perf_counter()
            u = attend(plain)
            ts["u"].append(time.perf_counter() - t)
            t = time.perf_counter()
            a = attend(cached)
            ts["a"].append(time.perf_counter() - t)
            same &= json.dumps(a.to_dict()) == json.dumps(u.to_dict()) == json.dumps(first.to_dict())
        k = v = c = None  # the next layer's rows replace them
        m = {key: median(x) for key, x in ts.items()}
        print("   rounds (s): " + "  ".join(f"{key}=" + ",".join(f"{x:.2f}" for x in xs) for key, xs in ts.items()))
        print(f"{name}  {m['b']:.2f}  {m['b1']:.2f}  {m['u']:.2f}  {t_first:.2f}  {m['a']:.2f}  {m['a'] / m['b']:.2f}  "
              f"{m['a'] / m['b1']:.2f}  {m['u'] / m['b']:.2f}  {same}", flush=True)
        results["layers"][name] = {"rounds": ts, "first_cached_s": t_first, "same": same}
    print("cache:", cached.cache_info())
    plain.close()
    cached.close()
    write_json(args.out, "cache.json", results)


if __name__ == "__main__":
    main()
