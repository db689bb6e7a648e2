"""The certificate as training goes for element-wise rules (record/row_replay.py): the store's replay on a few rows
of each weight, against the whole replay of the store read back, and what it catches."""

from __future__ import annotations

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TRAINER_KW, MLP, IndexedDataset, loader

from lightning_dualform import DualFormCallback, StoreReader
from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.record.step_rows import StepRowReader
from lightning_dualform.record.row_replay import ROWS, RowReplayCertificate

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    "adam-amsgrad-l2": lambda ps: torch.optim.Adam(ps, lr=0.05, amsgrad=True, weight_decay=0.05),
    "rmsprop-centered-momentum": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.05, weight_decay=0.05),
    "radam-decoupled": lambda ps: torch.optim.RAdam(ps, lr=0.05, weight_decay=0.1, decoupled_weight_decay=True),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.05),
    "adadelta": lambda ps: torch.optim.Adadelta(ps, lr=1.0, weight_decay=0.05),
}


def _fit(tmp_path, make_opt, **trainer_kw):
    L.seed_everything(0, verbose=False)
    model = MLP(hidden=40, opt_factory=lambda m: make_opt(m.parameters()))  # 40 rows: the replay samples 16
    cb = DualFormCallback(tmp_path / "run.h5")
    L.Trainer(max_epochs=2, callbacks=[cb], gradient_clip_val=0.05, **TRAINER_KW, **trainer_kw).fit(
        model, loader(IndexedDataset()))
    return model, cb


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_rows_replayed_as_training_goes_are_the_stores_whole_replay(tmp_path, name):
    """Each layer's certificate comes from the replay of 16 of its rows as training went; the same rows of the
    store's whole replay (read back, every row) give the same error against the trained weights."""
    model, cb = _fit(tmp_path, OPTIMIZERS[name])
    modules = {"net.0": model.net[0], "net.2": model.net[2]}
    with StoreReader(cb.store_path) as s:
        for layer, m in modules.items():
            cert = cb.certificate[layer]
            assert cert["method"] == "rows" and cert["exact"], (layer, cert)
            assert cert["probes"] == min(ROWS, m.out_features)
            units = RowReplayCertificate.units(layer, m.out_features)
            w, b = LayerReplay(s.layer(layer)).weights()
            real = m.weight.detach().double().numpy()
            whole = np.linalg.norm(w[units] - real[units]) / np.linalg.norm(real[units])
            np.testing.assert_allclose(cert["rel_err_weight"], whole, rtol=1e-6)
            rb = m.bias.detach().double().numpy()
            np.testing.assert_allclose(cert["rel_err_bias"], np.linalg.norm(b - rb) / np.linalg.norm(rb), rtol=1e-6)
            assert s.layer(layer).attrs["certificate_method"] == "rows"


def test_a_wrong_table_entry_fails_the_row_replay_as_it_fails_the_whole_one(tmp_path, monkeypatch):
    """One step's learning rate stored wrong (the rows themselves right, so the gradient check passes): the
    replay of a few rows misses the trained weights, as the store's whole replay does."""
    from lightning_dualform.attend.certificate import certify_store

    real_row = StepRowReader.group_columns  # the param-group columns, read after each step: what is stored
    calls = {"n": 0}

    def wrong_lr(self, p, group):
        row = real_row(self, p, group)
        calls["n"] += 1
        if calls["n"] == 15:  # one parameter of one step
            row["lr"] = row["lr"] * 1.5
        return row

    monkeypatch.setattr(StepRowReader, "group_columns", wrong_lr)
    _, cb = _fit(tmp_path, OPTIMIZERS["adamw"])
    monkeypatch.setattr(StepRowReader, "group_columns", real_row)
    bad = [n for n, c in cb.certificate.items() if not c["exact"]]
    assert bad and all(cb.certificate[n]["method"] == "rows" for n in bad)
    full = certify_store(cb.store_path)
    assert sorted(n for n, c in full.items() if not c.exact) == sorted(bad)


def test_a_rule_or_layer_the_row_replay_does_not_cover_is_certified_at_the_end(tmp_path):
    """Adafactor's statistics are not row-local, and a convolution's rows are maps: the whole replay at fit end."""
    adafactor = getattr(torch.optim, "Adafactor", None)
    if adafactor is None:
        pytest.skip("torch without Adafactor")
    _, cb = _fit(tmp_path, lambda ps: adafactor(ps, lr=0.01))
    assert {c["method"] for c in cb.certificate.values()} == {"full"}
    assert all(c["exact"] for c in cb.certificate.values())


