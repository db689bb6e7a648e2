"""The exactness certificate: rebuild each layer's weights from the store and compare with the real ones.

Scalar rules (SGD, ASGD): ``W_rebuilt = a W_0 + sum_rows c_step(row) v_row k_row^T`` (float64, streamed in
blocks). Element-wise rules (Adam, AdamW, ...): the float64 replay of the optimizer over the rows
(:class:`~lightning_dualform.attend.replay.LayerReplay`). The relative Frobenius error against the stored final
weights is the certificate; it is written into the store. For an inexact run (``exact=False``) the residual
``W_final - W_rebuilt`` is stored too, so that answers can add it back and say how much of the output the
memory explains.

Writing it is a phase of its own after the finalisation: under the store's writer lock, each layer's
certificate is computed from the rows (read only) and then written in one all-or-nothing write session
(:mod:`lightning_dualform.store._journal`). A kill or a full disk leaves a complete store whose
certificate is missing for some layers (:func:`missing_certificate` says which), never a half-written
one; :func:`certify_store` (``lightning-dualform verify --write-certificate``) writes it again at any time.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import h5py
import numpy as np
import torch

from lightning_dualform.attend.memory import memory_sums, rebuilt_weights
from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5, _journal
from lightning_dualform.store._lock import WriterLock
from lightning_dualform.store.format import MEMORY_SUM_MAX_ELEMENTS, REPLAY_DATASETS, tables_crc32, weights_crc32
from lightning_dualform.store.reader import Coefficients, LayerReader, StoreReader
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


def tables_crc32_of(tables: dict[str, Any]) -> int:
    """:func:`~lightning_dualform.store.format.tables_crc32` of :meth:`LayerReader.updates`."""
    return tables_crc32(tables["step"], tables["grad_scale"], {p: tables[p] for p in ("weight", "bias") if p in tables})


def missing_certificate(store: Any) -> list[str]:
    """Layers of a complete store whose certificate is not written (empty for an unfinished store: its
    certificate comes at fit end)."""
    if not store.complete:
        return []
    return [n for n in store.layers if not store.layer(n).has_certificate]


def replay_weights_error(layer: LayerReader, replayed: tuple[np.ndarray, np.ndarray | None]) -> float:
    """Relative error of the replayed weights (and bias) the certificate kept for an element-wise rule's layer
    against the stored final weights: the larger of the two. A few vector operations."""
    err = 0.0
    for got, final in ((replayed[0], layer.weight_final), (replayed[1], layer.bias_final)):
        if got is not None and final is not None:
            ref = final.astype(np.float64)
            err = max(err, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300)))
    return err


def sums_rebuild_error(layer: LayerReader, coef: Coefficients, sums: tuple[np.ndarray, np.ndarray | None]) -> float:
    """Relative error of the final weights rebuilt from the certificate's stored sums (``a W_0 + sums``, plus
    the stored residual of an inexact store) against the stored final weights: what ``attend`` relies on
    when it takes ``dual``'s memory part from the sums. A few vector operations, no pass over the rows."""
    w_base, b_base = layer.base_weights(coef=coef, with_residual=True)
    err = np.linalg.norm(w_base + sums[0] - layer.weight_final.astype(np.float64))
    ref = np.linalg.norm(layer.weight_final.astype(np.float64))
    if b_base is not None and sums[1] is not None and layer.bias_final is not None:
        bf = layer.bias_final.astype(np.float64)
        err = max(err / max(ref, 1e-300), np.linalg.norm(b_base + sums[1] - bf) / max(np.linalg.norm(bf), 1e-300))
        return float(err)
    return float(err / max(ref, 1e-300))


