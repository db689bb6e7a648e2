"""``DualInference``: answer test-time queries by blocked attention over a store, on the GPU or the CPU.

The store holds every training key and value of each tracked layer; a layer's output for a query is

    dual(q) = a_w W_0 q + a_b b_0 + sum_rows (c_w[step] (k . q) + c_b[step]) v
    (plus ``b_w buf_0 q + b_b buf_0`` for a store that began at a checkpoint with momentum buffers)

This module streams the rows block by block (a prefetch thread reads block ``i + 1`` from HDF5, and on
CUDA copies it through pinned memory on a side stream, while block ``i`` is computed) and folds each
block into the running results of :class:`~lightning_dualform.attend.kernels.AttentionAccumulator`. Peak
memory is a few blocks plus the per-query results; the optional per-example sums add
``n_queries x n_examples`` numbers (twice with ``contribution_to``).

The pass's pieces live beside it: :mod:`.arguments` (argument checks), :mod:`.blocks` (block sizes and the
prefetch thread), :mod:`.stats` (per-layer table widths), :mod:`.results` (the result types),
:mod:`.explain` and :mod:`.verify`; an element-wise rule's pass is :mod:`.unit_pass`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lightning_dualform._args import as_int
from lightning_dualform._float32_products import full_float32_products
from lightning_dualform.attend import explain as _explain
from lightning_dualform.attend import verify as _verify
from lightning_dualform.attend.arguments import check_queries, resolve_device, resolve_group
from lightning_dualform.attend.blocks import (
    BLOCK_BYTES, SCORE_BYTES, Prefetcher, compact_geometry, progress_bar, read_block, unfold_block,
)
from lightning_dualform.attend.cache import BlockCache, CachedLayer, CacheInfo, CacheSpec, StoreStamp, cast_rows, resolve_budget
from lightning_dualform.attend.kernels import META_COLUMNS, AttentionAccumulator, Block, step_bucket_edges
from lightning_dualform.attend.memory import memory_sums, rebuilt_weights
# the result types and their helpers live in results.py; importable from here as before
from lightning_dualform.attend.results import (  # noqa: F401
    AttentionResult, Explanation, Mass, TopExamples, TopRows, _fused_topk_rows, _norm_rows, _rel_rows, _top_examples,
    _top_rows, overall_rel_err,
)
from lightning_dualform.attend.stats import LayerStats, layer_stats
from lightning_dualform.store.format import ROW_COLUMNS
from lightning_dualform.store.reader import LayerReader
from lightning_dualform.store.shards import open_store

log = logging.getLogger(__name__)

#: step buckets allowed beyond one per step (the mass tables are ``n x step_buckets``)
MAX_STEP_BUCKETS = 1024
_ACCUMULATE = (torch.float32, torch.float64)
_SCANS = ("exact", "bf16")
#: ``attend(score=...)``: what ``top``, ``top_examples`` and ``mass`` rank and sum. ``"raw"``: the paper's
#: similarity ``k . q``; ``"unit"``: the attention weight of the row for the query's output unit ``u``,
#: ``-(Q_s[u, :] (.) k) . q`` (``-c_s (k . q)`` for SGD's scalar ``Q_s = c_s``); ``"auto"``: ``"unit"`` for a store
#: of an element-wise rule (Adam, AdamW, ...), ``"raw"`` otherwise.
SCORES = ("auto", "raw", "unit")
_TORCH = {np.float64: torch.float64, np.float32: torch.float32}


# ------------------------------------------------------------------------------------------------------
# the front door
# ------------------------------------------------------------------------------------------------------
class DualInference:
    """Open a store and answer queries over its memory.

    Args:
        path: a store written by :class:`~lightning_dualform.DualFormCallback`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``; ``None`` picks CUDA when available.
        block_rows: memory rows read and multiplied at a time; ``None`` (default) sizes blocks per layer
            to about 96 MiB of keys and values and at most 256 MiB of scores per query chunk (4,096 to
            65,536 rows; large blocks keep the products
            efficient: 1.53x the bare products at 16,384 rows against 1.92x at 4,096 on a 2-core CPU).
            Peak memory grows with it (``block_rows x (d_in + d_out)`` numbers, a few times over for
            prefetching, plus ``min(n, query_chunk) x block_rows`` work buffers).
        accumulate: ``torch.float32`` (default) or ``torch.float64`` for the scores and the sums.
        query_chunk: queries processed together against one block.
        progress: show a tqdm bar per pass.
        distributed: split each :meth:`attend` pass over the processes of a ``torch.distributed`` group:
            ``True`` for the default group, or a process group. Every rank must call ``attend`` with the same
            arguments and queries; each reads and multiplies a contiguous share of the blocks, then the sums
            (outputs, per-example sums, masses) are all-reduced and the top-k candidates all-gathered and
            merged, so every rank returns the same full result. The group's backend must handle tensors on
            ``device`` (gloo for the CPU, nccl for CUDA).
        cache: keep the decoded blocks that passes read, so that a repeated pass over a layer reads nothing
            from disk: a budget in bytes, ``"auto"`` (half of the memory available now: the host's, or the
            free memory of the CUDA device, where the keys and values are then kept), or ``None`` (default:
            nothing kept, memory bounded by the block size). Least recently used blocks go first; answers
            are the same bit for bit. Before each pass the store's files are compared with what they were
            when the cache was filled; a store changed on disk since (a resume, a writer) is opened again and
            the cache emptied. :meth:`cache_info` says what is kept.

    Raises:
        StoreError: the file is missing, not a store, of a newer format, or damaged.
        ValueError: a bad argument, or a device that is not there.

    Example::

        with DualInference("runs/mnist.h5") as di:
            res = di.attend("net.2", queries, top_k=10, contribution_to="pred")
            res.top.index      # (n, 10) dataset indices of the most attended training patterns
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        block_rows: int | None = None,
        accumulate: torch.dtype = torch.float32,
        query_chunk: int = 2048,
        progress: bool = False,
        distributed: bool | Any = False,
        cache: CacheSpec = None,
    ) -> None:
        if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
            raise ValueError(f"`DualInference(block_rows={block_rows!r})` must be None or a positive integer.")
        if isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
            raise ValueError(f"`DualInference(query_chunk={query_chunk!r})` must be a positive integer.")
        if accumulate not in _ACCUMULATE:
            raise ValueError(f"`DualInference(accumulate={accumulate!r})` is not supported. Expected torch.float32 or torch.float64.")
        self.device = resolve_device(device)
        self.block_rows = block_rows
        self.accumulate = accumulate
        self.query_chunk = query_chunk
        self.progress = progress
        self._group = resolve_group(distributed)
        budget = resolve_budget(cache, self.device)
        self._open_path = os.fspath(path)
        self.store = open_store(path)  # a store, or the shards of a DDP run
        self.path = self.store.path
        self._stats: dict[str, LayerStats] = {}
        self._last_pass_bytes = 0  # bytes of host arrays the last attend pass handed to the device
        self._sums_checked: dict[tuple, bool] = {}
        self._cache = BlockCache(budget, self.device) if budget is not None else None
        self._cached: dict[str, CachedLayer] = {}
        self._stamp = StoreStamp.of(self.store) if self._cache is not None else None
        if not self.store.complete:
            warnings.warn(
                f"{self.path} is an incomplete store (status {self.store.status!r}: still being written, or its "
                f"training stopped early). Answers cover the model after step {self.store.last_step}, the last "
                "durable step; the real final weights are not stored, so `primal` and `rel_err` are None.",
                stacklevel=2,
            )

    @property
    def complete(self) -> bool:
        """Whether the store was finished by a completed fit (else it ends at :attr:`last_step`)."""
        return self.store.complete

    @property
    def last_step(self) -> int:
        """The latest model the store can rebuild: the one after this many optimizer steps."""
        return self.store.last_step

    def _share(self) -> tuple[int, int]:
        """``(rank, world size)`` of this process's share of the blocks."""
        if self._group is None:
            return 0, 1
        import torch.distributed as dist

        group = None if self._group is True else self._group
        return dist.get_rank(group), dist.get_world_size(group)

    # -- context management ----------------------------------------------------------------------------
    def close(self) -> None:
        self._closed = True
        self.store.close()
        if self._cache is not None:
            self._cache.clear()
        self._cached.clear()

    # -- cache -----------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """With a cache: open the store again and empty the cache when its files changed since they were
        read (a resume rewrote it, a writer appended, it was replaced). Returns whether it did. :meth:`attend`
        calls it first; without a cache it does nothing (returns False).

        Raises:
            StoreError: the changed file is no longer a readable store.
        """
        self._check_open()
        if self._cache is None or StoreStamp.of(self.store) == self._stamp:
            return False
        log.warning("%s changed on disk since it was opened; reading it again (the cache is emptied).", self.path)
        self.store.close()
        self._cache.clear()
        self._cached.clear()
        self._stats.clear()
        self._sums_checked.clear()
        self._stamp = StoreStamp.of(self.store)  # before opening: a write meanwhile is seen next time
        self.store = open_store(self._open_path)
        self.path = self.store.path
        return True

    def cache_info(self) -> CacheInfo | None:
        """What the cache holds (budget and bytes, per layer, hits and misses), or None without a cache."""
        if self._cache is None:
            return None
        info = self._cache.info()
        info.facts_bytes = sum(c.facts_bytes for c in self._cached.values())
        return info

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):  # (not a damaged store: its file was closed on purpose)
            raise RuntimeError(f"this DualInference of {self.path} is closed; open the store again with "
                               "DualInference(path) (or keep using it inside its `with` block).")

    def __enter__(self) -> "DualInference":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        cached = "" if self._cache is None else f", cache={self.cache_info()}"
        return f"DualInference({self.path!r}, device={str(self.device)!r}, layers={self.layers}{cached})"

    @property
    def layers(self) -> list[str]:
        """Tracked layer names, in model order."""
        return self.store.layers

    def layer(self, name: str) -> LayerReader:
        """The store's reader of a layer. Raises ``KeyError`` listing the known layers."""
        self._check_open()
        if not isinstance(name, str):
            raise TypeError(f"layer must be a layer name (str), got {type(name).__name__}; this store has {self.layers}.")
        lay = self.store.layer(name)
        if self._cache is None:
            return lay
        if name not in self._cached:
            self._cached[name] = CachedLayer(lay, self._cache)
        return self._cached[name]

    # -- attend ----------------------------------------------------------------------------------------
    def attend(
        self,
        layer: str,
        queries: torch.Tensor | np.ndarray,
        top_k: int = 10,
        *,
        at_step: int | None = None,
        contribution_to: str | int | torch.Tensor | None = "auto",
        per_example: bool = True,
        mass: bool = True,
        step_buckets: int = 10,
        scan: str = "exact",
        reuse_certificate: bool = True,
        score: str = "auto",
    ) -> AttentionResult:
        """Attend ``queries`` over the memory of ``layer`` in one streamed pass.

        Args:
            layer: a name from :attr:`layers`.
            queries: ``(n, d_in)`` (or ``(d_in,)``) inputs of that layer.
            top_k: rows (and examples) kept per query; 0 for none.
            at_step: rebuild the model as it was after this many optimizer steps (default: the end).
            contribution_to: rank proponents/opponents by contribution to an output unit: ``"pred"`` (the
                argmax of the layer's output, e.g. a classifier's predicted logit), an ``int`` unit for every
                query, or a ``(n,)`` LongTensor of units; ``None`` skips them. ``"auto"`` (default): ``"pred"``
                for a store of an element-wise rule (its rows' attention weights depend on the unit), ``None``
                otherwise. For a hidden layer, name the unit you want explained (``docs/inference.md``).
            per_example: also sum scores (and contributions) per training example. Costs
                ``n x n_examples`` numbers of memory (twice with ``contribution_to``).
            mass: compute the attention mass per label, epoch and step bucket.
            step_buckets: number of equal-width step buckets of the mass.
            scan: ``"exact"``, or ``"bf16"`` to compute scores in bfloat16 for ranking: every row within the
                bfloat16 rounding bound of the running k-th best score is re-scored exactly, so ``top`` is the
                exact top-k; ``dual`` is exact (from the certificate's sums, or rebuilt from the rows in a
                second pass); mass, per-example sums and proponents/opponents carry bfloat16 error (about 1e-2
                relative). The bfloat16 products are several times faster on CPUs with AMX and on GPUs, but
                on a 2-core AMX CPU the whole scan is not: ranking alone runs about as fast as ``"exact"``,
                with the sums at about 0.55x (``docs/benchmarks.md``); prefer ``"exact"`` there.
            reuse_certificate: for the model at the end of a finished store, take ``dual``'s memory part
                ``sum_rows c v k^T`` from the sums the certificate computed from these rows at fit end (kept
                in the file) instead of computing it again in this pass (half of the pass's products when
                ``d_in`` is large). ``False`` computes it from the rows, as :meth:`verify` does.
                :attr:`AttentionResult.dual_source` says which was used.
            score: what ``top``, ``top_examples`` and ``mass`` rank: ``"raw"`` (the paper's ``k . q``), ``"unit"``
                (each row's attention weight for the query's unit, ``-(Q_s[u, :] (.) k) . q``; needs
                ``contribution_to``), or ``"auto"`` (``"unit"`` for an element-wise rule's store, ``"raw"``
                otherwise, so SGD stores answer as before). :attr:`AttentionResult.score` says which was used.

        Raises:
            KeyError: unknown layer (the message lists the known ones).
            ValueError: queries of the wrong shape or with NaN/inf, ``top_k`` larger than the memory, a bad
                ``at_step``, ``contribution_to`` or ``scan``.
            StoreError: a damaged file (including damaged certificate sums: their shape, type or values).
        """
        self.refresh()
        lay = self.layer(layer)
        q = self._check_queries(lay, queries, "attend")
        top_k = as_int(top_k, "attend(top_k=...)", lo=0, allowed="a non-negative integer")
        if scan not in _SCANS:
            raise ValueError(f"`attend(scan={scan!r})` is not supported. Expected one of {_SCANS}.")
        step_buckets = as_int(step_buckets, "attend(step_buckets=...)", lo=1, allowed="a positive integer")
        if at_step is not None:
            at_step = as_int(at_step, "attend(at_step=...)", allowed="None or an integer optimizer step")
        if score not in SCORES:
            raise ValueError(f"`attend(score={score!r})` is not supported. Expected one of {SCORES}.")
        elementwise = self.store.form == "element-wise"
        if score == "auto":
            score = "unit" if elementwise else "raw"
        if isinstance(contribution_to, str) and contribution_to == "auto":
            contribution_to = "pred" if elementwise else None
        if elementwise:
            if scan != "exact":
                raise ValueError(f"`attend(scan={scan!r})`: a store of an element-wise rule ({self.store.update_rule}) is scanned exactly only.")
            from lightning_dualform.attend.unit_pass import elementwise_attend

            with full_float32_products():
                return elementwise_attend(self, lay, q, at_step=at_step, top_k=top_k, contribution_to=contribution_to,
                                          per_example=per_example, mass=mass, step_buckets=step_buckets, score=score,
                                          reuse_certificate=reuse_certificate)
        if score == "unit" and contribution_to is None:
            contribution_to = "pred"  # SGD's unit score does not depend on the unit; its contributions do
        coef = lay.coefficients(at_step)
        span = coef.end_step - coef.first_step
        if step_buckets > max(MAX_STEP_BUCKETS, span):
            raise ValueError(
                f"`attend(step_buckets={step_buckets})` asks for more buckets than steps: the model after step "
                f"{coef.end_step} has {span} steps; use at most {max(MAX_STEP_BUCKETS, span)}."
            )
        n_rows = lay.rows_before(coef.end_step)
        if top_k > n_rows:
            raise ValueError(
                f"`attend(top_k={top_k})` is larger than the memory of layer {layer!r}: it holds {n_rows} rows "
                f"up to step {coef.end_step}. Use top_k <= {n_rows}."
            )
        # every product of the answer (primal, the pass, a rebuilt dual) in full float32, whatever the user
        # allowed for training (TF32, bf16 inside float32 products); the bf16 scan's bound needs float32 sums
        with full_float32_products():
            res = self._attend(lay, q, coef, n_rows, top_k, at_step, contribution_to, per_example, mass, step_buckets,
                               scan, reuse_certificate, score)
            if res.units is not None:
                self._unit_parts(lay, q, coef, res)
            return res

    def _unit_parts(self, lay: LayerReader, q: torch.Tensor, coef: Any, res: AttentionResult) -> None:
        """``unit_base`` and ``unit_output`` of a scalar store: ``(a W_0 q + a_b b_0 (+ residual))[u]`` and ``dual[u]``."""
        units = res.units
        w, b = lay.base_weights(coef=coef, with_residual=True)
        rows = torch.from_numpy(w)[units]  # (n, d_in)
        base = (q.detach().cpu().double() * rows).sum(1)
        if b is not None:
            base += torch.from_numpy(b)[units]
        res.unit_base = base
        res.unit_output = res.dual.double().gather(1, units[:, None]).squeeze(1)

    def _attend(
        self, lay: LayerReader, q: torch.Tensor, coef: Any, n_rows: int, top_k: int, at_step: int | None,
        contribution_to: Any, per_example: bool, mass: bool, step_buckets: int, scan: str, reuse_certificate: bool,
        score: str = "raw",
    ) -> AttentionResult:
        final = coef.end_step == self.store.last_step
        primal = self._primal(lay, q) if final else None
        residual = self._residual(lay, q) if final and not self.store.optimizer_exact else None
        if not self.store.optimizer_exact and not final:
            log.warning(
                "%s: the store is inexact and keeps the residual only for the final weights; at_step=%s answers "
                "from the memory alone.", self.path, at_step,
            )
        units = self._units(lay, q, contribution_to, primal, coef, residual)
        stored = self._checked_sums(lay, coef, n_rows) if reuse_certificate else None
        res = self._pass(lay, q, coef, n_rows, top_k, units, per_example, mass, step_buckets, scan, primal, residual,
                         stored, unit_score=score == "unit")
        res.score = score
        self._warn_if_beyond_tolerance(res)
        return res

    def _checked_sums(self, lay: LayerReader, coef: Any, n_rows: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The certificate's stored sums, when they rebuild the stored final weights within the store's
        tolerance (checked once per layer: a few vector operations); otherwise None (the pass sums the rows)
        and a warning: sums that disagree with the weights must never shape an answer silently."""
        stored = lay.stored_memory_sums(coef.end_step, n_rows)
        if stored is None:
            return None
        key = (lay.name, coef.end_step, n_rows)
        if key not in self._sums_checked:
            from lightning_dualform.attend.certificate import store_tolerance, sums_rebuild_error

            err = sums_rebuild_error(lay, coef, stored)
            tol = store_tolerance(self.store)
            self._sums_checked[key] = bool(err <= tol)
            if not err <= tol:
                warnings.warn(
                    f"{self.path}: layer {lay.name!r}: the certificate's stored memory sums rebuild the final weights "
                    f"only to relative error {err:.2e} (tolerance {tol:.0e}): they are damaged. Answers sum the rows "
                    "instead; `lightning-dualform verify --write-certificate` writes them again.",
                    RuntimeWarning, stacklevel=4,
                )
        return stored if self._sums_checked[key] else None

    def _warn_if_beyond_tolerance(self, res: AttentionResult) -> None:
        """``dual`` against the stored final weights' output: beyond the store's tolerance, say so."""
        if res.rel_err is None or not res.exact_store:
            return
        from lightning_dualform.attend.certificate import store_tolerance

        tol = store_tolerance(self.store)
        err = overall_rel_err(res.dual, res.primal)
        if not err <= tol:  # NaN counts as beyond
            warnings.warn(
                f"{self.path}: layer {res.layer!r}: `dual` differs from the stored final weights' output by {err:.2e} "
                f"relative (over all queries; tolerance {tol:.0e}): the store does not rebuild its own final weights. "
                "It is damaged or was rewritten; run `lightning-dualform verify` on it.",
                RuntimeWarning, stacklevel=4,
            )

    def _pass(
        self, lay: LayerReader, q: torch.Tensor, coef: Any, n_rows: int, top_k: int, units: torch.Tensor | None,
        per_example: bool, mass: bool, step_buckets: int, scan: str, primal: torch.Tensor | None,
        residual: torch.Tensor | None, stored: tuple[np.ndarray, np.ndarray | None] | None = None,
        unit_score: bool = False,
    ) -> AttentionResult:
        acc = self.accumulate
        dev = self.device
        compute = torch.bfloat16 if scan == "bf16" else acc
        stats = self._layer_stats(lay) if (per_example or mass) else None
        # a W_0 (+ b buf_0 when the store began with momentum buffers): what the memory does not hold
        w_base, b_base = lay.base_weights(coef=coef, with_residual=False)
        if stored is not None:  # the memory's sums from the certificate: the pass only ranks and sums scores
            w_base += stored[0]  # base_weights returns fresh arrays
            if b_base is not None:
                b_base += stored[1]
        qa = q.to(dev, acc)
        base = qa @ torch.from_numpy(w_base).to(dev, acc).t()
        if b_base is not None:
            base += torch.from_numpy(b_base).to(dev, acc)
        if self._share()[0] != 0:
            base = torch.zeros_like(base)  # the ranks' duals are summed: the base term once
        state = AttentionAccumulator(
            queries=qa.to(compute),
            base=base,
            top_k=top_k,
            units=None if units is None else units.to(dev),
            n_examples=stats.n_examples if (per_example and stats) else 0,
            n_labels=stats.n_labels if (mass and stats) else 0,
            n_epochs=stats.n_epochs if (mass and stats) else 0,
            n_step_buckets=step_buckets if mass else 0,
            query_chunk=self.query_chunk,
            exact_queries=qa if scan == "bf16" else None,
            with_dual=scan != "bf16" and stored is None,
        )
        c_w = coef.c_w.astype(np.float64)
        c_b = coef.c_b.astype(np.float64)
        np_acc = np.float64 if acc == torch.float64 else np.float32
        keys_dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(compute)

        # a convolution stored as maps: its blocks cross to the device as maps and are unfolded there
        geom = compact_geometry(lay, dev)

        def make(start: int, stop: int) -> dict[str, Any]:
            blk = read_block(lay, start, stop, ("keys", "values", *ROW_COLUMNS), compact=geom is not None)
            upd = blk["step"] - coef.first_step
            on_device = isinstance(blk["values"], torch.Tensor)  # a device cache keeps keys and values there
            cw = c_w[upd].astype(np_acc)
            # unit score -c_s (k . q): the key scaled by the step's (positive) step size; each row's c_w is then -1
            scale = -c_w[upd] if unit_score else None
            if unit_score:
                cw = np.full_like(cw, -1.0)
            if geom is not None:  # keys unfolded and scaled by `unfold` on the device
                keys: dict[str, Any] = {"maps": blk["maps"], "skip": blk["skip"], "rows": blk["rows"]}
                if scale is not None:
                    keys["key_scale"] = scale
            else:
                keys = {"keys": _scaled(cast_rows(blk["keys"], keys_dtype) if keys_dtype else blk["keys"], scale)}
            out = {
                **keys,
                "values": cast_rows(blk["values"], np_acc),
                "c_w": cw,
                "c_b": c_b[upd].astype(np_acc),
                "row": np.arange(start, stop, dtype=np.int64),
                "label_group": blk["label"].astype(np.int64) + 1,
            }
            for col in ("step", "epoch", "index", "position", "label"):
                out[col] = blk[col].astype(np.int64, copy=False)
            if stats is not None and stats.example_ids is not None:  # sparse indices: their dense column
                idx = out["index"]
                out["example"] = np.where(idx >= 0, np.searchsorted(stats.example_ids, idx), -1).astype(np.int64)
            # Everything derived from the rows alone is prepared here, on the reader thread, so that the
            # compute thread only multiplies and folds (every small op there waits for the GIL).
            span = max(coef.end_step - coef.first_step, 1)
            out["step_group"] = np.clip((out["step"] - coef.first_step) * step_buckets // span, 0, step_buckets - 1)
            # (no numpy matrix product here, such as c_b @ values: numpy's OpenBLAS threads spin for many
            # milliseconds after each call and take a core from the compute thread's product: with it, K Q^T
            # of net.0 took 1.04 s instead of 0.65 s. The fold computes it in torch.)
            if not on_device:  # else the fold scales the values where they are
                out["coef_w"] = out["values"] * out["c_w"][:, None]
                if units is not None:
                    out["coef_b"] = out["values"] * out["c_b"][:, None]
            out["packed_meta"] = np.stack([out[c] for c in META_COLUMNS], axis=1)
            if state.mass_offsets:
                cols = {"label": out["label_group"], "epoch": out["epoch"], "step": out["step_group"]}
                out["groups"] = np.stack([cols[name] + off for name, off in state.mass_offsets.items()], axis=1)
            return out

        def unfold(blk: dict[str, Any]) -> dict[str, Any]:
            """On the prefetch thread, once the block is on the device: a compact block's key rows, as the host
            path makes them (float32 unfolded, cast, scaled)."""
            if "maps" in blk:
                keys = unfold_block(blk, geom)
                blk["keys"] = _scaled(keys.to(_TORCH[keys_dtype]) if keys_dtype else keys, blk.pop("key_scale", None))
                del blk["maps"]
            return blk

        pf = Prefetcher(make, n_rows, self.rows_per_block(lay), dev, share=self._share(), finish=unfold)
        bar = progress_bar(self.progress and self._share()[0] == 0, n_rows, f"attend {lay.name}")
        self._last_pass_bytes = 0  # host -> compute device (a benchmark's figure)
        try:
            for blk in pf:
                keys = blk["keys"] if keys_dtype else blk["keys"].to(compute)
                exact_keys = blk["keys"].to(acc) if scan == "bf16" else None
                meta = {col: blk[col] for col in META_COLUMNS}
                state.fold(
                    Block(
                        keys=keys,
                        values=blk["values"],
                        c_w=blk["c_w"],
                        c_b=blk["c_b"],
                        meta=meta,
                        label_group=blk["label_group"],
                        step_group=blk["step_group"],
                        exact_keys=exact_keys,
                        coef_w=blk.get("coef_w"),
                        coef_b=blk.get("coef_b"),
                        packed_meta=blk["packed_meta"],
                        groups=blk.get("groups"),
                        example=blk.get("example"),
                    )
                )
                if bar is not None:
                    bar.update(len(blk["row"]))
        finally:
            pf.close()
            self._last_pass_bytes = pf.moved_bytes
            if bar is not None:
                bar.close()
        if self._group is not None:
            _all_merge(state, self._group)
        return self._result(lay, coef, n_rows, state, stats, units, primal, residual, step_buckets, q, scan,
                            stored is not None)

    def _result(
        self, lay: LayerReader, coef: Any, n_rows: int, state: AttentionAccumulator, stats: LayerStats | None,
        units: torch.Tensor | None, primal: torch.Tensor | None, residual: torch.Tensor | None, step_buckets: int,
        q: torch.Tensor, scan: str, from_certificate: bool = False,
    ) -> AttentionResult:
        cpu = torch.device("cpu")
        dual = state.dual
        if scan == "bf16" and not from_certificate:
            dual = self._exact_dual(lay, q, coef)  # the scan's products are only good for ranking
        if residual is not None:
            dual = dual + residual.to(dual)
        res = AttentionResult(layer=lay.name, at_step=coef.end_step, rows=n_rows, dual=dual.to(cpu),
                              exact_store=bool(self.store.optimizer_exact and lay.exact),
                              dual_source="certificate" if from_certificate else "rows")
        if primal is not None:
            res.primal = primal.to(cpu, dual.dtype)
            res.rel_err = _rel_rows(res.dual, res.primal)
        if residual is not None:
            ref = res.primal if res.primal is not None else res.dual
            res.explained = (1 - _norm_rows(residual.to(cpu, ref.dtype)) / _norm_rows(ref).clamp_min(1e-30)).clamp_min(0)
        top = state.top_rows()
        if top is not None:
            res.top = _top_rows(top)
        if units is not None:
            res.units = units.to(cpu)
            if state.top_k:
                res.proponents = _top_rows(state.proponents(), sign=1)
                res.opponents = _top_rows(state.opponents(), sign=-1)
        if state.example_score is not None and stats is not None and state.top_k:
            present = state.example_rows > 0
            ex_label = torch.from_numpy(stats.example_label).to(present.device)
            ids = stats.example_ids
            res.top_examples = _top_examples(state.example_score, present, state.example_rows, ex_label, state.top_k, 0, ids)
            if state.example_contrib is not None:
                res.proponent_examples = _top_examples(state.example_contrib, present, state.example_rows, ex_label, state.top_k, 1, ids)
                res.opponent_examples = _top_examples(state.example_contrib, present, state.example_rows, ex_label, state.top_k, -1, ids)
        for name, (signed, absolute) in state.mass.items():
            if name == "label":
                keys = torch.arange(-1, signed.shape[1] - 1)
                edges = None
            elif name == "epoch":
                keys = torch.arange(signed.shape[1])
                edges = None
            else:
                edges = step_bucket_edges(coef.first_step, coef.end_step, step_buckets)
                keys = torch.tensor(edges[:-1])
            res.mass[name] = Mass(keys=keys, signed=signed.to(cpu).contiguous(), absolute=absolute.to(cpu).contiguous(), edges=edges)
        return res

    def rows_per_block(self, lay: LayerReader) -> int:
        """The block size of passes over ``lay``: ``block_rows``, or the automatic size for its widths."""
        if self.block_rows is not None:
            return self.block_rows
        rows = 2 ** round(math.log2(BLOCK_BYTES / (4 * (lay.d_in + lay.d_out))))
        # the (block, query_chunk) score buffer stays within SCORE_BYTES as well (small GPUs, float64)
        itemsize = torch.empty(0, dtype=self.accumulate).element_size()
        rows = min(rows, 2 ** int(math.log2(max(1, SCORE_BYTES // (itemsize * self.query_chunk)))))
        return int(min(65536, max(4096, rows)))

    # -- pieces of a pass ------------------------------------------------------------------------------
    def _primal(self, lay: LayerReader, q: torch.Tensor) -> torch.Tensor | None:
        """The stored final weights applied to the queries (None while a store is incomplete)."""
        return self._apply(lay.weight_final, lay.bias_final, q)

    def _residual(self, lay: LayerReader, q: torch.Tensor) -> torch.Tensor | None:
        """What the memory does not explain, for a store recorded with ``exact=False``."""
        return self._apply(lay.weight_residual, lay.bias_residual, q)

    def _apply(self, w: np.ndarray | None, b: np.ndarray | None, q: torch.Tensor) -> torch.Tensor | None:
        """``q W^T + b`` in the accumulation dtype, or None without ``w``."""
        if w is None:
            return None
        acc, dev = self.accumulate, self.device
        out = q.to(dev, acc) @ torch.from_numpy(w).to(dev, acc).t()
        if b is not None:
            out += torch.from_numpy(b).to(dev, acc)
        return out

    def _exact_dual(self, lay: LayerReader, q: torch.Tensor, coef: Any) -> torch.Tensor:
        """``W q + b`` with ``W, b`` rebuilt from the memory in the accumulation dtype (one more streamed pass,
        ``B x d_in x d_out`` per block instead of ``n x B x (d_in + d_out)``)."""
        acc, dev = self.accumulate, self.device

        compact = compact_geometry(lay, dev) is not None  # a convolution's maps: summed as a weight gradient

        def make(start: int, stop: int) -> dict[str, Any]:
            return read_block(lay, start, stop, ("keys", "values", "step"), compact)

        pf = Prefetcher(make, lay.rows_before(coef.end_step), self.rows_per_block(lay), dev)
        try:
            w, b = rebuilt_weights(lay, coef, *memory_sums(lay, coef, dtype=acc, device=dev, blocks=pf))
        finally:
            pf.close()
        out = q.to(dev, acc) @ w.t()
        return out + b if b is not None else out

    def _units(
        self, lay: LayerReader, q: torch.Tensor, contribution_to: Any, primal: torch.Tensor | None, coef: Any,
        residual: torch.Tensor | None,
    ) -> torch.Tensor | None:
        n = q.shape[0]
        if contribution_to is None:
            return None
        if isinstance(contribution_to, str):
            if contribution_to != "pred":
                raise ValueError(f"`attend(contribution_to={contribution_to!r})`: expected None, 'pred', an int unit or a (n,) LongTensor.")
            if primal is None:  # an earlier step, or no final weights: the prediction needs a dual pass first
                out = self._exact_dual(lay, q, coef)
                if residual is not None:
                    out = out + residual
            else:
                out = primal
            return out.argmax(dim=1).to(torch.int64)
        if isinstance(contribution_to, (bool, np.bool_)):
            raise TypeError("`attend(contribution_to=...)` must not be a bool.")
        if isinstance(contribution_to, (int, np.integer)) or (
            isinstance(contribution_to, torch.Tensor) and contribution_to.dim() == 0 and not contribution_to.is_floating_point()
        ):
            unit = as_int(contribution_to, "attend(contribution_to=...)", allowed="None, 'pred', an int unit or a (n,) LongTensor")
            units = torch.full((n,), unit, dtype=torch.int64)
        elif isinstance(contribution_to, (float, np.floating)):
            raise TypeError(f"`attend(contribution_to={contribution_to!r})`: a unit number must be an integer, not a float.")
        elif isinstance(contribution_to, (torch.Tensor, np.ndarray, list, tuple)):
            units = torch.as_tensor(contribution_to)
            if units.is_floating_point() or units.dtype == torch.bool or units.dim() != 1 or units.shape[0] != n:
                raise ValueError(
                    f"`attend(contribution_to=...)` as a tensor must be an integer tensor of shape ({n},), one unit per "
                    f"query; got {tuple(units.shape)} {units.dtype}."
                )
            units = units.to(torch.int64)
        else:
            raise TypeError(f"`attend(contribution_to={contribution_to!r})`: expected None, 'pred', an int or a (n,) LongTensor.")
        if bool(((units < 0) | (units >= lay.d_out)).any()):
            raise ValueError(
                f"`attend(contribution_to=...)`: output units must lie in 0..{lay.d_out - 1} (layer {lay.name!r} has "
                f"{lay.d_out} outputs); got {sorted(set(units.tolist()))[:10]}."
            )
        return units

    def _check_queries(self, lay: LayerReader, queries: Any, call: str) -> torch.Tensor:
        return check_queries(lay, queries, call)

    def _layer_stats(self, lay: LayerReader) -> LayerStats:
        """The layer's :class:`~lightning_dualform.attend.stats.LayerStats`, gathered once per layer."""
        if self._stats.get(lay.name) is None:
            self._stats[lay.name] = layer_stats(lay)
        return self._stats[lay.name]

    # -- explain and verify ----------------------------------------------------------------------------
    def explain(
        self,
        model: nn.Module,
        batch: Any,
        *,
        top_k: int = 10,
        layers: Sequence[str] | None = None,
        contribution_to: str | int | torch.Tensor | None = "pred",
        forward: Callable[[nn.Module, Any], Any] | None = None,
        **attend_kwargs: Any,
    ) -> Explanation:
        return _explain.explain(self, model, batch, top_k=top_k, layers=layers, contribution_to=contribution_to,
                                forward=forward, **attend_kwargs)

    explain.__doc__ = _explain.explain.__doc__

    def influence(self, model: nn.Module, inputs: Any, targets: Any = None, **kwargs: Any) -> Any:
        """Influence of every training example on each query (``lightning_dualform.attribute.influence``; its
        ``target=`` defaults to the prediction's margin and ``method=`` to ``"first_order"``)."""
        from lightning_dualform.attribute import influence

        return influence(self.store, model, inputs, targets, **kwargs)

    def stored_sums_error(self, layer: str) -> float | None:
        return _verify.stored_sums_error(self, layer)

    stored_sums_error.__doc__ = _verify.stored_sums_error.__doc__

    def verify(self, queries: dict[str, torch.Tensor] | None = None, *, n_samples: int = 256, seed: int = 0) -> dict[str, float]:
        return _verify.verify(self, queries, n_samples=n_samples, seed=seed)

    verify.__doc__ = _verify.verify.__doc__


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def _scaled(keys: Any, scale: np.ndarray | None) -> Any:
    """Key rows (numpy or a tensor) times a per-row ``scale`` ``(B,)`` cast to their dtype first; ``keys`` without."""
    if scale is None:
        return keys
    if isinstance(keys, torch.Tensor):
        return keys * torch.as_tensor(scale).to(keys.device, keys.dtype)[:, None]
    return keys * scale.astype(keys.dtype)[:, None]


def _all_merge(state: AttentionAccumulator, group: Any) -> None:
    """Sum and merge the ranks' partial results: afterwards every rank holds the full result."""
    import torch.distributed as dist

    grp = None if group is True else group
    world = dist.get_world_size(grp)

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t, group=grp)

    def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous(), group=grp)
        return out

    state.reduce(all_reduce, all_gather)

