"""The "which examples" views lead with influence (issue 23, "Defaults and views"): the output layer's first-order
influence from the store alone against influence() restricted to that layer and against autograd through the final
layer; explain's default; the CLI's attend and influence without a model; the labels that say what each number is.
(The viewer's API and page: tests/test_view.py.)"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_dualform import DualFormRecorder, DualInference, StoreReader
from lightning_dualform.attribute import influence
from lightning_dualform.attribute.output_layer import output_layer_influence
from lightning_dualform.attribute.targets import margin
from lightning_dualform.attribute.views import influence_answer, influence_label

N, B = 40, 8


def _train(path, opt_name: str, indices: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)
    params = model.parameters()
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3) if opt_name == "sgd"
           else torch.optim.AdamW(params, lr=0.01))
    with DualFormRecorder(str(path), model, opt) as rec:
        for e in range(2):
            for idx in torch.randperm(N, generator=g).split(B):
                rec.batch(indices=idx if indices else None, labels=y[idx], inputs=x[idx], epoch=e)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return model, x, y


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    return {name: (root / f"{name}.h5", *_train(root / f"{name}.h5", name)) for name in ("sgd", "adamw")}


def _hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[1](model[0](x))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_output_layer_influence_is_first_order_through_that_layer(runs, opt):
    """From the store alone (the queries' rows and the stored weights) it equals influence(model, ...) restricted to
    the output layer, which differentiates the model itself: to float32 round-off (the model runs in float32; the
    store-only score takes df/dy from float64 logits)."""
    path, model, x, y = runs[opt]
    q = x[:5] + 0.05
    with StoreReader(path) as store:
        got = output_layer_influence(store, _hidden(model, q))
        pred = model(q).argmax(-1)
        want = influence(store, model, q, pred, layers=["2"])
        every = influence(store, model, q, pred)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got.values, want.values.to(got.values.dtype), rtol=1e-5, atol=1e-6)
    assert got.layers == ["2"] and got.extra["scope"] == "output layer" and got.extra["targets"] == pred.tolist()
    assert list(got.examples) == list(want.examples)
    # the hidden layer's rows add something: the store-only score is not the whole first-order answer
    assert not torch.allclose(got.scores, every.scores, rtol=1e-3)
    label = influence_label(got, ["0", "2"])
    assert "first-order" in label and "through layer 2 only" in label and "dmargin/dw" in label
    assert "all 2 recorded layers" in influence_label(every, ["0", "2"])


def test_output_layer_influence_equals_autograd_through_the_final_layer(runs):
    """SGD's final output layer as a function of per-example loss weights w (1 in the run): W(w) = W_T +
    sum_rows (w_i - 1) c_s v k^T, b likewise; the score is d margin(W(w) h + b(w)) / dw at w = 1, by autograd."""
    path, model, x, _ = runs["sgd"]
    q = x[:4] - 0.1
    h = _hidden(model, q).double()
    with StoreReader(path) as store:
        lay = store.layer("2")
        rows = lay.read(0, lay.n_rows, ("keys", "values", "step", "index"))
        coef = lay.coefficients()
        got = output_layer_influence(store, h)
        w_t, b_t = torch.as_tensor(lay.weight_final).double(), torch.as_tensor(lay.bias_final).double()
    k, v = torch.as_tensor(rows["keys"]).double(), torch.as_tensor(rows["values"]).double()
    s = torch.as_tensor(rows["step"] - coef.first_step)
    c_w, c_b = torch.as_tensor(coef.c_w).double()[s], torch.as_tensor(coef.c_b).double()[s]
    col = torch.as_tensor(np.searchsorted(got.examples, rows["index"]))
    pred = (h @ w_t.t() + b_t).argmax(-1)
    jac = []
    for i in range(h.shape[0]):
        w = torch.ones(len(got.examples), dtype=torch.float64, requires_grad=True)
        scale = (w[col] - 1)
        W = w_t + torch.einsum("r,r,ro,ri->oi", scale, c_w, v, k)
        b = b_t + torch.einsum("r,r,ro->o", scale, c_b, v)
        f = margin((h[i:i + 1] @ W.t() + b), pred[i:i + 1])
        (g,) = torch.autograd.grad(f.sum(), w)
        jac.append(g)
    torch.testing.assert_close(got.scores, torch.stack(jac), rtol=1e-9, atol=1e-12)


def test_output_layer_influence_refuses_what_it_cannot_answer(runs, tmp_path):
    path, model, x, _ = runs["sgd"]
    with StoreReader(path) as store:
        with pytest.raises(ValueError, match=r"\(n, 8\)"):
            output_layer_influence(store, x[:2])
        with pytest.raises(ValueError, match="outputs="):
            output_layer_influence(store, _hidden(model, x[:2]), outputs=torch.zeros(2, 5))
    _train(tmp_path / "noidx.h5", "sgd", indices=False)
    with StoreReader(tmp_path / "noidx.h5") as store, pytest.raises(ValueError, match="dataset index"):
        output_layer_influence(store, _hidden(model, x[:2]))


def test_explain_leads_with_influence_and_keeps_the_attention(runs, tmp_path):
    """explain's default: first-order influence on each prediction's margin at every tracked layer (influence()
    with the prediction as target), with the attention results exactly those of method=None."""
    path, model, x, _ = runs["sgd"]
    q = x[:3] + 0.2
    with DualInference(path) as di:
        ex = di.explain(model, q, top_k=3)
        bare = di.explain(model, q, top_k=3, method=None)
        tracin = di.explain(model, q, top_k=3, method="every_step", attention=False)
        with torch.no_grad():  # a caller's no_grad does not stop the influence's own gradient
            quiet = di.explain(model, q, top_k=3, attention=False)
        with torch.inference_mode(), pytest.warns(UserWarning, match="inference_mode"):  # a Trainer's eval loops
            inside = di.explain(model, q, top_k=3)
    want = influence(path, model, q, model(q).argmax(-1))
    assert (ex.influence.method, ex.influence.target, ex.influence.layers) == ("first_order", "margin", ["0", "2"])
    torch.testing.assert_close(ex.influence.scores, want.scores, rtol=0, atol=0)
    assert bare.influence is None and bare.influence_note is None
    torch.testing.assert_close(quiet.influence.scores, want.scores, rtol=0, atol=0)
    assert inside.influence is None and "inference_mode" in inside.influence_note and "2" in inside.layers
    assert json.dumps(ex.to_dict()["layers"]) == json.dumps(bare.to_dict()["layers"])  # attention unchanged
    d = ex.to_dict(top_k=2)
    assert list(d)[0] == "influence" and d["influence"]["proponents"]["index"] == want.top(2)[0].index.tolist()
    assert tracin.influence.method == "every_step" and tracin.layers == {}
    # "auto" steps aside where influence cannot answer (rows without dataset indices), with the reason
    _train(tmp_path / "noidx.h5", "sgd", indices=False)
    with DualInference(tmp_path / "noidx.h5") as di:
        with pytest.warns(UserWarning, match="attention only"):
            auto = di.explain(model, q, top_k=2)
        assert auto.influence is None and "dataset index" in auto.influence_note and "2" in auto.layers
        with pytest.raises(ValueError, match="dataset index"):
            di.explain(model, q, method="first_order")
        with pytest.raises(ValueError, match="method"):
            di.explain(model, q, method="exact")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert di.explain(model, q, top_k=2, method=None).influence is None


def test_the_views_answer_labels_its_numbers(runs):
    path, model, x, _ = runs["adamw"]
    with StoreReader(path) as store:
        res = output_layer_influence(store, _hidden(model, x[:2]))
        ans = influence_answer(res, 3, list(store.layers))
    pro, opp = res.top(3)
    assert ans["scope"] == "output layer" and "through layer 2 only" in ans["label"]
    assert [p["index"] for p in ans["queries"][1]["proponents"]] == [i for i in pro.index[1].tolist() if i >= 0]
    assert [o["score"] for o in ans["queries"][0]["opponents"]] == [s for s, i in zip(opp.score[0].tolist(),
                                                                                         opp.index[0]) if i >= 0]
    assert ans["queries"][0]["class"] == int(res.extra["targets"][0]) and "seconds" not in ans
