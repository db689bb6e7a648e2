"""What the reliability tests and ``benchmarks/reliability.py`` share: running phase scenarios, checking that
a store opens at a committed state whose every committed byte equals an uninterrupted run's, and mutating
stores (attributes, counters, columns, tables, shard indexes, metadata bytes) to see that each gives a
correct answer or a ``StoreError``, in bounded time, and never a silent wrong answer.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "scripts", "phase_server.py")
RUNNER = os.path.join(HERE, "scripts", "fuzz_runner.py")
SRC = os.path.join(os.path.dirname(HERE), "src")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------------------------------
# phase scenarios (kills, full disks)
# ------------------------------------------------------------------------------------------------------
def run_scenarios(scenarios: list[dict], workdir: str, timeout: float = 1200) -> list[dict]:
    """Run ``scenarios`` in one phase server (tests/scripts/phase_server.py); returns one outcome each."""
    spec_path = os.path.join(workdir, f"scenarios-{os.getpid()}-{time.monotonic_ns()}.json")
    out_path = spec_path.replace("scenarios-", "results-")
    with open(spec_path, "w") as fh:
        json.dump(scenarios, fh)
    proc = subprocess.run([sys.executable, SERVER, spec_path, out_path], capture_output=True, text=True,
                          timeout=timeout, env=_env())
    with open(spec_path.replace(".json", ".log"), "w") as fh:  # the children's output, for a failing check
        fh.write(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"phase server failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = json.load(open(out_path))
    for r, s in zip(results, scenarios):
        r["spec"] = s
    return results


#: where in each phase the kills fall, as fractions of the phase's events
FRACS = (0.0, 0.35, 0.7, 1.0)


def scenario(root: str, name: str, **kw) -> dict:
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    return {"name": name, "store": os.path.join(d, "run.h5"), "ckpt_dir": os.path.join(d, "ckpt"), "epochs": 3,
            "test": True, "predict": True, **kw}


def kill_scenarios(root: str, fracs=FRACS, steps=(0, 3, 7, 13)) -> list[dict]:
    """The uninterrupted (counting) run first, then kills spread over every phase (in the order they need)."""
    ref = scenario(root, "reference", count=os.path.join(root, "counts.json"))
    counts = ref["count"]
    out = [ref]
    out += [scenario(root, f"create-{n}", kill={"at": "create", "n": n}) for n in (0, 1)]
    out += [scenario(root, f"step-{s}", kill={"at": "step", "n": s}) for s in steps]
    out += [scenario(root, f"commit-{f}", kill={"at": "flush", "frac": f, "counts": counts}) for f in fracs]
    out += [scenario(root, f"checkpoint-{f}", kill={"at": "ckpt", "frac": f, "counts": counts}) for f in fracs[1:3]]
    for phase, label in (("finalisation", "finalisation"), ("certificate", "certificate"),
                         ("recording of the 'test'", "test"), ("recording of the 'predict'", "predict")):
        out += [scenario(root, f"{label}-{f}", kill={"at": "session", "phase": phase, "frac": f, "counts": counts})
                for f in fracs]
    # a resume's truncation: fit, kill the resume inside its truncation, then resume again to the end
    base = scenario(root, "resume", test=False, predict=False)
    first = os.path.join(base["ckpt_dir"], "epoch=0-step=5.ckpt")
    out.append(base)
    for f in fracs:
        out.append({**base, "name": f"resume-kill-{f}", "resume": first,
                    "kill": {"at": "session", "phase": "resume", "frac": f, "counts": os.path.join(root, "resume-counts.json")}})
    out.append({**base, "name": "resume-count", "resume": first, "count": os.path.join(root, "resume-counts.json")})
    out.append({**base, "name": "resume-completes", "resume": first, "test": True, "predict": True})
    return _reorder_resume(out)


def _reorder_resume(scenarios: list[dict]) -> list[dict]:
    """The resume's event count comes from a counting resume, which must run before the kills (and leaves
    the store complete again, as each killed resume does)."""
    count = [s for s in scenarios if s["name"] == "resume-count"]
    kills = [s for s in scenarios if s["name"].startswith("resume-kill")]
    rest = [s for s in scenarios if s not in count and s not in kills and s["name"] != "resume-completes"]
    done = [s for s in scenarios if s["name"] == "resume-completes"]
    return rest + count + kills + done


#: (point, n, bytes left): see tests/scripts/phase_server.py; ("session", "phase/when", left) fills as a write
#: session of that phase opens or at its first write
FILL_POINTS = [("step", 7, 0), ("epoch_end", 1, 0), ("ckpt", 1, 0), ("fit_end", 0, 0), ("fit_end", 0, 1 << 20),
               ("session", "finalisation/open", 0), ("session", "finalisation/write", 0), ("certificate", 0, 0),
               ("session", "certificate/write", 0), ("test", -1, 0), ("test", 1, 0), ("predict", 1, 0),
               ("session", "recording of the 'predict'/write", 0)]
#: one point of each phase (the default run; all of FILL_POINTS under --runslow)
FILL_POINTS_DEFAULT = [FILL_POINTS[i] for i in (0, 1, 2, 4, 6, 8, 10, 12)]


def tmpfs(path: str, megabytes: int) -> bool:
    """Mount a tmpfs at ``path`` (root only); False where that is not possible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", path],
                          capture_output=True).returncode == 0


