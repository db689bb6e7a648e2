"""Adam, AdamW, Adamax, NAdam and RAdam: a first moment ``m`` (linear state) over an element-wise denominator.

Each of them, per weight entry, with ``s = -1`` under ``maximize``::

    p  = delta * p                          decoupled decay: delta = 1 - lr * wd (AdamW; NAdam, RAdam
                                            with decoupled_weight_decay), else delta = 1
    g' = s * g + l2 * p                     L2 decay: l2 = wd when not decoupled, else 0
    m  = b1 * m + (1 - b1) * g'             (torch's lerp)
    p  = p - w * (a * g' + c * m)           w: the rule's element-wise weight, a and c scalars

with ``w``, ``a``, ``c`` from the nonlinear state (second moments and bias corrections):

- Adam/AdamW: ``w = 1 / (sqrt(v_hat) / sqrt(bc2) + eps)`` (``v_hat = max_t v_t`` under amsgrad),
  ``a = 0``, ``c = lr / bc1``;
- Adamax: ``w = 1 / u`` with ``u = max(b2 u, |g'| + eps)``, ``a = 0``, ``c = lr / bc1``;
- NAdam: ``w = 1 / (sqrt(v / bc2) + eps)``, ``a = lr (1 - mu_t) / (1 - prod mu)``,
  ``c = lr mu_{t+1} / (1 - prod mu * mu_{t+1})``;
- RAdam: while its rectification is off (``rho_t <= 5``, the first steps) ``w = 1``, ``c = lr / bc1``
  (an SGD-with-momentum step); afterwards ``w = sqrt(bc2) / (sqrt(v) + eps)``, ``c = lr r_t / bc1``.

Writing ``K = a + c (1 - b1)``, the step on ``x = (p, m)`` is::

    M = [[delta - w K l2,  -w c b1],      B = [-w K s,
         [(1 - b1) l2,      b1     ]]          (1 - b1) s]
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from lightning_dualform.optim.maps import PARAM, OptimizerState, StepMaps, maps
from lightning_dualform.optim.rule import (
    APPLIED,
    HyperValue,
    UpdateRule,
    array_state,
    bool_columns,
    effective_grad,
    float_columns,
    scalar_state,
    sign_of,
    step_count,
)

if TYPE_CHECKING:
    import torch

_NAMES = (PARAM, "exp_avg")


def _moment_maps(w, *, b1: float, sign: float, l2: float, delta: float, a: float, c: float) -> StepMaps:
    k = a + c * (1.0 - b1)
    return maps(
        _NAMES,
        w,
        m0=[[delta, 0.0], [(1.0 - b1) * l2, b1]],
        m1=[[-k * l2, -c * b1], [0.0, 0.0]],
        b0=[0.0, (1.0 - b1) * sign],
        b1=[-k * sign, 0.0],
    )


def _adam_decoupled(optimizer: torch.optim.Optimizer, group: Mapping) -> bool:
    """Whether this Adam step decays decoupled: always for AdamW; for Adam, a ``decoupled_weight_decay`` key
    counts only where torch's Adam reads it (torch >= 2.6; before, its step ignores such a key)."""
    import torch

    if isinstance(optimizer, torch.optim.AdamW):
        return True
    return _adam_reads_decoupled() and bool(group.get("decoupled_weight_decay", False))


@functools.cache
def _adam_reads_decoupled() -> bool:
    import torch

    return "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


def _decay(hp: Mapping[str, HyperValue], decoupled: bool, state: OptimizerState) -> tuple[float, float]:
    """``(l2, delta)``: the L2 coefficient fed into the gradient and the decoupled multiplier of ``p`` (rounded
    to the parameter's dtype, as torch's ``param.mul_(1 - lr * wd)`` rounds it)."""
    wd = float(hp["weight_decay"])
    if wd == 0.0:
        return 0.0, 1.0
    return (0.0, state.factor(1.0 - float(hp["lr"]) * wd)) if decoupled else (wd, 1.0)