def test_attend_on_a_store_certified_as_training_went_replays_once_and_answers_as_after_the_full_certificate(
        tmp_path, monkeypatch):
    """Such a store keeps no replayed weights: ``attend`` replays the layer once per session (not once per call),
    and its answer is the one a store carrying the full certificate's replayed weights gives."""
    from lightning_dualform import DualInference
    from lightning_dualform.attend import replay as replay_mod
    from lightning_dualform.attend.certificate import certify_store

    model, cb = _fit(tmp_path, OPTIMIZERS["adamw"])
    q = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    calls = {"n": 0}
    real = replay_mod.LayerReplay.weights

    def counted(self):
        calls["n"] += 1
        return real(self)

    monkeypatch.setattr(replay_mod.LayerReplay, "weights", counted)
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        first = di.attend("net.0", q, top_k=3)
        again = di.attend("net.0", q, top_k=3)
    assert calls["n"] == 1
    torch.testing.assert_close(again.dual, first.dual, rtol=0, atol=0)
    certify_store(cb.store_path)  # the whole replay, its weights kept in the store
    calls["n"] = 0
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        kept = di.attend("net.0", q, top_k=3)
    assert calls["n"] == 0
    torch.testing.assert_close(kept.dual, first.dual, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.dual, model.net[0](q).double(), rtol=1e-5, atol=1e-6)
    assert torch.equal(kept.top.row, first.top.row)  # the same rows, found by the same pass


def test_the_replay_a_checkpoint_saves_is_plain_data_and_continues_exactly():
    """The state a checkpoint keeps is lists and numbers only (no arrays to unpickle), NAdam's float32 scalar
    included, and the replay continued from it is the uninterrupted one, bit for bit."""
    from lightning_dualform.optim import rule_for

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 20)
    opt = torch.optim.NAdam(lin.parameters(), lr=0.05, weight_decay=0.05)
    lin(torch.randn(4, 5)).sum().backward()
    opt.step()  # (a state with a step count and mu_product)
    rule = rule_for(opt)
    a = RowReplayCertificate.for_run({"fc": lin}, opt, rule, {"fc": (0, 0)}, None, "float32")
    rows = [(torch.randn(3, 5), torch.randn(3, 20)) for _ in range(4)]
    hp_w, hp_b = ({**rule.read_step(opt, p), "applied": True} for p in (lin.weight, lin.bias))
    for r in rows[:2]:
        a.take_step("fc", None, r, 0.5, hp_w, hp_b)
    saved = a.state_dict()

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or type(v) in (int, float, str, bool)

    assert plain(saved)
    b = RowReplayCertificate.for_run({"fc": lin}, opt, rule, {"fc": (0, 0)}, {"sketch": saved}, "float32")
    for r in rows[2:]:
        a.take_step("fc", None, r, 0.5, hp_w, hp_b)
        b.take_step("fc", None, r, 0.5, hp_w, hp_b)
    for x, y in ((a.layers["fc"].weight, b.layers["fc"].weight), (a.layers["fc"].bias, b.layers["fc"].bias)):
        for k in x.linear:
            np.testing.assert_array_equal(x.linear[k], y.linear[k])
        for k, v in x.nonlinear.items():
            assert type(v) is type(y.nonlinear[k]) and np.array_equal(v, y.nonlinear[k]), k


class _ConvNet(L.LightningModule):
    def __init__(self, make_opt):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 6, 3)
        self.make_opt = make_opt

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.tanh(self.conv(x[:, None, :])).reshape(len(x), -1)
        return torch.nn.functional.cross_entropy(self.head(h), y)

    def configure_optimizers(self):
        return self.make_opt(self.parameters())


def test_a_convolution_under_an_element_wise_rule_is_certified_by_the_whole_replay(tmp_path):
    """A sample of a convolution's channels can miss rounding amplified in one channel (docs/benchmarks.md), so a
    store with one keeps the whole replay at fit end."""
    L.seed_everything(0, verbose=False)
    cb = DualFormCallback(tmp_path / "conv.h5")
    L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW).fit(_ConvNet(OPTIMIZERS["adamw"]), loader(IndexedDataset()))
    assert {c["method"] for c in cb.certificate.values()} == {"full"}
    assert all(c["exact"] for c in cb.certificate.values())


