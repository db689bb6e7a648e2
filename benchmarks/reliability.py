"""Reliability targets of issues 14 and 21: kills in every phase, full disks in every phase, mutated stores, two
writers, readers during a fit, hostile side files and overwrite=True on special files; and what the write
sessions cost against copying the store.

    python benchmarks/reliability.py                      # everything (about 20 min on a busy 2-core VM)
    python benchmarks/reliability.py --mutations 200 --no-big   # a quick look
    python benchmarks/reliability.py --parts side,overwrite,journals   # issue 21's side files only

Targets: >= 50 SIGKILLs over every phase with 100% of stores opening at their last committed (or complete)
state and every committed byte equal to an uninterrupted run's; a full disk in every phase with 0 crashes
and 0 committed steps lost (needs root for a tmpfs; skipped otherwise); 1,000 mutated stores with 0 hangs
over 10 s, 0 outcomes other than a correct answer or StoreError, 0 silent wrong answers; two writers on one
path: one refused at start, the other exact. Side files (issue 21): crafted, foreign, truncated, oversized, FIFO,
socket, device, symlinked, hard-linked and directory locks and journals under every reader and writer, with 0
changes to any file but the store's own, 0 changes to a store a journal does not belong to and 0 hangs over 10 s;
every mutation of a genuine journal restores its store or leaves it untouched; overwrite=True on FIFOs, devices,
sockets, directories and symlinks: each refused, the target unchanged.

The scenarios are those of tests/test_reliability.py and tests/test_side_files.py, larger (tests/reliability.py
and tests/side_files.py hold them).
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
import side_files  # noqa: E402  (tests/side_files.py)
from common import machine  # noqa: E402

KILL_FRACS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)
KILL_STEPS = (0, 1, 3, 4, 6, 8, 9, 11, 13, 14)
FILL_LEAVES = (0, 64 << 10, 1 << 20)


def phase_of(name: str) -> str:
    for prefix, phase in (
        ("create", "store creation"),
        ("step-0", "first step"),
        ("step-", "training"),
        ("commit", "epoch-end commit"),
        ("checkpoint", "checkpoint"),
        ("finalisation", "finalisation"),
        ("certificate", "certificate"),
        ("test", "test recording"),
        ("predict", "predict recording"),
        ("resume-kill", "resume truncation"),
        ("resume-completes", "resume after the kills"),
    ):
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
        c["opens at a committed state"] += bool(
            v["opens"] and not any("opens at" in p or "does not open" in p for p in v["problems"])
        )
        c["committed bytes identical"] += bool(v["opens"] and not v["problems"])
        c[v["state"].split(" at ")[0] if v["opens"] else "unreadable"] += 1
        for rep in v.get("repairs") or []:
            repairs["rolled back a write session" if "rolled back" in rep else "cleared stale flags"] += 1
        if not v["opens"] or v["problems"]:
            failures.append(v)
    total = sum(c["killed"] for p, c in per_phase.items() if p != "resume after the kills")
    good = sum(c["committed bytes identical"] for p, c in per_phase.items() if p != "resume after the kills")
    return {
        "ref": ref,
        "seconds": seconds,
        "kills": total,
        "kills_good": good,
        "per_phase": {p: dict(c) for p, c in per_phase.items()},
        "failures": failures[:10],
        "repairs": dict(repairs),
        "two_writers": pairs,
        "reader": dict(collections.Counter(x["outcome"] for x in reads)),
        "reader_inconsistent": sum(bool(x.get("problems")) for x in reads),
    }


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
            rows.append(
                {
                    "name": r["spec"]["name"],
                    "exit": r.get("exit"),
                    "signal": r.get("signal"),
                    "state": v["state"],
                    "problems": v["problems"],
                    "error": (r.get("error") or "")[:120],
                }
            )
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
    return {
        "seconds": seconds,
        "n": len(results),
        "outcomes": dict(outcomes),
        "by_kind": {k: dict(c) for k, c in by_kind.items()},
        "max_seconds": max(times),
        "median_seconds": float(np.median(times)),
        "hangs_over_10s": outcomes.get("hang", 0),
        "examples": [r for r in results if r["outcome"] not in ("correct", "store_error")][:8],
    }


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
        st.finalize({"fc": (np.ones((d, d), np.float32), np.ones(d, np.float32))}, steps, 1)
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


def side_file_cases(work: str, n: int) -> dict[str, Any]:
    """``n`` hostile side-file cases (the first 246, or 206 without mknod, are every kind with every operation once,
    then random draws), each judged by the rules of tests/side_files.py."""
    sources = side_files.make_sources(os.path.join(work, "sources"))
    mknod = side_files.can_mknod()
    t0 = time.monotonic()
    results = side_files.run_cases(os.path.join(work, "cases"), list(range(n)), sources, hang_s=10.0, mknod=mknod)
    seconds = time.monotonic() - t0
    # a case over 10 s is run again with 120 s: a real hang (blocked on a side file) hangs again; one that a
    # loaded machine starved finishes, and where the alarm found it the first time says which it was
    retries = {}
    over = [r["seed"] for r in results if r["outcome"] == "hang"]
    if over:
        again = side_files.run_cases(os.path.join(work, "retry"), over, sources, hang_s=120.0, mknod=mknod)
        retries = {r["seed"]: r for r in again}
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems: collections.Counter = collections.Counter()
    for r in results:
        by_kind[f"{r['side']} {r['kind']}"][r["outcome"]] += 1
        for p in r["problems"]:
            problems[_problem_kind(p)] += 1
    times = [r["seconds"] for r in results]
    where = [(r.get("trace") or "").strip().splitlines()[-3:-1] for r in results if r["outcome"] == "hang"]
    return {
        "seconds": seconds,
        "n": len(results),
        "mknod": mknod,
        "kinds": len(side_files.kinds(mknod)),
        "outcomes": dict(collections.Counter(r["outcome"] for r in results)),
        "by_kind": {k: dict(c) for k, c in sorted(by_kind.items())},
        "problems": dict(problems),
        "cases_with_problems": sum(1 for r in results if r["problems"]),
        "max_seconds": max(times),
        "median_seconds": float(np.median(times)),
        "over_10s_where": where,
        "over_10s_retried": [{k: a[k] for k in ("seed", "outcome", "seconds", "problems")} for a in retries.values()],
        "cases": [
            {k: r[k] for k in ("seed", "side", "kind", "op", "outcome", "seconds", "problems", "detail")}
            for r in results
            if r["problems"]
        ],
    }


def _problem_kind(p: str) -> str:
    """One line of a case's problems, as the category the targets count."""
    if p.startswith("hang"):
        return "over 10 s"
    if p.startswith("other"):
        return "unclear error"
    if p.startswith("the store is"):
        return ("a store changed that the journal does not belong to" if "allowed ('B1',)" in p
                else "a journal of the store not rolled back as it allows")
    if p.startswith("the ") and "changed" in p:
        return "a special side file changed"
    if " changed: " in p:
        return "a file other than the store's own changed"
    if "is gone" in p:
        return "a journal not applied was lost"
    return p[:60]


