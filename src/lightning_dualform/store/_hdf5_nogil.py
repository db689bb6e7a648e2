"""The two bulk HDF5 calls of the library, made without holding the GIL.

h5py holds the GIL through every HDF5 call. The store's bulk I/O runs on helper threads (the writer
during training, the prefetcher during attention) while another thread runs torch, which needs the
GIL between ops; an h5py read or write of megabytes stalls it for milliseconds. Where the HDF5 library
h5py loaded can be found in the process (Linux: ``/proc/self/maps``), ``H5Dwrite_chunk`` and ``H5Dread``
are called through ``ctypes``, which releases the GIL, while holding h5py's own lock, which keeps HDF5
calls serialised exactly as h5py does. Everything else (dataspaces, types, ids) is h5py's.

h5py's lock only orders h5py's own calls. Another package linked to the *same* HDF5 (a conda
environment's shared libhdf5 used by h5py and PyTables) relies on the GIL alone, so the ctypes path is
taken only for the copy h5py ships privately (its wheels' ``h5py.libs``/``.dylibs``) or for an HDF5
built thread-safe; and only for the instance that sees h5py's objects (netCDF4 and PyTables wheels ship
copies of their own). Elsewhere, or with ``LIGHTNING_DUALFORM_CTYPES_HDF5=0``, the calls go through h5py.
"""

from __future__ import annotations

import _ctypes
import ctypes
import logging
import os
import threading
from typing import Literal, Protocol

import h5py
import numpy as np

from lightning_dualform._compat import h5py_lock

# h5py's global lock (private, see _compat.py): without it there is no safe way to call HDF5 beside h5py
phil = h5py_lock()

log = logging.getLogger(__name__)
_lock = threading.Lock()
_lib: ctypes.CDLL | None | Literal[False] = False  # False: not looked up yet


def _declare(lib: ctypes.CDLL) -> bool:
    names = ("H5Dwrite_chunk", "H5Dread", "H5Dget_space", "H5Sget_simple_extent_npoints", "H5Sclose")
    if not all(hasattr(lib, n) for n in names):
        return False
    i64, p = ctypes.c_int64, ctypes.c_void_p
    # herr_t H5Dwrite_chunk(hid_t dset, hid_t dxpl, uint32_t filters, const hsize_t* offset, size_t size,
    #                       const void* buf)
    lib.H5Dwrite_chunk.argtypes = [i64, i64, ctypes.c_uint32, p, ctypes.c_size_t, p]
    lib.H5Dwrite_chunk.restype = ctypes.c_int
    # herr_t H5Dread(hid_t dset, hid_t mem_type, hid_t mem_space, hid_t file_space, hid_t dxpl, void* buf)
    lib.H5Dread.argtypes = [i64, i64, i64, i64, i64, p]
    lib.H5Dread.restype = ctypes.c_int
    lib.H5Dget_space.argtypes, lib.H5Dget_space.restype = [i64], i64
    lib.H5Sget_simple_extent_npoints.argtypes, lib.H5Sget_simple_extent_npoints.restype = [i64], ctypes.c_int64
    lib.H5Sclose.argtypes, lib.H5Sclose.restype = [i64], ctypes.c_int
    return True


class _SpaceCalls(Protocol):
    """The HDF5 calls :func:`_is_h5pys` makes: a ``ctypes.CDLL`` of HDF5, or a test's stand-in."""

    def H5Dget_space(self, dset_id: int) -> int: ...
    def H5Sget_simple_extent_npoints(self, space_id: int) -> int: ...
    def H5Sclose(self, space_id: int) -> int: ...


def _is_h5pys(lib: _SpaceCalls) -> bool:
    """Whether ``lib`` is the HDF5 instance h5py uses: it must see an h5py dataset of a size chosen here.

    Another copy of HDF5 in the process (netCDF4 and PyTables ship their own) has its own id tables, so
    it rejects h5py's ids or sees another object under the same number.
    """
    n = 1 + int.from_bytes(os.urandom(3), "little")
    try:
        with phil:
            f = h5py.File(f"dualform-probe-{n}", "w", driver="core", backing_store=False)
            try:
                ds = f.create_dataset("probe", shape=(n,), dtype="u1")
                space = lib.H5Dget_space(ds.id.id)
                if space < 0:
                    return False
                try:
                    return int(lib.H5Sget_simple_extent_npoints(space)) == n
                finally:
                    lib.H5Sclose(space)
            finally:
                f.close()
    except Exception:  # anything odd: not the library to call
        return False


