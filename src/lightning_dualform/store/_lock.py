"""One writer per store: an advisory lock on ``<store>.lock``, held for as long as a process writes the store.

HDF5 has no concurrent writers, and two trainings pointed at one path would otherwise both pass an
"exists?" check and write the same file. Every writing phase of the store (creation, training, the
resume's truncation, finalisation, the certificate, query recording) holds this lock; a second writer is
refused at once with :class:`~lightning_dualform.errors.StoreBusyError`. Readers never take it: they only
ask whether a writer is alive (:func:`writer_active`), to tell "being written" from "damaged" and to know
when repairing what a killed writer left behind is safe.

The lock is ``flock`` on a separate small file (``run.h5.lock``), because the store file itself is
replaced (creation renames a finished skeleton into place) while the lock must stay. The kernel drops
the lock when its holder dies, so a killed writer never leaves a stale lock, only a stale file that the
next writer reuses. A holder unlinks the file when it releases the lock; an acquirer checks that the file
it locked is still the one at the path (the usual unlink-safe lock-file protocol). The file holds the
holder's pid and phase, for messages. Where ``fcntl`` is missing (Windows) locking is a no-op.

The same path spelled differently (``run.h5``, ``./run.h5``, an absolute path, a symlink to the store, a path
through a symlinked folder) names the same lock file: it is named after the store's resolved path.

The lock file is a side file (:mod:`._sidefile`): opened without following a symlink and without blocking,
and refused unless it is a regular file with no other name, so that locking never writes into, truncates or
blocks on anything but the lock file itself.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import time

from lightning_dualform.errors import StoreBusyError, StoreError
from lightning_dualform.store._sidefile import kind, open_regular, side_path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".lock"
#: how long an acquirer retries before it refuses: a reader's probe of the lock holds it for microseconds
ACQUIRE_RETRY_S = 1.0
#: a lock file holds one line ("pid 12 on host: phase"); a longer file at its name is not one the library wrote
MAX_LOCK_BYTES = 4096
_WHAT = "writer lock"


def lock_path(path: str | os.PathLike) -> str:
    return side_path(path, LOCK_SUFFIX)


def _check_store(path: str) -> None:
    """The lock is made beside the store's resolved path: only for a regular file, or for nothing yet (a symlink
    to a device must not get a lock file beside the device, nor a dangling one beside where it points)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise StoreError(f"{path}: is a symbolic link to nothing ({os.readlink(path)}); a store is written to a "
                             "regular file. Remove the link or point it at a store.") from None
        return
    except OSError:
        return  # (the caller's own open says what is wrong)
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{path}: is {kind(st.st_mode)}, not a store file; a store is written to a regular file only.")


def _open(lp: str, flags: int) -> int:
    """The lock file, opened as a side file; a file too long to be a lock is refused (a writer truncates it)."""
    fd = open_regular(lp, flags, _WHAT, writes=bool(flags & (os.O_RDWR | os.O_WRONLY)))
    size = os.fstat(fd).st_size
    if size > MAX_LOCK_BYTES:
        os.close(fd)
        raise StoreError(
            f"{lp}: holds {size} bytes, so it is not the {_WHAT} that lightning-dualform keeps beside the store "
            f"(one line of at most {MAX_LOCK_BYTES} bytes), and writing it would destroy it. Move it away, then retry."
        )
    return fd


class WriterLock:
    """An exclusive lock on a store path; release it with :meth:`release` (or use it as a context manager)."""

    def __init__(self, path: str, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: str | os.PathLike, phase: str, wait: float = ACQUIRE_RETRY_S) -> "WriterLock":
        """Lock ``path`` for writing, or raise.

        Args:
            path: the store file (the lock file is ``path + ".lock"``; the store need not exist).
            phase: what the holder does ("training", "finalisation", ...): shown to refused writers and readers.
            wait: seconds to retry while the lock is held (a reader checking the lock holds it briefly).

        Raises:
            StoreBusyError: another process (or another writer in this process) holds the lock.
            StoreError: something else than a regular lock file is at the lock's name (:mod:`._sidefile`).
            PermissionError: the lock file cannot be created or opened for writing here.
        """
        path = os.fspath(path)
        if fcntl is None:  # pragma: no cover
            return cls(path, None)
        _check_store(path)
        lp = lock_path(path)
        deadline = time.monotonic() + wait
        while True:
            try:
                fd = _open(lp, os.O_RDWR | os.O_CREAT)
            except PermissionError as err:
                raise PermissionError(
                    err.errno or errno.EACCES,
                    f"{lp}: cannot create or open the store's {_WHAT} ({err.strerror or err}); writing a store needs "
                    "permission to create files in its folder",
                ) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise StoreBusyError(
                        f"{path}: another writer holds this store ({_holder(lp)}). Two writers on one file would "
                        "corrupt it: wait for that one to finish, or record into another path."
                    ) from None
                time.sleep(0.02)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(lp))
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder unlinked it after we opened it: lock the new one
                os.close(fd)
                continue
            lock = cls(path, fd)
            lock.set_phase(phase)
            return lock

    def set_phase(self, phase: str) -> None:
        """Say what the holder is doing now (read by :func:`writer_active`)."""
        if self._fd is None:
            return
        text = f"pid {os.getpid()} on {socket.gethostname()}: {phase}\n".encode()
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text, 0)
        except OSError:  # a full disk: the text only informs; the lock itself holds
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock (idempotent). The lock file is removed first, so no one locks a file that is going away."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.path.samestat(os.fstat(fd), os.lstat(lock_path(self.path))):
                os.unlink(lock_path(self.path))
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def writer_active(path: str | os.PathLike, *, other_process: bool = True) -> str | None:
    """What the live writer of ``path`` is doing (``"pid 123 on host: finalisation"``), or None when no
    process holds its lock. Never blocks and never holds the lock for longer than the check.

    Args:
        other_process: ignore a writer in this very process (its HDF5 calls and ours are serialised by
            h5py, so what this process reads is never half written by it).

    Raises:
        StoreError: something else than a regular lock file is at the lock's name (:mod:`._sidefile`).
    """
    if fcntl is None:  # pragma: no cover
        return None
    lp = lock_path(path)
    try:
        fd = open_regular(lp, os.O_RDONLY, _WHAT)
    except OSError:  # none (no writer ever, or it finished), or unreadable here: no writer we can see
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _read(fd) or "another process"
            if other_process and text.startswith(f"pid {os.getpid()} on {socket.gethostname()}:"):
                return None
            return text
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _holder(lp: str) -> str:
    try:
        fd = open_regular(lp, os.O_RDONLY, _WHAT)
    except (OSError, StoreError):
        return "another process"
    try:
        return _read(fd) or "another process"
    finally:
        os.close(fd)
