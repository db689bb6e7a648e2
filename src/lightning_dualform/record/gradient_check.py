"""Each step's rows against the gradient the optimizer used, through random projections of both.

For a layer's random probes ``Z`` ``(d_in, k)``, :func:`project_rows` gives the step's ``G Z = V^T (K Z)`` and
``sum_rows v`` from its rows (summed over DDP ranks: the optimizer's gradient sums every rank's rows), and
:func:`check_rows` compares them with ``W.grad Z`` and ``b.grad``: a cheap sketch of ``W.grad = f sum v k^T``
(Freivalds' test) that catches weights used outside the module's forward (e.g. ``nn.MultiheadAttention.out_proj``)
and any other missing or wrong rows, and measures the factor ``f`` (clipping, DDP averaging, loss scaling) where
the adapter does not know it. The same projections of the rows as stored feed the certificate made as training
goes (``record/sketch.py``). Pure functions of tensors and modules.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lightning_dualform.layers import layer_shape, maps_from_pixels, project_keys, project_maps, weight_matrix
from lightning_dualform.record import rows as rows_mod
from lightning_dualform.store.conv import ConvGeometry

#: A measured gradient factor this close (relatively) to 2^k / world_size is that number: loss scales are
#: powers of two, and without clipping the factor is exactly one over the number of DDP ranks. The float32
#: sketch the factor is measured with is good to about 1e-6 (docs/dual-form.md).
SNAP = 1e-5

#: per layer, ``(G Z (d_out, k), sum_rows v (d_out,))``
Sketches = dict[str, tuple[torch.Tensor, torch.Tensor]]


def project_rows(rows: dict[str, tuple], modules: dict[str, nn.Module], probes: dict[str, torch.Tensor],
                 geometry: dict[str, ConvGeometry], *, stored_dtype: str | None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None) -> Sketches:
    """Per layer of ``modules``, the step's ``G Z = V^T (K Z)`` ``(d_out, k)`` and ``sum_rows v`` ``(d_out,)``
    (float32 products) from ``rows[name] = (keys, values, ...)`` as captured or, with ``stored_dtype``, as
    :func:`~lightning_dualform.record.rows.gather_rows` stores them in that dtype, summed by ``all_reduce`` (None:
    one process); zeros for a layer without rows this step."""
    out: Sketches = {}
    for name, m in modules.items():
        z = probes[name]
        d_out = layer_shape(m)[1]
        if name in rows:
            keys, values = rows[name][0], rows[name][1]
            if stored_dtype is not None:
                keys, values = rows_mod.stored_floats(keys, stored_dtype), rows_mod.stored_floats(values, stored_dtype)
            else:
                keys, values = (keys.float() if keys.is_floating_point() else keys), values.float()
            geom = geometry.get(name)
            # the k-wide factor on the left: torch multiplies these skinny products 3-4x faster that way round
            if geom is not None:  # K Z as a convolution of the maps with Z's columns as filters
                maps = maps_from_pixels(keys, geom) if keys.dim() == 2 else keys
                gz = (project_maps(geom, maps.float(), z).t() @ values).t()
            elif isinstance(m, nn.Embedding):
                gz = (project_keys(m, keys, z).t() @ values).t()
            else:  # (Z^T K^T) V
                gz = (_columns_first(z) @ keys.to(z.dtype).t() @ values).t()
            gb = values.sum(0)
        else:
            gz = torch.zeros(d_out, z.shape[1], device=z.device, dtype=torch.float32)
            gb = torch.zeros(d_out, device=z.device, dtype=torch.float32)
        out[name] = (gz, gb)
    if all_reduce is None or not out:
        return out  # (one process: nothing to sum, no flattening)
    flat = all_reduce(torch.cat([t.reshape(-1) for gz, gb in out.values() for t in (gz, gb)]))
    i = 0
    for name, (gz, gb) in out.items():
        n = gz.numel()
        out[name] = (flat[i : i + n].reshape(gz.shape), flat[i + n : i + n + len(gb)])
        i += n + len(gb)
    return out


def check_rows(sketches: Sketches, modules: dict[str, nn.Module], probes: dict[str, torch.Tensor], *,
               grad_scale: float | None, world_size: int) -> dict[str, tuple[float, float, bool]]:
    """Each layer's rows against the gradient the optimizer used: ``W.grad Z`` must equal ``f V^T (K Z)`` (and
    ``b.grad`` equal ``f sum v``). With ``grad_scale`` given, ``f`` is it; otherwise ``f`` is the least-squares
    fit (:func:`fit_scale`).

    Returns:
        per layer ``(f, err, rows_seen)``: the factor, the relative error of the check (against the rounding
        the gradient's entries allow), and whether the projections saw any row.
    """
    out: dict[str, tuple[float, float, bool]] = {}
    for name, (gz, gb) in sketches.items():
        m = modules[name]
        z = probes[name]
        g = m.weight.grad
        # only what the step applies is checked: a parameter without .grad this step (frozen for it, or its
        # gradient set to None) is left alone by the optimizer, and its part of the rows by the rebuild
        lhs_parts, rhs_parts, bound2 = [], [], 0.0
        if g is not None:
            g = weight_matrix(m, g).float()
            lhs_parts.append((_columns_first(z) @ g.t()).t().reshape(-1))  # = g @ z (skinny products run fastest so)
            rhs_parts.append(gz.reshape(-1))
            # independent rounding of relative size eps in each entry of W.grad moves (W.grad Z)_ij by about
            # eps * sqrt(sum_l (W.grad_il z_lj)^2): measured against that (about |W.grad|_F |z_j|), rounding
            # (bf16, fp16) stays near eps even where W.grad Z cancels, and missing rows stay O(1). Its norm over
            # every (i, j) is sqrt(sum_l |W.grad_:l|^2 |z_l:|^2): column norms, no second product
            bound2 += float(torch.dot((g * g).sum(0), (z * z).sum(1)))
        b = getattr(m, "bias", None)
        if b is not None and b.grad is not None:
            lhs_parts.append(b.grad.float())
            rhs_parts.append(gb)
            bound2 += float(torch.linalg.vector_norm(b.grad.float())) ** 2
        if not lhs_parts:  # no parameter of the layer takes this step: nothing of its rows is applied
            out[name] = (grad_scale if grad_scale is not None else 1.0 / world_size, 0.0,
                         bool(float(torch.linalg.vector_norm(gz)) > 0))
            continue
        lhs, rhs, bound = torch.cat(lhs_parts), torch.cat(rhs_parts), bound2 ** 0.5
        f = grad_scale if grad_scale is not None else fit_scale(lhs, rhs, world_size)
        diff = float(torch.linalg.vector_norm(lhs - f * rhs))
        err = diff / bound if bound > 0 else (0.0 if diff == 0 else math.inf)
        out[name] = (f, err, bool(float(torch.linalg.vector_norm(rhs)) > 0))
    return out


def _columns_first(z: torch.Tensor) -> torch.Tensor:
    """``Z^T`` ``(k, d_in)``, contiguous."""
    return z.t().contiguous()


def fit_scale(lhs: torch.Tensor, rhs: torch.Tensor, world_size: int) -> float:
    """The least-squares ``f`` of ``lhs = f rhs``, snapped to ``2^k / world_size`` within :data:`SNAP`."""
    denom = float(rhs.double() @ rhs.double())
    if denom == 0.0:
        return 1.0 / world_size  # no rows: the factor never multiplies anything
    f = float(lhs.double() @ rhs.double()) / denom
    if f > 0:
        snapped = 2.0 ** round(math.log2(f * world_size)) / world_size
        if abs(f - snapped) <= SNAP * snapped:
            return snapped
    return f


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' total 2-norm, as ``torch.nn.utils.clip_grad_norm_`` computes it."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)  # torch < 2.6


def clip_coefficient(total: torch.Tensor, clip_val: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by, for their total norm ``total``
    (its own float32 arithmetic: ``min(clip_val / (total + 1e-6), 1)``)."""
    return float(torch.clamp(clip_val / (total + 1e-6), max=1.0))