def untmpfs(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True)


def fill_scenarios(disk: str, logs: str, points=FILL_POINTS) -> list[dict]:
    out = []
    for i, (at, n, leave) in enumerate(points):
        spec = {"at": at, "n": n, "leave": leave}
        if at == "session":
            phase, when = str(n).split("/")
            spec = {"at": at, "phase": phase, "when": when, "leave": leave}
        s = scenario(disk, f"fill-{at}-{str(n).split(' ')[0].replace('/', '-')}-{leave}-{i}", fill=spec)
        s["log_dir"] = os.path.join(logs, s["name"])
        os.makedirs(s["log_dir"], exist_ok=True)
        out.append(s)
    resume = scenario(disk, "fill-resume-base", test=False, predict=False)
    out.append(resume)
    out.append({**resume, "name": "fill-resume", "fill": {"at": "resume", "leave": 0},
                "resume": os.path.join(resume["ckpt_dir"], "epoch=0-step=5.ckpt"), "log_dir": logs})
    return out


def allowed_steps(store: str) -> set[int]:
    """Committed step counts the store may open at: the last completed commit, or the one in progress."""
    log = store + ".commits"
    if not os.path.exists(log):
        return {0}
    lines = [ln.split() for ln in open(log).read().splitlines() if ln.strip()]
    done = [int(n) for kind, n in lines if kind == "done"]
    allowed = {done[-1] if done else 0}
    if lines and lines[-1][0] == "begin":
        allowed.add(int(lines[-1][1]))
    return allowed


def snapshot(path: str) -> dict[str, Any]:
    """Every committed byte of a store, its status, final weights, certificate and query sets, after
    opening it as a reader does (which repairs what a killed writer left). Raises what the reader raises."""
    from lightning_dualform import StoreReader
    from lightning_dualform.store._h5open import open_any

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with StoreReader(path) as s:
            status, n_steps = s.status, s.n_steps
            n_rows = {n: s.layer(n).n_rows for n in s.layers}
            n_inputs = s.n_inputs
    out: dict[str, Any] = {"status": status, "n_steps": n_steps, "n_rows": n_rows,
                           "repairs": [str(w.message) for w in caught if "rolled back" in str(w.message) or "cleared" in str(w.message)]}
    arrays: dict[str, np.ndarray] = {}
    # h5py alone, as a program outside the library would read; a write session of another process in the
    # meantime (as the library's reader checks) makes it "busy"
    from lightning_dualform.errors import StoreBusyError
    from lightning_dualform.store import _journal
    from lightning_dualform.store.reader import _phase, _writer_state

    before = _writer_state(path)
    try:
        _raw(path, out, arrays, n_steps, n_rows, n_inputs, status, open_any)
    except Exception as err:
        if _writer_state(path)[0] or before[0]:
            raise StoreBusyError(f"{path}: read while a writer rewrote it ({err})") from err
        raise
    after = _writer_state(path)
    doing = after[0] or before[0]
    if doing is not None and (os.path.exists(_journal.journal_path(path)) or (
            after[1] != before[1] and not (_phase(before[0]) == _phase(after[0]) == "training"))):
        raise StoreBusyError(f"{path}: read while a write session rewrote it")
    return out


