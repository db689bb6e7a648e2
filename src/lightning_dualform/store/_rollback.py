"""Undoing a write session a killed process left behind, and only on the store it was written for.

:func:`inspect` reads ``<store>.journal`` (a side file: a regular file, never followed through a symlink) and
decides, changing nothing, whether it belongs to the store at the path (:mod:`._journal_format`):

* **torn**: it was torn while it was being created (empty, zeros, or the start of a header). The session
  never changed the store (its header is durable before the first write): the file is removed.
* **ours**: its header's CRC holds, the store has the inode it names, every record that verifies in the
  chain lies in whole blocks inside the original size, without overlap, the store's missing tail (if the
  session shrank it) is in the records, and the sampled blocks of the store, with the records put back,
  hash to what the header says they were. Then :func:`resolve` writes every record back, truncates the store
  to its original size, fsyncs it and deletes the journal. A record torn by the kill (short, or failing its
  CRC) ends the records: the bytes it would protect were never overwritten.
* **foreign**: anything else (another file's journal, one of an earlier format, a crafted or damaged one). It
  is never applied. :func:`resolve` renames it aside (``<store>.journal.foreign-<time>-<random>``), so no byte
  of it is lost and the store reads as it is, and returns a note saying so and what to do.

The caller holds the store's writer lock (:mod:`._lock`), so no live session is undone.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from typing import Literal

from lightning_dualform.errors import StoreError
from lightning_dualform.store import _journal_format as fmt
from lightning_dualform.store._journal import WHAT, fsync_dir, journal_path, open_store
from lightning_dualform.store._sidefile import open_regular


@dataclass
class Journal:
    """What :func:`inspect` found beside a store."""

    path: str  # the journal
    verdict: Literal["torn", "ours", "foreign"]
    reason: str = ""  # why it does not belong (foreign)
    phase: str = "a write session"
    nonce: bytes = b""
    size0: int = 0
    ino: int = -1  # the store's inode the journal names
    #: ``(store offset, length, journal offset of the bytes)`` of each verified record, in journal order
    records: list[tuple[int, int, int]] = field(default_factory=list)


def inspect(path: str) -> Journal | None:
    """The journal beside the store ``path``, judged without changing anything; None when there is none.

    Raises:
        StoreError: something that is not a regular file is at the journal's name (:mod:`._sidefile`), or the
            store is not a regular file.
        PermissionError: the journal or the store cannot be read here.
    """
    jp = journal_path(path)
    try:
        jfd = open_regular(jp, os.O_RDONLY, WHAT)
    except FileNotFoundError:
        return None
    try:
        sfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(sfd).st_mode):
                raise StoreError(f"{path}: is not a regular file; a store is an HDF5 file on disk.")
            return _judge(jp, jfd, sfd)
        finally:
            os.close(sfd)
    finally:
        os.close(jfd)


def _judge(jp: str, jfd: int, sfd: int) -> Journal:
    jsize = os.fstat(jfd).st_size
    buf = os.pread(jfd, fmt.HEADER_MAX, 0)
    if len(buf) == jsize and fmt.is_torn_start(buf):
        return Journal(jp, "torn")
    head = fmt.parse_header(buf)
    if isinstance(head, str):
        return Journal(jp, "foreign", head)
    foreign = Journal(jp, "foreign", phase=head.phase)
    st = os.fstat(sfd)
    if st.st_ino != head.ino:
        foreign.reason = f"it was written for the file with inode {head.ino}, and this store is inode {st.st_ino}"
        return foreign
    if jsize > fmt.journal_cap(head.size0):
        foreign.reason = f"it holds {jsize} bytes, more than any journal of a store of {head.size0} bytes"
        return foreign
    records, why = _records(jfd, jsize, head)
    if why:
        foreign.reason = why
        return foreign
    covered = sorted((o, o + n) for o, n, _ in records)
    if st.st_size < head.size0 and not _covers(covered, st.st_size, head.size0):
        foreign.reason = (f"the store has {st.st_size} bytes, fewer than the {head.size0} it had when the session "
                          "began, and the journal does not hold the missing ones")
        return foreign
    if _restored_digest(sfd, jfd, records, head.size0) != head.digest:
        foreign.reason = "the store's content does not match the one the journal was written for"
        return foreign
    return Journal(jp, "ours", phase=head.phase, nonce=head.nonce, size0=head.size0, ino=head.ino, records=records)


def _records(jfd: int, jsize: int, head: fmt.Header) -> tuple[list[tuple[int, int, int]], str]:
    """The records that verify in the chain, in order, and why the journal is refused ("" when it is not).
    Memory: one record at a time."""
    out: list[tuple[int, int, int]] = []
    pos, chain, total = head.length, head.crc, 0
    spans: list[tuple[int, int]] = []
    while pos + fmt.RECORD.size <= jsize:
        offset, length, crc = fmt.RECORD.unpack(os.pread(jfd, fmt.RECORD.size, pos))
        if not 0 < length <= fmt.RECORD_MAX or pos + fmt.RECORD.size + length > jsize:
            break  # torn by the kill (or zeros a power loss left): the records end here
        data = os.pread(jfd, length, pos + fmt.RECORD.size)
        if len(data) != length or fmt.record_crc(offset, data, chain) != crc:
            break  # torn: the bytes it would protect were never overwritten
        whole = length % head.block == 0 or offset + length == head.size0
        if offset % head.block or offset + length > head.size0 or not whole:
            return out, (f"a record at offset {offset} of {length} bytes lies outside the store's original "
                         f"{head.size0} bytes or its blocks")
        total += length
        if total > head.size0:
            return out, "its records hold more bytes than the store had"
        out.append((offset, length, pos + fmt.RECORD.size))
        spans.append((offset, offset + length))
        chain = crc
        pos += fmt.RECORD.size + length
    spans.sort()
    for (_, e1), (s2, _) in zip(spans, spans[1:]):
        if s2 < e1:
            return out, f"two of its records overlap at offset {s2}"
    return out, ""


def _covers(spans: list[tuple[int, int]], a: int, b: int) -> bool:
    """Whether the sorted ``spans`` cover ``[a, b)``."""
    pos = a
    for s, e in spans:
        if s > pos:
            break
        pos = max(pos, e)
    return pos >= b


def _restored_digest(sfd: int, jfd: int, records: list[tuple[int, int, int]], size0: int) -> bytes:
    """The identity hash of the store as it will be once the records are written back."""

    def read(o: int, n: int) -> bytes:
        data = bytearray(os.pread(sfd, n, o))
        data.extend(bytes(max(0, n - len(data))))  # past the end now: only a record can fill it
        for ro, rn, jpos in records:
            lo, hi = max(o, ro), min(o + n, ro + rn)
            if lo < hi:
                data[lo - o : hi - o] = os.pread(jfd, hi - lo, jpos + lo - ro)
        return bytes(data)

    return fmt.sample_digest(read, size0)


def _apply(path: str, j: Journal) -> None:
    """Write the records back, truncate to the original size, fsync, delete the journal."""
    jfd = open_regular(j.path, os.O_RDONLY, WHAT)
    try:
        fd = open_store(path)
        try:
            if os.fstat(fd).st_ino != j.ino:  # the file at the path was swapped since it was judged
                raise StoreError(f"{path}: the store was replaced while its journal was being checked; nothing was "
                                 "rolled back. Open it again.")
            for offset, length, jpos in j.records:
                data = memoryview(os.pread(jfd, length, jpos))
                w = 0
                while w < length:
                    w += os.pwrite(fd, data[w:], offset + w)
            os.ftruncate(fd, j.size0)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(jfd)
    os.unlink(j.path)
    fsync_dir(j.path)


def set_aside(j: Journal) -> str:
    """Rename a journal that does not belong to ``<journal>.foreign-<UTC time>-<random>``; returns the new name.

    Raises:
        OSError: it cannot be renamed here (no permission in the folder).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while True:
        aside = f"{j.path}.foreign-{stamp}-{os.urandom(3).hex()}"
        if not os.path.lexists(aside):
            break
    os.rename(j.path, aside)
    fsync_dir(aside)
    return aside


