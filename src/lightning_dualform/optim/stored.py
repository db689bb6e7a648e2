"""A stored layer's optimizer math, as pure functions of the tables a store keeps.

What a store reader hands over, already checked against the file (``store/reader.py``, ``store/validate.py``):
a layer's per-step tables (``step``, ``grad_scale``, one column dict per parameter), its initial weights and
the optimizer state before the first recorded step. From them:

* :func:`layer_coefficients`: the scalars that rebuild the layer after any step of a rule whose ``Q_s`` is a
  scalar (SGD, ASGD) or of a run recorded with ``exact=False`` (the plain form ``p_0 - sum_s lr_s g_s``):
  ``W_end = a_w W_0 + b_w buf_0 + sum_s c_w[s] G_s`` (:class:`Coefficients`);
* :func:`base_weights`: ``a W_0 (+ b buf_0)``, the part of the weights that the memory does not hold;
* :func:`initial_state`: the :class:`~lightning_dualform.optim.maps.OptimizerState` a replay starts from.

An element-wise rule's layer (Adam, AdamW, ...) has no such scalars: it is rebuilt by a replay
(``attend/replay.py``) from :func:`initial_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from lightning_dualform.optim.maps import PARAM, OptimizerState, RankOne, Value
from lightning_dualform.optim.replay import Sweep
from lightning_dualform.optim.rule import UpdateRule
from lightning_dualform.optim.sgd import coefficients_with_buffer, plain_sgd_coefficients


@dataclass
class Coefficients:
    """``W_end = a_w W_0 + sum_s c_w[s] G_s`` (and the same for the bias), indexed by update number."""

    a_w: float
    c_w: np.ndarray  # (S,)
    a_b: float
    c_b: np.ndarray  # (S,), zeros without bias
    first_step: int  # global step of update number 0
    end_step: int  # the model after this many updates (global step)
    b_w: float = 0.0  # coefficient of the momentum buffer that existed before the first step (if any)
    b_b: float = 0.0


def layer_coefficients(
    tables: Mapping[str, Any],
    first_step: int,
    end_step: int,
    *,
    rule: UpdateRule | None,
    initial_state: Callable[[str], OptimizerState] | None = None,
) -> Coefficients:
    """The scalars that rebuild a layer as it was after ``end_step`` optimizer steps.

    Args:
        tables: the layer's per-step tables: ``step`` ``(S,)``, ``grad_scale`` ``(S,)``, and ``weight`` (and
            ``bias``) as ``{column: (S,)}`` of the store's update rule.
        first_step: the store's first step (update number 0).
        end_step: the model wanted, ``first_step..first_step + S``.
        rule: the update rule whose ``Q_s`` are scalars (SGD, ASGD), or ``None`` for the plain form of a run
            recorded with ``exact=False`` (its tables must hold ``lr`` and ``applied``).
        initial_state: ``(param) -> state`` before the first step, for a scalar rule other than SGD (ASGD).
    """
    steps = tables["step"]
    n_used = end_step - first_step
    grad_scale = tables["grad_scale"]

    def param(pname: str) -> tuple[float, float, np.ndarray]:
        if pname not in tables:
            return 1.0, 0.0, np.zeros(len(steps))
        t = tables[pname]
        if rule is None:
            a, c = plain_sgd_coefficients(t["lr"], grad_scale, t["applied"], n_used)
            return a, 0.0, c
        if rule.name == "sgd":
            return coefficients_with_buffer(t, grad_scale, n_used)
        if initial_state is None:
            raise ValueError(f"the coefficients of rule {rule.name!r} need the optimizer state before the first step")
        return scalar_rule_coefficients(rule, t, grad_scale, n_used, initial_state(pname))

    a_w, b_w, c_w = param("weight")
    a_b, b_b, c_b = param("bias")
    return Coefficients(a_w, c_w, a_b, c_b, first_step, end_step, b_w, b_b)


def scalar_rule_coefficients(rule: UpdateRule, table: Mapping[str, np.ndarray], grad_scale: np.ndarray, n_used: int,
                             state: OptimizerState) -> tuple[float, float, np.ndarray]:
    """``a``, ``b = 0`` and ``c_s`` of a rule whose maps are scalars (ASGD): its adjoint swept over a
    one-entry stand-in of the parameter (the maps never look at the gradient or the parameter)."""
    first = {k: (v.reshape(-1)[:1].copy() if isinstance(v, np.ndarray) and v.ndim else v)
             for k, v in state.nonlinear.items()}
    one = OptimizerState(0, (1,), first, {PARAM: np.zeros(1)}, param_dtype=state.param_dtype)
    c = np.zeros(len(grad_scale))
    sweep = Sweep(rule, table, grad_scale, [one], lambda a, b, rows: (np.zeros(1) for _ in range(a, b)), stop=n_used)
    for s, q in sweep:
        c[s] = _scalar(q)
    return _scalar(sweep.adjoint.A), 0.0, c


def _scalar(v: Value) -> float:
    """A scalar rule's coefficient of the one-entry stand-in (only Adafactor's are factored)."""
    if isinstance(v, RankOne):
        raise TypeError(f"a scalar rule's coefficient is a float or a one-entry array, not {v!r}")
    return float(v)


def base_weights(
    coef: Coefficients,
    weight_init: np.ndarray,
    bias_init: np.ndarray | None,
    *,
    weight_buffer: np.ndarray | None = None,
    bias_buffer: np.ndarray | None = None,
    residual: tuple[np.ndarray | None, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``a W_0 (+ b buf_0)`` ``(d_out, d_in)`` and the same for the bias ``(d_out,)`` (float64): the part of the
    weights the memory does not hold, plus ``residual`` (what the memory of a run recorded with ``exact=False``
    does not explain, at its end), so that ``W_T q = base_weight q + base_bias + sum_rows (c_w (k.q) + c_b) v``.

    Args:
        weight_buffer, bias_buffer: the momentum buffers before the first recorded step, where they existed.
    """
    w = coef.a_w * np.asarray(weight_init, dtype=np.float64)
    if coef.b_w and weight_buffer is not None:
        w += coef.b_w * weight_buffer
    b = None
    if bias_init is not None:
        b = coef.a_b * np.asarray(bias_init, dtype=np.float64)
        if coef.b_b and bias_buffer is not None:
            b += coef.b_b * bias_buffer
    if residual is not None:
        if residual[0] is not None:
            w += residual[0]
        if b is not None and residual[1] is not None:
            b += residual[1]
    return w, b


