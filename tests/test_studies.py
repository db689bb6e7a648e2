"""The authors' measures (lightning_dualform.studies) against dense numpy references over a real store."""

from __future__ import annotations

import os

import lightning as L
import numpy as np
import pytest
import torch
from helpers import MLP, TRAINER_KW, IndexedDataset, loader

from lightning_dualform import DualFormCallback, StoreReader
from lightning_dualform.studies import (
    class_spread,
    dataset_ranges,
    fmt_mean_std,
    layer_inputs,
    mean_std,
    pick_queries,
    plot_class_curves,
    plot_example_totals,
    plot_rank_profile,
    plot_top_images,
    scan_layer,
    scan_layer_scores,
    step_ranges,
    vote_rates,
    votes,
)

N, CLASSES = 96, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer MLP trained 2 epochs on 96 examples: 12 steps of 16 rows per layer."""
    path = str(tmp_path_factory.mktemp("studies") / "s.h5")
    torch.manual_seed(0)
    model = MLP(d=6, hidden=8, classes=CLASSES)
    cb = DualFormCallback(path, overwrite=True)
    L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(model, loader(IndexedDataset(N), batch_size=16))
    return path, model


@pytest.fixture(scope="module")
def store(trained):
    """One open reader for the module's tests (each open of a path checks the file in a child process)."""
    with StoreReader(trained[0]) as s:
        yield s


def _dense(store: StoreReader, layer: str):
    lay = store.layer(layer)
    return lay.read(0, lay.n_rows, ("keys", "step", "index", "label"))


def test_layer_inputs_are_what_each_linear_layer_sees(trained):
    _, model = trained
    x = torch.randn(7, 6)
    got = layer_inputs(model, x, batch_size=3)
    with torch.no_grad():
        first = x / 10.0
        second = torch.tanh(model.net[0](first))
    np.testing.assert_allclose(got["net.0"], first.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["net.2"], second.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="not nn.Linear"):
        layer_inputs(model, x, ["net.1"])


