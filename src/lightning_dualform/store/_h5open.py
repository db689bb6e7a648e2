"""Opening an HDF5 file read-only without waiting on damaged metadata.

A SWMR reader retries every metadata read whose checksum fails, because the writer may be rewriting
that block at the moment; HDF5's default is 100 attempts with a growing back-off, which makes one
damaged byte cost over a minute (measured: 1.1 s at 30 attempts, 34 s at 35, more than 100 s at 100).
A plain (non-SWMR) open fails at once. So:

* every store is opened as a SWMR reader (a store may be being written; and HDF5 refuses to open one file
  twice in a process with different SWMR flags, so the library and a user's ``h5py.File(path, "r",
  swmr=True)``, which the format documents, must agree), with :data:`SWMR_READ_ATTEMPTS` attempts (about
  20 ms in all on a damaged block: a torn read lasts microseconds, and the caller retries a busy store
  itself), set through HDF5's public ``H5Pset_metadata_read_attempts``, which h5py does not wrap, on h5py's
  own HDF5 instance (:mod:`._hdf5_nogil`); without that instance, HDF5's default (then the probe's stall
  timeout bounds a damaged file);
* a file that cannot be opened so (an HDF5 file of an older format) and that no writer has marked is
  opened plainly.

The probe's child process imports this module: keep its imports to h5py, numpy and small modules of ours.
"""

from __future__ import annotations

import ctypes
import os
import stat

import h5py

from lightning_dualform.store import _hdf5_nogil

#: metadata read attempts of a SWMR open (HDF5's default: 100)
SWMR_READ_ATTEMPTS = 24
_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def superblock_flags(path: str) -> int | None:
    """The 'file consistency flags' byte of a version 2/3 superblock at offset 0 (non-zero: open for
    writing, or left so by a killed writer); None when the file does not start with such a superblock."""
    try:  # never blocking (a FIFO put at the path after it was checked), and only a regular file's bytes
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        head = os.pread(fd, 12, 0) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(head) < 12 or head[:8] != _SIGNATURE or head[8] not in (2, 3):
        return None
    return head[11]


def swmr_read_fapl(attempts: int = SWMR_READ_ATTEMPTS) -> "h5py.h5p.PropFAID | None":
    """A file access property list for SWMR reads with ``attempts`` metadata read attempts (None when the
    setting cannot be made: then the caller uses h5py's defaults)."""
    lib = _hdf5_nogil.h5pys_library()
    fn = getattr(lib, "H5Pset_metadata_read_attempts", None) if lib is not None else None
    if fn is None:
        return None
    fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    with _hdf5_nogil.phil:
        ok = fn(fapl.id, attempts) >= 0
    return fapl if ok else None


def open_readonly(path: str, swmr: bool) -> h5py.File:
    """``h5py.File(path, "r")`` without HDF5's file locking; ``swmr``: as a SWMR reader with few read attempts."""
    if not swmr:
        return h5py.File(path, "r", locking=False)
    fapl = swmr_read_fapl()
    if fapl is None:
        return h5py.File(path, "r", swmr=True, locking=False)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def open_any(path: str) -> h5py.File:
    """Open for reading whatever state the file is in: as a SWMR reader with few metadata read attempts,
    else (an older-format file no writer marked) plainly."""
    try:
        return open_readonly(path, swmr=True)
    except OSError:
        if superblock_flags(path):
            raise
        return open_readonly(path, swmr=False)
