"""The bytes of a write-session journal (``run.h5.journal``, format 2): what ties it to its store, and its bounds.

A journal holds the original bytes of the store that a write session overwrote, so that a session killed
half way can be undone. Applying a journal to a file it was not written for destroys that file (measured
with format 1, which recorded only the store's original size: a 30-byte crafted journal truncated a good
store to 0 bytes; a killed session's journal destroyed another store moved onto the path; a record at
offset 2^40 made a 1 TiB sparse file). So a journal records, in a header covered by its own CRC:

* its format version and the block size of its records;
* the store's identity when the session began: device and inode number (the inode is checked; the device
  number is not, because the same file system has another one on another machine or after a remount), its
  size, and a SHA-256 over sampled blocks of its content (the first 4 KiB, which hold the superblock and
  the root group, and 24 blocks spread over the rest);
* a random session nonce, which seeds the CRC chain of its records (a record of another journal never
  verifies in this one), and the phase (for messages).

Each record is ``offset, length, crc`` and ``length`` original bytes. Records hold whole blocks of
:data:`BLOCK` bytes (the last one may end at the original size), at most :data:`RECORD_MAX` bytes each, all
inside the store's original size, and no two overlap; the CRC of record ``i`` covers its offset, length and
bytes, seeded by the CRC of record ``i - 1`` (the header's CRC for the first). So a journal's size is at
most :func:`journal_cap` of the original size, and reading it needs memory for one record.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Callable

MAGIC = b"LDFJRNL2"
#: journals of earlier formats: they record no identity of their store, so they are never applied
OLD_MAGICS = (b"LDFJRNL1",)
VERSION = 2
#: records cover whole blocks: a journal has at most one record per block of the store
BLOCK = 512
#: the longest record (a truncation is saved in pieces of this size)
RECORD_MAX = 1 << 20
#: the first bytes of the store that the identity hash covers whole
HEAD_BYTES = 4096
#: blocks beyond the first HEAD_BYTES that the identity hash samples
SPREAD_SAMPLES = 24
MAX_PHASE = 200
#: a larger "original size" is damage, not a store (4 PiB)
MAX_STORE_BYTES = 1 << 52

#: magic, version, block, dev, inode, size, nonce, sha256 of the samples, length of the phase's name
_FIXED = struct.Struct("<8sIIQQQ16s32sH")
_CRC = struct.Struct("<I")
RECORD = struct.Struct("<QQI")  # offset, length, crc32 chained from the previous record
_SPAN = struct.Struct("<QQ")
HEADER_MAX = _FIXED.size + MAX_PHASE + _CRC.size


@dataclass(frozen=True)
class Header:
    """What a journal's header says about its store and session."""

    version: int
    block: int
    dev: int
    ino: int
    size0: int
    nonce: bytes
    digest: bytes
    phase: str
    crc: int  # the CRC of the header: the seed of the records' chain
    length: int  # bytes of the header: where the records begin


def sample_spans(size0: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of the store's blocks whose original bytes the identity hash covers."""
    spans = [(o, min(BLOCK, size0 - o)) for o in range(0, min(HEAD_BYTES, size0), BLOCK)]
    rest = size0 - HEAD_BYTES
    if rest > 0:
        seen = {o for o, _ in spans}
        for i in range(SPREAD_SAMPLES):
            o = (HEAD_BYTES + i * rest // SPREAD_SAMPLES) // BLOCK * BLOCK
            if o not in seen and o < size0:
                seen.add(o)
                spans.append((o, min(BLOCK, size0 - o)))
    return spans


def sample_digest(read: Callable[[int, int], bytes], size0: int) -> bytes:
    """SHA-256 over the sampled blocks, each read as ``read(offset, length)``."""
    h = hashlib.sha256()
    for o, n in sample_spans(size0):
        data = read(o, n)
        h.update(_SPAN.pack(o, len(data)))
        h.update(data)
    return h.digest()


def pack_header(dev: int, ino: int, size0: int, nonce: bytes, digest: bytes, phase: str) -> tuple[bytes, int]:
    """The header's bytes and its CRC (the seed of the records' chain)."""
    name = phase.encode()[:MAX_PHASE]
    body = _FIXED.pack(MAGIC, VERSION, BLOCK, dev, ino, size0, nonce, digest, len(name)) + name
    crc = zlib.crc32(body)
    return body + _CRC.pack(crc), crc


def parse_header(buf: bytes) -> Header | str:
    """The header at the start of ``buf``, or why it is not a header of this format (a sentence)."""
    if buf[: len(MAGIC)] in OLD_MAGICS:
        return ("it was written by an earlier version of lightning-dualform, whose journals record no identity of "
                "their store")
    if buf[: len(MAGIC)] != MAGIC:
        return "it does not start as a lightning-dualform journal"
    if len(buf) < _FIXED.size:
        return "it is too short to hold a journal header"
    _, version, block, dev, ino, size0, nonce, digest, n = _FIXED.unpack(buf[: _FIXED.size])
    if n > MAX_PHASE or len(buf) < _FIXED.size + n + _CRC.size:
        return "its header is damaged"
    body = buf[: _FIXED.size + n]
    (crc,) = _CRC.unpack(buf[_FIXED.size + n : _FIXED.size + n + _CRC.size])
    if zlib.crc32(body) != crc:
        return "its header fails its checksum"
    if version != VERSION or block != BLOCK:
        return f"it has format {version} with blocks of {block} bytes; this version reads format {VERSION} ({BLOCK})"
    if not 0 < size0 <= MAX_STORE_BYTES:
        return f"it says the store had {size0} bytes"
    phase = buf[_FIXED.size : _FIXED.size + n].decode(errors="replace")
    return Header(version, block, dev, ino, size0, nonce, digest, phase, crc, len(body) + _CRC.size)


def is_torn_start(buf: bytes) -> bool:
    """Whether ``buf``, a whole journal shorter than its header, is one torn while it was being created: empty,
    zeros (a power loss), or the start of a header. Such a session never changed the store: its header is
    durable before the first write."""
    return len(buf) < _FIXED.size and (not buf.strip(b"\0") or MAGIC.startswith(buf[: len(MAGIC)]))


def pack_record(offset: int, data: bytes, chain: int) -> tuple[bytes, int]:
    """One record's bytes and its CRC (the next record's seed)."""
    crc = record_crc(offset, data, chain)
    return RECORD.pack(offset, len(data), crc) + data, crc


def record_crc(offset: int, data: bytes | memoryview, chain: int) -> int:
    """The CRC of a record of ``data`` at ``offset``, chained from ``chain``."""
    return zlib.crc32(data, zlib.crc32(_SPAN.pack(offset, len(data)), chain))


def journal_cap(size0: int) -> int:
    """The most bytes a journal of a store of ``size0`` bytes can hold: its header, every original byte
    once, and one record header per block."""
    return HEADER_MAX + size0 + RECORD.size * (size0 // BLOCK + 1)


def blocks_around(a: int, b: int, size0: int) -> tuple[int, int]:
    """``[a, b)`` widened to whole blocks, clipped to the original size."""
    return a // BLOCK * BLOCK, min(-(-b // BLOCK) * BLOCK, size0)


def new_nonce() -> bytes:
    return os.urandom(16)
