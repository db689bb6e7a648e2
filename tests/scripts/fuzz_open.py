"""Open damaged copies of a valid store; every open must work or raise StoreError (run as a subprocess,
so that a crash of the interpreter shows as a signal in the parent).

usage: fuzz_open.py VALID_STORE WORKDIR SEED COUNT
"""

import os
import random
import sys
import traceback

import numpy as np

from lightning_dualform import StoreError, StoreReader
from lightning_dualform.attend.replay import LayerReplay


def exercise(path: str) -> None:
    with StoreReader(path) as s:
        for name in s.layers:
            layer = s.layer(name)
            layer.read(0, layer.n_rows)
            _ = layer.weight_final, layer.bias_final
            if s.form == "element-wise":  # an optimizer state and a replay instead of scalar coefficients
                rep = LayerReplay(layer)
                rep.weights()
                rep.sweep_units(np.arange(min(2, layer.d_out)), lambda rows, q, qb: None)
                layer.stored_memory_sums(rep.end, rep.n_rows)
                continue
            coef = layer.coefficients()
            layer.base_weights()
            layer.stored_memory_sums(coef.end_step, layer.rows_before(coef.end_step))
        for split in s.query_splits:
            q = s.queries(split)
            _ = q.inputs
            for name in q.layers:
                q.layer_rows(name)
        s.train_inputs(np.arange(4))


def main() -> int:
    valid, work, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    data = open(valid, "rb").read()
    bad, outcomes = [], {"ok": 0, "StoreError": 0}
    for i in range(count):
        target = os.path.join(work, f"m{i}.h5")
        mutated = bytearray(data)
        kind = rng.choice(["flip", "flip", "zero-run", "truncate"])
        if kind == "truncate":
            mutated = mutated[: rng.randrange(len(mutated))]
        elif kind == "zero-run":
            at = rng.randrange(len(mutated))
            mutated[at : at + rng.randrange(1, 512)] = bytes(len(mutated[at : at + 512]))[
                : len(mutated[at : at + rng.randrange(1, 512)])
            ]
        else:
            for _ in range(rng.randrange(1, 8)):
                at = rng.randrange(len(mutated))
                mutated[at] ^= 1 << rng.randrange(8)
        with open(target, "wb") as fh:
            fh.write(mutated)
        try:
            exercise(target)
            outcomes["ok"] += 1
        except StoreError:
            outcomes["StoreError"] += 1
        except Exception:  # anything else is a bug: a raw traceback would reach the user
            bad.append(f"mutation {i} ({kind}): {traceback.format_exc(limit=3)}")
        os.remove(target)
    print(outcomes)
    for b in bad[:5]:
        print(b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
