"""Adagrad, RMSprop and Adadelta: an element-wise weight over the (L2-decayed) gradient.

Per weight entry, with ``s = -1`` under ``maximize`` and L2 decay ``l2 = weight_decay``::

    g' = s * g + l2 * p
    Adagrad:   sum += g'^2;  w = clr / (sqrt(sum) + eps),  clr = lr / (1 + (step - 1) lr_decay);  p -= w g'
    RMSprop:   sq = alpha sq + (1 - alpha) g'^2;  centered: ga = lerp(ga, g', 1 - alpha)
               w = 1 / (sqrt(sq - ga^2) + eps)   (ga = 0 when not centered)
               momentum mu > 0:  buf = mu buf + w g';  p -= lr buf      else  p -= lr w g'
    Adadelta:  sq = rho sq + (1 - rho) g'^2;  w = sqrt(acc + eps) / sqrt(sq + eps);
               acc = rho acc + (1 - rho) (w g')^2;  p -= lr w g'

``sum``, ``sq``, ``ga``, ``acc`` are nonlinear state (centered RMSprop's ``ga`` is linear in the gradient
but enters only the denominator); the linear state is ``p`` (and RMSprop's ``buf``).
"""

from __future__ import annotations

import numpy as np

from lightning_dualform.optim.maps import PARAM, maps
from lightning_dualform.optim.rule import (
    APPLIED,
    UpdateRule,
    array_state,
    bool_columns,
    effective_grad,
    float_columns,
    sign_of,
    step_count,
)


def _p_maps(w, scale: float, sign: float, l2: float):
    """``p' = p - scale * w * (s g + l2 p)``."""
    return maps((PARAM,), w, m0=[[1.0]], m1=[[-scale * l2]], b0=[0.0], b1=[-scale * sign])


class AdagradRule(UpdateRule):
    """``torch.optim.Adagrad`` (``lr_decay``, ``initial_accumulator_value``, weight decay, ``maximize``)."""

    name = "adagrad"
    optimizer_names = ("Adagrad",)
    columns = float_columns("lr", "lr_decay", "eps", "weight_decay") + bool_columns("maximize") + (APPLIED,)
    state_names = ("step", "sum")
    required_state = ("step", "sum")

    def _hyper(self, optimizer, group, param):
        return {
            "lr": float(group["lr"]),
            "lr_decay": float(group["lr_decay"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        # torch fills a new accumulator from the optimizer's defaults, not from the param group
        init = float(optimizer.defaults.get("initial_accumulator_value", 0.0))
        return {"step": step_count(state), "sum": array_state(state, "sum", param, init)}

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        sign, l2 = sign_of(hp), float(hp["weight_decay"])
        gp = effective_grad(state, g, sign, l2)
        clr = float(hp["lr"]) / (1 + (step - 1) * float(hp["lr_decay"]))
        acc = nl["sum"]
        acc += gp * gp
        w = 1.0 / (np.sqrt(acc) + float(hp["eps"]))
        return _p_maps(w, clr, sign, l2)


class RMSpropRule(UpdateRule):
    """``torch.optim.RMSprop`` (``momentum``, ``centered``, weight decay, ``maximize``)."""

    name = "rmsprop"
    optimizer_names = ("RMSprop",)
    columns = (
        float_columns("lr", "alpha", "eps", "weight_decay", "momentum")
        + bool_columns("centered", "maximize")
        + (APPLIED,)
    )
    state_names = ("step", "square_avg", "grad_avg", "momentum_buffer")
    linear_names = ("momentum_buffer",)
    required_state = ("step", "square_avg")

    def _hyper(self, optimizer, group, param):
        return {
            "lr": float(group["lr"]),
            "alpha": float(group["alpha"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "momentum": float(group["momentum"]),
            "centered": bool(group["centered"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        out = {"step": step_count(state), "square_avg": array_state(state, "square_avg", param)}
        if group["centered"] or "grad_avg" in state:
            out["grad_avg"] = array_state(state, "grad_avg", param)
        return out

    def _linear_default(self, group, name):
        return float(group["momentum"]) > 0  # torch creates the buffer only for a group with momentum

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = nl["step"] + 1.0
        lr, alpha, mu = float(hp["lr"]), float(hp["alpha"]), float(hp["momentum"])
        sign, l2 = sign_of(hp), float(hp["weight_decay"])
        gp = effective_grad(state, g, sign, l2)
        sq = nl["square_avg"]
        sq *= alpha
        sq += (1.0 - alpha) * (gp * gp)
        if hp["centered"]:
            ga = nl.setdefault("grad_avg", np.zeros_like(sq))
            ga += (1.0 - alpha) * (gp - ga)
            avg = np.sqrt(sq - ga * ga)
        else:
            avg = np.sqrt(sq)
        w = 1.0 / (avg + float(hp["eps"]))
        if mu > 0:
            return maps(
                (PARAM, "momentum_buffer"),
                w,
                m0=[[1.0, -lr * mu], [0.0, mu]],
                m1=[[-lr * l2, 0.0], [l2, 0.0]],
                b0=[0.0, 0.0],
                b1=[-lr * sign, sign],
            )
        return _p_maps(w, lr, sign, l2)


class AdadeltaRule(UpdateRule):
    """``torch.optim.Adadelta`` (weight decay, ``maximize``)."""

    name = "adadelta"
    optimizer_names = ("Adadelta",)
    columns = float_columns("lr", "rho", "eps", "weight_decay") + bool_columns("maximize") + (APPLIED,)
    state_names = ("step", "square_avg", "acc_delta")
    required_state = ("step", "square_avg", "acc_delta")

    def _hyper(self, optimizer, group, param):
        return {
            "lr": float(group["lr"]),
            "rho": float(group["rho"]),
            "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        return {
            "step": step_count(state),
            "square_avg": array_state(state, "square_avg", param),
            "acc_delta": array_state(state, "acc_delta", param),
        }

    def advance(self, state, g, hp):
        nl = state.nonlinear
        nl["step"] = nl["step"] + 1.0
        rho, eps = float(hp["rho"]), float(hp["eps"])
        sign, l2 = sign_of(hp), float(hp["weight_decay"])
        gp = effective_grad(state, g, sign, l2)
        sq, acc = nl["square_avg"], nl["acc_delta"]
        sq *= rho
        sq += (1.0 - rho) * (gp * gp)
        w = np.sqrt(acc + eps) / np.sqrt(sq + eps)
        delta = w * gp
        acc *= rho
        acc += (1.0 - rho) * (delta * delta)
        return _p_maps(w, float(hp["lr"]), sign, l2)
