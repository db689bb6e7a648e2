"""Reliability targets of issue 14: kills in every phase, full disks in every phase, mutated stores, two writers,
readers during a fit; and what the write sessions cost against copying the store.

    python benchmarks/reliability.py                      # everything (about 10 min on a busy 2-core VM)
    python benchmarks/reliability.py --mutations 200 --no-big   # a quick look

Targets: >= 50 SIGKILLs over every phase with 100% of stores opening at their last committed (or complete)
state and every committed byte equal to an uninterrupted run's; a full disk in every phase with 0 crashes
and 0 committed steps lost (needs root for a tmpfs; skipped otherwise); 1,000 mutated stores with 0 hangs
over 10 s, 0 outcomes other than a correct answer or StoreError, 0 silent wrong answers; two writers on one
path: one refused at start, the other exact.

The scenarios are those of tests/test_reliability.py, larger (tests/reliability.py holds both).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "src"))

import reliability  # noqa: E402  (tests/reliability.py)
from common import machine  # noqa: E402

KILL_FRACS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)
KILL_STEPS = (0, 1, 3, 4, 6, 8, 9, 11, 13, 14)
FILL_LEAVES = (0, 64 << 10, 1 << 20)


def phase_of(name: str) -> str:
    for prefix, phase in (("create", "store creation"), ("step-0", "first step"), ("step-", "training"),
                          ("commit", "epoch-end commit"), ("checkpoint", "checkpoint"), ("finalisation", "finalisation"),
                          ("certificate", "certificate"), ("test", "test recording"), ("predict", "predict recording"),
                          ("resume-kill", "resume truncation"), ("resume-completes", "resume after the kills")):
        if name.startswith(prefix):
            return phase
    return name


def kills(work: str) -> dict[str, Any]:
    scenarios = reliability.kill_scenarios(work, fracs=KILL_FRACS, steps=KILL_STEPS)
    scenarios.append(reliability.scenario(work, "two-writers-1", pair=True))
    scenarios.append(reliability.scenario(work, "two-writers-2", pair=True))
    scenarios.append(reliability.scenario(work, "two-writers-3", pair=True))
    scenarios.append(reliability.scenario(work, "reader", reader=True, epochs=12))
    t0 = time.monotonic()
    results = reliability.run_scenarios(scenarios, work, timeout=3600)
    seconds = time.monotonic() - t0
    ref = reliability.snapshot(scenarios[0]["store"])
    per_phase: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    failures, repairs = [], collections.Counter()
    pairs, reads = [], []
    for r in results:
        spec = r["spec"]
        if spec.get("pair"):
            exits = sorted(o.get("exit") for o in r["pair"])
            refused = next((e for e in r["errors"] if e), "")
            v = reliability.verdict({**r, "exit": 0}, ref)
            pairs.append({"exits": exits, "refused_with": refused.split(":")[0], "other_exact": not v["problems"]
                          and v["state"] == "complete at 15 steps"})
            continue
        if spec.get("reader"):
            reads = r.get("reads") or []
            continue
        if spec["name"] in ("reference", "resume", "resume-count"):
            continue
        v = reliability.verdict(r, ref)
        c = per_phase[phase_of(spec["name"])]
        c["runs"] += 1
        c["killed"] += bool(v["killed"])
        c["opens at a committed state"] += bool(v["opens"] and not any("opens at" in p or "does not open" in p for p in v["problems"]))
        c["committed bytes identical"] += bool(v["opens"] and not v["problems"])
        c[v["state"].split(" at ")[0] if v["opens"] else "unreadable"] += 1
        for rep in v.get("repairs") or []:
            repairs["rolled back a write session" if "rolled back" in rep else "cleared stale flags"] += 1
        if not v["opens"] or v["problems"]:
            failures.append(v)
    total = sum(c["killed"] for p, c in per_phase.items() if p != "resume after the kills")
    good = sum(c["committed bytes identical"] for p, c in per_phase.items() if p != "resume after the kills")
    return {"ref": ref, "seconds": seconds, "kills": total, "kills_good": good, "per_phase": {p: dict(c) for p, c in per_phase.items()},
            "failures": failures[:10], "repairs": dict(repairs), "two_writers": pairs,
            "reader": dict(collections.Counter(x["outcome"] for x in reads)),
            "reader_inconsistent": sum(bool(x.get("problems")) for x in reads)}


def fills(work: str, logs: str, ref: dict[str, Any]) -> dict[str, Any]:
    disk = os.path.join(work, "disk")
    if not reliability.tmpfs(disk, 256):
        return {"skipped": "mounting a tmpfs needs root"}
    try:
        points = [(at, n, leave) for at, n, _ in reliability.FILL_POINTS for leave in FILL_LEAVES]
        points = list(dict.fromkeys(points))
        scenarios = reliability.fill_scenarios(disk, logs, points=points)
        for leave in FILL_LEAVES[1:]:  # the resume's truncation with a little room left too
            base = next(s for s in scenarios if s["name"] == "fill-resume-base")
            scenarios.append({**base, "name": f"fill-resume-{leave}", "fill": {"at": "resume", "leave": leave},
                              "resume": os.path.join(base["ckpt_dir"], "epoch=0-step=5.ckpt"), "log_dir": logs})
        t0 = time.monotonic()
        results = reliability.run_scenarios(scenarios, work, timeout=3600)
        seconds = time.monotonic() - t0
        rows, crashes, lost, unreadable, errors = [], 0, 0, 0, collections.Counter()
        for r in results:
            if r["spec"]["name"] == "fill-resume-base":
                continue
            v = reliability.verdict(r, ref)
            crashed = r.get("signal") is not None or r.get("hung")
            crashes += bool(crashed)
            unreadable += not v["opens"]
            lost += any("opens at" in p for p in v["problems"]) or any("differs" in p for p in v["problems"])
            errors[(r.get("error") or "none").split(":")[0]] += 1
            rows.append({"name": r["spec"]["name"], "exit": r.get("exit"), "signal": r.get("signal"), "state": v["state"],
                         "problems": v["problems"], "error": (r.get("error") or "")[:120]})
        return {"seconds": seconds, "runs": len(rows), "crashes": crashes, "unreadable": unreadable,
                "committed_steps_lost": lost, "errors": dict(errors), "rows": rows}
    finally:
        reliability.untmpfs(disk)


def mutations(work: str, n: int) -> dict[str, Any]:
    valid_dir = os.path.join(work, "valid")
    spec = reliability.scenario(valid_dir, "valid", epochs=2, predict=False)
    out = reliability.run_scenarios([spec], work)[0]
    assert out.get("exit") == 0, out
    t0 = time.monotonic()
    results = reliability.run_fuzz(spec["store"], os.path.join(work, "fuzz"), list(range(n)), hang_s=10.0)
    seconds = time.monotonic() - t0
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r["kind"]][r["outcome"]] += 1
    outcomes = collections.Counter(r["outcome"] for r in results)
    times = [r.get("seconds", 0.0) for r in results]
    return {"seconds": seconds, "n": len(results), "outcomes": dict(outcomes), "by_kind": {k: dict(c) for k, c in by_kind.items()},
            "max_seconds": max(times), "median_seconds": float(np.median(times)),
            "hangs_over_10s": outcomes.get("hang", 0),
            "examples": [r for r in results if r["outcome"] not in ("correct", "store_error")][:8]}


def damaged_open_times(work: str) -> dict[str, Any]:
    """How long a SWMR open of a file with one bad metadata checksum takes, by metadata read attempts, against a
    plain open and the library's reader (each in a fresh interpreter, HDF5's default capped at 20 s)."""
    src = os.path.join(work, "valid", "valid", "run.h5")
    data = bytearray(open(src, "rb").read())
    at = reliability.metadata_offsets(bytes(data))[3] + 20
    data[at] ^= 0x10
    bad = os.path.join(work, "bad.h5")
    open(bad, "wb").write(data)
    code = r"""
