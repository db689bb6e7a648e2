"""Side files are not trusted (issue 21, class 2): the lock and the journal beside a store are regular files of
ours or refused, a journal is applied only to the store it was written for, and nothing but the store's own
files is ever written, truncated or replaced (``tests/side_files.py`` holds the cases and their rules)."""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import warnings

import pytest

import side_files as sf
from lightning_dualform import StoreError
from lightning_dualform.store import _journal, _repair
from lightning_dualform.store._lock import WriterLock, lock_path, writer_active
from lightning_dualform.store.reader import StoreReader


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return sf.make_sources(str(tmp_path_factory.mktemp("side-sources")))


@pytest.fixture(scope="module")
def killed(tmp_path_factory, sources):
    """A store left by a session killed before its commit: ``(folder, B0, B1, genuine journal)``."""
    d = os.path.realpath(str(tmp_path_factory.mktemp("killed")))
    path = os.path.join(d, "run.h5")
    shutil.copyfile(sources["base"], path)
    b0 = sf.read(path)
    sf.killed_session(path)
    b1 = sf.read(path)
    journal = sf.read(_journal.journal_path(path))
    os.remove(_journal.journal_path(path))
    assert b0 != b1 and len(b1) > len(b0)  # the session changed the store and grew it
    return d, b0, b1, journal


def _quiet_read(path: str) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sf.alarm(10):
            return _repair.prepare_for_read(path)


# ------------------------------------------------------------------------------------------------------
# the journal: applied to its own store only, within its bounds
# ------------------------------------------------------------------------------------------------------
def test_a_killed_sessions_journal_restores_its_store_byte_for_byte(killed, tmp_path):
    d, b0, b1, journal = killed
    path = str(tmp_path / "run.h5")
    with open(path, "wb") as fh:
        fh.write(b1)
    with open(_journal.journal_path(path), "wb") as fh:  # (a copy: another inode, so it is not this one's)
        fh.write(journal)
    notes = _quiet_read(path)
    assert sf.read(path) == b1 and "does not belong" in notes[0] and "inode" in notes[0]
    # the genuine pair: the same file (inode) the session wrote
    own = os.path.join(d, "run.h5")
    _restore(own, b1, journal)
    notes = _quiet_read(own)
    assert sf.read(own) == b0 and "rolled back an interrupted finalisation" in notes[0]
    assert not os.path.lexists(_journal.journal_path(own))


def _restore(path: str, data: bytes, journal: bytes | None) -> None:
    """Put ``data`` back into ``path`` in place (the same inode) and ``journal`` beside it."""
    with open(path, "r+b") as fh:
        fh.write(data)
        fh.truncate(len(data))
    for stale in [f for f in os.listdir(os.path.dirname(path)) if f.startswith("run.h5.journal")]:
        os.remove(os.path.join(os.path.dirname(path), stale))
    if journal is not None:
        with open(_journal.journal_path(path), "wb") as fh:
            fh.write(journal)


@pytest.mark.parametrize("kind", list(sf.JOURNAL_MUTATIONS))
def test_each_kind_of_mutated_journal_restores_its_store_or_leaves_it_untouched(killed, sources, kind):
    _mutated_journals(killed, sources, [kind], range(6))


@pytest.mark.slow
def test_many_more_mutated_journals(killed, sources):
    _mutated_journals(killed, sources, list(sf.JOURNAL_MUTATIONS), range(6, 66))


def _mutated_journals(killed, sources, kinds, seeds) -> None:
    """Each mutation of a genuine journal, beside the very store it was written for (its inode, its B1): the
    store ends as B0 (rolled back), B1 (untouched), or, for a journal cut short or with a flipped bit in a
    record, a prefix of its records put back, as the mutation allows, and a journal that was not applied is
    kept byte for byte."""
    d, b0, b1, journal = killed
    path = os.path.join(d, "run.h5")
    other = sf.read(sources["other_journal"])
    with open(os.path.join(d, "neighbour.bin"), "wb") as fh:
        fh.write(os.urandom(999))
    def neighbours_now() -> dict:
        return {**sf.fingerprint(os.path.dirname(sources["base"])), "neighbour.bin": sf.fingerprint(d)["neighbour.bin"]}

    neighbours = neighbours_now()
    for kind in kinds:
        for seed in seeds:
            rng = random.Random(seed)
            data = sf.mutate_journal(kind, journal, rng, path, other)
            _restore(path, b1, data)
            if kind == "sparse":
                os.truncate(_journal.journal_path(path), 1 << 36)
            _quiet_read(path)
            got = sf.store_outcome(sf.read(path), b0, b1)
            assert got in sf.JOURNAL_MUTATIONS[kind], (kind, seed, got)
            if got == "B1" and b1 != b0 and not sf._torn_start({"journal_data": data}) and kind != "sparse":
                kept = [f for f in os.listdir(d) if f.startswith("run.h5.journal")
                        and sf.sha(sf.read(os.path.join(d, f))) == sf.sha(data)]
                assert kept, (kind, seed, "a journal that was not applied is gone")
    assert neighbours_now() == neighbours


