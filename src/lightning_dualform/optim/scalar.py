"""SGD and ASGD as update rules: every coefficient is a scalar, so ``Q_s`` is a scalar times the identity.

SGD's step is :mod:`.sgd`'s 2x2 recurrence over ``(p, momentum_buffer)`` (its table keeps the columns
:data:`.sgd.PARAM_COLUMNS`, so stores written before these rules read the same). ASGD updates, per entry::

    p = (1 - lambd * eta) * p - eta * (s * g + wd * p)

with ``eta`` a scalar of its state, set after each step to ``lr / (1 + lambd lr step)^alpha`` in torch's
scalar dtype. ASGD's running average ``ax`` is bookkeeping the trained module never uses.
"""

from __future__ import annotations

import numpy as np

from lightning_dualform.optim.maps import PARAM, maps
from lightning_dualform.optim.rule import (
    APPLIED,
    Column,
    UpdateRule,
    bool_columns,
    float_columns,
    scalar_state,
    sign_of,
    step_count,
)
from lightning_dualform.optim.sgd import PARAM_COLUMNS, _step_matrix

_SGD_FLOATS = ("lr", "momentum", "dampening", "weight_decay")


class SGDRule(UpdateRule):
    """``torch.optim.SGD`` in every configuration (momentum, Nesterov, dampening, weight decay, ``maximize``)."""

    name = "sgd"
    optimizer_names = ("SGD",)
    columns = tuple(Column(c, np.float64 if c in _SGD_FLOATS else np.bool_) for c in PARAM_COLUMNS)
    state_names = ("momentum_buffer",)
    linear_names = ("momentum_buffer",)
    required_state = ()

    def read_step(self, optimizer, param, *, skipped=False):
        row = super().read_step(optimizer, param, skipped=skipped)
        # torch creates the buffer from the first gradient (no dampening), whatever an old one held
        row["fresh_buffer"] = optimizer.state.get(param, {}).get("momentum_buffer") is None
        return {c: row[c] for c in PARAM_COLUMNS}

    def _hyper(self, optimizer, group, param):
        return {
            "lr": float(group["lr"]),
            "momentum": float(group["momentum"]),
            "dampening": float(group["dampening"]),
            "weight_decay": float(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        return {}

    def _linear_default(self, group, name):
        return False  # a missing buffer is created from the gradient: its old value never matters

    def needs_param(self, hp):
        return False

    def advance(self, state, g, hp):
        m, b = _step_matrix(
            float(hp["lr"]),
            float(hp["momentum"]),
            float(hp["dampening"]),
            float(hp["weight_decay"]),
            bool(hp["nesterov"]),
            bool(hp["maximize"]),
            bool(hp["fresh_buffer"]),
        )
        if float(hp["momentum"]) == 0.0:
            return maps((PARAM,), 0.0, m0=m[:1, :1], m1=[[0.0]], b0=b[:1], b1=[0.0])
        return maps((PARAM, "momentum_buffer"), 0.0, m0=m, m1=np.zeros((2, 2)), b0=b, b1=[0.0, 0.0])


class ASGDRule(UpdateRule):
    """``torch.optim.ASGD`` (its parameter update; the average ``ax`` is not part of the trained model)."""

    name = "asgd"
    optimizer_names = ("ASGD",)
    columns = float_columns("lr", "lambd", "alpha", "t0", "weight_decay") + bool_columns("maximize") + (APPLIED,)
    state_names = ("step", "eta")
    required_state = ("step", "eta")

    def _hyper(self, optimizer, group, param):
        return {
            "lr": float(group["lr"]),
            "lambd": float(group["lambd"]),
            "alpha": float(group["alpha"]),
            "t0": float(group["t0"]),
            "weight_decay": float(group["weight_decay"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        return {"step": step_count(state), "eta": scalar_state(state, "eta", float(group["lr"]))}

    def needs_param(self, hp):
        return False  # eta depends on the step count and the schedule only

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        eta_t = nl["eta"]
        eta = float(eta_t)
        lr, lambd, alpha = float(hp["lr"]), float(hp["lambd"]), float(hp["alpha"])
        sign, wd = sign_of(hp), float(hp["weight_decay"])
        kind = type(eta_t) if isinstance(eta_t, np.floating) else np.float64
        nl["eta"] = kind(lr / ((1 + lambd * lr * step) ** alpha))  # stored in torch's scalar dtype
        # torch: param.mul_(1 - lambd * eta) (the factor rounded to p's dtype), then param.add_(grad + wd p, alpha=-eta)
        return maps(
            (PARAM,), 0.0, m0=[[state.factor(1.0 - lambd * eta) - eta * wd]], m1=[[0.0]], b0=[-eta * sign], b1=[0.0]
        )
