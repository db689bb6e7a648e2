"""The replay's differentiable optimizer steps (``attribute/optimizers.py``): each one against ``torch.optim``'s own
step (the values, every flag, from the per-step table the store records) and against finite differences (its
derivative). The metagradient through whole trainings with every rule: test_metagradient.py."""

from __future__ import annotations

import pytest
import torch

from lightning_dualform.attribute.optimizers import STEPS, TENSOR_STATE, initial_state, step_function
from lightning_dualform.optim import rule_for

HAS_ADAFACTOR = hasattr(torch.optim, "Adafactor")
STEPS_RUN = 12

# (id, optimizer class, common kwargs, weight group, bias group): every flag of every rule the store records
CASES = [
    ("sgd", torch.optim.SGD, dict(lr=0.05), dict(momentum=0.9, nesterov=True, weight_decay=0.01),
     dict(momentum=0.5, dampening=0.2, maximize=True)),
    ("asgd", torch.optim.ASGD, dict(lr=0.05), dict(lambd=1e-2, weight_decay=0.05, alpha=0.5),
     dict(t0=5, maximize=True)),
    ("adam", torch.optim.Adam, dict(lr=0.05), dict(amsgrad=True, weight_decay=0.05), dict(maximize=True)),
    ("adam-decoupled", torch.optim.Adam, dict(lr=0.05), dict(decoupled_weight_decay=True, weight_decay=0.2),
     dict(betas=(0.8, 0.99), amsgrad=True, maximize=True)),
    ("adamw", torch.optim.AdamW, dict(lr=0.05), dict(weight_decay=0.1, eps=1e-3), dict(amsgrad=True)),
    ("adamax", torch.optim.Adamax, dict(lr=0.05), dict(weight_decay=0.05), dict(maximize=True)),
    ("nadam", torch.optim.NAdam, dict(lr=0.05), dict(weight_decay=0.05), dict(momentum_decay=0.01, maximize=True)),
    ("nadam-decoupled", torch.optim.NAdam, dict(lr=0.05), dict(weight_decay=0.1, decoupled_weight_decay=True), dict()),
    ("radam", torch.optim.RAdam, dict(lr=0.05), dict(weight_decay=0.1), dict(maximize=True)),
    ("radam-decoupled", torch.optim.RAdam, dict(lr=0.05), dict(weight_decay=0.1, decoupled_weight_decay=True),
     dict(betas=(0.9, 0.9))),
    ("adagrad", torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1),
     dict(lr_decay=0.01, weight_decay=0.05), dict(maximize=True)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.01), dict(momentum=0.9, centered=True, weight_decay=0.05),
     dict(maximize=True)),
    ("rmsprop-plain", torch.optim.RMSprop, dict(lr=0.01), dict(), dict(centered=True)),
    ("adadelta", torch.optim.Adadelta, dict(lr=1.0), dict(weight_decay=0.05), dict(rho=0.8, maximize=True)),
]
if HAS_ADAFACTOR:
    CASES += [
        ("adafactor", torch.optim.Adafactor, dict(lr=0.05), dict(), dict()),
        ("adafactor-decay-clip", torch.optim.Adafactor, dict(lr=0.05), dict(weight_decay=0.1, d=0.05),
         dict(maximize=True, beta2_decay=-0.5)),
    ]


def _params() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True))


def test_every_recorded_rule_has_a_differentiable_step():
    from lightning_dualform.optim.registry import RULES

    assert set(STEPS) == set(RULES) == set(TENSOR_STATE)
    with pytest.raises(ValueError, match="'plain'"):
        step_function("plain")


@pytest.mark.parametrize("name,cls,common,w_cfg,b_cfg", CASES, ids=[c[0] for c in CASES])
def test_step_equals_torch_optim(name, cls, common, w_cfg, b_cfg):
    """Replay ``STEPS_RUN`` steps (a learning-rate schedule too) from the rows the store would record and the state
    it would keep; every parameter matches torch's to float64 rounding."""
    W, b = _params()
    opt = cls([dict(params=[W], **w_cfg), dict(params=[b], **b_cfg)], **common)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.2 * s))
    rule = rule_for(opt)
    fn = step_function(rule.name)
    ours = {"W": W.detach().clone(), "b": b.detach().clone()}
    states = {k: initial_state(rule.name, rule.read_state(opt, p)) for k, p in (("W", W), ("b", b))}
    gen = torch.Generator().manual_seed(1)
    for s in range(STEPS_RUN):
        grads = {"W": torch.randn(4, 3, generator=gen, dtype=torch.float64),
                 "b": torch.randn(4, generator=gen, dtype=torch.float64)}
        if s == 3:
            grads["b"] = torch.zeros(4, dtype=torch.float64)  # an all-zero gradient (a second moment at 0)
        for k, p in (("W", W), ("b", b)):
            p.grad = grads[k].clone()
        rows = {k: rule.read_step(opt, p) for k, p in (("W", W), ("b", b))}
        opt.step()
        sched.step()
        for k, p in (("W", W), ("b", b)):
            ours[k], states[k] = fn(ours[k], states[k], grads[k], rows[k], "float64")
            torch.testing.assert_close(ours[k], p.detach(), rtol=1e-12, atol=1e-13, msg=f"{name} {k} step {s}")


@pytest.mark.parametrize("name,cls,common,w_cfg,b_cfg", CASES, ids=[c[0] for c in CASES])
def test_step_derivative_equals_finite_differences(name, cls, common, w_cfg, b_cfg):
    """The step's derivative in its parameter, gradient and tensor state (after a few steps, so that every entry is
    away from the kinks at zero), by ``torch.autograd.gradcheck``."""
    W, _ = _params()
    opt = cls([dict(params=[W], **w_cfg)], **common)
    rule = rule_for(opt)
    fn = step_function(rule.name)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        W.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        opt.step()
    st = initial_state(rule.name, rule.read_state(opt, W))
    W.grad = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    hp = rule.read_step(opt, W)
    names = [e for e in TENSOR_STATE[rule.name] if isinstance(st.get(e), torch.Tensor)]

    def step(p, g, *tensors):
        new_p, new_st = fn(p, {**st, **dict(zip(names, tensors))}, g, hp, "float64")
        return (new_p, *[new_st[e] for e in names])

    inputs = [W.detach().clone().requires_grad_(True), W.grad.clone().requires_grad_(True)]
    inputs += [st[e].clone().requires_grad_(True) for e in names]
    assert torch.autograd.gradcheck(step, tuple(inputs), eps=1e-9, atol=1e-5, rtol=1e-5)


def test_sqrt_at_a_zero_second_moment_has_derivative_zero():
    """An entry that never had a gradient: torch's sqrt(0) has an infinite derivative; the replay takes 0."""
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    hp = {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
          "maximize": False, "decoupled_weight_decay": False}
    zero = torch.zeros(3, dtype=torch.float64)
    st = {"step": 0.0, "exp_avg": zero, "exp_avg_sq": zero}
    new, _ = step_function("adam")(p, st, g, hp, "float64")
    dg, = torch.autograd.grad(new.sum(), g)
    assert torch.isfinite(dg).all() and float(dg[0]) != 0.0  # m's path through g stays; v's path at 0 is cut