def _betas(group: dict) -> tuple[float, float]:
    b1, b2 = group["betas"]
    return float(b1), float(b2)


class AdamRule(UpdateRule):
    """``torch.optim.Adam`` (``amsgrad``, ``maximize``, L2 or decoupled weight decay) and ``AdamW``."""

    name = "adam"
    optimizer_names = ("Adam", "AdamW")
    columns = float_columns("lr", "beta1", "beta2", "eps", "weight_decay") + bool_columns(
        "amsgrad", "maximize", "decoupled_weight_decay"
    ) + (APPLIED,)
    state_names = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    linear_names = ("exp_avg",)
    required_state = ("step", "exp_avg_sq")

    def _hyper(self, optimizer, group, param):
        b1, b2 = _betas(group)
        return {
            "lr": float(group["lr"]),
            "beta1": b1,
            "beta2": b2,
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "amsgrad": bool(group.get("amsgrad", False)),
            "maximize": bool(group.get("maximize", False)),
            "decoupled_weight_decay": _adam_decoupled(optimizer, group),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        out = {"step": step_count(state), "exp_avg_sq": array_state(state, "exp_avg_sq", param)}
        if group.get("amsgrad", False) or "max_exp_avg_sq" in state:
            out["max_exp_avg_sq"] = array_state(state, "max_exp_avg_sq", param)
        return out

    def needs_param(self, hp):
        return float(hp["weight_decay"]) != 0.0 and not hp["decoupled_weight_decay"]

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        lr, b1, b2, eps = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps"))
        sign = sign_of(hp)
        l2, delta = _decay(hp, bool(hp["decoupled_weight_decay"]), state)
        gp = effective_grad(state, g, sign, l2)
        v = nl["exp_avg_sq"]
        v *= b2
        v += (1.0 - b2) * (gp * gp)
        if hp["amsgrad"]:
            vmax = nl.setdefault("max_exp_avg_sq", np.zeros_like(v))
            np.maximum(vmax, v, out=vmax)
            v = vmax
        bc1 = 1.0 - b1**step
        bc2 = 1.0 - b2**step
        w = np.sqrt(v)
        w /= bc2**0.5
        w += eps
        np.reciprocal(w, out=w)
        return _moment_maps(w, b1=b1, sign=sign, l2=l2, delta=delta, a=0.0, c=lr / bc1)


class AdamaxRule(UpdateRule):
    """``torch.optim.Adamax`` (L2 weight decay, ``maximize``)."""

    name = "adamax"
    optimizer_names = ("Adamax",)
    columns = float_columns("lr", "beta1", "beta2", "eps", "weight_decay") + bool_columns("maximize") + (APPLIED,)
    state_names = ("step", "exp_avg", "exp_inf")
    linear_names = ("exp_avg",)
    required_state = ("step", "exp_inf")

    def _hyper(self, optimizer, group, param):
        b1, b2 = _betas(group)
        return {
            "lr": float(group["lr"]),
            "beta1": b1,
            "beta2": b2,
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        return {"step": step_count(state), "exp_inf": array_state(state, "exp_inf", param)}

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        lr, b1, b2, eps = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps"))
        sign = sign_of(hp)
        l2, _ = _decay(hp, False, state)
        gp = effective_grad(state, g, sign, l2)
        u = nl["exp_inf"]
        u *= b2
        np.maximum(u, np.abs(gp) + eps, out=u)
        return _moment_maps(1.0 / u, b1=b1, sign=sign, l2=l2, delta=1.0, a=0.0, c=lr / (1.0 - b1**step))


class NAdamRule(UpdateRule):
    """``torch.optim.NAdam`` (``momentum_decay``, L2 or decoupled weight decay, ``maximize``).

    Its running product of momentum coefficients ``mu_product`` is a scalar tensor in torch's scalar
    dtype (float32 unless the default dtype is float64); the replay rounds it the same way.
    """

    name = "nadam"
    optimizer_names = ("NAdam",)
    columns = float_columns("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay") + bool_columns(
        "decoupled_weight_decay", "maximize"
    ) + (APPLIED,)
    state_names = ("step", "mu_product", "exp_avg", "exp_avg_sq")
    linear_names = ("exp_avg",)
    required_state = ("step", "mu_product", "exp_avg_sq")

    def _hyper(self, optimizer, group, param):
        b1, b2 = _betas(group)
        return {
            "lr": float(group["lr"]),
            "beta1": b1,
            "beta2": b2,
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "momentum_decay": float(group["momentum_decay"]),
            "decoupled_weight_decay": bool(group.get("decoupled_weight_decay", False)),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        return {
            "step": step_count(state),
            "mu_product": scalar_state(state, "mu_product", 1.0),
            "exp_avg_sq": array_state(state, "exp_avg_sq", param),
        }

    def needs_param(self, hp):
        return float(hp["weight_decay"]) != 0.0 and not hp["decoupled_weight_decay"]

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        lr, b1, b2, eps, md = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps", "momentum_decay"))
        sign = sign_of(hp)
        l2, delta = _decay(hp, bool(hp["decoupled_weight_decay"]), state)
        gp = effective_grad(state, g, sign, l2)
        bc2 = 1.0 - b2**step
        mu = b1 * (1.0 - 0.5 * (0.96 ** (step * md)))
        mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * md)))
        prod = nl["mu_product"]
        kind = type(prod) if isinstance(prod, np.floating) else np.float64
        prod = kind(kind(prod) * kind(mu))  # torch multiplies in the tensor's dtype
        nl["mu_product"] = prod
        prod_next = float(prod) * mu_next
        v = nl["exp_avg_sq"]
        v *= b2
        v += (1.0 - b2) * (gp * gp)
        w = 1.0 / (np.sqrt(v / bc2) + eps)
        a = lr * (1.0 - mu) / (1.0 - float(prod))
        c = lr * mu_next / (1.0 - prod_next)
        return _moment_maps(w, b1=b1, sign=sign, l2=l2, delta=delta, a=a, c=c)