def foreign_note(store: str, j: Journal, aside: str | None) -> str:
    """What the user is told about a journal that does not belong to ``store``."""
    where = (f"it was moved to {aside}" if aside is not None
             else "it was left in place (this process may not rename it)")
    return (f"{store}: {j.path} does not belong to this store ({j.reason}), so it was not applied and the store is "
            f"read as it is; {where}. If it was left by a run killed while writing another store (since moved or "
            "replaced), move that store and this journal back together and open the store once to roll it back; "
            "otherwise delete the journal")


def resolve(path: str) -> tuple[str | None, bool]:
    """Deal with the journal beside ``path`` (the caller holds the writer lock): ``(note, cleared)``, a note for
    the user (None when there was no journal) and whether the journal's name is free now.

    A journal of this store is rolled back; one torn as it was created is removed; any other is renamed aside
    (or, where this process may not rename it, left in place: ``cleared`` is then False).

    Raises:
        StoreError: something that is not a regular file is at the journal's name.
    """
    j = inspect(path)
    if j is None:
        return None, True
    if j.verdict == "torn":
        os.unlink(j.path)
        fsync_dir(j.path)
        return (f"{path}: removed the empty journal of a write session killed as it began (the store was not "
                "changed)"), True
    if j.verdict == "ours":
        _apply(path, j)
        return (f"{path}: rolled back an interrupted {j.phase} left by a killed process; the store is as it was "
                "before it"), True
    try:
        aside = set_aside(j)
    except OSError as err:
        return foreign_note(path, j, None) + f" (renaming it failed: {err.strerror or err})", False
    return foreign_note(path, j, aside), True


