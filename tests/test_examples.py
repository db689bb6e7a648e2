"""Every example runs end to end with a tiny setting and writes its figures and tables."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY = ["--max-steps", "3", "--queries", "6", "--quiet", "--vote-queries", "8", "--train-queries", "4", "--picks", "1"]


def example(name: str):
    """Import ``examples/<name>.py`` as a module (its folder on sys.path, as when run as a script)."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _outputs(out, names):
    for n in names:
        path = os.path.join(out, n)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, f"{n} was not written"


TABLES = ["votes.md", "summary.json"]
CLASSIFIER_OUTPUTS = [*TABLES, "topk.png", "score_curves.png", "top_steps.png", "class_mass.png"]


@pytest.mark.parametrize("name", ["mnist_mlp", "cifar10", "multitask", "continual", "char_lm"])
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        example(name).main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--max-steps" in text and "(default:" in text


def test_script_runs_as_a_script():
    res = subprocess.run([sys.executable, os.path.join(EXAMPLES, "mnist_mlp.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--data-dir" in res.stdout


def test_mnist_mlp_embedded(tmp_path):
    """Two seeds: every seed's measures, mean ± std, seed 0's figures and store (the recorded-query analyses are
    checked on the AdamW run, the IDX run and the other examples)."""
    out = str(tmp_path / "m")
    assert example("mnist_mlp").main([*TINY, "--hidden", "16", "--seeds", "2", "--vote-queries", "4", "--no-legacy",
                                      "--out", out]) == 0
    assert not [f for f in CLASSIFIER_OUTPUTS if os.path.exists(os.path.join(out, f))]  # --no-legacy
    _study_outputs(out, ["test", "train", "ood"], picks=("test", "ood"))
    results = json.load(open(os.path.join(out, "paper_results.json")))
    assert [r["seed"] for r in results] == [0, 1] and all(r["steps"] == 3 for r in results)
    from lightning_dualform import StoreReader

    with StoreReader(os.path.join(out, "mnist.h5")) as s:  # seed 0's store is kept, and certified
        assert s.last_step == 3 and all(s.layer(n).attrs["certificate_rel_err"] < 1e-4 for n in s.layers)
    assert not os.path.exists(os.path.join(out, "seed1", "mnist.h5"))  # later seeds' stores are removed
    tables = open(os.path.join(out, "paper_tables.md")).read()
    assert "Seeds: 2 (0, 1)" in tables and " ± " in tables and "standardised pixels" in tables
    # --from-store: seed 0's store analysed again, with the model rebuilt from its final weights: the same measures
    again = str(tmp_path / "again")
    args = [*TINY, "--hidden", "16", "--vote-queries", "4", "--no-legacy", "--no-figures", "--seeds", "1"]
    assert example("mnist_mlp").main([*args, "--from-store", os.path.join(out, "mnist.h5"), "--out", again]) == 0
    redo = json.load(open(os.path.join(again, "paper_results.json")))[0]
    assert redo["sets"] == results[0]["sets"] and redo["test_accuracy"] == results[0]["test_accuracy"]
    assert redo["steps"] == 3 and redo["from_store"] == os.path.abspath(os.path.join(out, "mnist.h5"))
    assert os.path.isfile(os.path.join(out, "mnist.h5"))  # a store given by --from-store is kept
    wrong_width = [*args, "--hidden", "8", "--from-store", os.path.join(out, "mnist.h5"), "--out", again]
    assert example("mnist_mlp").main(wrong_width) == 2


def _study_outputs(out, sets, picks=("test",)):
    """The paper's measures: both scores named in every table, per query set, layer and seed; the figures of seed 0."""
    tables = open(os.path.join(out, "paper_tables.md")).read()
    assert "| net.1 | abs |" in tables and "| net.1 | signed |" in tables and "|k·q|" in tables
    results = json.load(open(os.path.join(out, "paper_results.json")))
    for r in results:
        assert set(r["sets"]) == set(sets)
        for s in sets:
            for layer in r["layers"]:
                for score in ("abs", "signed"):
                    v = r["sets"][s]["layers"][layer][score]["votes"]
                    assert 0 <= v["all_prediction"] <= 1 and v["n_correct"] + v["n_wrong"] == r["sets"][s]["n"]
    for p in picks:  # the first correct and the first wrong pick (a tiny model may have no correct or no wrong one)
        kinds = [k for k in ("correct", "wrong") if os.path.isfile(os.path.join(out, f"study_{p}_{k}_rank_abs.png"))]
        assert kinds
        for k in kinds:
            for f in ("rank_abs", "rank_signed", "top_abs", "top_signed", "class_curves_abs", "example_totals_abs"):
                assert os.path.isfile(os.path.join(out, f"study_{p}_{k}_{f}.png"))
    if not picks:
        assert not [f for f in os.listdir(out) if f.startswith("study_")]


def test_paper_flag_sets_the_authors_values():
    mod = example("mnist_mlp")
    import common
    import study

    p = common.parser("x", max_steps=300, lr=3e-3)
    study.add_study_args(p)
    a = study.parse(p, ["--paper"], mod.PAPER)
    assert (a.max_steps, a.dtype, a.seeds, a.picks, a.train_queries, a.batch_size, a.lr, a.momentum, a.clip) == \
        (5000, "float16", 5, 10, 1000, 128, 3e-3, 0.9, 1.0)
    assert study.parse(p, ["--paper", "--max-steps", "7"], mod.PAPER).max_steps == 7  # an explicit value wins
    # ... even when it is the option's default
    a = study.parse(p, ["--paper", "--max-steps=300", "--dtype", "float32", "--seeds", "1", "--picks", "2"], mod.PAPER)
    assert (a.max_steps, a.dtype, a.seeds, a.picks, a.train_queries) == (300, "float32", 1, 2, 1000)
    a = study.parse(p, [], mod.PAPER)
    assert (a.max_steps, a.dtype, a.seeds, a.picks) == (300, "float32", 1, 2)
    # the character LM's own --paper goes through the same parse
    q = common.parser("y", max_steps=200, lr=0.5)
    q.add_argument("--paper", action="store_true")
    assert (common.parse_paper_args(q, ["--paper", "--lr", "0.5"], {"lr": 1e-3, "max_steps": 5000}).lr,
            common.parse_paper_args(q, ["--paper"], {"lr": 1e-3, "max_steps": 5000}).lr) == (0.5, 1e-3)


def test_figures_option():
    example("mnist_mlp")
    import common
    import study

    p = common.parser("x", max_steps=300, lr=3e-3)
    study.add_study_args(p)
    kinds = lambda argv: {k for k in study.FIGURE_KINDS if study.draws(study.parse(p, argv, {}), k)}  # noqa: E731
    assert kinds([]) == kinds(["--figures", "all"]) == {"study", "analyses"}
    assert kinds(["--figures", "analyses"]) == {"analyses"}
    assert kinds(["--figures", "study,analyses"]) == kinds(["--figures", " analyses , study"]) == {"study", "analyses"}
    assert kinds(["--no-figures"]) == kinds(["--figures", "none"]) == set()
    with pytest.raises(SystemExit):
        study.parse(p, ["--figures", "topk"], {})


def test_mnist_mlp_adamw_beside_sgd(tmp_path):
    out = str(tmp_path / "a")
    assert example("mnist_mlp").main([*TINY, "--hidden", "16", "--out", out, "--optimizer", "adamw"]) == 0
    _outputs(out, CLASSIFIER_OUTPUTS + ["sgd_vs_adamw.png", "mnist_sgd.h5"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["optimizer"] == "adamw" and all(v < 1e-4 for v in summary["certificate"].values())
    assert summary["steps"] == 3 and summary["queries"] == 6 and summary["standardized"] is True
    assert "| net.1 |" in open(os.path.join(out, "votes.md")).read()
    from lightning_dualform import StoreReader

    with StoreReader(os.path.join(out, "mnist.h5")) as s, StoreReader(os.path.join(out, "mnist_sgd.h5")) as t:
        assert (s.update_rule, t.update_rule) == ("adam", "sgd")


def _idx(path: str, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_mnist_mlp_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "idx"
    d.mkdir()
    _idx(str(d / "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (64, 28, 28)))
    _idx(str(d / "train-labels-idx1-ubyte.gz"), rng.integers(0, 10, 64))
    _idx(str(d / "t10k-images-idx3-ubyte"), rng.integers(0, 256, (16, 28, 28)))
    _idx(str(d / "t10k-labels-idx1-ubyte"), rng.integers(0, 10, 16))
    mod = example("mnist_mlp")
    x, y, tx, ty = mod.load_idx_dir(str(d))
    assert x.shape == (64, 28, 28) and y.shape == (64,) and tx.shape == (16, 28, 28)
    out = str(tmp_path / "o")
    assert mod.main([*TINY, "--hidden", "8", "--batch-size", "16", "--data-dir", str(d), "--no-figures", "--raw-pixels",
                     "--no-legacy", "--out", out]) == 0
    assert "64 training / 16 test digits, raw [0, 1] pixels" in open(os.path.join(out, "paper_tables.md")).read()
    # a truncated file and a missing one are clean errors
    with open(d / "t10k-labels-idx1-ubyte", "r+b") as fh:
        fh.truncate(12)
    with pytest.raises(ValueError, match="truncated"):
        mod.read_idx(str(d / "t10k-labels-idx1-ubyte"))
    os.remove(d / "t10k-labels-idx1-ubyte")
    assert mod.main([*TINY, "--data-dir", str(d), "--out", out]) == 2


def _fake_cifar(d, n: int = 24, protocol: int = 2) -> None:
    """The standard python batches, tiny: dicts of bytes keys, a uint8 (n, 3072) array and a label list."""
    rng = np.random.default_rng(0)
    os.makedirs(d, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}
        with open(os.path.join(d, name), "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_cifar10_on_a_fake_directory(tmp_path, model):
    d = str(tmp_path / "cifar-10-batches-py")
    _fake_cifar(d, protocol=2 if model == "mlp" else pickle.HIGHEST_PROTOCOL)
    out = str(tmp_path / "o")
    args = [*TINY, "--model", model, "--hidden", "16", "--channels", "2", "--batch-size", "16", "--data-dir", d, "--out", out,
            "--no-figures"]
    assert example("cifar10").main(args) == 0
    _outputs(out, TABLES)
    assert not [f for f in os.listdir(out) if f.endswith(".png")]  # --no-figures: none at all
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["train_examples"] == 5 * 24 and summary["model"] == model
    assert summary["analysed_layers"][-1] == ("net.5" if model == "mlp" else "net.5")
    assert all(v < 1e-4 for v in summary["certificate"].values())


def test_cifar10_missing_files_and_hostile_pickles(tmp_path, capsys):
    mod = example("cifar10")
    assert mod.main(["--out", str(tmp_path / "o")]) == 2
    assert "not embedded" in capsys.readouterr().err
    d = tmp_path / "c"
    _fake_cifar(str(d), n=4)
    os.remove(d / "test_batch")
    assert mod.main(["--data-dir", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "test_batch" in capsys.readouterr().err

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(d / "evil", "wb") as fh:
        pickle.dump({b"data": Boom()}, fh)
    with pytest.raises(ValueError, match="refusing to load"):
        mod.load_batch(str(d / "evil"))
    assert not (tmp_path / "pwned").exists()
    with open(d / "wrong", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match="3072"):
        mod.load_batch(str(d / "wrong"))


def test_multitask(tmp_path):
    out = str(tmp_path / "mt")
    assert example("multitask").main([*TINY, "--hidden", "16", "--limit", "256", "--no-figures", "--out", out]) == 0
    _outputs(out, TABLES)  # the figures of the analyses are drawn by the AdamW and continual runs
    assert not [f for f in os.listdir(out) if f.endswith(".png")]
    summary = json.load(open(os.path.join(out, "summary.json")))
    for share in summary["task_share"].values():
        assert sum(share) == pytest.approx(1.0)
    assert "## Attention per task" in open(os.path.join(out, "votes.md")).read()
    _study_outputs(out, ["test_mnist", "train_mnist", "test_fashion", "train_fashion"], picks=())  # --no-figures
    r = json.load(open(os.path.join(out, "paper_results.json")))[0]
    same = r["sets"]["test_mnist"]["layers"]["net.1"]["abs"]["top500_same_dataset"]["MNIST"]
    assert 0 <= same <= 1


def test_continual(tmp_path):
    out = str(tmp_path / "cl")
    assert example("continual").main(["--max-steps", "4", "--switch-step", "2", "--queries", "6", "--quiet", "--hidden", "16",
                                      "--buckets", "4", "--vote-queries", "6", "--train-queries", "4", "--picks", "1",
                                      "--figures", "analyses", "--out", out]) == 0
    _outputs(out, [*CLASSIFIER_OUTPUTS, "task_mass.png", "mass_over_steps.png"])
    assert not [f for f in os.listdir(out) if f.startswith("study_")]  # --figures analyses: no per-query figures
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["switch_step"] == 2 and 0 <= summary["mnist_accuracy_at_switch"] <= 1
    assert "## Forgetting" in open(os.path.join(out, "paper_tables.md")).read()
    assert example("continual").main(["--max-steps", "4", "--switch-step", "4", "--out", out]) == 2


def test_continual_sampler_switches_tasks():
    mod = example("continual")
    batches = list(mod.TaskSwitchBatches(np.arange(10), 100 + np.arange(10), 3, 2, 4, seed=0))
    assert len(batches) == 5
    assert all(max(b) < 10 for b in batches[:3]) and all(min(b) >= 100 for b in batches[3:])


def test_char_lm(tmp_path):
    out = str(tmp_path / "lm")
    args = ["--max-steps", "3", "--queries", "2", "--quiet", "--hidden", "8", "--embed", "4", "--seq-len", "8",
            "--max-chars", "4000", "--modules", "textwrap", "--positions", "2", "--out", out]
    assert example("char_lm").main(args) == 0
    _outputs(out, ["contexts.md", "votes.md", "top_steps.png", "summary.json"])
    text = open(os.path.join(out, "contexts.md")).read()
    assert "cell.proj:" in text and "head:" in text and "(step " in text
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert "cell.proj" in summary["layers"] and all(v < 1e-4 for v in summary["certificate"].values())