def certify_store(
    path: str, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, *, probe: bool = False,
    lock: WriterLock | None = None,
) -> dict[str, dict[str, float]]:
    """Compute, store and return each layer's certificate (``all_reduce``: see :func:`rebuild_weights`).

    Each layer also keeps the memory's sums (:func:`~lightning_dualform.attend.memory.memory_sums`, float64, tied to its row count, end step and
    final weights) for ``DualInference.attend``; layers are done one at a time, so at most one layer's sums
    are held in memory. Each layer's results are written in one all-or-nothing write session under the
    store's writer lock; running it again replaces them.

    Args:
        probe: walk the file's structure in a child process first (a file this process did not just write).
        lock: the store's writer lock, already held by the caller (the recording engine keeps it from the
            finalisation on); the caller releases it. Default: taken here for the certificate and released.

    Returns:
        ``{layer: {"rel_err", "rel_err_weight", "rel_err_bias", "explained", "exact"}}``; ``explained`` is
        ``1 - ||residual|| / ||W_final||`` (1.0 for an exact store).

    Raises:
        StoreError: the store is not complete (no final weights to certify against) or is damaged.
        StoreBusyError: another process writes the store.
    """
    results: dict[str, dict[str, float]] = {}
    with open_store(path, probe=probe) as store:
        names = list(store.layers)
        form = store.form
        if not store.complete:
            raise StoreError(f"{path}: the store is not complete (status {store.status!r}); a certificate needs the final weights.")
    if form == "element-wise":
        return _certify_replay(path, names, lock)
    with (contextlib.nullcontext(lock) if lock is not None else WriterLock.acquire(path, "certificate")) as lock:
        with StoreReader(path, probe=probe) as store:
            names = list(store.layers)
            if not store.complete:
                raise StoreError(f"{path}: the store is not complete (status {store.status!r}); a certificate needs the final weights.")
        for name in names:
            lock.set_phase(f"certificate: computing {name}")
            with StoreReader(path, probe=False) as store:  # reopened per layer: the last session changed the file
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
                tables = layer.updates()
            results[name] = cert
            lock.set_phase(f"certificate: writing {name}")
            nbytes = (8 * (mw.numel() + (mb.numel() if mb is not None else 0)) if mw.numel() <= MEMORY_SUM_MAX_ELEMENTS else 0) \
                + (4 * (rw.numel() + (rb.numel() if rb is not None else 0)) if inexact_store else 0)
            with _journal.write_session(path, f"certificate of {name}", reserve=nbytes + (64 << 10)) as f:
                g = f["layers"][name]
                for key in [k for k in g.attrs if k.startswith("certificate_")]:
                    del g.attrs[key]  # (the certificate made as training went, if any: this one replaces it)
                for k, v in cert.items():
                    g.attrs[f"certificate_{k}"] = v
                g.attrs["certificate_method"] = "full"
                if mw.numel() <= MEMORY_SUM_MAX_ELEMENTS:  # attend's `dual` reuses them instead of summing rows
                    _h5.replace(g, "memory_weight", mw.numpy())
                    if mb is not None:
                        _h5.replace(g, "memory_bias", mb.numpy())
                    g.attrs["memory_end_step"] = int(coef.end_step)
                    g.attrs["memory_rows"] = int(rows)
                    g.attrs["memory_weight_final_crc32"] = weights_crc32(wf32)
                g.attrs["certificate_tables_crc32"] = tables_crc32_of(tables)
                if inexact_store:
                    _h5.replace(g, "weight_residual", rw.float().numpy())
                    if rb is not None:
                        _h5.replace(g, "bias_residual", rb.float().numpy())
    return results


def _certify_replay(path: str, names: list[str], lock: WriterLock | None = None) -> dict[str, dict[str, float]]:
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
        nbytes = 8 * (w.size + (b.size if b is not None else 0)) if w.size <= MEMORY_SUM_MAX_ELEMENTS else 0
        for file in files:
            held = lock is not None and os.path.abspath(file) == os.path.abspath(path)
            with (contextlib.nullcontext(lock) if held else WriterLock.acquire(file, f"certificate: writing {name}")), \
                    _journal.write_session(file, f"certificate of {name}", reserve=nbytes + (64 << 10)) as f:
                g = f["layers"][name]
                for key in [k for k in g.attrs if k.startswith("certificate_")]:
                    del g.attrs[key]
                for k, v in cert.items():
                    g.attrs[f"certificate_{k}"] = v
                g.attrs["certificate_method"] = "full"
                g.attrs["certificate_tables_crc32"] = _file_tables_crc32(f, g)
                if w.size <= MEMORY_SUM_MAX_ELEMENTS:
                    _h5.replace(g, REPLAY_DATASETS[0], w)
                    if b is not None:
                        _h5.replace(g, REPLAY_DATASETS[1], b)
                    g.attrs["memory_end_step"] = int(end)
                    g.attrs["memory_rows"] = int(rows)
                    g.attrs["memory_weight_final_crc32"] = weights_crc32(wf32)
    return results


def _file_tables_crc32(f: h5py.File, g: h5py.Group) -> int:
    """:func:`~lightning_dualform.store.format.tables_crc32` of one store file's layer group as it is now
    (each shard of a DDP run binds its own tables)."""
    from lightning_dualform.store.writer import _tables_crc32

    return _tables_crc32(f["update_step"], g["updates"], int(f["committed_steps"][0]))


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
