"""A store survives every phase, every file and every neighbour (issue 14).

* kills: a deterministic run is SIGKILLed at points spread over every phase that writes (store creation,
  the first step, training, the commits at epoch ends, checkpoints, finalisation, the certificate, test and
  predict recording, a resume's truncation); the store must open at the last committed state (or complete),
  with every committed byte equal to an uninterrupted run's;
* full disks: the same run on a small tmpfs filled at each phase (root only; an injected ENOSPC otherwise);
* hostile files: hundreds of mutations of attributes, counters, columns, tables, shard indexes and metadata
  bytes; each gives a correct answer or ``StoreError`` within 10 s, never a silent wrong answer;
* neighbours: two trainings on one path, readers during the end of a fit;
* side files (issue 21): every kind of hostile lock and journal with every reader and writer (one of each kind
  in the default run, in tests/test_side_files.py; all of them and 300 random draws here under --runslow).

Larger runs of the same checks: ``benchmarks/reliability.py`` and the ``slow`` tests.
"""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import shutil
import stat

import h5py
import lightning as L
import numpy as np
import pytest
import torch

import reliability
from helpers import TRAINER_KW, MLP, IndexedDataset, dual_output, rel_err
from lightning_dualform import DualFormCallback, DualInference, StoreError, StoreReader
from lightning_dualform.errors import DiskSpaceError, StoreBusyError, WriterError

#: where in each write phase a kill lands: the phase's start and a point inside it by default, four points under
#: --runslow (and eight in benchmarks/reliability.py)
DEFAULT_FRACS = (0.0, 0.7)


def _fracs(config: pytest.Config) -> tuple[float, ...]:
    return reliability.FRACS if config.getoption("--runslow") else DEFAULT_FRACS


@pytest.fixture(scope="module")
def kills(tmp_path_factory, pytestconfig):
    root = str(tmp_path_factory.mktemp("kills"))
    scenarios = reliability.kill_scenarios(root, fracs=_fracs(pytestconfig))
    scenarios.append(reliability.scenario(root, "two-writers", pair=True))
    scenarios.append(reliability.scenario(root, "reader", reader=True, epochs=8, batch_sleep=0.05))
    results = reliability.run_scenarios(scenarios, root)
    ref = reliability.snapshot(scenarios[0]["store"])
    return results, ref


def test_kills_in_every_phase_leave_a_store_at_a_committed_state(kills, pytestconfig):
    results, ref = kills
    fracs = _fracs(pytestconfig)
    assert ref["status"] == "complete" and ref["n_steps"] == 15 and sorted(ref["queries"]) == ["predict", "test"]
    by_name = {}
    for r in results:
        spec = r["spec"]
        if spec.get("pair") or spec.get("reader") or spec["name"] in ("reference", "resume", "resume-count"):
            continue
        v = by_name[spec["name"]] = reliability.verdict(r, ref)
        if spec["name"] == "resume-completes":
            assert r.get("exit") == 0 and v["state"] == "complete at 15 steps", v
        else:
            assert v["killed"], (spec["name"], r)  # the kill point was reached
        assert v["opens"] and not v["problems"], v
    # two at creation, four steps, each fraction at a commit, a checkpoint (the inner ones), four sessions and a
    # resume's truncation, and the resume that completes
    assert len(by_name) == 2 + 4 + len(fracs) + len(fracs[1:3]) + 4 * len(fracs) + len(fracs) + 1, sorted(by_name)
    # what each phase leaves: nothing / an empty store; the last commit; finished or not
    assert by_name["create-0"]["state"].startswith("no store")
    assert by_name["step-0"]["state"] == "recording at 0 steps"
    assert by_name["step-13"]["state"] == "recording at 10 steps"
    assert {by_name[f"finalisation-{f}"]["state"] for f in fracs} <= {"recording at 15 steps", "complete at 15 steps"}
    assert all(by_name[f"test-{f}"]["state"] == "complete at 15 steps" for f in fracs)  # complete before test stays so
    assert by_name["test-0.0"]["queries"] == []  # rolled back: no half query set
    assert any(by_name[f"finalisation-{f}"].get("repairs") for f in fracs)  # a reader rolled one back, and said so


