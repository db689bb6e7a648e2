"""Influence: the scoring kernels against dense einsums, the targets, the result type, DualInference's door and
the refusals of the replaying methods. (The methods against autograd through a whole training: test_metagradient.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dualform import DualFormRecorder, DualInference, StoreReader
from lightning_dualform.attribute import influence
from lightning_dualform.attribute.kernels import elementwise_scores, scalar_scores
from lightning_dualform.attribute.model import QueryFactors
from lightning_dualform.attribute.targets import evaluate

torch.set_default_dtype(torch.float32)


def _dense(fac: QueryFactors, keys, values, q_w, q_b):
    """``<D_q, Q (.) v k^T> + <gb_q, Qb (.) v>`` with every matrix written out."""
    d = torch.einsum("npo,npi->noi", fac.g, fac.x)
    rows = values[:, :, None] * keys[:, None, :]
    qw = q_w if q_w.dim() == 3 else q_w[None].expand(rows.shape)
    out = torch.einsum("noi,boi->nb", d, qw * rows)
    if q_b is not None:
        out = out + torch.einsum("no,bo->nb", fac.g.sum(1), q_b * values)
    return out


@pytest.mark.parametrize("P,d_in,d_out", [(1, 6, 4), (3, 5, 4), (9, 3, 2)])
def test_scalar_scores_equal_the_dense_sum(P, d_in, d_out):
    g = torch.Generator().manual_seed(P)
    n, B = 4, 7
    fac = QueryFactors(torch.randn(n, P, d_in, generator=g, dtype=torch.float64),
                       torch.randn(n, P, d_out, generator=g, dtype=torch.float64))
    k = torch.randn(B, d_in, generator=g, dtype=torch.float64)
    v = torch.randn(B, d_out, generator=g, dtype=torch.float64)
    c_w, c_b = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    got = scalar_scores(fac, k, v, c_w, c_b)
    want = _dense(fac, k, v, c_w[:, None, None].expand(B, d_out, d_in), c_b[:, None])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("P", [1, 4])
def test_elementwise_scores_equal_the_dense_sum(P):
    g = torch.Generator().manual_seed(10 + P)
    n, B, d_in, d_out = 5, 6, 7, 3
    fac = QueryFactors(torch.randn(n, P, d_in, generator=g, dtype=torch.float64),
                       torch.randn(n, P, d_out, generator=g, dtype=torch.float64))
    k = torch.randn(B, d_in, generator=g, dtype=torch.float64)
    v = torch.randn(B, d_out, generator=g, dtype=torch.float64)
    q_w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    q_b = torch.randn(d_out, generator=g, dtype=torch.float64)
    torch.testing.assert_close(elementwise_scores(fac, k, v, q_w, q_b), _dense(fac, k, v, q_w, q_b),
                               rtol=1e-10, atol=1e-12)
    # a scalar coefficient takes the scalar path
    torch.testing.assert_close(elementwise_scores(fac, k, v, -0.5, None),
                               _dense(fac, k, v, torch.full((d_out, d_in), -0.5, dtype=torch.float64), None))


def test_targets():
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    want = torch.stack([z[0, 0] - torch.logsumexp(z[0, [1, 2]], 0), z[1, 2] - torch.logsumexp(z[1, [0, 1]], 0)])
    torch.testing.assert_close(evaluate("margin", z, y), want)
    torch.testing.assert_close(evaluate("logit", z, y), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(evaluate("loss", z, y), nn.functional.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(evaluate(lambda o, t: o.sum(1), z, y), z.sum(1))
    with pytest.raises(ValueError, match="0..2"):
        evaluate("margin", z, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="one value per query"):
        evaluate(lambda o, t: o, z, y)


# -- a small recorded run ---------------------------------------------------------------------------------
N, B = 32, 8


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _train(path, model: nn.Module, opt_name: str = "sgd", layers=None):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
    params = model.parameters()
    opt = torch.optim.SGD(params, lr=0.1) if opt_name == "sgd" else torch.optim.AdamW(params, lr=0.01)
    with DualFormRecorder(str(path), model, opt, layers=layers) as rec:
        for e in range(2):
            for idx in torch.randperm(N, generator=g).split(B):
                rec.batch(indices=idx, labels=y[idx], inputs=x[idx], epoch=e)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return x, y


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("inf") / "run.h5"
    model = _model()
    x, y = _train(path, model)
    return path, model, x, y


def test_result_columns_top_and_the_dualinference_door(sgd_run):
    path, model, x, y = sgd_run
    q, t = x[:4] + 0.1, y[:4]
    with DualInference(path) as di:
        res = di.influence(model, q, t)
    with StoreReader(path) as store:
        again = influence(store, model, q, t)
    assert res.scores.shape == (4, N) and list(res.examples) == list(range(N))
    torch.testing.assert_close(res.scores, again.scores)
    assert list(res.labels) == y.tolist()
    pro, opp = res.top(3)
    s = res.scores.numpy()
    for i in range(4):
        order = np.argsort(-s[i], kind="stable")
        assert pro.index[i].tolist() == [int(j) if s[i, j] > 0 else -1 for j in order[:3]]
        assert opp.index[i].tolist() == [int(j) if s[i, j] < 0 else -1 for j in np.argsort(s[i], kind="stable")[:3]]
    assert res.to_dict(2)["proponents"]["index"] == pro.index[:, :2].tolist()
    # the first-order table is linear in df/dy: the loss's table is the margin's reweighted per query, not equal
    loss = influence(path, model, q, t, target="loss")
    assert loss.target == "loss" and not torch.allclose(loss.scores, res.scores)


def test_a_model_that_is_not_the_trained_one_is_refused(sgd_run):
    path, _, x, y = sgd_run
    with pytest.raises(ValueError, match="final weights"):
        influence(path, _model(), x[:2], y[:2])


def test_inputs_and_targets_it_cannot_score_are_refused(sgd_run):
    """Each of these gave a table of NaN (read as "no proponents"), a silently truncated class, an empty table or
    an unrelated error."""
    path, model, x, y = sgd_run
    q, t = x[:4], y[:4]
    with DualInference(path) as di:
        bad = q.clone()
        bad[1, 3] = float("nan")
        with pytest.raises(ValueError, match=r"influence\(inputs=...\)` holds NaN or inf \(query rows \[1\]\)"):
            di.influence(model, bad, t)
        with pytest.raises(ValueError, match=r"influence\(inputs\[0\]=...\)` holds NaN or inf \(query rows \[1\]\)"):
            di.influence(model, (bad,), t, forward=lambda m, b: m(b[0]))
        with pytest.raises(ValueError, match=r"whole class numbers; targets \[0, 1, 2, 3\]"):
            di.influence(model, q, t.float() + 0.7)  # (3.7 was truncated to 3)
        torch.testing.assert_close(di.influence(model, q, t.double()).scores, di.influence(model, q, t).scores)
        with pytest.raises(ValueError, match=r"layers=\[\]\)` names no layer"):
            di.influence(model, q, t, layers=[])
        with pytest.raises(TypeError, match=r"model=...\)` must be the trained torch.nn.Module.*got str"):
            di.influence("model", q, t)
        with pytest.raises(ValueError, match=r"has 2 classes for 4 inputs: pass one class per query \(shape \(4,\)\)"):
            di.influence(model, q, t[:2])
        with pytest.raises(ValueError, match="got 2 targets for the model's 4 outputs"):  # inputs the forward takes
            di.influence(model, (q,), t[:2], forward=lambda m, b: m(b[0]))
        with pytest.raises(TypeError, match="class numbers"):
            di.influence(model, q, t > 0)
        inf_out = nn.Sequential(*model, nn.Threshold(1e30, float("inf")))  # the model's layer names, inf outputs
        for targets in (t, None):
            with pytest.raises(ValueError, match=r"the model's outputs hold NaN or inf for queries \[0, 1, 2, 3\]"):
                di.influence(inf_out, q, targets)
        with pytest.raises(ValueError, match=r"target callable returned NaN or inf for queries \[0"):
            di.influence(model, q, t, target=lambda o, c: o[:, 0] * float("nan"))


def test_the_metagradient_refuses_what_it_cannot_replay(tmp_path, sgd_run):
    path, model, x, y = sgd_run
    # a loss that is not the run's leaves the stored trajectory at the first step the sweep meets
    with pytest.raises(ValueError, match="left the stored run"):
        influence(path, model, x[:2], y[:2], method="metagradient",
                  loss_fn=lambda m, b: 2 * nn.functional.cross_entropy(m(b[0]), b[1]))
    drop = _model(dropout=0.5)
    _train(tmp_path / "drop.h5", drop)
    with pytest.raises(ValueError, match="Dropout"):
        influence(tmp_path / "drop.h5", drop, x[:2], y[:2], method="metagradient")
    part = _model()
    _train(tmp_path / "part.h5", part, layers=["2"])
    with pytest.raises(ValueError, match=r"0\.weight"):
        influence(tmp_path / "part.h5", part, x[:2], y[:2], method="metagradient")
    # first order needs only the recorded layers
    assert influence(tmp_path / "part.h5", part, x[:2], y[:2]).layers == ["2"]
    with pytest.raises(ValueError, match="method"):
        influence(path, model, x[:2], y[:2], method="exact")


# -- a Lightning run, and the CLI ---------------------------------------------------------------------------
def test_cli_influence_and_a_lightning_run(tmp_path, monkeypatch, capsys):
    """A Trainer's store with recorded test queries: the CLI's JSON equals influence() in-process, and the
    metagradient replays the Trainer's run through the LightningModule's own training_step."""
    import json

    import lightning as L
    from helpers import TRAINER_KW, MLP, IndexedDataset

    from lightning_dualform import DualFormCallback
    from lightning_dualform.cli import main

    class Classifier(MLP):
        def test_step(self, batch, batch_idx):
            return self(batch[0])

    path = str(tmp_path / "small.h5")
    model = Classifier()
    trainer = L.Trainer(max_epochs=2, callbacks=[DualFormCallback(path, record_queries=("test",))], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=48, seed=0), batch_size=16, shuffle=True))
    trainer.test(model, torch.utils.data.DataLoader(IndexedDataset(n=6, seed=1), batch_size=6), verbose=False)
    (tmp_path / "inf_models.py").write_text("from helpers import MLP\n\ndef make():\n    return MLP()\n")
    monkeypatch.chdir(tmp_path)
    rc = main(["influence", path, "--model", "inf_models:make", "--index", "0:3", "--top-k", "4", "--json",
               str(tmp_path / "fo.json"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "proponent" in out and "margin" in out
    got = json.loads((tmp_path / "fo.json").read_text())
    with StoreReader(path) as store:
        qs = store.queries("test")
        x, y = torch.as_tensor(qs.inputs_at(np.arange(3))), torch.as_tensor(qs.label[:3])
        want = influence(store, model, x, y)
        exact = influence(store, model, x, y, method="metagradient")
    assert got["proponents"]["index"] == want.top(4)[0].index.tolist()
    assert got["targets"] == y.tolist()
    assert exact.replay.grad_error < 1e-5 and exact.replay.max_final_error < 1e-5
    rc = main(["influence", path, "--model", "inf_models:make", "--index", "0:3", "--method", "metagradient",
               "--json", str(tmp_path / "mg.json"), "--quiet"])
    capsys.readouterr()
    mg = json.loads((tmp_path / "mg.json").read_text())
    assert rc == 0 and mg["replay"]["grad_error"] < 1e-5
    assert mg["proponents"]["index"] == exact.top(5)[0].index.tolist()
    assert main(["influence", path, "--model", "no_such_module:make", "--quiet"]) == 2


def test_which_examples_is_the_views_answer(sgd_run):
    from lightning_dualform.attribute import which_examples

    path, model, x, y = sgd_run
    got = which_examples(path, model, x[:2], top_k=3)
    res = influence(path, model, x[:2], model(x[:2]).argmax(-1))
    pro, opp = res.top(3)
    assert got["target"] == "margin" and "final model" in got["meaning"]
    assert [p["index"] for p in got["queries"][0]["proponents"]] == [i for i in pro.index[0].tolist() if i >= 0]
    assert [o["index"] for o in got["queries"][1]["opponents"]] == [i for i in opp.index[1].tolist() if i >= 0]
