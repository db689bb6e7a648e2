"""DualFormCallback end to end: the dual form rebuilt from the store equals the real trained layers."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from helpers import TRAINER_KW, MLP, IndexedDataset, assert_exact, dual_output, loader, real_output, rel_err
from lightning_dualform import DualFormCallback, InexactError, StoreReader


def _fit(tmp_path, model, callback=None, epochs=2, ds=None, batch_size=16, **trainer_kw):
    callback = callback or DualFormCallback(tmp_path / "run.h5")
    trainer = L.Trainer(max_epochs=epochs, callbacks=[callback], **{**TRAINER_KW, **trainer_kw})
    trainer.fit(model, loader(ds or IndexedDataset(), batch_size=batch_size))
    return trainer, callback


def _probe(model):
    g = torch.Generator().manual_seed(123)
    return {n: torch.randn(7, m.in_features, generator=g) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


SGD_CASES = {
    "plain": lambda m: torch.optim.SGD(m.parameters(), lr=0.2),
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.4),
    "weight_decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.05),
    "maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5, maximize=True),
    "two_groups": lambda m: torch.optim.SGD(
        [
            {"params": [m.net[0].weight, m.net[2].weight], "lr": 0.1, "momentum": 0.9},
            {"params": [m.net[0].bias, m.net[2].bias], "lr": 0.02, "weight_decay": 0.1, "nesterov": False},
        ],
        lr=0.5,
    ),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_configurations_are_exact(tmp_path, case):
    model = MLP(opt_factory=SGD_CASES[case])
    _, cb = _fit(tmp_path, model)
    assert_exact(cb.store_path, model, _probe(model))
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate


@pytest.mark.parametrize(
    "sched",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.3, total_steps=12),  # cycles momentum too
    ],
    ids=["StepLR", "OneCycleLR"],
)
def test_schedulers_are_exact(tmp_path, sched):
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sched_factory=sched)
    _, cb = _fit(tmp_path, model)
    assert_exact(cb.store_path, model, _probe(model))
    with StoreReader(cb.store_path) as s:
        lrs = s.layer("net.0").updates()["weight"]["lr"]
        assert len(set(np.round(lrs, 12))) > 1, "the schedule should have changed the learning rate"


def _set_in_step(step: int) -> tuple[float, float] | None:
    """The (lr, weight_decay) a module writes into its param group at ``step``, or None to leave it."""
    return (0.02 * (1 + step % 4), 0.1 * (step % 3)) if step % 2 == 1 else None


class SetsLrInStep(MLP):
    """Changes its optimizer's lr and weight decay inside ``training_step`` or ``on_before_optimizer_step``: both
    run inside ``optimizer.step()`` (Lightning's closure), after the step's pre-hook."""

    def __init__(self, where: str, **kw):
        super().__init__(**kw)
        self.where = where

    def _set(self, opt) -> None:
        new = _set_in_step(self.global_step)
        if new is not None:
            for g in opt.param_groups:
                g["lr"], g["weight_decay"] = new

    def training_step(self, batch, batch_idx):
        if self.where == "training_step":
            self._set(self.optimizers().optimizer)
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        if self.where == "on_before_optimizer_step":
            self._set(optimizer)


@pytest.mark.parametrize("where", ["training_step", "on_before_optimizer_step"])
@pytest.mark.parametrize("opt", ["sgd-momentum", "adamw"])
def test_settings_changed_inside_the_step_are_recorded_as_used(tmp_path, opt, where):
    """A learning rate or weight decay the module writes while the optimizer steps is the one the step uses: the
    store records it (read after the step), so the run stays exact."""
    factory = {"sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01),
               "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.01)}[opt]
    torch.manual_seed(0)
    model = SetsLrInStep(where, opt_factory=factory)
    trainer, cb = _fit(tmp_path, model, epochs=1, ds=IndexedDataset(n=64))
    lr, wd, want_lr, want_wd = (0.1 if opt == "sgd-momentum" else 0.01), 0.01, [], []
    for step in range(trainer.global_step):
        lr, wd = _set_in_step(step) or (lr, wd)
        want_lr.append(lr)
        want_wd.append(wd)
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    if opt == "sgd-momentum":
        assert_exact(cb.store_path, model, _probe(model))
    with StoreReader(cb.store_path) as s:
        for name in ("net.0", "net.2"):
            for param in ("weight", "bias"):
                table = s.layer(name).updates()[param]
                np.testing.assert_array_equal(table["lr"], want_lr)
                np.testing.assert_array_equal(table["weight_decay"], want_wd)


class OwnClipping(Precision):
    """A precision plugin with its own norm clipping (here Lightning's, re-stated)."""

    def clip_grad_by_norm(self, optimizer, clip_val):
        torch.nn.utils.clip_grad_norm_(self.main_params(optimizer), clip_val)


@pytest.mark.parametrize("plugin", [None, OwnClipping()], ids=["lightning-reports-factor", "own-plugin"])
def test_gradient_clipping_by_norm_is_exact(tmp_path, plugin):
    """Lightning's clipping reports its factor to the callback; a plugin with its own clipping gets the
    factor computed in the callback's hook. Both give the same, exact store."""
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9, nesterov=True))
    trainer, cb = _fit(tmp_path, model, gradient_clip_val=0.05, plugins=[plugin] if plugin else None)
    assert_exact(cb.store_path, model, _probe(model))
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin), "the instance override outlived the fit"
    with StoreReader(cb.store_path) as s:
        scale = s.layer("net.0").updates()["grad_scale"]
    assert scale.min() < 0.99, "clipping should have been active in this run"


