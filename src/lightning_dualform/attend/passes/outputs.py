"""A layer's output for the queries from stored or rebuilt weights: the pieces of a pass that check ``dual``
(``primal``: the stored final weights), complete it (an inexact store's residual) or find the prediction that
names a unit when the stored weights are not the wanted model's (weights rebuilt from the memory).

Every function computes in the accumulation dtype on the pass's device; callers run them inside
:func:`~lightning_dualform._float32_products.full_float32_products`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_dualform.attend.blocks import Prefetcher, compact_geometry, read_block
from lightning_dualform.attend.memory import memory_sums, rebuilt_weights
from lightning_dualform.store.reader import Coefficients
from lightning_dualform.store.source import LayerSource


def apply_weights(w: np.ndarray | None, b: np.ndarray | None, q: torch.Tensor, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """``q W^T + b`` ``(n, d_out)`` in ``dtype`` on ``device``, or None without ``w``."""
    if w is None:
        return None
    out = q.to(device, dtype) @ torch.from_numpy(w).to(device, dtype).t()
    if b is not None:
        out += torch.from_numpy(b).to(device, dtype)
    return out


def primal_output(layer: LayerSource, q: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The stored final weights applied to the queries (None while a store is incomplete)."""
    return apply_weights(layer.weight_final, layer.bias_final, q, dtype, device)


def residual_output(
    layer: LayerSource, q: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """What the memory does not explain, for a store recorded with ``exact=False`` (None otherwise)."""
    return apply_weights(layer.weight_residual, layer.bias_residual, q, dtype, device)


def rebuilt_output(layer: LayerSource, q: torch.Tensor, coef: Coefficients, *, dtype: torch.dtype, device: torch.device,
                   block_rows: int) -> torch.Tensor:
    """``W q + b`` with ``W, b`` rebuilt from a scalar rule's memory (one streamed pass, ``B x d_in x d_out`` per
    block instead of an attention pass's ``n x B x (d_in + d_out)``)."""
    compact = compact_geometry(layer, device) is not None  # a convolution's maps: summed as a weight gradient

    def make(start: int, stop: int) -> dict[str, Any]:
        return read_block(layer, start, stop, ("keys", "values", "step"), compact)

    pf = Prefetcher(make, layer.rows_before(coef.end_step), block_rows, device)
    try:
        w, b = rebuilt_weights(layer, coef, *memory_sums(layer, coef, dtype=dtype, device=device, blocks=pf))
    finally:
        pf.close()
    out = q.to(device, dtype) @ w.t()
    return out + b if b is not None else out