def test_a_store_killed_in_finalisation_is_finished_by_a_resume(kills, tmp_path):
    """(Resuming from the *final* checkpoint trains no step, and the callback then never finalises: the
    recording engine must finalise a store left at the checkpoint's last step; see the report.)"""
    results, ref = kills
    r = next(r for r in results if r["spec"]["name"] == "finalisation-0.7")
    spec = dict(r["spec"])
    ckpt = os.path.join(spec["ckpt_dir"], "epoch=1-step=10.ckpt")
    again = {**spec, "name": "finish", "ckpt_dir": str(tmp_path / "ckpt"), "resume": ckpt, "kill": None}
    out = reliability.run_scenarios([again], str(tmp_path))
    assert out[0].get("exit") == 0, out
    v = reliability.verdict(out[0], ref)
    assert v["state"] == "complete at 15 steps" and not v["problems"], v


def test_two_trainings_on_one_path_one_is_refused_the_other_exact(kills):
    results, ref = kills
    r = next(r for r in results if r["spec"].get("pair"))
    exits = sorted(o.get("exit") for o in r["pair"])
    assert exits == [0, 1], r
    refused = next(e for e in r["errors"] if e)
    assert refused.startswith(("StoreBusyError", "FileExistsError")), refused
    v = reliability.verdict({**r, "exit": 0}, ref)
    assert v["state"] == "complete at 15 steps" and not v["problems"], v


def test_a_reader_during_the_whole_run_gets_busy_or_a_committed_state(kills):
    results, _ = kills
    r = next(r for r in results if r["spec"].get("reader"))
    reads = r["reads"]
    assert reads and r.get("exit") == 0
    bad = [x for x in reads if x["outcome"] not in ("ok", "busy") or x.get("problems")]
    assert not bad, bad[:3]
    assert sum(x["outcome"] == "ok" for x in reads) >= 3


# ------------------------------------------------------------------------------------------------------
# full disks
# ------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_in_every_phase_crashes_nothing_and_loses_no_committed_step(kills, tmp_path, pytestconfig):
    _, ref = kills
    disk = str(tmp_path / "disk")
    if not reliability.tmpfs(disk, 96):
        pytest.skip("cannot mount a tmpfs here")
    # one point of each phase by default; every point under --runslow
    points = reliability.FILL_POINTS if pytestconfig.getoption("--runslow") else reliability.FILL_POINTS_DEFAULT
    try:
        scenarios = reliability.fill_scenarios(disk, str(tmp_path), points=points)
        results = reliability.run_scenarios(scenarios, str(tmp_path))
        for r in results:
            v = reliability.verdict(r, ref)
            assert not v["crashed"] and r.get("signal") is None, (r["spec"]["name"], r)
            # a full disk surfaces as the disk's own error, never as a raw error of the library or its harness
            assert (r.get("error") or "OSError").split(":")[0] in ("OSError", "DiskFullError", "WriterError"), r
            assert v["opens"] and not v["problems"], v
        states = {r["spec"]["name"]: reliability.verdict(r, ref)["state"] for r in results}
        assert states["fill-resume"] == "complete at 15 steps"  # the refused truncation left the store as it was
        assert any(r.get("exit") == 1 for r in results)  # the disks were really full
    finally:
        reliability.untmpfs(disk)


