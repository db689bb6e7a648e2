"""Clearing the 'open for writing' mark that a killed SWMR writer leaves in an HDF5 superblock."""

from __future__ import annotations

import os
import struct

from lightning_dualform.errors import StoreError


# HDF5 marks a file open for (SWMR) writing in its superblock; a killed writer leaves the mark and HDF5
# then refuses to reopen the file for writing. `h5clear -s` removes it; this does the same for the v2/v3
# superblocks that the store's libver bounds (v110 and up) write, after checking the superblock's own checksum.
def clear_swmr_flags(path: str) -> None:
    """Clear the 'open for writing' flags a killed writer left in a store's superblock."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[11] == 0:
        return
    n = 12 + 4 * head[9]
    if len(head) < n + 4 or struct.unpack("<I", head[n : n + 4])[0] != _lookup3(head[:n]):
        raise StoreError(f"{path}: the HDF5 superblock checksum does not match; the file is damaged.")
    patched = bytearray(head[:n])
    patched[11] = 0
    with open(path, "r+b") as fh:
        fh.write(bytes(patched) + struct.pack("<I", _lookup3(bytes(patched))))
        fh.flush()
        os.fsync(fh.fileno())


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: HDF5's metadata checksum."""
    m = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    i = 0

    def word(j: int) -> int:
        return data[j] | (data[j + 1] << 8) | (data[j + 2] << 16) | (data[j + 3] << 24)

    while length > 12:
        a, b, c = (a + word(i)) & m, (b + word(i + 4)) & m, (c + word(i + 8)) & m
        a = ((a - c) & m) ^ _rot(c, 4); c = (c + b) & m
        b = ((b - a) & m) ^ _rot(a, 6); a = (a + c) & m
        c = ((c - b) & m) ^ _rot(b, 8); b = (b + a) & m
        a = ((a - c) & m) ^ _rot(c, 16); c = (c + b) & m
        b = ((b - a) & m) ^ _rot(a, 19); a = (a + c) & m
        c = ((c - b) & m) ^ _rot(b, 4); b = (b + a) & m
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:] + bytes(12 - length)
    data, i = tail, 0
    a, b, c = (a + word(0)) & m, (b + word(4)) & m, (c + word(8)) & m
    c ^= b; c = (c - _rot(b, 14)) & m
    a ^= c; a = (a - _rot(c, 11)) & m
    b ^= a; b = (b - _rot(a, 25)) & m
    c ^= b; c = (c - _rot(b, 16)) & m
    a ^= c; a = (a - _rot(c, 4)) & m
    b ^= a; b = (b - _rot(a, 14)) & m
    c ^= b; c = (c - _rot(b, 24)) & m
    return c