def _private_or_threadsafe(path: str, lib: ctypes.CDLL) -> bool:
    """Only h5py calls this copy (it ships inside h5py's wheel), or HDF5 serialises its callers itself."""
    pkg = os.path.dirname(os.path.abspath(h5py.__file__))
    if os.path.dirname(os.path.realpath(path)) in {
        os.path.realpath(d) for d in (pkg, pkg + ".libs", os.path.join(pkg, ".dylibs"))
    }:
        return True
    if hasattr(lib, "H5is_library_threadsafe"):
        flag = ctypes.c_bool(False)
        fn = lib.H5is_library_threadsafe  # herr_t H5is_library_threadsafe(hbool_t* is_ts)
        if isinstance(fn, _ctypes.CFuncPtr):  # (ctypes._CFuncPtr, by the name _ctypes exports)
            fn.argtypes, fn.restype = [ctypes.POINTER(ctypes.c_bool)], ctypes.c_int
        return fn(ctypes.byref(flag)) >= 0 and bool(flag.value)
    return False


def _find_h5pys() -> tuple[str, ctypes.CDLL] | None:
    """The HDF5 library h5py uses (the same instance: ids are per library), from the process's mappings."""
    if phil is None:
        return None
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libhdf5" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if not (name.startswith("libhdf5") and not name.startswith("libhdf5_") and ".so" in name):
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if _declare(lib) and _is_h5pys(lib):
            return path, lib
    return None


def _loaded_hdf5() -> ctypes.CDLL | None:
    found = _find_h5pys()
    if found is None:
        return None
    path, lib = found
    return lib if _private_or_threadsafe(path, lib) else None


_any_lib: ctypes.CDLL | None | Literal[False] = False


def h5pys_library() -> ctypes.CDLL | None:
    """h5py's own HDF5 instance through ctypes, whoever else shares it: only for calls made under h5py's
    lock (property lists), never for the GIL-free bulk calls (see :func:`library`)."""
    global _any_lib
    if _any_lib is False:
        with _lock:
            if _any_lib is False:
                found = _find_h5pys() if os.environ.get("LIGHTNING_DUALFORM_CTYPES_HDF5", "1") != "0" else None
                _any_lib = found[1] if found is not None else None
    return _any_lib or None


def library() -> ctypes.CDLL | None:
    """The HDF5 library through ctypes, or ``None`` (then h5py's calls are used)."""
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                found = _loaded_hdf5() if os.environ.get("LIGHTNING_DUALFORM_CTYPES_HDF5", "1") != "0" else None
                if found is None:
                    log.info("HDF5 library not reachable through ctypes: bulk I/O goes through h5py (holding the GIL)")
                _lib = found
    return _lib or None


def write_chunk(ds: h5py.Dataset, offset: np.ndarray, data: np.ndarray, release_gil: bool = True) -> None:
    """``H5Dwrite_chunk`` of ``data`` (the chunk's bytes as stored, checksum included) at ``offset``
    (a uint64 array: the chunk's first index in each dimension); ``release_gil=False``: through h5py's
    public ``write_direct_chunk``, which holds the GIL."""
    lib = library() if release_gil else None
    if lib is None:
        ds.id.write_direct_chunk(tuple(int(x) for x in offset), data)
        return
    with phil:  # no other thread enters HDF5 meanwhile; the GIL is free
        status = lib.H5Dwrite_chunk(ds.id.id, 0, 0, offset.ctypes.data, data.nbytes, data.ctypes.data)
    if status < 0:  # once more through h5py, which raises with HDF5's own reason (disk full, permissions ...)
        ds.id.write_direct_chunk(tuple(int(x) for x in offset), data)


def read_rows(ds: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """``ds[start:stop]`` of a 2-D dataset, read by ``H5Dread`` (filters such as checksums applied by HDF5)."""
    lib = library()
    if lib is None or ds.ndim != 2:
        return ds[start:stop]
    start, stop = max(0, int(start)), min(int(stop), ds.shape[0])
    width = ds.shape[1]
    out = np.empty((max(0, stop - start), width), dtype=ds.dtype)
    if out.size == 0:
        return out
    with phil:
        file_space = ds.id.get_space()
        file_space.select_hyperslab((start, 0), out.shape)
        mem_space = h5py.h5s.create_simple(out.shape)
        mem_type = h5py.h5t.py_create(out.dtype)
        status = lib.H5Dread(ds.id.id, mem_type.id, mem_space.id, file_space.id, 0, out.ctypes.data)
    if status < 0:  # once more through h5py, which raises with HDF5's own reason (e.g. a checksum)
        return ds[start:stop]
    return out