def test_an_injected_enospc_before_any_write_stops_the_writer_cleanly(tmp_path, monkeypatch):
    """Without root: the writer's space reservation fails (as on a full disk) at the 20th step. It raises before
    HDF5 writes anything, training stops with the cause, and the store opens at its last commit."""
    from lightning_dualform.store import _space

    calls = {"n": 0}
    original = _space.SpaceReserve.ensure

    def ensure(self, nbytes):
        calls["n"] += 1
        if calls["n"] >= 20:
            raise _space.DiskFullError(self.path, nbytes)
        return original(self, nbytes)

    monkeypatch.setattr(_space.SpaceReserve, "ensure", ensure)
    cb = DualFormCallback(tmp_path / "s.h5")
    model = MLP()
    with pytest.raises(WriterError, match="No space left on device"):
        L.Trainer(max_epochs=5, callbacks=[cb], **TRAINER_KW).fit(model, torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    with StoreReader(cb.store_path) as s:
        assert s.status == "recording" and s.n_steps in (6, 12)  # an epoch end (6 steps each)
        n = s.n_steps
    x = torch.randn(4, 6, dtype=torch.float64)
    independent = dual_output(cb.store_path, "net.0", x)  # h5py and the coefficient recurrence alone
    with pytest.warns(UserWarning, match="incomplete store"):
        di = DualInference(cb.store_path, accumulate=torch.float64)
    with di:
        assert di.last_step == n
        assert rel_err(di.attend("net.0", x, top_k=1).dual, independent) < 1e-9


def test_an_injected_enospc_inside_a_write_session_rolls_it_back(tmp_path, monkeypatch):
    """Without root: HDF5's writes fail part-way through the certificate's write session; the session rolls back
    and the finished store is byte for byte as it was, then the certificate is written again on request."""
    from lightning_dualform.attend.certificate import certify_store
    from lightning_dualform.store import _journal

    cb = DualFormCallback(tmp_path / "s.h5", certify=False)
    L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(MLP(), torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    before = open(cb.store_path, "rb").read()
    original = _journal._UndoFile.write
    calls = {"n": 0}

    def write(self, data):
        calls["n"] += 1
        if calls["n"] == 5 and self.failed is None:
            self.failed = OSError(errno.ENOSPC, "No space left on device")
            raise self.failed
        return original(self, data)

    monkeypatch.setattr(_journal._UndoFile, "write", write)
    with pytest.raises(Exception):
        certify_store(cb.store_path)
    assert open(cb.store_path, "rb").read() == before and not os.path.exists(cb.store_path + ".journal")
    monkeypatch.setattr(_journal._UndoFile, "write", original)
    with StoreReader(cb.store_path) as s:
        assert s.complete and not any(s.layer(n).has_certificate for n in s.layers)
    certify_store(cb.store_path)
    with StoreReader(cb.store_path) as s:
        assert all(s.layer(n).has_certificate for n in s.layers)


# ------------------------------------------------------------------------------------------------------
# hostile files
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def valid_store(tmp_path_factory):
    d = tmp_path_factory.mktemp("valid")
    cb = DualFormCallback(d / "v.h5", record_queries=("test",), certify="full")  # with the memory sums

    class M(MLP):
        def test_step(self, batch, batch_idx):
            return self(batch[0])

    model = M()
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=32), batch_size=8))
    trainer.test(model, torch.utils.data.DataLoader(IndexedDataset(n=8), batch_size=4))
    return str(d / "v.h5")


def _fuzz(valid_store, tmp_path, seeds):
    results = reliability.run_fuzz(valid_store, str(tmp_path), seeds, hang_s=10.0)
    bad = [r for r in results if r["outcome"] not in ("correct", "store_error", "flagged")]
    kinds = {r["kind"] for r in results}
    return results, bad, kinds


@pytest.mark.skipif(os.environ.get("LIGHTNING_DUALFORM_CTYPES_HDF5", "1") == "0",
                    reason="without the ctypes property call a SWMR open retries a damaged block HDF5's default 100 "
                           "times (over 10 s): the watchdog would count hangs (docs/development.md)")
def test_mutated_stores_answer_correctly_or_raise_store_error(valid_store, tmp_path):
    results, bad, kinds = _fuzz(valid_store, tmp_path, list(range(120)))  # (1,500 more under --runslow)
    assert len(results) == 120 and not bad, bad[:5]
    assert kinds == set(reliability.MUTATORS)  # every kind of mutation was drawn
    outcomes = {r["outcome"] for r in results}
    assert {"correct", "store_error"} <= outcomes


