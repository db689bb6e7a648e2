"""The memory's sums, ``sum_rows c_w v k^T`` and ``sum_rows c_b v``, streamed over a layer's rows.

What the certificate compares with the trained weights and what ``attend`` adds to ``a W_0`` to rebuild a
layer: one function, fed by whatever reads the blocks (sequential reads on the CPU, or the inference
prefetcher's blocks on a GPU). The per-block arithmetic is :func:`~lightning_dualform.attend.kernels.fold_memory`,
or for a convolution stored as maps :func:`~lightning_dualform.attend.kernels.fold_memory_maps`: the sum as the
convolution's weight gradient of its maps, never unfolding the keys.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from lightning_dualform.attend.blocks import compact_geometry, maps_geometry
from lightning_dualform.attend.kernels import fold_memory, fold_memory_maps
from lightning_dualform.store.reader import Coefficients
from lightning_dualform.store.source import LayerSource


def blocks_of(
    layer: LayerSource, n_rows: int, block_rows: int = 16384, device: torch.device | str = "cpu"
) -> Iterable[dict[str, Any]]:
    """Rows ``0..n_rows`` of a layer in blocks: ``{"keys", "values", "step"}`` as numpy arrays; a convolution
    stored as maps, where compact blocks pay on ``device`` (:func:`~lightning_dualform.attend.blocks.compact_geometry`),
    in blocks of whole maps, its keys as the maps (:meth:`LayerReader.read_maps`)."""
    geom = compact_geometry(layer, device)
    if geom is not None:
        block_rows = max(1, block_rows // geom.locations) * geom.locations
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        if geom is not None:
            yield layer.read_maps(start, stop, ("values", "step"))
        else:
            yield layer.read(start, stop, ("keys", "values", "step"))


def memory_sums(
    layer: LayerSource,
    coef: Coefficients,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    blocks: Iterable[dict[str, Any]] | None = None,
    block_rows: int = 16384,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_rows c_w v k^T`` ``(d_out, d_in)`` and ``sum_rows c_b v`` ``(d_out,)`` over the rows before
    ``coef.end_step``.

    Args:
        layer: the layer's reader.
        coef: the coefficients of the model wanted (:meth:`LayerReader.coefficients`).
        dtype / device: where to sum.
        blocks: the rows, as dicts of ``keys``, ``values`` and ``step`` (numpy arrays or tensors), or a
            convolution's compact blocks (``maps``, ``skip`` in place of ``keys``); default: :func:`blocks_of` the
            rows before ``coef.end_step``.
        all_reduce: sums over the shards of a DDP run (each rank holds its own rows).
    """
    device = torch.device(device)
    w = torch.zeros(layer.d_out, layer.d_in, dtype=dtype, device=device)
    b = torch.zeros(layer.d_out, dtype=dtype, device=device) if layer.has_bias else None
    c_w = torch.from_numpy(coef.c_w).to(device, dtype)
    c_b = torch.from_numpy(coef.c_b).to(device, dtype)
    geom = maps_geometry(layer)
    if blocks is None:
        blocks = blocks_of(layer, layer.rows_before(coef.end_step), block_rows, device)
    for blk in blocks:
        upd = torch.as_tensor(blk["step"]).to(device) - coef.first_step
        v = torch.as_tensor(blk["values"]).to(device, dtype)
        bias_share = c_b[upd] @ v if b is not None else None
        if "maps" in blk:
            maps = torch.as_tensor(blk["maps"]).to(device, dtype)
            fold_memory_maps(w, b, geom, maps, int(blk["skip"]), v * c_w[upd, None], bias_share)
        else:
            fold_memory(w, b, torch.as_tensor(blk["keys"]).to(device, dtype), v * c_w[upd, None], bias_share)
    if all_reduce is not None:
        w = all_reduce(w)
        b = all_reduce(b) if b is not None else None
    return w, b


def rebuilt_weights(
    layer: LayerSource, coef: Coefficients, w: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The memory's sums plus what the memory does not hold (``a W_0``, ...): the rebuilt weights."""
    w0, b0 = layer.base_weights(coef=coef, with_residual=False)
    w = w + torch.from_numpy(w0).to(w.device, w.dtype)
    if b is not None:
        b = b + torch.from_numpy(b0).to(b.device, b.dtype)
    return w, b
