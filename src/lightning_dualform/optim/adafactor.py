"""Adafactor (``torch.optim.Adafactor``, torch >= 2.5): a factored second moment, so ``Q_s`` is rank one.

Per step, with ``s = -1`` under ``maximize`` and ``n`` the parameter's number of entries::

    rho_t   = min(lr, 1 / sqrt(step));    alpha = max(eps2, ||p|| / sqrt(n)) * rho_t      (p before decay)
    p       = (1 - lr * wd) * p                                                         (decoupled decay)
    g'      = s * g
    2-D:    r = lerp(r, rowmean(g'^2), step^beta2_decay);  c = lerp(c, colmean(g'^2), same)
            V = outer(r, c) / max(mean(r), eps1)
    1-D:    V = lerp(V, g'^2, step^beta2_decay)
    U       = max(V, eps1^2)^(-1/2);     den = max(1, ||U g'|| / (sqrt(n) d))
    p       = p - (alpha / den) * U (.) g'

``alpha`` and ``den`` are scalars of the whole parameter and ``r``, ``c`` couple all its rows, so a replay
always holds every row (``row_local = False``). The linear state is ``p`` alone; with the clamp at
``eps1^2`` inactive, ``U = sqrt(R) outer(r^-1/2, c^-1/2)`` (``R = max(mean(r), eps1)``) and every
``Q_s = kappa_s outer(rho_s, gamma_s)``: attention with keys scaled by ``gamma_s`` and values by ``rho_s``.
Where the clamp binds on an entry with a non-zero gradient the step falls back to the element-wise ``U``
(:attr:`~.maps.StepMaps.form` says which). Rows or columns whose statistic is exactly zero have a zero
gradient in that step, so their factor is set to 0 (any finite value gives the same update).
"""

from __future__ import annotations

import numpy as np

from lightning_dualform.optim.maps import PARAM, RankOne, maps
from lightning_dualform.optim.rule import (
    APPLIED,
    UpdateRule,
    array_state,
    bool_columns,
    float_columns,
    sign_of,
    step_count,
)


def lerp_(a: np.ndarray, b: np.ndarray, weight: float) -> None:
    """``a = lerp(a, b, weight)`` in place, with torch's two formulas (exact at ``weight = 1``)."""
    if weight < 0.5:
        a += weight * (b - a)
    else:
        a[...] = b - (b - a) * (1.0 - weight)


class AdafactorRule(UpdateRule):
    """``torch.optim.Adafactor`` (weight decay, ``maximize``, relative step size and update clipping).

    Args:
        rank_one: give 2-D weights' steps as :class:`~.maps.RankOne` maps where the ``eps1`` clamp is
            inactive (False: always the element-wise form; for checks).
    """

    name = "adafactor"
    optimizer_names = ("Adafactor",)  # torch >= 2.5
    columns = (
        float_columns("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay") + bool_columns("maximize") + (APPLIED,)
    )
    state_names = ("step", "row_var", "col_var", "variance")
    row_local = False

    def __init__(self, rank_one: bool = True) -> None:
        self.rank_one = rank_one

    def __repr__(self) -> str:
        return f"AdafactorRule(rank_one={self.rank_one})"

    def _hyper(self, optimizer, group, param):
        import torch

        eps1, eps2 = group["eps"]
        if eps1 is None:
            # torch resolves it from the dtype of the first parameter of the group that steps
            first = next((p for p in group["params"] if p.grad is not None), param)
            eps1 = torch.finfo(first.dtype).eps
        return {
            "lr": float(group["lr"]),
            "beta2_decay": float(group["beta2_decay"]),
            "eps1": float(eps1),
            "eps2": float(eps2),
            "d": float(group["d"]),
            "weight_decay": float(group["weight_decay"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def _nonlinear_state(self, optimizer, group, param, state):
        import torch

        out: dict = {"step": step_count(state)}
        shape = tuple(param.shape)
        if len(shape) > 1:
            for name, s in (("row_var", shape[:-1] + (1,)), ("col_var", shape[:-2] + (1,) + shape[-1:])):
                v = state.get(name)
                out[name] = array_state(state, name, param) if isinstance(v, torch.Tensor) else np.zeros(s)
        else:
            out["variance"] = array_state(state, "variance", param)
        return out

    def check_state(self, state):
        super().check_state(state)
        need = ("row_var", "col_var") if len(state.shape) > 1 else ("variance",)
        missing = [n for n in need if n not in state.nonlinear]
        if missing:
            raise ValueError(f"the adafactor state of a {state.shape} parameter lacks {missing}")

    def entry_shape(self, name, held):
        if name == "row_var":
            return held[:-1] + (1,)
        if name == "col_var":
            return held[:-2] + (1,) + held[-1:]
        return held

    def needs_param(self, hp):
        return True  # the relative step size scales by the parameter's norm

    def advance(self, state, g, hp):
        if state.rows is not None:
            raise ValueError("Adafactor couples all rows of a parameter: replay it with every row (rows=None)")
        if state.linear is None:
            raise ValueError(
                "Adafactor's step scales by the parameter's norm: replay it from a state that holds the parameter"
            )
        nl = state.nonlinear
        nl["step"] = step = nl["step"] + 1.0
        lr, eps1, eps2, d, wd = (float(hp[k]) for k in ("lr", "eps1", "eps2", "d", "weight_decay"))
        sign = sign_of(hp)
        weight = step ** float(hp["beta2_decay"])
        rho_t = min(lr, 1 / (step**0.5))
        p = state.linear[PARAM]
        alpha = max(eps2, float(np.linalg.norm(p)) / (p.size**0.5)) * rho_t
        delta = state.factor(1.0 - lr * wd) if wd != 0 else 1.0  # torch's param.mul_ rounds it to p's dtype
        gp = g if sign == 1.0 else -g
        sq = gp * gp
        if gp.ndim > 1:
            rv, cv = nl["row_var"], nl["col_var"]
            lerp_(rv, sq.sum(axis=-1, keepdims=True) / gp.shape[-1], weight)
            lerp_(cv, sq.sum(axis=-2, keepdims=True) / gp.shape[-2], weight)
            big_r = np.maximum(rv.mean(axis=-2, keepdims=True), eps1)
            v = (rv @ cv) / big_r
        else:
            var = nl["variance"]
            lerp_(var, sq, weight)
            v = var.copy()
        u = 1.0 / np.sqrt(np.maximum(v, eps1 * eps1))
        den = max(1.0, float(np.linalg.norm(u * gp)) / ((gp.size**0.5) * d))
        w = u
        if self.rank_one and gp.ndim == 2 and not np.any((v < eps1 * eps1) & (gp != 0)):
            w = RankOne(float(np.sqrt(big_r.item())), _inv_sqrt(rv[:, 0]), _inv_sqrt(cv[0, :]))
        return maps((PARAM,), w, m0=[[delta]], m1=[[0.0]], b0=[0.0], b1=[-(alpha / den) * sign])


def _inv_sqrt(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    pos = x > 0
    out[pos] = 1.0 / np.sqrt(x[pos])
    return out
