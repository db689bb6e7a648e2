"""The linear algebra of one optimizer step: element-wise maps, their adjoint, and the optimizer state.

Once an optimizer's nonlinear state (second moments, accumulators, bias corrections ...) is fixed, one
step of every rule in :mod:`lightning_dualform.optim` is linear in the gradient and in its *linear*
state ``x`` (the parameter and, for some rules, a first moment or momentum buffer)::

    x_s = M_s (.) x_{s-1} + B_s (.) g_s          g_s = grad_scale_s * G_s

where ``(.)`` acts per weight entry: ``M_s`` is a small ``k x k`` matrix and ``B_s`` a ``k``-vector *per
entry*. For every rule, each entry of ``M_s`` and ``B_s`` is affine in a single array ``w_s`` (the step's
preconditioner, e.g. ``lr / bc1 / (sqrt(v_hat) + eps)`` for Adam)::

    M_s = m0 + m1 * w_s        B_s = b0 + b1 * w_s       (m0, m1: k x k scalars; b0, b1: k scalars)

so a step costs one array of memory (:class:`StepMaps`). Running the adjoint ``lambda = d p_T / d x``
backwards from a horizon ``T`` (:class:`Adjoint`) gives ``Q_s = grad_scale_s * lambda_s . B_s`` and at the
start ``A = lambda_param``, ``C_k = lambda_k`` in

    p_T = A (.) p_0 + sum_k C_k (.) x0_k + sum_s Q_s (.) G_s

Arrays here are float64 numpy arrays in the parameter's shape (or restricted to some of its rows);
scalars broadcast. :class:`RankOne` is ``w_s`` of a factored preconditioner (Adafactor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

#: Name of the parameter itself in a linear state; always the first entry of :attr:`StepMaps.names`.
PARAM = "param"


@dataclass(frozen=True)
class RankOne:
    """The matrix ``kappa * outer(rho, gamma)`` of shape ``(len(rho), len(gamma))``, kept factored.

    Attributes:
        kappa: scalar factor.
        rho: ``(d_out,)`` per-row factor (scales the values of a row-wise attention).
        gamma: ``(d_in,)`` per-column factor (scales the keys).
    """

    kappa: float
    rho: np.ndarray
    gamma: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rho), len(self.gamma))

    def dense(self) -> np.ndarray:
        """The ``(d_out, d_in)`` matrix."""
        return self.kappa * np.multiply.outer(self.rho, self.gamma)

    def take_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of the matrix, ``(len(rows), d_in)``."""
        return (self.kappa * self.rho[rows])[:, None] * self.gamma[None, :]

    def scaled(self, factor: float) -> RankOne:
        return RankOne(float(self.kappa * factor), self.rho, self.gamma)

    def __mul__(self, other: float | np.ndarray) -> RankOne | np.ndarray:
        if np.ndim(other) == 0:
            return self.scaled(float(other))
        return (self.kappa * self.rho)[:, None] * (other * self.gamma[None, :])

    __rmul__ = __mul__


#: What a step map entry or an adjoint entry can be: a scalar, an element-wise array, or a rank-one matrix.
Value = Union[float, np.ndarray, RankOne]
#: A :data:`Value` that is not factored: what sums of values are.
Dense = Union[float, np.ndarray]

#: What ``Q_s`` of a step looks like.
Form = Literal["scalar", "element-wise", "rank-one"]


@dataclass(frozen=True)
class StepMaps:
    """One applied step as ``x_s = M (.) x_{s-1} + B (.) g_s``, every entry affine in one array ``w``.

    Entry ``(i, j)`` of ``M`` is ``m0[i, j] + m1[i, j] * w`` and entry ``i`` of ``B`` is ``b0[i] + b1[i] * w``.
    Linear-state entries not named in :attr:`names` are left unchanged by the step.

    Attributes:
        names: the linear-state entries the step acts on, ``"param"`` first (e.g. ``("param", "exp_avg")``).
        w: the step's element-wise weight: a float, an array in the parameter's shape (rows restricted
            like the state), or a :class:`RankOne` for a factored preconditioner.
        m0, m1: ``(k, k)`` scalar coefficients; b0, b1: ``(k,)``.
    """

    names: tuple[str, ...]
    w: Value
    m0: np.ndarray
    m1: np.ndarray
    b0: np.ndarray
    b1: np.ndarray

    @property
    def form(self) -> Form:
        """``"rank-one"``, ``"element-wise"`` or ``"scalar"``: what ``Q_s`` of this step looks like."""
        if isinstance(self.w, RankOne):
            return "rank-one"
        return "element-wise" if np.ndim(self.w) else "scalar"

    @property
    def nbytes(self) -> int:
        if isinstance(self.w, RankOne):
            return self.w.rho.nbytes + self.w.gamma.nbytes
        return int(np.asarray(self.w).nbytes)


