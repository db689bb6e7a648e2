"""Reading whole-row chunks straight from a memory map of the store, checksummed here.

Through h5py (or ``H5Dread``), HDF5 reads each chunk into its own buffer, verifies its Fletcher-32 with
a scalar loop, and copies the rows out: two copies and a slow pass per byte, on a thread that competes
with the matrix products for the CPU. For datasets that :class:`~.chunk_append.ChunkAppender` can write
(chunked by whole rows, Fletcher-32 their only filter), :class:`ChunkReader` looks each chunk up in
HDF5's chunk index (``H5Dget_chunk_info_by_coord``), then copies its rows from a read-only memory map
of the file into the result while summing them (one pass, vectorised, without the GIL), and compares
the sum with the checksum stored after the chunk. A chunk whose location, size or checksum is wrong
raises ``OSError`` (turned into ``StoreError`` by the reader); nothing unverified is returned.
"""

from __future__ import annotations

import mmap
import os
import struct

import h5py
import numpy as np

from lightning_dualform import _fletcher
from lightning_dualform.chunk_append import ChunkAppender


class MappedFile:
    """A read-only map of a file, re-made larger when the file has grown (a store still recording)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh = open(path, "rb")
        self._map: mmap.mmap | None = None
        self._view: np.ndarray | None = None

    def bytes(self, offset: int, size: int) -> np.ndarray:
        """``size`` bytes at ``offset`` as a uint8 view of the map; ``OSError`` past the end of the file."""
        end = offset + size
        if self._view is None or end > len(self._view):
            length = os.fstat(self._fh.fileno()).st_size
            if offset < 0 or end > length:
                raise OSError(f"{self.path}: a chunk at bytes {offset}..{end} lies past the end of the file ({length} bytes)")
            self.close_map()
            self._map = mmap.mmap(self._fh.fileno(), length, access=mmap.ACCESS_READ)
            if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                self._map.madvise(mmap.MADV_SEQUENTIAL)
            self._view = np.frombuffer(self._map, dtype=np.uint8)
        return self._view[offset:end]

    def close_map(self) -> None:
        self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view: the map goes when it does
                pass
            self._map = None

    def close(self) -> None:
        self.close_map()
        self._fh.close()


class ChunkReader:
    """Rows of one dataset that :meth:`usable` accepts, read through a :class:`MappedFile`."""

    def __init__(self, ds: h5py.Dataset, mapped: MappedFile) -> None:
        self.ds = ds
        self.mapped = mapped
        self.chunk_rows = ds.chunks[0]
        self._shape = tuple(ds.shape[1:])
        self._row_bytes = int(np.prod(self._shape, dtype=np.int64)) * ds.dtype.itemsize
        self._chunk_bytes = self.chunk_rows * self._row_bytes

    @staticmethod
    def usable(ds: h5py.Dataset) -> bool:
        return ChunkAppender.usable(ds) and ds.dtype.byteorder in ("<", "=", "|") and np.little_endian

    def read(self, start: int, stop: int) -> np.ndarray:
        """``ds[start:stop]`` (clipped to the dataset), every chunk touched verified in full."""
        stop = min(int(stop), self.ds.shape[0])
        start = max(0, min(int(start), stop))
        out = np.empty((stop - start, *self._shape), dtype=self.ds.dtype)
        flat = out.reshape(-1).view(np.uint8)
        run = _fletcher.RunningFletcher32()
        rb, c = self._row_bytes, self.chunk_rows
        row = start
        while row < stop:
            first = row - row % c  # the chunk's first row
            a, b = row - first, min(stop - first, c)  # rows of this chunk wanted
            info = self.ds.id.get_chunk_info_by_coord((first, *([0] * len(self._shape))))
            if info.byte_offset is None or info.size != self._chunk_bytes + 4 or info.filter_mask != 0:
                raise OSError(
                    f"{self.ds.name}: the chunk at row {first} is missing or not a checksummed chunk of "
                    f"{self._chunk_bytes} bytes (size {info.size}, filter mask {info.filter_mask})"
                )
            raw = self.mapped.bytes(int(info.byte_offset), self._chunk_bytes + 4)
            run.reset()
            if a:
                run.update(raw[: a * rb])
            dst = flat[(row - start) * rb : (first + b - start) * rb]
            run.copy(dst, raw[a * rb : b * rb])
            if b < c:
                run.update(raw[b * rb : c * rb])
            stored = struct.unpack_from("<I", raw, self._chunk_bytes)[0]
            if run.finish() != stored:
                raise OSError(f"{self.ds.name}: the checksum of the chunk at row {first} does not match; the file is damaged")
            row = first + b
        return out
