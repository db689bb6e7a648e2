"""The metagradient (and every influence method) against brute-force autograd through a small unrolled training.

A float64 MLP is trained by a real ``torch.optim`` optimizer under ``DualFormRecorder``. The reference keeps every
step of the same training in one autograd graph, with each example's loss weight ``w_i`` as a leaf (``loss_s =
sum_{i in s} w_i l_i / B``), and differentiates ``f`` of the final model with respect to ``w``. The optimizers are
written out again here, op for op as torch documents them, independently of the library's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_dualform import DualFormRecorder, StoreReader
from lightning_dualform.attribute import influence
from lightning_dualform.attribute.targets import margin

N, BATCH, EPOCHS, D_IN, H, C = 24, 6, 2, 5, 7, 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, C)).double()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    order = [torch.randperm(N, generator=g) for _ in range(EPOCHS)]
    batches = [o[i:i + BATCH] for o in order for i in range(0, N, BATCH)]
    return x, y, batches


def schedule(s: int) -> float:
    return 1.0 / (1.0 + 0.1 * s)  # a per-step learning-rate factor


def train(path, make_opt, clip=None):
    model = make_model()
    x, y, batches = data()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    with DualFormRecorder(str(path), model, opt) as rec:
        for s, idx in enumerate(batches):
            rec.batch(indices=idx, labels=y[idx], inputs=x[idx], epoch=s * BATCH // N)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
    return model


# -- the reference: every step in one graph ---------------------------------------------------------------
def ref_sgd(lr, momentum=0.0, dampening=0.0, wd=0.0, nesterov=False):
    def init(p):
        return {"buf": None}

    def step(p, st, g, s):
        lr_s = lr * schedule(s)
        d = g + wd * p
        if momentum:
            buf = d if st["buf"] is None else momentum * st["buf"] + (1 - dampening) * d
            st = {"buf": buf}
            d = d + momentum * buf if nesterov else buf
        return p - lr_s * d, st
    return init, step


def ref_adam(lr, betas=(0.9, 0.999), eps=1e-8, wd=0.0, decoupled=False, amsgrad=False, fixed_state=False):
    b1, b2 = betas

    def init(p):
        return {"m": torch.zeros_like(p), "v": torch.zeros_like(p), "vmax": torch.zeros_like(p), "t": 0}

    def step(p, st, g, s):
        lr_s = lr * schedule(s)
        t = st["t"] + 1
        if decoupled:
            p = p * (1 - lr_s * wd)
        else:
            g = g + wd * p
        m = b1 * st["m"] + (1 - b1) * g
        gv = g.detach() if fixed_state else g  # first order holds the second moment fixed
        v = b2 * st["v"] + (1 - b2) * gv * gv
        vmax = torch.maximum(st["vmax"], v) if amsgrad else v
        vhat = vmax / (1 - b2**t)
        p = p - lr_s * (m / (1 - b1**t)) / (torch.sqrt(vhat) + eps)
        return p, {"m": m, "v": v, "vmax": vmax, "t": t}
    return init, step


def brute_force(ref, queries, qtargets, clip=None, mode="meta"):
    """``df/dw`` by autograd: ``"meta"`` through everything; ``"first"`` with every step's weights (hence the
    later gradients) and the optimizer's nonlinear state held fixed; ``"tracin"``: per step, ``df/dtheta_s`` times
    that step's change of ``theta_{s+1}``."""
    init, step = ref
    model = make_model()
    x, y, batches = data()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    states = {k: init(v) for k, v in params.items()}
    w = torch.ones(N, dtype=torch.float64, requires_grad=True)
    tracin = 0.0
    for s, idx in enumerate(batches):
        at = {k: v.detach().requires_grad_(True) for k, v in params.items()} if mode != "meta" else params
        out = functional_call(model, at, (x[idx],))
        loss = (w[idx] * nn.functional.cross_entropy(out, y[idx], reduction="none")).sum() / len(idx)
        grads = torch.autograd.grad(loss, list(at.values()), create_graph=True)
        if mode == "tracin":
            states = {k: {e: (t.detach() if isinstance(t, torch.Tensor) else t) for e, t in st.items()}
                      for k, st in states.items()}
            moved = {k: step(p.detach(), states[k], g, s)[0] for (k, p), g in zip(at.items(), grads)}
            f_s = margin(functional_call(model, {k: at[k].detach() + moved[k] - moved[k].detach() for k in at},
                                         (queries,)), qtargets)
            tracin = tracin + f_s
        if clip is not None:
            norm = torch.sqrt(sum((g * g).sum() for g in grads))
            grads = [g * torch.clamp(clip / (norm + 1e-6), max=1.0) for g in grads]
        new = {}
        for (k, p), g in zip(params.items(), grads):
            new[k], states[k] = step(p, states[k], g, s)
        params = new
    f = margin(functional_call(model, params, (queries,)), qtargets)
    if mode == "tracin":
        f = f.detach() + tracin - tracin.detach()
    table = torch.stack([torch.autograd.grad(f[q], w, retain_graph=True)[0] for q in range(len(f))])
    return table, f.detach(), params


