"""The coefficient recurrence against torch.optim.SGD itself, on random gradient sequences."""

import numpy as np
import pytest
import torch

from lightning_dualform.optim import PARAM_COLUMNS, ParamUpdate, coefficients, plain_sgd_coefficients

CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3),
    dict(weight_decay=0.05),
    dict(momentum=0.9, weight_decay=0.01, nesterov=True),
    dict(momentum=0.5, dampening=0.5, weight_decay=0.1, maximize=True),
    dict(maximize=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(c) or "plain" for c in CONFIGS])
@pytest.mark.parametrize("foreach", [False, True])
def test_coefficients_match_torch_sgd(cfg, foreach):
    torch.manual_seed(0)
    p0 = torch.randn(4, 3, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], lr=0.1, foreach=foreach, **cfg)
    steps, scales, rows = 9, [], []
    grads = [torch.randn(4, 3, dtype=torch.float64) for _ in range(steps)]
    skipped = {4}  # a step in which the parameter had no gradient: SGD leaves it (and its buffer) alone
    for s in range(steps):
        lr = 0.1 * (1 + s) / steps  # a schedule
        for g in opt.param_groups:
            g["lr"] = lr
        scale = 0.5 + 0.1 * s  # e.g. a clipping factor
        state = opt.state.get(p, {})
        fresh = state.get("momentum_buffer") is None
        applied = s not in skipped
        rows.append(ParamUpdate(lr=lr, fresh_buffer=fresh, applied=applied, **{k: v for k, v in cfg.items()}))
        scales.append(scale)
        p.grad = grads[s] * scale if applied else None
        opt.step()
    table = {c: np.array([getattr(r, c) for r in rows]) for c in PARAM_COLUMNS}
    a, c = coefficients(table, np.array(scales))
    rebuilt = a * p0 + sum(c[s] * grads[s] for s in range(steps))
    torch.testing.assert_close(rebuilt, p.detach(), rtol=1e-12, atol=1e-12)


def test_intermediate_end_uses_prefix():
    torch.manual_seed(1)
    p0 = torch.randn(5, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    grads, snapshots, rows = [], [p0.clone()], []
    for s in range(6):
        rows.append(ParamUpdate(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True,
                                fresh_buffer=opt.state.get(p, {}).get("momentum_buffer") is None))
        grads.append(torch.randn(5, dtype=torch.float64))
        p.grad = grads[-1].clone()
        opt.step()
        snapshots.append(p.detach().clone())
    table = {c: np.array([getattr(r, c) for r in rows]) for c in PARAM_COLUMNS}
    for end in range(7):
        a, c = coefficients(table, np.ones(6), end)
        assert np.all(c[end:] == 0)
        rebuilt = a * p0 + sum(c[s] * grads[s] for s in range(6))
        torch.testing.assert_close(rebuilt, snapshots[end], rtol=1e-12, atol=1e-12)


def test_plain_coefficients():
    a, c = plain_sgd_coefficients(np.array([0.1, 0.2, 0.3]), np.array([1.0, 0.5, 2.0]), np.array([True, False, True]))
    assert a == 1.0
    np.testing.assert_allclose(c, [-0.1, 0.0, -0.6])


# ------------------------------------------------------------------------------------------------------
# a stored layer's optimizer math (optim/stored.py), against torch.optim.SGD itself
# ------------------------------------------------------------------------------------------------------
def test_stored_coefficients_and_base_weights_rebuild_sgd_from_a_checkpoint():
    """A store that starts mid-run (a momentum buffer already exists): a W_0 + b buf_0 + sum_s c_s G_s is the
    weight torch's SGD reaches after every prefix of the recorded steps."""
    from lightning_dualform.optim import RULES
    from lightning_dualform.optim.stored import base_weights, layer_coefficients

    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = torch.optim.SGD([p, b], lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(2):  # before the store: the buffers exist when recording starts
        p.grad, b.grad = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        opt.step()
    w0, b0 = p.detach().clone(), b.detach().clone()
    buf_w, buf_b = opt.state[p]["momentum_buffer"].clone(), opt.state[b]["momentum_buffer"].clone()
    first, steps, scales, rows = 10, 5, [], []
    grads, snapshots = [], [(w0, b0)]
    for s in range(steps):
        rows.append(ParamUpdate(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, fresh_buffer=False))
        scales.append(0.5 + 0.1 * s)
        grads.append((torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)))
        p.grad, b.grad = grads[-1][0] * scales[-1], grads[-1][1] * scales[-1]
        opt.step()
        snapshots.append((p.detach().clone(), b.detach().clone()))
    col = {c: np.array([getattr(r, c) for r in rows]) for c in PARAM_COLUMNS}
    tables = {"step": np.arange(first, first + steps), "grad_scale": np.array(scales), "weight": col, "bias": col}
    for end in range(steps + 1):
        coef = layer_coefficients(tables, first, first + end, rule=RULES["sgd"])
        w, bias = base_weights(coef, w0.numpy(), b0.numpy(), weight_buffer=buf_w.numpy(), bias_buffer=buf_b.numpy())
        w = w + sum(coef.c_w[s] * grads[s][0].numpy() for s in range(steps))
        bias = bias + sum(coef.c_b[s] * grads[s][1].numpy() for s in range(steps))
        np.testing.assert_allclose(w, snapshots[end][0].numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bias, snapshots[end][1].numpy(), rtol=1e-12, atol=1e-12)


def test_stored_initial_state_sorts_the_entries_by_the_rule_and_checks_them():
    from lightning_dualform.optim import PARAM, RULES
    from lightning_dualform.optim.stored import initial_state

    rule = RULES["adam"]
    p, m, v = np.ones((3, 2)), np.full((3, 2), 0.5), np.full((3, 2), 0.25)
    state = initial_state(rule, (3, 2), p, arrays={"exp_avg": m, "exp_avg_sq": v}, scalars={"step": np.float32(3)})
    assert set(state.linear) == {PARAM, "exp_avg"} and set(state.nonlinear) == {"exp_avg_sq", "step"}
    assert state.nonlinear["step"] == 3.0 and type(state.nonlinear["step"]) is float
    with pytest.raises(ValueError, match="shape"):
        initial_state(rule, (3, 2), p, arrays={"exp_avg": m, "exp_avg_sq": v[:2]}, scalars={"step": 3.0})
