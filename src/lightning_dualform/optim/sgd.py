"""Per-step coefficients of the SGD update rule.

``torch.optim.SGD`` updates a parameter ``p`` with gradient ``g`` as::

    d   = sign * g + wd * p                  (sign = -1 under ``maximize``)
    buf = d                                  on the first step with momentum (no dampening!)
    buf = mu * buf + (1 - dampening) * d     afterwards
    u   = d + mu * buf  (Nesterov)  |  buf  |  d  (momentum == 0)
    p   = p - lr * u

Every operation is a scalar times a tensor, so after ``T`` steps
``p_T = a * p_0 + sum_s c_s * G_s`` where ``G_s`` is the raw gradient recorded for step ``s``
(the sum of captured ``value x key`` rows) and ``g_s = grad_scale_s * G_s`` (clipping, DDP averaging,
loss scaling). ``a`` and ``c_s`` come from running the scalar recurrence backwards from ``T``.
This module is pure numpy: no torch, no h5py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

#: Columns of the per-step hyper-parameter table of one parameter (weight or bias).
PARAM_COLUMNS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "fresh_buffer", "applied")


@dataclass
class ParamUpdate:
    """The SGD settings that one optimizer step applied to one parameter.

    ``fresh_buffer`` is True when the momentum buffer did not exist before this step (torch then
    initialises it with the gradient, without dampening). ``applied`` is False when the step left the
    parameter untouched (its ``.grad`` was None, or a loss scaler skipped the step).
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    fresh_buffer: bool = True
    applied: bool = True

    def as_row(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))


def _step_matrix(
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool, fresh: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The step as ``(p', buf') = M @ (p, buf) + b * G_raw`` with ``G_raw`` pre-multiplied by grad_scale.

    Returns ``M`` (2, 2) and ``b`` (2,). Variables are expressed as coefficient pairs over (p, buf, G).
    """
    sign = -1.0 if maximize else 1.0
    # d = wd * p + sign * G
    d = np.array([weight_decay, 0.0, sign])
    if momentum == 0.0:
        u = d
        new_buf = np.array([0.0, 1.0, 0.0])  # untouched (unused)
    else:
        keep = 0.0 if fresh else momentum
        scale = 1.0 if fresh else 1.0 - dampening
        new_buf = np.array([0.0, keep, 0.0]) + scale * d
        u = d + momentum * new_buf if nesterov else new_buf
    new_p = np.array([1.0, 0.0, 0.0]) - lr * u
    m = np.array([[new_p[0], new_p[1]], [new_buf[0], new_buf[1]]])
    b = np.array([new_p[2], new_buf[2]])
    return m, b


def coefficients(
    table: dict[str, np.ndarray], grad_scale: np.ndarray, end: int | None = None
) -> tuple[float, np.ndarray]:
    """Coefficients of ``p_end = a * p_0 + sum_{s < end} c_s * G_s`` for one parameter.

    Assumes no momentum buffer existed before the first step; see :func:`coefficients_with_buffer`.
    """
    a, _, c = coefficients_with_buffer(table, grad_scale, end)
    return a, c


def coefficients_with_buffer(
    table: dict[str, np.ndarray], grad_scale: np.ndarray, end: int | None = None
) -> tuple[float, float, np.ndarray]:
    """Coefficients of ``p_end = a * p_0 + b * buf_0 + sum_{s < end} c_s * G_s`` for one parameter.

    ``buf_0`` is the momentum buffer before the first recorded step (a store that starts from a
    checkpoint of a run with momentum); ``b`` is 0 when the first step creates the buffer.

    Args:
        table: per-step columns named in :data:`PARAM_COLUMNS`, each of shape ``(S,)``, in step order.
        grad_scale: ``(S,)`` factor turning the raw recorded gradient into the one the optimizer used.
        end: number of leading steps to apply (the model after ``end`` updates); ``None`` for all.

    Returns:
        ``a``, ``b`` and ``c`` of shape ``(S,)``; entries of ``c`` at and past ``end`` are zero.
    """
    n = len(grad_scale) if end is None else int(end)
    c = np.zeros(len(grad_scale), dtype=np.float64)
    adj = np.array([1.0, 0.0])  # d p_end / d (p_s, buf_s)
    for s in range(n - 1, -1, -1):
        if not bool(table["applied"][s]):
            continue  # identity step: p and buf unchanged
        m, b = _step_matrix(
            float(table["lr"][s]),
            float(table["momentum"][s]),
            float(table["dampening"][s]),
            float(table["weight_decay"][s]),
            bool(table["nesterov"][s]),
            bool(table["maximize"][s]),
            bool(table["fresh_buffer"][s]),
        )
        c[s] = float(adj @ b) * float(grad_scale[s])
        adj = adj @ m
    return float(adj[0]), float(adj[1]), c


def plain_sgd_coefficients(
    lr: np.ndarray, grad_scale: np.ndarray, applied: np.ndarray, end: int | None = None
) -> tuple[float, np.ndarray]:
    """Coefficients of the plain form ``p_T = p_0 - sum_s lr_s g_s``, used for non-SGD optimizers.

    The result is not exact for such optimizers: the store keeps the residual to the real weights.
    """
    n = len(lr) if end is None else int(end)
    c = np.zeros(len(lr), dtype=np.float64)
    c[:n] = np.where(applied[:n], -np.asarray(lr[:n], dtype=np.float64) * grad_scale[:n], 0.0)
    return 1.0, c
