"""The metagradient (and every influence method) against brute-force autograd through a small unrolled training.

A float64 MLP is trained by a real ``torch.optim`` optimizer under ``DualFormRecorder``. The reference keeps every
step of the same training in one autograd graph, with each example's loss weight ``w_i`` as a leaf (``loss_s =
sum_{i in s} w_i l_i / B``), and differentiates ``f`` of the final model with respect to ``w``. The optimizers are
written out again here, op for op as torch documents them, independently of the library's; for the other rules
the reference step is torch's own functional step (``torch.optim.<module>.<rule>(..., differentiable=True)``), and
for Adafactor (whose torch step takes its step size and clip out of the graph with ``.item()``) the algorithm as
torch documents it.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

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


def train(path, make_opt, clip=None, frozen=lambda s: ()):
    """The recorded run; ``frozen(s)``: the parameters with ``requires_grad=False`` during step ``s``."""
    model = make_model()
    x, y, batches = data()
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    with DualFormRecorder(str(path), model, opt) as rec:
        for s, idx in enumerate(batches):
            for k, p in model.named_parameters():
                p.requires_grad_(k not in frozen(s))
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


#: torch's functional optimizers take their state as lists; the state entry each list holds
_STATE_LISTS = {"exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "max_exp_avg_sqs": "max_exp_avg_sq",
                "exp_infs": "exp_inf", "mu_products": "mu_product", "state_sums": "sum", "square_avgs": "square_avg",
                "grad_avgs": "grad_avg", "momentum_buffer_list": "momentum_buffer", "acc_deltas": "acc_delta",
                "axs": "ax", "mus": "mu", "etas": "eta", "state_steps": "step"}
_FLAGS = {"foreach": False, "capturable": False, "differentiable": True, "fused": None, "grad_scale": None,
          "found_inf": None, "has_complex": False, "has_sparse_grad": False}


def ref_torch(cls, lr, **kwargs):
    """The reference step of ``cls``: torch's own functional step with ``differentiable=True``, on copies of the
    parameter and state (torch steps in place)."""
    fn = getattr(importlib.import_module(cls.__module__), cls.__name__.lower())
    sig = inspect.signature(fn).parameters
    hp = cls([torch.zeros(1, requires_grad=True)], lr=lr, **kwargs).defaults  # every default filled in
    scalar = torch.get_default_dtype()

    def init(p):
        st = {}
        for lst, e in _STATE_LISTS.items():
            if lst in sig:
                # the step count in float64: in differentiable mode torch computes the bias corrections from it
                st[e] = {"step": torch.tensor(0.0, dtype=torch.float64), "mu_product": torch.tensor(1.0, dtype=scalar),
                         "mu": torch.tensor(1.0, dtype=scalar), "eta": torch.tensor(lr, dtype=scalar),
                         "sum": torch.full_like(p, hp.get("initial_accumulator_value", 0.0)),
                         }.get(e, torch.zeros_like(p))
        return st

    def step(p, st, g, s):
        p, st = p.clone(), {e: t.clone() for e, t in st.items()}
        args = {"params": [p], "grads": [g], "d_p_list": [g], **_FLAGS}
        args.update({lst: [st[e]] for lst, e in _STATE_LISTS.items() if lst in sig})
        for name in sig:
            if name in ("beta1", "beta2"):
                args[name] = hp["betas"][name == "beta2"]
            elif name not in args and name in hp:
                args[name] = hp[name]
        args["lr"] = lr * schedule(s)
        fn(**{k: v for k, v in args.items() if k in sig})
        return p, st
    return init, step


def ref_adafactor(lr, beta2_decay=-0.8, eps2=1e-3, d=1.0, wd=0.0, maximize=False):
    """Adafactor as torch documents it, with its step size and clip in the graph."""
    def init(p):
        if p.dim() > 1:
            return {"t": 0, "r": p.new_zeros(p.shape[:-1] + (1,)), "c": p.new_zeros(p.shape[:-2] + (1,) + p.shape[-1:])}
        return {"t": 0, "v": torch.zeros_like(p)}

    def step(p, st, g, s):
        lr_s, t = lr * schedule(s), st["t"] + 1
        eps1 = torch.finfo(p.dtype).eps
        g = -g if maximize else g
        beta2_t = t**beta2_decay
        alpha = torch.clamp(p.norm() / p.numel() ** 0.5, min=eps2) * min(lr_s, t**-0.5)
        p = p * (1 - lr_s * wd)
        if p.dim() > 1:
            r = torch.lerp(st["r"], (g * g).mean(-1, keepdim=True), beta2_t)
            c = torch.lerp(st["c"], (g * g).mean(-2, keepdim=True), beta2_t)
            v, new = r @ c / torch.clamp(r.mean(-2, keepdim=True), min=eps1), {"t": t, "r": r, "c": c}
        else:
            v = torch.lerp(st["v"], g * g, beta2_t)
            new = {"t": t, "v": v}
        u = g / torch.sqrt(torch.clamp(v, min=eps1 * eps1))
        return p - alpha / torch.clamp(u.norm() / (u.numel() ** 0.5 * d), min=1.0) * u, new
    return init, step


def brute_force(ref, queries, qtargets, clip=None, mode="meta", frozen=lambda s: ()):
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
            states = {k: {e: (t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t)
                          for e, t in st.items()}
                      for k, st in states.items()}
            moved = {k: step(p.detach(), states[k], g, s)[0] for (k, p), g in zip(at.items(), grads)}
            f_s = margin(functional_call(model, {k: at[k].detach() + moved[k] - moved[k].detach() for k in at},
                                         (queries,)), qtargets)
            tracin = tracin + f_s
        live = [k not in frozen(s) for k in at]  # a frozen parameter has no .grad: not clipped, not stepped
        if clip is not None:
            norm = torch.sqrt(sum((g * g).sum() for g, on in zip(grads, live) if on))
            grads = [g * torch.clamp(clip / (norm + 1e-6), max=1.0) for g in grads]
        new = {}
        for (k, p), g, on in zip(params.items(), grads, live):
            # (a frozen parameter is carried on as a new node: a later step's gradient with respect to it must not
            # run back through the steps that used it before)
            new[k], states[k] = step(p, states[k], g, s) if on else (p.clone(), states[k])
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


def _torch_case(name, cls, lr, slow=False, **kwargs):
    """A case whose reference is torch's own differentiable functional step."""
    return pytest.param(name, lambda p: cls(p, lr=lr, **kwargs), ref_torch(cls, lr, **kwargs), id=name,
                        marks=SLOW if slow else ())


