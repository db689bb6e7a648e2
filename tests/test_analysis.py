"""The paper's analyses against hand computations and dense references."""

from __future__ import annotations

import math

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from helpers import MLP, TRAINER_KW, IndexedDataset, loader

from lightning_dualform import DualFormCallback, DualInference
from lightning_dualform.analysis import (
    attend_queries,
    attend_recorded,
    class_mass,
    markdown_table,
    score_curves,
    step_histogram,
    task_mass,
    top_rows,
    top_score_steps,
    vote_table,
    votes,
)
from lightning_dualform.optim import ParamUpdate
from lightning_dualform.store import LayerSpec, StepRows, StoreWriter

# one layer, keys are unit vectors whose direction names the class: class c's mass is easy to add by hand
KEYS = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 1]], dtype=np.float32)
LABELS = np.array([0, 0, 1, 2, 2, 2])
QUERIES = np.array([[1, 0, 0], [0, 3, 0], [0, 0, 1], [1, 1, 1], [2, 0, 0.5]], dtype=np.float32)
# mass per class (2 q0, q1, 3 q2): q0 (2,0,0) q1 (0,3,0) q2 (0,0,3) q3 (2,1,3) q4 (4,0,1.5) -> votes 0 1 2 2 0
Q_LABEL = np.array([0, 1, 0, 1, 0])
Q_PRED = np.array([0, 1, 2, 2, 2])


def _hand_store(path: str) -> str:
    w0 = np.zeros((2, 3), np.float32)
    spec = LayerSpec(name="fc", kind="linear", d_in=3, d_out=2, has_bias=False, weight_init=w0, bias_init=None)
    st = StoreWriter.create(path, [spec])
    for step in range(2):  # step 0: rows 0..2, step 1: rows 3..5
        sl = slice(3 * step, 3 * step + 3)
        rows = StepRows(
            keys=KEYS[sl],
            values=np.ones((3, 2), np.float32),
            index=np.arange(6)[sl],
            position=np.zeros(3, np.int32),
            label=LABELS[sl],
            step=step,
            epoch=0,
        )
        st.add_step(step, 0, {"fc": rows}, {"fc": (1.0, ParamUpdate(lr=0.1), None)})
    w_final = -0.1 * np.ones((2, 6), np.float32) @ KEYS
    st.finalize({"fc": (w_final, None)}, final_step=2, epochs=1)
    return path


def test_vote_table_of_a_hand_made_store(tmp_path):
    path = _hand_store(str(tmp_path / "hand.h5"))
    with DualInference(path, accumulate=torch.float64) as di:
        res = di.attend("fc", torch.from_numpy(QUERIES), top_k=2)
    assert float(res.max_rel_err) < 1e-6  # the store is consistent: the dual equals the final weights
    classes, mass = class_mass(res)
    np.testing.assert_array_equal(classes, [0, 1, 2])
    np.testing.assert_allclose(mass, [[2, 0, 0], [0, 3, 0], [0, 0, 3], [2, 1, 3], [4, 0, 1.5]])
    np.testing.assert_array_equal(votes(classes, mass), [0, 1, 2, 2, 0])

    table = vote_table({"fc": res}, Q_LABEL, Q_PRED)
    row = table.rows[0]
    # correct: q0, q1 (both vote right); wrong: q2 (vote 2 = pred), q3 (vote 2 = pred), q4 (vote 0 = label)
    assert (row.n_correct, row.n_wrong) == (2, 3)
    assert row.label_correct == 1.0
    assert row.label_wrong == pytest.approx(1 / 3) and row.pred_wrong == pytest.approx(2 / 3)
    assert row.label_all == pytest.approx(3 / 5) and row.pred_all == pytest.approx(4 / 5)
    assert table.accuracy == pytest.approx(2 / 5)
    md = table.to_markdown()
    assert "| fc | 100.0 | 33.3 | 66.7 | 60.0 | 80.0 |" in md
    assert md.count("\n") == 3

    # several rows per example (a sequence, conv locations): masses add up per example
    two = {"fc": di_attend(path, np.concatenate([QUERIES, QUERIES]))}
    ex = np.concatenate([np.arange(5), np.arange(5)])
    assert vote_table(two, Q_LABEL, Q_PRED, example={"fc": ex}).rows[0] == row
    with pytest.raises(ValueError, match="pass `example`"):
        vote_table(two, Q_LABEL, Q_PRED)

    # top rows and their steps: q3 = (1,1,1) scores 1 everywhere, q0 prefers rows 0 and 1 (step 0)
    assert sorted(r["row"] for r in top_rows(res, 0)) == [0, 1]
    assert top_score_steps(res)[0].tolist() == [0, 0]
    edges, counts = step_histogram(res, first_step=0, bins=2)
    assert edges.tolist() == [0.0, 1.0, 2.0] and counts.sum() == 10


def di_attend(path: str, q: np.ndarray):
    with DualInference(path, accumulate=torch.float64) as di:
        return di.attend("fc", torch.from_numpy(q), top_k=1)


def test_vote_of_an_empty_group_is_nan(tmp_path):
    path = _hand_store(str(tmp_path / "hand.h5"))
    res = di_attend(path, QUERIES)
    table = vote_table({"fc": res}, Q_PRED, Q_PRED)  # all correct
    assert math.isnan(table.rows[0].label_wrong)
    assert "–" in table.to_markdown()


