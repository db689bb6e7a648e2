"""Layer kinds: captured rows reproduce autograd's weight gradient, and whole fits are exact."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from helpers import TRAINER_KW, dual_output, rel_err
from lightning_dualform import DualFormCallback, StoreReader
from lightning_dualform.layers import keys_of, one_hot_keys, values_of, weight_matrix
from lightning_dualform.record.capture import LayerCapture, call_keys

LAYERS = {
    "linear-seq": (lambda: nn.Linear(5, 4), lambda: torch.randn(3, 7, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), lambda: torch.randn(2, 3, 11)),
    "conv2d-s2p1": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), lambda: torch.randn(2, 3, 9, 8)),
    "conv2d-reflect-dil": (
        lambda: nn.Conv2d(2, 3, (3, 2), padding=2, dilation=(2, 1), padding_mode="reflect"),
        lambda: torch.randn(2, 2, 7, 6),
    ),
    "conv2d-same": (lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False), lambda: torch.randn(1, 2, 6, 6)),
    "embedding": (lambda: nn.Embedding(11, 4, padding_idx=0), lambda: torch.randint(0, 11, (3, 6))),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_rows_reproduce_autograd_weight_gradient(kind):
    torch.manual_seed(0)
    make_layer, make_x = LAYERS[kind]
    layer, x = make_layer(), make_x()
    cap = LayerCapture("l", layer, lambda: True)
    cap.attach()
    out = layer(x)
    (out * torch.randn_like(out)).sum().backward()
    (call,) = cap.take_completed()
    keys, values = call_keys(call), call.values  # (a convolution keeps its map: unfolded here)
    if call.keep is not None:
        keys, values = keys[call.keep], values[call.keep]
    if not keys.is_floating_point():
        keys = one_hot_keys(keys, layer.num_embeddings)
    grad = weight_matrix(layer, layer.weight.grad)
    torch.testing.assert_close(values.t() @ keys, grad, rtol=1e-5, atol=1e-6)
    if getattr(layer, "bias", None) is not None:
        torch.testing.assert_close(values.sum(0), layer.bias.grad, rtol=1e-5, atol=1e-6)
    # and the layer's output is the weight matrix applied to the keys
    full_keys, _ = keys_of(layer, x)
    if not full_keys.is_floating_point():
        full_keys = one_hot_keys(full_keys, layer.num_embeddings)
    bias = getattr(layer, "bias", None)
    ref = full_keys @ weight_matrix(layer).t() + (bias if bias is not None else 0)
    torch.testing.assert_close(values_of(layer, out), ref.detach(), rtol=1e-5, atol=1e-5)


class ConvNet(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):  # x: (B, 2, 6, 6)
        b = x.shape[0]
        h = torch.tanh(self.c1(x.reshape(b * 1, 2, 36)))  # a Conv1d over the flattened image
        h = torch.tanh(self.c2(h.reshape(b, 3, 6, 6)))
        return self.head(h.reshape(b, -1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


class TokenModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 6, padding_idx=0)
        self.out = nn.Linear(6, 13)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.out(torch.tanh(self.emb(x))).reshape(-1, 13), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9, nesterov=True)


def _fit(tmp_path, model, ds, **cb_kw):
    cb = DualFormCallback(tmp_path / "k.h5", **cb_kw)
    L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(
        model, torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    )
    return cb


def test_conv_fit_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 2, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    model = ConvNet()
    cb = _fit(tmp_path, model, ds)
    for name, m in (("c1", model.c1), ("c2", model.c2)):
        assert cb.certificate[name]["exact"], cb.certificate
        x = torch.randn(3, *((2, 36) if name == "c1" else (3, 6, 6)))
        keys, _ = keys_of(m, x)
        ref = (keys.double() @ weight_matrix(m).double().t() + m.bias.double())
        assert rel_err(dual_output(cb.store_path, name, keys), ref) <= 1e-5
    with StoreReader(cb.store_path) as s:
        c2 = s.layer("c2")
        assert (c2.kind, c2.d_in, c2.d_out) == ("conv2d", 27, 4)
        assert c2.n_rows == 2 * 32 * 9  # one row per example and output location
        assert s.layer("c1").n_rows == 2 * 32 * 36
        rows = c2.read(0, c2.n_rows, ("position",))
        assert set(rows["position"].tolist()) == set(range(9))


def test_embedding_fit_is_exact_and_stores_token_ids(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (24, 5), generator=g)
    ds = torch.utils.data.TensorDataset(x, torch.roll(x, -1, dims=1))
    model = TokenModel()
    cb = _fit(tmp_path, model, ds)
    assert cb.certificate["emb"]["exact"], cb.certificate
    q = one_hot_keys(torch.arange(13)[:, None], 13)
    assert rel_err(dual_output(cb.store_path, "emb", q), model.emb.weight.detach().double()) <= 1e-5
    with StoreReader(cb.store_path) as s:
        emb = s.layer("emb")
        tokens = emb.read(0, emb.n_rows, ("tokens",))["tokens"]
        assert emb.n_rows == int((x != 0).sum()) * 2  # padding_idx rows never reach the weight: not stored
        assert (tokens != 0).all()
        keys = emb.read(0, 4, ("keys",))["keys"]
        assert keys.shape == (4, 13) and (keys.sum(1) == 1).all()  # read back as one-hot


def test_unsupported_configurations_are_skipped_with_a_note(tmp_path, caplog):
    class Odd(TokenModel):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(13, 6, max_norm=1.0)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 13, (16, 5), generator=g)
    with caplog.at_level("INFO"):
        cb = _fit(tmp_path, Odd(), torch.utils.data.TensorDataset(x, x))
    assert "max_norm" in caplog.text
    with StoreReader(cb.store_path) as s:
        assert s.layers == ["out"]


def test_explain_uses_the_rows_each_layer_kind_multiplies(tmp_path):
    from lightning_dualform import DualInference

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    model = ConvNet()
    cb = _fit(tmp_path, model, ds)
    x = torch.randn(3, 2, 6, 6)
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        ex = di.explain(model, x, top_k=2)
    out = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach()))
        for n, m in model.named_modules()
        if n in ("c1", "c2")
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name in ("c1", "c2"):
        real = out[name]
        real_rows = real.reshape(real.shape[0], real.shape[1], -1).transpose(1, 2).reshape(-1, real.shape[1])
        assert rel_err(ex[name].dual.double(), real_rows.double()) <= 1e-5

    tokens = torch.randint(0, 13, (24, 5), generator=g)
    tm = TokenModel()
    cb = DualFormCallback(tmp_path / "t.h5")
    L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(
        tm, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens, tokens), batch_size=8)
    )
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        ex = di.explain(tm, tokens[:2], layers=["emb"], forward=lambda m, b: m.emb(b))
    assert rel_err(ex["emb"].dual.double(), tm.emb(tokens[:2]).detach().reshape(-1, 6).double()) <= 1e-5


class SeqFirst(L.LightningModule):
    """A linear layer on a sequence-first (T, B, d) input, nn.Transformer's default layout."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch  # x: (B, T, d); feature 0 holds the example's dataset index
        return nn.functional.cross_entropy(self.lin(x.transpose(0, 1)).mean(0), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("seq", [6, 5])
def test_a_sequence_first_layer_with_as_many_positions_as_examples_stores_no_index(tmp_path, seq):
    # with T == B the rows' layout cannot be told: no dataset indices (not wrong ones), one warning for the layer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, seq, 4, generator=g)
    x[:, :, 0] = torch.arange(24, dtype=torch.float32)[:, None]
    ds = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (24,), generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = DualFormCallback(tmp_path / "k.h5")
        L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(
            SeqFirst(), torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True))
    told = [str(w.message) for w in caught if "cannot be told" in str(w.message)]
    assert cb.certificate["lin"]["exact"], cb.certificate
    with StoreReader(cb.store_path) as s:
        lin = s.layer("lin")
        rows = lin.read(0, lin.n_rows, ("keys", "index"))
        assert lin.exact and lin.n_rows == 4 * 6 * seq
        if seq == 6:
            assert len(told) == 1 and "'lin'" in told[0] and "(6, 6)" in told[0]
            assert "layout='sequence_first'" in told[0]
            assert lin.rows_without_index == lin.n_rows and (rows["index"] == -1).all()
        else:  # sequence first, told apart: every row names its own example
            assert told == [] and lin.rows_without_index == 0
            np.testing.assert_array_equal(rows["index"], rows["keys"][:, 0].round().astype(np.int64))


