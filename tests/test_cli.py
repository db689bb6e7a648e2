"""The `lightning-dualform` command: every subcommand in-process on small stores, the demo, pictures,
the JSON against DualInference, and one-line errors with exit code 2 for a user's mistakes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset
from lightning_dualform import DualFormCallback, DualInference, StoreReader
from lightning_dualform.cli import main
from lightning_dualform.store.format import FORMAT_VERSION


class Classifier(MLP):
    def test_step(self, batch, batch_idx):
        return self(batch[0])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 6-8-3 classifier's store with recorded test queries (non-image inputs)."""
    path = str(tmp_path_factory.mktemp("cli") / "small.h5")
    model = Classifier()
    cb = DualFormCallback(path, record_queries=("test",))
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=64, seed=0), batch_size=16, shuffle=True))
    trainer.test(model, torch.utils.data.DataLoader(IndexedDataset(n=20, seed=1), batch_size=8), verbose=False)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo on 300 digits for one epoch: its output folder and what it printed."""
    out = str(tmp_path_factory.mktemp("demo"))
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["demo", "--out", out, "--epochs", "1", "--limit", "300", "--quiet"])
    return out, rc, buf.getvalue()


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_png(path):
    import matplotlib.image

    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


# -- help, version -------------------------------------------------------------------------------------
def test_module_help_in_a_subprocess():
    res = subprocess.run([sys.executable, "-m", "lightning_dualform", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("info", "attend", "verify", "demo"):
        assert cmd in res.stdout


def test_version_and_subcommand_help_show_defaults(capsys):
    from lightning_dualform import __version__

    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and __version__ in out
    rc, out, _ = run(capsys, "attend", "--help")
    assert rc == 0 and "(default: 5)" in " ".join(out.split()) and "--contribution-to" in out
    # a default is said once: not appended where the help already says it, and never as None, True or False
    for cmd in ("info", "attend", "influence", "verify", "view", "demo"):
        rc, out, _ = run(capsys, cmd, "--help")
        flat = " ".join(out.split())
        assert rc == 0 and not re.search(r"\(default: (None|True|False)\)", flat), (cmd, flat)
        assert not re.search(r"\(default[^()]*(\([^()]*\))?[^()]*\) \(default", flat), (cmd, flat)


# -- info ----------------------------------------------------------------------------------------------
def test_info(small, capsys, tmp_path):
    rc, out, err = run(capsys, "info", small, "--json", tmp_path / "info.json")
    assert rc == 0, err
    assert "net.0" in out and "6 -> 8" in out and "net.2" in out and "8 -> 3" in out
    assert "SGD" in out and "lr=0.1" in out and "exact" in out and "test" in out
    facts = json.loads((tmp_path / "info.json").read_text())
    with StoreReader(small) as s:
        assert [l["rows"] for l in facts["layers"]] == [s.layer(n).n_rows for n in s.layers]
        assert facts["steps"]["recorded"] == s.n_steps
        assert facts["queries"][0]["n"] == 20


# -- attend --------------------------------------------------------------------------------------------
def test_attend_json_matches_dual_inference(small, capsys, tmp_path):
    out_json = tmp_path / "a.json"
    rc, out, err = run(capsys, "attend", small, "--split", "test", "--index", "3,5", "--top-k", "3", "--json", out_json)
    assert rc == 0, err
    assert "query test[3]" in out and "proponents of output unit" in out
    got = json.loads(out_json.read_text())
    assert got["queries"]["index"] == [3, 5]
    with DualInference(small, device="cpu") as di:
        qs = di.store.queries("test")
        pos = [int(np.flatnonzero(qs.index == i)[0]) for i in (3, 5)]
        for name in di.layers:
            rows = qs.layer_rows(name)
            keys = np.concatenate([rows["keys"][rows["example"] == p] for p in pos])
            contrib = "pred" if name == di.layers[-1] else None
            want = di.attend(name, keys, top_k=3, contribution_to=contrib, step_buckets=20).to_dict()
            _assert_same(got["layers"][name], want)


def _assert_same(a, b, path="result"):
    if isinstance(b, dict):
        assert set(a) == set(b), path
        for k in b:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


def test_attend_leads_with_influence_from_the_store(small, capsys, tmp_path):
    """Beside the paper's attention view, attend ranks the training examples by first-order influence on each
    prediction's margin through the output layer, from the store alone, and says so; --no-influence leaves the
    attention as it was."""
    from lightning_dualform.attribute.output_layer import output_layer_influence

    rc, out, err = run(capsys, "attend", small, "--index", "3,5", "--top-k", "3", "--json", tmp_path / "a.json")
    assert rc == 0, err
    assert out.index("which examples: first-order influence on the margin (through layer net.2 only)") < out.index(
        "attention (the paper's view")
    assert "dmargin/dw" in out and "--model" in out
    got = json.loads((tmp_path / "a.json").read_text())
    inf = got["influence"]
    assert inf["method"] == "first_order" and inf["layers"] == ["net.2"] and inf["scope"] == "output layer"
    with StoreReader(small) as store:
        qs = store.queries("test")
        pos = [int(np.flatnonzero(qs.index == i)[0]) for i in (3, 5)]
        rows = qs.layer_rows("net.2")
        keys = np.concatenate([rows["keys"][rows["example"] == p] for p in pos])
        want = output_layer_influence(store, keys)
    pro, opp = want.top(3)
    for j in range(2):
        assert [p["index"] for p in inf["queries"][j]["proponents"]] == [i for i in pro.index[j].tolist() if i >= 0]
        assert [o["score"] for o in inf["queries"][j]["opponents"]] == pytest.approx(
            [s for s, i in zip(opp.score[j].tolist(), opp.index[j]) if i >= 0], rel=1e-12)
        assert inf["queries"][j]["class"] == got["layers"]["net.2"]["units"][j]  # the prediction's margin
    rc, _, err = run(capsys, "attend", small, "--index", "3,5", "--top-k", "3", "--no-influence", "--json",
                     tmp_path / "b.json")
    bare = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0 and bare["influence"] is None and bare["layers"] == got["layers"]
    # --at-step: attention of an earlier model; the influence is the trained model's, so it says why it is absent
    rc, out, _ = run(capsys, "attend", small, "--index", "3", "--at-step", "2", "--top-k", "2")
    assert rc == 0 and "influence not available" in out and "--at-step 2" in out


def test_influence_without_a_model_scores_the_output_layer(small, capsys, tmp_path):
    from lightning_dualform.attribute.output_layer import output_layer_influence

    rc, out, err = run(capsys, "influence", small, "--index", "3,5", "--top-k", "2", "--json", tmp_path / "i.json")
    assert rc == 0, err
    assert "through layer net.2 only" in out and "dmargin/dw" in out and "--model" in out
    got = json.loads((tmp_path / "i.json").read_text())
    with StoreReader(small) as store:
        qs = store.queries("test")
        pos = [int(np.flatnonzero(qs.index == i)[0]) for i in (3, 5)]
        rows = qs.layer_rows("net.2")
        keys = np.concatenate([rows["keys"][rows["example"] == p] for p in pos])
        want = output_layer_influence(store, keys, targets=qs.label[pos])
    assert got["scope"] == "output layer" and got["targets"] == qs.label[pos].tolist()
    assert got["proponents"]["index"] == want.top(2)[0].index.tolist()
    rc, _, err = run(capsys, "influence", small, "--method", "metagradient")
    assert rc == 2 and "--model" in err


def test_influence_leaves_out_the_padding_when_fewer_examples_push_one_way(small, capsys, tmp_path):
    """64 training examples and --top-k 64: one side has fewer; its missing ranks are blank cells, not index -1
    with label -1 and score -0, and the JSON lists only the examples that push that way."""
    rc, out, err = run(capsys, "influence", small, "--index", "3,5", "--top-k", "64", "--json", tmp_path / "i.json")
    assert rc == 0, err
    assert " -1 " not in out and "-0 " not in out and not out.rstrip().endswith("-0")
    got = json.loads((tmp_path / "i.json").read_text())
    for j in range(2):
        pro, opp = got["proponents"], got["opponents"]
        assert min(len(pro["index"][j]), len(opp["index"][j])) < 64  # (padded before)
        for side in (pro, opp):
            assert -1 not in side["index"][j] and len(side["index"][j]) == len(side["score"][j]) == len(side["label"][j])
        assert all(s > 0 for s in pro["score"][j]) and all(s < 0 for s in opp["score"][j])
    table = [line for line in out[out.index("query 3"):out.index("query 5")].splitlines()[3:] if line.strip()]
    assert len(table) == max(len(got["proponents"]["index"][0]), len(got["opponents"]["index"][0]))


@pytest.mark.parametrize("ext", ["npy", "pt"])
def test_attend_queries_from_a_file(small, capsys, tmp_path, ext):
    q = np.random.default_rng(0).normal(size=(2, 6)).astype(np.float32)
    f = tmp_path / f"q.{ext}"
    np.save(f, q) if ext == "npy" else torch.save(torch.from_numpy(q), f)
    out_json = tmp_path / "q.json"
    rc, out, err = run(capsys, "attend", small, "--queries", f, "--top-k", "2", "--contribution-to", "none", "--json", out_json)
    assert rc == 0, err
    got = json.loads(out_json.read_text())
    assert list(got["layers"]) == ["net.0"]  # the only layer of width 6
    with DualInference(small, device="cpu") as di:
        _assert_same(got["layers"]["net.0"], di.attend("net.0", q, top_k=2, step_buckets=20).to_dict())


def test_attend_by_example_at_step_and_label(small, capsys):
    rc, out, err = run(capsys, "attend", small, "--index", "0", "--by", "example", "--at-step", "2",
                       "--contribution-to", "label", "--layer", "net.2")
    assert rc == 0, err
    assert "after 2 optimizer steps" in out and "rows" in out and "net.0" not in out


def test_attend_plot_non_image(small, capsys, tmp_path):
    png = tmp_path / "small.png"
    rc, _, err = run(capsys, "--quiet", "attend", small, "--index", "0:3", "--top-k", "3", "--plot", png)
    assert rc == 0, err
    assert_png(png)


# -- verify --------------------------------------------------------------------------------------------
def test_verify_ok_and_beyond_tolerance(small, capsys, tmp_path):
    rc, out, err = run(capsys, "verify", small, "--json", tmp_path / "v.json")
    assert rc == 0, err
    assert "exact" in out and "net.2" in out
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["ok"] and v["tolerance"] == 1e-4 and all(l["worst"] < 1e-5 for l in v["layers"])
    broken = tmp_path / "broken.h5"
    broken.write_bytes(open(small, "rb").read())
    with h5py.File(broken, "r+") as f:
        f["layers/net.2/weight_final"][0, 0] += 1.0  # the trained weights no longer match the memory
    rc, out, err = run(capsys, "verify", broken)
    assert rc == 1 and "FAIL" in out and "NOT exact" in out


# -- demo ----------------------------------------------------------------------------------------------
def test_demo_writes_store_picture_and_summary(demo, capsys):
    out, rc, printed = demo
    assert rc == 0
    for name in ("mnist.h5", "attend.png", "summary.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert_png(os.path.join(out, "attend.png"))
    s = json.loads(open(os.path.join(out, "summary.json")).read())
    assert s["train_examples"] == 240 and s["test_examples"] == 60 and s["epochs"] == 1
    assert all(c["exact"] for c in s["certificate"].values())
    assert "accuracy" in printed and "exact" in printed and "MB" in printed
    store = os.path.join(out, "mnist.h5")
    rc, text, err = run(capsys, "info", store)
    assert rc == 0 and "784 -> 800" in text and "60" in text
    png = os.path.join(out, "top.png")
    rc, text, err = run(capsys, "attend", store, "--top-k", "3", "--plot", png, "--by", "example")
    assert rc == 0, err
    assert_png(png)
    rc, text, err = run(capsys, "verify", store, "--samples", "32")
    assert rc == 0, err


# -- a user's mistakes ----------------------------------------------------------------------------------
def _bad_inputs(small, tmp):
    text = tmp / "notes.txt"
    text.write_text("not a store\n")
    wide = tmp / "wide.npy"
    np.save(wide, np.zeros((2, 5), np.float32))
    pickled = tmp / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return {
        "missing file": ["info", tmp / "nope.h5"],
        "not a store": ["info", text],
        "not a store (attend)": ["attend", text],
        "unknown layer": ["attend", small, "--layer", "fc9"],
        "bad index": ["attend", small, "--index", "999"],
        "bad index syntax": ["attend", small, "--index", "three"],
        "unknown split": ["attend", small, "--split", "validate"],
        "wrong query width": ["attend", small, "--queries", wide],
        "wrong query width for a layer": ["attend", small, "--queries", wide, "--layer", "net.2"],
        "pickled queries": ["attend", small, "--queries", pickled],
        "queries file missing": ["attend", small, "--queries", tmp / "q.npy"],
        "unwritable json": ["attend", small, "--json", tmp / "no" / "such" / "dir.json"],
        "unwritable plot": ["attend", small, "--plot", tmp / "missing" / "x.png"],
        "plot suffix": ["attend", small, "--plot", tmp / "x.gif"],
        "top-k too large": ["attend", small, "--top-k", "100000"],
        "bad contribution": ["attend", small, "--contribution-to", "biggest"],
        "unit out of range": ["attend", small, "--contribution-to", "7"],
        "bad at-step": ["attend", small, "--at-step", "9999"],
        "bad choice": ["attend", small, "--by", "row"],
        "no command": [],
        "verify missing": ["verify", tmp / "nope.h5"],
        "demo out is a file": ["demo", "--out", text],
        "demo epochs": ["demo", "--epochs", "0"],
    }


def test_bad_inputs_give_exit_2_and_one_line(small, capsys, tmp_path):
    for what, argv in _bad_inputs(small, tmp_path).items():
        rc, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2, (what, rc, err)
        assert len(lines) == 1 and lines[0].startswith("lightning-dualform: error: "), (what, err)
        assert "Traceback" not in err, what


def _one_line(capsys, *argv):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, rc, err)
    assert err.startswith("lightning-dualform: error: ") and "\x1b" not in err, err
    return err.strip()


def test_layer_that_names_no_layer_is_a_usage_error(small, capsys):
    for value in ("", ",", " , "):
        err = _one_line(capsys, "attend", small, "--no-influence", "--layer", value)
        assert "names no layer" in err and "net.0, net.2" in err, err


def test_at_step_top_k_and_step_buckets_are_refused_in_the_command_s_words(small, capsys):
    """The store's first model has seen no row: the command says which --at-step has, where the library would say
    "Use top_k <= 0" (which the command refuses); a top-k beyond the rows says the --top-k and the --at-step that do."""
    err = _one_line(capsys, "attend", small, "--no-influence", "--at-step", "0")
    assert "--at-step 0: the model before any optimizer step has seen no training row" in err
    assert "use --at-step 1 or later (up to 8)" in err
    err = _one_line(capsys, "attend", small, "--no-influence", "--at-step", "1", "--top-k", "40")
    assert "--top-k 40: layer net.0 holds 16 training rows up to step 1; use --top-k 16 or less, or --at-step 3" in err
    err = _one_line(capsys, "attend", small, "--no-influence", "--at-step", "2", "--step-buckets", "2000")
    assert "--step-buckets 2000: use 1,024 or fewer" in err
    err = _one_line(capsys, "attend", small, "--no-influence", "--at-step", "9")
    assert "--at-step 9: outside the run" in err and "0 to 8" in err
    for err in (_one_line(capsys, "attend", small, "--at-step", a) for a in ("0", "9")):
        assert "attend(" not in err and "top_k" not in err and "at_step=" not in err, err


class _NotATensor:
    pass


def test_query_files_that_are_not_regular_files_or_are_damaged(small, capsys, tmp_path):
    import threading

    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 6), np.float32))
    data = good.read_bytes()
    (tmp_path / "trunc.npy").write_bytes(data[:-10])
    (tmp_path / "garbage.npy").write_bytes(b"hello, not an array")
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "z.npz", a=np.zeros((2, 6)))
    os.replace(tmp_path / "z.npz", tmp_path / "z.npy")
    (tmp_path / "junk.pt").write_bytes(b"\x89junk, not a checkpoint")
    torch.save({"x": _NotATensor()}, tmp_path / "objects.pt")
    os.symlink("loop2.npy", tmp_path / "loop1.npy")
    os.symlink("loop1.npy", tmp_path / "loop2.npy")
    os.symlink("loop2.h5", tmp_path / "loop1.h5")
    os.symlink("loop1.h5", tmp_path / "loop2.h5")
    want = {"trunc.npy": "damaged or not a .npy file", "garbage.npy": "damaged or not a .npy file",
            "empty.npy": "is empty", "z.npy": "is a zip archive (a .npz", "junk.pt": "damaged or not a .pt file",
            "objects.pt": "holds Python objects that torch.load(weights_only=True) does not unpickle",
            "loop1.npy": "is a symbolic link loop"}
    for name, words in want.items():
        err = _one_line(capsys, "attend", small, "--queries", tmp_path / name)
        assert words in err and "without pickle" not in err, (name, err)
        assert err.endswith((".", ")")) and " ..." not in err[-6:], (name, err)  # (not cut mid-word)
    err = _one_line(capsys, "info", tmp_path / "loop1.h5")
    assert "is a symbolic link loop" in err and "no such file" not in err
    # a FIFO: refused without opening it (a writer that waits for a reader keeps the old code from hanging)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    done = threading.Event()

    def writer():
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet
                done.wait(0.01)
                continue
            os.close(fd)
            return

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        err = _one_line(capsys, "attend", small, "--queries", fifo)
    finally:
        done.set()
        thread.join()
    assert "is a pipe (FIFO), not a regular file" in err


def test_messages_lose_escape_sequences_and_are_cut_at_a_word(small):
    from lightning_dualform.cli.inputs import brief, clean_text

    assert clean_text("\x1b[1mbold\x1b[0m and\nmore\x07") == "bold and more"
    text = brief("a long message " * 20, 40)
    assert len(text) <= 44 and text.endswith(" ...") and text[:-4].split(" ")[-1] in ("a", "long", "message")


@pytest.fixture
def printed_warnings(monkeypatch):
    """Warnings printed as a terminal run prints them (pytest records them instead): the default showwarning's
    path, through warnings.formatwarning, which the command sets while it runs."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)  # (a file the garbage collector closes meanwhile)
        monkeypatch.setattr(warnings, "showwarning", show)
        yield