def test_records_far_past_the_end_make_no_sparse_file_and_a_short_store_is_not_padded(killed):
    d, b0, b1, journal = killed
    path = os.path.join(d, "run.h5")
    head, recs = sf.parse(journal)
    for crafted in (sf.craft({}, head, recs + [(1 << 40, b"\0" * 512)]),  # the 1 TiB sparse file
                    sf.craft({"size0": 1 << 40}, head, recs)):  # an original size of 1 TiB
        _restore(path, b1, crafted)
        _quiet_read(path)
        assert os.path.getsize(path) == len(b1) and sf.read(path) == b1
    # a store shorter than the journal's original size, whose missing bytes the journal does not hold
    _restore(path, b1[: len(b0) - 4096], journal)
    _quiet_read(path)
    assert sf.read(path) == b1[: len(b0) - 4096]


def test_a_journal_moved_aside_rolls_back_its_store_once_they_are_together_again(killed, sources):
    """The issue's case: a killed session's journal, then another good store moved onto the path. The moved
    store is untouched, the journal is renamed aside and the message says how to use it; moving the killed
    store back with its journal then rolls it back."""
    d, b0, b1, journal = killed
    path = os.path.join(d, "run.h5")
    _restore(path, b1, journal)
    os.link(path, os.path.join(d, "killed.h5"))  # the killed store, kept under another name (same inode)
    good = sf.read(sources["other"])
    shutil.copyfile(sources["other"], os.path.join(d, "incoming.h5"))
    os.replace(os.path.join(d, "incoming.h5"), path)
    with pytest.warns(RuntimeWarning, match="does not belong to this store.*inode.*moved to .*journal.foreign-"):
        with StoreReader(path) as s:
            assert s.complete
    assert sf.read(path) == good
    aside = [f for f in os.listdir(d) if f.startswith("run.h5.journal.foreign-")]
    assert len(aside) == 1 and sf.read(os.path.join(d, aside[0])) == journal
    os.replace(os.path.join(d, "killed.h5"), path)
    os.replace(os.path.join(d, aside[0]), _journal.journal_path(path))
    assert "rolled back" in _quiet_read(path)[0] and sf.read(path) == b0


def test_the_journal_and_the_lock_are_named_after_the_resolved_store(killed, tmp_path):
    """A session written through a symlink to the store is rolled back by a reader of the store itself (and
    both share one lock), however the path is spelled."""
    d, b0, b1, journal = killed
    path = os.path.join(d, "run.h5")
    _restore(path, b0, None)
    link = str(tmp_path / "alias.h5")
    os.symlink(path, link)
    assert _journal.journal_path(link) == _journal.journal_path(path) == path + ".journal"
    assert lock_path(link) == lock_path(path)
    sf.killed_session(link)
    assert os.path.exists(path + ".journal") and not os.path.lexists(link + ".journal")
    _quiet_read(path)
    assert sf.read(path) == b0
    with WriterLock.acquire(link, "test"):
        assert writer_active(path, other_process=False) is not None


# ------------------------------------------------------------------------------------------------------
# side files that are not regular files of ours
# ------------------------------------------------------------------------------------------------------
def test_every_kind_of_hostile_side_file_with_every_operation(tmp_path, sources):
    """One case per kind of side file (both names), the operation turning with the kind; the rest (every kind
    with every operation, and random draws) under --runslow and in benchmarks/reliability.py."""
    mknod = sf.can_mknod()
    kinds = sf.kinds(mknod)
    seeds = [i * len(sf.OPERATIONS) + i % len(sf.OPERATIONS) for i in range(len(kinds))]
    results = sf.run_cases(str(tmp_path), seeds, sources, hang_s=10.0, mknod=mknod)
    bad = [r for r in results if r["problems"]]
    assert not bad, bad[:3]
    assert {(r["side"], r["kind"]) for r in results} == set(kinds)
    assert {r["outcome"] for r in results} >= {"ok", "store_error"}