def journal_mutations(work: str, per_kind: int) -> dict[str, Any]:
    """Every kind of mutated journal, ``per_kind`` draws each, beside the very store it was written for (its
    inode, as the killed session left it): the store must end as the kind allows (B0 rolled back, B1 untouched,
    or a prefix of the records put back), and a journal that was not applied must be kept byte for byte."""
    from lightning_dualform.store import _journal, _repair

    sources = side_files.make_sources(os.path.join(work, "jsources"))
    d = os.path.join(work, "journals")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "run.h5")
    shutil.copyfile(sources["base"], path)
    b0 = side_files.read(path)
    side_files.killed_session(path)
    b1 = side_files.read(path)
    genuine = side_files.read(_journal.journal_path(path))
    other = side_files.read(sources["other_journal"])
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    bad = []
    t0 = time.monotonic()
    import random
    import warnings

    for kind in side_files.JOURNAL_MUTATIONS:
        for seed in range(per_kind):
            data = side_files.mutate_journal(kind, genuine, random.Random(seed), path, other)
            with open(path, "r+b") as fh:
                fh.write(b1)
                fh.truncate(len(b1))
            for f in os.listdir(d):
                if f.startswith("run.h5.journal"):
                    os.remove(os.path.join(d, f))
            with open(_journal.journal_path(path), "wb") as fh:
                fh.write(data)
            if kind == "sparse":
                os.truncate(_journal.journal_path(path), 1 << 36)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    with side_files.alarm(10):
                        _repair.prepare_for_read(path)
                except Exception as err:  # noqa: BLE001
                    bad.append(f"{kind}/{seed}: {type(err).__name__}: {err}"[:200])
            got = side_files.store_outcome(side_files.read(path), b0, b1)
            out[kind][got] += 1
            if got not in side_files.JOURNAL_MUTATIONS[kind]:
                bad.append(f"{kind}/{seed}: the store is {got}")
            kept = kind == "sparse" or got != "B1" or side_files._torn_start({"journal_data": data}) or any(
                side_files.sha(side_files.read(os.path.join(d, f))) == side_files.sha(data)
                for f in os.listdir(d) if f.startswith("run.h5.journal"))
            if not kept:
                bad.append(f"{kind}/{seed}: a journal that was not applied is gone")
    return {"seconds": time.monotonic() - t0, "n": sum(sum(c.values()) for c in out.values()),
            "by_kind": {k: dict(c) for k, c in out.items()},
            "allowed": {k: list(v) for k, v in side_files.JOURNAL_MUTATIONS.items()},
            "problems": bad[:20], "n_problems": len(bad)}