def test_warnings_read_as_one_line_once_and_verify_is_not_told_to_run_verify(small, capsys, tmp_path,
                                                                             printed_warnings):
    import warnings

    import shutil

    before = warnings.formatwarning
    store = tmp_path / "s.h5"
    shutil.copyfile(small, store)
    (tmp_path / "s.h5.journal").write_bytes(b"")  # removed with a warning and a log record: said once
    rc, _, err = run(capsys, "info", store)
    assert rc == 0 and err.splitlines() == [
        f"lightning-dualform: warning: {store}: removed the empty journal of a write session killed as it began (the "
        "store was not changed)."], err
    with h5py.File(store, "r+") as f:
        f["layers/net.2/weight_final"][0, 0] += 1.0
    rc, _, err = run(capsys, "verify", store)
    lines = err.splitlines()
    assert rc == 1 and lines and all(x.startswith("lightning-dualform: warning: ") for x in lines), err
    assert "It is damaged or was rewritten." in err and "run `lightning-dualform verify`" not in err
    assert len(lines) == len(set(lines)) and "RuntimeWarning" not in err and ".py:" not in err
    rc, _, err = run(capsys, "attend", store, "--index", "0", "--top-k", "1", "--layer", "net.2", "--no-influence")
    assert rc == 0 and "It is damaged or was rewritten; run `lightning-dualform verify` on it." in err
    assert warnings.formatwarning is before  # put back after the command


