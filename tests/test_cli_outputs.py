"""What the `lightning-dualform` command writes: an output never replaces the STORE, its side files, its shards or an
input file (under any spelling), `--json` names a .json file, several outputs are written together or not at all,
and `--scores`' companion is an output like the others. Each refusal comes before any store is opened, so most
tests need only files that exist, not a trained store."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lightning_dualform.cli import main
from lightning_dualform.cli.inputs import UsageError
from lightning_dualform.cli.output import JSON_SUFFIXES, Inputs, Output, check_output, write_together


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def store(tmp_path):
    """A file in the STORE's place: every refusal here comes before it is opened (its bytes must survive)."""
    path = tmp_path / "run.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def _refused(capsys, argv, *words):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "", (argv, rc, out, err)
    line = err.strip()
    assert "\n" not in line and line.startswith("lightning-dualform: error: "), (argv, err)
    for w in words:
        assert w in line, (argv, w, line)
    return line


@pytest.mark.parametrize("cmd", ["info", "verify", "attend", "influence"])
def test_json_never_replaces_the_store_under_any_spelling(store, tmp_path, capsys, cmd, monkeypatch):
    before = store.read_bytes()
    (tmp_path / "sub").mkdir()
    os.symlink("run.h5", tmp_path / "link.json")
    os.link(store, tmp_path / "hard.json")
    monkeypatch.chdir(tmp_path)
    for spelling in ("run.h5", "./run.h5", "sub/../run.h5", str(store), "link.json", "hard.json"):
        _refused(capsys, [cmd, "run.h5", "--json", spelling], f"--json {spelling}: is the STORE", "choose another path")
    for side, what in ((".journal", "write-session journal"), (".lock", "writer lock")):
        _refused(capsys, [cmd, "run.h5", "--json", "sub/../run.h5" + side], f"the {what} of the STORE")
    assert store.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["hard.json", "link.json", "run.h5", "sub"]


def test_outputs_never_replace_a_shard_or_the_queries_file(tmp_path, capsys, monkeypatch):
    from lightning_dualform.store import write_shard_index

    monkeypatch.chdir(tmp_path)
    for r in (0, 1):
        (tmp_path / f"run.rank{r}.h5").write_bytes(b"shard %d" % r)
    write_shard_index(str(tmp_path / "run.h5"), [str(tmp_path / "run.rank0.h5"), str(tmp_path / "run.rank1.h5")])
    os.symlink("run.rank1.h5", tmp_path / "r1.json")
    os.symlink("run.rank1.h5", tmp_path / "r1.npy")
    _refused(capsys, ["info", "run.h5", "--json", "r1.json"], "is shard 1 of the STORE (a DDP shard index)")
    _refused(capsys, ["influence", "run.h5", "--scores", "r1.npy"], "is shard 1 of the STORE")
    assert (tmp_path / "run.rank1.h5").read_bytes() == b"shard 1"
    q = tmp_path / "q.npy"
    np.save(q, np.zeros((2, 6), np.float32))
    os.link(q, tmp_path / "q.json")
    os.symlink("q.npy", tmp_path / "q.png")
    _refused(capsys, ["attend", "run.h5", "--queries", "q.npy", "--json", "q.json"], "is the --queries file (q.npy)")
    _refused(capsys, ["attend", "run.h5", "--queries", "q.npy", "--plot", "q.png"], "is the --queries file")
    assert np.load(q).shape == (2, 6)


def test_json_names_a_json_file_or_a_device(store, tmp_path, capsys):
    for name in ("out.txt", "out", "out.h5"):
        _refused(capsys, ["info", store, "--json", tmp_path / name], "not a .json file name", "FILE.json")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # a pipe under any name is a device-like output: without a reader it is refused at once
    _refused(capsys, ["info", store, "--json", fifo], "is a pipe (FIFO) that nothing reads")
    check_output(str(tmp_path / "OUT.JSON"), "--json", JSON_SUFFIXES)  # (the suffix in any case)


def test_an_output_inside_a_file_says_the_file_is_not_a_folder(store, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for path in ("afile/x.json", "afile/deeper/x.json"):
        _refused(capsys, ["info", store, "--json", tmp_path / path], f"{tmp_path / 'afile'} is a file, not a folder")
    _refused(capsys, ["info", store, "--json", tmp_path / "none" / "x.json"], "does not exist; create it first")


def test_outputs_are_written_together_or_not_at_all(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.npy"
    second.write_bytes(b"kept")

    def fails(path):
        raise OSError("the disk is full")

    outs = (Output(str(first), "--json", JSON_SUFFIXES), Output(str(second), "--scores", (".npy",)))
    with pytest.raises(OSError):
        write_together((outs[0], "{}\n"), (outs[1], fails))
    assert not first.exists() and second.read_bytes() == b"kept"
    assert sorted(os.listdir(tmp_path)) == ["b.npy"]  # no temporary file left
    outs = (Output(str(first), "--json", JSON_SUFFIXES), Output(str(second), "--scores", (".npy",)))
    write_together((outs[0], "{}\n"), (outs[1], lambda p: np.save(p, np.arange(3))))
    assert first.read_text() == "{}\n" and np.load(second).tolist() == [0, 1, 2]


def test_scores_companion_is_checked_first_and_never_written_through_a_link(store, tmp_path, capsys, monkeypatch):
    import lightning_dualform.cli.influence as cli_influence

    def never(*a, **k):
        raise AssertionError("the computation ran before the outputs were checked")

    monkeypatch.setattr(cli_influence, "_run", never)
    (tmp_path / "d.examples.npy").mkdir()
    _refused(capsys, ["influence", store, "--scores", tmp_path / "d.npy"], "companion", "d.examples.npy: is a folder",
             "choose another --scores name")
    os.mkfifo(tmp_path / "f.examples.npy")  # (no reader: refused at once, where np.save waited forever)
    _refused(capsys, ["influence", store, "--scores", tmp_path / "f.npy"], "f.examples.npy: is a pipe (FIFO)")
    os.symlink("run.h5", tmp_path / "s.examples.npy")
    _refused(capsys, ["influence", store, "--scores", tmp_path / "s.npy"], "s.examples.npy: is the STORE")
    assert not (tmp_path / "d.npy").exists() and not (tmp_path / "f.npy").exists()
    # a link to any other file is replaced by the output, never written through
    precious = tmp_path / "precious.txt"
    precious.write_text("precious data")
    os.symlink("precious.txt", tmp_path / "p.examples.npy")
    scores_out = Output(str(tmp_path / "p.npy"), "--scores", (".npy",))
    examples_out = cli_influence._companion(str(tmp_path / "p.npy"), Inputs(str(store)))
    write_together((scores_out, lambda p: np.save(p, np.ones((1, 2)))), (examples_out, lambda p: np.save(p, [7, 9])))
    assert precious.read_text() == "precious data" and not os.path.islink(tmp_path / "p.examples.npy")
    assert np.load(tmp_path / "p.examples.npy").tolist() == [7, 9]


def test_inputs_names_what_an_output_would_replace(tmp_path):
    store = tmp_path / "s.h5"
    store.write_bytes(b"x")
    keep = Inputs(str(store), [(None, "nothing"), (str(tmp_path / "q.npy"), "the --queries file")])
    assert keep.named_by(str(tmp_path / "q.npy"))[1] == "the --queries file"  # (not there yet: by its path)
    assert keep.named_by(str(tmp_path / "other.json")) is None
    with pytest.raises(UsageError, match="is the STORE"):
        Output(str(tmp_path / "." / "s.h5"), "--json", None, keep)