def initial_state(
    rule: UpdateRule,
    shape: tuple[int, ...],
    param: np.ndarray,
    *,
    arrays: Mapping[str, np.ndarray] | None = None,
    scalars: Mapping[str, Any] | None = None,
    momentum_buffer: np.ndarray | None = None,
    param_dtype: str = "float32",
) -> OptimizerState:
    """The optimizer state of one parameter before the first recorded step (float64, in the parameter's shape).

    Args:
        rule: the store's update rule.
        shape: the parameter's own shape.
        param: the parameter itself (the initial weight or bias).
        arrays: the state's stored arrays (rules other than SGD), linear or not as ``rule`` says.
        scalars: the state's stored scalars (a step count, NAdam's ``mu_product`` ...): numpy floating
            scalars keep their dtype (torch rounds some to float32, and the replay rounds them alike).
        momentum_buffer: SGD's momentum buffer, where one existed before the first step.
        param_dtype: the parameter's dtype (torch rounds scalar factors of ``p`` to it).

    Raises:
        ValueError: the state does not fit the rule (a missing entry, a wrong shape).
    """
    linear: dict[str, Any] = {PARAM: np.asarray(param, dtype=np.float64)}
    nonlinear: dict[str, Any] = {}
    if rule.name != "sgd":
        for key, arr in (arrays or {}).items():
            (linear if key in rule.linear_names else nonlinear)[key] = np.asarray(arr, dtype=np.float64)
        for key, v in (scalars or {}).items():
            nonlinear[key] = v if isinstance(v, np.floating) and key != "step" else float(v)
    elif momentum_buffer is not None:
        linear["momentum_buffer"] = np.asarray(momentum_buffer, dtype=np.float64)
    state = OptimizerState(0, tuple(shape), nonlinear, linear, param_dtype=param_dtype)
    rule.check_state(state)
    return state
