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
