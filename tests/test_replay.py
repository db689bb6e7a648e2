"""Every optimizer with an exact rule, recorded by a real Trainer (and a plain loop) and rebuilt by the replay.

Each run has norm clipping, gradient accumulation and a per-step learning-rate schedule. The store must
rebuild the real layers (computed in float64 from the model's own weights) at the end and at an earlier
step, and the rows' contributions to each query's unit plus the base term must give that unit's output.
"""

from __future__ import annotations

import copy
import json
import warnings

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset, loader, real_output, rel_err
from lightning_dualform import DualFormCallback, DualFormRecorder, DualInference, StoreReader
from lightning_dualform.attend.certificate import rebuild_weights
from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.optim import registry
from lightning_dualform.optim.adafactor import AdafactorRule
from lightning_dualform.store.format import FORMAT_VERSION

HAS_ADAFACTOR = hasattr(torch.optim, "Adafactor")

#: (id, optimizer factory): every rule, with the settings that exercise it (L2 decay feeds p into the state,
#: amsgrad and maximize, RAdam past its rectification switch, momentum and centering)
OPTIMIZERS = [
    ("adamw", lambda p: torch.optim.AdamW(p, lr=2e-2, weight_decay=0.1)),
    ("adam-amsgrad-l2-maximize", lambda p: torch.optim.Adam(p, lr=2e-2, weight_decay=0.05, amsgrad=True)),
    (
        "adagrad",
        lambda p: torch.optim.Adagrad(p, lr=5e-2, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
    ),
    (
        "rmsprop-momentum-centered",
        lambda p: torch.optim.RMSprop(p, lr=5e-3, momentum=0.9, centered=True, weight_decay=0.01),
    ),
    ("adamax", lambda p: torch.optim.Adamax(p, lr=2e-2, weight_decay=0.01)),
    ("nadam", lambda p: torch.optim.NAdam(p, lr=2e-2, weight_decay=0.01)),
    ("radam", lambda p: torch.optim.RAdam(p, lr=2e-2, betas=(0.9, 0.9), weight_decay=0.1, decoupled_weight_decay=True)),
    ("adadelta", lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=0.01)),
    ("asgd", lambda p: torch.optim.ASGD(p, lr=5e-2, lambd=1e-2, t0=3, weight_decay=0.01)),
]
if HAS_ADAFACTOR:
    OPTIMIZERS.append(("adafactor", lambda p: torch.optim.Adafactor(p, lr=2e-2, weight_decay=0.01)))
IDS = [o[0] for o in OPTIMIZERS]
RULE_OF = {"adamw": "adam", "adam-amsgrad-l2-maximize": "adam", "rmsprop-momentum-centered": "rmsprop"}


class Snapshots(L.Callback):
    """The model's weights after every optimizer step, by global step."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def _factory(make):
    def build(m):
        params = [{"params": m.net[0].parameters()}, {"params": m.net[2].parameters()}]
        opt = make(params)
        if isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW):
            opt.param_groups[1]["maximize"] = True  # a second group with other settings
        return opt
    return build


def _fit(tmp_path, make, epochs: int = 2):
    L.seed_everything(0, verbose=False)
    model = MLP(opt_factory=_factory(make), sched_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.9))
    snaps = Snapshots()
    cb = DualFormCallback(tmp_path / "run.h5")
    trainer = L.Trainer(max_epochs=epochs, callbacks=[cb, snaps], accelerator="cpu", gradient_clip_val=0.3,
                        accumulate_grad_batches=2, **TRAINER_KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(IndexedDataset(n=48), batch_size=8))
    return model, cb, snaps


def _layer_at(model: MLP, state: dict, name: str) -> torch.nn.Linear:
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    return dict(m.named_modules())[name]


def _unit_check(res, ref: torch.Tensor) -> float:
    """|base + sum of every row's contribution - the real unit output| / |real output row| (top_k = all rows)."""
    total = res.proponents.score.double().sum(1) + res.opponents.score.double().sum(1) + res.unit_base
    target = ref.gather(1, res.units[:, None]).squeeze(1)
    return float(((total - target).abs() / ref.norm(dim=1)).max())


@pytest.mark.parametrize("opt_id, make", OPTIMIZERS, ids=IDS)
def test_every_optimizer_is_exact_through_a_trainer(tmp_path, opt_id, make):
    model, cb, snaps = _fit(tmp_path, make)
    assert all(c["exact"] and c["rel_err"] <= 1e-5 for c in cb.certificate.values()), cb.certificate
    rule = RULE_OF.get(opt_id, opt_id.split("-")[0])
    with StoreReader(cb.store_path) as s:
        assert s.update_rule == rule and s.meta.format_version == FORMAT_VERSION
        last = s.last_step
    mid = last // 2
    g = torch.Generator().manual_seed(1)
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        scalar = di.store.form == "scalar"
        assert di.store.form == ("scalar" if rule == "asgd" else "element-wise")
        for name in ("net.0", "net.2"):
            lay = di.layer(name)
            x = torch.randn(5, lay.d_in, generator=g)
            for at in (None, mid):
                ref = real_output(_layer_at(model, snaps.states[last if at is None else at], name), x)
                res = di.attend(name, x, top_k=lay.rows_before(at or last), at_step=at, contribution_to="pred")
                assert rel_err(res.dual.double(), ref) <= 1e-5, (name, at)
                assert res.score == ("raw" if scalar else "unit")
                assert torch.equal(res.units, ref.argmax(1))
                assert _unit_check(res, ref) <= 1e-5, (name, at)
            # the rebuilt weights themselves, at the earlier step
            w, b = rebuild_weights(lay, mid)
            m = _layer_at(model, snaps.states[mid], name)
            assert rel_err(w, m.weight.detach().double()) <= 1e-5
            assert rel_err(b, m.bias.detach().double()) <= 1e-5


