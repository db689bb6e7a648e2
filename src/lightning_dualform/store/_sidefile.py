"""The files the library keeps beside a store (``run.h5.lock``, ``run.h5.journal``), opened so that nothing
the library writes, truncates or reads without bound lies outside the store's own regular files.

A side file's name is chosen by the library, so whatever else sits at that name (a symbolic link to another
file, a FIFO, a device, a socket, a directory, a second name of another file) is not the library's, and
opening it as ours would write into it, truncate it, or block on it for ever (a FIFO with no writer blocks
``open`` and every read; a lock symlinked to another file got that file truncated). So a side file is:

* checked with ``lstat`` before it is opened (a device is never opened: opening some devices has effects);
* opened with ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` (the check and the open race; the open never follows a
  link, never waits on a FIFO, never takes a terminal), then ``fstat``-checked to be a regular file (and,
  for a file the library writes, to have no other name), and only then set back to blocking;
* refused otherwise, with a :class:`~lightning_dualform.errors.StoreError` that names it and says what to do.

The side files are named after the store's resolved path (:func:`side_path`), so that every spelling of one
store (``run.h5``, ``./run.h5``, a symlink to it, a path through a symlinked folder) shares one lock and one
journal.
"""

from __future__ import annotations

import errno
import os
import stat

from lightning_dualform.errors import StoreError

_FLAGS = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
          | getattr(os, "O_CLOEXEC", 0))


def side_path(store: str | os.PathLike, suffix: str) -> str:
    """The side file ``suffix`` (``".lock"``, ``".journal"``) of ``store``, named after its resolved path."""
    return os.path.realpath(os.fspath(store)) + suffix


def kind(mode: int) -> str:
    """What a file of mode ``mode`` is, for messages: "a directory", "a FIFO (named pipe)", ..."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def refusal(path: str, what: str, mode: int | None, detail: str = "") -> StoreError:
    """The error for something at ``path`` (the store's ``what``) that is not a regular file of ours."""
    found = kind(mode) if mode is not None else detail
    return StoreError(
        f"{path}: is {found}, not the {what} that lightning-dualform keeps beside the store (it only ever makes "
        "a regular file there), so it was not opened. Remove or rename it, then retry."
    )


def check(path: str, what: str) -> os.stat_result | None:
    """``lstat`` of the side file ``path``: None when there is none; :class:`StoreError` unless it is a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StoreError(f"{path}: the store's {what} cannot be examined ({err.strerror or err}).") from err
    if not stat.S_ISREG(st.st_mode):
        raise refusal(path, what, st.st_mode)
    return st


def open_regular(path: str, flags: int, what: str, *, mode: int = 0o644, writes: bool = False) -> int:
    """Open the side file ``path`` as :mod:`this module <._sidefile>` says; returns a blocking file descriptor.

    Args:
        flags: ``os.O_RDONLY``, ``os.O_RDWR | os.O_CREAT``, ...
        what: the side file's role in messages ("writer lock", "write-session journal").
        writes: the library will write or truncate it: a file with other names (hard links) is refused too.

    Raises:
        StoreError: it is not a regular file (or has other names, with ``writes``).
        FileNotFoundError, FileExistsError, PermissionError: as ``os.open`` (no such file without ``O_CREAT``,
            an existing one with ``O_EXCL``, no permission): the caller decides what they mean.
    """
    check(path, what)
    try:
        fd = os.open(path, flags | _FLAGS, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise refusal(path, what, stat.S_IFLNK) from None
        if err.errno == errno.EISDIR:
            raise refusal(path, what, stat.S_IFDIR) from None
        if err.errno in (errno.ENXIO, errno.EOPNOTSUPP, errno.ENODEV):  # a socket, a FIFO without reader, a device
            raise refusal(path, what, None, "not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refusal(path, what, st.st_mode)
        if writes and st.st_nlink > 1:
            raise StoreError(
                f"{path}: the store's {what} has {st.st_nlink - 1} other name(s) (hard links), so writing it would "
                "change another file; lightning-dualform never makes one. Remove it, then retry."
            )
        if _FLAGS & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
