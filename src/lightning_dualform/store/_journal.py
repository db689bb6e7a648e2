"""Write sessions that a kill or a full disk cannot leave half done: HDF5 through an undo journal.

HDF5 guarantees nothing about a file whose writer dies outside SWMR mode: it updates object headers,
B-trees, heaps and the superblock in place, in an order of its own, and a kill in the middle leaves
pointers to blocks never written (measured: "file is already open for write", then "address of object
past end of allocation" once the flags are cleared). SWMR mode only allows appending to existing
datasets. The phases after training (finalisation, the certificate, query recording) and a resume's
truncation create, delete and resize objects, so they run here instead: HDF5 reads and writes the file
through :class:`_UndoFile` (h5py's documented file-object driver), which, before the first write to any
byte that existed when the session began, appends that byte's original value to ``<store>.journal`` and
``fsync``\\ s it. Bytes past the original end need no copy: undoing them is a truncation.

* The session commits when HDF5 has closed the file and the file is ``fsync``\\ ed: the journal is then
  deleted (the commit point).
* A failure inside the session (an exception, a full disk) rolls back at once: every saved byte is
  written back and the file is truncated to its original length.
* A kill leaves the journal behind; :func:`recover` (called by every reader and writer before it opens
  the store) rolls back the same way. A journal record torn by the kill fails its CRC and is ignored: its
  bytes were never overwritten, because a record is durable before the write it protects is made.

After a rollback the file is byte for byte what it was before the session. The guarantee rests on the
journal, not on HDF5's internals; it costs one ``fsync`` per batch of first writes to old bytes (HDF5
flushes its metadata cache in a few batches), and the journal holds only the old blocks that changed
(kilobytes of metadata), never a copy of the store.

A journal is applied only to the store it was written for: its header records the store's identity and
its records are bounded (:mod:`._journal_format`); :mod:`._rollback` checks both before it changes a byte,
and sets aside a journal that does not belong. The journal is a side file (:mod:`._sidefile`): created with
``O_EXCL`` (never through a symlink), so the session writes nothing but the store and its own journal.
"""

from __future__ import annotations

import errno
import io
import os
import stat

import h5py

from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5, _journal_format as fmt
from lightning_dualform.store._sidefile import open_regular, side_path
from lightning_dualform.store._space import DiskFullError, SpaceReserve, reserve_fd

#: bytes reserved for a session's journal up front (plus 1/256 of the store)
JOURNAL_RESERVE = 1 << 20

JOURNAL_SUFFIX = ".journal"
WHAT = "write-session journal"


def journal_path(path: str | os.PathLike) -> str:
    """``<store>.journal``, named after the store's resolved path (every spelling of a store shares it)."""
    return side_path(path, JOURNAL_SUFFIX)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def open_store(path: str) -> int:
    """The store itself, for reading and writing (a symlink the user named is followed: its target is the store);
    :class:`StoreError` unless it is a regular file."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path}: is not a regular file; a store is an HDF5 file on disk.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Saved:
    """Sorted, merged ``[start, end)`` ranges whose original bytes are in the journal."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def missing(self, a: int, b: int) -> list[tuple[int, int]]:
        out, pos = [], a
        for s, e in self.ranges:
            if e <= pos:
                continue
            if s >= b:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
            if pos >= b:
                break
        if pos < b:
            out.append((pos, b))
        return out

    def add(self, a: int, b: int) -> None:
        merged, placed = [], False
        for s, e in self.ranges:
            if e < a or s > b:
                if s > b and not placed:
                    merged.append((a, b))
                    placed = True
                merged.append((s, e))
            else:
                a, b = min(a, s), max(b, e)
        if not placed:
            merged.append((a, b))
        self.ranges = sorted(merged)