# one small case per rule in the default run; the other flags marked slow
CASES += [
    _torch_case("asgd", torch.optim.ASGD, 0.2, lambd=0.01, alpha=0.5, t0=3, weight_decay=0.01),
    _torch_case("adamax", torch.optim.Adamax, 0.05, weight_decay=0.01),
    _torch_case("nadam", torch.optim.NAdam, 0.05, weight_decay=0.01, momentum_decay=0.01),
    _torch_case("radam", torch.optim.RAdam, 0.05, weight_decay=0.1, decoupled_weight_decay=True),
    _torch_case("adagrad", torch.optim.Adagrad, 0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1,
                eps=1e-4),
    _torch_case("rmsprop", torch.optim.RMSprop, 0.01, momentum=0.9, centered=True, weight_decay=0.01),
    _torch_case("adadelta", torch.optim.Adadelta, 1.0, weight_decay=0.01),
    _torch_case("adam-maximize-decoupled", torch.optim.Adam, 0.02, slow=True, maximize=True, weight_decay=0.1,
                decoupled_weight_decay=True),
    _torch_case("adamax-maximize", torch.optim.Adamax, 0.02, slow=True, maximize=True),
    _torch_case("nadam-decoupled", torch.optim.NAdam, 0.05, slow=True, weight_decay=0.1, decoupled_weight_decay=True),
    _torch_case("radam-l2-maximize", torch.optim.RAdam, 0.02, slow=True, weight_decay=0.01, maximize=True),
    _torch_case("rmsprop-plain", torch.optim.RMSprop, 0.01, slow=True, weight_decay=0.01),
    _torch_case("adadelta-maximize", torch.optim.Adadelta, 0.5, slow=True, rho=0.8, maximize=True),
]
if hasattr(torch.optim, "Adafactor"):
    CASES += [
        pytest.param("adafactor", lambda p: torch.optim.Adafactor(p, lr=0.05, weight_decay=0.1),
                     ref_adafactor(0.05, wd=0.1), id="adafactor"),
        pytest.param("adafactor-maximize",
                     lambda p: torch.optim.Adafactor(p, lr=0.05, beta2_decay=-0.5, maximize=True),
                     ref_adafactor(0.05, beta2_decay=-0.5, maximize=True), id="adafactor-maximize",
                     marks=SLOW),
    ]


