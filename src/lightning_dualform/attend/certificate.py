"""The exactness certificate: rebuild each layer's weights from the store and compare with the real ones.

Scalar rules (SGD, ASGD): ``W_rebuilt = a W_0 + sum_rows c_step(row) v_row k_row^T`` (float64, streamed in
blocks). Element-wise rules (Adam, AdamW, ...): the float64 replay of the optimizer over the rows
(:class:`~lightning_dualform.attend.replay.LayerReplay`). The relative Frobenius error against the stored final
weights is the certificate (:class:`~lightning_dualform.store.certificate.LayerCertificate`), which the
store writes (:func:`~lightning_dualform.store.certificate.write_layer_certificate`): this module holds the
math, ``store/`` the bytes. For an inexact run (``exact=False``) the residual ``W_final - W_rebuilt`` is
stored too, so that answers can add it back and say how much of the output the memory explains.

Writing it is a phase of its own after the finalisation: under the store's writer lock, each layer's
certificate is computed from the rows (read only) and then written in one all-or-nothing write session.
A kill or a full disk leaves a complete store whose certificate is missing for some layers
(:func:`~lightning_dualform.store.certificate.missing_certificate` says which), never a half-written one;
:func:`certify_store` (``lightning-dualform verify --write-certificate``) writes it again at any time.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import numpy as np
import torch

from lightning_dualform.attend.memory import memory_sums, rebuilt_weights
from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.errors import StoreError
from lightning_dualform.store import WriterLock
from lightning_dualform.store.certificate import KeptWeights, LayerCertificate, store_tolerance, write_layer_certificate
from lightning_dualform.store.reader import Coefficients, LayerReader, StoreReader
from lightning_dualform.store.shards import open_store


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
    lock: WriterLock | None = None, only: Sequence[str] | None = None,
) -> dict[str, LayerCertificate]:
    """Compute each layer's certificate and hand it to the store to write; return them.

    Each layer also keeps the memory's sums (:func:`~lightning_dualform.attend.memory.memory_sums`, float64,
    tied to its row count, end step and final weights) for ``DualInference.attend``; layers are done one at a
    time, so at most one layer's sums are held in memory. Each layer's results are written in one
    all-or-nothing write session under the store's writer lock; running it again replaces them.

    Args:
        all_reduce: see :func:`rebuild_weights` (each rank of a DDP run certifies its own shard with every
            rank's sums).
        probe: walk the file's structure in a child process first (a file this process did not just write).
        lock: the store's writer lock, already held by the caller (the recording engine keeps it from the
            finalisation on); the caller releases it. Default: taken here for the certificate and released.
        only: certify these layers and leave the others' certificates as they are (default: every layer).

    Returns:
        ``{layer: LayerCertificate}``; ``explained`` is ``1 - ||residual|| / ||W_final||`` (1.0 for an exact store).

    Raises:
        StoreError: the store is not complete (no final weights to certify against) or is damaged.
        StoreBusyError: another process writes the store.
    """
    results: dict[str, LayerCertificate] = {}
    with open_store(path, probe=probe) as store:
        names = [n for n in store.layers if only is None or n in only]
        form = store.form
        if not store.complete:
            raise StoreError(f"{path}: the store is not complete (status {store.status!r}); a certificate needs "
                             "the final weights.")
    if form == "element-wise":
        return _certify_replay(path, names, lock)
    with (contextlib.nullcontext(lock) if lock is not None else WriterLock.acquire(path, "certificate")) as lock:
        with StoreReader(path, probe=probe) as store:  # (under the lock: no resume between the check and the writes)
            names = [n for n in store.layers if only is None or n in only]
            if not store.complete:
                raise StoreError(f"{path}: the store is not complete (status {store.status!r}); a certificate "
                                 "needs the final weights.")
        for name in names:
            lock.set_phase(f"certificate: computing {name}")
            with StoreReader(path, probe=False) as store:  # reopened per layer: the last session changed the file
                layer = store.layer(name)
                if layer.weight_final is None:
                    continue
                coef = layer.coefficients()
                mw, mb = memory_sums(layer, coef, all_reduce=all_reduce)
                rows = torch.tensor([float(layer.rows_before(coef.end_step))], dtype=torch.float64)
                rows = all_reduce(rows) if all_reduce is not None else rows
                w, b = rebuilt_weights(layer, coef, mw, mb)
                wf = torch.from_numpy(layer.weight_final).double()
                rw = wf - w
                err_b, rb = 0.0, None
                if b is not None:
                    bf = torch.from_numpy(layer.bias_final).double()
                    rb = bf - b
                    err_b = _rel(rb, bf)
                cert = LayerCertificate.measured(_rel(rw, wf), err_b, store_tolerance(store),
                                                 exact_run=layer.exact and store.optimizer_exact)
                kept = KeptWeights(mw.numpy(), None if mb is None else mb.numpy(), int(coef.end_step), int(rows))
                # an inexact run keeps what the memory does not explain: answers add it back
                residual = None if store.optimizer_exact else (
                    rw.float().numpy(), None if rb is None else rb.float().numpy())
            results[name] = cert
            write_layer_certificate(path, name, cert, kept=kept, residual=residual, lock=lock)
    return results


def _certify_replay(path: str, names: list[str], lock: WriterLock | None = None) -> dict[str, LayerCertificate]:
    """The certificate of an element-wise rule's store (or DDP run, given its index file): each layer's replay
    against its final weights, written into every shard with the replayed weights (``replay_weight``,
    ``replay_bias``) that ``attend`` then takes for ``dual``."""
    results: dict[str, LayerCertificate] = {}
    for name in names:
        with open_store(path, probe=False) as store:
            layer = store.layer(name)
            if layer.weight_final is None:
                continue
            rep = LayerReplay(layer)
            w, b = rep.weights()
            wf = layer.weight_final.astype(np.float64)
            err_w = _rel(torch.from_numpy(wf - w), torch.from_numpy(wf))
            err_b = 0.0
            if b is not None:
                bf = layer.bias_final.astype(np.float64)
                err_b = _rel(torch.from_numpy(bf - b), torch.from_numpy(bf))
            cert = LayerCertificate.measured(err_w, err_b, store_tolerance(store),
                                             exact_run=layer.exact and store.optimizer_exact)
            kept = KeptWeights(w, b, int(rep.end), int(rep.n_rows))
        results[name] = cert
        write_layer_certificate(path, name, cert, kept=kept, lock=lock)
    return results
