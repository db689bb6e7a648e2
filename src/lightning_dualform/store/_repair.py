"""What a reader does before it opens a store: refuse what is not a file, wait for a writer that is
rewriting it, and repair what a killed writer left behind when that is safe.

Two things can be left behind by a killed process, and both are repaired only when no live process
holds the store's writer lock (:mod:`._lock`), because only then is it certain that nobody is writing:

* a write-session journal (``run.h5.journal``, :mod:`._journal`): rolled back, which restores the store
  byte for byte as it was before the interrupted finalisation, certificate, query recording or resume;
* the 'open for writing' flags HDF5 keeps in the superblock (a killed SWMR writer leaves them, and HDF5
  then refuses to open the file for writing, and, for a non-SWMR writer, for reading too): cleared.

Each repair is reported with a warning naming the file and what was done. A reader without write
permission cannot repair: a journal is then an error that says what to run; flags are read around
(SWMR readers accept them).
"""

from __future__ import annotations

import logging
import os
import stat
import time
import warnings

from lightning_dualform.errors import StoreBusyError, StoreError
from lightning_dualform.store import _journal, _lock
from lightning_dualform.store._h5open import superblock_flags
from lightning_dualform.store._superblock import clear_swmr_flags

log = logging.getLogger(__name__)

#: seconds a reader waits for a live writer's write session (finalisation, certificate) to end
BUSY_WAIT_S = 10.0


def check_regular_file(path: str) -> None:
    """Raise :class:`StoreError` unless ``path`` is a regular file (a FIFO would block every read forever)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise StoreError(f"{path}: no such file. Pass the path of a store written by DualFormCallback.") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot be read ({err.strerror or err}).") from err
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: is a directory, not a store file.")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: is not a regular file (a pipe, socket or device); a store is an HDF5 file on disk.")


def busy(path: str) -> str | None:
    """What a live writer in another process is doing with ``path``, or None."""
    return _lock.writer_active(path)


def busy_error(path: str, doing: str) -> StoreBusyError:
    return StoreBusyError(
        f"{path}: busy: another process is writing it ({doing}); what was read may be half written. Retry in a moment."
    )


def prepare_for_read(path: str, busy_wait: float = BUSY_WAIT_S) -> list[str]:
    """Make ``path`` safe to open for reading; returns what was repaired (also warned).

    Raises:
        StoreError: not a regular file, or an interrupted session that cannot be rolled back here.
        StoreBusyError: a live writer is rewriting the file and did not finish within ``busy_wait`` s.
    """
    check_regular_file(path)
    notes: list[str] = []
    deadline = time.monotonic() + busy_wait
    while os.path.exists(_journal.journal_path(path)):
        doing = _lock.writer_active(path, other_process=False)  # a session of this very process ends too
        if doing is None:
            note = _roll_back(path)
            if note:
                notes.append(note)
                continue
            doing = "a process that took the store over"  # someone else locked it first: wait for them
        if time.monotonic() >= deadline:
            raise busy_error(path, doing)
        time.sleep(0.05)
    if superblock_flags(path) and _lock.writer_active(path, other_process=False) is None and os.access(path, os.W_OK):
        try:
            with _lock.WriterLock.acquire(path, "clearing stale flags", wait=0.2):
                if superblock_flags(path) and not os.path.exists(_journal.journal_path(path)):
                    clear_swmr_flags(path)
                    notes.append(f"{path}: cleared the 'open for writing' flags that a killed writer left in its superblock")
        except StoreBusyError:
            pass  # a writer started meanwhile: its flags are real
    for note in notes:
        warnings.warn(f"lightning-dualform: {note}.", RuntimeWarning, stacklevel=3)
        log.warning(note)
    return notes


def _roll_back(path: str) -> str | None:
    if not os.access(path, os.W_OK):
        raise StoreError(
            f"{path}: a process was killed while it wrote this store ({_journal.read_phase(path) or 'a write session'}) "
            f"and left {_journal.journal_path(path)}; it must be rolled back before the store can be read. Open it "
            "once with write permission (e.g. `lightning-dualform info` as its owner)."
        )
    try:
        lock = _lock.WriterLock.acquire(path, "rolling back an interrupted write", wait=0.2)
    except StoreBusyError:
        return None  # someone else took over: the caller's loop waits for it
    with lock:
        phase = _journal.rollback(path)
    if phase is None:
        return None
    return f"{path}: rolled back an interrupted {phase} left by a killed process; the store is as it was before it"


def recover_for_write(path: str) -> list[str]:
    """Called by a writer holding the lock: roll back a journal and clear stale flags (say so)."""
    notes = []
    phase = _journal.rollback(path)
    if phase is not None:
        notes.append(f"{path}: rolled back an interrupted {phase} left by a killed process")
    if superblock_flags(path):
        clear_swmr_flags(path)
        notes.append(f"{path}: cleared the 'open for writing' flags that a killed writer left in its superblock")
    for note in notes:
        warnings.warn(f"lightning-dualform: {note}.", RuntimeWarning, stacklevel=3)
        log.warning(note)
    return notes