def maps(names: tuple[str, ...], w: Value, m0, m1, b0, b1) -> StepMaps:
    """A :class:`StepMaps` from nested lists (rules write their coefficient matrices literally)."""
    k = len(names)
    arrays = [np.asarray(a, dtype=np.float64) for a in (m0, m1, b0, b1)]
    if arrays[0].shape != (k, k) or arrays[1].shape != (k, k) or arrays[2].shape != (k,) or arrays[3].shape != (k,):
        raise ValueError(f"coefficient shapes do not match the {k} linear-state entries {names}")
    return StepMaps(names, w, *arrays)


def _is_zero(v: Value) -> bool:
    return not isinstance(v, RankOne) and np.ndim(v) == 0 and float(v) == 0.0


def _lincomb(coefs: np.ndarray, vecs: list[Value]) -> Dense | None:
    """``sum_j coefs[j] * vecs[j]`` as a new array or scalar (never one of ``vecs``), skipping zero terms;
    ``None`` when every term is zero. Accumulates in place: the replay runs over large matrices."""
    out: Dense | None = None
    for c, value in zip(coefs, vecs):
        if c == 0.0 or _is_zero(value):
            continue
        v = value.dense() if isinstance(value, RankOne) else value
        if out is None:
            out = np.multiply(v, float(c))
        elif np.ndim(out) >= np.ndim(v):
            out += v if c == 1.0 else v * float(c)
        else:
            out = out + (v if c == 1.0 else v * float(c))
    return out


def _affine(a: Dense | None, b: Dense | None, w: Value) -> Value:
    """``a + b * w`` where ``None`` stands for zero; ``a`` and ``b`` are owned (from :func:`_lincomb`) and
    reused in place. A rank-one ``w`` times a scalar ``b`` stays factored when ``a`` is zero."""
    if b is None:
        return 0.0 if a is None else a
    bw: Value
    if isinstance(w, RankOne):
        bw = w * b
    elif np.ndim(b) >= np.ndim(w) and np.ndim(b):
        b *= w
        bw = b
    else:
        bw = b * w
    if a is None:
        return bw
    if isinstance(bw, RankOne):
        bw = bw.dense()
    if np.ndim(a) >= np.ndim(bw) and np.ndim(a):
        a += bw
        return a
    return a + bw


def apply_forward(step: StepMaps, linear: dict[str, np.ndarray], g: np.ndarray) -> None:
    """Advance the linear state in place by one step: ``x <- M (.) x + B (.) g``.

    Entries named by the step but missing from ``linear`` start at zero (torch creates moments lazily).
    """
    shape = g.shape
    olds: list[Value] = [linear.get(n, 0.0) for n in step.names]
    ext = olds + [g]
    for i, name in enumerate(step.names):
        a = _lincomb(np.append(step.m0[i], step.b0[i]), ext)
        b = _lincomb(np.append(step.m1[i], step.b1[i]), ext)
        new = _affine(a, b, step.w)
        if isinstance(new, RankOne):
            new = new.dense()
        if isinstance(new, np.ndarray) and new.shape == shape:
            linear[name] = new
        else:  # a scalar (an entry the step leaves at zero)
            linear[name] = np.full(shape, float(new))


