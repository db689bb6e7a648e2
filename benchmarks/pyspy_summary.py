"""Summarise a py-spy ``--format raw --threads`` profile: samples per thread, inclusive and self time.

Usage::

    py-spy record -r 200 -t -f raw -o prof.txt -- python benchmarks/overhead.py --examples 19200 ...
    py-spy record -r 200 -t -g -f raw -o prof_gil.txt -- ...      # -g: only samples holding the GIL
    python benchmarks/pyspy_summary.py prof.txt --match lightning_dualform,h5py --top 25

Inclusive counts a function once per sample that has it anywhere on the stack; self counts the
innermost frame. Percentages are of all samples of that thread.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from typing import Sequence

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    return f"{m['func']} ({m['file']})" if m else frame.strip()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("profile", help="py-spy raw output (collapsed stacks with counts)")
    ap.add_argument("--match", default="", help="comma list of substrings; inclusive table shows only frames with one")
    ap.add_argument("--top", type=int, default=20, help="rows per table")
    args = ap.parse_args(argv)
    matches = [m for m in args.match.split(",") if m]

    per_thread: Counter = Counter()
    incl: dict[str, Counter] = defaultdict(Counter)
    leaf: dict[str, Counter] = defaultdict(Counter)
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            thread = re.sub(r"thread \(\d+\): ", "", frames[0]).strip() or frames[0]
            per_thread[thread] += n
            for k in {_key(fr) for fr in frames[1:]}:
                incl[thread][k] += n
            if len(frames) > 1:
                leaf[thread][_key(frames[-1])] += n

    total = sum(per_thread.values())
    print(f"{total} samples")
    for thread, n in per_thread.most_common():
        print(f"\n== {thread}: {n} samples ({100 * n / total:.1f}% of all)")
        rows = [(k, c) for k, c in incl[thread].most_common() if not matches or any(m in k for m in matches)]
        print("  inclusive:")
        for k, c in rows[: args.top]:
            print(f"    {100 * c / n:6.1f}%  {c:6d}  {k}")
        print("  self:")
        for k, c in leaf[thread].most_common(args.top):
            print(f"    {100 * c / n:6.1f}%  {c:6d}  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