@pytest.mark.slow
def test_many_more_mutated_stores(valid_store, tmp_path):
    results, bad, _ = _fuzz(valid_store, tmp_path, list(range(120, 1620)))
    assert len(results) == 1500 and not bad, bad[:5]


def _copy(src, dst):
    shutil.copyfile(src, dst)
    return str(dst)


def test_huge_dataset_indices_are_numbered_densely_not_allocated(valid_store, tmp_path):
    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f["layers/net.0/index"][3] = 10**15  # a dense per-example table would need petabytes
    with DualInference(path, accumulate=torch.float64) as di:
        q = torch.randn(3, 6, dtype=torch.float64)
        res = di.attend("net.0", q, top_k=di.layer("net.0").n_rows)  # every row: the huge index is among them
        assert float(res.max_rel_err) < 1e-6
        assert 10**15 in set(res.top.index.reshape(-1).tolist())
        assert 10**15 in set(res.top_examples.index.reshape(-1).tolist())  # mapped back to the dataset index


@pytest.mark.parametrize("column,value,match", [
    ("label", 10**15, "labels up to"), ("epoch", 2**30, "epochs that are not"), ("step", -4, "outside the step table"),
    ("step", 10**9, "steps past"), ("index", -7, "holds -7"),
])
def test_numbers_that_would_size_or_index_tables_are_checked(valid_store, tmp_path, column, value, match):
    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        ds = f[f"layers/net.0/{column}"]
        ds[ds.shape[0] - 1] = np.clip(value, np.iinfo(ds.dtype).min, np.iinfo(ds.dtype).max)
    with pytest.raises(StoreError, match=match):
        with DualInference(path) as di:
            di.attend("net.0", torch.randn(2, 6), top_k=2)


@pytest.mark.parametrize("row", [0, 5, -1])
def test_a_step_out_of_order_in_an_unfinished_store_is_not_dropped_silently(valid_store, tmp_path, row):
    """Rows past the committed steps are dropped (a writer killed between its two counters leaves them); a
    damaged step must not make committed rows look like those."""
    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["status"] = "recording"
        ds = f["layers/net.0/step"]
        ds[row % ds.shape[0]] = 10**9
    with pytest.raises(StoreError, match="step"):
        with DualInference(path) as di:
            di.attend("net.0", torch.randn(2, 6), top_k=1)


@pytest.mark.parametrize("name,value", [("committed_steps", -3), ("layers/net.0/committed_rows", -1),
                                        ("committed_steps", 2**62), ("inputs/committed", -2)])
def test_counters_out_of_range_are_store_errors(valid_store, tmp_path, name, value):
    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f[name][0] = value
    with pytest.raises(StoreError):
        StoreReader(path)


@pytest.mark.parametrize("names", [[], "[", 7, ["self"], ["a.rank0.h5", "./a.rank0.h5"]])
def test_malformed_shard_indexes_are_store_errors(valid_store, tmp_path, names):
    from lightning_dualform.store.shards import open_store

    shutil.copyfile(valid_store, tmp_path / "a.rank0.h5")
    index = tmp_path / "a.h5"
    with h5py.File(index, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = "lightning-dualform-shards", 1
        f.attrs["shards"] = names if isinstance(names, str) else json.dumps(["a.h5" if n == "self" else n for n in names] if isinstance(names, list) else names)
    with pytest.raises(StoreError):
        open_store(index)
    from lightning_dualform.cli import main

    assert main(["info", str(index)]) == 2  # never RecursionError, IndexError


def test_certificate_sums_that_disagree_with_the_rows_are_not_used_and_fail_verify(valid_store, tmp_path):
    from lightning_dualform.cli.verify import verify_store

    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f["layers/net.2/memory_weight"][0, 0] += 0.5
    with pytest.warns(RuntimeWarning, match="stored memory sums rebuild the final weights only"):
        with DualInference(path, accumulate=torch.float64) as di:
            res = di.attend("net.2", torch.randn(4, 8, dtype=torch.float64), top_k=1)
    assert res.dual_source == "rows" and float(res.max_rel_err) < 1e-6  # the right answer, from the rows
    v = verify_store(path)
    assert not v["ok"] and "stored sums" in next(r["note"] for r in v["layers"] if r["layer"] == "net.2")


def test_per_step_tables_rewritten_after_the_certificate_are_a_store_error(valid_store, tmp_path):
    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f["layers/net.0/updates/weight/lr"][1] = 0.0  # valid checksums: a rewrite, not bit rot
    with pytest.raises(StoreError, match="changed after the certificate"):
        StoreReader(path)


def test_a_fifo_a_userblock_and_a_checksum_error_fail_at_once(valid_store, tmp_path):
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="not a regular file"):
        StoreReader(fifo)
    data = bytearray(open(valid_store, "rb").read())
    at = reliability.metadata_offsets(bytes(data))[3] + 20
    data[at] ^= 0x10
    bad = tmp_path / "bad.h5"
    bad.write_bytes(bytes(data))
    with pytest.raises(StoreError):
        StoreReader(bad)
    # behind a userblock (HDF5 finds the superblock at 512): the probe walks it all the same
    ub = tmp_path / "ub.h5"
    ub.write_bytes(bytes(512) + bytes(data))
    with pytest.raises(StoreError):
        StoreReader(ub)