def test_overwrite_refuses_what_is_not_a_regular_file_and_leaves_it_as_it_was(tmp_path):
    """``StoreWriter.create(overwrite=True)`` and a training with ``DualFormCallback(overwrite=True)`` at a FIFO,
    a socket, a device (mknod where permitted), a directory or a symlink: refused, nothing changed."""
    from lightning_dualform.store import StoreWriter

    out = tmp_path / "outside"
    out.mkdir()
    (out / "target.bin").write_bytes(b"precious")
    os.mkfifo(out / "fifo")
    spec = _spec()
    made = {"fifo": lambda p: os.mkfifo(p), "directory": lambda p: os.mkdir(p),
            "symlink-to-file": lambda p: os.symlink(out / "target.bin", p),
            "symlink-to-fifo": lambda p: os.symlink(out / "fifo", p),
            "symlink-dangling": lambda p: os.symlink(out / "missing.h5", p), "socket": _socket}
    if sf.can_mknod():
        made["device"] = lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    for kind, make in made.items():
        path = str(tmp_path / f"{kind}.h5")
        make(path)
        before = sf.fingerprint(str(tmp_path))
        with pytest.raises(StoreError, match=f"{kind}.h5: is a .*, not a store file.*left as it is"):
            StoreWriter.create(path, [spec], overwrite=True)
        assert sf.fingerprint(str(tmp_path)) == before, kind
        assert not os.path.lexists(path + ".lock") and not os.path.lexists(str(out / "target.bin.lock"))