class RAdamRule(UpdateRule):
    """``torch.optim.RAdam`` (L2 or decoupled weight decay, ``maximize``).

    Its rectification switches per step: while ``rho_t <= 5`` the step is ``p -= lr m / bc1`` (no
    second moment: a scalar ``w``), afterwards the adaptive step. Both are linear in ``m``.
    """

    name = "radam"
    optimizer_names = ("RAdam",)
    columns = float_columns("lr", "beta1", "beta2", "eps", "weight_decay") + bool_columns(
        "decoupled_weight_decay", "maximize"
    ) + (APPLIED,)
    state_names = ("step", "exp_avg", "exp_avg_sq")
    linear_names = ("exp_avg",)
    required_state = ("step", "exp_avg_sq")

    def _hyper(self, optimizer, group, param):
        b1, b2 = _betas(group)
        return {
            "lr": float(group["lr"]),
            "beta1": b1,
            "beta2": b2,
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "decoupled_weight_decay": bool(group.get("decoupled_weight_decay", False)),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        return {"step": step_count(state), "exp_avg_sq": array_state(state, "exp_avg_sq", param)}

    def needs_param(self, hp):
        return float(hp["weight_decay"]) != 0.0 and not hp["decoupled_weight_decay"]

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        lr, b1, b2, eps = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps"))
        sign = sign_of(hp)
        l2, delta = _decay(hp, bool(hp["decoupled_weight_decay"]), state)
        gp = effective_grad(state, g, sign, l2)
        v = nl["exp_avg_sq"]
        v *= b2
        v += (1.0 - b2) * (gp * gp)
        bc1 = 1.0 - b1**step
        bc2 = 1.0 - b2**step
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * step * (b2**step) / bc2
        if rho_t > 5.0:
            rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
            w = bc2**0.5 / (np.sqrt(v) + eps)
            c = lr * rect / bc1
        else:
            w, c = 1.0, lr / bc1
        return _moment_maps(w, b1=b1, sign=sign, l2=l2, delta=delta, a=0.0, c=c)
