"""Two versions of the library side by side: one of the benchmarks' runs per version per round, alternating.

Two versions cannot share a process, so each round runs a benchmark script (``overhead.py`` by default)
once with each source tree first on ``PYTHONPATH``, in an order that alternates between rounds; each
run measures its own variants against its own baseline fits (its ``--repeats`` rounds, rotated, so that no
variant always fits first in its process), and the table gives the median over rounds of each (tree,
variant) median ratio. The load average is recorded before every run: on a
shared machine, compare only figures of one invocation.

Usage::

    # the library at main (an exported tree) against this checkout
    mkdir /tmp/main-tree && git archive main | tar -x -C /tmp/main-tree
    cp src/lightning_dualform/_kernels/*.so /tmp/main-tree/src/lightning_dualform/_kernels/
    python benchmarks/compare_trees.py --trees before=/tmp/main-tree,after=. --rounds 3 -- \\
        --examples 12800 --epochs 2 --variants float32,float32:nocert --no-certify-timing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def run_once(tree: str, script: str, args: list[str], out: str, repeats: int) -> dict[str, Any]:
    """One run of ``script`` (this checkout's copy) with ``tree``'s library; its JSON result."""
    env = {**os.environ, "PYTHONPATH": os.path.join(os.path.abspath(tree), "src")}
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--repeats", str(repeats), "--out", out]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, os.path.splitext(script)[0] + ".json")) as fh:
        return json.load(fh)


def ratios_of(result: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """Each variant's (or model's) ratio to the round's baseline, and its fit's wall time."""
    if "summary" in result:  # overhead.py
        s = result["summary"]
        return {v: x["median_ratio"] for v, x in s.items()}, {v: x["median_wall_s"] for v, x in s.items()}
    m = result["models"]  # real_models.py
    return {k: x["ratio"] for k, x in m.items()}, {k: median(x["recorded_s"]) for k, x in m.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passed = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--trees", required=True, help="comma list of name=path (a checkout or an exported tree)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each runs every tree once)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="the script's own rounds per run, rotating which variant fits first: the first fit of a "
                         "process touches fresh memory, which is slow on this VM (docs/benchmarks.md)")
    ap.add_argument("--script", default="overhead.py", choices=["overhead.py", "real_models.py"],
                    help="the benchmark script, from this benchmarks/ folder")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for compare_trees.json")
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.trees.split(","))
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                load = os.getloadavg()[0]
                t0 = time.time()
                res = run_once(trees[name], args.script, passed, os.path.join(tmp, f"{name}-{r}"), args.repeats)
                ratios, walls = ratios_of(res)
                runs.append({"round": r, "tree": name, "loadavg_1min": load, "seconds": time.time() - t0,
                             "ratios": ratios, "wall_s": walls})
                print(f"round {r} {name:>8}: load {load:4.1f}  " +
                      "  ".join(f"{v} {x:.3f} ({walls[v]:.1f} s)" for v, x in ratios.items()), flush=True)
    variants = list(runs[0]["ratios"])
    summary = {name: {v: median([x["ratios"][v] for x in runs if x["tree"] == name]) for v in variants}
               for name in trees}
    print("\nmedian over rounds of each run's median ratio (each fit against its own round's baseline)")
    print(f"{'variant':>16} " + " ".join(f"{n:>10}" for n in trees))
    for v in variants:
        print(f"{v:>16} " + " ".join(f"{summary[n][v]:>10.3f}" for n in trees))
    write_json(args.out, "compare_trees.json", {"argv": argv, "passed": passed, "trees": trees, "runs": runs,
                                                "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