def test_two_callbacks_with_clipping_are_both_exact(tmp_path):
    """Two callbacks on one Trainer: both compute the clip factor, and both observe every dataset index."""
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9))
    a, b = DualFormCallback(tmp_path / "a.h5"), DualFormCallback(tmp_path / "b.h5", layers=["net.2"])
    trainer = L.Trainer(max_epochs=2, callbacks=[a, b], gradient_clip_val=0.05, **TRAINER_KW)
    trainer.fit(model, loader(IndexedDataset()))
    for cb in (a, b):
        assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    with StoreReader(a.store_path) as sa, StoreReader(b.store_path) as sb:
        scale_a, scale_b = sa.layer("net.2").updates()["grad_scale"], sb.layer("net.2").updates()["grad_scale"]
        index_a, index_b = (
            sa.layer("net.2").read(0, 96, ("index",))["index"],
            sb.layer("net.2").read(0, 96, ("index",))["index"],
        )
    assert scale_a.min() < 0.99
    np.testing.assert_array_equal(scale_a, scale_b)
    assert sorted(index_a.tolist()) == list(range(96)) and np.array_equal(index_a, index_b)  # each its own FIFO
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin)


def test_both_ways_of_getting_the_clip_factor_agree_bit_for_bit(tmp_path):
    scales = []
    for plugin in (None, OwnClipping()):
        L.seed_everything(3, verbose=False)
        model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9))
        _, cb = _fit(tmp_path / str(plugin), model, gradient_clip_val=0.05, plugins=[plugin] if plugin else None)
        with StoreReader(cb.store_path) as s:
            scales.append(s.layer("net.2").updates()["grad_scale"])
    np.testing.assert_array_equal(scales[0], scales[1])


def test_gradient_accumulation_is_exact(tmp_path):
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    trainer, cb = _fit(tmp_path, model, accumulate_grad_batches=3, gradient_clip_val=0.1)
    assert_exact(cb.store_path, model, _probe(model))
    with StoreReader(cb.store_path) as s:
        layer = s.layer("net.0")
        assert s.n_steps == trainer.global_step
        assert layer.n_rows == 2 * 96  # every micro-batch's rows are kept
        steps = layer.read(0, layer.n_rows, ("step",))["step"]
        assert np.bincount(steps).max() == 48  # three micro-batches of 16 share one step