class TestedMLP(MLP):
    def test_step(self, batch, batch_idx):
        return self(batch[0])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny real fit with recorded test queries."""
    d = tmp_path_factory.mktemp("fit")
    path = str(d / "run.h5")
    torch.manual_seed(0)
    model = TestedMLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    cb = DualFormCallback(path, record_queries=("test",))
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, loader(IndexedDataset(64)))
    trainer.test(model, loader(IndexedDataset(20, seed=1), shuffle=False), verbose=False)
    return path, model


def _dense(path: str, layer: str):
    with h5py.File(path, "r", locking=False) as f:
        g = f["layers"][layer]
        n = int(g["committed_rows"][0])
        return {c: g[c][:n] for c in ("keys", "label", "index", "step", "epoch")}


def test_recorded_votes_against_dense_reference(fitted):
    path, _ = fitted
    with DualInference(path, accumulate=torch.float64) as di:
        run = attend_recorded(di, "test", top_k=3)
        table = vote_table(run)
        qs = di.store.queries("test")
        assert run.layers == ["net.0", "net.2"] and len(run.index) == qs.n == 20
        for row in table.rows:
            mem = _dense(path, row.layer)
            scores = run.keys[row.layer].astype(np.float64) @ mem["keys"].T.astype(np.float64)
            mass = np.stack([scores[:, mem["label"] == c].sum(1) for c in range(3)], 1)
            v = mass.argmax(1)
            ok = qs.label == qs.prediction
            assert row.label_all == pytest.approx((v == qs.label).mean())
            assert row.pred_all == pytest.approx((v == qs.prediction).mean())
            if (~ok).any():
                assert row.pred_wrong == pytest.approx((v == qs.prediction)[~ok].mean())
        # top rows equal the dense top-3
        mem = _dense(path, "net.2")
        scores = run.keys["net.2"].astype(np.float64) @ mem["keys"].T.astype(np.float64)
        best = np.argsort(-scores[4])[:3]
        assert [r["row"] for r in top_rows(run.results["net.2"], 4)] == best.tolist()
        assert top_score_steps(run.results["net.2"])[4].tolist() == mem["step"][best].tolist()
        assert run.queries("net.2", [4]).shape == (1, 8)


def test_attend_queries_without_split_or_queries_names_the_query_sets(fitted):
    # it once asked the store for the query set None ("Record one with DualFormCallback(record_queries=(None,))")
    path, _ = fitted
    with DualInference(path) as di:
        wanted = r"`attend_queries`: pass split=\.\.\. \(the store's query sets: \['test'\]\)"
        with pytest.raises(ValueError, match=wanted):
            attend_queries(di)
        run = attend_queries(di, split="test", positions=[0], top_k=1)
        assert run.index.tolist() == [di.store.queries("test").index[0]]


def test_score_curves_against_dense_reference(fitted):
    path, _ = fitted
    mem = _dense(path, "net.0")
    q = np.random.default_rng(0).normal(size=(2, 6))
    with DualInference(path, accumulate=torch.float64, block_rows=50) as di:  # several blocks
        curves = score_curves(di, "net.0", q)
        by_ex = score_curves(di, "net.0", q, by="example")
        early = score_curves(di, "net.0", q, at_step=5)
    scores = q @ mem["keys"].T.astype(np.float64)
    for i in range(2):
        assert sorted(curves[i]) == [0, 1, 2]
        for c in range(3):
            ref = np.sort(scores[i, mem["label"] == c])[::-1]
            np.testing.assert_allclose(curves[i][c], ref, rtol=1e-10)
            ex = [scores[i, mem["index"] == j].sum() for j in np.unique(mem["index"][mem["label"] == c])]
            np.testing.assert_allclose(by_ex[i][c], np.sort(ex)[::-1], rtol=1e-10)
    assert sum(len(v) for v in early[0].values()) == int((mem["step"] < 5).sum())


def test_task_mass_against_dense_reference(fitted):
    path, _ = fitted
    mem = _dense(path, "net.0")
    q = np.random.default_rng(1).normal(size=(3, 6))
    scores = q @ mem["keys"].T.astype(np.float64)
    with DualInference(path, accumulate=torch.float64, block_rows=37) as di:
        tm = task_mass(di, "net.0", q, {"low": range(0, 32), "high": range(32, 64)})
        assert tm.tasks == ["low", "high"]
        np.testing.assert_allclose(tm.signed[:, 0], scores[:, mem["index"] < 32].sum(1), rtol=1e-10)
        np.testing.assert_allclose(tm.absolute[:, 1], np.abs(scores[:, mem["index"] >= 32]).sum(1), rtol=1e-10)
        np.testing.assert_allclose(tm.share().sum(1), 1.0)
        # by step with a predicate and a leftover "other" column
        tm = task_mass(di, "net.0", q, {"first": lambda s: s < 4, "evens": [4, 6, 8]}, by="step")
        assert tm.tasks == ["first", "evens", "other"]
        other = (mem["step"] >= 4) & ~np.isin(mem["step"], [4, 6, 8])
        np.testing.assert_allclose(tm.signed[:, 2], scores[:, other].sum(1), rtol=1e-10)
        assert tm.rows.tolist() == [
            int((mem["step"] < 4).sum()),
            int(np.isin(mem["step"], [4, 6, 8]).sum()),
            int(other.sum()),
        ]
        with pytest.raises(ValueError, match="by="):
            task_mass(di, "net.0", q, {"a": range(3)}, by="label")
        with pytest.raises(ValueError, match=r"\(n, 6\)"):
            task_mass(di, "net.0", q[:, :4], {"a": range(3)})


def test_markdown_table_escapes_and_formats():
    md = markdown_table(["a", "b|c"], [[1, 0.123456], ["x", float("nan")]])
    assert md.splitlines() == ["| a | b\\|c |", "|---|---|", "| 1 | 0.1235 |", "| x | – |"]