def discard_for_replacement(path: str) -> str | None:
    """Before a new store replaces ``path`` (the caller holds the writer lock): remove a journal of the store
    being replaced (or torn as it began), rename aside any other (it may protect a store moved elsewhere).
    Returns a note for the user when one was renamed.

    Raises:
        StoreError: a journal that cannot be renamed aside, or a side file that is not a regular file.
    """
    if not os.path.lexists(journal_path(path)):
        return None
    try:
        j = inspect(path)
    except FileNotFoundError:  # no store: the journal's store is elsewhere, if anywhere
        st = os.lstat(journal_path(path))
        jp = journal_path(path)
        j = Journal(jp, "foreign", f"there is no store at {path}") if st.st_size else Journal(jp, "torn")
    if j is None:
        return None
    if j.verdict != "foreign":
        os.unlink(j.path)  # the store it protects is being replaced, as asked
        fsync_dir(j.path)
        return None
    try:
        aside = set_aside(j)
    except OSError as err:
        raise StoreError(f"{j.path}: a write-session journal that does not belong to {path} ({j.reason}) cannot be "
                         f"moved aside ({err.strerror or err}); move it away, then retry.") from err
    return (f"{path}: {j.path} does not belong to the store being replaced ({j.reason}); it was moved to {aside} "
            "(it may roll back a store moved elsewhere: put it beside that store, named after it with .journal)")


def rollback_own(path: str, nonce: bytes) -> None:
    """Roll back this process's own failed session (its journal carries ``nonce``).

    Raises:
        StoreError: the journal beside ``path`` is not that session's (then nothing is changed).
    """
    j = inspect(path)
    if j is None:
        return
    if j.verdict == "torn":
        os.unlink(j.path)
        return
    if j.verdict != "ours" or j.nonce != nonce:
        raise StoreError(f"{path}: the journal of this failed write session no longer matches the store "
                         f"({j.reason or 'another session'}); nothing was rolled back.")
    _apply(path, j)