@dataclass
class OptimizerState:
    """What an optimizer holds for one parameter before recorded step :attr:`start`.

    Attributes:
        start: the recorded step this state precedes (0: before the first recorded step).
        shape: the parameter's full shape.
        nonlinear: the state that only enters the maps' coefficients, by torch's names (``exp_avg_sq``,
            ``step``, ``mu_product``, ...): arrays in the parameter's shape (rows restricted like the
            state), Adafactor's ``row_var``/``col_var``, or scalars (numpy scalars keep torch's dtype where
            torch rounds them, e.g. NAdam's float32 ``mu_product``).
        linear: the linear state by name, ``"param"`` first (``exp_avg``, ``momentum_buffer``), float64
            arrays; ``None`` in a snapshot that leaves it out (replay then yields the maps only, which is
            enough where no step feeds the parameter into the nonlinear state).
        rows: the parameter's rows this state holds (sorted, unique), or ``None`` for all rows.
        param_dtype: the parameter's dtype in the run (``"float32"``, ``"float64"``): torch multiplies a tensor
            by a Python scalar in the tensor's dtype, so a factor such as AdamW's decoupled decay
            ``1 - lr * wd`` is rounded to it before it scales the parameter (:meth:`factor`). Over thousands of
            steps that rounding, the same every step, moves a float32 weight by up to ``steps * 3e-8``.
    """

    start: int
    shape: tuple[int, ...]
    nonlinear: dict[str, np.ndarray | np.floating | float]
    linear: dict[str, np.ndarray] | None
    rows: np.ndarray | None = None
    param_dtype: str = "float64"

    def factor(self, x: float) -> float:
        """``x`` rounded as torch rounds a scalar that multiplies the parameter (to its dtype)."""
        return float(np.dtype(self.param_dtype).type(x))

    def copy(self) -> OptimizerState:
        return copy.deepcopy(self)

    def without_linear(self) -> OptimizerState:
        """A copy without the linear state (a snapshot for segments whose maps do not depend on it)."""
        return OptimizerState(self.start, self.shape, copy.deepcopy(self.nonlinear), None, copy.copy(self.rows),
                              self.param_dtype)

    def take_rows(self, rows: np.ndarray | None) -> OptimizerState:
        """The state of rows ``rows`` only (per-element arrays sliced, scalars kept); a copy.

        Only valid for rules whose update is local to each weight entry (see ``UpdateRule.row_local``).
        """
        if rows is None:
            return self.copy()
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows is not None:
            if np.array_equal(rows, self.rows):
                return self.copy()
            raise ValueError(f"this state holds rows {self.rows.tolist()} only; cannot take rows {rows.tolist()}")

        def cut(v):
            if isinstance(v, np.ndarray) and v.shape == self.shape:
                return v[rows].copy()
            if isinstance(v, np.ndarray) and v.ndim and v.shape != self.shape:
                raise ValueError(f"state entry of shape {v.shape} is not per-element for a {self.shape} parameter")
            return copy.copy(v)

        return OptimizerState(
            self.start,
            self.shape,
            {k: cut(v) for k, v in self.nonlinear.items()},
            None if self.linear is None else {k: cut(v) for k, v in self.linear.items()},
            rows,
            self.param_dtype,
        )

    def nbytes(self, itemsize: int = 8, linear: bool = True) -> int:
        """Bytes of the state's arrays at ``itemsize`` bytes per number (8: float64, 4: float32)."""
        parts = list(self.nonlinear.values()) + (list(self.linear.values()) if linear and self.linear else [])
        return sum(int(np.size(v)) * itemsize for v in parts)


class Adjoint:
    """``lambda = d p_T / d x`` swept backwards one step at a time from a horizon ``T``.

    ``back(maps_s, grad_scale_s)`` returns ``Q_s`` (the coefficient of the raw gradient ``G_s`` in
    ``p_T``) and moves ``lambda`` to before step ``s``. After sweeping down to a state ``x0``,
    :meth:`base` is ``A (.) p_0 + sum_k C_k (.) x0_k``.
    """

    def __init__(self, lam: dict[str, Value] | None = None) -> None:
        self.lam: dict[str, Value] = {PARAM: 1.0} if lam is None else dict(lam)

    def copy(self) -> Adjoint:
        return Adjoint({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.lam.items()})

    def back(self, step: StepMaps | None, grad_scale: float) -> Value:
        """``Q_s`` of a step (``0.0`` for a step that was not applied); updates ``lambda`` in place."""
        if step is None:
            return 0.0
        lam = [self.lam.get(n, 0.0) for n in step.names]
        q = _affine(_lincomb(step.b0, lam), _lincomb(step.b1, lam), step.w)
        new = {
            n: _affine(_lincomb(step.m0[:, j], lam), _lincomb(step.m1[:, j], lam), step.w)
            for j, n in enumerate(step.names)
        }
        for n, v in new.items():
            if isinstance(v, RankOne):  # lambda itself never stays rank one (only the rule's Q does)
                v = v.dense()
            self.lam[n] = v
        if isinstance(q, RankOne):
            return q.scaled(grad_scale)
        return q * grad_scale

    @property
    def A(self) -> Value:
        """Coefficient of the parameter at the current point of the sweep."""
        return self.lam.get(PARAM, 0.0)

    @property
    def C(self) -> dict[str, Value]:
        """Coefficients of the other linear-state entries (``exp_avg``, ``momentum_buffer``, ...)."""
        return {k: v for k, v in self.lam.items() if k != PARAM}

    def base(self, linear: dict[str, np.ndarray]) -> np.ndarray:
        """``A (.) p_0 + sum_k C_k (.) x0_k`` for the linear state ``linear`` at the sweep's point."""
        out = np.zeros_like(linear[PARAM])
        for k, v in self.lam.items():
            if k in linear:
                out = out + v * linear[k]
        return out