def test_demo_refuses_a_seed_or_limit_it_cannot_take_before_training(capsys, tmp_path, monkeypatch):
    import lightning_dualform.cli.demo as demo_module

    def never(*a, **k):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(demo_module, "run_demo", never)
    out = tmp_path / "d"
    err = _one_line(capsys, "demo", "--out", out, "--seed", "-1", "--no-plot")
    assert "--seed -1: expected an integer from 0 to 4294967295" in err
    err = _one_line(capsys, "demo", "--out", out, "--limit", "20000", "--no-plot")
    assert "--limit 20000: the demo has 10,000 digits; use --limit 10000 or less" in err
    from lightning_dualform.datasets import load_images

    assert len(load_images("mnist")[1]) == demo_module.DEMO_DIGITS
    assert not out.exists()


def test_demo_help_and_docs_give_the_store_s_size_per_epoch_as_the_plan_does(capsys):
    """The demo's layers over its 8,000 training digits in batches of 128, as the callback plans them (a measured
    epoch added 127.6 MB; the help said 150 MB and docs/cli.md 165 MB)."""
    from lightning_dualform.record.planner import estimate

    shapes = {"net.0": ("linear", 784, 800, True), "net.2": ("linear", 800, 800, True), "net.4": ("linear", 800, 10, True)}
    plan = estimate({n: 128 for n in shapes}, shapes, itemsize=4, steps_per_epoch=-(-8000 // 128), epochs=1)
    rc, out, _ = run(capsys, "demo", "--help")
    said = [float(re.search(r"about (\d+) MB", " ".join(out.split())).group(1))]
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")).read()
    said.append(float(re.search(r"`DIR/mnist.h5` \(about (\d+) MB per epoch", docs).group(1)))
    for mb in said:
        assert abs(mb * 1e6 / plan.bytes_per_epoch - 1) < 0.05, (mb, plan.bytes_per_epoch)


def test_debug_shows_the_traceback(small, capsys):
    rc, out, err = run(capsys, "attend", small, "--layer", "fc9", "--debug")
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("lightning-dualform: error:")


# -- a store of an element-wise optimizer (AdamW) ---------------------------------------------------------
@pytest.fixture(scope="module")
def adamw(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli-adamw") / "adamw.h5")

    class AdamWClassifier(Classifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    model = AdamWClassifier()
    cb = DualFormCallback(path, record_queries=("test",))
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], gradient_clip_val=0.5, **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=64, seed=0), batch_size=16, shuffle=True))
    trainer.test(model, torch.utils.data.DataLoader(IndexedDataset(n=20, seed=1), batch_size=8), verbose=False)
    return path


