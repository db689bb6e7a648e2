"""The house's shape: modules over 700 lines, imports between rooms, cycles among rooms, upward imports, and
the third-party packages a room loads directly or through the library's own modules.

    python benchmarks/house.py            # a table per measure
    python benchmarks/house.py --json out.json

The rooms and their order are ``tests/house.py``'s (``tests/test_house.py`` fails on a cycle, an upward
import or a forbidden package). Source is parsed, nothing imported: seconds on any machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import house  # noqa: E402  (tests/house.py)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args()
    found = house.all_imports()
    cross = house.cross_room(found)
    pairs = Counter((house.room(i.source), house.room(i.target), i.kind) for i in cross)
    figures = {
        "modules": len(house.modules()),
        "long_modules": house.long_modules(),
        "cross_room_imports": {"module": sum(1 for i in cross if i.kind == "module"),
                               "function": sum(1 for i in cross if i.kind == "function"),
                               "type-checking": sum(1 for i in cross if i.kind == "type-checking")},
        "room_pairs": {f"{a} -> {b} ({k})": n for (a, b, k), n in sorted(pairs.items())},
        "cycles": house.room_cycles(found, known=True),
        "upward": [f"{i.source}:{i.line} -> {i.target} ({i.kind})" for i in house.upward(found, known=True)],
        "forbidden": [f"{i.source}:{i.line} imports {i.target}" for i in house.forbidden(found)],
        "store_reaches_torch": [" -> ".join(c) for c in house.reaches("store", "torch", found)],
    }
    print(f"{figures['modules']} modules; over {house.MAX_LINES} lines: "
          + (", ".join(f"{m} ({n})" for m, n in figures["long_modules"].items()) or "none"))
    print("imports between rooms: " + ", ".join(f"{n} {k}" for k, n in figures["cross_room_imports"].items()))
    for pair, n in figures["room_pairs"].items():
        print(f"  {n:3d}  {pair}")
    print(f"cycles among rooms: {figures['cycles'] or 'none'}")
    print(f"upward imports ({len(figures['upward'])}):")
    for line in figures["upward"]:
        print(f"  {line}")
    print(f"forbidden third-party imports ({len(figures['forbidden'])}):")
    for line in figures["forbidden"]:
        print(f"  {line}")
    print(f"store modules that load torch through the library ({len(figures['store_reaches_torch'])}):")
    for line in figures["store_reaches_torch"]:
        print(f"  {line}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