def test_the_probe_ends_a_walk_that_makes_no_progress(tmp_path):
    """A FIFO with no writer blocks any read of it for ever: the walk's child makes no progress and is ended."""
    from lightning_dualform.store import _probe

    fifo = tmp_path / "stuck.h5"
    os.mkfifo(fifo)
    assert "no progress" in _probe.probe(str(fifo), timeout=1.0)


def test_the_probe_counts_the_time_its_child_had_not_the_time_a_loaded_machine_kept_it_waiting(monkeypatch):
    """A child that waits for a core (state R, no CPU used) is not hung however long the wait (up to the wall
    backstop); one that spins (CPU used) or sleeps in a read (state S) is hung after ``stall`` seconds of it."""
    from lightning_dualform.store import _probe

    clock = {"t": 0.0}
    stat = {"state": "R", "cpu": 0.0}
    monkeypatch.setattr(_probe.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(_probe, "_proc_stat", lambda pid: (stat["state"], stat["cpu"]))

    def run(state: str, cpu_per_s: float, seconds: float) -> bool:
        stat.update(state=state, cpu=0.0)
        clock["t"] = 0.0
        p = _probe._Progress(pid=1, stall=5.0)
        hung = False
        for _ in range(int(seconds / 0.25)):
            clock["t"] += 0.25
            stat["cpu"] += cpu_per_s * 0.25
            hung = p.hung()
            if hung:
                break
        return hung

    assert not run("R", 0.04, 100.0)  # starved: 4% of a core for 100 s (4 s of CPU), within the wall backstop
    assert run("R", 0.01, _probe.STALL_WALL_S + 1)  # the backstop
    assert run("R", 1.0, 5.5)  # spinning inside HDF5
    assert not run("R", 1.0, 4.5)
    assert run("S", 0.0, 5.5)  # blocked in a read
    assert not run("S", 0.0, 4.5)
    monkeypatch.setattr(_probe, "_proc_stat", lambda pid: None)  # no /proc: wall time
    assert run("R", 0.0, 5.5) and not run("R", 0.0, 4.5)


def test_swmr_reads_use_few_metadata_attempts():
    """Contract with HDF5 (public C API, reached through ctypes because h5py does not wrap it): the setting
    that keeps a SWMR open of a damaged file from retrying for minutes is really made."""
    import ctypes

    from lightning_dualform.store import _h5open, _hdf5_nogil

    lib = _hdf5_nogil.h5pys_library()
    if lib is None:
        pytest.skip("h5py's HDF5 is not reachable through ctypes here")
    fapl = _h5open.swmr_read_fapl(7)
    assert fapl is not None
    get = lib.H5Pget_metadata_read_attempts
    get.argtypes, get.restype = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint)], ctypes.c_int
    n = ctypes.c_uint(0)
    assert get(fapl.id, ctypes.byref(n)) >= 0 and n.value == 7


