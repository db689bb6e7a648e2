"""Disk blocks reserved past the end of the store, so that HDF5 never meets a full disk in mid-write.

HDF5 does not survive a failed write: when the disk fills during a flush it has already written part of
its metadata (an index pointing at a chunk whose bytes never reached the disk, a superblock whose end of
allocation is past the end of the file), the file is then beyond repair, and closing it at interpreter
exit can crash the process (measured: SIGSEGV, and "address of object past end of allocation" afterwards).
SWMR's ordered flushes do not help: they order writes, they cannot undo one that failed.

So the writer asks the file system for the space *before* HDF5 writes: :meth:`SpaceReserve.ensure`
allocates blocks past the end of the file with ``fallocate(FALLOC_FL_KEEP_SIZE)`` (the file's size does
not change, so HDF5 sees nothing), enough for the bytes about to be written plus a slack for metadata.
Writes into reserved blocks cannot fail for lack of space, even when another process fills the disk.
When the reservation itself fails, nothing has been written: the writer stops there with a clean error
and the store keeps every committed step. Where ``fallocate`` is not supported the free space is checked
instead (``statvfs``), which another process can still race.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_KEEP_SIZE = 0x01
_PUNCH_HOLE = 0x02
#: reserved on top of each request: HDF5's metadata (chunk indexes, object headers, the superblock) and
#: its 2 KiB allocation blocks
SLACK = 1 << 20
#: largest reservation made ahead of need
WINDOW = 64 << 20

_libc: ctypes.CDLL | None | bool = False


def _fallocate():
    global _libc
    if _libc is False:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            fn = lib.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _libc = lib
        except (OSError, AttributeError):  # not Linux
            _libc = None
    return None if _libc is None else _libc.fallocate


class DiskFullError(OSError):
    """The disk cannot hold what the store is about to write (raised before anything is written)."""

    def __init__(self, path: str, need: int, detail: str = "") -> None:
        super().__init__(
            errno.ENOSPC,
            f"No space left on device for {path}: the next {need / 1e6:.1f} MB could not be reserved{detail}; "
            "nothing was written, and the store keeps every committed step",
        )


class SpaceReserve:
    """Keeps at least ``ensure(n)`` bytes reserved past the current end of ``path``.

    Args:
        path: the store file (opened here a second time: the blocks belong to the file, not to a handle).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR)
        self._reserved_to = 0  # file offset up to which blocks are reserved
        self._mode = "fallocate" if _fallocate() is not None else "statvfs"

    def ensure(self, nbytes: int) -> None:
        """Make sure the next ``nbytes`` bytes (plus :data:`SLACK`) can be written past the end of the file.

        Raises:
            DiskFullError: they cannot (nothing has been written).
        """
        if self._fd is None:
            return
        size = os.fstat(self._fd).st_size
        need_to = size + int(nbytes) + SLACK
        if need_to <= self._reserved_to:
            return
        # reserve ahead (an eighth of the file, at most WINDOW), so that most calls end above
        target = need_to + min(WINDOW, max(size // 8, int(nbytes)))
        if self._mode == "fallocate":
            for end in (target, need_to):  # ahead if the disk allows, else just what is needed
                if self._reserve(size, end - size):
                    self._reserved_to = end
                    return
                if self._mode != "fallocate":
                    break
            if self._mode == "fallocate":
                raise DiskFullError(self.path, need_to - size)
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        if free < need_to - size:
            raise DiskFullError(self.path, need_to - size, f" ({free / 1e6:.1f} MB free)")

    def _reserve(self, offset: int, length: int) -> bool:
        fn = _fallocate()
        if fn(self._fd, _KEEP_SIZE, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):  # this file system cannot: check instead
            self._mode = "statvfs"
        elif err != errno.ENOSPC:
            raise OSError(err, f"{self.path}: reserving disk space failed: {os.strerror(err)}")
        return False

    def release(self) -> None:
        """Give back the blocks reserved past the end of the file (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            if self._mode == "fallocate" and self._reserved_to > size:
                _fallocate()(fd, _PUNCH_HOLE | _KEEP_SIZE, size, self._reserved_to - size)
        finally:
            os.close(fd)


def reserve_fd(fd: int, path: str, nbytes: int) -> None:
    """Reserve ``nbytes`` past the end of the open file ``fd`` (best effort where ``fallocate`` is missing).

    Raises:
        DiskFullError: the disk cannot hold them.
    """
    fn = _fallocate()
    if fn is None:
        return
    size = os.fstat(fd).st_size
    if fn(fd, _KEEP_SIZE, size, int(nbytes)) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSPC:
            raise DiskFullError(path, int(nbytes))