class SeqModel(L.LightningModule):
    """(B, T, d) input through a Linear, a weight-shared Linear used twice, and a bias-free head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))  # second call of the same layer
        return self.head(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).reshape(-1, 3), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_sequences_weight_sharing_and_no_bias(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(40, 5, 4, generator=g), torch.randint(0, 3, (40, 5), generator=g))
    model = SeqModel()
    _, cb = _fit(tmp_path, model, ds=ds, batch_size=8)
    assert_exact(cb.store_path, model, _probe(model))
    with StoreReader(cb.store_path) as s:
        assert s.layer("inp").n_rows == 2 * 40 * 5
        assert s.layer("shared").n_rows == 2 * 40 * 5 * 2
        assert not s.layer("head").has_bias
        rows = s.layer("shared").read(0, 80, ("position", "index", "label"))
        assert set(rows["position"].tolist()) == set(range(10))  # 5 positions x 2 calls
        inp = s.layer("inp").read(0, 40, ("keys", "index", "position", "label"))
    # each (B, T) row keeps its example, position and per-position label
    for k, i, t, lab in zip(inp["keys"], inp["index"], inp["position"], inp["label"]):
        np.testing.assert_array_equal(k, ds.tensors[0][i, t].numpy())
        assert lab == ds.tensors[1][i, t]


def test_partially_frozen_model(tmp_path, caplog):
    model = MLP(
        opt_factory=lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    )
    model.net[0].weight.requires_grad_(False)
    model.net[0].bias.requires_grad_(False)
    with caplog.at_level("INFO"):
        _, cb = _fit(tmp_path, model)
    with StoreReader(cb.store_path) as s:
        assert s.layers == ["net.2"]
    assert "frozen" in caplog.text
    assert_exact(cb.store_path, model, {"net.2": _probe(model)["net.2"]})


class AttnModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.proj(x)
        h, _ = self.attn(h, h, h)
        return nn.functional.cross_entropy(self.head(h.mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_multihead_attention_out_proj_is_left_out_with_a_warning(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 5, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    model = AttnModel()
    with pytest.warns(UserWarning, match="attn.out_proj"):
        _, cb = _fit(tmp_path, model, ds=ds, batch_size=8)
    with StoreReader(cb.store_path) as s:
        assert "attn.out_proj" not in s.layers
        assert "attn.out_proj" in s.attrs["dropped_layers"]
        assert s.layers == ["proj", "head"]
    assert_exact(cb.store_path, model, {n: x for n, x in _probe(model).items() if n != "attn.out_proj"})


def test_intermediate_model_matches_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = MLP(
        opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    cb = DualFormCallback(tmp_path / "run.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb, ckpt], **{**TRAINER_KW, "enable_checkpointing": True})
    trainer.fit(model, loader(IndexedDataset()))
    probe = _probe(model)
    for t in (4, 8):
        mid = MLP.load_from_checkpoint(tmp_path / "ckpt" / f"step={t}.ckpt", opt_factory=None)
        for name in ("net.0", "net.2"):
            err = rel_err(
                dual_output(cb.store_path, name, probe[name], end=t),
                real_output(dict(mid.named_modules())[name], probe[name]),
            )
            assert err <= 1e-5, (t, name, err)


def test_boring_model_unchanged(tmp_path):
    model = BoringModel()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=8,
        limit_val_batches=2,
        callbacks=[DualFormCallback(tmp_path / "b.h5")],
        **TRAINER_KW,
    )
    trainer.fit(model)
    cb = trainer.callbacks[0]
    assert_exact(cb.store_path, model, {"layer": torch.randn(5, 32)})
    assert cb.certificate["layer"]["exact"]


def test_rprop_is_refused_with_a_clear_error(tmp_path):
    model = MLP(opt_factory=lambda m: torch.optim.Rprop(m.parameters(), lr=1e-3))
    with pytest.raises(
        InexactError, match=r"Rprop: its step uses only the sign.*Supported: .*torch\.optim\.AdamW.*exact=False"
    ):
        _fit(tmp_path, model)


class CustomClipping(MLP):
    """A module that clips in its own configure_gradient_clipping: how a factor of every step is unknown."""

    def __init__(self, how: str, adamw: bool = False):
        super().__init__(opt_factory=lambda m: torch.optim.AdamW(m.parameters(), lr=0.01) if adamw else
                         torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9))
        self.how = how

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.how == "lightning-norm" and self.current_epoch > 0:  # Lightning's own clipping, from epoch 1 on
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        elif self.how == "first-layer-norm":  # one layer's norm only: another factor per layer
            torch.nn.utils.clip_grad_norm_(self.net[0].parameters(), 0.02)
        elif self.how == "value":  # element by element: no factor explains it
            torch.nn.utils.clip_grad_value_(self.parameters(), 2e-3)


@pytest.mark.parametrize("how", ["lightning-norm", "first-layer-norm", "lightning-norm-adamw"])
def test_a_custom_configure_gradient_clipping_is_measured_and_exact(tmp_path, how):
    """A configure_gradient_clipping of the module's own was refused; each step's factor is now measured from the
    weights' .grad (per layer, as DualFormRecorder does), and a scaling of any kind is exact."""
    torch.manual_seed(0)
    model = CustomClipping(how.removesuffix("-adamw"), adamw=how.endswith("-adamw"))
    trainer, cb = _fit(tmp_path, model, gradient_clip_val=0.05)  # (the hook gets the value; the module decides)
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    if how.endswith("-adamw"):  # an element-wise rule: the whole replay of every row, against the final weights
        from lightning_dualform.attend.certificate import certify_store

        assert all(c.exact and c.rel_err < 1e-5 for c in certify_store(cb.store_path).values())
    else:
        assert_exact(cb.store_path, model, _probe(model))
    with StoreReader(cb.store_path) as s:
        assert s.meta.gradient_clip_algorithm == "measured"
        first, second = s.layer("net.0").updates()["grad_scale"], s.layer("net.2").updates()["grad_scale"]
    assert first.min() < 0.9, "clipping should have been active in this run"
    if how.startswith("lightning-norm"):
        np.testing.assert_allclose(first, second, rtol=1e-5)  # one global factor, measured per layer
        assert (first[: len(first) // 2] == 1.0).all()  # (no clipping in epoch 0)
    else:
        assert (second == 1.0).all()


def test_a_custom_value_clipping_is_recorded_inexact(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="INEXACT"):
        _, cb = _fit(tmp_path, CustomClipping("value"))
    assert not all(c["exact"] for c in cb.certificate.values()), cb.certificate


def test_value_clipping_is_refused(tmp_path):
    with pytest.raises(InexactError, match="value"):
        _fit(tmp_path, MLP(), gradient_clip_val=0.1, gradient_clip_algorithm="value")


def test_rprop_opt_in_reports_its_residual(tmp_path):
    model = MLP(opt_factory=lambda m: torch.optim.Rprop(m.parameters(), lr=1e-2))
    with pytest.warns(UserWarning, match="inexact"):
        _, cb = _fit(tmp_path, model, callback=DualFormCallback(tmp_path / "rprop.h5", exact=False))
    cert = cb.certificate["net.0"]
    assert not cert["exact"] and cert["rel_err"] > 1e-3
    with h5py.File(cb.store_path, "r") as f:
        assert not f.attrs["optimizer_exact"] and f.attrs["update_rule"] == "plain"
        assert sorted(f["layers/net.0/updates/weight"]) == ["applied", "lr"]
        g = f["layers"]["net.0"]
        residual = g["weight_residual"][()]
    # memory + residual gives back the real weights
    x = _probe(model)["net.0"]
    dual = dual_output(cb.store_path, "net.0", x) + x.double() @ torch.from_numpy(residual).double().t()
    with h5py.File(cb.store_path, "r") as f:
        dual += torch.from_numpy(f["layers"]["net.0"]["bias_residual"][()]).double()
    assert rel_err(dual, real_output(model.net[0], x)) <= 1e-5


def test_dataset_index_of_every_row(tmp_path):
    ds = IndexedDataset(n=70)
    model = MLP()
    _, cb = _fit(tmp_path, model, ds=ds, batch_size=16, epochs=3)
    with StoreReader(cb.store_path) as s:
        layer = s.layer("net.0")
        rows = layer.read(0, layer.n_rows, ("keys", "index", "label", "epoch", "position"))
    # feature 0 of each key is x/10 of the example's own index
    np.testing.assert_allclose(rows["keys"][:, 0] * 10, rows["index"], atol=1e-4)
    np.testing.assert_array_equal(rows["label"], ds.y[rows["index"]].numpy())
    assert layer.n_rows == 70 * 3
    for e in range(3):
        assert sorted(rows["index"][rows["epoch"] == e].tolist()) == list(range(70))
    assert set(rows["position"].tolist()) == {0}


def test_dataset_index_with_workers(tmp_path):
    ds = IndexedDataset(n=48)
    model = MLP()
    cb = DualFormCallback(tmp_path / "w.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, loader(ds, batch_size=8, num_workers=2, persistent_workers=True))
    with StoreReader(cb.store_path) as s:
        rows = s.layer("net.0").read(0, 96, ("keys", "index"))
    np.testing.assert_allclose(rows["keys"][:, 0] * 10, rows["index"], atol=1e-4)


class DictIterable(torch.utils.data.IterableDataset):
    def __iter__(self):
        ds = IndexedDataset(n=32)
        for i in range(len(ds)):
            x, y = ds[i]
            yield {"x": x, "label": y, "index": i}


class DictModel(MLP):
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch["x"]), batch["label"])


def test_iterable_dataset_takes_index_from_the_batch(tmp_path):
    model = DictModel()
    cb = DualFormCallback(tmp_path / "it.h5")
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(DictIterable(), batch_size=8))
    with StoreReader(cb.store_path) as s:
        rows = s.layer("net.0").read(0, 32, ("keys", "index", "label"))
    np.testing.assert_allclose(rows["keys"][:, 0] * 10, rows["index"], atol=1e-4)
    assert (rows["label"] >= 0).all()


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="dtype"):
        DualFormCallback("x.h5", dtype="int8")
    with pytest.raises(ValueError, match="compression"):
        DualFormCallback("x.h5", compression="zip")
    with pytest.raises(ValueError, match="chunk_rows"):
        DualFormCallback("x.h5", chunk_rows=0)