# ------------------------------------------------------------------------------------------------------
# readers repair what a killed writer left, and say so
# ------------------------------------------------------------------------------------------------------
def _killed_mid_session(path: str) -> None:
    """Fork a child that opens a write session on ``path``, changes it, and dies without committing."""
    from lightning_dualform.store import _journal

    pid = os.fork()
    if pid == 0:
        try:
            s = _journal.write_session(path, "finalisation")
            s.file.attrs["status"] = "half written"
            del s.file["layers/net.0/weight_final"]
            s.file.flush()
        finally:
            os._exit(0)  # no commit, no rollback: as a kill
    os.waitpid(pid, 0)


def test_a_reader_rolls_back_an_interrupted_session_byte_for_byte(valid_store, tmp_path):
    path = _copy(valid_store, tmp_path / "s.h5")
    before = open(path, "rb").read()
    _killed_mid_session(path)
    assert os.path.exists(path + ".journal") and open(path, "rb").read() != before
    with pytest.warns(RuntimeWarning, match="rolled back an interrupted finalisation"):
        with StoreReader(path) as s:
            assert s.complete
    assert open(path, "rb").read() == before and not os.path.exists(path + ".journal")


def test_a_reader_clears_the_flags_a_killed_swmr_writer_left(valid_store, tmp_path):
    path = _copy(valid_store, tmp_path / "s.h5")
    pid = os.fork()
    if pid == 0:
        f = h5py.File(path, "r+", libver="latest", locking=False)
        f.swmr_mode = True
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    assert open(path, "rb").read(12)[11] != 0
    with pytest.warns(RuntimeWarning, match="cleared the 'open for writing' flags"):
        StoreReader(path).close()
    assert open(path, "rb").read(12)[11] == 0


def _drop_certificate(g: h5py.Group) -> None:
    """A layer's certificate as a killed certificate process leaves it: gone (the checksums finalisation wrote
    stay: a lost certificate keeps them)."""
    for k in [k for k in g.attrs if k.startswith(("certificate_", "memory_"))
              and not (k.startswith("certificate_") and k.endswith("_crc32"))]:
        del g.attrs[k]
    for k in ("memory_weight", "memory_bias"):
        if k in g:
            del g[k]


def test_a_complete_store_without_certificate_is_reported_and_written_on_request(valid_store, tmp_path, capsys):
    from lightning_dualform.cli import main

    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        for g in f["layers"].values():
            _drop_certificate(g)
    assert main(["info", path]) == 0
    assert "MISSING" in capsys.readouterr().out
    assert main(["verify", path]) == 0
    assert "--write-certificate" in capsys.readouterr().out
    assert main(["verify", path, "--write-certificate"]) == 0
    with StoreReader(path) as s:
        assert all(s.layer(n).has_certificate for n in s.layers)


def test_write_certificate_writes_only_a_missing_one_and_keeps_the_evidence_of_rows_changed_since(valid_store,
                                                                                                  tmp_path, capsys):
    """A certificate made when the run finished is the record that its rows rebuilt the weights then: rows changed
    since (a valid checksum: a rewrite) fail verify, and --write-certificate must not replace that record."""
    from lightning_dualform.cli import main

    def certs(path):
        with h5py.File(path, "r") as f:
            return {n: {k: np.asarray(v).tolist() for k, v in g.attrs.items() if k.startswith(("certificate_", "memory_"))}
                    for n, g in f["layers"].items()}

    path = _copy(valid_store, tmp_path / "s.h5")
    with h5py.File(path, "r+") as f:
        f["layers/net.2/keys"][0:4] *= 1.5
    before = certs(path)
    assert main(["verify", path, "--write-certificate"]) == 1
    out, err = capsys.readouterr()
    assert "FAIL" in out and "holds its certificate: kept" in err
    assert certs(path) == before
    # one layer's certificate lost: only that one is written, the other's stays as it was
    path = _copy(valid_store, tmp_path / "t.h5")
    with h5py.File(path, "r+") as f:
        _drop_certificate(f["layers/net.0"])
    kept = certs(path)["net.2"]
    assert main(["verify", path, "--write-certificate"]) == 0
    assert "wrote the certificate of net.0 in" in capsys.readouterr().err
    assert certs(path)["net.2"] == kept
    with StoreReader(path) as s:
        assert all(s.layer(n).has_certificate for n in s.layers)