def test_a_checkpoints_replay_that_does_not_fit_is_not_used(caplog):
    """A checkpoint is the user's file: a replay state with rows outside the weight, a wrong shape, a missing entry
    or a NaN is set aside (the whole replay certifies at fit end), said in the log, never used."""
    import copy
    import logging

    from lightning_dualform.optim import rule_for

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 20)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.05)
    rule = rule_for(opt)
    good = RowReplayCertificate.for_run({"fc": lin}, opt, rule, {"fc": (0, 0)}, None, "float32").state_dict()
    assert RowReplayCertificate.for_run({"fc": lin}, opt, rule, {"fc": (0, 0)}, {"sketch": good}, "float32") is not None

    def broken(edit):
        bad = copy.deepcopy(good)
        edit(bad["fc"])
        return bad

    cases = [
        lambda d: d.__setitem__("units", [0, 1, 99]),  # a row outside the weight
        lambda d: d["weight"].__setitem__("shape", [20, 6]),  # another layer's shape
        lambda d: d["weight"]["nonlinear"].pop("exp_avg_sq"),  # a missing entry
        lambda d: d["weight"]["linear"]["param"]["array"][0].__setitem__(0, float("nan")),
        lambda d: d.pop("bias"),
        lambda d: d.__setitem__("weight", None),  # no weight state at all
    ]
    for edit in cases:
        with caplog.at_level(logging.WARNING):
            resume = {"sketch": broken(edit)}
            assert RowReplayCertificate.for_run({"fc": lin}, opt, rule, {"fc": (0, 0)}, resume, "float32") is None
    assert "does not fit" in caplog.text


class EditsARow(MLP):
    """Edits one row of its first layer's weight after every optimizer step (``edit``), or writes the weight back
    unchanged after a change (``swap``, as an EMA callback does around validation)."""

    def __init__(self, mode: str, make_opt) -> None:
        super().__init__(hidden=40, opt_factory=lambda m: make_opt(m.parameters()))
        self.mode = mode

    def _edit(self) -> None:
        w = self.net[0].weight
        row = int(np.setdiff1d(np.arange(40), RowReplayCertificate.units("net.0", 40))[0])  # one not replayed
        with torch.no_grad():
            if self.mode == "data":  # a new tensor: the version counter does not move, the storage does
                new = w.detach().clone()
                new[row] *= 0.9
                w.data = new
            elif self.mode == "swap":
                kept = w.detach().clone()
                w.mul_(0.5)
                w.copy_(kept)
            else:
                w[row].mul_(0.9)

    def training_step(self, batch, batch_idx):
        if self.mode == "closure" and batch_idx == 2:  # inside Lightning's closure: within optimizer.step()
            self._edit()
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.mode == "hook" and self.trainer.global_step == 2:  # the module's hook: after every callback's
            self._edit()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.mode in ("edit", "data", "swap"):
            self._edit()

    def on_train_end(self) -> None:
        if self.mode == "end":  # after the last step
            self._edit()


@pytest.mark.parametrize("mode", ["edit", "data", "closure", "hook", "end", "swap"])
def test_a_weight_edited_between_steps_on_a_row_the_replay_skips_is_inexact(tmp_path, mode):
    """The replay sees 16 of the 40 rows; a row edited outside the optimizer (a norm constraint after each step)
    is none of them: the weights' watch between steps names it. A weight written back unchanged is no edit."""
    L.seed_everything(0, verbose=False)
    model = EditsARow(mode, OPTIMIZERS["adamw"])
    cb = DualFormCallback(tmp_path / "run.h5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(model, loader(IndexedDataset()))
    told = [str(w.message) for w in caught if "outside the optimizer" in str(w.message)]
    step = {"edit": 1, "data": 1, "closure": 2, "hook": 2, "end": 12}.get(mode)
    assert len(told) == (mode != "swap") and all("'net.0'" in t and f"after optimizer step {step}," in t for t in told)
    cert = cb.certificate["net.0"]
    assert cert["method"] == "rows" and cert["rel_err"] < 1e-5  # (the replayed rows agree either way)
    assert cert["exact"] == (mode == "swap") and cb.certificate["net.2"]["exact"]
    with StoreReader(cb.store_path) as s:
        assert s.layer("net.0").exact == (mode == "swap")
