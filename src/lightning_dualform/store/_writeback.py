"""Starting the store's write-back to disk while training goes on, so that the finish waits for little.

The writer appends rows into the page cache; nothing forces them to disk until the finish's ``fsync``
(the point from which a finished store survives a power cut). A machine with memory to spare holds all of
a run's rows dirty until then (Linux writes back on its own only past ``dirty_background_ratio`` of memory,
or after 30 s), and the finish then waits while the whole store goes to disk: 1.1 s of a 7.8 s recorded
fit of 818 MB (``docs/benchmarks.md``, "The finish's fsync").

Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts the write-back of the dirty pages it is given and
returns without waiting for it; the disk then writes while training computes, and the finish's ``fsync``
waits only for the last few megabytes. It changes nothing a kill or a power cut could find: which pages
reach the disk before the ``fsync`` was never promised, and the write sessions' undo journal
(:mod:`._journal`) does not depend on it (it runs after training, and ``fsync``\\ s its records itself).

Called through ``ctypes``, which releases the GIL. Where the call does not exist (not Linux, no glibc) it
is a no-op: the finish's ``fsync`` then does all the work, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import Literal

log = logging.getLogger(__name__)

#: start a write-back once this many bytes were appended since the last one
WRITEBACK_EVERY = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages not already under write-out

_call: ctypes._CFuncPtr | None | Literal[False] = False  # type: ignore[name-defined]  # False: not looked up yet


def _sync_file_range() -> "ctypes._CFuncPtr | None":  # type: ignore[name-defined]
    global _call
    if _call is False:
        _call = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _call = fn
            except (OSError, AttributeError):  # pragma: no cover - a libc without it
                _call = None
    return _call


def start_writeback(fd: int) -> bool:
    """Start writing back every dirty page of the open file ``fd``; True when the call was made and succeeded."""
    fn = _sync_file_range()
    if fn is None:
        return False
    if fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:  # (0, 0: the whole file)
        log.debug("sync_file_range on fd %d failed: errno %d", fd, ctypes.get_errno())
        return False
    return True


class Writeback:
    """Counts the bytes appended to one open file and starts its write-back every :data:`WRITEBACK_EVERY`.

    Args:
        fd: the file's descriptor (``None``: a driver without one; every call is then a no-op).
    """

    def __init__(self, fd: int | None, every: int | None = None) -> None:
        self.fd = fd
        self.every = WRITEBACK_EVERY if every is None else int(every)
        self._since = 0
        #: write-backs started (for tests and benchmarks)
        self.started = 0

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` more were appended: start a write-back once enough have gathered."""
        if self.fd is None:
            return
        self._since += int(nbytes)
        if self._since >= self.every:
            self._since = 0
            if start_writeback(self.fd):
                self.started += 1
            elif _sync_file_range() is None:
                self.fd = None  # (nothing to call on this platform: stop counting)
