"""The optimizer's step as a differentiable torch function, for replays that carry a derivative through it.

``optim/`` writes each rule as maps that are linear in the gradient once the optimizer's nonlinear state is fixed;
that is all the dual form needs. The metagradient needs more: the derivative of a step with respect to its
gradient *through* the nonlinear state too (Adam's second moment depends on the gradient). So here each
supported rule is one step written with torch ops, op for op as torch's optimizer writes it, on tensors that
autograd follows. A step reads its hyper-parameters from the store's per-step table (``optim.rule.row_of``).

Supported: SGD (momentum, dampening, Nesterov, weight decay, ``maximize``, schedules: every column of its
table) and Adam/AdamW (``amsgrad``, ``maximize``, L2 or decoupled decay). Other rules are refused by name
(:func:`step_function`).

One convention where torch's step is not differentiable: Adam's ``sqrt(v)`` at an entry whose second moment is
exactly 0 (a weight that never had a gradient, such as a first-layer weight on an always-zero input pixel). There
``sqrt(v) = sqrt(1 - b2) |g|`` has a kink at ``g = 0``; we take the derivative 0 (the gradient of ``|g|`` at 0
that the subgradient convention picks), where plain autograd would give ``0 * inf = NaN``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

State = dict[str, torch.Tensor | float | None]
Step = Callable[[torch.Tensor, State, torch.Tensor, Mapping, str], tuple[torch.Tensor, State]]


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` with derivative 0 where ``v == 0`` (autograd's is ``inf`` there)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _factor(x: float, param_dtype: str) -> float:
    """``x`` rounded as torch rounds a Python scalar that multiplies the parameter (to its dtype)."""
    return float(np.dtype(param_dtype).type(x))


def sgd_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.SGD`` step (single-tensor path) on ``p`` with gradient ``g``."""
    d = -g if hp["maximize"] else g
    wd = float(hp["weight_decay"])
    if wd != 0.0:
        d = d + wd * p
    mu = float(hp["momentum"])
    new: State = dict(st)
    if mu != 0.0:
        buf = st.get("momentum_buffer")
        if hp["fresh_buffer"] or buf is None:
            buf = d
        else:
            buf = mu * buf + (1.0 - float(hp["dampening"])) * d
        new["momentum_buffer"] = buf
        d = d + mu * buf if hp["nesterov"] else buf
    return p - float(hp["lr"]) * d, new


def adam_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.Adam``/``AdamW`` step (single-tensor path)."""
    step = float(st["step"]) + 1.0
    lr, b1, b2, eps, wd = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps", "weight_decay"))
    if hp["maximize"]:
        g = -g
    if wd != 0.0:
        if hp["decoupled_weight_decay"]:
            p = p * _factor(1.0 - lr * wd, param_dtype)
        else:
            g = g + wd * p
    m = st["exp_avg"]
    m = g * (1.0 - b1) if m is None else m + (g - m) * (1.0 - b1)  # torch's lerp
    v = st["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
    new: State = {**st, "step": step, "exp_avg": m, "exp_avg_sq": v}
    bc1 = 1.0 - b1**step
    bc2_sqrt = (1.0 - b2**step) ** 0.5
    if hp["amsgrad"]:
        vmax = torch.maximum(st["max_exp_avg_sq"], v) if st.get("max_exp_avg_sq") is not None else v
        new["max_exp_avg_sq"] = vmax
        denom = safe_sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = safe_sqrt(v) / bc2_sqrt + eps
    return p - (lr / bc1) * m / denom, new


STEPS: dict[str, Step] = {"sgd": sgd_step, "adam": adam_step}
#: the state entries of each rule that are tensors autograd follows (the rest are counters)
TENSOR_STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def step_function(rule: str) -> Step:
    """The differentiable step of the store's update rule.

    Raises:
        ValueError: a rule without one (it names the rule and the supported ones).
    """
    if rule not in STEPS:
        raise ValueError(
            f"replaying training through the optimizer is implemented for {sorted(STEPS)} (SGD with every flag, Adam "
            f"and AdamW); this store's update rule is {rule!r}. Use method='first_order', which covers every exact "
            "rule."
        )
    return STEPS[rule]


def initial_state(rule: str, opt_state: object) -> State:
    """The torch state of one parameter from the store's :class:`~lightning_dualform.optim.OptimizerState`
    (float64, the parameter's own shape)."""
    lin = opt_state.linear or {}  # type: ignore[attr-defined]
    nl = opt_state.nonlinear  # type: ignore[attr-defined]
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    if rule == "sgd":
        return {"momentum_buffer": t(lin.get("momentum_buffer"))}
    st: State = {"step": float(nl["step"]), "exp_avg": t(lin.get("exp_avg")), "exp_avg_sq": t(nl["exp_avg_sq"])}
    if "max_exp_avg_sq" in nl:
        st["max_exp_avg_sq"] = t(nl["max_exp_avg_sq"])
    return st
