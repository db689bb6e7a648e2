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

# Blocks of 256 words keep each block's sums in uint32 (256 * 255 / 2 * 65535 < 2^32), which the
# compiler vectorises; after a block, s2 += m*s1 + sum_j (m - j) w_j = m*s1 + m*a - t.
_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
uint32_t fletcher32(const uint8_t* p, size_t len) {
    size_t n = len / 2;
    uint64_t s1 = 0, s2 = 0;
    uint32_t nz = 0;
    while (n) {
        uint32_t m = n > 256 ? 256 : (uint32_t)n;
        uint32_t a = 0, t = 0, o = 0;
        for (uint32_t j = 0; j < m; j++) {
            uint32_t w = ((uint32_t)p[2 * j] << 8) | p[2 * j + 1];
            a += w; t += j * w; o |= w;
        }
        s2 = (s2 + (uint64_t)m * s1 + (uint64_t)m * a - t) % 65535;
        s1 = (s1 + a) % 65535;
        nz |= o;
        p += 2 * (size_t)m; n -= m;
    }
    if (len % 2) {
        uint32_t w = (uint32_t)p[0] << 8;
        s1 = (s1 + w) % 65535; s2 = (s2 + s1) % 65535; nz |= w;
    }
    if (!nz) return 0;
    if (s1 == 0) s1 = 65535;
    if (s2 == 0) s2 = 65535;
    return (uint32_t)((s2 << 16) | s1);
}
"""


def _declare(lib: ctypes.CDLL) -> None:
    lib.fletcher32.restype = ctypes.c_uint32
    lib.fletcher32.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def library() -> ctypes.CDLL | None:
    """The compiled checksum, or ``None`` (no compiler, or ``LIGHTNING_DUALFORM_KERNEL=0``)."""
    return _native.load("fletcher32", _SOURCE, _declare)


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