@pytest.mark.parametrize("layout", ["sequence_first", {"lin": "sequence_first"}])
def test_a_declared_layout_keeps_the_examples_of_a_sequence_first_layer_with_as_many_positions(tmp_path, layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 6, 4, generator=g)
    x[:, :, 0] = torch.arange(24, dtype=torch.float32)[:, None]
    x[:, :, 1] = torch.arange(6, dtype=torch.float32)  # feature 1: the position
    ds = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (24,), generator=g))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = DualFormCallback(tmp_path / "k.h5", layout=layout)
        L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(
            SeqFirst(), torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True))
    assert not [w for w in caught if "cannot be told" in str(w.message)]
    assert cb.certificate["lin"]["exact"], cb.certificate
    with StoreReader(cb.store_path) as s:
        lin = s.layer("lin")
        rows = lin.read(0, lin.n_rows, ("keys", "index", "position"))
        assert lin.rows_without_index == 0
        np.testing.assert_array_equal(rows["index"], rows["keys"][:, 0].round().astype(np.int64))
        np.testing.assert_array_equal(rows["position"], rows["keys"][:, 1].round().astype(np.int64))


def test_a_layout_naming_a_layer_that_is_not_tracked_is_refused(tmp_path):
    cb = DualFormCallback(tmp_path / "k.h5", layout={"lin2": "sequence_first"})
    ds = torch.utils.data.TensorDataset(torch.randn(12, 6, 4), torch.randint(0, 3, (12,)))
    told = r"layout=\.\.\.\)` names layers it does not track: \['lin2'\]. The tracked layers are \['lin'\]"
    with pytest.raises(ValueError, match=told):
        L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(
            SeqFirst(), torch.utils.data.DataLoader(ds, batch_size=6))


