"""Syncing the store to disk while training goes on, so that the finish waits for little.

The writer appends rows into the page cache; nothing forces them to disk until the finish's ``fsync``
(the point from which a finished store survives a power cut). A machine with memory to spare holds a
whole run's rows dirty until then (Linux writes back on its own only past ``dirty_background_ratio`` of
memory, or after 30 s), and the finish then waits while the whole store goes to disk: 1.1 s at the end of
a 7.8 s recorded fit of 818 MB (``docs/benchmarks.md``, "The finish's fsync"). Only starting the
write-back early (``sync_file_range``) is not enough on ext4: the blocks are allocated as they are written
back, and the first ``fsync`` after that (the finish's journal, a different file) commits the allocation
of the whole store: 0.2-0.7 s, measured.

So a helper thread ``fdatasync``\\ s the store every :data:`SYNC_EVERY` bytes appended, while training
computes; it holds no lock and no GIL while it waits, and a sync still running when the next is due is not
doubled. It changes nothing a kill or a power cut could find: which pages reach the disk before the
finish's ``fsync`` was never promised, and the write sessions' undo journal (:mod:`._journal`) runs after
training and ``fsync``\\ s its own records. A failed sync (an I/O error) is not swallowed: the next append,
or the close, raises it, and the store keeps its committed steps.

After each sync the helper tells the kernel it may drop the synced pages from the page cache
(``POSIX_FADV_DONTNEED``, which never drops a dirty page: only what is already on disk). A store is written
once and read later; keeping its gigabytes cached evicts the user's own data, and on a virtual machine whose
unused memory goes back to the host (as this project's 2-core VM does) every new page cache page is a slow
first touch, while pages dropped a sync ago are reused at once: the paper MLP's recorded fit went from
1.59-1.87x to 1.47-1.56x of its baseline there, ResNet-18's from 1.83x to 1.52x (``docs/benchmarks.md``,
"Dropping the synced pages"). The cost: the first read of the store after the fit comes from the disk
(measured there: no slower first ``attend``; the raw chunk reader reads ahead).
"""

from __future__ import annotations

import os
import threading

#: sync the store once this many bytes were appended since the last sync began
SYNC_EVERY = 64 << 20

_sync = getattr(os, "fdatasync", os.fsync)  # (macOS has no fdatasync)


def _drop_cached(fd: int, start: int, end: int) -> None:
    """Let the kernel drop the clean cached pages of bytes ``[start, end)`` (where it can: Linux, the BSDs).
    Advice only: a file system that refuses it costs the store nothing, so its error is not the sync's."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None and end > start:
        try:
            advise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


class Writeback:
    """Syncs one open file from a helper thread every :data:`SYNC_EVERY` bytes appended.

    Args:
        fd: the file's descriptor (``None``: a driver without one; every call is then a no-op). The helper
            syncs a duplicate of it, so the file may be closed while a sync runs.
        every: bytes between syncs (default :data:`SYNC_EVERY`).
    """

    def __init__(self, fd: int | None, every: int | None = None) -> None:
        self.every = SYNC_EVERY if every is None else int(every)
        self._fd = os.dup(fd) if fd is not None else None
        self._since = 0
        # synced bytes before this offset were offered back to the kernel; not the file as it was (a new store's
        # skeleton: object headers HDF5 rewrites at each commit would be read back from the disk)
        self._dropped_to = os.fstat(fd).st_size if fd is not None else 0
        self._due = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = False
        self._error: OSError | None = None
        self._thread: threading.Thread | None = None
        #: syncs begun (for tests and benchmarks)
        self.syncs = 0

    def wrote(self, nbytes: int) -> None:
        """``nbytes`` more were appended: have the helper sync once enough have gathered (unless it still is)."""
        self.check()
        if self._fd is None:
            return
        self._since += int(nbytes)
        if self._since < self.every or not self._idle.is_set():
            return
        self._since = 0
        self._idle.clear()
        self.syncs += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dualform-sync", daemon=True)
            self._thread.start()
        self._due.set()

    def check(self) -> None:
        """Raise the error of a failed background sync (once)."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        """Wait for a sync in progress, end the helper and close the duplicate descriptor; raise a sync's error."""
        if self._thread is not None:
            self._closing = True
            self._due.set()
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self.check()

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if not self._idle.is_set():  # a sync is due (wrote() cleared it; only this thread sets it)
                try:
                    if self._fd is not None:  # (closed only after this thread ended)
                        end = os.fstat(self._fd).st_size  # (bytes written before the sync: on disk after it)
                        _sync(self._fd)
                        _drop_cached(self._fd, self._dropped_to, end)
                        self._dropped_to = end
                except OSError as err:
                    self._error = err
                finally:
                    self._idle.set()
            if self._closing:
                return
