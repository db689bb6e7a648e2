"""Hostile side files (issue 21, class 2): whatever sits at ``run.h5.lock`` and ``run.h5.journal``, what the
library does with it changes no file but the store's own, never applies a journal to a store it does not
belong to, never hangs, and refuses what is not a regular file with a ``StoreError`` that names it.

Shared by ``tests/test_side_files.py`` (a few dozen cases in the default run, in process, each under an alarm),
``tests/test_reliability.py`` (more, under ``--runslow``) and ``benchmarks/reliability.py`` (hundreds, each
in a runner process that is killed when a case takes more than 10 s).

A case is a folder with a store (``run.h5``), a bystander file, an ``outside/`` folder (a regular file, a
FIFO, a folder and, where ``mknod`` is permitted, a device node, which symlinks and hard links point at) and
one hostile side file; then one operation (a reader: open, ``info``, ``attend``, the viewer; or a writer:
creation with ``overwrite=True``, query recording). Every file of the folder is fingerprinted before and
after (content hash, link target, file type and device number, never opening anything but regular files).

Journals are made the way a killed session leaves them: a write session changes the store (attributes, a
deleted and a new dataset, so the file grows) and HDF5 closes it through the journal, then the session
ends without its commit (as a process killed just before it deletes its journal). ``B0`` is the store
before the session, ``B1`` after; the journal is then used as is (the control: a reader must restore
``B0``), or mutated: truncated, a bit flipped, garbage appended, or crafted with the format's own
functions so that its checksums hold but its identity or bounds do not.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import stat
import struct
import time
import traceback
import warnings
import zlib
from typing import Any, Iterator

import numpy as np

D_IN, D_OUT = 5, 3
LOCK, JOURNAL = ".lock", ".journal"


# ------------------------------------------------------------------------------------------------------
# stores and killed sessions
# ------------------------------------------------------------------------------------------------------
def small_store(path: str, seed: int = 0, steps: int = 4) -> str:
    """A complete store of one linear layer (plain SGD), written with the store's writer (no training)."""
    from lightning_dualform.optim import ParamUpdate
    from lightning_dualform.store import LayerSpec, StepRows, StoreWriter

    g = np.random.default_rng(seed)
    w0 = g.standard_normal((D_OUT, D_IN)).astype(np.float32)
    spec = LayerSpec(name="fc", kind="linear", d_in=D_IN, d_out=D_OUT, has_bias=False, weight_init=w0, bias_init=None)
    st = StoreWriter.create(path, [spec])
    w = w0.astype(np.float64)
    for s in range(steps):
        k = g.standard_normal((4, D_IN)).astype(np.float32)
        v = g.standard_normal((4, D_OUT)).astype(np.float32)
        st.add_step(s, 0, {"fc": StepRows(keys=k, values=v, index=np.arange(4), position=np.zeros(4, np.int32),
                                          label=np.arange(4) % 2, step=s, epoch=0)},
                    {"fc": (1.0, ParamUpdate(lr=0.1), None)})
        w -= 0.1 * v.astype(np.float64).T @ k.astype(np.float64)
    st.finalize({"fc": (w.astype(np.float32), None)}, final_step=steps, epochs=1)
    return path


def killed_session(path: str) -> None:
    """Leave ``path`` as a process killed just before a write session's commit leaves it: changed, with its
    journal beside it."""
    from lightning_dualform.store import _journal

    s = _journal.write_session(path, "finalisation")
    f = s.file
    f.attrs["status"] = "half written"
    del f["layers/fc/weight_final"]
    f["layers/fc"].create_dataset("filler", data=np.arange(20000, dtype=np.float64))  # the file grows
    s.file = None
    f.close()  # HDF5 writes everything through the journal ...
    undo = s._undo
    undo._close_fds()  # ... and the process dies before the commit
    undo._release_space()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


