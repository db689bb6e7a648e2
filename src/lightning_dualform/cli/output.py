"""What the ``lightning-dualform`` command writes: output files opened before the work (:class:`Output`),
JSON text, text tables, and notes on stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import stat
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

from lightning_dualform.cli.inputs import UsageError

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?%?")


def note(args: argparse.Namespace, message: str) -> None:
    """A note on stderr, unless ``--quiet``."""
    if not args.quiet:
        print(message, file=sys.stderr)


def progress(args: argparse.Namespace) -> bool:
    """Whether to show progress bars: not under ``--quiet``, and only on a terminal."""
    return not args.quiet and sys.stderr.isatty()


def check_output(path: str | None, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Fail before any long work when an output cannot be written."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a file name.")
    if suffixes is not None and os.path.splitext(path)[1].lower() not in suffixes:
        raise UsageError(f"{option} {path}: unsupported file type; use one of {', '.join(suffixes)}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first.")
    exists = os.path.exists(path)
    if (exists and not os.access(path, os.W_OK)) or (not exists and not os.access(folder, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable; choose another path.")


def _temporary_beside(path: str) -> str:
    """Create an empty file under a new name beside ``path`` for it to be renamed into ``path``; returns the name.

    Its permissions are those the user's umask gives any new file (``0o666 & ~umask``: the kernel applies it),
    or, when ``path`` is a regular file already, that file's own: the output reads as a file written in place
    would, unlike ``tempfile.mkstemp``'s 0600.
    """
    folder = os.path.dirname(os.path.abspath(path))
    root, ext = os.path.splitext(os.path.basename(path))
    try:
        st = os.stat(path)
        mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
    except OSError:
        mode = None
    for _ in range(100):
        tmp = os.path.join(folder, f".{root}-{os.urandom(4).hex()}{ext}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


class Output:
    """An output opened before the computation, so that an unwritable path fails first; written at the end.

    A regular file is written under a temporary name beside it and renamed into place (a failed run never
    leaves a truncated file; the file has the permissions any new file gets from the umask, or those of the
    file it replaces); a device or pipe (``/dev/stdout``, ``/dev/full``) is opened at once and sent a newline
    (JSON allows it), which is where a full device says so.
    """

    def __init__(self, path: str | None, option: str, suffixes: tuple[str, ...] | None = None) -> None:
        self.path, self.option = path, option
        self._tmp: str | None = None
        self._fd: int | None = None
        if path is None:
            return
        check_output(path, option, suffixes)
        try:
            if not os.path.exists(path) or os.path.isfile(path):
                self._tmp = _temporary_beside(path)
            else:
                self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(self._fd, True)
                os.write(self._fd, b"\n")
        except OSError as err:
            self.discard()
            raise UsageError(f"{option} {path}: cannot be written ({err.strerror or err}); choose another path.") from None

    def write_text(self, text: str) -> None:
        self._finish(lambda target: open(target, "w").write(text), text.encode())

    def write_with(self, draw: Any) -> None:
        """``draw(path)`` writes the file (a plot)."""
        self._finish(draw, None)

    def _finish(self, write: Any, data: bytes | None) -> None:
        if self.path is None:
            return
        try:
            if self._tmp is not None:
                write(self._tmp)
                os.replace(self._tmp, self.path)
                self._tmp = None
            else:
                if data is None:  # a device: draw into a temporary file, then copy it out
                    ext = os.path.splitext(self.path)[1]
                    fd, tmp = tempfile.mkstemp(suffix=ext)
                    os.close(fd)
                    try:
                        write(tmp)
                        data = open(tmp, "rb").read()
                    finally:
                        os.remove(tmp)
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
        finally:
            self.discard()

    def discard(self) -> None:
        if self._tmp is not None and os.path.exists(self._tmp):
            os.remove(self._tmp)
        self._tmp = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def json_text(data: Any) -> str:
    """``data`` as indented JSON (numpy scalars and arrays as numbers and lists), ending in a newline."""
    return json.dumps(data, indent=1, default=_json_default) + "\n"


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def human_bytes(n: float) -> str:
    """A size in decimal units: ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_number(v: Any) -> str:
    """A table cell: floats as ``%g``, lists as tuples."""
    if isinstance(v, list):
        return "(" + ", ".join(format_number(x) for x in v) + ")"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else format_number(c) for c in r] for r in rows]
    numeric = [all(not isinstance(r[j], str) or _NUMBER.fullmatch(r[j]) for r in rows) if rows else False
               for j in range(len(headers))]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    lines = []
    for i, r in enumerate(cells):
        lines.append(indent + "  ".join(c.rjust(w) if numeric[j] else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)
