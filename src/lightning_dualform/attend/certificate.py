"""The exactness certificate: rebuild each layer's weights from the store and compare with the real ones.

Scalar rules (SGD, ASGD): ``W_rebuilt = a W_0 + sum_rows c_step(row) v_row k_row^T`` (float64, streamed in
blocks). Element-wise rules (Adam, AdamW, ...): the float64 replay of the optimizer over the rows
(:class:`~lightning_dualform.attend.replay.LayerReplay`). The relative Frobenius error against the stored final
weights is the certificate; it is written into the store. For an inexact run (``exact=False``) the residual
``W_final - W_rebuilt`` is stored too, so that answers can add it back and say how much of the output the
memory explains.
"""

from __future__ import annotations

from typing import Any, Callable

import h5py
import numpy as np
import torch

from lightning_dualform.attend.memory import memory_sums, rebuilt_weights
from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.store import _h5
from lightning_dualform.store.format import MEMORY_SUM_MAX_ELEMENTS, REPLAY_DATASETS, weights_crc32
from lightning_dualform.store.reader import LayerReader, StoreReader
from lightning_dualform.store.shards import ShardedStoreReader, open_store

#: Relative error of the rebuilt weights up to which a store counts as exact, by stored row dtype ...
ROW_DTYPE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
#: ... and by training precision: mixed precision rounds each step's weight gradient (a bf16 or fp16 GEMM
#: output) before the update, which no sum of outer products reproduces; these bounds are what the
#: test suite and benchmarks measure with margin (docs/dual-form.md).
PRECISION_TOLERANCE = {"16-mixed": 1e-2, "bf16-mixed": 5e-2}
#: ... and by how float32 products were rounded in training (``float32_products``): TF32 rounds their
#: inputs as float16 does, bf16 as bfloat16 (docs/dual-form.md).
FLOAT32_PRODUCTS_TOLERANCE = {"tf32": 1e-2, "bf16": 5e-2}


def tolerance(row_dtype: str, precision: str, float32_products: str = "ieee") -> float:
    """The documented certificate tolerance of a store (a rounding this library does not know: 5e-2)."""
    products = 1e-4 if float32_products == "ieee" else FLOAT32_PRODUCTS_TOLERANCE.get(float32_products, 5e-2)
    return max(ROW_DTYPE_TOLERANCE.get(row_dtype, 1e-4), PRECISION_TOLERANCE.get(str(precision), 1e-4), products)


def store_tolerance(store: StoreReader) -> float:
    """:func:`tolerance` of an open store, from its metadata (stores from before ``float32_products`` was
    recorded count as IEEE float32)."""
    meta = store.meta
    return tolerance(meta.row_dtype, meta.precision, meta.float32_products)