# ------------------------------------------------------------------------------------------------------
# crafted and mutated journals (from a genuine one)
# ------------------------------------------------------------------------------------------------------
def parse(journal: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A genuine journal's header bytes and its records ``(offset, data)`` (an independent reading of the
    documented layout, for crafting)."""
    fixed = struct.Struct("<8sIIQQQ16s32sH")
    n = fixed.unpack(journal[: fixed.size])[-1]
    head_len = fixed.size + n + 4
    recs, pos = [], head_len
    while pos + 20 <= len(journal):
        off, length, _ = struct.unpack("<QQI", journal[pos : pos + 20])
        recs.append((off, journal[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return journal[:head_len], recs


def craft(header_fields: dict[str, Any], template: bytes, records: list[tuple[int, bytes]]) -> bytes:
    """A journal whose checksums all hold: ``template``'s header with ``header_fields`` replaced (magic,
    version, block, dev, ino, size0, nonce, digest), and ``records`` chained from its CRC."""
    fixed = struct.Struct("<8sIIQQQ16s32sH")
    names = ("magic", "version", "block", "dev", "ino", "size0", "nonce", "digest", "n")
    vals = dict(zip(names, fixed.unpack(template[: fixed.size])))
    vals.update(header_fields)
    phase = template[fixed.size : fixed.size + vals["n"]]
    body = fixed.pack(*(vals[k] for k in names)) + phase
    chain = zlib.crc32(body)
    out = [body, struct.pack("<I", chain)]
    for off, data in records:
        crc = zlib.crc32(data, zlib.crc32(struct.pack("<QQ", off, len(data)), chain))
        out.append(struct.pack("<QQI", off, len(data), crc) + data)
        chain = crc
    return b"".join(out)


#: what a mutation may leave the store as: "B0" (rolled back), "B1" (untouched), or "mix" (a prefix of the
#: records put back: what a journal cut by a kill does; each byte from B0 or B1, the original size)
JOURNAL_MUTATIONS: dict[str, tuple[str, ...]] = {
    "genuine": ("B0",),
    "appended": ("B0",),
    "truncated": ("B1", "mix"),
    "bitflip": ("B1", "mix"),
    "random": ("B1",),
    "zeros": ("B1",),
    "v1-crafted": ("B1",),
    "wrong-inode": ("B1",),
    "huge-size": ("B1",),
    "size-plus-block": ("B1",),
    "size-minus-block": ("B1",),
    "wrong-digest": ("B1",),
    "far-records": ("B1",),
    "overlap": ("B1",),
    "unaligned": ("B1",),
    "sparse": ("B1",),
    "other-store": ("B1",),
}


def mutate_journal(kind: str, journal: bytes, rng: random.Random, store_path: str,
                   other_journal: bytes | None = None) -> bytes:
    """``journal`` mutated as ``kind`` says (None for "sparse": the caller extends the file itself)."""
    head, recs = parse(journal)
    fixed = struct.Struct("<8sIIQQQ16s32sH")
    size0 = fixed.unpack(head[: fixed.size])[5]
    if kind in ("genuine", "sparse"):
        return journal
    if kind == "appended":
        return journal + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == "truncated":
        return journal[: rng.randrange(len(journal))]
    if kind == "bitflip":
        data = bytearray(journal)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == "random":
        return bytes(rng.randrange(256) for _ in range(rng.choice([1, 30, 100, 700, 5000])))
    if kind == "zeros":
        return bytes(rng.choice([1, 40, 96, 4096]))
    if kind == "v1-crafted":  # the 30-byte journal: format 1, original size 0
        return b"LDFJRNL1" + struct.pack("<QI", 0, zlib.crc32(b"")) + struct.pack("<H", 0) + b"x" * 8
    if kind == "wrong-inode":
        return craft({"ino": os.stat(store_path).st_ino + rng.randrange(1, 1000)}, head, recs)
    if kind == "huge-size":
        return craft({"size0": 1 << rng.choice([40, 44, 52])}, head, recs)
    if kind == "size-plus-block":
        return craft({"size0": size0 + 512 * rng.randrange(1, 8)}, head, recs)
    if kind == "size-minus-block":
        return craft({"size0": max(512, size0 - 512 * rng.randrange(1, 8))}, head, recs)
    if kind == "wrong-digest":
        return craft({"digest": rng.randbytes(32)}, head, recs)
    if kind == "far-records":
        return craft({}, head, recs + [(1 << rng.choice([30, 40, 50]), b"\xff" * 512)])
    if kind == "overlap":
        off, data = recs[0]
        return craft({}, head, recs + [(off, data)])
    if kind == "unaligned":
        off, data = recs[-1]
        return craft({}, head, recs[:-1] + [(off + 1, data[:100])])
    if kind == "other-store":
        return other_journal
    raise ValueError(kind)


def store_outcome(got: bytes, b0: bytes, b1: bytes) -> str:
    """"B0", "B1", "mix" (the original size, each byte from B0 or B1) or "other"."""
    if got == b1:
        return "B1"
    if got == b0:
        return "B0"
    if len(got) == len(b0):
        a = np.frombuffer(got, np.uint8)
        ok = a == np.frombuffer(b0, np.uint8)
        n = min(len(b0), len(b1))
        ok[:n] |= a[:n] == np.frombuffer(b1[:n], np.uint8)
        if ok.all():
            return "mix"
    return "other"


# ------------------------------------------------------------------------------------------------------
# the folder of a case: fingerprints
# ------------------------------------------------------------------------------------------------------
def fingerprint(root: str) -> dict[str, tuple]:
    """``{relative path: signature}`` of everything under ``root``, without opening anything but regular files."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            m = st.st_mode
            if stat.S_ISREG(m):  # (a sparse journal of 64 GiB is not read)
                out[rel] = ("file", sha(read(full)) if st.st_size <= 1 << 26 else f"{st.st_size} bytes", st.st_ino)
            elif stat.S_ISLNK(m):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(m):
                out[rel] = ("dir", st.st_ino)
            else:
                out[rel] = (stat.S_IFMT(m), st.st_rdev, st.st_ino)
    return out