def _raw(path, out, arrays, n_steps, n_rows, n_inputs, status, open_any) -> None:  # noqa: ANN001
    with open_any(path) as f:
        arrays["update_step"] = f["update_step"][:n_steps]
        arrays["update_epoch"] = f["update_epoch"][:n_steps]
        if "inputs" in f:
            arrays["inputs/index"] = f["inputs/index"][:n_inputs]
            arrays["inputs/data"] = f["inputs/data"][:n_inputs]
        cert: dict[str, dict[str, Any]] = {}
        for name, g in f["layers"].items():
            n = n_rows[name]
            for col in ("keys", "values", "step", "epoch", "index", "position", "label"):
                arrays[f"{name}/{col}"] = g[col][:n]
            for col in ("weight_init", "bias_init", "weight_buffer_init", "bias_buffer_init"):
                if col in g:
                    arrays[f"{name}/{col}"] = g[col][()]
            ug = g["updates"]
            arrays[f"{name}/grad_scale"] = ug["grad_scale"][:n_steps]
            for pname in ("weight", "bias"):
                if pname in ug:
                    for col, ds in ug[pname].items():
                        arrays[f"{name}/{pname}/{col}"] = ds[:n_steps]
            if status == "complete":
                for col in ("weight_final", "bias_final"):
                    if col in g:
                        arrays[f"{name}/{col}"] = g[col][()]
            c = {k: g.attrs[k] for k in g.attrs if k.startswith(("certificate_", "memory_"))}
            for col in ("memory_weight", "memory_bias"):
                if col in g:
                    c[col] = g[col][()]
            cert[name] = c
        queries: dict[str, dict[str, np.ndarray]] = {}
        if "queries" in f:
            for split, qg in f["queries"].items():
                d: dict[str, np.ndarray] = {}
                qg.visititems(lambda k, o: d.__setitem__(k, o[()]) if isinstance(o, h5py.Dataset) else None)
                queries[split] = d
    out.update(arrays=arrays, cert=cert, queries=queries)


