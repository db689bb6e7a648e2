"""Reading whole-row chunks of keys and values straight from the file, on several threads, with HDF5's
Fletcher-32 checksum of every chunk verified here.

``H5Dread`` of a block reads its chunks one after another, each with one ``pread`` into HDF5's own
buffer, sums it with HDF5's scalar Fletcher-32 loop (about 1.5 GB/s) and copies it out, all on one
thread. For a dataset whose only filter is Fletcher-32 and whose chunks span whole rows (a store's keys
and values when uncompressed), the bytes on disk are the rows followed by four checksum bytes, so a
reader that knows where each chunk lies (HDF5's chunk index, through h5py's public
``DatasetID.chunk_iter``/``get_chunk_info``) can ``preadv`` each chunk straight into the result, its
checksum into a four-byte slot, and verify it with the vectorised loop of :mod:`._fletcher`, with several
chunks in flight on several threads (``os.preadv`` and the ``ctypes`` checksum release the GIL).

Every guarantee of HDF5's path is kept: each chunk's checksum is verified before its rows are used; a
chunk that is missing, of another size than rows plus checksum, with a filter skipped (``filter_mask``),
or whose checksum disagrees makes :func:`read_rows` hand the whole read to ``H5Dread``, which raises on a
damaged chunk (the reader turns that into :class:`~lightning_dualform.errors.StoreError`). A checksum
cannot tell an intact chunk from the wrong one, so the chunk map is tied to the file as it was when it
was taken (size, modification and change time, by ``fstat``): a file written since gets a new map, and a
read during which the file was written is done again by ``H5Dread``. Compressed datasets,
files with a user block, platforms without ``os.preadv`` and ``LIGHTNING_DUALFORM_RAW_READ=0`` use
``H5Dread``.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h5py
import numpy as np

from lightning_dualform.store import _fletcher

log = logging.getLogger(__name__)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def enabled() -> bool:
    """False when ``LIGHTNING_DUALFORM_RAW_READ=0`` (or no ``os.preadv`` / compiled checksum)."""
    if os.environ.get("LIGHTNING_DUALFORM_RAW_READ", "1").lower() in ("0", "false", "no", "off"):
        return False
    return hasattr(os, "preadv") and _fletcher.library() is not None


def default_threads() -> int:
    """Reader threads per read: 8, whatever the cores (most of a cold read is waiting for the disk, and
    more reads in flight keep it busy; ``docs/benchmarks.md``); ``LIGHTNING_DUALFORM_READ_THREADS`` overrides."""
    env = os.environ.get("LIGHTNING_DUALFORM_READ_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return 8


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dualform-read")
        return _pool


class ChunkReader:
    """Rows of one 2-D dataset read chunk by chunk from the file (see the module's docstring).

    Use :meth:`for_dataset`, which returns ``None`` for datasets this reader does not handle.
    """

    def __init__(self, ds: h5py.Dataset) -> None:
        self.name = ds.name
        self.path = ds.file.filename
        self.chunk_rows = int(ds.chunks[0])
        self.width = int(ds.shape[1])
        self.dtype = ds.dtype
        self.row_bytes = self.width * ds.dtype.itemsize
        self.data_bytes = self.chunk_rows * self.row_bytes
        self._ds = ds
        self._fd: int | None = None
        self._offsets = np.zeros(0, dtype=np.int64)  # file offset of each chunk (by its first row); -1 none
        self._map_stamp: tuple[int, int, int] | None = None  # the file as it was when the map was taken
        self.maps_taken = 0
        self._lock = threading.Lock()

    @classmethod
    def for_dataset(cls, ds: h5py.Dataset) -> "ChunkReader | None":
        """A reader for ``ds`` when its chunks are whole rows checksummed by Fletcher-32 alone, in a plain
        file; else ``None``."""
        if not enabled() or ds.ndim != 2 or ds.chunks is None or ds.chunks[1] != ds.shape[1]:
            return None
        f = ds.file
        if f.driver != "sec2" or f.userblock_size != 0 or not os.path.isfile(f.filename):
            return None
        if ds.dtype.itemsize * ds.shape[1] % 2:
            return None
        plist = ds.id.get_create_plist()
        if plist.get_nfilters() != 1 or plist.get_filter(0)[0] != h5py.h5z.FILTER_FLETCHER32:
            return None
        return cls(ds)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- where the chunks are --------------------------------------------------------------------------
    @staticmethod
    def _stamp(fd: int) -> tuple[int, int, int]:
        st = os.fstat(fd)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _map(self, n_chunks: int) -> np.ndarray:
        """File offsets of chunks ``0..n_chunks-1`` (-1 where a chunk cannot be read raw), taken from
        HDF5's chunk index; taken again when more chunks are asked for than it knows, or when the file
        was written since (its size, modification or change time differ)."""
        with self._lock:
            fd = self._fd
            if fd is None:
                fd = self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if hasattr(os, "posix_fadvise"):
                    # The layers' chunks interleave in the file (each step appends every layer's rows), so the
                    # kernel's read-ahead past a chunk reads other layers' rows: off for this descriptor
                    # (a cold read of net.4 of the benchmark store: 0.54 -> 0.86 GB/s; docs/benchmarks.md).
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            stamp = self._stamp(fd)
            if len(self._offsets) >= n_chunks and stamp == self._map_stamp:
                return self._offsets
            expected = self.data_bytes + 4
            found: list[tuple[int, int]] = []

            def visit(info: Any) -> None:
                ok = info.filter_mask == 0 and info.size == expected and info.byte_offset is not None
                found.append((int(info.chunk_offset[0]) // self.chunk_rows, int(info.byte_offset) if ok else -1))

            try:
                self._ds.id.chunk_iter(visit)
            except (AttributeError, NotImplementedError, RuntimeError):  # HDF5 < 1.14 has no H5Dchunk_iter
                found.clear()
                for i in range(self._ds.id.get_num_chunks()):
                    visit(self._ds.id.get_chunk_info(i))
            size = max([n_chunks] + [c + 1 for c, _ in found])
            offsets = np.full(size, -1, dtype=np.int64)
            for c, off in found:
                offsets[c] = off
            self._offsets = offsets
            self._map_stamp = stamp
            self.maps_taken += 1
            return offsets

    def forget(self) -> None:
        """Drop the chunk map (chunks moved): the next read takes it again."""
        with self._lock:
            self._offsets = np.zeros(0, dtype=np.int64)

    # -- reading ---------------------------------------------------------------------------------------
    def read(
        self, start: int, stop: int, threads: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray | None:
        """Rows ``start:stop``, every chunk's checksum verified; ``None`` when any chunk cannot be read this
        way or its checksum disagrees (then read through HDF5, which is right or raises)."""
        n = stop - start
        if out is None:
            out = np.empty((max(n, 0), self.width), dtype=self.dtype)
        if n <= 0:
            return out
        c0, c1 = start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1
        offsets = self._map(c1)
        if (offsets[c0:c1] < 0).any():
            return None
        stamp = self._map_stamp
        flat = out.reshape(-1).view(np.uint8)
        fd = self._fd
        if fd is None:  # closed meanwhile: HDF5 reads the rows (or says the file is closed)
            return None
        # one job per chunk: (offset, where its rows go in `flat`, None for a whole chunk or the partial
        # chunk's (first row, rows))
        jobs: list[tuple[int, int, tuple[int, int] | None]] = []
        for c in range(c0, c1):
            r0, r1 = c * self.chunk_rows, (c + 1) * self.chunk_rows
            a, b = max(r0, start), min(r1, stop)
            if a == r0 and b == r1:
                jobs.append((int(offsets[c]), (a - start) * self.row_bytes, None))
            else:
                jobs.append((int(offsets[c]), (a - start) * self.row_bytes, (a - r0, b - a)))
        threads = max(1, min(threads or default_threads(), len(jobs)))
        per = -(-len(jobs) // threads)
        parts = [jobs[i : i + per] for i in range(0, len(jobs), per)]
        if len(parts) == 1:
            ok = self._run(fd, flat, parts[0])
        else:
            ok = all(f.result() for f in [_executor().submit(self._run, fd, flat, p) for p in parts])
        # written meanwhile: a chunk may have moved under the map (checksums cannot tell a chunk that is
        # intact but another one): HDF5 reads it again
        return out if ok and self._stamp(fd) == stamp else None

    def _run(self, fd: int, flat: np.ndarray, jobs: list[tuple[int, int, tuple[int, int] | None]]) -> bool:
        lib = _fletcher.library()
        if lib is None:  # (enabled() found it when the reader was made) nothing to verify with: HDF5 reads the rows
            return False
        csum = bytearray(4)
        scratch = None
        for offset, dest, partial in jobs:
            if partial is None:
                view = flat[dest : dest + self.data_bytes]
            else:
                if scratch is None:
                    scratch = np.empty(self.data_bytes, dtype=np.uint8)
                view = scratch
            got = os.preadv(fd, [view.data, csum], offset)
            if got != self.data_bytes + 4:
                return False
            if lib.fletcher32(view.ctypes.data, self.data_bytes) != struct.unpack("<I", csum)[0]:
                return False
            if partial is not None:
                first, rows = partial
                flat[dest : dest + rows * self.row_bytes] = view[
                    first * self.row_bytes : (first + rows) * self.row_bytes
                ]
        return True


def read_rows(reader: ChunkReader | None, ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """``ds[start:stop]`` of a 2-D dataset: chunks read raw and checksummed here when ``reader`` can,
    else (or when any chunk disagrees) through ``H5Dread``, which raises on a damaged chunk."""
    from lightning_dualform.store import _hdf5_nogil

    start, stop = max(0, int(start)), min(int(stop), ds.shape[0])
    if stop <= start and ds.ndim == 2:
        return np.empty((0, ds.shape[1]), dtype=ds.dtype)
    if reader is not None:
        try:
            out = reader.read(start, stop)
        except OSError as err:  # the file went away or shrank: HDF5 says what is wrong
            log.debug("raw read of %s failed (%s); reading through HDF5", reader.name, err)
            out = None
        if out is not None:
            return out
        reader.forget()
    return _hdf5_nogil.read_rows(ds, start, stop)