@pytest.mark.parametrize("score", ["abs", "signed"])
def test_scan_equals_the_dense_computation(trained, store, score):
    path, model = trained
    x = torch.randn(5, 6)
    q = layer_inputs(model, x)["net.2"]
    d = _dense(store, "net.2")
    s = q.astype(np.float64) @ d["keys"].astype(np.float64).T  # (5, rows)
    if score == "abs":
        s = np.abs(s)
    of = dataset_ranges([40, 56])
    ds = of(d["index"])
    scan = scan_layer(path if score == "abs" else store, "net.2", q, score=score, classes=CLASSES, dataset_of=of,
                      n_datasets=2, top_k=10, group_top_k=4, example_mass=True, n_examples=N, block_rows=7)
    assert scan.score == score and scan.n_rows == len(d["step"]) == 12 * 16
    # totals per dataset and class
    ref = np.zeros((5, 2, CLASSES))
    for j in range(s.shape[1]):
        ref[:, ds[j], d["label"][j]] += s[:, j]
    np.testing.assert_allclose(scan.group_mass, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scan.class_mass, ref.sum(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scan.total, np.abs(s).sum(1), rtol=1e-5)
    # the top rows: highest first, ties to the earlier row
    for i in range(5):
        order = np.lexsort((np.arange(s.shape[1]), -np.round(s[i], 4)))[:10]
        np.testing.assert_allclose(scan.top["score"][i], s[i, order], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(scan.top["step"][i], d["step"][order])
        np.testing.assert_array_equal(scan.top["label"][i], d["label"][order])
        np.testing.assert_array_equal(scan.top["index"][i], d["index"][order])
        np.testing.assert_array_equal(scan.top["dataset"][i], ds[order])
        # per dataset and class: the 4 highest scores, sorted
        for dd in range(2):
            for c in range(CLASSES):
                grp = np.sort(s[i, (ds == dd) & (d["label"] == c)])[::-1][:4]
                np.testing.assert_allclose(scan.group_top["score"][i, dd, c, : len(grp)], grp, rtol=1e-5, atol=1e-6)
    # per training example: the sum over its two presentations
    ref_ex = np.zeros((5, N))
    np.add.at(ref_ex.T, d["index"], s.T)
    np.testing.assert_allclose(scan.example_mass, ref_ex, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scan.example_dataset, of(np.arange(N)))
    # share of the top k
    np.testing.assert_allclose(scan.top_share(3), np.abs(scan.top["score"][:, :3]).sum(1) / np.abs(s).sum(1), rtol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        scan.top_share(11)


def test_both_scores_in_one_pass_equal_two_passes(trained, store):
    _, model = trained
    q = layer_inputs(model, torch.randn(4, 6))["net.0"]
    both = scan_layer_scores(store, "net.0", q, classes=CLASSES, top_k=5)
    for sc in ("abs", "signed"):
        one = scan_layer(store, "net.0", q, score=sc, classes=CLASSES, top_k=5, block_rows=50)
        np.testing.assert_allclose(both[sc].group_mass, one.group_mass, rtol=1e-6)
        np.testing.assert_allclose(both[sc].top["score"], one.top["score"], rtol=1e-5)  # (rows may swap in a near-tie)
    # the signed and absolute scores differ once some k.q are negative (these inputs have both signs)
    assert not np.allclose(both["abs"].group_mass, both["signed"].group_mass)


def test_at_step_reads_only_the_rows_of_that_model(trained, store):
    _, model = trained
    q = layer_inputs(model, torch.randn(2, 6))["net.2"]
    d = _dense(store, "net.2")
    scan = scan_layer(store, "net.2", q, classes=CLASSES, at_step=5, top_k=3)
    keep = d["step"] < 5
    assert scan.n_rows == int(keep.sum())
    np.testing.assert_allclose(scan.total, np.abs(q @ d["keys"][keep].T).sum(1), rtol=1e-5)


def test_bad_arguments_are_refused(trained, store):
    _, model = trained
    path = store
    q = layer_inputs(model, torch.randn(2, 6))["net.2"]
    with pytest.raises(ValueError, match="'abs'"):
        scan_layer(path, "net.2", q, score="absolute")
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        scan_layer(path, "net.2", np.zeros((2, 5)))
    with pytest.raises(ValueError, match="holds label"):
        scan_layer(path, "net.2", q, classes=2)
    with pytest.raises(ValueError, match="outside 0..0"):
        scan_layer(path, "net.2", q, dataset_of=dataset_ranges([40, 56]))
    with pytest.raises(ValueError, match="top_k"):
        scan_layer(path, "net.2", q, top_k=-1)


def test_votes_rates_and_spread_against_hand_computations():
    mass = np.array([[[1.0, 5.0, 2.0]], [[3.0, 1.0, 1.0]], [[0.0, 0.0, 4.0]], [[2.0, 2.0, 2.0]]])  # (4, 1, 3)
    v = votes(mass.sum(1))
    np.testing.assert_array_equal(v, [1, 0, 2, 0])
    label, pred = np.array([1, 2, 2, 1]), np.array([1, 0, 1, 1])
    r = vote_rates(v, label, pred)  # correct: 0, 3; wrong: 1 (pred 0), 2 (pred 1)
    assert (r.n_correct, r.n_wrong) == (2, 2)
    assert r.correct == 0.5 and r.wrong_label == 0.5 and r.wrong_prediction == 0.5
    assert r.all_label == 0.5 and r.all_prediction == 0.5
    spread = class_spread(mass)
    np.testing.assert_allclose(spread[:3, 0], mass[:3, 0].mean(1) / mass[:3, 0].std(1, ddof=1))
    assert np.isnan(spread[3, 0])  # equal totals: no spread to divide by
    with pytest.raises(ValueError, match="3 labels"):
        vote_rates(v, label[:3], pred)


def test_mean_std_is_the_authors_sample_std():
    vals = [0.5, 0.7, 0.9, np.nan]
    m, s = mean_std(vals)
    assert m == pytest.approx(0.7) and s == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert mean_std([0.3]) == (0.3, 0.0)
    assert fmt_mean_std([0.5, 0.7, 0.9]) == "70.0 ± 20.0" and fmt_mean_std([0.25]) == "25.0" and fmt_mean_std([]) == "–"


def test_picks_ranges_and_phases():
    label, pred = np.array([0, 1, 1, 2, 2, 0]), np.array([0, 1, 0, 2, 1, 1])
    right, wrong = pick_queries(label, pred, 2, seed=3)
    assert set(right) <= {0, 1, 3} and len(right) == 2 and set(wrong) <= {2, 4, 5} and len(wrong) == 2
    np.testing.assert_array_equal(pick_queries(label, pred, 2, seed=3)[0], right)  # seeded
    np.testing.assert_array_equal(dataset_ranges([3, 2])(np.array([0, 2, 3, 4])), [0, 0, 1, 1])
    np.testing.assert_array_equal(step_ranges([0, 10])(np.array([0, 9, 10, 20])), [0, 0, 1, 1])


def test_figures_are_drawn(trained, store, tmp_path):
    _, model = trained
    path = store
    q = layer_inputs(model, torch.randn(2, 6))
    scans = {n: scan_layer(path, n, q[n], classes=CLASSES, dataset_of=dataset_ranges([40, 56]), n_datasets=2, top_k=20,
                           group_top_k=5, example_mass=True) for n in ("net.0", "net.2")}
    for fn, name in ((plot_rank_profile, "r.png"), (plot_class_curves, "c.png"), (plot_example_totals, "e.png")):
        out = fn(scans, 1, str(tmp_path / name), dataset_names=("A", "B"))
        assert os.path.getsize(out) > 1000
    seen = []
    out = plot_top_images(scans, 0, str(tmp_path / "t.png"), lambda idx: seen.append(idx) or np.zeros((len(idx), 4, 4)),
                          np.zeros((4, 4)), k=2)
    assert os.path.getsize(out) > 1000
    np.testing.assert_array_equal(seen[0], scans["net.0"].top["index"][0, :2])  # the top rows' examples are drawn
    with pytest.raises(ValueError, match="mix scores"):
        plot_rank_profile(
            {"a": scans["net.0"], "b": scan_layer(path, "net.2", q["net.2"], score="signed")},
            0,
            str(tmp_path / "x.png"),
        )


@pytest.mark.parametrize("seed", range(6))
def test_the_running_top_k_equals_one_sort_of_every_row(seed):
    """The block-by-block merge (with its shortcut once the top is full: only rows above the k-th can enter)
    keeps exactly the k highest of all rows, earlier rows first on ties, NaN and -inf scores last."""
    from lightning_dualform.studies.measures import _empty_top, _merge_top

    rng = np.random.default_rng(seed)
    n, b, k, blocks = int(rng.integers(1, 9)), int(rng.integers(40, 900)), int(rng.integers(1, 120)), 12
    scores = np.round(rng.standard_normal((n, b * blocks)) * (1 + seed % 3), 1)  # coarse: many ties
    scores[rng.random(scores.shape) < 0.01 * (seed % 2)] = np.nan
    scores[rng.random(scores.shape) < 0.01 * (seed % 3 == 0)] = -np.inf
    scores[:, : b // 2] += 5.0 * (seed % 2)  # a strong first block: later blocks mostly prune
    rows = np.arange(b * blocks)
    meta = {"row": rows, "step": rows // 7, "index": rng.integers(0, 500, len(rows)),
            "label": rng.integers(0, 10, len(rows)), "dataset": rng.integers(0, 2, len(rows))}
    top = _empty_top(n, k)
    for s0 in range(0, len(rows), b):
        top = _merge_top(top, scores[:, s0:s0 + b], {c: v[s0:s0 + b] for c, v in meta.items()}, k)
    for i in range(n):
        order = np.lexsort((rows, -np.where(np.isnan(scores[i]), -np.inf, scores[i])))[:k]
        np.testing.assert_array_equal(top["row"][i], order)
        np.testing.assert_array_equal(top["score"][i], scores[i, order])
        for c in ("step", "index", "label", "dataset"):
            np.testing.assert_array_equal(top[c][i], meta[c][order])