def test_unknown_layer_name_lists_candidates(tmp_path):
    with pytest.raises(ValueError, match=r"net\.9.*net\.0"):
        _fit(tmp_path, MLP(), callback=DualFormCallback(tmp_path / "r.h5", layers=["net.9"]))


def test_existing_file_is_not_overwritten(tmp_path):
    path = tmp_path / "keep.h5"
    with h5py.File(path, "w") as f:  # (any HDF5 file: a file that is not HDF5 is refused even with overwrite=True)
        f.attrs["mine"] = 1
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _fit(tmp_path, MLP(), callback=DualFormCallback(path))
    assert path.read_bytes() == before


def test_layer_selection_by_predicate(tmp_path):
    model = MLP()
    _, cb = _fit(tmp_path, model, callback=DualFormCallback(tmp_path / "p.h5", layers=lambda n, m: m.out_features == 3))
    with StoreReader(cb.store_path) as s:
        assert s.layers == ["net.2"]


@pytest.mark.parametrize("dtype,tol", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_rows_are_close_and_say_so(tmp_path, dtype, tol):
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    _, cb = _fit(tmp_path, model, callback=DualFormCallback(tmp_path / "h.h5", dtype=dtype))
    for name, x in _probe(model).items():
        err = rel_err(dual_output(cb.store_path, name, x), real_output(dict(model.named_modules())[name], x))
        assert err <= tol
        assert cb.certificate[name]["rel_err"] > 1e-7  # the certificate reports the rounding


def test_a_writer_that_holds_training_back_is_reported(tmp_path, monkeypatch, caplog):
    """A store that cannot keep up (here: each step's write sleeps) makes training wait: the user is told
    why and what to change, once, and the store is still exact."""
    import time

    from lightning_dualform.record import engine as cbmod
    from lightning_dualform.store import StoreWriter

    # checked every 8 steps; each write takes 0.1 s, far longer than a step even on a busy machine
    monkeypatch.setattr(cbmod, "_SLOW_WRITER_MIN_S", 0.2)
    # the share of the fit spent waiting depends on how fast the rest of the fit ran (a loaded machine: slower);
    # the seconds waited do not, so only they decide here
    monkeypatch.setattr(cbmod, "_SLOW_WRITER_SHARE", 0.0)
    monkeypatch.setattr(cbmod, "_PACE_CHECK_EVERY", 8)
    add_step = StoreWriter.add_step

    def slow(self, *args, **kwargs):
        time.sleep(0.1)
        return add_step(self, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "add_step", slow)
    model = MLP()
    cb = DualFormCallback(tmp_path / "slow.h5", compression="lzf", max_queue=1)
    with pytest.warns(
        UserWarning, match=r"training waited .* for the store writer .*compression='lzf'.*compression=None"
    ) as rec:
        trainer, _ = _fit(tmp_path, model, callback=cb, epochs=3)
    assert sum("for the store writer" in str(w.message) for w in rec) == 1
    assert trainer.global_step == 18 and cb.certificate["net.0"]["exact"]
    assert_exact(cb.store_path, model, _probe(model))


def test_a_writer_that_keeps_up_says_nothing(tmp_path, recwarn, monkeypatch):
    from lightning_dualform.record import engine as cbmod

    monkeypatch.setattr(cbmod, "_PACE_CHECK_EVERY", 8)
    _fit(tmp_path, MLP(), epochs=3)
    assert not [w for w in recwarn if "for the store writer" in str(w.message)]


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression_is_lossless(tmp_path, compression):
    model = MLP()
    _, cb = _fit(tmp_path, model, callback=DualFormCallback(tmp_path / "c.h5", compression=compression))
    assert_exact(cb.store_path, model, _probe(model))


class WeightAlsoUsedOutside(L.LightningModule):
    """A wide layer whose weight is also applied outside its forward: its rows explain only part of the
    gradient, so the layer must be recorded as INEXACT, under rounding (bf16-mixed) as in float32."""

    def __init__(self, d: int = 2048):
        super().__init__()
        self.lin = nn.Linear(d, 16)
        self.head = nn.Linear(16, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.lin(x) + 0.5 * nn.functional.linear(x.flip(1), self.lin.weight)  # the second use is not seen
        return nn.functional.cross_entropy(self.head(torch.relu(h)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_weight_used_outside_its_forward_is_reported_inexact(tmp_path, precision):
    cb = DualFormCallback(tmp_path / "o.h5", layers=["lin"])
    with pytest.warns(UserWarning, match="INEXACT"):
        L.Trainer(max_epochs=1, callbacks=[cb], precision=precision, **TRAINER_KW).fit(
            WeightAlsoUsedOutside(), loader(IndexedDataset(n=64, d=2048), batch_size=16))
    assert "lin" in cb.inexact_layers
    with StoreReader(cb.store_path) as s:
        assert not s.layer("lin").exact
