"""What a reader does before it opens a store: refuse what is not a file, wait for a writer that is
rewriting it, and repair what a killed writer left behind when that is safe.

Two things can be left behind by a killed process, and both are repaired only when no live process
holds the store's writer lock (:mod:`._lock`), because only then is it certain that nobody is writing:

* a write-session journal (``run.h5.journal``, :mod:`._journal`): rolled back when it belongs to this store,
  which restores the store byte for byte as it was before the interrupted finalisation, certificate, query
  recording or resume; a journal that does not belong is never applied, but renamed aside (:mod:`._rollback`);
* the 'open for writing' flags HDF5 keeps in the superblock (a killed SWMR writer leaves them, and HDF5
  then refuses to open the file for writing, and, for a non-SWMR writer, for reading too): cleared.

Each repair is reported with a warning naming the file and what was done. A reader that may not write the
store or its folder cannot repair: a journal of this store is then an error that says what to run; a
journal that does not belong is left where it is (and said so); flags are read around (SWMR readers accept
them). The side files themselves are checked first (:mod:`._sidefile`): anything at their names that is not
a regular file is an error that names it, never a hang.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import warnings

from lightning_dualform.errors import StoreBusyError, StoreError
from lightning_dualform.store import _journal, _lock, _rollback, _sidefile
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


def side_files(path: str) -> list[tuple[str, str]]:
    """``(path, what)`` of the files the library keeps beside the store at ``path``: its write-session journal and
    its writer lock (named after the store's resolved path)."""
    return [(_journal.journal_path(path), _journal.WHAT), (_lock.lock_path(path), "writer lock")]


def check_side_files(path: str) -> None:
    """:class:`StoreError` when something other than a regular file sits at the lock's or the journal's name."""
    for side, what in reversed(side_files(path)):  # (the lock first, as ever)
        _sidefile.check(side, what)


def check_replaceable(path: str) -> None:
    """Before a writer creates a store at ``path`` (replacing what is there): :class:`StoreError` unless the
    path is free or holds a regular file (a FIFO, device, socket, directory or symlink is never replaced:
    the new store would take the place of something that is not a store file), and the side files are sane."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise StoreError(
            f"{path}: is {_sidefile.kind(st.st_mode)}, not a store file; a store is only created in place of a "
            "regular file (overwrite=True replaces a store, nothing else). It was left as it is: choose another "
            "path" + (", or the link's target itself." if stat.S_ISLNK(st.st_mode) else ", or remove it first.")
        )
    if st is not None and st.st_size > 0 and not _holds_hdf5(path, st.st_size):
        raise StoreError(  # (an empty file loses nothing; an HDF5 file may be a store of an earlier run)
            f"{path}: is a file that is not HDF5, so not a store (overwrite=True replaces a store, nothing else). "
            "It was left as it is: choose another path, or remove it first if you mean to lose it."
        )
    check_side_files(path)


def _holds_hdf5(path: str, size: int) -> bool:
    """Whether the file has HDF5's signature where the format puts it: at 0, or after a user block of 512 * 2^k."""
    try:  # never blocking, and only a regular file's bytes (something else may be put there after the check)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        offset = 0
        while offset + 8 <= size:
            if os.pread(fd, 8, offset) == b"\x89HDF\r\n\x1a\n":
                return True
            offset = 512 if offset == 0 else 2 * offset
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def prepare_for_read(path: str, busy_wait: float = BUSY_WAIT_S) -> list[str]:
    """Make ``path`` safe to open for reading; returns what was repaired (also warned).

    Raises:
        StoreError: not a regular file, a side file that is not a regular file, or an interrupted session of
            this store that this process may not roll back.
        StoreBusyError: a live writer is rewriting the file and did not finish within ``busy_wait`` s.
    """
    check_regular_file(path)
    check_side_files(path)
    notes: list[str] = []
    deadline = time.monotonic() + busy_wait
    jp = _journal.journal_path(path)
    while os.path.lexists(jp):
        doing = _lock.writer_active(path, other_process=False)  # a session of this very process ends too
        if doing is None:
            note, done = _roll_back(path)
            if note:
                notes.append(note)
            if done:
                break
            if note:
                continue
            doing = "a process that took the store over"  # someone else locked it first: wait for them
        if time.monotonic() >= deadline:
            raise busy_error(path, doing)
        time.sleep(0.05)
    if superblock_flags(path) and _lock.writer_active(path, other_process=False) is None and os.access(path, os.W_OK):
        try:
            with _lock.WriterLock.acquire(path, "clearing stale flags", wait=0.2):
                if superblock_flags(path) and not os.path.lexists(jp):
                    clear_swmr_flags(path)
                    notes.append(f"{path}: cleared the 'open for writing' flags that a killed writer left in its "
                                 "superblock")
        except StoreBusyError:
            pass  # a writer started meanwhile: its flags are real
        except OSError:
            pass  # no lock here (a folder this process may not write): SWMR readers read around the flags
    for note in notes:
        warnings.warn(f"lightning-dualform: {note}.", RuntimeWarning, stacklevel=3)
        log.warning(note)
    return notes


def _may_repair(path: str) -> bool:
    """Whether this process may roll a journal back: write the store, and remove and rename in its folder."""
    folder = os.path.dirname(os.path.realpath(path)) or "."
    return os.access(path, os.W_OK) and os.access(folder, os.W_OK | os.X_OK)


def _roll_back(path: str) -> tuple[str | None, bool]:
    """Deal with the journal beside ``path`` for a reader: ``(note, done)``; ``done``: stop looking at it (a
    journal that does not belong, left in place); ``(None, False)``: another process took the lock first."""
    if not _may_repair(path):
        try:
            j = _rollback.inspect(path)
        except PermissionError as err:
            raise StoreError(
                f"{path}: {_journal.journal_path(path)} cannot be read here ({err.strerror or err}), so it is unknown "
                "whether a killed process left this store half written. Open it once as a user who may read the "
                "journal and write the store and its folder (e.g. `lightning-dualform info` as its owner)."
            ) from err
        if j is None:
            return None, True
        if j.verdict == "foreign":
            return _rollback.foreign_note(path, j, None), True
        raise StoreError(
            f"{path}: a process was killed while it wrote this store ({j.phase}) and left {j.path}; it must be "
            "rolled back before the store can be read. Open it once as a user who may write the store and its "
            "folder (e.g. `lightning-dualform info` as its owner)."
        )
    try:
        lock = _lock.WriterLock.acquire(path, "rolling back an interrupted write", wait=0.2)
    except StoreBusyError:
        return None, False  # someone else took over: the caller's loop waits for it
    with lock:
        note, cleared = _rollback.resolve(path)
    return note, not cleared


def recover_for_write(path: str) -> list[str]:
    """Called by a writer holding the lock: roll back a journal of this store, set aside one that does not
    belong, and clear stale flags (say so)."""
    notes = []
    note, cleared = _rollback.resolve(path)
    if not cleared:
        raise StoreError(f"{note}; a writer needs the journal's name free.")
    if note is not None:
        notes.append(note)
    if superblock_flags(path):
        clear_swmr_flags(path)
        notes.append(f"{path}: cleared the 'open for writing' flags that a killed writer left in its superblock")
    for note in notes:
        warnings.warn(f"lightning-dualform: {note}.", RuntimeWarning, stacklevel=3)
        log.warning(note)
    return notes


def committed_steps(path: str) -> int | None:
    """Committed steps of an existing store (0 for one that never committed), or None when ``path`` is not
    a store this process can read (then it is never replaced without ``overwrite``)."""
    from lightning_dualform.store import _h5, _probe
    from lightning_dualform.store._h5open import open_any
    from lightning_dualform.store.format import FORMAT_NAME

    try:
        check_regular_file(path)
        if _probe.probe(path) is not None or os.path.lexists(_journal.journal_path(path)):
            return None
        with open_any(path) as f:
            if _h5.attr(f.attrs.get("format", "")) != FORMAT_NAME:
                return None
            return int(f["committed_steps"][0])
    except Exception:
        return None