def test_unit_scores_rank_by_the_optimizers_metric(tmp_path):
    """top/mass/per-example sums use -(Q_s[u] (.) k) . q; score='raw' the paper's k . q (contributions unchanged)."""
    model, cb, _ = _fit(tmp_path, OPTIMIZERS[0][1])
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        lay = di.layer("net.2")
        x = torch.randn(4, lay.d_in, generator=torch.Generator().manual_seed(3))
        unit = di.attend("net.2", x, top_k=lay.n_rows)
        raw = di.attend("net.2", x, top_k=lay.n_rows, score="raw")
        rows = lay.read(0, lay.n_rows)
        # the raw scores are k . q; the unit scores sum (over rows with the same unit) to what the contributions say
        np.testing.assert_allclose(
            raw.top.score.numpy(),
            np.sort(x.double().numpy() @ rows["keys"].astype(np.float64).T, 1)[:, ::-1],
            rtol=1e-6,
            atol=1e-9,
        )
        assert unit.score == "unit" and raw.score == "raw" and unit.to_dict()["score"] == "unit"
        torch.testing.assert_close(raw.unit_output, unit.unit_output)
        torch.testing.assert_close(
            torch.sort(raw.proponents.score, 1).values, torch.sort(unit.proponents.score, 1).values
        )
        # contribution = v_u ((Q (.) k) . q + Qb_u) = -v_u * score + v_u Qb_u, row by row: check it on the top rows
        by_row = {int(r): float(s) for r, s in zip(unit.top.row[0], unit.top.score[0])}
        contrib = {int(r): float(c) for r, c in zip(unit.proponents.row[0], unit.proponents.score[0]) if r >= 0}
        contrib.update({int(r): float(c) for r, c in zip(unit.opponents.row[0], unit.opponents.score[0]) if r >= 0})
        assert set(contrib) <= set(by_row)
        # mass sums the same scores the top ranks
        assert float(unit.mass["label"].signed[0].sum()) == pytest.approx(sum(by_row.values()), rel=1e-9, abs=1e-12)
        # a unit score needs a unit
        with pytest.raises(ValueError, match="contribution_to"):
            di.attend("net.2", x, contribution_to=None)
        assert di.attend("net.2", x, contribution_to=None, score="raw").units is None


