"""The optimizer's step as a differentiable torch function, for replays that carry a derivative through it.

``optim/`` writes each rule as numpy maps that are linear in the gradient once the optimizer's nonlinear state is
fixed; that is all the dual form needs. The metagradient needs more: the derivative of a step with respect to its
gradient *through* the nonlinear state too (Adam's second moment depends on the gradient). So here each rule the
store records is one step written with torch ops, op for op as torch's single-tensor ``step`` writes it, on tensors
that autograd follows. A step reads its hyper-parameters from the store's per-step table (``optim.rule.row_of``);
``tests/test_attribute_optimizers.py`` checks every step against ``torch.optim``'s own, in float64.

Every rule the store records is covered, with each of its flags:

- SGD (momentum, dampening, Nesterov, weight decay, ``maximize``) and ASGD (``lambd``, ``alpha``, ``t0``, weight
  decay, ``maximize``; its running average never reaches the model);
- Adam/AdamW (``amsgrad``, ``maximize``, L2 or decoupled decay), Adamax, NAdam (``momentum_decay``, L2 or
  decoupled), RAdam (both sides of its rectification, L2 or decoupled);
- Adagrad (``lr_decay``, ``initial_accumulator_value``), RMSprop (``momentum``, ``centered``), Adadelta;
- Adafactor (factored and vector second moments, relative step size, update clipping ``d``, decay).

A store of another rule is refused by name (:func:`step_function`).

What the derivative is where torch's step is not differentiable:

- ``sqrt`` of an accumulated second moment that is exactly 0 (a weight that never had a gradient, such as a
  first-layer weight on an always-zero input pixel): there ``sqrt(v) = c |g|`` has a kink at ``g = 0``; we take
  the derivative 0 (the subgradient convention), where plain autograd would give ``0 * inf = NaN``;
- ``max``/``clamp`` at a tie (amsgrad's running maximum, Adamax's infinity norm, Adafactor's clamps): autograd's
  convention (an even split between equal arguments of ``maximum``; the boundary counts as clamped);
- Adafactor's step size ``max(eps2, rms(p)) * rho_t`` and its clip ``max(1, rms(U g) / d)`` are plain numbers in
  torch's step (``.item()``) but functions of the weights and the gradient in the training they define; the
  derivative here goes through them, as a retraining with other loss weights would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

State = dict[str, "torch.Tensor | np.floating | float | None"]
Step = Callable[[torch.Tensor, State, torch.Tensor, Mapping, str], tuple[torch.Tensor, State]]


def safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)`` with derivative 0 where ``v <= 0`` (autograd's is ``inf`` at 0)."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def lerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """``torch.lerp(a, b, weight)`` with torch's two formulas (exact at ``weight = 1``)."""
    if weight < 0.5:
        return a + weight * (b - a)
    return b - (b - a) * (1.0 - weight)


def _factor(x: float, param_dtype: str) -> float:
    """``x`` rounded as torch rounds a Python scalar that multiplies the parameter (to its dtype)."""
    return float(np.dtype(param_dtype).type(x))


def _signed(g: torch.Tensor, hp: Mapping) -> torch.Tensor:
    return -g if hp["maximize"] else g


def _l2(g: torch.Tensor, p: torch.Tensor, wd: float) -> torch.Tensor:
    return g + wd * p if wd != 0.0 else g


def _decayed(p: torch.Tensor, hp: Mapping, param_dtype: str) -> tuple[torch.Tensor, float]:
    """``(p after decoupled decay, L2 coefficient)`` of an Adam-family step."""
    wd = float(hp["weight_decay"])
    if wd != 0.0 and hp.get("decoupled_weight_decay", False):
        return p * _factor(1.0 - float(hp["lr"]) * wd, param_dtype), 0.0
    return p, wd


def _scalar_mul(x: np.floating | float, y: float) -> np.floating:
    """``x * y`` as torch computes it in place on a 0-d tensor of ``x``'s dtype (float32 by default)."""
    kind = type(x) if isinstance(x, np.floating) else np.float64
    return kind(kind(x) * kind(y))


# -- scalar rules -------------------------------------------------------------------------------------------
def sgd_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.SGD`` step on ``p`` with gradient ``g``."""
    d = _l2(_signed(g, hp), p, float(hp["weight_decay"]))
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


def asgd_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.ASGD`` step (the parameter; the average ``ax`` is not part of the model)."""
    step = float(st["step"]) + 1.0
    lr, lambd, alpha = float(hp["lr"]), float(hp["lambd"]), float(hp["alpha"])
    grad = _l2(_signed(g, hp), p, float(hp["weight_decay"]))
    eta = st["eta"]
    p = p * _factor(1.0 - lambd * float(eta), param_dtype) - float(eta) * grad
    kind = type(eta) if isinstance(eta, np.floating) else np.float64
    return p, {**st, "step": step, "eta": kind(lr / ((1 + lambd * lr * step) ** alpha))}


