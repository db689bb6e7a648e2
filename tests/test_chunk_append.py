"""Whole-chunk appends that bypass HDF5's filter pipeline must write exactly what HDF5 would."""

import sys

import h5py
import numpy as np
import pytest

from lightning_dualform.store import _fletcher
from lightning_dualform.store._chunks import ChunkAppender

pytestmark = pytest.mark.skipif(_fletcher.library() is None, reason="no C compiler for the checksum")


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 511, 512, 513, 720, 721, 4099, 8192, 8194, 100_001, 262_147])
def test_fletcher32_matches_hdf5s_loop(n):
    rng = np.random.default_rng(n)
    for data in (rng.integers(0, 256, n, dtype=np.uint8), np.full(n, 255, np.uint8), np.zeros(n, np.uint8)):
        assert _fletcher.fletcher32(data) == _fletcher.fletcher32_reference(data.tobytes())


def _dataset(f, name, width, dtype, chunk_rows, **kw):
    return f.create_dataset(name, shape=(0, width), maxshape=(None, width), chunks=(chunk_rows, width),
                            dtype=dtype, fletcher32=True, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_appends_equal_hdf5s_own_chunks_and_survive_reopening(tmp_path, dtype):
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((1000, 7)) * 100).astype(dtype)
    rows[rows < 0] = 0  # exact zeros, as in ReLU activations
    path = tmp_path / "s.h5"
    with h5py.File(path, "w", libver="latest") as f:
        ref = _dataset(f, "ref", 7, dtype, 64)
        ref.resize(len(rows), axis=0)
        ref[:] = rows  # through HDF5's filter pipeline
        ds = _dataset(f, "direct", 7, dtype, 64)
        f.swmr_mode = True
        app = ChunkAppender(ds)
        # uneven appends, with commits (partial chunks written) in between
        for a, b in [(0, 5), (5, 64), (64, 200), (200, 201), (201, 333)]:
            app.append(rows[a:b])
            if b in (64, 201):
                app.flush()
                assert ds.shape[0] == b and np.array_equal(ds[:b], rows[:b])
        app.flush()
        assert app.rows == 333
    with h5py.File(path, "r+", libver="latest") as f:  # continue after a close, from a partial chunk
        app = ChunkAppender(f["direct"])
        assert app.rows == 333
        app.append(rows[333:])
        app.flush()
    with h5py.File(path, "r") as f:
        ds, ref = f["direct"], f["ref"]
        assert np.array_equal(ds[:], rows)
        n_chunks = -(-len(rows) // 64)
        for c in range(n_chunks):  # byte for byte, checksum included
            assert ds.id.read_direct_chunk((c * 64, 0)) == ref.id.read_direct_chunk((c * 64, 0))


def test_a_damaged_direct_chunk_fails_to_read(tmp_path):
    rows = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w", libver="latest") as f:
        app = ChunkAppender(_dataset(f, "d", 3, np.float32, 64))
        app.append(rows)
        offset = f["d"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with h5py.File(path, "r") as f, pytest.raises(OSError):
        f["d"][:]


def test_only_checksum_only_datasets_qualify(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        assert ChunkAppender.usable(_dataset(f, "a", 4, np.float32, 8))
        assert not ChunkAppender.usable(_dataset(f, "b", 4, np.float32, 8, compression="lzf"))
        assert not ChunkAppender.usable(
            f.create_dataset("c", shape=(0, 4), maxshape=(None, 4), chunks=(8, 4), dtype="f4")
        )
        assert not ChunkAppender.usable(
            f.create_dataset("d", shape=(0, 4), maxshape=(None, 4), chunks=(8, 2), dtype="f4", fletcher32=True)
        )


def test_a_store_written_through_h5py_is_identical(tmp_path, monkeypatch):
    """The same seeded fit, once with whole-chunk appends and once through h5py's filter pipeline."""
    import lightning as L

    from helpers import TRAINER_KW, MLP, IndexedDataset, loader, store_contents
    from lightning_dualform import DualFormCallback
    from lightning_dualform.store import StoreWriter

    used = []
    orig = StoreWriter.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        used.append(sum(len(x) for x in self._appenders.values()))

    monkeypatch.setattr(StoreWriter, "__init__", spy)
    contents = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(ChunkAppender, "usable", staticmethod(lambda ds: False))
        torch_seed = 7
        L.seed_everything(torch_seed, verbose=False)
        cb = DualFormCallback(tmp_path / f"run{direct}.h5", chunk_rows=32)
        L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(MLP(), loader(IndexedDataset(), batch_size=12))
        contents.append(store_contents(cb.store_path))
    assert used[0] > 0 and used[-1] == 0  # the first fit used the appenders, the second did not
    a, b = contents
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_running_checksum_over_pieces_and_trailing_zeros():
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 4000, dtype=np.uint8)
    whole = np.concatenate([data, np.zeros(1000, np.uint8)])
    run = _fletcher.RunningFletcher32()
    dst = np.empty_like(data)
    for a, b in [(0, 2), (2, 1000), (1000, 3998), (3998, 4000)]:
        run.copy(dst[a:b], data[a:b])
    assert np.array_equal(dst, data)
    assert run.finish(zero_bytes=1000) == _fletcher.fletcher32_reference(whole.tobytes())
    run.reset()
    run.update(np.zeros(10, np.uint8))
    assert run.finish(zero_bytes=6) == 0 == _fletcher.fletcher32_reference(bytes(16))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the HDF5 library is found through /proc/self/maps")
def test_bulk_reads_and_writes_release_the_gil_on_linux(tmp_path):
    """The appends above went through ctypes' H5Dwrite_chunk (GIL released), not h5py's (GIL held)."""
    from lightning_dualform.store import _hdf5_nogil

    assert _hdf5_nogil.library() is not None
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        app = ChunkAppender(_dataset(f, "d", 3, np.float32, 4))
        app.append(rows)
        app.flush()
        assert np.array_equal(f["d"][:], rows)
        for a, b in [(0, 5), (1, 4), (3, 9), (5, 5)]:
            assert np.array_equal(_hdf5_nogil.read_rows(f["d"], a, b), rows[a:b])


def test_images_append_by_whole_rows(tmp_path):
    """Datasets of any row shape (raw inputs: (N, 1, 28, 28)) take whole-row chunks the same way."""
    imgs = np.random.default_rng(5).random((50, 1, 6, 5)).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "w", libver="latest") as f:
        ds = f.create_dataset("x", shape=(0, 1, 6, 5), maxshape=(None, 1, 6, 5), chunks=(8, 1, 6, 5),
                              dtype="f4", fletcher32=True)
        assert ChunkAppender.usable(ds)
        app = ChunkAppender(ds)
        app.append(imgs[:13])
        app.flush()
        app.append(imgs[13:])
        app.flush()
        assert np.array_equal(ds[:], imgs)
        with pytest.raises(ValueError, match="do not fit"):
            app.append(imgs[:, :, :5])


def test_a_second_hdf5_copy_in_the_process_is_never_called():
    """netCDF4 or PyTables may load their own HDF5: only the instance that sees h5py's objects is used."""
    from lightning_dualform.store import _hdf5_nogil

    class OtherCopy:  # answers like an HDF5 that has some other object under h5py's id
        def H5Dget_space(self, dset):
            return 1

        def H5Sget_simple_extent_npoints(self, space):
            return 3

        def H5Sclose(self, space):
            return 0

    assert not _hdf5_nogil._is_h5pys(OtherCopy())
    if _hdf5_nogil.library() is not None:
        assert _hdf5_nogil._is_h5pys(_hdf5_nogil.library())


def test_a_shared_hdf5_is_left_to_h5py_unless_thread_safe(tmp_path):
    """A libhdf5 outside h5py's package (a conda env's, shared with other packages that rely on the GIL)
    is only called without the GIL when HDF5 itself is thread-safe."""
    import os as _os

    from lightning_dualform.store import _hdf5_nogil

    class NotThreadSafe:
        pass

    class ThreadSafe:
        def H5is_library_threadsafe(self, flag):
            flag._obj.value = True
            return 0

    pkg = _os.path.dirname(_os.path.abspath(h5py.__file__))
    assert _hdf5_nogil._private_or_threadsafe(_os.path.join(pkg + ".libs", "libhdf5-x.so"), NotThreadSafe())
    assert not _hdf5_nogil._private_or_threadsafe(str(tmp_path / "libhdf5.so.310"), NotThreadSafe())
    assert _hdf5_nogil._private_or_threadsafe(str(tmp_path / "libhdf5.so.310"), ThreadSafe())


def test_without_ctypes_hdf5_the_same_bytes_go_through_h5py(tmp_path, monkeypatch):
    """Where libhdf5 cannot be reached through ctypes (macOS, Windows, a shared conda HDF5)."""
    from lightning_dualform.store import _hdf5_nogil

    monkeypatch.setattr(_hdf5_nogil, "_lib", None)
    assert _hdf5_nogil.library() is None
    rows = np.random.default_rng(9).random((70, 5)).astype(np.float32)
    with h5py.File(tmp_path / "s.h5", "w", libver="latest") as f:
        ref = _dataset(f, "ref", 5, np.float32, 16)
        ref.resize(70, axis=0)
        ref[:] = rows
        app = ChunkAppender(_dataset(f, "d", 5, np.float32, 16))
        app.append(rows[:33])
        app.flush()
        app.append(rows[33:])
        app.flush()
        assert np.array_equal(_hdf5_nogil.read_rows(f["d"], 3, 70), rows[3:])
        for c in range(0, 70, 16):
            assert f["d"].id.read_direct_chunk((c, 0)) == ref.id.read_direct_chunk((c, 0))
