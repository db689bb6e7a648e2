"""The raw-chunk reader of keys and values: the rows HDF5 reads, bit for bit; every chunk's checksum verified
(a damaged chunk raises ``StoreError``); compressed stores and moved chunks go through HDF5."""

from __future__ import annotations

import os
import shutil
import warnings

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset
from lightning_dualform import DualFormCallback, DualInference, StoreError, StoreReader
from lightning_dualform.store import _fletcher, _hdf5_nogil, _raw_chunks


# the raw reader verifies chunks with the compiled checksum: a run without it (not built, or
# LIGHTNING_DUALFORM_KERNEL=0) has no raw reads to test
pytestmark = pytest.mark.skipif(_fletcher.library() is None, reason="the compiled checksum is off in this run")


@pytest.fixture(autouse=True)
def raw_reads_on(monkeypatch):
    """These tests test the raw reader itself, whatever LIGHTNING_DUALFORM_RAW_READ says for the rest of a run."""
    monkeypatch.delenv("LIGHTNING_DUALFORM_RAW_READ", raising=False)


D = 128  # keys of 300 x 2 x 128 numbers: more than the open-time probe reads of a dataset (2^16)


def _fit(path: str, **cb) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_epochs=2, callbacks=[DualFormCallback(path, **cb)], **TRAINER_KW).fit(
            MLP(d=D), torch.utils.data.DataLoader(IndexedDataset(n=300, d=D), batch_size=32, shuffle=True))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("raw") / "s.h5")
    _fit(path, chunk_rows=16)  # 600 rows per layer in 38 chunks, the last one partial
    return path


def _no_hdf5_reads(monkeypatch) -> list:
    calls: list = []
    original = _hdf5_nogil.read_rows

    def counted(*args, **kw):
        calls.append(args[1:])
        return original(*args, **kw)

    monkeypatch.setattr(_hdf5_nogil, "read_rows", counted)
    return calls


def test_raw_reads_equal_hdf5_bit_for_bit(store, monkeypatch) -> None:
    calls = _no_hdf5_reads(monkeypatch)
    with StoreReader(store) as s, h5py.File(store, "r", swmr=True, locking=False) as f:
        for name in s.layers:
            lay = s.layer(name)
            n = lay.n_rows
            assert n == 600
            for a, b in [(0, n), (0, 16), (3, 5), (15, 17), (16, 32), (5, n), (n - 1, n), (0, 1), (7, 7), (590, 600)]:
                got = lay.read(a, b, ("keys", "values"))
                for col in ("keys", "values"):
                    assert np.array_equal(got[col], f["layers"][name][col][a:b]), (name, col, a, b)
            assert all(r is not None for r in lay._chunk_readers.values())
            r = lay._chunk_readers["keys"]
            for threads in (1, 2, 8):
                assert np.array_equal(r.read(2, n - 3, threads=threads), f["layers"][name]["keys"][2 : n - 3])
    assert calls == []  # every bulk read took the raw path


def _chunk(path: str, dataset: str, row: int) -> tuple[int, int]:
    with h5py.File(path, "r", locking=False) as f:
        info = f[dataset].id.get_chunk_info_by_coord((row - row % f[dataset].chunks[0], 0))
        return int(info.byte_offset), int(info.size)


@pytest.mark.parametrize("where", ["data", "checksum"])
def test_a_damaged_chunk_raises_store_error(store, tmp_path, monkeypatch, where) -> None:
    bad = str(tmp_path / "bad.h5")
    shutil.copyfile(store, bad)
    offset, size = _chunk(bad, "layers/net.0/keys", 40)  # rows 32..47
    at = offset + (100 if where == "data" else size - 2)
    with open(bad, "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)
        fh.seek(at)
        fh.write(bytes([byte[0] ^ 0x5A]))
    calls = _no_hdf5_reads(monkeypatch)
    with StoreReader(bad) as s:
        lay = s.layer("net.0")
        assert np.array_equal(
            lay.read(0, 32, ("keys",))["keys"], StoreReader(store).layer("net.0").read(0, 32, ("keys",))["keys"]
        )
        assert calls == []  # the chunks before it are fine
        raw = lay._chunk_readers["keys"]
        assert raw.read(0, 64) is None  # our own check refuses the chunk ...
        with pytest.raises(StoreError, match="bad.h5"):
            lay.read(30, 50, ("keys",))  # ... and HDF5, asked again, raises
        assert len(calls) >= 1
    with DualInference(bad, device="cpu") as di, pytest.raises(StoreError):
        di.attend("net.0", torch.randn(2, D), top_k=3)


def test_the_chunk_map_follows_writes_to_the_file(store, tmp_path, monkeypatch) -> None:
    """A checksum cannot tell an intact chunk from the wrong one: the map is taken again after any write to
    the file, and a read during which the file is written is done again by HDF5."""
    path = str(tmp_path / "w.h5")
    shutil.copyfile(store, path)
    calls = _no_hdf5_reads(monkeypatch)
    with StoreReader(path) as s, h5py.File(store, "r", swmr=True, locking=False) as f:
        lay = s.layer("net.2")
        ref = f["layers/net.2/keys"][0:48]
        assert np.array_equal(lay.read(0, 48, ("keys",))["keys"], ref)
        raw = lay._chunk_readers["keys"]
        assert raw.maps_taken == 1
        lay.read(0, 48, ("keys",))
        assert raw.maps_taken == 1 and calls == []
        with open(path, "ab") as fh:  # bytes past HDF5's end of file: harmless to it, but a write
            fh.write(b"\0" * 8)
        assert np.array_equal(lay.read(0, 48, ("keys",))["keys"], ref)
        assert raw.maps_taken == 2 and calls == []
        original = os.preadv

        def writing_meanwhile(fd, buffers, offset):
            os.utime(path)  # another process writes while the chunks are read
            return original(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", writing_meanwhile)
        assert np.array_equal(lay.read(0, 48, ("keys",))["keys"], ref)
        assert len(calls) == 1  # the raw read was discarded and HDF5 read the rows


def test_compressed_stores_read_through_hdf5(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "lzf.h5")
    _fit(path, compression="lzf")
    calls = _no_hdf5_reads(monkeypatch)
    with StoreReader(path) as s, h5py.File(path, "r", swmr=True, locking=False) as f:
        lay = s.layer("net.0")
        got = lay.read(3, 150, ("keys", "values"))
        assert lay._chunk_readers == {"keys": None, "values": None}
        assert np.array_equal(got["keys"], f["layers/net.0/keys"][3:150])
    assert len(calls) == 2


def test_switched_off_by_the_environment(store, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_DUALFORM_RAW_READ", "0")
    with h5py.File(store, "r", swmr=True, locking=False) as f:
        assert _raw_chunks.ChunkReader.for_dataset(f["layers/net.0/keys"]) is None
        assert _raw_chunks.ChunkReader.for_dataset(f["layers/net.0/step"]) is None  # 1-D metadata: never
    monkeypatch.delenv("LIGHTNING_DUALFORM_RAW_READ")
    with h5py.File(store, "r", swmr=True, locking=False) as f:
        assert _raw_chunks.ChunkReader.for_dataset(f["layers/net.0/keys"]) is not None
