"""The store on its own, without a Trainer: typed metadata, the writer's commit/resume/finalize, the
readers (one file and two shards), and the certificate against weights computed by hand."""

from __future__ import annotations

import mmap
import os
import sys
import threading

import h5py
import numpy as np
import pytest
import torch

from lightning_dualform import StoreError
from lightning_dualform.attend.certificate import certify_store, rebuild_weights
from lightning_dualform.optim import ParamUpdate
from lightning_dualform.store import LayerSpec, StepRows, StoreReader, StoreWriter, open_store, write_shard_index
from lightning_dualform.store.certificate import (
    KeptWeights,
    LayerCertificate,
    missing_certificate,
    read_certificates,
    write_layer_certificate,
)
from lightning_dualform.store.metadata import StoreMetadata

D_IN, D_OUT, ROWS = 5, 3, 4  # rows per step (and per rank)
LR = [0.1, 0.05, 0.2, 0.1]  # a schedule; SGD without momentum: W_T = W_0 - sum_s lr_s G_s


def _rows(step: int, rank: int = 0) -> StepRows:
    g = np.random.default_rng(100 * step + rank)
    return StepRows(keys=g.standard_normal((ROWS, D_IN)).astype(np.float32),
                    values=g.standard_normal((ROWS, D_OUT)).astype(np.float32),
                    index=np.arange(ROWS) + 10 * rank, position=np.zeros(ROWS, np.int32),
                    label=np.arange(ROWS) % 2, step=step, epoch=step // 2)


def _w0() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((D_OUT, D_IN)).astype(np.float32)


def _by_hand(steps: int, ranks: int = 1, scale: float = 1.0) -> np.ndarray:
    """The weights plain SGD reaches: W_0 - sum_s lr_s scale sum_ranks V^T K (float64)."""
    w = _w0().astype(np.float64)
    for s in range(steps):
        for r in range(ranks):
            rows = _rows(s, r)
            w -= LR[s] * scale * rows.values.astype(np.float64).T @ rows.keys.astype(np.float64)
    return w


def _write(path: str, steps: int, rank: int = 0, world: int = 1, scale: float = 1.0, finalize: bool = True,
           meta: StoreMetadata | None = None) -> StoreWriter:
    spec = LayerSpec(
        name="fc", kind="linear", d_in=D_IN, d_out=D_OUT, has_bias=False, weight_init=_w0(), bias_init=None
    )
    st = StoreWriter.create(path, [spec], metadata=meta or StoreMetadata(rank=rank, world_size=world))
    for s in range(steps):
        st.add_step(s, s // 2, {"fc": _rows(s, rank)}, {"fc": (scale, ParamUpdate(lr=LR[s]), None)})
    if finalize:
        st.finalize({"fc": (_by_hand(steps, world, scale).astype(np.float32), None)}, final_step=steps, epochs=2)
    return st


# ------------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------------
def test_metadata_round_trips_through_a_file(tmp_path):
    meta = StoreMetadata(
        precision="bf16-mixed",
        float32_products="tf32",
        optimizer={"name": "SGD", "param_groups": []},
        inexact_causes=["x"],
        optimizer_exact=False,
        recorded_by="DualFormRecorder",
        world_size=2,
        rank=1,
    )
    path = str(tmp_path / "m.h5")
    _write(path, 2, rank=1, world=2, meta=meta)
    with StoreReader(path) as s:
        m = s.meta
    assert (m.precision, m.float32_products, m.recorded_by, m.world_size, m.rank) == (
        "bf16-mixed",
        "tf32",
        "DualFormRecorder",
        2,
        1,
    )
    assert m.optimizer == {"name": "SGD", "param_groups": []} and m.inexact_causes == ["x"]
    assert m.status == "complete" and m.final_step == 2 and m.epochs == 2 and m.layer_order == ["fc"]


@pytest.mark.parametrize("key, value, match", [
    ("status", "finished", "unknown status"),
    ("row_dtype", "float8", "unknown row dtype"),
    ("format_version", 99, "newer than this library"),
    ("format_version", "1", "expected an integer"),
    ("optimizer_exact", "yes", "expected a boolean"),
    ("layer_order", "{not json", "not JSON"),
    ("layer_order", '{"a": 1}', "expected a JSON list"),
    ("world_size", 0, "impossible"),
    ("rank", 3, "impossible"),
    ("gradient_clip_val", "big", "expected a number"),
])
def test_metadata_of_the_wrong_type_is_a_store_error(key, value, match):
    attrs = {**StoreMetadata().to_attrs(), "layer_order": "[]", "optimizer": "{}", "inexact_causes": "[]",
             "dropped_layers": "{}", key: value}
    with pytest.raises(StoreError, match=match):
        StoreMetadata.from_attrs(attrs, "x.h5")


def test_unknown_attributes_are_kept_and_missing_ones_take_defaults():
    m = StoreMetadata.from_attrs({"format": "lightning-dualform", "format_version": 1, "from_the_future": 3}, "x.h5")
    assert m.extra == {"from_the_future": 3} and m.float32_products == "ieee" and m.precision == "32-true"


def test_the_clip_algorithm_is_stored_as_its_name_and_older_spellings_read_as_it():
    from lightning.pytorch.utilities import GradClipAlgorithmType

    attrs = StoreMetadata(gradient_clip_algorithm=GradClipAlgorithmType.VALUE).to_attrs()
    assert attrs["gradient_clip_algorithm"] == "value"
    assert StoreMetadata(gradient_clip_algorithm=str(GradClipAlgorithmType.NORM)).gradient_clip_algorithm == "norm"
    old = {**StoreMetadata().to_attrs(), "gradient_clip_algorithm": "GradClipAlgorithmType.NORM"}
    assert StoreMetadata.from_attrs(old, "x.h5").gradient_clip_algorithm == "norm"


def test_merged_shards_are_complete_only_when_all_are_and_take_the_loosest_rounding():
    a = StoreMetadata(status="complete", float32_products="ieee")
    b = StoreMetadata(status="recording", float32_products="bf16", rank=1, world_size=2)
    m = StoreMetadata.merge([a, b])
    assert m.status == "recording" and m.float32_products == "bf16"
    assert StoreMetadata.merge([a, StoreMetadata(status="complete", float32_products="tf32")]).status == "complete"


# ------------------------------------------------------------------------------------------------------
# writer and reader
# ------------------------------------------------------------------------------------------------------
def test_rows_become_visible_only_when_committed(tmp_path):
    path = str(tmp_path / "c.h5")
    st = _write(path, 3, finalize=False)
    with StoreReader(path) as s:
        assert s.n_steps == 0 and s.layer("fc").n_rows == 0 and not s.complete
    counts = st.commit()
    assert counts["steps"] == 3 and counts["rows"] == {"fc": 3 * ROWS}
    with StoreReader(path) as s:
        lay = s.layer("fc")
        assert s.n_steps == 3 and lay.n_rows == 3 * ROWS and s.last_step == 3
        blk = lay.read(ROWS, 2 * ROWS)
        np.testing.assert_array_equal(blk["keys"], _rows(1).keys)
        np.testing.assert_array_equal(blk["step"], np.full(ROWS, 1))
        assert lay.rows_before(2) == 2 * ROWS
    st.close()


def test_resume_truncates_to_the_checkpoint_and_continues(tmp_path):
    path = str(tmp_path / "r.h5")
    st = _write(path, 4, finalize=False)
    st.commit()
    st.close()
    settings = {"layers": {"fc": ["linear", D_IN, D_OUT, False]}, "row_dtype": "float32", "compression": "none"}
    st = StoreWriter.resume(path, settings, {"fc": 2 * ROWS}, 2, None, last_step=1)
    with StoreReader(path) as s:
        assert s.n_steps == 2 and s.layer("fc").n_rows == 2 * ROWS and s.status == "recording"
    for s_ in (2, 3):
        st.add_step(s_, 1, {"fc": _rows(s_)}, {"fc": (1.0, ParamUpdate(lr=LR[s_]), None)})
    st.finalize({"fc": (_by_hand(4).astype(np.float32), None)}, final_step=4, epochs=2)
    cert = certify_store(path)["fc"]
    assert cert.exact and cert.rel_err < 1e-6


def test_a_resume_whose_step_does_not_match_touches_nothing(tmp_path):
    path = str(tmp_path / "m.h5")
    st = _write(path, 3, finalize=False)
    st.commit()
    st.close()
    before = open(path, "rb").read()
    settings = {"layers": {"fc": ["linear", D_IN, D_OUT, False]}, "row_dtype": "float32", "compression": "none"}
    with pytest.raises(StoreError, match="nothing was truncated"):
        StoreWriter.resume(path, settings, {"fc": ROWS}, 1, None, last_step=5)
    with pytest.raises(ValueError, match="other settings"):
        StoreWriter.resume(path, {**settings, "row_dtype": "float16"}, {"fc": ROWS}, 1, None, last_step=0)
    with StoreReader(path) as s:
        assert s.n_steps == 3  # the refused resumes changed nothing that a reader sees
    assert len(open(path, "rb").read()) == len(before)


# ------------------------------------------------------------------------------------------------------
# the certificate
# ------------------------------------------------------------------------------------------------------
def test_certificate_and_rebuild_equal_the_weights_computed_by_hand(tmp_path):
    path = str(tmp_path / "h.h5")
    _write(path, 4, scale=0.5)
    cert = certify_store(path)["fc"]
    assert cert.exact and cert.rel_err < 1e-6 and cert.explained == pytest.approx(1.0)
    with StoreReader(path) as s:
        w, _ = rebuild_weights(s.layer("fc"), at_step=2)
    np.testing.assert_allclose(w.numpy(), _by_hand(2, scale=0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("damage", ["one value of one row", "one step's coefficient"])
def test_the_certificate_catches_one_wrong_row_or_coefficient(tmp_path, damage):
    path = str(tmp_path / "d.h5")
    _write(path, 4)
    with h5py.File(path, "r+") as f:
        g = f["layers"]["fc"]
        if damage == "one value of one row":
            v = g["values"][5]
            v[1] += 0.5
            g["values"][5] = v
        else:
            g["updates"]["weight"]["lr"][2] = LR[2] * 1.01
    if damage == "one value of one row":
        cert = certify_store(path)["fc"]
        assert not cert.exact and cert.rel_err > cert.tolerance, cert
    else:  # the certificate binds the per-step tables by CRC: the reader refuses before any sum
        with pytest.raises(StoreError, match="per-step tables changed after the certificate"):
            certify_store(path)


def test_the_certificate_the_store_writes_reads_back_typed(tmp_path):
    """The certificate's bytes go through one door: what write_layer_certificate writes, the reader gives back
    (the verdict, the kept sums with their marks), and rewriting it replaces every part."""
    path = str(tmp_path / "c.h5")
    _write(path, 4)
    cert = LayerCertificate.measured(2e-7, 0.0, 1e-4, exact_run=True)
    sums = np.random.default_rng(3).standard_normal((D_OUT, D_IN))
    write_layer_certificate(path, "fc", cert, kept=KeptWeights(sums, None, end_step=4, rows=4 * ROWS))
    with StoreReader(path) as s:
        lay = s.layer("fc")
        assert lay.certificate == cert and read_certificates(path) == {"fc": cert} and not missing_certificate(s)
        np.testing.assert_array_equal(lay.stored_memory_sums(4, 4 * ROWS)[0], sums)
        assert lay.stored_memory_sums(3, 3 * ROWS) is None  # sums of other rows are never handed out
    with h5py.File(path, "r") as f:
        attrs = dict(f["layers"]["fc"].attrs)
    assert {k: attrs[k] for k in cert.to_attrs()} == cert.to_attrs() and "certificate_probes" not in attrs
    assert attrs["memory_rows"] == 4 * ROWS and attrs["certificate_tables_crc32"] > 0

    sketch = LayerCertificate.measured(3e-3, 1e-3, 1e-4, exact_run=True, method="sketch", probes=8)
    write_layer_certificate(path, "fc", sketch)  # no kept sums this time: the old ones go too
    with StoreReader(path) as s:
        assert s.layer("fc").certificate == sketch and not sketch.exact and sketch.rel_err == 3e-3
        assert s.layer("fc").stored_memory_sums(4, 4 * ROWS) is None
    with h5py.File(path, "r") as f:
        assert "memory_weight" not in f["layers"]["fc"] and "memory_rows" not in f["layers"]["fc"].attrs


@pytest.mark.parametrize("key, value, match", [
    ("certificate_rel_err", "small", "not a number"),
    ("certificate_tolerance", True, "not a number"),
    ("certificate_exact", 2, "not a boolean"),
    ("certificate_method", "guess", "not one of"),
    ("certificate_probes", 0, "not a positive integer"),
])
def test_a_damaged_certificate_attribute_is_a_store_error(tmp_path, key, value, match):
    path = str(tmp_path / "c.h5")
    _write(path, 2)
    certify_store(path)
    with h5py.File(path, "r+") as f:
        f["layers"]["fc"].attrs[key] = value
    with pytest.raises(StoreError, match=match):
        StoreReader(path, probe=False)


def test_an_unfinished_store_has_no_missing_certificate_and_refuses_one(tmp_path):
    path = str(tmp_path / "u.h5")
    st = _write(path, 2, finalize=False)
    st.commit()
    st.close()
    with StoreReader(path) as s:
        assert s.layer("fc").certificate is None and missing_certificate(s) == []
    with pytest.raises(StoreError, match="no final weights"):
        write_layer_certificate(path, "fc", LayerCertificate.measured(0.0, 0.0, 1e-4, exact_run=True))


# ------------------------------------------------------------------------------------------------------
# two shards, in-process
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def two_shards(tmp_path):
    paths = [str(tmp_path / f"run.rank{r}.h5") for r in range(2)]
    for r, p in enumerate(paths):
        _write(p, 4, rank=r, world=2)
    index = str(tmp_path / "run.h5")
    write_shard_index(index, paths)
    return index, paths


def test_two_shards_read_as_one_store_step_major(two_shards):
    index, paths = two_shards
    with open_store(index) as s:
        lay = s.layer("fc")
        assert s.complete and s.n_steps == 4 and lay.n_rows == 2 * 4 * ROWS
        blk = lay.read(0, 2 * ROWS)  # step 0 of rank 0, then step 0 of rank 1
        np.testing.assert_array_equal(blk["keys"][:ROWS], _rows(0, 0).keys)
        np.testing.assert_array_equal(blk["keys"][ROWS:], _rows(0, 1).keys)
        assert lay.rows_before(1) == 2 * ROWS


def test_the_sum_over_shards_certifies_the_run(two_shards):
    index, paths = two_shards
    sums = {}
    for p in paths:  # each rank's memory; the all-reduce adds them
        with StoreReader(p) as s:
            sums[p] = rebuild_weights(s.layer("fc"))[0] - torch.from_numpy(_w0()).double()
    total = sum(sums.values())
    certs = [certify_store(p, all_reduce=lambda t, total=total, p=p: _reduce(t, sums, p))["fc"] for p in paths]
    assert all(c.exact and c.rel_err < 1e-6 for c in certs), certs
    np.testing.assert_allclose(total.numpy() + _w0(), _by_hand(4, ranks=2), rtol=1e-6, atol=1e-6)


def test_a_certificate_written_through_the_index_goes_into_every_shard(two_shards):
    index, paths = two_shards
    cert = LayerCertificate.measured(1e-7, 0.0, 1e-4, exact_run=True)
    kept = KeptWeights(np.ones((D_OUT, D_IN)), None, end_step=4, rows=8 * ROWS)
    write_layer_certificate(index, "fc", cert, kept=kept)
    for p in paths:
        with StoreReader(p) as s:  # each shard's own tables are bound (the reader checks the CRC on open)
            assert s.layer("fc").certificate == cert and s.layer("fc").stored_memory_sums(4, 8 * ROWS) is not None
    with open_store(index) as s:
        assert s.layer("fc").certificate == cert


def _reduce(t: torch.Tensor, sums: dict, me: str) -> torch.Tensor:
    """An all-reduce over two ranks run in one process: this rank's tensor plus the other's same-shaped one."""
    if t.shape == (1,):  # the row count
        return t * 2
    if t.dim() == 2:
        other = next(v for k, v in sums.items() if k != me)
        return t + other
    return t


def test_a_shard_index_naming_a_missing_shard_is_an_error(two_shards, tmp_path):
    index, paths = two_shards
    import os

    os.remove(paths[1])
    with pytest.raises(StoreError, match="missing"):
        open_store(index)


# ------------------------------------------------------------------------------------------------------
# syncing to disk while recording
# ------------------------------------------------------------------------------------------------------
def test_the_writer_syncs_the_store_as_rows_arrive(tmp_path, monkeypatch):
    """Every few megabytes a helper thread syncs the store (so the finish's fsync waits for little): the store's
    own file, and the rows are the same as without it."""
    from lightning_dualform.store import _writeback

    calls: list[str] = []
    real = _writeback._sync

    def spy(fd: int) -> None:
        calls.append(os.path.realpath(f"/proc/self/fd/{fd}") if sys.platform.startswith("linux") else "")
        real(fd)

    monkeypatch.setattr(_writeback, "_sync", spy)
    monkeypatch.setattr(_writeback, "SYNC_EVERY", ROWS * (4 * (D_IN + D_OUT) + 32) + 256)  # every step
    path = str(tmp_path / "wb.h5")
    _write(path, 4, finalize=False).close()
    assert 1 <= len(calls) <= 4  # (a sync still running when the next is due is not doubled)
    if sys.platform.startswith("linux"):
        assert set(calls) == {os.path.realpath(path)}
    monkeypatch.setattr(_writeback, "SYNC_EVERY", 1 << 62)
    plain = str(tmp_path / "plain.h5")
    n = len(calls)
    _write(plain, 4).close()
    assert len(calls) == n
    with h5py.File(path, "r") as a, h5py.File(plain, "r") as b:
        for col in ("keys", "values", "index", "step"):
            np.testing.assert_array_equal(a["layers/fc"][col][()], b["layers/fc"][col][()])


def _resident_pages(path, size: int) -> int:
    """Pages of the file's first ``size`` bytes in the page cache (``mincore`` of a shared read-only map)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, size)
        return sum(v & 1 for v in vec)
    finally:
        os.close(fd)


def _drops_synced_pages(path) -> bool:
    """Whether this file system lets POSIX_FADV_DONTNEED drop a synced file's pages (ext4 does, tmpfs cannot)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, bytes(1 << 20))
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 1 << 20, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return _resident_pages(path, 1 << 20) < (1 << 20) // mmap.PAGESIZE // 4


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or sys.platform != "linux", reason="mincore and fadvise: Linux")
def test_synced_rows_leave_the_page_cache_and_stay_on_disk(tmp_path):
    """After a background sync the synced bytes are offered back to the kernel (the fit's pages are reused instead
    of new memory touched: docs/benchmarks.md); the file as it was when syncing began (a skeleton) and the bytes
    written after the sync stay cached, and every byte reads back."""
    from lightning_dualform.store import _writeback

    path, mib = tmp_path / "f", 1 << 20
    head, body, tail = (np.random.default_rng(i).bytes(mib) for i in range(3))
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, head)
        wb = _writeback.Writeback(fd, every=mib)
        os.write(fd, body)
        cached = _resident_pages(path, 2 * mib)
        wb.wrote(mib)  # due: the helper syncs [0, 2 MiB) and offers the body's pages back
        wb.close()
        os.write(fd, tail)
    finally:
        os.close(fd)
    pages = mib // mmap.PAGESIZE
    if cached < 2 * pages or not _drops_synced_pages(tmp_path / "probe"):
        pytest.skip("this file system keeps no page cache the advice could drop (tmpfs keeps its only copy there)")
    assert _resident_pages(path, mib) == pages  # the file as it was when the writeback began: left alone
    assert _resident_pages(path, 3 * mib) - _resident_pages(path, 2 * mib) == pages  # written after: left alone
    assert _resident_pages(path, 2 * mib) - _resident_pages(path, mib) < pages // 4  # the synced body: dropped
    assert path.read_bytes() == head + body + tail


def test_a_refused_page_cache_advice_is_not_a_failed_sync(tmp_path, monkeypatch):
    """Dropping the synced pages is advice: a file system that refuses it (EINVAL) must not fail the store's
    appends the way a failed sync does."""
    from lightning_dualform.store import _writeback

    def refuse(*args: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse, raising=False)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 4096)
        wb = _writeback.Writeback(fd, every=100)
        os.write(fd, b"y" * 4096)
        wb.wrote(4096)
        wb.close()  # (raises a sync's error)
        assert wb.syncs == 1
    finally:
        os.close(fd)


def test_a_sync_in_progress_is_not_doubled_and_its_failure_is_raised(tmp_path, monkeypatch):
    from lightning_dualform.store import _writeback

    release, started = threading.Event(), threading.Event()
    synced: list[int] = []

    def slow(fd: int) -> None:
        started.set()
        release.wait(10)
        synced.append(fd)

    monkeypatch.setattr(_writeback, "_sync", slow)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        wb = _writeback.Writeback(fd, every=100)
        wb.wrote(60)
        assert wb.syncs == 0
        wb.wrote(60)  # due: the helper starts syncing
        assert started.wait(10) and wb.syncs == 1
        wb.wrote(500)  # due again while the first still runs: skipped, not queued
        assert wb.syncs == 1
        release.set()
        wb.close()  # waits for the sync in progress
        assert len(synced) == 1 and synced[0] != fd  # (a duplicate descriptor: the file may close meanwhile)

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(_writeback, "_sync", failing)
        wb = _writeback.Writeback(fd, every=100)
        wb.wrote(100)
        with pytest.raises(OSError, match="Input/output"):
            wb.close()
    finally:
        os.close(fd)
    assert _writeback.Writeback(None).wrote(1 << 40) is None  # no descriptor (another HDF5 driver): nothing to do
