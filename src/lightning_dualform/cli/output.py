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
from typing import Any, Callable, Sequence

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


#: what ``--json`` writes to: a ``.json`` file, or a device or pipe (``/dev/stdout``) under any name
JSON_SUFFIXES = (".json",)


class Inputs:
    """The files a command reads, which no output may replace under any spelling (another relative path, a
    symbolic link, a hard link): the STORE, the side files the library keeps beside it (its writer lock and
    write-session journal), a DDP shard index's shard files and theirs, and input files such as ``--queries``.

    Args:
        store: the STORE argument (None: a command without one).
        files: ``(path, what)`` of other inputs (a None path is left out), ``what`` naming it in messages.
    """

    def __init__(self, store: str | None = None, files: Sequence[tuple[str | None, str]] = ()) -> None:
        self.store = store
        self.files = [(p, what) for p, what in files if p is not None]

    def named_by(self, path: str) -> tuple[str, str] | None:
        """``(file, what)`` of the input that ``path`` names, or None."""
        real = os.path.realpath(path)
        try:
            st: os.stat_result | None = os.stat(path)
        except OSError:
            st = None
        for p, what in self._files(shards=st is not None):  # (a new file cannot be a shard that exists)
            if os.path.realpath(p) == real:
                return p, what
            if st is not None:
                try:
                    if os.path.samestat(os.stat(p), st):
                        return p, what
                except OSError:
                    pass
        return None

    def _files(self, shards: bool) -> list[tuple[str, str]]:
        out = []
        if self.store is not None:
            out += _with_side_files(self.store, "the STORE")
            if shards:
                out += [f for i, shard in enumerate(_shards(self.store))
                        for f in _with_side_files(shard, f"shard {i} of the STORE (a DDP shard index)")]
        return out + self.files


def _with_side_files(store: str, what: str) -> list[tuple[str, str]]:
    from lightning_dualform.store import side_files  # (the names the store gives them)

    return [(store, what)] + [(side, f"the {kind} of {what}") for side, kind in side_files(store)]


def _shards(store: str) -> list[str]:
    from lightning_dualform.errors import StoreError
    from lightning_dualform.store.shards import read_shard_index

    try:
        return read_shard_index(store) or []
    except (StoreError, OSError):  # a damaged index: opening the store says so
        return []


def check_output(path: str | None, option: str, suffixes: tuple[str, ...] | None = None,
                 keep: Inputs | None = None) -> None:
    """Fail before any long work when an output cannot be written, or would replace one of the command's inputs
    (``keep``). A ``--json`` output (``suffixes`` :data:`JSON_SUFFIXES`) may also be a device or pipe under any
    name (``/dev/stdout``)."""
    if path is None:
        return
    clash = keep.named_by(path) if keep is not None else None
    if clash is not None:
        file, what = clash
        same = "" if os.path.normpath(file) == os.path.normpath(path) else f" ({file})"
        raise UsageError(f"{option} {path}: is {what}{same}, which the output would replace; choose another path.")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a file name.")
    stream = suffixes == JSON_SUFFIXES and os.path.exists(path) and not os.path.isfile(path)
    if suffixes is not None and not stream and os.path.splitext(path)[1].lower() not in suffixes:
        if suffixes == JSON_SUFFIXES:
            raise UsageError(f"{option} {path}: not a .json file name; name the output FILE.json (or a device such as "
                             "/dev/stdout).")
        raise UsageError(f"{option} {path}: unsupported file type; use one of {', '.join(suffixes)}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        above = folder
        while not os.path.lexists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if os.path.lexists(above) and not os.path.isdir(above):
            raise UsageError(f"{option} {path}: {above} is a file, not a folder; choose another path.")
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
    leaves a truncated file; a symbolic link there is replaced, never written through; the file has the
    permissions any new file gets from the umask, or those of the file it replaces); a device or pipe
    (``/dev/stdout``, ``/dev/full``) is opened at once, without waiting for a reader, and sent a newline (JSON
    allows it), which is where a full device says so. Several outputs of one command are written together by
    :func:`write_together`.

    Args:
        path: the file (None: no output; every method then does nothing).
        option: the option that names it, for messages.
        suffixes: the file types allowed (:func:`check_output`).
        keep: the command's inputs, which the output may not replace (:class:`Inputs`).
    """

    def __init__(self, path: str | None, option: str, suffixes: tuple[str, ...] | None = None,
                 keep: Inputs | None = None) -> None:
        self.path, self.option = path, option
        self._tmp: str | None = None
        self._fd: int | None = None
        self._data: bytes | None = None
        if path is None:
            return
        check_output(path, option, suffixes, keep)
        try:
            if not os.path.exists(path) or os.path.isfile(path):
                self._tmp = _temporary_beside(path)
            else:
                self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(self._fd, True)
                os.write(self._fd, b"\n")
        except OSError as err:
            self.discard()
            if err.errno == errno.ENXIO:  # (opened without waiting for a reader)
                raise UsageError(f"{option} {path}: is a pipe (FIFO) that nothing reads; start its reader first, or "
                                 "choose another path.") from None
            raise UsageError(f"{option} {path}: cannot be written ({err.strerror or err}); choose another path.") from None

    def write_text(self, text: str) -> None:
        write_together((self, text))

    def write_with(self, draw: Callable[[str], Any]) -> None:
        """``draw(path)`` writes the file (a plot)."""
        write_together((self, draw))

    def _stage(self, content: str | Callable[[str], Any]) -> None:
        """Write the output where it is not seen yet: under its temporary name, or (a device) into memory."""
        if self.path is None:
            return
        if isinstance(content, str):
            data = content.encode()
            if self._tmp is not None:
                with open(self._tmp, "wb") as fh:
                    fh.write(data)
            self._data = data
        elif self._tmp is not None:
            content(self._tmp)
        else:  # a device: draw into a temporary file, then keep its bytes
            fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(self.path)[1])
            os.close(fd)
            try:
                content(tmp)
                with open(tmp, "rb") as fh:
                    self._data = fh.read()
            finally:
                os.remove(tmp)

    def _commit(self) -> None:
        if self.path is None:
            return
        if self._tmp is not None:
            os.replace(self._tmp, self.path)
            self._tmp = None
        elif self._fd is not None and self._data is not None:
            view = memoryview(self._data)
            while view:
                view = view[os.write(self._fd, view):]

    def discard(self) -> None:
        if self._tmp is not None and os.path.exists(self._tmp):
            os.remove(self._tmp)
        self._tmp = None
        self._data = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_together(*outputs: tuple[Output, str | Callable[[str], Any]]) -> None:
    """Write each output (text, or ``draw(path)``) under its temporary name, then rename them all into place: a
    failure while writing any of them leaves none written (a command's outputs are whole, or not there)."""
    try:
        for out, content in outputs:
            out._stage(content)
        for out, _ in outputs:
            out._commit()
    finally:
        for out, _ in outputs:
            out.discard()


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
    """Text table; numbers right-aligned, text left-aligned (a blank cell is either)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else format_number(c) for c in r] for r in rows]
    numeric = [all(not isinstance(r[j], str) or r[j] == "" or _NUMBER.fullmatch(r[j]) for r in rows) if rows else False
               for j in range(len(headers))]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    lines = []
    for i, r in enumerate(cells):
        lines.append(indent + "  ".join(c.rjust(w) if numeric[j] else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)