SLOW = pytest.mark.slow
CASES = [
    pytest.param("sgd", lambda p: torch.optim.SGD(p, lr=0.3), ref_sgd(0.3), marks=SLOW),
    ("sgd-momentum-nesterov-wd", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01),
     ref_sgd(0.2, momentum=0.9, wd=0.01, nesterov=True)),
    pytest.param("sgd-momentum-dampening", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, dampening=0.3),
                 ref_sgd(0.2, momentum=0.8, dampening=0.3), marks=SLOW),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), ref_adam(0.05, wd=0.1, decoupled=True)),
    pytest.param("adam-l2-amsgrad", lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01, amsgrad=True),
                 ref_adam(0.05, wd=0.01, amsgrad=True), marks=SLOW),
]


def queries():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, D_IN, generator=g, dtype=torch.float64), torch.randint(0, C, (5,), generator=g)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,make_opt,ref", CASES, ids=["sgd", "sgd-momentum-nesterov-wd", "sgd-momentum-dampening",
                                                          "adamw", "adam-l2-amsgrad"])
def test_metagradient_equals_unrolled_autograd(tmp_path, name, make_opt, ref):
    model = train(tmp_path / "run.h5", make_opt)
    q, qt = queries()
    want, f_want, _ = brute_force(ref, q, qt)
    with StoreReader(tmp_path / "run.h5") as store:
        res = influence(store, model, q, qt, method="metagradient", query_batch=3)
    assert list(res.examples) == list(range(N))
    assert rel(res.values, f_want) < 1e-6
    assert rel(res.scores, want) < 1e-5, (name, rel(res.scores, want))
    assert res.replay.grad_error < 1e-6 and res.replay.max_final_error < 1e-6


@pytest.mark.slow
def test_metagradient_with_norm_clipping(tmp_path):
    clip = 0.5
    model = train(tmp_path / "run.h5", lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5), clip=clip)
    q, qt = queries()
    want, _, _ = brute_force(ref_sgd(0.3, momentum=0.5), q, qt, clip=clip)
    with StoreReader(tmp_path / "run.h5") as store:
        with pytest.raises(ValueError, match="max_grad_norm"):
            influence(store, model, q, qt, method="metagradient")
        res = influence(store, model, q, qt, method="metagradient", max_grad_norm=clip)
    assert rel(res.scores, want) < 1e-5


FIRST_ORDER_CASES = [
    pytest.param("sgd-momentum", lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01),
     ref_sgd(0.2, momentum=0.9, wd=0.01), ref_sgd(0.2, momentum=0.9, wd=0.01), marks=SLOW),
    ("adamw", lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1), ref_adam(0.05, wd=0.1, decoupled=True),
     ref_adam(0.05, wd=0.1, decoupled=True, fixed_state=True)),
]


@pytest.mark.parametrize("name,make_opt,ref,ref_fixed", FIRST_ORDER_CASES, ids=["sgd-momentum", "adamw"])
def test_first_order_and_every_step_equal_their_autograd_definitions(tmp_path, name, make_opt, ref, ref_fixed):
    """First order: the derivative with every step's weights and the optimizer's nonlinear state held fixed (the
    dual form's coefficients); every step (TracIn): each step's own change of the weights against df/dtheta_s."""
    model = train(tmp_path / "run.h5", make_opt)
    q, qt = queries()
    first, f_want, _ = brute_force(ref_fixed, q, qt, mode="first")
    tracin, _, _ = brute_force(ref, q, qt, mode="tracin")
    with StoreReader(tmp_path / "run.h5") as store:
        fo = influence(store, model, q, qt)
        ev = influence(store, model, q, qt, method="every_step")
    assert rel(fo.values, f_want) < 1e-6
    assert rel(fo.scores, first) < 1e-5, rel(fo.scores, first)
    assert rel(ev.scores, tracin) < 1e-5, rel(ev.scores, tracin)
