"""Peak memory of one uncached ``DualInference.attend`` pass, for layers of several sizes.

The docs promise that a pass without a cache holds a bounded number of blocks whatever the layer's size. For each
size this runs one fresh process that opens the store without a cache, makes a warm-up pass over about 1,000 rows
(torch's and the reader's pools), then one pass of ``--queries`` queries over the first ``rows`` rows of the layer
(``at_step``: the model after the step that ends them), and reports how much the process's resident memory grew
during that pass: its peak (``ru_maxrss``, or the maximum of samples taken every 5 ms when the process's peak dates
from before the pass), and the samples, to see when it grows. Variants run side by side: ``--env`` (e.g.
``MALLOC_ARENA_MAX=2``), ``--read-ahead`` (blocks the prefetcher reads ahead), ``--src`` (source trees, e.g. the
branch before a change).

The store is the one ``benchmarks/attend.py`` builds: the paper's MLP 784-800-800-10 trained with SGD momentum on
40,000 Fashion-MNIST images for 3 epochs (net.0: 120,000 rows of 784 + 800 float32 numbers, 760 MB).

Run:  python benchmarks/attend_memory.py [--store /tmp/dualform-bench/attend.h5] [--rows 40000 120000]
                                          [--block-rows N] [--env "" "MALLOC_ARENA_MAX=2"] [--src OLD/src src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: what one measuring process runs (argv: store, layer, queries, rows, block_rows or "", top_k, read-ahead or "")
_CHILD = r"""
import json, resource, sys, threading, time, warnings
import numpy as np, torch
from lightning_dualform import DualInference

store, layer, n_queries, rows, block_rows, top_k, depth = sys.argv[1:8]
n_queries, rows, top_k = int(n_queries), int(rows), int(top_k)
block_rows = int(block_rows) if block_rows else None
if depth:
    from lightning_dualform.attend import blocks

    blocks.READ_AHEAD = int(depth)
page = 4096


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


warnings.simplefilter("ignore")
torch.manual_seed(0)
with DualInference(store, cache=None, block_rows=block_rows) as di:
    lay = di.layer(layer)
    steps = di.store.update_steps
    ends = np.array([lay.rows_before(int(s) + 1) for s in steps])
    at = int(steps[min(np.searchsorted(ends, rows), len(steps) - 1)]) + 1
    n_rows = lay.rows_before(at)
    q = torch.rand(n_queries, lay.d_in)
    small = int(steps[min(np.searchsorted(ends, 1024), len(steps) - 1)]) + 1
    di.attend(layer, q, top_k=top_k, at_step=small)  # warm-up on a few rows: torch's and the reader's pools
    base, base_peak = rss(), peak()
    samples = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            samples.append((round(time.perf_counter() - t0, 3), rss() - base))
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = di.attend(layer, q, top_k=top_k, at_step=at)
    took = time.perf_counter() - t0
    done.set()
    th.join()
    row_bytes = lay.d_in * 4 + lay.d_out * 4
    print(json.dumps({
        "rows": n_rows, "layer_bytes": n_rows * row_bytes, "block_rows": di.rows_per_block(lay),
        "block_bytes": di.rows_per_block(lay) * row_bytes, "base_rss": base,
        # the process's peak when the pass raised it (else it dates from before the pass: the sampled maximum)
        "growth": peak() - base if peak() > base_peak else max(g for _, g in samples),
        "sampled_max": max(g for _, g in samples), "after": rss() - base, "seconds": took,
        "profile": samples[:: max(1, len(samples) // 40)],
    }))
"""


def measure(store: str, layer: str, queries: int, rows: int, block_rows: int | None, top_k: int, env: str,
            depth: int | None = None, src: str | None = None) -> dict:
    """One fresh process: the peak growth of one uncached pass over the first ``rows`` rows of ``layer``."""
    extra = dict(kv.split("=", 1) for kv in env.split()) if env else {}
    if src:
        extra["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, store, layer, str(queries), str(rows), str(block_rows or ""), str(top_k),
         str(depth or "")],
        capture_output=True, text=True, env={**os.environ, **extra}, timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/dualform-bench/attend.h5", help="a store built by benchmarks/attend.py")
    p.add_argument("--layer", default="net.0")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rows", type=int, nargs="+", default=[40_000, 120_000], help="layer sizes (rows from the start)")
    p.add_argument("--block-rows", type=int, default=None, help="DualInference block_rows (default: automatic)")
    p.add_argument("--env", nargs="*", default=[""], help="variants: environment settings, e.g. 'MALLOC_ARENA_MAX=2'")
    p.add_argument("--read-ahead", type=int, nargs="*", default=[0],
                   help="variants: blocks read ahead (attend/blocks.py READ_AHEAD; 0: the library's default)")
    p.add_argument("--src", nargs="*", default=[""], help="variants: source trees ('src' folders) to compare")
    p.add_argument("--repeat", type=int, default=1, help="rounds (sizes and variants interleaved in each)")
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  load {os.getloadavg()[0]:.2f}  store {args.store}  "
          f"layer {args.layer}  {args.queries} queries  top-k {args.top_k}")
    results = []
    for r in range(args.repeat):
        for env, depth, src in [(e, d, t) for t in args.src for e in args.env for d in args.read_ahead]:
            for rows in args.rows:
                m = measure(args.store, args.layer, args.queries, rows, args.block_rows, args.top_k, env, depth, src)
                m.update(env=env, read_ahead=depth, src=src, round=r, load=os.getloadavg()[0])
                results.append(m)
                label = " ".join(x for x in (src, env, f"read-ahead {depth}" if depth else "") if x) or "default"
                print(f"{label:28s} rows {m['rows']:>8,}  layer {m['layer_bytes'] / 2**20:7.1f} MiB  "
                      f"block {m['block_rows']:>6,} rows ({m['block_bytes'] / 2**20:5.1f} MiB)  "
                      f"peak growth {m['growth'] / 2**20:7.1f} MiB ({m['growth'] / m['block_bytes']:4.1f} blocks, "
                      f"{m['growth'] / m['layer_bytes']:.2f}x the layer)  after it {m['after'] / 2**20:6.1f} MiB  "
                      f"{m['seconds']:6.1f} s  "
                      f"load {m['load']:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