def compare(got: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """What differs between a store's committed state and the uninterrupted run's (empty: nothing). The
    committed prefix must be bit-identical; a finished store's final weights, each layer certificate that
    is present, and each query set that is present must equal the reference's."""
    problems = []
    n = got["n_steps"]
    ref_steps = ref["arrays"]["update_step"]
    if n > len(ref_steps):
        problems.append(f"{n} committed steps, more than the uninterrupted run's {len(ref_steps)}")
    for key, arr in got["arrays"].items():
        if key not in ref["arrays"]:
            problems.append(f"{key}: not in the reference")
            continue
        r = ref["arrays"][key]
        if key.endswith(("_final",)) or key.endswith("_init") or key.endswith("buffer_init"):
            want = r
        else:
            want = r[: len(arr)]
        if arr.shape != want.shape or not np.array_equal(arr, want):
            problems.append(f"{key}: differs from the uninterrupted run")
    for layer, rows in got["n_rows"].items():  # the committed rows are exactly those of the committed steps
        step = ref["arrays"][f"{layer}/step"]
        first = int(ref_steps[0]) if len(ref_steps) else 0
        if rows != int(np.searchsorted(step, first + n)):
            problems.append(f"{layer}: {rows} committed rows for {n} committed steps")
    for layer, c in got["cert"].items():
        if not c:
            continue
        rc = ref["cert"].get(layer, {})
        if c.get("certificate_method") != rc.get("certificate_method"):
            # the certificate made as training went, written at finalisation, before certify="full" replaced it
            # (a kill between the two): another estimate of the same error, not comparable byte for byte
            c = {k: v for k, v in c.items() if k == "certificate_tables_crc32"}
        for k, v in c.items():
            if k not in rc or not np.array_equal(np.asarray(v), np.asarray(rc[k])):
                problems.append(f"{layer}: certificate {k} differs from the uninterrupted run")
    for split, d in got["queries"].items():
        rd = ref["queries"].get(split)
        if rd is None or sorted(d) != sorted(rd) or any(not np.array_equal(d[k], rd[k]) for k in d):
            problems.append(f"query set {split!r} differs from the uninterrupted run")
    return problems


def verdict(result: dict, ref: dict[str, Any], *, must_exist: bool = True) -> dict[str, Any]:
    """Check one scenario's store: it opens, at an allowed committed step count, bit-identical to ``ref``."""
    spec = result["spec"]
    store = spec["store"]
    v: dict[str, Any] = {"name": spec.get("name"), "outcome": {k: result.get(k) for k in ("exit", "signal", "hung")}}
    planned = (spec.get("kill") or {}).get("at") is not None
    crashed = result.get("hung") or (result.get("signal") not in (None, 9)) or (result.get("signal") == 9 and not planned)
    v["crashed"] = bool(crashed)
    v["killed"] = result.get("signal") == 9 and planned
    if not os.path.exists(store):  # fine only where nothing was ever committed (killed while creating it)
        ok = not must_exist or allowed_steps(store) == {0}
        v["opens"] = ok
        v["state"] = "no store (nothing was committed)"
        v["problems"] = [] if ok else ["the store is missing"]
        return v
    try:
        snap = snapshot(store)
    except Exception as err:  # noqa: BLE001 - any failure to open is the finding
        v.update(opens=False, state=f"{type(err).__name__}: {err}", problems=[f"does not open: {err}"])
        return v
    allowed = allowed_steps(store)
    v.update(opens=True, state=f"{snap['status']} at {snap['n_steps']} steps", repairs=snap["repairs"],
             allowed=sorted(allowed), certificate={k: bool(c) for k, c in snap["cert"].items()},
             queries=sorted(snap["queries"]))
    problems = compare(snap, ref)
    if snap["n_steps"] not in allowed:
        problems.append(f"opens at {snap['n_steps']} committed steps; the last commit before the end was {sorted(allowed)}")
    v["problems"] = problems
    return v


# ------------------------------------------------------------------------------------------------------
# mutations
# ------------------------------------------------------------------------------------------------------
_METADATA_SIGNATURES = (b"OHDR", b"OCHK", b"BTHD", b"BTLF", b"BTIN", b"FRHP", b"FHDB", b"FHIB", b"FSHD", b"FSSE",
                        b"EAHD", b"EADB", b"EASB", b"FAHD", b"FADB", b"TREE", b"HEAP", b"SNOD", b"SMTB", b"SMLI")


def metadata_offsets(data: bytes) -> list[int]:
    """Start offsets of HDF5 metadata blocks (by their signatures) and of the superblock."""
    offsets = [0]
    for sig in _METADATA_SIGNATURES:
        offsets += [m.start() for m in re.finditer(re.escape(sig), data)]
    return sorted(set(offsets))


def _bad_value(rng: random.Random) -> Any:
    return rng.choice([
        "garbage", "", "[", "[]", "{}", '{"a": [', "[[[[[[[[[[", "null", -1, 0, 1, -(2**40), 2**62, 10**15,
        3.5, float("nan"), float("inf"), True, False, np.array([1, 2, 3]), np.array([], dtype=np.int64),
        json.dumps(["x"] * 3), json.dumps([["nested"]]), b"\xff\xfe", np.float32(2.5), np.int8(-7),
    ])


def _set_attr(obj: Any, key: str, value: Any) -> None:
    if key in obj.attrs:
        del obj.attrs[key]
    obj.attrs[key] = value


def mutate(valid: str, target: str, seed: int) -> str:
    """Write a mutated copy of ``valid`` to ``target`` (or a file beside it) and return the path to open.

    The kind of mutation is drawn from ``seed``: an attribute (root or layer) set to a value of the wrong
    type or range; a counter set out of range; one value of a row column, a per-step table or the final
    weights changed; the certificate's sums or marks changed; a dataset deleted or replaced by one of
    another shape or type; a query set made inconsistent; a DDP shard index that is empty, malformed,
    names itself, names a shard twice or a missing one, or names stores that do not belong together;
    bytes of an HDF5 metadata block, of the superblock or anywhere flipped or zeroed; the file truncated,
    or moved behind a userblock; a path that is a FIFO, a folder or a dangling link.
    """
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    return MUTATORS[kind](valid, target, rng) or target


def _copy(valid: str, target: str) -> None:
    shutil.copyfile(valid, target)


def _mut_root_attr(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        key = rng.choice(["format", "format_version", "row_dtype", "status", "optimizer", "optimizer_exact", "layer_order",
                          "float32_products", "precision", "final_step", "compression", "world_size", "rank"])
        value = rng.choice([_bad_value(rng), json.dumps([]), json.dumps(["net.2", "net.0"]), json.dumps(["net.0", "net.0"]),
                            json.dumps(["missing"]), "recording", "complete", "bfloat16", "float16"])
        _set_attr(f, key, value)


def _mut_layer_attr(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        g = f["layers"][rng.choice(list(f["layers"]))]
        key = rng.choice(["kind", "d_in", "d_out", "has_bias", "order", "exact", "inexact_reason", "certificate_rel_err",
                          "certificate_exact", "certificate_tolerance", "memory_end_step", "memory_rows",
                          "memory_weight_final_crc32"])
        value = rng.choice([_bad_value(rng), "embedding", "conv2d", 0, 2, 7, 10**9])
        if rng.random() < 0.2:
            if key in g.attrs:
                del g.attrs[key]
        else:
            _set_attr(g, key, value)


def _mut_counter(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        name = rng.choice(["committed_steps", "layers/net.0/committed_rows", "layers/net.2/committed_rows", "inputs/committed"])
        ds = f[name]
        n = int(ds[0])
        ds[0] = rng.choice([-1, -(2**40), n - 1, n + 1, 0, 2**40, 2**62, n // 2])


def _mut_column(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        g = f["layers"][rng.choice(list(f["layers"]))]
        col = rng.choice(["step", "epoch", "index", "label", "position"])
        ds = g[col]
        i = rng.choice([0, ds.shape[0] - 1, rng.randrange(ds.shape[0])])
        v = int(ds[i])
        info = np.iinfo(ds.dtype)
        ds[i] = int(np.clip(rng.choice([-5, -1, -(2**31), 10**15, 2**40, v + 1, v - 1, v + 3, 10**6]), info.min, info.max))


def _mut_table(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        if rng.random() < 0.3:
            ds = f[rng.choice(["update_step", "update_epoch"])]
        else:
            g = f["layers"][rng.choice(list(f["layers"]))]["updates"]
            ds = g[rng.choice(["grad_scale", "weight/lr", "weight/momentum", "weight/weight_decay", "bias/lr",
                               "weight/applied", "weight/fresh_buffer", "weight/nesterov", "bias/dampening"])]
        i = rng.randrange(ds.shape[0])
        if ds.dtype.kind == "b":
            ds[i] = not bool(ds[i])
        elif ds.dtype.kind == "f":
            ds[i] = rng.choice([float("nan"), float("inf"), -float(ds[i]), float(ds[i]) * 1.001, float(ds[i]) * 10, 0.0, 1e300])
        else:
            info = np.iinfo(ds.dtype)
            ds[i] = int(np.clip(rng.choice([int(ds[i]) + 1, -1, 2**40, 10**15, int(ds[i]) - 1]), info.min, info.max))


def _mut_weights(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        g = f["layers"][rng.choice(list(f["layers"]))]
        name = rng.choice(["weight_final", "bias_final", "weight_init", "bias_init", "memory_weight", "memory_bias"])
        if name not in g:
            return
        data = g[name][()]
        flat = data.reshape(-1)
        j = rng.randrange(flat.size)
        flat[j] = rng.choice([flat[j] * 1.5 + 0.1, flat[j] + 1e-3, -flat[j], np.nan, np.inf, flat[j] * (1 + 1e-6)])
        g[name][...] = data


def _mut_dataset(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        layer = rng.choice(list(f["layers"]))
        name = rng.choice([f"layers/{layer}/{c}" for c in ("keys", "values", "step", "index", "weight_init", "weight_final",
                                                         "memory_weight", "updates/grad_scale", "updates/weight/lr",
                                                         "committed_rows")]
                          + ["update_step", "committed_steps", "inputs/index", "queries/test/index", "queries/test/layers/net.0/example"])
        if name not in f:
            return
        shape = f[name].shape
        del f[name]
        choice = rng.randrange(4)
        if choice == 0:
            return  # deleted
        if choice == 1:
            f.create_dataset(name, data=np.zeros(tuple(s + 1 for s in shape) or (2,), dtype=np.float32))
        elif choice == 2:
            f.create_dataset(name, data=np.array(["a", "b"], dtype="S1"))
        else:
            f.create_group(name)


def _mut_queries(valid: str, target: str, rng: random.Random) -> None:
    _copy(valid, target)
    with h5py.File(target, "r+") as f:
        q = f["queries"]["test"]
        choice = rng.randrange(5)
        if choice == 0:
            ds = q["layers/net.0/example"]
            ds[rng.randrange(ds.shape[0])] = rng.choice([-1, 10**9, int(q["index"].shape[0])])
        elif choice == 1:
            q["index"].resize((q["index"].shape[0] - 1,))
        elif choice == 2:
            del q["layers/net.2/keys"]
            q.create_dataset("layers/net.2/keys", data=np.zeros((3, 5), np.float32))
        elif choice == 3:
            _set_attr(q, "n", rng.choice([-1, 10**12, "x"]))
        else:
            q["layers/net.0/keys"][0, 0] = np.nan


def _mut_shard_index(valid: str, target: str, rng: random.Random) -> str:
    folder = os.path.dirname(target)
    stem = os.path.splitext(os.path.basename(target))[0]
    index = os.path.join(folder, f"{stem}.h5")
    shards = [os.path.join(folder, f"{stem}.rank{r}.h5") for r in range(2)]
    for r, s in enumerate(shards):
        shutil.copyfile(valid, s)
        with h5py.File(s, "r+") as f:
            f.attrs["rank"], f.attrs["world_size"] = r, 2
    choice = rng.randrange(9)
    names: Any
    if choice == 0:
        names = []
    elif choice == 1:
        names = "["
    elif choice == 2:
        names = [os.path.basename(index)]  # itself
    elif choice == 3:
        names = [os.path.basename(shards[0]), os.path.basename(shards[0])]
    elif choice == 4:
        names = [os.path.basename(shards[0]), "./" + os.path.basename(shards[0])]
    elif choice == 5:
        names = [os.path.basename(shards[0]), "missing.rank1.h5"]
    elif choice == 6:
        names = [1, 2]
    elif choice == 7:  # an index naming another index
        inner = os.path.join(folder, f"{stem}.inner.h5")
        with h5py.File(inner, "w") as f:
            f.attrs["format"], f.attrs["format_version"] = "lightning-dualform-shards", 1
            f.attrs["shards"] = json.dumps([os.path.basename(index)])
        names = [os.path.basename(inner), os.path.basename(shards[1])]
    else:  # two copies of one run's store presented as two ranks: the memory counted twice
        names = [os.path.basename(s) for s in shards]
    with h5py.File(index, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = "lightning-dualform-shards", 1
        f.attrs["shards"] = names if isinstance(names, str) else json.dumps(names)
    return index


def _mut_metadata_bytes(valid: str, target: str, rng: random.Random) -> None:
    data = bytearray(open(valid, "rb").read())
    offsets = metadata_offsets(bytes(data))
    start = rng.choice(offsets)
    for _ in range(rng.randrange(1, 4)):
        at = min(len(data) - 1, start + rng.randrange(4, 160))
        if rng.random() < 0.5:
            data[at] ^= 1 << rng.randrange(8)
        else:
            data[at] = rng.randrange(256)
    open(target, "wb").write(data)


def _mut_bytes(valid: str, target: str, rng: random.Random) -> None:
    data = bytearray(open(valid, "rb").read())
    choice = rng.randrange(4)
    if choice == 0:
        data = data[: rng.randrange(len(data))]
    elif choice == 1:
        at = rng.randrange(len(data))
        n = rng.randrange(1, 512)
        data[at : at + n] = bytes(len(data[at : at + n]))
    elif choice == 2:
        data = bytearray(512) + data  # behind a userblock its addresses no longer match
    else:
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    open(target, "wb").write(data)


def _mut_special(valid: str, target: str, rng: random.Random) -> None:
    choice = rng.randrange(3)
    if choice == 0:
        os.mkfifo(target)
    elif choice == 1:
        os.mkdir(target)
    else:
        os.symlink(target + ".nowhere", target)


MUTATORS: dict[str, Callable[[str, str, random.Random], Any]] = {
    "root attribute": _mut_root_attr,
    "layer attribute": _mut_layer_attr,
    "counter": _mut_counter,
    "row column": _mut_column,
    "per-step table": _mut_table,
    "weights or certificate sums": _mut_weights,
    "dataset replaced": _mut_dataset,
    "query set": _mut_queries,
    "shard index": _mut_shard_index,
    "metadata bytes": _mut_metadata_bytes,
    "file bytes": _mut_bytes,
    "special file": _mut_special,
}
# metadata and attributes are what byte fuzzing rarely reaches: they get more draws
KINDS = [k for k, w in (("root attribute", 3), ("layer attribute", 3), ("counter", 2), ("row column", 3),
                        ("per-step table", 2), ("weights or certificate sums", 2), ("dataset replaced", 2),
                        ("query set", 1), ("shard index", 2), ("metadata bytes", 4), ("file bytes", 2),
                        ("special file", 1)) for _ in range(w)]


def kind_of(seed: int) -> str:
    return random.Random(seed).choice(KINDS)


# ------------------------------------------------------------------------------------------------------
# exercising a (mutated) store as a user would, in the fuzz runner
# ------------------------------------------------------------------------------------------------------
DAMAGE_WORDS = ("damaged", "does not rebuild", "stored memory sums", "rewritten")


def answers(path: str) -> dict[str, Any]:
    """``info``, then ``attend`` on every layer at the end and halfway, as the library answers them, with the
    final weights' output computed from the file by h5py alone. Raises what the library raises."""
    import torch

    from lightning_dualform.attend.certificate import store_tolerance
    from lightning_dualform.attend.inference import DualInference
    from lightning_dualform.attend.results import overall_rel_err
    from lightning_dualform.cli.info import store_facts
    from lightning_dualform.store._h5open import open_any

    store_facts(path)
    out: dict[str, Any] = {}
    with DualInference(path, device="cpu", accumulate=torch.float64) as di:
        tol = store_tolerance(di.store)
        out["tolerance"] = tol
        out["complete"] = di.complete
        for name in di.layers:
            lay = di.layer(name)
            g = torch.Generator().manual_seed(11)
            q = torch.randn(5, lay.d_in, generator=g, dtype=torch.float64)
            for label, at in (("end", None), ("half", di.store.first_step + di.store.n_steps // 2)):
                res = di.attend(name, q, top_k=min(3, lay.rows_before(lay.coefficients(at).end_step)), at_step=at,
                                contribution_to="pred" if name == di.layers[-1] else None, step_buckets=4)
                entry = {"dual": res.dual.numpy(), "at_step": res.at_step, "q": q.numpy(),
                         "has_primal": res.primal is not None,
                         "library_primal": None if res.primal is None else res.primal.numpy()}
                out[f"{name}@{label}"] = entry
    # the stored final weights' output, from the file by h5py alone (after the library closed it); where h5py
    # cannot read them (the library did), the library's own primal
    for key, entry in out.items():
        if not isinstance(entry, dict) or not entry.pop("has_primal"):
            continue
        primal = entry.pop("library_primal")
        try:
            with open_any(path) as f:
                gw = f["layers"][key.split("@")[0]]
                w = gw["weight_final"][()].astype(np.float64)
                b = gw["bias_final"][()].astype(np.float64) if "bias_final" in gw else 0.0
            primal = entry["q"] @ w.T + b
        except Exception:  # noqa: BLE001
            pass
        entry["primal_rel_err"] = overall_rel_err(torch.from_numpy(entry["dual"]), torch.from_numpy(primal))
    return out


def classify(path: str, reference: dict[str, Any]) -> dict[str, Any]:
    """One mutated store's outcome.

    * ``store_error``: the library raised ``StoreError``;
    * ``correct``: every answer is right: at the end of a finished store, ``dual`` equals the stored final
      weights' output (h5py alone) within the store's tolerance; elsewhere it equals the unmutated store's;
    * ``flagged``: an answer is wrong and a warning said the store is damaged;
    * ``silent``: ``dual`` at the end of a finished store differs from the stored final weights' output and
      nothing said so (the issue's definition of a silent wrong answer);
    * ``unflagged_difference``: only an answer without stored final weights to check it against (an earlier
      step, an unfinished store) differs from the unmutated store's, and nothing said so;
    * ``other``: any other exception (a bug).
    """
    from lightning_dualform.attend.results import overall_rel_err
    from lightning_dualform.errors import StoreError

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = answers(path)
        except StoreError as err:
            return {"outcome": "store_error", "detail": str(err)[:200]}
        except Exception as err:  # noqa: BLE001 - the finding
            return {"outcome": "other", "detail": f"{type(err).__name__}: {str(err)[:200]}"}
    said = [str(w.message)[:200] for w in caught if any(word in str(w.message) for word in DAMAGE_WORDS)]
    tol = reference["tolerance"]
    wrong_end, wrong_other = [], []
    for key, entry in got.items():
        if not isinstance(entry, dict):
            continue
        if "primal_rel_err" in entry:  # against the stored final weights' output
            err = entry["primal_rel_err"]
            if not err <= tol:
                wrong_end.append(f"{key}: {err:.2e}")
            continue
        ref_entry = reference["answers"].get(key)  # no final weights here: the unmutated store's answer
        if ref_entry is not None and ref_entry["at_step"] == entry["at_step"]:
            ref = ref_entry["dual"]
        else:
            ref = reference["by_step"].get((key.split("@")[0], entry["at_step"]))
        err = float("inf") if ref is None else overall_rel_err(torch.from_numpy(entry["dual"]), torch.from_numpy(ref))
        if not err <= tol:
            wrong_other.append(f"{key}: {err:.2e}")
    wrong = wrong_end + wrong_other
    if not wrong:
        return {"outcome": "correct"}
    if said:
        return {"outcome": "flagged", "detail": "; ".join(wrong)[:200], "said": said[0]}
    return {"outcome": "silent" if wrong_end else "unflagged_difference", "detail": "; ".join(wrong)[:200]}


def reference_answers(valid: str) -> dict[str, Any]:
    """The unmutated store's answers: at the end and halfway, and every step's dual for stores that mutations
    cut short (a smaller committed count reads as an earlier, consistent store)."""
    import torch

    from lightning_dualform.attend.inference import DualInference

    got = answers(valid)
    by_step: dict[tuple[str, int], np.ndarray] = {}
    with DualInference(valid, device="cpu", accumulate=torch.float64) as di:
        for name in di.layers:
            lay = di.layer(name)
            q = torch.randn(5, lay.d_in, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
            for at in range(di.store.first_step, di.store.last_step + 1):
                res = di.attend(name, q, top_k=0, at_step=at, per_example=False, mass=False, reuse_certificate=False)
                by_step[(name, at)] = res.dual.numpy()
    return {"tolerance": got["tolerance"], "answers": {k: v for k, v in got.items() if isinstance(v, dict)}, "by_step": by_step}


# ------------------------------------------------------------------------------------------------------
# the fuzz runner protocol: one long-lived process, a watchdog per mutation
# ------------------------------------------------------------------------------------------------------
def run_fuzz(valid: str, workdir: str, seeds: list[int], hang_s: float = 10.0) -> list[dict]:
    """Classify the mutations ``seeds`` of ``valid`` in tests/scripts/fuzz_runner.py; a mutation that takes
    more than ``hang_s`` seconds is a hang (the runner is killed and restarted after it)."""
    results: list[dict] = []
    todo = list(seeds)
    while todo:
        proc = subprocess.Popen([sys.executable, RUNNER, valid, workdir, json.dumps(todo)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=_env())
        buf, current, started = b"", None, None
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        ready_deadline = time.monotonic() + 300  # imports and the reference answers
        while True:
            limit = (started + hang_s) if started is not None else ready_deadline
            r, _, _ = select.select([fd], [], [], max(0.0, min(0.25, limit - time.monotonic())))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    if "start" in msg:
                        current, started = msg["start"], time.monotonic()
                    elif "end" in msg:
                        results.append({"seed": msg["end"], "kind": kind_of(msg["end"]), "seconds": msg["seconds"], **msg["result"]})
                        todo.remove(msg["end"])
                        current, started = None, None
                        ready_deadline = time.monotonic() + 120  # the next mutation is made (a copy) before it starts
            elif time.monotonic() > limit:
                proc.kill()
                proc.wait()
                if current is None:
                    raise RuntimeError("the fuzz runner did not start")
                results.append({"seed": current, "kind": kind_of(current), "outcome": "hang", "seconds": hang_s})
                todo.remove(current)
                break
        proc.wait()
        if proc.returncode not in (0, -9) and current is not None and current in todo:  # it died on this mutation
            results.append({"seed": current, "kind": kind_of(current), "outcome": "crash",
                            "detail": f"runner exit {proc.returncode}"})
            todo.remove(current)
        elif proc.returncode not in (0, -9) and current is None and todo:
            raise RuntimeError(f"the fuzz runner failed (exit {proc.returncode})")
    return results
