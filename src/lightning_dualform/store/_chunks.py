"""Appending rows to a chunked HDF5 dataset one whole chunk at a time, checksummed here.

Through h5py, every append goes through HDF5's filter pipeline: the data is copied into a chunk buffer,
copied again to make room for the Fletcher-32 checksum, and summed by HDF5's scalar loop. For a store's
keys and values (the bulk of its bytes) that was most of the writer thread's CPU. A
:class:`ChunkAppender` copies arriving rows into a chunk-sized buffer and sums them in the same pass
(:mod:`._fletcher`), and hands each full chunk (and, at a commit, the partial last one) to
``H5Dwrite_chunk``. The file is byte-for-byte what HDF5's own pipeline would write; HDF5 verifies
every chunk's checksum when reading.

Only datasets whose single filter is Fletcher-32 qualify (compressed stores go through h5py).

The chunk write itself releases the GIL (:mod:`._hdf5_nogil`).
"""

from __future__ import annotations

import struct

import h5py
import numpy as np

from lightning_dualform.store import _fletcher, _hdf5_nogil


class ChunkAppender:
    """Buffers the last, partial chunk of a dataset ``(rows, *shape)`` chunked ``(chunk_rows, *shape)``.

    Nothing else may resize or write the dataset while an appender owns it. ``rows`` counts the rows
    appended; :meth:`flush` makes them all part of the dataset (the partial chunk is written with zeros
    past its last row, as HDF5 itself would).
    """

    def __init__(self, ds: h5py.Dataset) -> None:
        self.ds = ds
        #: write chunks without holding the GIL (see :attr:`StoreWriter.release_gil`)
        self.release_gil = True
        self.chunk_rows, self._shape = ds.chunks[0], tuple(ds.shape[1:])
        self._row_bytes = int(np.prod(self._shape, dtype=np.int64)) * ds.dtype.itemsize
        self._bytes = self.chunk_rows * self._row_bytes
        self._raw = np.zeros(self._bytes + 4, dtype=np.uint8)  # the chunk, then its checksum
        self._rows = self._raw[: self._bytes].view(ds.dtype).reshape(self.chunk_rows, *self._shape)
        self._sum = _fletcher.RunningFletcher32()
        self._offset = np.zeros(ds.ndim, dtype=np.uint64)  # the chunk's first index, for H5Dwrite_chunk
        self._extent = int(ds.shape[0])
        self._fill = self._extent % self.chunk_rows
        self._start = self._extent - self._fill  # the dataset row where the buffered chunk begins
        if self._fill:  # a store continued after a commit or resume: pick up its partial last chunk
            self._rows[: self._fill] = ds[self._start : self._extent]
            self._sum.update(self._rows[: self._fill])

    @classmethod
    def for_dataset(cls, ds: h5py.Dataset | None) -> "ChunkAppender | None":
        """An appender for ``ds`` when :meth:`usable`, else ``None`` (then h5py appends)."""
        return cls(ds) if ds is not None and cls.usable(ds) else None

    @staticmethod
    def usable(ds: h5py.Dataset) -> bool:
        """A dataset chunked by whole rows whose only filter is Fletcher-32, and a compiled checksum."""
        if (
            ds.ndim < 2
            or ds.chunks is None
            or tuple(ds.chunks[1:]) != tuple(ds.shape[1:])
            or _fletcher.library() is None
        ):
            return False
        if ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)) % 2:  # whole 16-bit words per row
            return False
        plist = ds.id.get_create_plist()
        return plist.get_nfilters() == 1 and plist.get_filter(0)[0] == h5py.h5z.FILTER_FLETCHER32

    @property
    def rows(self) -> int:
        return self._start + self._fill

    def append(self, rows: np.ndarray) -> None:
        """Copy ``rows`` (the dataset's dtype and row shape) into the chunk buffer, writing every chunk that fills."""
        if rows.dtype != self.ds.dtype or tuple(rows.shape[1:]) != self._shape:
            raise ValueError(
                f"rows {rows.dtype}{rows.shape} do not fit {self.ds.name} ({self.ds.dtype}, rows of shape "
                f"{self._shape})"
            )
        rows = np.ascontiguousarray(rows)
        i, n = 0, len(rows)
        while i < n:
            take = min(self.chunk_rows - self._fill, n - i)
            self._sum.copy(self._rows[self._fill : self._fill + take], rows[i : i + take])
            self._fill += take
            i += take
            if self._fill == self.chunk_rows:
                self._write()
                self._start += self.chunk_rows
                self._fill = 0
                self._sum.reset()

    def flush(self) -> None:
        """Write the partial last chunk, so that the dataset holds every row appended."""
        if self._fill:
            self._rows[self._fill :] = 0
            self._write()

    def _write(self) -> None:
        end = self._start + self._fill
        if self._extent < end:
            self.ds.id.set_extent((end, *self._shape))
            self._extent = end
        checksum = self._sum.finish(zero_bytes=(self.chunk_rows - self._fill) * self._row_bytes)
        struct.pack_into("<I", self._raw.data, self._bytes, checksum)
        self._offset[0] = self._start
        _hdf5_nogil.write_chunk(self.ds, self._offset, self._raw, self.release_gil)
