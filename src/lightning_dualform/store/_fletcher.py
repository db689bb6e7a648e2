"""HDF5's Fletcher-32 chunk checksum, computed here so that whole chunks can bypass HDF5's filter pipeline.

Every dataset of a store carries HDF5's ``fletcher32`` filter. Through h5py, each appended chunk is
copied into the filter pipeline and checksummed by HDF5's scalar loop (about 1.5 GB/s); the writer
instead fills a chunk-sized buffer, checksums it here (about 10 GB/s, vectorised) and hands it to
``H5Dwrite_chunk``. HDF5 verifies the checksum on every read, so a checksum that disagreed with HDF5's
would fail loudly on the first read, never silently (the tests read every directly written chunk back).

The value equals ``H5_checksum_fletcher32``: big-endian 16-bit words ``w_i``, ``s1 = sum w_i`` and
``s2 = sum of the running s1``, each reduced modulo 65535 into ``[1, 65535]`` (0 only when all bytes are
zero), ``(s2 << 16) | s1``; HDF5 stores it little-endian after the chunk's bytes.
"""

from __future__ import annotations

import ctypes

import numpy as np

from lightning_dualform import _native

# The C source is _kernels/fletcher32.c: blocks of 256 words keep each block's sums in uint32, which the
# compiler vectorises, and a running state lets a chunk be summed piece by piece as its rows arrive.


def _declare(lib: ctypes.CDLL) -> None:
    p, n = ctypes.c_void_p, ctypes.c_size_t
    lib.fletcher32.restype = ctypes.c_uint32
    lib.fletcher32.argtypes = [p, n]
    lib.fletcher32_update.restype = None
    lib.fletcher32_update.argtypes = [p, n, p]
    lib.fletcher32_copy.restype = None
    lib.fletcher32_copy.argtypes = [p, p, n, p]
    lib.fletcher32_finish.restype = ctypes.c_uint32
    lib.fletcher32_finish.argtypes = [p, ctypes.c_uint64]


def library() -> ctypes.CDLL | None:
    """The compiled checksum, or ``None`` (not built at install time, or ``LIGHTNING_DUALFORM_KERNEL=0``)."""
    return _native.load("fletcher32", _declare)


def fletcher32(buf: np.ndarray, nbytes: int | None = None) -> int:
    """HDF5's Fletcher-32 of the first ``nbytes`` bytes of a C-contiguous array (all of it by default).

    Uses the compiled loop; raises ``RuntimeError`` when it is unavailable (see :func:`library`).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the compiled Fletcher-32 checksum is not available")
    if not buf.flags.c_contiguous:
        raise ValueError("fletcher32 needs a C-contiguous array")
    n = buf.nbytes if nbytes is None else int(nbytes)
    if not 0 <= n <= buf.nbytes:
        raise ValueError(f"nbytes={n} outside the array's {buf.nbytes} bytes")
    return int(lib.fletcher32(buf.ctypes.data, n))


class RunningFletcher32:
    """HDF5's Fletcher-32 of a buffer filled piece by piece (each piece an even number of bytes).

    :meth:`copy` copies bytes into the buffer and sums them in one pass; :meth:`finish` gives the checksum
    of everything summed followed by ``zero_bytes`` zero bytes.
    """

    def __init__(self) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError("the compiled Fletcher-32 checksum is not available")
        self._lib = lib
        self._state = np.zeros(3, dtype=np.uint64)

    def reset(self) -> None:
        self._state[:] = 0

    def update(self, data: np.ndarray) -> None:
        """Sum ``data`` (C-contiguous, an even number of bytes)."""
        self._lib.fletcher32_update(_even(data).ctypes.data, data.nbytes, self._state.ctypes.data)

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[...] = src`` (same dtype and size, both C-contiguous) and sum the bytes copied."""
        if dst.dtype != src.dtype or dst.nbytes != src.nbytes or not dst.flags.c_contiguous:
            raise ValueError(
                f"copy needs C-contiguous arrays of one dtype and size, got {dst.dtype}{dst.shape} and "
                f"{src.dtype}{src.shape}"
            )
        self._lib.fletcher32_copy(dst.ctypes.data, _even(src).ctypes.data, src.nbytes, self._state.ctypes.data)

    def finish(self, zero_bytes: int = 0) -> int:
        if zero_bytes % 2:
            raise ValueError("zero_bytes must be even")
        return int(self._lib.fletcher32_finish(self._state.ctypes.data, zero_bytes // 2))


def _even(a: np.ndarray) -> np.ndarray:
    if not a.flags.c_contiguous or a.nbytes % 2:
        raise ValueError("the running checksum needs C-contiguous arrays of an even number of bytes")
    return a


def fletcher32_reference(data: bytes) -> int:
    """HDF5's own loop, transcribed (slow; for tests): 360-word blocks with end-around-carry folds."""
    words = len(data) // 2
    s1 = s2 = 0
    i = 0
    while words:
        t = min(words, 360)
        words -= t
        for _ in range(t):
            s1 += (data[i] << 8) | data[i + 1]
            i += 2
            s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    if len(data) % 2:
        s1 += data[i] << 8
        s2 += s1
        s1 = (s1 & 0xFFFF) + (s1 >> 16)
        s2 = (s2 & 0xFFFF) + (s2 >> 16)
    s1 = (s1 & 0xFFFF) + (s1 >> 16)
    s2 = (s2 & 0xFFFF) + (s2 >> 16)
    return (s2 << 16) | s1