# ------------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------------
def can_mknod() -> bool:
    """Whether device nodes can be made here (a temporary folder; root in most containers)."""
    import tempfile

    d = tempfile.mkdtemp()
    try:
        os.mknod(os.path.join(d, "n"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
        return True
    except (OSError, AttributeError):
        return False
    finally:
        shutil.rmtree(d, ignore_errors=True)


#: something at the side file's name that is not a regular file of ours (both side files)
NON_REGULAR = ("fifo", "directory", "socket", "symlink-to-file", "symlink-to-fifo", "symlink-dangling",
               "symlink-to-directory", "device", "symlink-to-device", "hardlink")
#: regular files at the lock's name
LOCK_REGULAR = ("lock-oversized", "lock-stale")
READERS = ("open", "info", "attend", "view")
WRITERS = ("create", "queries")
OPERATIONS = READERS + WRITERS


def kinds(mknod: bool) -> list[tuple[str, str]]:
    """Every ``(side, kind)`` a case can have."""
    out = [(side, k) for side in (LOCK, JOURNAL) for k in NON_REGULAR if mknod or "device" not in k]
    out += [(LOCK, k) for k in LOCK_REGULAR]
    out += [(JOURNAL, k) for k in JOURNAL_MUTATIONS]
    out += [(JOURNAL, "moved-store"), (JOURNAL, "no-store")]
    return out


def draw(seed: int, mknod: bool) -> dict[str, Any]:
    """The case of ``seed``: ``{"seed", "side", "kind", "op"}``; the first ``len(kinds) x 6`` seeds take every
    kind with every operation once."""
    all_kinds = kinds(mknod)
    n = len(all_kinds) * len(OPERATIONS)
    rng = random.Random(seed)
    if seed < n:
        side, kind = all_kinds[seed // len(OPERATIONS)]
        op = OPERATIONS[seed % len(OPERATIONS)]
    else:
        side, kind = rng.choice(all_kinds)
        op = rng.choice(OPERATIONS)
    if kind == "no-store":
        op = "create"  # there is no store to read
    return {"seed": seed, "side": side, "kind": kind, "op": op}


def setup(case: dict[str, Any], folder: str, sources: dict[str, str]) -> dict[str, Any]:
    """Make the case's folder; returns what the verdict needs (the store's B0/B1 files, the journal's hash).

    ``sources``: ``{"base": a complete store, "other": another (different) complete store, "other_journal":
    a genuine journal of a session on another store}``.
    """
    rng = random.Random(case["seed"] + 7919)
    os.makedirs(folder)
    out = os.path.join(folder, "outside")
    os.makedirs(os.path.join(out, "dir"))
    with open(os.path.join(out, "target.bin"), "wb") as fh:
        fh.write(rng.randbytes(3000))
    with open(os.path.join(out, "dir", "inner.bin"), "wb") as fh:
        fh.write(b"inner")
    os.mkfifo(os.path.join(out, "fifo"))
    if "device" in case["kind"]:
        os.mknod(os.path.join(out, "zero"), stat.S_IFCHR | 0o600, os.makedev(1, 5))  # a zero device: reads never end
    with open(os.path.join(folder, "neighbour.bin"), "wb") as fh:
        fh.write(rng.randbytes(1000))
    store = os.path.join(folder, "run.h5")
    side = os.path.realpath(store) + case["side"]
    info: dict[str, Any] = {"store": store, "side": side, "folder": folder}
    shutil.copyfile(sources["base"], store)
    kind = case["kind"]
    if case["side"] == JOURNAL and kind not in NON_REGULAR:
        b0 = read(store)
        killed_session(store)
        b1 = read(store)
        genuine = read(side)
        info["b0"], info["b1"] = _keep(folder, "b0", b0), _keep(folder, "b1", b1)
        if kind == "moved-store":  # another store moved onto the path after the kill (a new inode)
            shutil.copyfile(sources["other"], store + ".incoming")
            os.replace(store + ".incoming", store)
            info["b0"] = info["b1"] = _keep(folder, "b1", read(store))
            data = genuine
        elif kind == "no-store":
            os.remove(store)
            data = genuine
        else:
            data = mutate_journal(kind, genuine, rng, store, read(sources["other_journal"]))
            with open(side, "wb") as fh:
                fh.write(data)
            if kind == "sparse":
                os.truncate(side, 1 << 36)  # 64 GiB, almost all of it a hole
        info["journal_sha"] = sha(data) if kind != "sparse" else None
        info["journal_data"] = data if len(data) < 4096 else b"-"
        info["allowed"] = JOURNAL_MUTATIONS.get(kind, ("B1",))
    elif kind in LOCK_REGULAR:
        with open(side, "wb") as fh:
            fh.write(rng.randbytes(1 << 16) if kind == "lock-oversized" else b"pid 1 on elsewhere: training\n")
    else:
        _make_non_regular(kind, side, out)
    return info


def _keep(folder: str, name: str, data: bytes) -> str:
    """A copy of a store's bytes beside the case (outside its folder: not fingerprinted)."""
    path = os.path.join(os.path.dirname(folder), f"{os.path.basename(folder)}.{name}")
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def _make_non_regular(kind: str, side: str, out: str) -> None:
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "directory":
        os.mkdir(side)
        with open(os.path.join(side, "x"), "wb") as fh:
            fh.write(b"in the way")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        here = os.getcwd()
        os.chdir(os.path.dirname(side))  # (a socket's path is limited to about 100 bytes)
        try:
            sock.bind(os.path.basename(side))
        finally:
            os.chdir(here)
            sock.close()  # the socket file stays
    elif kind == "symlink-to-file":
        os.symlink(os.path.join(out, "target.bin"), side)
    elif kind == "symlink-to-fifo":
        os.symlink(os.path.join(out, "fifo"), side)
    elif kind == "symlink-dangling":
        os.symlink(os.path.join(out, "missing.bin"), side)
    elif kind == "symlink-to-directory":
        os.symlink(os.path.join(out, "dir"), side)
    elif kind == "device":
        os.mknod(side, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    elif kind == "symlink-to-device":
        os.symlink(os.path.join(out, "zero"), side)
    elif kind == "hardlink":
        os.link(os.path.join(out, "target.bin"), side)
    else:
        raise ValueError(kind)


# ------------------------------------------------------------------------------------------------------
# running one case, and judging it
# ------------------------------------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by the alarm of :func:`alarm` (a BaseException: no ``except Exception`` in the library eats it)."""


@contextlib.contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Interrupt the main thread after ``seconds`` (a blocking ``open`` or ``read`` included) with :class:`Hang`."""

    def ring(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def operate(op: str, store: str) -> None:
    """Do ``op`` on ``store`` as a user would."""
    import torch

    if op == "open":
        from lightning_dualform.store.reader import StoreReader

        StoreReader(store).close()
    elif op == "info":
        from lightning_dualform.cli.info import store_facts

        store_facts(store)
    elif op in ("attend", "view"):
        from lightning_dualform.attend.inference import DualInference

        with DualInference(store, device="cpu") as di:
            if op == "attend":
                di.attend("fc", torch.ones(2, D_IN), top_k=2)
            else:
                from lightning_dualform.cli.view import ViewApp

                ViewApp(store, di).info({})
    elif op == "create":
        from lightning_dualform.store import LayerSpec, StoreWriter

        spec = LayerSpec(name="fc", kind="linear", d_in=D_IN, d_out=D_OUT, has_bias=False,
                         weight_init=np.zeros((D_OUT, D_IN), np.float32), bias_init=None)
        StoreWriter.create(store, [spec], overwrite=True).close()
    elif op == "queries":
        from lightning_dualform.store.query_writer import QueryWriter

        qw = QueryWriter(store, "test", {"fc": D_IN})
        n = 3
        rows = (np.ones((n, D_IN), np.float32), np.arange(n), np.zeros(n, np.int32), np.zeros(n, np.int64))
        qw.add_batch(np.arange(n), np.zeros(n), np.zeros(n), None, {"fc": rows})
        qw.close()
    else:
        raise ValueError(op)


def run_case(op: str, store: str, hang_s: float = 10.0) -> dict[str, Any]:
    """``op`` under an alarm: ``{"outcome": ok | store_error | file_exists | hang | other, "detail", "seconds",
    "warnings"}``."""
    from lightning_dualform.errors import StoreError

    t0 = time.monotonic()
    res: dict[str, Any] = {"outcome": "ok", "detail": ""}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with alarm(hang_s):
                operate(op, store)
        except Hang as err:  # where the alarm found it: a blocking open or read of a side file, or elsewhere
            res = {"outcome": "hang", "detail": str(err), "trace": traceback.format_exc()[-1500:]}
        except StoreError as err:
            res = {"outcome": "store_error", "detail": str(err)[:400]}
        except FileExistsError as err:
            res = {"outcome": "file_exists", "detail": str(err)[:400]}
        except Exception as err:  # noqa: BLE001 - the finding: an unclear error
            res = {"outcome": "other", "detail": f"{type(err).__name__}: {err}"[:400],
                   "trace": traceback.format_exc()[-1500:]}
    res["seconds"] = time.monotonic() - t0
    res["warnings"] = [str(w.message)[:300] for w in caught if "lightning-dualform" in str(w.message)]
    return res


def verdict(case: dict[str, Any], info: dict[str, Any], before: dict[str, tuple], after: dict[str, tuple],
            result: dict[str, Any]) -> list[str]:
    """What went wrong in one case (empty: nothing). See the module's docstring for the rules."""
    problems: list[str] = []
    kind, op, side = case["kind"], case["op"], os.path.basename(info["side"])
    out = result["outcome"]
    if out in ("hang", "other"):
        problems.append(f"{out}: {result['detail']}")
    own = {"run.h5", "run.h5.lock", "run.h5.journal"}
    for rel in sorted(set(before) | set(after)):
        if rel in own or rel.startswith(("run.h5.journal.foreign-", "run.h5.creating-")):
            continue
        if before.get(rel) != after.get(rel):
            problems.append(f"{rel} changed: {before.get(rel)} -> {after.get(rel)}")
    if kind in NON_REGULAR:
        hardlink_read = kind == "hardlink" and (side == "run.h5.journal" or op in READERS)
        if hardlink_read:
            pass  # a regular file with another name is only read (a journal of unknown content is renamed aside)
        elif before.get(side) != after.get(side):
            problems.append(f"the {kind} at {side} changed: {before.get(side)} -> {after.get(side)}")
        if hardlink_read:
            if out not in ("ok", "store_error"):
                problems.append(f"{op} with a hard link at {side}: {out}")
        elif out != "store_error":
            problems.append(f"{op} with a {kind} at {side}: {out}, expected a StoreError")
        elif side not in result["detail"]:
            problems.append(f"the StoreError does not name {side}: {result['detail'][:200]}")
    if kind == "lock-oversized":
        if before.get(side) != after.get(side):
            problems.append("the oversized file at the lock's name was changed")
        if op in WRITERS and out != "store_error":
            problems.append(f"{op} with an oversized lock file: {out}, expected a StoreError")
    if "journal_sha" in info or kind == "sparse":
        problems += _journal_verdict(case, info, before, after, result)
    elif "run.h5" in before and op in READERS and before.get("run.h5") != after.get("run.h5"):
        problems.append("a reader changed the store")
    return problems


def _journal_verdict(case: dict[str, Any], info: dict[str, Any], before: dict[str, tuple],
                     after: dict[str, tuple], result: dict[str, Any]) -> list[str]:
    problems = []
    kind, op = case["kind"], case["op"]
    store = info["store"]
    b0, b1 = read(info["b0"]), read(info["b1"])
    got = read(store) if os.path.isfile(store) else None
    state = "gone" if got is None else store_outcome(got, b0, b1)
    wrote = op in WRITERS and result["outcome"] == "ok"  # a writer that succeeded changed the store, as asked
    if not wrote and kind != "no-store" and state not in info["allowed"]:
        problems.append(f"the store is {state} after {op}, allowed {info['allowed']}")
    # a journal that did not belong is kept, byte for byte, under its name or beside it
    must_be_foreign = info["allowed"] == ("B1",) or kind == "moved-store"
    if info.get("journal_sha") and (must_be_foreign or (state == "B1" and not wrote)) and not _torn_start(info):
        kept = [rel for rel, sig in after.items()
                if rel.startswith("run.h5.journal") and sig[0] == "file" and sig[1] == info["journal_sha"]]
        if not kept:
            problems.append("a journal that was not applied is gone")
    return problems


def _torn_start(info: dict[str, Any]) -> bool:
    """Whether the journal is one torn as it was created (the format's rule: shorter than its 90-byte fixed
    header, and empty, zeros, or the start of the magic): removed, as it protects nothing."""
    data = info.get("journal_data", b"")
    return len(data) < 90 and (not data.strip(b"\0") or b"LDFJRNL2".startswith(data[:8]))


def run_cases(work: str, seeds: list[int], sources: dict[str, str], hang_s: float = 10.0,
              mknod: bool | None = None) -> list[dict[str, Any]]:
    """Set up, run and judge the cases ``seeds`` in this process (each under an alarm of ``hang_s``)."""
    mknod = can_mknod() if mknod is None else mknod
    work = os.path.realpath(work)  # (side files are named after the store's resolved path)
    warm_up(sources)
    results = []
    for seed in seeds:
        case = draw(seed, mknod)
        folder = os.path.join(work, f"c{seed}")
        info = setup(case, folder, sources)
        before = fingerprint(folder)
        result = run_case(case["op"], info["store"], hang_s)
        after = fingerprint(folder)
        problems = verdict(case, info, before, after, result)
        results.append({**case, **{k: v for k, v in result.items() if k != "trace"}, "problems": problems,
                        **({"trace": result["trace"]} if problems and "trace" in result else {})})
        shutil.rmtree(folder, ignore_errors=True)
        for name in ("b0", "b1"):
            if name in info and os.path.exists(info[name]):
                os.remove(info[name])
    return results


def warm_up(sources: dict[str, str]) -> None:
    """Start what a first case would otherwise time: the probe's child process, torch, the viewer's imports."""
    import torch  # noqa: F401

    import lightning_dualform.attend.inference  # noqa: F401
    import lightning_dualform.cli.info  # noqa: F401
    import lightning_dualform.cli.view  # noqa: F401
    from lightning_dualform.store import _probe

    _probe.probe(sources["base"])


def make_sources(work: str) -> dict[str, str]:
    """The stores every case starts from: a complete store, another one, and a genuine journal of a session on
    that other store."""
    os.makedirs(work, exist_ok=True)
    base = small_store(os.path.join(work, "base.h5"), seed=0)
    other = small_store(os.path.join(work, "other.h5"), seed=1, steps=6)
    killed = os.path.join(work, "other-killed.h5")
    shutil.copyfile(other, killed)
    killed_session(killed)
    os.replace(os.path.realpath(killed) + JOURNAL, os.path.join(work, "other.journal"))
    return {"base": base, "other": other, "other_journal": os.path.join(work, "other.journal")}