def queries():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, D_IN, generator=g, dtype=torch.float64), torch.randint(0, C, (5,), generator=g)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name,make_opt,ref", CASES, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
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
    # a scale-free rule with a tiny eps is noted as rough in the loss weights; the others are not
    eps = make_opt([torch.zeros(1, requires_grad=True)]).defaults.get("eps", 1.0)
    scale_free = name.split("-")[0] in ("adam", "adamw", "adamax", "nadam", "radam", "adagrad", "rmsprop")
    assert bool(res.replay.notes) == (scale_free and eps < 1e-4), (name, res.replay.notes)


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


@pytest.mark.parametrize("frozen", [
    lambda s: {"0.weight", "0.bias"} if s < 3 else set(),  # the first layer: its steps' examples from the others' rows
    lambda s: {"4.weight", "4.bias"} if s >= 4 else set(),  # the last layer: its gradient is not the stored one
], ids=["first-layer-early", "last-layer-late"])
def test_metagradient_of_a_run_with_a_layer_frozen_for_some_steps(tmp_path, frozen):
    clip = 0.5
    model = train(tmp_path / "run.h5", lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5), clip=clip, frozen=frozen)
    for p in model.parameters():
        p.requires_grad_(True)
    q, qt = queries()
    want, _, _ = brute_force(ref_sgd(0.3, momentum=0.5), q, qt, clip=clip, frozen=frozen)
    with StoreReader(tmp_path / "run.h5") as store:
        res = influence(store, model, q, qt, method="metagradient", max_grad_norm=clip)
    assert rel(res.scores, want) < 1e-5 and res.replay.grad_error < 1e-6


def test_the_clipped_replay_warns_nothing(tmp_path):
    """The clip factor is compared as a number without a torch warning about a tensor that requires grad (the
    metagradient's own graph is untouched: the slow test above checks its values)."""
    model = train(tmp_path / "run.h5", lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.5), clip=0.5)
    q, qt = queries()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = influence(tmp_path / "run.h5", model, q[:1], qt[:1], method="metagradient", max_grad_norm=0.5)
    assert res.scores.shape == (1, N) and bool(torch.isfinite(res.scores).all())


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


@pytest.mark.skipif(not hasattr(torch.optim, "Adafactor"), reason="torch < 2.5 has no Adafactor")
def test_every_step_through_a_step_that_couples_entries(tmp_path):
    """Adafactor's factored moment, step size and clip couple a parameter's entries: TracIn at every step carries
    each query's gradient through the step's transposed Jacobian instead of an element-wise response."""
    model = train(tmp_path / "run.h5", lambda p: torch.optim.Adafactor(p, lr=0.05, weight_decay=0.1))
    q, qt = queries()
    tracin, _, _ = brute_force(ref_adafactor(0.05, wd=0.1), q, qt, mode="tracin")
    with StoreReader(tmp_path / "run.h5") as store:
        ev = influence(store, model, q, qt, method="every_step")
    assert rel(ev.scores, tracin) < 1e-5, rel(ev.scores, tracin)


#: every element-wise rule beside SGD and AdamW (tested above): TracIn's element-wise response of each step; the
#: response is one generic jvp through the rule's step (AdamW's is checked above), so the default run keeps the rule
#: with the most state (RMSprop, centered with momentum)
ELEMENTWISE_CASES = [pytest.param(*c.values, id=c.id, marks=() if c.id == "rmsprop" else SLOW)
                     for c in CASES if getattr(c, "id", None) in
                     ("asgd", "adamax", "nadam", "radam", "adagrad", "rmsprop", "adadelta", "rmsprop-plain",
                      "adam-maximize-decoupled")]


@pytest.mark.parametrize("name,make_opt,ref", ELEMENTWISE_CASES)
def test_every_step_equals_tracin_for_every_elementwise_rule(tmp_path, name, make_opt, ref):
    """TracIn at every step through each rule's own element-wise response ``d theta_{s+1} / d g_s`` (the rule's
    state held at its recorded value), against autograd through torch's functional step."""
    model = train(tmp_path / "run.h5", make_opt)
    q, qt = queries()
    tracin, _, _ = brute_force(ref, q, qt, mode="tracin")
    with StoreReader(tmp_path / "run.h5") as store:
        ev = influence(store, model, q, qt, method="every_step")
    assert rel(ev.scores, tracin) < 1e-5, (name, rel(ev.scores, tracin))