# -- the Adam family -----------------------------------------------------------------------------------------
def adam_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.Adam``/``AdamW`` step."""
    step = float(st["step"]) + 1.0
    lr, b1, b2, eps = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps"))
    p, l2 = _decayed(p, hp, param_dtype)
    g = _l2(_signed(g, hp), p, l2)
    m = st.get("exp_avg")
    m = g * (1.0 - b1) if m is None else lerp(m, g, 1.0 - b1)
    v = st["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
    new: State = {**st, "step": step, "exp_avg": m, "exp_avg_sq": v}
    bc1 = 1.0 - b1**step
    bc2_sqrt = (1.0 - b2**step) ** 0.5
    if hp["amsgrad"]:
        vmax = torch.maximum(st["max_exp_avg_sq"], v) if st.get("max_exp_avg_sq") is not None else v
        new["max_exp_avg_sq"] = vmax
        v = vmax
    denom = safe_sqrt(v) / bc2_sqrt + eps
    return p - (lr / bc1) * (m / denom), new


def adamax_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
                ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.Adamax`` step (L2 decay, ``maximize``)."""
    step = float(st["step"]) + 1.0
    lr, b1, b2, eps = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps"))
    g = _l2(_signed(g, hp), p, float(hp["weight_decay"]))
    m = lerp(st["exp_avg"], g, 1.0 - b1)
    u = torch.maximum(st["exp_inf"] * b2, g.abs() + eps)
    return p - (lr / (1.0 - b1**step)) * (m / u), {**st, "step": step, "exp_avg": m, "exp_inf": u}


def nadam_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
               ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.NAdam`` step (``momentum_decay``, L2 or decoupled decay, ``maximize``)."""
    step = float(st["step"]) + 1.0
    lr, b1, b2, eps, md = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps", "momentum_decay"))
    p, l2 = _decayed(p, hp, param_dtype)
    g = _l2(_signed(g, hp), p, l2)
    bc2 = 1.0 - b2**step
    mu = b1 * (1.0 - 0.5 * (0.96 ** (step * md)))
    mu_next = b1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * md)))
    prod = _scalar_mul(st["mu_product"], mu)  # torch's mu_product *= mu, in its tensor's dtype
    prod_next = float(prod) * mu_next
    m = lerp(st["exp_avg"], g, 1.0 - b1)
    v = st["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
    denom = safe_sqrt(v / bc2) + eps
    p = p + (-lr * (1.0 - mu) / (1.0 - float(prod))) * (g / denom)
    p = p + (-lr * mu_next / (1.0 - prod_next)) * (m / denom)
    return p, {**st, "step": step, "mu_product": prod, "exp_avg": m, "exp_avg_sq": v}


def radam_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
               ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.RAdam`` step (rectified or not, L2 or decoupled decay, ``maximize``)."""
    step = float(st["step"]) + 1.0
    lr, b1, b2, eps = (float(hp[k]) for k in ("lr", "beta1", "beta2", "eps"))
    p, l2 = _decayed(p, hp, param_dtype)
    g = _l2(_signed(g, hp), p, l2)
    m = lerp(st["exp_avg"], g, 1.0 - b1)
    v = st["exp_avg_sq"] * b2 + (1.0 - b2) * g * g
    bc1, bc2 = 1.0 - b1**step, 1.0 - b2**step
    corrected = m / bc1
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * step * (b2**step) / bc2
    if rho_t > 5.0:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        p = p - corrected * lr * ((bc2**0.5) / (safe_sqrt(v) + eps)) * rect
    else:
        p = p - corrected * lr
    return p, {**st, "step": step, "exp_avg": m, "exp_avg_sq": v}


# -- Adagrad, RMSprop, Adadelta ------------------------------------------------------------------------------
def adagrad_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
                 ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.Adagrad`` step (``lr_decay``, weight decay, ``maximize``)."""
    step = float(st["step"]) + 1.0
    g = _l2(_signed(g, hp), p, float(hp["weight_decay"]))
    clr = float(hp["lr"]) / (1 + (step - 1) * float(hp["lr_decay"]))
    acc = st["sum"] + g * g
    return p + (-clr) * (g / (safe_sqrt(acc) + float(hp["eps"]))), {**st, "step": step, "sum": acc}


def rmsprop_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
                 ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.RMSprop`` step (``momentum``, ``centered``, weight decay, ``maximize``)."""
    lr, alpha, mu = float(hp["lr"]), float(hp["alpha"]), float(hp["momentum"])
    g = _l2(_signed(g, hp), p, float(hp["weight_decay"]))
    sq = st["square_avg"] * alpha + (1.0 - alpha) * g * g
    new: State = {**st, "step": float(st["step"]) + 1.0, "square_avg": sq}
    if hp["centered"]:
        ga = st.get("grad_avg")
        ga = lerp(torch.zeros_like(g) if ga is None else ga, g, 1.0 - alpha)
        new["grad_avg"] = ga
        avg = safe_sqrt(sq - ga * ga)
    else:
        avg = safe_sqrt(sq)
    avg = avg + float(hp["eps"])
    if mu > 0:
        buf = st.get("momentum_buffer")
        buf = g / avg if buf is None else buf * mu + g / avg
        new["momentum_buffer"] = buf
        return p - lr * buf, new
    return p + (-lr) * (g / avg), new