def test_find_layers_says_what_it_leaves_out_and_which_layers_share_a_weight():
    from lightning_dualform.record.capture import find_layers

    model = nn.Module()
    model.bil, model.norm = nn.Bilinear(3, 3, 2), nn.LayerNorm(3)
    model.a, model.b = nn.Linear(3, 3), nn.Linear(3, 3)
    model.b.weight = model.a.weight
    chosen, notes = find_layers(model, None)
    assert list(chosen) == ["a", "b"]
    assert any(n.startswith("bil (Bilinear) is not recorded: its weight matrix is not one of a kind") for n in notes)
    assert not any(n.startswith("norm") for n in notes)  # (a norm's vectors are no weight matrix)
    assert any(n.startswith("b shares its weight with a (tied)") for n in notes)


class SeqFirstWithTest(SeqFirst):
    def test_step(self, batch, batch_idx):
        x, _ = batch
        return self.lin(x.transpose(0, 1))


@pytest.mark.parametrize("layout", [None, "sequence_first"])
def test_query_rows_whose_query_cannot_be_told_are_left_out_and_a_declared_layout_keeps_them(tmp_path, layout):
    # (rows of a (B, B) call got query -1, which made the set unreadable, or named the previous batch's last query)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, 4, generator=g)
    x[:, :, 0] = torch.arange(12, dtype=torch.float32)[:, None]
    ds = torch.utils.data.TensorDataset(x, torch.randint(0, 3, (12,), generator=g))
    cb = DualFormCallback(tmp_path / "q.h5", record_queries=("test",), layout=layout)
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(SeqFirstWithTest(), torch.utils.data.DataLoader(ds, batch_size=6))
        trainer.test(trainer.lightning_module, torch.utils.data.DataLoader(ds, batch_size=6))
    with StoreReader(cb.store_path) as s:
        qs = s.queries("test")
        rows = qs.layer_rows("lin")
    assert qs.n == 12
    if layout is None:
        assert len(rows["example"]) == 0
    else:  # every row names its own query: feature 0 holds the example's index
        assert len(rows["example"]) == 12 * 6
        np.testing.assert_array_equal(qs.index[rows["example"]], rows["keys"][:, 0].round().astype(np.int64))