# ------------------------------------------------------------------------------------------------------
# arguments that size things
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,err", [
    ({"at_step": 2.7}, TypeError), ({"at_step": "2"}, TypeError), ({"at_step": True}, TypeError),
    ({"top_k": 2.0}, TypeError), ({"top_k": True}, TypeError), ({"top_k": "3"}, TypeError),
    ({"step_buckets": 10**9}, ValueError), ({"step_buckets": 0}, ValueError), ({"step_buckets": 2.5}, TypeError),
    ({"contribution_to": 1.0}, TypeError), ({"contribution_to": True}, TypeError),
])
def test_attend_refuses_arguments_of_the_wrong_type_or_size(valid_store, kw, err):
    with DualInference(valid_store) as di:
        with pytest.raises(err):
            di.attend("net.2", torch.randn(2, 8), **{"top_k": 1, **kw})


def test_attend_accepts_numpy_integers(valid_store):
    with DualInference(valid_store, accumulate=torch.float64) as di:
        res = di.attend("net.2", torch.randn(2, 8), top_k=np.int64(3), at_step=np.int32(di.last_step),
                        step_buckets=np.int16(4), contribution_to=np.int64(1))
    assert res.top.row.shape == (2, 3) and res.at_step == di.last_step


def test_analysis_checks_its_integer_arguments(valid_store):
    from lightning_dualform.analysis import attend_queries, attend_recorded

    with DualInference(valid_store) as di:
        with pytest.raises(TypeError):
            attend_recorded(di, "test", top_k=1.5)
        with pytest.raises(TypeError):
            attend_queries(di, split="test", at_step="3")
        with pytest.raises(ValueError):
            attend_queries(di, split="test", positions=[0, 10**9])
        assert attend_recorded(di, "test", top_k=np.int64(2), limit=np.int64(2)).results