def overwrite_special(work: str, rounds: int) -> dict[str, Any]:
    """``StoreWriter.create(overwrite=True)`` at a FIFO, a socket, a device (mknod, where permitted), a directory and
    symlinks (to a file, a FIFO, a device, nowhere), ``rounds`` times each: refused, and every file unchanged."""
    import socket
    import stat

    from lightning_dualform.errors import StoreError
    from lightning_dualform.store import LayerSpec, StoreWriter

    spec = LayerSpec(name="fc", kind="linear", d_in=5, d_out=3, has_bias=False,
                     weight_init=np.zeros((3, 5), np.float32), bias_init=None)
    mknod = side_files.can_mknod()
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in range(rounds):
        d = os.path.realpath(os.path.join(work, f"ow{r}"))
        out = os.path.join(d, "outside")
        os.makedirs(out)
        with open(os.path.join(out, "target.bin"), "wb") as fh:
            fh.write(os.urandom(100))
        os.mkfifo(os.path.join(out, "fifo"))
        makers = {"fifo": os.mkfifo, "directory": os.mkdir, "socket": None,
                  "symlink to a file": lambda p: os.symlink(os.path.join(out, "target.bin"), p),
                  "symlink to a FIFO": lambda p: os.symlink(os.path.join(out, "fifo"), p),
                  "dangling symlink": lambda p: os.symlink(os.path.join(out, "nowhere"), p)}
        if mknod:
            os.mknod(os.path.join(out, "zero"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
            makers["device"] = lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5))
            makers["symlink to a device"] = lambda p: os.symlink(os.path.join(out, "zero"), p)
        for kind, make in makers.items():
            path = os.path.join(d, kind.replace(" ", "-") + ".h5")
            if make is None:
                here = os.getcwd()
                os.chdir(d)
                try:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.bind(os.path.basename(path))
                    sock.close()
                finally:
                    os.chdir(here)
            else:
                make(path)
            before = side_files.fingerprint(d)
            try:
                with side_files.alarm(10):
                    StoreWriter.create(path, [spec], overwrite=True).close()
                counts[kind]["replaced"] += 1
            except StoreError:
                counts[kind]["refused"] += 1
            except side_files.Hang:
                counts[kind]["hang"] += 1
            except Exception:  # noqa: BLE001
                counts[kind]["other error"] += 1
            counts[kind]["unchanged" if side_files.fingerprint(d) == before else "changed"] += 1
        shutil.rmtree(d, ignore_errors=True)
    return {"rounds": rounds, "mknod": mknod, "by_kind": {k: dict(c) for k, c in counts.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary folder, deleted)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for reliability.json")
    p.add_argument("--mutations", type=int, default=1000, help="mutated stores to classify")
    p.add_argument("--big-gb", type=float, default=1.5, help="size of the store for the session-vs-copy costs")
    p.add_argument("--no-big", action="store_true", help="skip the session-vs-copy costs")
    p.add_argument("--no-fills", action="store_true", help="skip the full disks")
    p.add_argument("--side-files", type=int, default=1000, help="hostile side-file cases (issue 21)")
    p.add_argument("--journals-per-kind", type=int, default=60, help="draws of each kind of mutated journal")
    p.add_argument("--overwrite-rounds", type=int, default=20, help="rounds of overwrite=True on each special file")
    p.add_argument("--parts", default="kills,fills,mutations,damaged,big,side,journals,overwrite",
                   help="comma-separated parts to run")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    work = args.workdir or tempfile.mkdtemp(prefix="dualform-reliability-")
    os.makedirs(work, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_average": os.getloadavg(),
    }
    try:
        if "kills" in parts:
            report["kills"] = kills(os.path.join(work, "kills"))
            ref = report["kills"].pop("ref")
            print(json.dumps({k: v for k, v in report["kills"].items() if k != "failures"}, indent=1), flush=True)
            if not args.no_fills and "fills" in parts:
                report["fills"] = fills(os.path.join(work, "fills"), os.path.join(work, "fill-logs"), ref)
                print(json.dumps({k: v for k, v in report["fills"].items() if k != "rows"}, indent=1), flush=True)
        if "mutations" in parts:
            report["mutations"] = mutations(os.path.join(work, "mut"), args.mutations)
            print(json.dumps({k: v for k, v in report["mutations"].items() if k != "examples"}, indent=1), flush=True)
            if "damaged" in parts:
                report["damaged_open"] = damaged_open_times(os.path.join(work, "mut"))
                print(json.dumps(report["damaged_open"], indent=1), flush=True)
        if "side" in parts:
            report["side_files"] = side_file_cases(os.path.join(work, "side"), args.side_files)
            print(json.dumps({k: v for k, v in report["side_files"].items() if k != "cases"}, indent=1), flush=True)
        if "journals" in parts:
            report["journals"] = journal_mutations(os.path.join(work, "journal-mut"), args.journals_per_kind)
            print(json.dumps(report["journals"], indent=1), flush=True)
        if "overwrite" in parts:
            report["overwrite"] = overwrite_special(os.path.join(work, "overwrite"), args.overwrite_rounds)
            print(json.dumps(report["overwrite"], indent=1), flush=True)
        if not args.no_big and "big" in parts:
            report["big_store"] = big_store_costs(work, args.big_gb)
            print(json.dumps(report["big_store"], indent=1), flush=True)
    finally:
        os.makedirs(args.out, exist_ok=True)
        everything = parts >= set(p.get_default("parts").split(","))
        name = "reliability.json" if everything else f"reliability-{'-'.join(sorted(parts))}.json"
        with open(os.path.join(args.out, name), "w") as fh:
            json.dump(report, fh, indent=1, default=str)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {os.path.join(args.out, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
