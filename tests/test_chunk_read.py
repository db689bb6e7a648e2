"""Rows read from the memory-mapped chunks must equal HDF5's reading, and damage must never pass."""

import h5py
import numpy as np
import pytest

from lightning_dualform import _fletcher
from lightning_dualform.chunk_append import ChunkAppender
from lightning_dualform.chunk_read import ChunkReader, MappedFile

pytestmark = pytest.mark.skipif(_fletcher.library() is None, reason="no C compiler for the checksum")


def _store(path, rows, chunk_rows, direct):
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("d", shape=(0, *rows.shape[1:]), maxshape=(None, *rows.shape[1:]),
                              chunks=(chunk_rows, *rows.shape[1:]), dtype=rows.dtype, fletcher32=True)
        if direct:
            app = ChunkAppender(ds)
            app.append(rows)
            app.flush()
        else:
            ds.resize(len(rows), axis=0)
            ds[:] = rows


@pytest.mark.parametrize("direct", [True, False], ids=["written-by-appender", "written-by-hdf5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64])
def test_any_range_equals_hdf5(tmp_path, direct, dtype):
    rows = (np.random.default_rng(0).standard_normal((203, 6)) * 50).astype(dtype)
    _store(tmp_path / "s.h5", rows, 16, direct)
    mapped = MappedFile(str(tmp_path / "s.h5"))
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert ChunkReader.usable(f["d"])
        reader = ChunkReader(f["d"], mapped)
        for a, b in [(0, 203), (0, 16), (5, 9), (15, 17), (16, 48), (190, 203), (200, 500), (203, 203), (7, 7), (100, 64)]:
            got = reader.read(a, b)
            assert got.dtype == rows.dtype and np.array_equal(got, rows[a:b]), (a, b)
    mapped.close()


def test_damage_anywhere_in_a_touched_chunk_raises(tmp_path):
    rows = np.arange(64 * 4, dtype=np.float32).reshape(64, 4)
    _store(tmp_path / "s.h5", rows, 16, True)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        off = f["d"].id.get_chunk_info_by_coord((16, 0)).byte_offset
    with open(tmp_path / "s.h5", "r+b") as fh:  # a byte of row 17, outside the rows asked for below
        fh.seek(off + 4 * 4 + 2)
        b = fh.read(1)
        fh.seek(off + 4 * 4 + 2)
        fh.write(bytes([b[0] ^ 0x10]))
    mapped = MappedFile(str(tmp_path / "s.h5"))
    with h5py.File(tmp_path / "s.h5", "r") as f:
        reader = ChunkReader(f["d"], mapped)
        assert np.array_equal(reader.read(0, 16), rows[:16])  # other chunks still read
        with pytest.raises(OSError, match="checksum"):
            reader.read(20, 24)  # the damaged byte is outside these rows but inside their chunk
    mapped.close()


def test_a_growing_file_is_mapped_again(tmp_path):
    rows = np.random.default_rng(1).random((100, 3)).astype(np.float32)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("d", shape=(0, 3), maxshape=(None, 3), chunks=(8, 3), dtype="f4", fletcher32=True)
        app = ChunkAppender(ds)
        mapped = MappedFile(str(path))
        app.append(rows[:40])
        app.flush()
        f.flush()
        reader = ChunkReader(ds, mapped)
        assert np.array_equal(reader.read(0, 40), rows[:40])
        app.append(rows[40:])
        app.flush()
        f.flush()
        assert np.array_equal(reader.read(30, 100), rows[30:100])
        mapped.close()


def test_compressed_datasets_are_left_to_hdf5(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = f.create_dataset("d", shape=(0, 4), maxshape=(None, 4), chunks=(8, 4), dtype="f4", fletcher32=True, compression="lzf")
        assert not ChunkReader.usable(ds)


def test_store_reads_match_hdf5_on_a_real_store(tmp_path, monkeypatch):
    import lightning as L

    from helpers import TRAINER_KW, MLP, IndexedDataset, loader
    from lightning_dualform import DualFormCallback, StoreReader

    cb = DualFormCallback(tmp_path / "run.h5", chunk_rows=24)
    L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(MLP(), loader(IndexedDataset(), batch_size=10))
    with StoreReader(cb.store_path) as s, h5py.File(cb.store_path, "r", locking=False) as f:
        for name in s.layers:
            lay = s.layer(name)
            got = lay.read(7, lay.n_rows - 3, ("keys", "values"))
            assert all(r is not None for r in lay._chunk_readers.values())  # the mapped path was taken
            for col in ("keys", "values"):
                assert np.array_equal(got[col], f["layers"][name][col][7 : lay.n_rows - 3])