def test_cli_bounds_index_ranges_and_step_buckets_and_opens_outputs_first(valid_store, tmp_path, capsys, monkeypatch):
    from lightning_dualform.cli import main

    assert main(["attend", valid_store, "--index", "0:100000000000"]) == 2
    assert "more than the" in capsys.readouterr().err
    assert main(["attend", valid_store, "--step-buckets", str(10**9)]) == 2
    assert "--step-buckets" in capsys.readouterr().err
    import lightning_dualform.attend.inference as inf

    def never(*a, **k):
        raise AssertionError("the computation ran before the output was checked")

    monkeypatch.setattr(inf.DualInference, "attend", never)
    # a full device of the test's own (the character device 1:7 that /dev/full is), never the system's
    full = tmp_path / "full"
    try:
        os.mknod(full, 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    except (OSError, AttributeError):
        full = None
    if full is not None:
        assert main(["attend", valid_store, "--json", str(full)]) == 2
        assert str(full) in capsys.readouterr().err
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # (root writes anywhere)
            assert main(["attend", valid_store, "--json", str(tmp_path / "ro" / "x.json")]) == 2
    finally:
        os.chmod(tmp_path / "ro", 0o700)


def test_cli_writes_outputs_whole_or_not_at_all(valid_store, tmp_path):
    from lightning_dualform.cli import main

    out = tmp_path / "a.json"
    out.write_text("previous")
    assert main(["attend", valid_store, "--index", "0", "--json", str(out), "--top-k", "2"]) == 0
    assert json.loads(out.read_text())["layers"]
    assert main(["attend", valid_store, "--index", "999", "--json", str(out)]) == 2  # fails: the file is kept
    assert json.loads(out.read_text())["layers"] and not glob.glob(str(tmp_path / ".a-*"))


@pytest.mark.parametrize("kw,err", [({"chunk_rows": 10**8}, ValueError), ({"chunk_rows": True}, TypeError),
                                    ({"chunk_rows": 0}, ValueError), ({"commit_seconds": "soon"}, TypeError),
                                    ({"commit_seconds": -1}, ValueError), ({"commit_seconds": math.nan}, ValueError)])
def test_store_creation_bounds_what_sizes_it(tmp_path, kw, err):
    from lightning_dualform.store import LayerSpec, StoreWriter

    spec = LayerSpec("fc", "linear", 200, 64, True, np.zeros((64, 200), np.float32), np.zeros(64, np.float32))
    with pytest.raises(err):
        StoreWriter.create(str(tmp_path / "s.h5"), [spec], **kw)
    assert os.listdir(tmp_path) == []  # nothing written, nothing to block the next run


def test_store_creation_refuses_a_second_writer_and_a_finished_store(tmp_path):
    from lightning_dualform.store import LayerSpec, StoreWriter

    spec = LayerSpec("fc", "linear", 3, 2, False, np.zeros((2, 3), np.float32), None)
    path = str(tmp_path / "s.h5")
    first = StoreWriter.create(path, [spec])
    with pytest.raises(StoreBusyError, match="another writer holds this store"):
        StoreWriter.create(path, [spec], overwrite=True)
    first.close()
    with pytest.warns(RuntimeWarning, match="holds no committed step"):  # an empty store is replaced
        second = StoreWriter.create(path, [spec])
    from lightning_dualform.optim import ParamUpdate
    from lightning_dualform.store import StepRows

    rows = StepRows(np.ones((1, 3), np.float32), np.ones((1, 2), np.float32), np.zeros(1, np.int64),
                    np.zeros(1, np.int32), np.zeros(1, np.int64))
    second.add_step(0, 0, {"fc": rows}, {"fc": (1.0, ParamUpdate(lr=0.1), None)})
    second.close()
    with pytest.raises(FileExistsError, match="holds 1 committed steps"):
        StoreWriter.create(path, [spec])


def test_the_planner_keeps_a_safety_margin(tmp_path, monkeypatch):
    from lightning_dualform.record import planner

    plan = planner.estimate({"fc": 100}, {"fc": ("linear", 1000, 1000, True)}, 4, 1000, 10)
    monkeypatch.setattr(planner, "free_bytes", lambda d: int(plan.total_bytes * 1.007))  # 0.7% headroom
    with pytest.raises(DiskSpaceError, match="safety margin of 5%"):
        planner.check_disk(plan, str(tmp_path / "s.h5"))
    monkeypatch.setattr(planner, "free_bytes", lambda d: int(plan.total_bytes * 1.06) + (64 << 20))
    planner.check_disk(plan, str(tmp_path / "s.h5"))


def test_a_resumed_run_and_real_outputs_still_agree(kills):
    """The resumed store of the kill scenarios rebuilds its model's real outputs (not only the reference's bytes)."""
    results, _ = kills
    r = next(r for r in results if r["spec"]["name"] == "resume-completes")
    store = r["spec"]["store"]
    with DualInference(store, accumulate=torch.float64) as di:
        for name in di.layers:
            lay = di.layer(name)
            q = torch.randn(3, lay.d_in, dtype=torch.float64)
            res = di.attend(name, q, top_k=1)
            w = torch.from_numpy(lay.weight_final).double()
            b = torch.from_numpy(lay.bias_final).double()
            assert rel_err(res.dual, q @ w.t() + b) < 1e-6


# ------------------------------------------------------------------------------------------------------
# hostile side files (issue 21): the larger run (tests/test_side_files.py keeps one case of each kind)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_hostile_side_file_with_every_operation_and_more(tmp_path):
    import side_files

    sources = side_files.make_sources(str(tmp_path / "sources"))
    mknod = side_files.can_mknod()
    n = len(side_files.kinds(mknod)) * len(side_files.OPERATIONS)
    results = side_files.run_cases(str(tmp_path / "cases"), list(range(n + 300)), sources, hang_s=10.0, mknod=mknod)
    bad = [r for r in results if r["problems"]]
    assert len(results) == n + 300 and not bad, bad[:3]
