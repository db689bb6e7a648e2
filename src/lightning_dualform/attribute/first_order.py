"""The first-order influence table: every row of every tracked layer, weighted by ``df/dy`` of the final model.

Up-weighting example ``i``'s loss term by ``eps`` scales its rows' values by ``1 + eps`` (the stored value
``v = dL/dy`` of a row carries the example's share of the batch loss, so this *is* the example's term;
``docs/dual-form.md``, "From attention to attribution"). Holding every coefficient of the dual form fixed (the
steps' ``c_s`` or ``Q_s``, and the later gradients), the final weights move by ``eps sum_{rows r of i} Q_{s_r} (.)
v_r k_r^T`` and ``f`` by ``eps`` times

    score_i = sum_layers sum_{rows r of i} <df/dW, Q_{s_r} (.) v_r k_r^T> + <df/db, Qb_{s_r} (.) v_r>

(:mod:`.kernels`). A scalar store (SGD, ASGD) streams its rows in blocks with their step's coefficients; an
element-wise store (Adam, AdamW, ...) sweeps its steps from the last down with the optimizer's replay
(:class:`~lightning_dualform.attend.replay.LayerReplay`), which gives each step's ``Q_s`` for every unit. Memory:
the table ``(n, n_examples)``, one block of rows and the kernels' bounded work buffers (plus, for an element-wise
store, the replay's snapshots and one segment's maps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.attribute.examples import columns_of
from lightning_dualform.attribute.kernels import elementwise_scores, scalar_scores
from lightning_dualform.attribute.model import QueryFactors
from lightning_dualform.optim import RankOne

#: rows of a scalar store read and scored at a time
BLOCK_ROWS = 8192
_COLUMNS = ("keys", "values", "step", "index")


def first_order_table(store: Any, factors: dict[str, QueryFactors], examples: np.ndarray, *,
                      dtype: torch.dtype = torch.float64, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """``(n, len(examples))``: the first-order scores summed over the layers of ``factors``.

    Args:
        store: an opened store.
        factors: per layer, the queries' gradient factors at the final model.
        examples: the table's columns (sorted dataset indices; every row's index must be among them).
        dtype: accumulation dtype.
        block_rows: rows per block of a scalar store.
    """
    n = next(iter(factors.values())).x.shape[0] if factors else 0
    table = torch.zeros(n, len(examples), dtype=dtype)
    for name, fac in factors.items():
        fac = QueryFactors(fac.x.to(dtype), fac.g.to(dtype))
        lay = store.layer(name)
        if store.form == "element-wise":
            _elementwise_layer(lay, fac, examples, table)
        else:
            _scalar_layer(lay, fac, examples, table, block_rows)
    return table


def _scalar_layer(lay: Any, fac: QueryFactors, examples: np.ndarray, table: torch.Tensor, block_rows: int) -> None:
    coef = lay.coefficients()
    dt = table.dtype
    c_w = torch.as_tensor(coef.c_w, dtype=dt)
    c_b = torch.as_tensor(coef.c_b, dtype=dt) if lay.has_bias else None
    end = lay.rows_before(coef.end_step)
    for a in range(0, end, block_rows):
        blk = lay.read(a, min(a + block_rows, end), _COLUMNS)
        s = torch.as_tensor(blk["step"] - coef.first_step)
        scores = scalar_scores(fac, torch.as_tensor(blk["keys"]).to(dt), torch.as_tensor(blk["values"]).to(dt),
                               c_w[s], c_b[s] if c_b is not None else None)
        table.index_add_(1, torch.as_tensor(columns_of(examples, blk["index"])), scores)


def _elementwise_layer(lay: Any, fac: QueryFactors, examples: np.ndarray, table: torch.Tensor) -> None:
    rep = LayerReplay(lay, columns=_COLUMNS)
    dt = table.dtype
    units = np.arange(lay.d_out)

    def as_tensor(q: Any) -> torch.Tensor | float:
        if isinstance(q, RankOne):
            q = q.dense()
        return torch.as_tensor(q, dtype=dt) if np.ndim(q) else float(q)

    def visit(rows: Any, q_w: Any, q_b: Any) -> None:
        if len(rows) == 0:
            return
        scores = elementwise_scores(fac, torch.as_tensor(rows.keys).to(dt), torch.as_tensor(rows.values).to(dt),
                                    as_tensor(q_w), as_tensor(q_b) if lay.has_bias else None)
        table.index_add_(1, torch.as_tensor(columns_of(examples, rows.data["index"])), scores)

    rep.sweep_units(units, visit)