def rebuild_weights(
    layer: LayerReader,
    at_step: int | None = None,
    *,
    block_rows: int = 16384,
    dtype: torch.dtype = torch.float64,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight ``(d_out, d_in)`` and bias ``(d_out,)`` rebuilt from its initial values and memory.

    ``all_reduce`` sums the memory part over the shards of a DDP run (each rank holds its own rows); a layer of
    an element-wise rule needs every shard's rows at each step instead: pass the layer of the sharded store
    (``open_store`` on the run's index file).
    """
    if layer.store.form == "element-wise":
        if all_reduce is not None:
            raise ValueError(
                "an element-wise rule's replay needs every shard's rows at each step: rebuild from the DDP run's "
                "index file (open_store) instead of all-reducing per-rank sums"
            )
        w, b = LayerReplay(layer, at_step, block_rows=block_rows).weights()
        return torch.from_numpy(w).to(dtype), None if b is None else torch.from_numpy(b).to(dtype)
    coef = layer.coefficients(at_step)
    w, b = memory_sums(layer, coef, dtype=dtype, block_rows=block_rows, all_reduce=all_reduce)
    return rebuilt_weights(layer, coef, w, b)


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.norm(ref))
    return float(torch.linalg.norm(err)) / denom if denom > 0 else float(torch.linalg.norm(err))


def certify_store(path: str, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Compute, store and return each layer's certificate (``all_reduce``: see :func:`rebuild_weights`).

    Each layer also keeps the memory's sums (:func:`~lightning_dualform.attend.memory.memory_sums`, float64, tied to its row count, end step and
    final weights) for ``DualInference.attend``; layers are done one at a time, so at most one layer's sums
    are held in memory.

    Returns:
        ``{layer: {"rel_err", "rel_err_weight", "rel_err_bias", "explained", "exact"}}``; ``explained`` is
        ``1 - ||residual|| / ||W_final||`` (1.0 for an exact store).
    """
    results: dict[str, dict[str, float]] = {}
    with open_store(path, probe=False) as store:  # our own file(s), just written
        names = list(store.layers)
        form = store.form
    if form == "element-wise":
        return _certify_replay(path, names)
    for name in names:
        with StoreReader(path, probe=False) as store:
            tol = store_tolerance(store)
            layer = store.layer(name)
            if layer.weight_final is None:
                continue
            coef = layer.coefficients()
            mw, mb = memory_sums(layer, coef, all_reduce=all_reduce)
            rows = torch.tensor([float(layer.rows_before(coef.end_step))], dtype=torch.float64)
            rows = all_reduce(rows) if all_reduce is not None else rows
            w, b = rebuilt_weights(layer, coef, mw, mb)
            wf32 = layer.weight_final
            wf = torch.from_numpy(wf32).double()
            rw = wf - w
            err_w = _rel(rw, wf)
            err_b = 0.0
            rb = None
            if b is not None:
                bf = torch.from_numpy(layer.bias_final).double()
                rb = bf - b
                err_b = _rel(rb, bf)
            err = max(err_w, err_b)
            cert = {
                "rel_err": err,
                "rel_err_weight": err_w,
                "rel_err_bias": err_b,
                "explained": max(0.0, 1.0 - err),
                "tolerance": tol,
                "exact": bool(err <= tol and layer.exact and store.optimizer_exact),
            }
            inexact_store = not store.optimizer_exact
        results[name] = cert
        with h5py.File(path, "r+") as f:
            g = f["layers"][name]
            for k, v in cert.items():
                g.attrs[f"certificate_{k}"] = v
            if mw.numel() <= MEMORY_SUM_MAX_ELEMENTS:  # attend's `dual` reuses them instead of summing rows
                _h5.replace(g, "memory_weight", mw.numpy())
                if mb is not None:
                    _h5.replace(g, "memory_bias", mb.numpy())
                g.attrs["memory_end_step"] = int(coef.end_step)
                g.attrs["memory_rows"] = int(rows)
                g.attrs["memory_weight_final_crc32"] = weights_crc32(wf32)
            if inexact_store:
                _h5.replace(g, "weight_residual", rw.float().numpy())
                if rb is not None:
                    _h5.replace(g, "bias_residual", rb.float().numpy())
    return results


def _certify_replay(path: str, names: list[str]) -> dict[str, dict[str, float]]:
    """The certificate of an element-wise rule's store (or DDP run, given its index file): each layer's replay
    against its final weights, written into every shard with the replayed weights (``replay_weight``,
    ``replay_bias``) that ``attend`` then takes for ``dual``."""
    results: dict[str, dict[str, float]] = {}
    for name in names:
        with open_store(path, probe=False) as store:
            files = list(store.shards) if isinstance(store, ShardedStoreReader) else [store.path]
            tol = store_tolerance(store)
            layer = store.layer(name)
            if layer.weight_final is None:
                continue
            rep = LayerReplay(layer)
            w, b = rep.weights()
            wf32 = layer.weight_final
            err_w = _rel(torch.from_numpy(wf32.astype(np.float64) - w), torch.from_numpy(wf32.astype(np.float64)))
            err_b = 0.0
            if b is not None:
                bf = layer.bias_final.astype(np.float64)
                err_b = _rel(torch.from_numpy(bf - b), torch.from_numpy(bf))
            err = max(err_w, err_b)
            cert = {"rel_err": err, "rel_err_weight": err_w, "rel_err_bias": err_b, "explained": max(0.0, 1.0 - err),
                    "tolerance": tol, "exact": bool(err <= tol and layer.exact and store.optimizer_exact)}
            rows, end = rep.n_rows, rep.end
        results[name] = cert
        for file in files:
            with h5py.File(file, "r+") as f:
                g = f["layers"][name]
                for k, v in cert.items():
                    g.attrs[f"certificate_{k}"] = v
                if w.size <= MEMORY_SUM_MAX_ELEMENTS:
                    _h5.replace(g, REPLAY_DATASETS[0], w)
                    if b is not None:
                        _h5.replace(g, REPLAY_DATASETS[1], b)
                    g.attrs["memory_end_step"] = int(end)
                    g.attrs["memory_rows"] = int(rows)
                    g.attrs["memory_weight_final_crc32"] = weights_crc32(wf32)
    return results


def read_certificate(path: str) -> dict[str, dict[str, Any]]:
    """The certificate as :func:`certify_store` wrote it into one store file: ``{layer: {"rel_err", ...}}``."""
    out: dict[str, dict[str, Any]] = {}
    with h5py.File(path, "r", locking=False) as f:
        for name, g in f["layers"].items():
            cert = {k[len("certificate_"):]: _h5.attr(v) for k, v in g.attrs.items() if k.startswith("certificate_")}
            if cert:
                cert["exact"] = bool(cert.get("exact", False))
                out[name] = cert
    return out