class _UndoFile(io.RawIOBase):
    """The store as h5py's ``fileobj`` driver sees it: every first overwrite of an original byte is journaled."""

    def __init__(self, path: str, phase: str) -> None:
        super().__init__()
        self.path = path
        self.phase = phase
        self._fd = open_store(path)
        st = os.fstat(self._fd)
        self.size0 = st.st_size
        self._jpath = journal_path(path)
        try:
            self._jfd = open_regular(self._jpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, WHAT, writes=True)
        except FileExistsError:
            os.close(self._fd)
            raise StoreError(f"{path}: an unfinished write session left {self._jpath}; open the store to roll it back "
                             "first.") from None
        except BaseException:
            os.close(self._fd)
            raise
        self._pos = 0
        self._saved = _Saved()
        self.failed: BaseException | None = None
        self.space: SpaceReserve | None = None
        try:
            # room for the journal itself (the old bytes HDF5 overwrites: its metadata) and for HDF5's
            # metadata writes, taken before HDF5 writes anything (see _space.py: HDF5 must never meet a full disk)
            self.space = SpaceReserve(path)
            self.space.ensure(0)
            reserve_fd(self._jfd, self._jpath, JOURNAL_RESERVE + self.size0 // 256)
            self.nonce = fmt.new_nonce()
            digest = fmt.sample_digest(lambda o, n: os.pread(self._fd, n, o), self.size0)
            header, self._chain = fmt.pack_header(st.st_dev, st.st_ino, self.size0, self.nonce, digest, phase)
            _write_all(self._jfd, header)
            os.fsync(self._jfd)
            fsync_dir(self._jpath)  # the journal exists on disk before the store changes
        except OSError as err:
            self._close_fds()
            self._release_space()
            _remove(self._jpath)
            if err.errno == errno.ENOSPC and not isinstance(err, DiskFullError):
                raise DiskFullError(path, JOURNAL_RESERVE, " for its write-session journal") from err
            raise
        except BaseException:
            self._close_fds()
            self._release_space()
            _remove(self._jpath)
            raise

    # -- the file object API h5py uses -------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = offset
        elif whence == 1:
            self._pos += offset
        else:
            self._pos = (os.fstat(self._fd).st_size if self._fd is not None else self.size0) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        if self._fd is None:  # after the rollback: HDF5 is only closing
            view[:] = b"\0" * len(view)
            self._pos += len(view)
            return len(view)
        n = 0
        while n < len(view):
            got = os.preadv(self._fd, [view[n:]], self._pos + n)
            if got == 0:
                break
            n += got
        self._pos += n
        return n

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.failed is not None:
            # The session is being rolled back, so what HDF5 writes now is void; accepting it lets HDF5
            # finish closing the file. Refusing it leaves the file open inside HDF5, which then flushes it
            # again at interpreter exit, through this object, during shutdown (measured: a crash).
            return len(view)
        a, b = self._pos, self._pos + len(view)
        try:
            if a < self.size0:
                self._save(a, min(b, self.size0))
            n = 0
            while n < len(view):
                n += os.pwrite(self._fd, view[n:], a + n)
        except BaseException as err:
            self.failed = err  # nothing more reaches the file: the session will be rolled back
            raise
        self._pos = b
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.failed is not None:
            return size  # void: see write
        try:
            if size < self.size0:
                self._save(size, self.size0)
            os.ftruncate(self._fd, size)
        except BaseException as err:
            self.failed = err
            raise
        return size

    def flush(self) -> None:
        pass  # durability is the commit's fsync

    # -- journal ------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.failed is not None:
            raise OSError(f"{self.path}: this write session failed ({self.failed}); it is being rolled back")

    def _save(self, a: int, b: int) -> None:
        """Journal the original bytes of ``[a, b)`` (whole blocks around it) not journaled yet, durably."""
        a, b = fmt.blocks_around(a, b, self.size0)
        gaps = self._saved.missing(a, b)
        if not gaps:
            return
        records = []
        for s, e in gaps:
            for p in range(s, e, fmt.RECORD_MAX):
                q = min(e, p + fmt.RECORD_MAX)
                orig = os.pread(self._fd, q - p, p)
                if orig:  # (short only past the physical end: nothing to keep beyond it)
                    rec, self._chain = fmt.pack_record(p, orig, self._chain)
                    records.append(rec)
        blob = b"".join(records)
        reserve_fd(self._jfd, self._jpath, len(blob))
        _write_all(self._jfd, blob)
        os.fsync(self._jfd)  # the old bytes are durable before the new ones are written
        for s, e in gaps:
            self._saved.add(s, e)

    def commit(self) -> None:
        """Make the session's writes durable, then delete the journal (the commit point)."""
        self._check()
        os.fsync(self._fd)
        self._close_fds()
        os.unlink(self._jpath)
        fsync_dir(self._jpath)
        self._release_space()

    def _release_space(self) -> None:
        space, self.space = self.space, None
        if space is not None:
            try:
                space.release()
            except OSError:
                pass

    def abandon(self) -> None:
        """Stop all writes and roll the file back to how the session found it."""
        if self.failed is None:
            self.failed = StoreError("rolled back")
        self._close_fds()
        self._release_space()
        from lightning_dualform.store import _rollback  # (it reads what this module writes)

        _rollback.rollback_own(self.path, self.nonce)

    def _close_fds(self) -> None:
        for name in ("_fd", "_jfd"):
            fd = getattr(self, name, None)
            if fd is not None:
                setattr(self, name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass

    def close(self) -> None:
        # h5py may drop its reference late (interpreter exit): the session already committed or rolled back
        super().close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class WriteSession:
    """``path`` open for writing as one all-or-nothing session (the caller holds the writer lock).

    :attr:`file` is an ``h5py.File`` (mode ``r+``). :meth:`commit` makes every change durable at once;
    :meth:`abort` (or any failure inside :meth:`commit`) restores the file as it was. As a context manager
    it commits when the block ends normally and aborts (then re-raises) on an exception, a full disk included.
    """

    def __init__(self, path: str, phase: str, reserve: int = 0) -> None:
        self.path = path
        self._undo = _UndoFile(path, phase)
        self.phase = phase
        try:
            self.reserve(reserve)
            self.file: h5py.File | None = h5py.File(self._undo, "r+", libver=_h5.LIBVER)
        except BaseException:
            self._undo.abandon()
            raise

    @property
    def open(self) -> bool:
        return self.file is not None

    def reserve(self, nbytes: int) -> None:
        """Reserve room for the next ``nbytes`` that HDF5 will write past the end of the file (call it
        before writing them).

        Raises:
            DiskFullError: the disk cannot hold them; nothing was written (the caller aborts the session).
        """
        if self._undo.space is not None:
            self._undo.space.ensure(int(nbytes))

    def commit(self) -> None:
        if self.file is None:
            return
        try:
            f, self.file = self.file, None
            f.close()
            self._undo.commit()
        except BaseException:
            self._roll_back(None)
            raise

    def abort(self) -> None:
        """Undo every change of the session (idempotent)."""
        if self.file is None and self._undo.failed is not None:
            return
        self._roll_back(self.file)

    def _roll_back(self, f: h5py.File | None) -> None:
        self.file = None
        if self._undo.failed is None:
            self._undo.failed = StoreError("rolled back")
        if f is not None:
            try:
                f.close()  # HDF5 flushes into a file object that refuses every write now
            except Exception:
                pass
        self._undo.abandon()

    def __enter__(self) -> h5py.File:
        assert self.file is not None
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_session(path: str, phase: str, reserve: int = 0) -> WriteSession:
    """``with write_session(path, "finalisation", reserve=nbytes) as f: ...``: see :class:`WriteSession`.

    ``reserve``: bytes the session will add to the file (reserved before HDF5 opens it; a full disk then
    fails here, before anything changed)."""
    return WriteSession(path, phase, reserve)