import sys, time, h5py
sys.path.insert(0, {src!r})
mode, path = sys.argv[1], sys.argv[2]
from lightning_dualform.store import _h5open, _probe
from lightning_dualform.store.reader import StoreReader
_probe.probe(path + ".missing")  # (nothing: only so that no import is timed)
t = time.perf_counter()
try:
    if mode == "plain":
        f = h5py.File(path, "r", locking=False); f.visititems(lambda n, o: None)
    elif mode == "reader":
        StoreReader(path)
    elif mode == "swmr-default":
        f = h5py.File(path, "r", swmr=True, locking=False); f.visititems(lambda n, o: None)
    else:
        fapl = _h5open.swmr_read_fapl(int(mode.split("-")[1]))
        fid = h5py.h5f.open(path.encode(), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
        h5py.File(fid).visititems(lambda n, o: None)
except Exception as e:
    print(f"{{time.perf_counter() - t:.4f}} {{type(e).__name__}}")
else:
    print(f"{{time.perf_counter() - t:.4f}} ok")
""".format(src=os.path.join(REPO, "src"))
    out = {}
    for mode in ("plain", "reader", "swmr-1", "swmr-24", "swmr-30", "swmr-default"):
        try:
            proc = subprocess.run([sys.executable, "-c", code, mode, bad], capture_output=True, text=True, timeout=20)
            secs, what = proc.stdout.split()[-2:]
            out[mode] = {"seconds": float(secs), "result": what}
        except subprocess.TimeoutExpired:
            out[mode] = {"seconds": None, "result": "still retrying after 20 s (killed)"}
    return out


def big_store_costs(work: str, gigabytes: float) -> dict[str, Any]:
    """A store of about ``gigabytes`` (one 256 -> 256 layer, float32 rows): the finalisation's write session,
    a certificate-sized write session and a query session, against copying the store (write-to-copy and rename)."""
    from lightning_dualform.optim import ParamUpdate
    from lightning_dualform.store import LayerSpec, StepRows, StoreWriter, _journal
    from lightning_dualform.store.query_writer import QueryWriter

    d = 256
    path = os.path.join(work, "big.h5")
    spec = LayerSpec("fc", "linear", d, d, True, np.zeros((d, d), np.float32), np.zeros(d, np.float32))
    rows_per_step = 4096
    steps = int(gigabytes * 1e9 / (rows_per_step * (2 * d * 4 + 32)))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((rows_per_step, d), dtype=np.float32)
    t0 = time.perf_counter()
    st = StoreWriter.create(path, [spec], commit_seconds=1e9)
    for s in range(steps):
        rows = StepRows(keys, keys, np.arange(rows_per_step, dtype=np.int64), np.zeros(rows_per_step, np.int32),
                        np.zeros(rows_per_step, np.int64))
        st.add_step(s, 0, {"fc": rows}, {"fc": (1.0, ParamUpdate(lr=1e-3), ParamUpdate(lr=1e-3))})
    st.commit()
    write_s = time.perf_counter() - t0
    size = os.path.getsize(path)
    journal_bytes: list[int] = []
    orig_commit = _journal._UndoFile.commit

    def commit(self):  # the journal's size as the session commits
        journal_bytes.append(os.fstat(self._jfd).st_size)
        return orig_commit(self)

    _journal._UndoFile.commit = commit
    try:
        t = time.perf_counter()
        st.finalize({"fc": (np.ones((d, d), np.float32), np.ones(d, np.float32))}, {"final_step": steps, "epochs": 1})
        finalize_s = time.perf_counter() - t
        t = time.perf_counter()
        with _journal.write_session(path, "certificate of fc", reserve=8 * d * d + 8 * d) as f:
            f["layers/fc"].create_dataset("memory_weight", data=np.zeros((d, d)), fletcher32=True)
            f["layers/fc"].create_dataset("memory_bias", data=np.zeros(d), fletcher32=True)
            f["layers/fc"].attrs["certificate_rel_err"] = 0.0
        cert_s = time.perf_counter() - t
        t = time.perf_counter()
        qw = QueryWriter(path, "test", {"fc": d})
        for b in range(20):
            n = 100
            qw.add_batch(np.arange(n) + b * n, np.zeros(n), np.zeros(n), None,
                         {"fc": (keys[:n], np.arange(n), np.zeros(n, np.int32), np.zeros(n, np.int64))})
        qw.close()
        query_s = time.perf_counter() - t
    finally:
        _journal._UndoFile.commit = orig_commit
    t = time.perf_counter()
    copy = path + ".copy"
    shutil.copyfile(path, copy)
    fd = os.open(copy, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    copy_s = time.perf_counter() - t
    os.remove(copy)
    os.remove(path)
    return {"store_bytes": size, "rows": steps * rows_per_step, "write_seconds": write_s,
            "finalisation_session_seconds": finalize_s, "certificate_session_seconds": cert_s,
            "query_session_seconds_2000_queries": query_s, "journal_bytes": journal_bytes,
            "copy_and_fsync_seconds": copy_s, "copy_extra_disk_bytes": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder, deleted)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for reliability.json")
    p.add_argument("--mutations", type=int, default=1000, help="mutated stores to classify")
    p.add_argument("--big-gb", type=float, default=1.5, help="size of the store for the session-vs-copy costs")
    p.add_argument("--no-big", action="store_true", help="skip the session-vs-copy costs")
    p.add_argument("--no-fills", action="store_true", help="skip the full disks")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="dualform-reliability-")
    os.makedirs(work, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                              "load_average": os.getloadavg()}
    try:
        report["kills"] = kills(os.path.join(work, "kills"))
        ref = report["kills"].pop("ref")
        print(json.dumps({k: v for k, v in report["kills"].items() if k != "failures"}, indent=1), flush=True)
        if not args.no_fills:
            report["fills"] = fills(os.path.join(work, "fills"), os.path.join(work, "fill-logs"), ref)
            print(json.dumps({k: v for k, v in report["fills"].items() if k != "rows"}, indent=1), flush=True)
        report["mutations"] = mutations(os.path.join(work, "mut"), args.mutations)
        print(json.dumps({k: v for k, v in report["mutations"].items() if k != "examples"}, indent=1), flush=True)
        report["damaged_open"] = damaged_open_times(os.path.join(work, "mut"))
        print(json.dumps(report["damaged_open"], indent=1), flush=True)
        if not args.no_big:
            report["big_store"] = big_store_costs(work, args.big_gb)
            print(json.dumps(report["big_store"], indent=1), flush=True)
    finally:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "reliability.json"), "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {os.path.join(args.out, 'reliability.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