def test_overwrite_replaces_a_store_or_an_empty_file_but_no_other_file(tmp_path, sources):
    """``overwrite=True`` replaces a store (HDF5) or an empty file; a file that is not HDF5 is refused, untouched,
    and without ``overwrite`` a folder or such a file is not met with advice to pass ``overwrite=True``."""
    import torch

    from lightning_dualform import DualFormRecorder
    from lightning_dualform.store import StoreWriter

    notes = tmp_path / "notes.h5"
    notes.write_bytes(b"a user's notes, not a store")
    before = sf.fingerprint(str(tmp_path))
    with pytest.raises(StoreError, match=r"notes\.h5: is a file that is not HDF5.*left as it is"):
        StoreWriter.create(str(notes), [_spec()], overwrite=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for overwrite in (True, False):
        with pytest.raises(StoreError, match="not HDF5"):
            DualFormRecorder(notes, model, opt, overwrite=overwrite).start()
    assert sf.fingerprint(str(tmp_path)) == before
    folder = tmp_path / "runs"
    folder.mkdir()
    with pytest.raises(StoreError, match=r"runs: is a directory, not a store file"):
        DualFormRecorder(folder, model, opt).start()
    empty = tmp_path / "empty.h5"
    empty.touch()
    StoreWriter.create(str(empty), [_spec()], overwrite=True).close()
    store = str(tmp_path / "old.h5")
    shutil.copyfile(sources["base"], store)
    StoreWriter.create(store, [_spec()], overwrite=True).close()  # a store of an earlier run: replaced as asked


def test_a_training_with_overwrite_leaves_a_fifo_at_its_path_alone(tmp_path):
    import lightning as L
    import torch

    from helpers import MLP, TRAINER_KW, IndexedDataset
    from lightning_dualform import DualFormCallback

    path = tmp_path / "run.h5"
    os.mkfifo(path)
    before = sf.fingerprint(str(tmp_path))
    trainer = L.Trainer(max_epochs=1, callbacks=[DualFormCallback(path, overwrite=True)], **TRAINER_KW)
    with pytest.raises(Exception, match="FIFO.*not a store file") as err, sf.alarm(120):
        trainer.fit(MLP(), torch.utils.data.DataLoader(IndexedDataset(n=16), batch_size=8))
    assert isinstance(err.value, StoreError) or isinstance(err.value.__cause__, StoreError)
    assert sf.fingerprint(str(tmp_path)) == before


def test_a_ddp_index_never_replaces_another_store_or_a_special_file(tmp_path, sources):
    from lightning_dualform.store.shards import check_index_path, write_shard_index

    store = str(tmp_path / "run.h5")
    shutil.copyfile(sources["base"], store)
    with pytest.raises(FileExistsError, match="not the shard index of a DDP run"):
        check_index_path(store)
    with pytest.raises(FileExistsError, match="not the shard index"):
        write_shard_index(store, [str(tmp_path / "run.rank0.h5")], overwrite=False)
    assert sf.read(store) == sf.read(sources["base"])
    write_shard_index(store, [str(tmp_path / "run.rank0.h5")], overwrite=True)  # as asked
    check_index_path(store)  # an index may be replaced by the next run's
    fifo = str(tmp_path / "pipe.h5")
    os.mkfifo(fifo)
    with pytest.raises(StoreError, match="FIFO"):
        write_shard_index(fifo, [store])
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_lock_symlinked_to_another_file_is_never_written_by_a_repairing_reader(tmp_path, sources):
    """The issue's case: stale 'open for writing' flags make a reader repair (under the writer lock); with the
    lock symlinked to another file, that file was truncated and overwritten. Now: refused, nothing changed."""
    import h5py

    path = str(tmp_path / "run.h5")
    shutil.copyfile(sources["base"], path)
    pid = os.fork()
    if pid == 0:  # a SWMR writer killed: its flags stay in the superblock
        f = h5py.File(path, "r+", libver="latest", locking=False)
        f.swmr_mode = True
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    other = tmp_path / "precious.txt"
    other.write_bytes(b"keep me")
    os.symlink(other, lock_path(path))
    before = sf.fingerprint(str(tmp_path))
    with pytest.raises(StoreError, match=r"run\.h5\.lock: is a symbolic link, not the writer lock"), sf.alarm(10):
        StoreReader(path)
    assert sf.fingerprint(str(tmp_path)) == before
    os.remove(lock_path(path))  # what the message says to do
    with pytest.warns(RuntimeWarning, match="cleared the 'open for writing' flags"):
        StoreReader(path).close()


@pytest.mark.parametrize("side", [".lock", ".journal"])
def test_a_side_file_that_is_a_directory_is_named_in_a_clear_error(tmp_path, sources, side):
    path = str(tmp_path / "run.h5")
    shutil.copyfile(sources["base"], path)
    os.mkdir(path + side)
    what = "writer lock" if side == ".lock" else "write-session journal"
    with pytest.raises(StoreError, match=rf"run\.h5\{side}: is a directory, not the {what}.*Remove or rename it"):
        StoreReader(path)
    with pytest.raises(StoreError, match=rf"run\.h5\{side}: is a directory"):
        from lightning_dualform.store import StoreWriter

        StoreWriter.create(path, [_spec()], overwrite=True)


def test_a_lock_file_with_other_names_or_too_long_to_be_ours_is_not_written(tmp_path):
    path = str(tmp_path / "run.h5")
    other = tmp_path / "precious.txt"
    other.write_bytes(b"keep me")
    os.link(other, lock_path(path))
    with pytest.raises(StoreError, match="other name.*hard link"):
        WriterLock.acquire(path, "test")
    os.remove(lock_path(path))
    big = os.urandom(1 << 16)
    with open(lock_path(path), "wb") as fh:
        fh.write(big)
    with pytest.raises(StoreError, match="holds 65536 bytes, so it is not the writer lock"):
        WriterLock.acquire(path, "test")
    assert other.read_bytes() == b"keep me" and sf.read(lock_path(path)) == big


# ------------------------------------------------------------------------------------------------------
# a folder the reader may not write (root ignores permissions: the child drops the capabilities that let it)
# ------------------------------------------------------------------------------------------------------
_READ_ALL = r"""
import ctypes, os, sys
if os.geteuid() == 0 and "LDF_TEST_DROPPED" not in os.environ:  # root reads and writes anything: drop the
    libc = ctypes.CDLL(None, use_errno=True)  # capabilities that let it from the bounding set, then start again
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit(77)
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "LDF_TEST_DROPPED": "1"})
folder = sys.argv[1]
try:
    open(os.path.join(folder, "probe"), "w")
    sys.exit(78)  # it can write after all: no test
except PermissionError:
    pass
import warnings
from lightning_dualform import StoreReader
from lightning_dualform.errors import StoreError
for name in sys.argv[2:]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with StoreReader(os.path.join(folder, name)) as s:
                out = f"OPENED {s.complete} {s.n_steps}"
        except StoreError as err:
            out = f"STOREERROR {err}"
    said = " | ".join(str(w.message) for w in caught if "lightning-dualform" in str(w.message))
    print(f"{name}: {out} || {said}".replace(chr(10), " "), flush=True)
"""


def test_a_reader_that_may_not_write_the_folder_reads_around_what_it_cannot_repair(killed, tmp_path, sources):
    """In a folder the reader may not write (the files in it are writable: the issue's "Permission denied:
    ....lock"), stale SWMR flags are read around; a journal of the store is an error that says what to do; a
    journal that does not belong is left in place, said so, and the store read as it is. The reader is a
    child without write permission: as root, without the capabilities that bypass file permissions."""
    import h5py

    d, b0, b1, journal = killed
    folder = tmp_path / "ro"
    folder.mkdir()
    flags, ours, foreign = (str(folder / n) for n in ("flags.h5", "ours.h5", "foreign.h5"))
    shutil.copyfile(sources["base"], flags)
    pid = os.fork()
    if pid == 0:  # a SWMR writer killed: its flags stay in the superblock
        f = h5py.File(flags, "r+", libver="latest", locking=False)
        f.swmr_mode = True
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    for path in (ours, foreign):
        with open(path, "wb") as fh:
            fh.write(b0)
        sf.killed_session(path)
    with open(_journal.journal_path(foreign), "wb") as fh:  # another file's journal
        fh.write(journal)
    for name in os.listdir(folder):
        os.chmod(folder / name, 0o666)
    before = sf.fingerprint(str(folder))
    script = tmp_path / "read_all.py"
    script.write_text(_READ_ALL)
    os.chmod(folder, 0o555)
    try:
        proc = subprocess.run([sys.executable, str(script), str(folder), "flags.h5", "ours.h5", "foreign.h5"],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        os.chmod(folder, 0o755)
    if proc.returncode in (77, 78):
        pytest.skip("cannot take the permission to write the folder away from a child here")
    got = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert got.get("flags.h5", "").startswith("OPENED True 4"), proc.stdout + proc.stderr[-2000:]
    assert "must be rolled back" in got["ours.h5"] and "its folder" in got["ours.h5"], got
    assert "does not belong" in got["foreign.h5"] and "left in place" in got["foreign.h5"], got
    assert sf.fingerprint(str(folder)) == before  # nothing was changed, no lock file made


# ------------------------------------------------------------------------------------------------------
def _spec():
    import numpy as np

    from lightning_dualform.store import LayerSpec

    return LayerSpec(name="fc", kind="linear", d_in=sf.D_IN, d_out=sf.D_OUT, has_bias=False,
                     weight_init=np.zeros((sf.D_OUT, sf.D_IN), np.float32), bias_init=None)


def _socket(path: str) -> None:
    here = os.getcwd()
    os.chdir(os.path.dirname(path))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.basename(path))
        s.close()
    finally:
        os.chdir(here)


def test_no_writer_makes_a_lock_beside_what_a_symlinked_store_path_points_at(tmp_path):
    """The lock is named after the store's resolved path, so a store path that is a symlink to a FIFO, a device
    or nowhere must be refused before the lock is made (else a lock file would appear beside the target)."""
    from lightning_dualform.store import StoreWriter
    from lightning_dualform.store.query_writer import QueryWriter

    out = tmp_path / "outside"
    out.mkdir()
    os.mkfifo(out / "fifo")
    targets = {"fifo": out / "fifo", "nowhere": out / "missing.h5"}
    if sf.can_mknod():
        os.mknod(out / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        targets["device"] = out / "zero"
    for name, target in targets.items():
        link = tmp_path / f"{name}.h5"
        os.symlink(target, link)
        before = sf.fingerprint(str(tmp_path))
        for write in (lambda: QueryWriter(str(link), "test", {"fc": sf.D_IN}),
                      lambda: StoreWriter.resume(str(link), {}, {}, 0, None),
                      lambda: WriterLock.acquire(str(link), "test")):
            with pytest.raises(StoreError, match=f"{name}.h5: is "), sf.alarm(10):
                write()
            assert sf.fingerprint(str(tmp_path)) == before, name