def test_info_names_the_optimizer_and_its_rule(adamw, capsys, tmp_path):
    rc, out, err = run(capsys, "info", adamw, "--json", tmp_path / "i.json")
    assert rc == 0, err
    assert "AdamW" in out and "betas=(0.9, 0.999)" in out and "rule       adam (exact: element-wise" in out
    facts = json.loads((tmp_path / "i.json").read_text())
    assert facts["update_rule"] == "adam" and facts["form"] == "element-wise" and facts["format_version"] == FORMAT_VERSION


def test_attend_on_adamw_ranks_by_unit_scores_and_says_so(adamw, capsys, tmp_path):
    out_json = tmp_path / "u.json"
    rc, out, err = run(capsys, "attend", adamw, "--index", "3", "--top-k", "3", "--json", out_json)
    assert rc == 0, err
    assert "-(Q_s[u] (.) k) . q" in out and "attention weights for unit" in out
    got = json.loads(out_json.read_text())
    assert got["settings"]["score"] == "auto"
    assert {got["layers"][n]["score"] for n in got["layers"]} == {"unit"}
    with DualInference(adamw, device="cpu") as di:
        qs = di.store.queries("test")
        pos = int(np.flatnonzero(qs.index == 3)[0])
        for name in di.layers:  # every layer ranks by its own predicted unit; the last by the model's prediction
            rows = qs.layer_rows(name)
            want = di.attend(name, rows["keys"][rows["example"] == pos], top_k=3, contribution_to="pred",
                             step_buckets=20).to_dict()
            _assert_same(got["layers"][name], want)
    rc, out, err = run(capsys, "attend", adamw, "--index", "3", "--top-k", "3", "--score", "raw", "--json", out_json)
    assert rc == 0, err
    assert "similarity k . q" in out and {json.loads(out_json.read_text())["layers"][n]["score"] for n in ("net.0", "net.2")} == {"raw"}
    rc, _, err = run(capsys, "attend", adamw, "--index", "3", "--contribution-to", "none")
    assert rc == 2 and "--score raw" in err
    png = tmp_path / "u.png"
    rc, _, err = run(capsys, "--quiet", "attend", adamw, "--index", "0:2", "--top-k", "2", "--plot", png)
    assert rc == 0, err
    assert_png(png)


