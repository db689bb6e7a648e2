"""Classify mutated copies of a valid store, one after another (run by tests/reliability.py::run_fuzz, which
kills it when one takes too long).

usage: fuzz_runner.py VALID_STORE WORKDIR SEEDS_JSON

Prints one JSON line per mutation, ``{"start": seed}`` before and ``{"end": seed, "seconds": s, "result": ...}``
after it; the parent measures the time in between.
"""

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reliability  # noqa: E402


def main() -> int:
    valid, work, seeds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.environ.setdefault("LIGHTNING_DUALFORM_PROBE_TIMEOUT", "5")
    reference = reliability.reference_answers(valid)
    for seed in seeds:
        folder = os.path.join(work, f"m{seed}")
        os.makedirs(folder, exist_ok=True)
        target = reliability.mutate(valid, os.path.join(folder, "store.h5"), seed)
        print(json.dumps({"start": seed}), flush=True)
        t0 = time.monotonic()
        result = reliability.classify(target, reference)
        print(json.dumps({"end": seed, "seconds": time.monotonic() - t0, "result": result}), flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
