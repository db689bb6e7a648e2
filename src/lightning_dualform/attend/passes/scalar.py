"""The ``attend`` pass over a store of SGD or another scalar rule: every row's weight in the layer's output is
``c_w[step] (k . q) + c_b[step]``, one coefficient per step.

The rows stream block by block: a prefetch thread reads block ``i + 1`` from HDF5 (on CUDA it copies it through
pinned memory on a side stream) while block ``i`` is computed, and each block is folded into the running results
of :class:`~lightning_dualform.attend.kernels.AttentionAccumulator` (the fused kernel on the CPU). Everything
derived from the rows alone is prepared on the reader thread, so that the compute thread only multiplies and
folds (every small op there waits for the GIL). Peak memory is a few blocks plus the per-query results; the
optional per-example sums add ``n_queries x n_examples`` numbers (twice with contributions).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch

from lightning_dualform.attend.blocks import CompactKeys, Prefetcher, compact_geometry, progress_bar, read_block, scaled
from lightning_dualform.attend.cache import cast_rows
from lightning_dualform.attend.finite import check_answer
from lightning_dualform.attend.kernels import META_COLUMNS, AttentionAccumulator, Block
from lightning_dualform.attend.passes import assemble
from lightning_dualform.attend.passes.base import AttendPass, all_merge, check_top_k
from lightning_dualform.attend.passes.outputs import primal_output, rebuilt_output, residual_output
from lightning_dualform.attend.passes.units import resolve_units
from lightning_dualform.attend.request import MAX_STEP_BUCKETS, AttendRequest
from lightning_dualform.attend.results import AttentionResult, overall_rel_err
from lightning_dualform.store.format import ROW_COLUMNS
from lightning_dualform.store.reader import Coefficients
from lightning_dualform.store.source import LayerSource
from lightning_dualform.store.certificate import beyond_tolerance_cause

log = logging.getLogger(__name__)

_NUMPY = {torch.float64: np.float64, torch.float32: np.float32}
_META = ("step", "epoch", "index", "position", "label")  # the stored metadata columns of META_COLUMNS


class ScalarPass(AttendPass):
    """Attend over a scalar rule's memory (see the module docstring)."""

    forms = ("scalar", "plain")

    def prepare(self, request: AttendRequest, *, output_layer: bool) -> AttendRequest:
        req = request.resolved(element_wise=False, output_layer=output_layer)
        if req.score == "unit" and req.contribution_to is None:
            # SGD's unit score does not depend on the unit; its contributions do
            req = req.replace(contribution_to="pred")
        return req

    def run(self, layer: LayerSource, queries: torch.Tensor, request: AttendRequest) -> AttentionResult:
        ctx, req = self.ctx, request
        coef = layer.coefficients(req.at_step)
        span = coef.end_step - coef.first_step
        if req.step_buckets > max(MAX_STEP_BUCKETS, span):
            raise ValueError(
                f"`attend(step_buckets={req.step_buckets})` asks for too many step buckets: at most "
                f"{MAX_STEP_BUCKETS}, or one per step beyond that (the model after step {coef.end_step} has {span} "
                f"steps); use step_buckets <= {max(MAX_STEP_BUCKETS, span)}."
            )
        n_rows = layer.rows_before(coef.end_step)
        check_top_k(layer, req.top_k, n_rows, coef.end_step)
        acc, dev, store = ctx.accumulate, ctx.device, ctx.store
        final = coef.end_step == store.last_step
        primal = primal_output(layer, queries, acc, dev) if final else None
        residual = residual_output(layer, queries, acc, dev) if final and not store.optimizer_exact else None
        if not store.optimizer_exact and not final:
            log.warning(
                "%s: the store is inexact and keeps the residual only for the final weights; at_step=%s answers "
                "from the memory alone.", ctx.path, req.at_step,
            )

        def prediction() -> torch.Tensor:  # an earlier step, or no final weights: a dual pass first
            if primal is not None:
                return primal
            out = self._rebuilt(layer, queries, coef)
            return out + residual if residual is not None else out

        units = resolve_units(layer, queries.shape[0], req.contribution_to, prediction)
        stored = self._checked_sums(layer, coef, n_rows) if req.reuse_certificate else None
        res = self._pass(layer, queries, coef, req, n_rows=n_rows, units=units, primal=primal, residual=residual,
                         stored=stored)
        if res.units is not None:
            _unit_parts(layer, queries, coef, res)
        # a NaN or inf anywhere in the rows it read is in the answer's sums: refused, not merely "not exact"
        check_answer(layer, res, path=ctx.path, queries=queries, block_rows=ctx.rows_per_block(layer))
        self._warn_if_beyond_tolerance(res)
        return res

    # -- the streamed pass ---------------------------------------------------------------------------------
    def _pass(
        self, layer: LayerSource, q: torch.Tensor, coef: Coefficients, req: AttendRequest, *, n_rows: int,
        units: torch.Tensor | None, primal: torch.Tensor | None, residual: torch.Tensor | None,
        stored: tuple[np.ndarray, np.ndarray | None] | None,
    ) -> AttentionResult:
        """The streamed pass: fold every block of the ``n_rows`` rows into one accumulator, then assemble.

        Args:
            units: ``(n,)`` the unit of each query's contributions, or None.
            primal, residual: the stored final weights' output and an inexact store's residual output, or None.
            stored: the certificate's memory sums for exactly these rows (checked), or None: the pass sums them.
        """
        ctx = self.ctx
        acc, dev, scan = ctx.accumulate, ctx.device, req.scan
        compute = torch.bfloat16 if scan == "bf16" else acc
        stats = ctx.layer_stats(layer) if (req.per_example or req.mass) else None
        rank, _ = ctx.share()
        # a W_0 (+ b buf_0 when the store began with momentum buffers): what the memory does not hold
        w_base, b_base = layer.base_weights(coef=coef, with_residual=False)
        if stored is not None:  # the memory's sums from the certificate: the pass only ranks and sums scores
            w_base += stored[0]  # base_weights returns fresh arrays
            if b_base is not None:
                b_base += stored[1]
        qa = q.to(dev, acc)
        base = qa @ torch.from_numpy(w_base).to(dev, acc).t()
        if b_base is not None:
            base += torch.from_numpy(b_base).to(dev, acc)
        if rank != 0:
            base = torch.zeros_like(base)  # the ranks' duals are summed: the base term once
        state = AttentionAccumulator(
            queries=qa.to(compute),
            base=base,
            top_k=req.top_k,
            units=None if units is None else units.to(dev),
            n_examples=stats.n_examples if (req.per_example and stats) else 0,
            n_labels=stats.n_labels if (req.mass and stats) else 0,
            n_epochs=stats.n_epochs if (req.mass and stats) else 0,
            n_step_buckets=req.step_buckets if req.mass else 0,
            query_chunk=ctx.query_chunk,
            exact_queries=qa if scan == "bf16" else None,
            with_dual=scan != "bf16" and stored is None,
        )
        reader = _BlockReader(layer, coef, state, acc=acc, compute=compute, unit_score=req.score == "unit",
                              with_units=units is not None, step_buckets=req.step_buckets,
                              example_ids=stats.example_ids if stats is not None else None, device=dev)
        pf = Prefetcher(reader.make, n_rows, ctx.rows_per_block(layer), dev, share=ctx.share(), finish=reader.finish)
        bar = progress_bar(ctx.progress and rank == 0, n_rows, f"attend {layer.name}")
        ctx.moved_bytes = 0
        try:
            for blk in pf:
                if scan == "bf16":  # the scan's keys in bfloat16; the exact ones re-score its candidates
                    blk.exact_keys = blk.keys.to(acc)
                    blk.keys = blk.keys.to(compute)
                state.fold(blk)
                if bar is not None:
                    bar.update(blk.keys.shape[0])
        finally:
            pf.close()
            ctx.moved_bytes = pf.moved_bytes
            if bar is not None:
                bar.close()
        if ctx.group is not None:
            all_merge(state, ctx.group)
        dual = state.dual
        if scan == "bf16" and stored is None:
            dual = self._rebuilt(layer, q, coef)  # the scan's products are only good for ranking
        res = assemble.new_result(layer.name, at_step=coef.end_step, rows=n_rows, dual=dual, primal=primal,
                                  residual=residual, exact_store=bool(ctx.store.optimizer_exact and layer.exact),
                                  dual_source="certificate" if stored is not None else "rows", score=req.score)
        assemble.add_top(res, state, stats)
        if units is not None:
            assemble.add_contributions(res, state, stats, units)
        assemble.add_mass(res, state, first_step=coef.first_step, end_step=coef.end_step, step_buckets=req.step_buckets)
        return res

    def _rebuilt(self, layer: LayerSource, q: torch.Tensor, coef: Coefficients) -> torch.Tensor:
        ctx = self.ctx
        return rebuilt_output(layer, q, coef, dtype=ctx.accumulate, device=ctx.device,
                              block_rows=ctx.rows_per_block(layer))

    # -- the certificate's sums and the stored weights -------------------------------------------------------
    def _checked_sums(
        self, layer: LayerSource, coef: Coefficients, n_rows: int
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The certificate's stored sums, when they rebuild the stored final weights within the store's
        tolerance (checked once per layer: a few vector operations); otherwise None (the pass sums the rows)
        and a warning: sums that disagree with the weights must never shape an answer silently."""
        stored = layer.stored_memory_sums(coef.end_step, n_rows)
        if stored is None:
            return None
        key = (layer.name, coef.end_step, n_rows)
        checked = self.ctx.sums_checked
        if key not in checked:
            from lightning_dualform.attend.certificate import store_tolerance, sums_rebuild_error

            err = sums_rebuild_error(layer, coef, stored)
            tol = store_tolerance(self.ctx.store)
            checked[key] = bool(err <= tol)
            if not err <= tol:
                warnings.warn(
                    f"{self.ctx.path}: layer {layer.name!r}: the certificate's stored memory sums rebuild the final "
                    f"weights only to relative error {err:.2e} (tolerance {tol:.0e}): they are damaged. Answers sum "
                    "the rows instead; `lightning-dualform verify --write-certificate` writes them again.",
                    RuntimeWarning, stacklevel=4,
                )
        return stored if checked[key] else None

    def _warn_if_beyond_tolerance(self, res: AttentionResult) -> None:
        """``dual`` against the stored final weights' output: beyond the store's tolerance, say so."""
        if res.rel_err is None or not res.exact_store:
            return
        from lightning_dualform.attend.certificate import store_tolerance

        tol = store_tolerance(self.ctx.store)
        res.tolerance = tol
        err = overall_rel_err(res.dual, res.primal)
        if not err <= tol:  # NaN counts as beyond
            warnings.warn(
                f"{self.ctx.path}: layer {res.layer!r}: `dual` differs from the stored final weights' output by "
                f"{err:.2e} relative (over all queries; tolerance {tol:.0e}): the store does not rebuild its own final "
                f"weights. {beyond_tolerance_cause(self.ctx.store.layer(res.layer).certificate)}",
                RuntimeWarning, stacklevel=4,
            )


class _BlockReader:
    """What the prefetch thread does per block: read the rows, then prepare everything derived from them alone
    (coefficients per row, groups, packed metadata, the scaled values), so that the compute thread only
    multiplies and folds.

    (No numpy matrix product here, such as ``c_b @ values``: numpy's OpenBLAS threads spin for many milliseconds
    after each call and take a core from the compute thread's product: with it, ``K Q^T`` of net.0 took 1.04 s
    instead of 0.65 s. The fold computes it in torch.)
    """

    def __init__(self, layer: LayerSource, coef: Coefficients, state: AttentionAccumulator, *, acc: torch.dtype,
                 compute: torch.dtype, unit_score: bool, with_units: bool, step_buckets: int,
                 example_ids: np.ndarray | None, device: torch.device) -> None:
        self.layer = layer
        self.first, self.end = coef.first_step, coef.end_step
        self.c_w = coef.c_w.astype(np.float64)
        self.c_b = coef.c_b.astype(np.float64)
        self.np_acc = _NUMPY[acc]
        # None: keys stay as read (a bf16 scan casts them on the compute thread, and keeps them for re-scoring)
        self.keys_dtype = _NUMPY.get(compute)
        self.keys_torch = compute if compute in _NUMPY else None
        self.unit_score = unit_score
        self.with_units = with_units
        self.step_buckets = step_buckets
        self.example_ids = example_ids
        self.mass_offsets = state.mass_offsets
        # a convolution stored as maps: its blocks cross to the device as maps and are unfolded there
        self.geom = compact_geometry(layer, device)

    def make(self, start: int, stop: int) -> Block:
        """On the prefetch thread: rows ``start:stop`` as a :class:`Block` of host arrays (the prefetcher moves
        them to the device)."""
        np_acc = self.np_acc
        blk = read_block(self.layer, start, stop, ("keys", "values", *ROW_COLUMNS), compact=self.geom is not None)
        upd = blk["step"] - self.first
        on_device = isinstance(blk["values"], torch.Tensor)  # a device cache keeps keys and values there
        c_w = self.c_w[upd].astype(np_acc)
        # unit score -c_s (k . q): the key scaled by the step's (positive) step size; each row's c_w is then -1
        scale = -self.c_w[upd] if self.unit_score else None
        if self.unit_score:
            c_w = np.full_like(c_w, -1.0)
        keys: Any
        if self.geom is not None:  # unfolded, cast and scaled on the device by `finish`
            keys = CompactKeys(blk["maps"], blk["skip"], blk["rows"], dtype=self.keys_torch, scale=scale)
        else:
            keys = scaled(cast_rows(blk["keys"], self.keys_dtype) if self.keys_dtype else blk["keys"], scale)
        values = cast_rows(blk["values"], np_acc)
        c_b = self.c_b[upd].astype(np_acc)
        meta = {"row": np.arange(start, stop, dtype=np.int64)}
        for col in _META:
            meta[col] = blk[col].astype(np.int64, copy=False)
        label_group = blk["label"].astype(np.int64) + 1
        example = None
        if self.example_ids is not None:  # sparse indices: their dense column
            idx = meta["index"]
            example = np.where(idx >= 0, np.searchsorted(self.example_ids, idx), -1).astype(np.int64)
        span = max(self.end - self.first, 1)
        step_group = np.clip((meta["step"] - self.first) * self.step_buckets // span, 0, self.step_buckets - 1)
        coef_w = coef_b = None
        if not on_device:  # else the fold scales the values where they are
            coef_w = values * c_w[:, None]
            if self.with_units:
                coef_b = values * c_b[:, None]
        groups = None
        if self.mass_offsets:
            cols = {"label": label_group, "epoch": meta["epoch"], "step": step_group}
            groups = np.stack([cols[name] + off for name, off in self.mass_offsets.items()], axis=1)
        return Block(keys=keys, values=values, c_w=c_w, c_b=c_b, meta=meta, label_group=label_group,
                     step_group=step_group, coef_w=coef_w, coef_b=coef_b,
                     packed_meta=np.stack([meta[c] for c in META_COLUMNS], axis=1), groups=groups, example=example)

    def finish(self, blk: Block) -> Block:
        """On the prefetch thread, once the block is on the device: a compact block's key rows, as the host
        path makes them."""
        if isinstance(blk.keys, CompactKeys):
            blk.keys = blk.keys.unfold(self.geom)
        return blk


def _unit_parts(layer: LayerSource, q: torch.Tensor, coef: Coefficients, res: AttentionResult) -> None:
    """``unit_base`` and ``unit_output`` of a scalar store: ``(a W_0 q + a_b b_0 (+ residual))[u]`` and ``dual[u]``."""
    units = res.units
    w, b = layer.base_weights(coef=coef, with_residual=True)
    rows = torch.from_numpy(w)[units]  # (n, d_in)
    base = (q.detach().cpu().double() * rows).sum(1)
    if b is not None:
        base += torch.from_numpy(b)[units]
    res.unit_base = base
    res.unit_output = res.dual.double().gather(1, units[:, None]).squeeze(1)