def test_verify_checks_the_replay_and_the_unit_decomposition(adamw, capsys, tmp_path):
    rc, out, err = run(capsys, "verify", adamw, "--json", tmp_path / "v.json")
    assert rc == 0, err
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["ok"] and all(l["worst"] < 1e-5 for l in v["layers"])
    broken = tmp_path / "broken.h5"
    broken.write_bytes(open(adamw, "rb").read())
    with h5py.File(broken, "r+") as f:
        f["layers/net.0/state/weight/exp_avg_sq"][0, 0] = 5.0  # a wrong initial second moment: the replay drifts
    rc, out, err = run(capsys, "verify", broken)  # the state's checksum (format 4) refuses the file
    assert rc == 2 and "initial optimizer state or parameters changed" in err
    with h5py.File(broken, "r+") as f:  # as a format-3 store without checksums: the replay's verdict
        f.attrs["format_version"] = 3  # (bound by every layer's attribute checksum: all go)
        for g in f["layers"].values():
            for key in [k for k in g.attrs if k.startswith("certificate_") and k.endswith("crc32")]:
                del g.attrs[key]
    rc, out, err = run(capsys, "verify", broken)
    assert rc == 1 and "FAIL" in out


def test_demo_with_adamw(tmp_path, capsys):
    out = str(tmp_path / "d")
    rc, printed, err = run(capsys, "demo", "--out", out, "--epochs", "1", "--limit", "300", "--quiet", "--optimizer", "adamw")
    assert rc == 0, err
    assert "AdamW lr 0.001" in printed and "exact" in printed
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["optimizer"] == "adamw" and all(c["exact"] for c in summary["certificate"].values())
    assert_png(os.path.join(out, "attend.png"))


def test_at_step_says_when_the_ranked_unit_is_an_earlier_model_s_argmax(demo, capsys):
    # at an earlier step the output layer's argmax (whose proponents are ranked) may not be the trained model's
    # prediction shown above it: the line says which it is
    store = os.path.join(demo[0], "mnist.h5")
    rc, out, err = run(capsys, "attend", store, "--index", "all", "--layer", "net.4", "--at-step", "1",
                       "--top-k", "1", "--no-influence")
    assert rc == 0, err
    pred, notes = None, {True: 0, False: 0}
    for line in out.splitlines():
        if m := re.search(r"predicted (\d+)", line):
            pred = int(m.group(1))
        if m := re.match(r"\s+proponents of output unit (\d+)(.*)", line):
            differs = int(m.group(1)) != pred
            assert ("the trained model predicts" in m.group(2)) == differs, line
            notes[differs] += 1
    assert notes[True] and notes[False], notes  # both cases met in this store
    rc, out, _ = run(capsys, "attend", store, "--index", "all", "--layer", "net.4", "--top-k", "1", "--no-influence")
    assert rc == 0 and "the trained model predicts" not in out