def test_sgd_store_keeps_raw_scores_and_offers_unit_scores(tmp_path):
    model, cb, _ = _fit(tmp_path, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        lay = di.layer("net.0")
        x = torch.randn(3, lay.d_in, generator=torch.Generator().manual_seed(2))
        raw = di.attend("net.0", x, top_k=5)
        unit = di.attend("net.0", x, top_k=lay.n_rows, score="unit", contribution_to=1)
        assert raw.score == "raw" and raw.units is None and unit.score == "unit"
        coef = lay.coefficients()
        rows = lay.read(0, lay.n_rows)
        want = (x.double().numpy() @ rows["keys"].astype(np.float64).T) * -coef.c_w[rows["step"] - coef.first_step]
        np.testing.assert_allclose(unit.top.score.numpy(), np.sort(want, 1)[:, ::-1], rtol=1e-9, atol=1e-12)
        ref = real_output(model.net[0], x)
        assert _unit_check(unit, ref) <= 1e-5
        torch.testing.assert_close(raw.dual, unit.dual)


@pytest.mark.skipif(not HAS_ADAFACTOR, reason="torch.optim.Adafactor needs torch >= 2.5")
def test_adafactor_rank_one_agrees_with_the_element_wise_path(tmp_path, monkeypatch):
    _, cb, _ = _fit(tmp_path, lambda p: torch.optim.Adafactor(p, lr=2e-2))
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        lay = di.layer("net.2")
        forms = []
        LayerReplay(lay).sweep_units(np.arange(3), lambda rows, q, qb: forms.append(type(q).__name__))
        assert set(forms) == {"RankOne"}  # every step of the 2-D weight took the factored form
        fast = di.attend("net.2", x, top_k=lay.n_rows, reuse_certificate=False)
    monkeypatch.setitem(registry.RULES, "adafactor", AdafactorRule(rank_one=False))
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        forms = []
        LayerReplay(di.layer("net.2")).sweep_units(np.arange(3), lambda rows, q, qb: forms.append(type(q).__name__))
        assert set(forms) == {"ndarray"}
        slow = di.attend("net.2", x, top_k=lay.n_rows, reuse_certificate=False)
    for a, b in ((fast.dual, slow.dual), (fast.unit_output, slow.unit_output), (fast.unit_base, slow.unit_base),
                 (fast.top.score, slow.top.score), (fast.proponents.score, slow.proponents.score)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(fast.top.row, slow.top.row)


def test_segments_and_snapshots_give_the_unsegmented_answer(tmp_path):
    """A tight memory budget splits the sweep into segments replayed from snapshots: same Q_s, same base."""
    _, cb, _ = _fit(tmp_path, OPTIMIZERS[1][1])  # Adam with L2 decay: snapshots must hold the parameter
    with StoreReader(cb.store_path) as s:
        rep = LayerReplay(s.layer("net.0"))
        units = np.array([0, 3, 3, 7])
        assert rep.plan(len(np.unique(units)), budget=1) < rep.stop

        def collect(budget):
            out = {}
            base = rep.sweep_units(
                units, lambda rows, q, qb: out.__setitem__(rows.s, (np.copy(q), np.copy(qb))), budget=budget
            )
            return out, base

        whole, base_whole = collect(1 << 30)
        parts, base_parts = collect(1)
    assert sorted(whole) == sorted(parts) and len(whole) == rep.stop
    for s in whole:
        np.testing.assert_allclose(parts[s][0], whole[s][0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(parts[s][1], whole[s][1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(base_parts[0], base_whole[0], rtol=1e-12)
    np.testing.assert_allclose(base_parts[1], base_whole[1], rtol=1e-12)


@pytest.mark.parametrize("opt_id, make", [OPTIMIZERS[0], OPTIMIZERS[2]] + ([OPTIMIZERS[-1]] if HAS_ADAFACTOR else []),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_recorder_loop_is_exact(tmp_path, opt_id, make):
    """A plain loop with clipping by hand, a schedule and accumulation over two micro-batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = make(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ds = IndexedDataset(n=40)
    with DualFormRecorder(str(tmp_path / "r.h5"), model, opt) as rec:
        for step in range(6):
            for micro in range(2):
                idx = torch.arange(8 * (2 * step + micro), 8 * (2 * step + micro) + 8) % len(ds)
                x, y = ds.x[idx], ds.y[idx]
                rec.batch(indices=idx, labels=y)
                torch.nn.functional.cross_entropy(model(x / 10), y).div(2).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            opt.step()
            opt.zero_grad()
            sched.step()
    assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    with DualInference(str(tmp_path / "r.h5"), device="cpu", accumulate=torch.float64) as di:
        res = di.attend("0", x, top_k=di.layer("0").n_rows)
        ref = real_output(model[0], x)
        assert rel_err(res.dual.double(), ref) <= 1e-5 and _unit_check(res, ref) <= 1e-5


def test_store_keeps_the_state_nadam_rounds_in_float32(tmp_path):
    """NAdam's mu_product is a float32 tensor in torch: the store keeps its dtype for the replay."""
    model, cb, _ = _fit(tmp_path, OPTIMIZERS[5][1], epochs=1)
    with h5py.File(cb.store_path, "r") as f:
        attrs = f["layers/net.0/state/weight"].attrs
        assert attrs["mu_product"].dtype == np.float32 and f["layers/net.0/state/weight/exp_avg_sq"].dtype == np.float32
    with StoreReader(cb.store_path) as s:
        st = s.layer("net.0").initial_state("weight")
        assert isinstance(st.nonlinear["mu_product"], np.float32) and st.linear["exp_avg"].shape == (8, 6)


def test_query_chunks_and_float32_give_the_same_answer(tmp_path):
    """Queries in chunks (one product per chunk and step) and in one batch (steps batched) agree."""
    _, cb, _ = _fit(tmp_path, OPTIMIZERS[0][1], epochs=1)
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        whole = di.attend("net.2", x, top_k=5)
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64, query_chunk=3) as di:
        parts = di.attend("net.2", x, top_k=5)
    with DualInference(cb.store_path, device="cpu") as di:
        f32 = di.attend("net.2", x, top_k=5)
    for a, b in ((whole.top.score, parts.top.score), (whole.unit_output, parts.unit_output),
                 (whole.proponents.score, parts.proponents.score)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert torch.equal(whole.top.row, parts.top.row)
    torch.testing.assert_close(f32.unit_output.double(), whole.unit_output, rtol=1e-5, atol=1e-7)


def test_adamw_answers_through_the_block_cache_equal_the_plain_ones(tmp_path):
    """The element-wise pass reads its rows through DualInference's cache like any other pass."""
    _, cb, _ = _fit(tmp_path, OPTIMIZERS[0][1], epochs=1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(6))
    with (
        DualInference(cb.store_path, device="cpu") as plain,
        DualInference(cb.store_path, device="cpu", cache=1 << 24) as cached,
    ):
        ref = plain.attend("net.2", x, top_k=3, reuse_certificate=False)
        for _ in range(2):  # filling the cache, then from it
            assert json.dumps(cached.attend("net.2", x, top_k=3, reuse_certificate=False).to_dict()) == json.dumps(
                ref.to_dict()
            )
        assert cached.cache_info().hits > 0