def adadelta_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
                  ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.Adadelta`` step (weight decay, ``maximize``)."""
    rho, eps = float(hp["rho"]), float(hp["eps"])
    g = _l2(_signed(g, hp), p, float(hp["weight_decay"]))
    sq = st["square_avg"] * rho + (1.0 - rho) * g * g
    delta = torch.sqrt(st["acc_delta"] + eps) / torch.sqrt(sq + eps) * g
    acc = st["acc_delta"] * rho + (1.0 - rho) * delta * delta
    return p - float(hp["lr"]) * delta, {**st, "step": float(st["step"]) + 1.0, "square_avg": sq, "acc_delta": acc}


# -- Adafactor -----------------------------------------------------------------------------------------------
def adafactor_step(p: torch.Tensor, st: State, g: torch.Tensor, hp: Mapping, param_dtype: str
                   ) -> tuple[torch.Tensor, State]:
    """One ``torch.optim.Adafactor`` step (factored over the last two dimensions, or a vector moment)."""
    step = float(st["step"]) + 1.0
    lr, eps1, eps2, d, wd = (float(hp[k]) for k in ("lr", "eps1", "eps2", "d", "weight_decay"))
    g = _signed(g, hp)
    weight = step ** float(hp["beta2_decay"])
    rho_t = min(lr, 1 / (step**0.5))
    alpha = torch.clamp(torch.linalg.vector_norm(p) / (p.numel() ** 0.5), min=eps2) * rho_t  # p before decay
    if wd != 0.0:
        p = p * _factor(1.0 - lr * wd, param_dtype)
    new: State = {**st, "step": step}
    if g.dim() > 1:
        row = lerp(st["row_var"], (g * g).sum(-1, keepdim=True) / g.shape[-1], weight)
        col = lerp(st["col_var"], (g * g).sum(-2, keepdim=True) / g.shape[-2], weight)
        new["row_var"], new["col_var"] = row, col
        var = (row @ col) / torch.clamp(row.mean(dim=-2, keepdim=True), min=eps1)
    else:
        var = lerp(st["variance"], g * g, weight)
        new["variance"] = var
    update = torch.rsqrt(torch.clamp(var, min=eps1 * eps1)) * g
    denom = torch.clamp(torch.linalg.vector_norm(update) / ((update.numel() ** 0.5) * d), min=1.0)
    return p - (alpha / denom) * update, new


STEPS: dict[str, Step] = {
    "sgd": sgd_step, "asgd": asgd_step, "adam": adam_step, "adamax": adamax_step, "nadam": nadam_step,
    "radam": radam_step, "adagrad": adagrad_step, "rmsprop": rmsprop_step, "adadelta": adadelta_step,
    "adafactor": adafactor_step,
}
#: the state entries of each rule that are tensors autograd follows (the rest are counters and scalars)
TENSOR_STATE: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum_buffer",), "asgd": (), "adam": ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    "adamax": ("exp_avg", "exp_inf"), "nadam": ("exp_avg", "exp_avg_sq"), "radam": ("exp_avg", "exp_avg_sq"),
    "adagrad": ("sum",), "rmsprop": ("square_avg", "grad_avg", "momentum_buffer"),
    "adadelta": ("square_avg", "acc_delta"), "adafactor": ("row_var", "col_var", "variance"),
}


def step_function(rule: str) -> Step:
    """The differentiable step of the store's update rule.

    Raises:
        ValueError: a rule without one (it names the rule and the supported ones).
    """
    if rule not in STEPS:
        raise ValueError(
            f"replaying training through the optimizer is implemented for the update rules {sorted(STEPS)}; this "
            f"store's update rule is {rule!r}. Use method='first_order', which needs no replay."
        )
    return STEPS[rule]


def initial_state(rule: str, opt_state: object) -> State:
    """The torch state of one parameter from the store's :class:`~lightning_dualform.optim.OptimizerState`:
    arrays as float64 tensors in the parameter's own shape, scalars kept as they are (numpy scalars keep the dtype
    torch rounds them to, such as NAdam's ``mu_product`` and ASGD's ``eta``)."""
    step_function(rule)
    lin = opt_state.linear or {}  # type: ignore[attr-defined]
    nl = opt_state.nonlinear  # type: ignore[attr-defined]
    st: State = {}
    for name, v in {**nl, **{k: a for k, a in lin.items() if k != "param"}}.items():
        if isinstance(v, np.ndarray) and v.ndim:
            st[name] = torch.as_tensor(np.asarray(v, dtype=np.float64))
        elif isinstance(v, np.floating):
            st[name] = v
        else:
            st[name] = float(v) if v is not None else None
    if "step" in st:
        st["step"] = float(st["step"])
    return st
