"""``DualInference``: answer test-time queries by blocked attention over a store, on the GPU or the CPU.

The store holds every training key and value of each tracked layer; a layer's output for a query is

    dual(q) = a_w W_0 q + a_b b_0 + sum_rows (c_w[step] (k . q) + c_b[step]) v
    (plus ``b_w buf_0 q + b_b buf_0`` for a store that began at a checkpoint with momentum buffers)

This module streams the rows block by block (a prefetch thread reads block ``i + 1`` from HDF5, and on
CUDA copies it through pinned memory on a side stream, while block ``i`` is computed) and folds each
block into the running results of :class:`~lightning_dualform.attend.kernels.AttentionAccumulator`. Peak
memory is a few blocks plus the per-query results; the optional per-example sums add
``n_queries x n_examples`` numbers (twice with ``contribution_to``).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from lightning_dualform._args import as_int
from lightning_dualform.attend import _fused
from lightning_dualform.attend.cache import (
    BlockCache, CachedLayer, CacheInfo, CacheSpec, StoreStamp, cast_rows, pass_rows, resolve_budget,
)
from lightning_dualform.attend.kernels import META_COLUMNS, AttentionAccumulator, Block, stable_topk, step_bucket_edges
from lightning_dualform.attend.memory import memory_sums, rebuilt_weights
from lightning_dualform.record.capture import keys_of, one_hot_keys
from lightning_dualform.errors import StoreError
from lightning_dualform._float32_products import full_float32_products
from lightning_dualform.store.shards import open_store
from lightning_dualform.store.reader import LayerReader

log = logging.getLogger(__name__)

_META_BLOCK = 1 << 16
#: step buckets allowed beyond one per step (the mass tables are ``n x step_buckets``)
MAX_STEP_BUCKETS = 1024
#: a dense per-example table is used while the largest dataset index is below this or twice the rows;
#: sparser indices (a subset of a big dataset, or a damaged file) are numbered densely first
DENSE_INDEX_FLOOR = 1 << 20
_ACCUMULATE = (torch.float32, torch.float64)
_SCANS = ("exact", "bf16")
#: ``attend(score=...)``: what ``top``, ``top_examples`` and ``mass`` rank and sum. ``"raw"``: the paper's
#: similarity ``k . q``; ``"unit"``: the attention weight of the row for the query's output unit ``u``,
#: ``-(Q_s[u, :] (.) k) . q`` (``-c_s (k . q)`` for SGD's scalar ``Q_s = c_s``); ``"auto"``: ``"unit"`` for a store
#: of an element-wise rule (Adam, AdamW, ...), ``"raw"`` otherwise.
SCORES = ("auto", "raw", "unit")


# ------------------------------------------------------------------------------------------------------
# result types
# ------------------------------------------------------------------------------------------------------
def _list(t: torch.Tensor | None) -> Any:
    return None if t is None else t.tolist()


@dataclass

class TopRows:
    """The k best memory rows per query, best first; each field is ``(n, k)``.

    ``score`` is the attention score (for :attr:`AttentionResult.top`: ``k . q``, or the unit score, as
    :attr:`AttentionResult.score` says) or the row's contribution to the chosen output unit (proponents/opponents). ``row == -1`` marks padding where fewer than ``k``
    rows qualify (proponents need a positive contribution, opponents a negative one).
    """

    score: torch.Tensor
    row: torch.Tensor
    step: torch.Tensor
    epoch: torch.Tensor
    index: torch.Tensor
    position: torch.Tensor
    label: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {name: _list(getattr(self, name)) for name in ("score", *META_COLUMNS)}


@dataclass
class TopExamples:
    """The k best training examples per query, every epoch and position of an example summed; ``(n, k)``.

    ``index`` is the dataset index, ``rows`` how many memory rows (presentations x positions) were summed,
    ``label`` the example's label (-1 none). ``index == -1`` marks padding.
    """

    score: torch.Tensor
    index: torch.Tensor
    label: torch.Tensor
    rows: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {name: _list(getattr(self, name)) for name in ("score", "index", "label", "rows")}


@dataclass
class Mass:
    """Attention mass per group: ``signed[i, g] = sum of scores`` and ``absolute[i, g] = sum of |scores|``
    over the rows of group ``keys[g]`` (a label, an epoch, or the first step of a step bucket); ``(n, G)``.
    The scores are those :attr:`AttentionResult.score` names."""

    keys: torch.Tensor
    signed: torch.Tensor
    absolute: torch.Tensor
    edges: list[int] | None = None  # step buckets: [first step of each bucket..., end step]

    def to_dict(self) -> dict[str, Any]:
        d = {"keys": _list(self.keys), "signed": _list(self.signed), "absolute": _list(self.absolute)}
        if self.edges is not None:
            d["edges"] = list(self.edges)
        return d


@dataclass
class AttentionResult:
    """What one pass of :meth:`DualInference.attend` returns. Tensors are on the CPU.

    Attributes:
        layer: the layer name.
        at_step: the model after this many optimizer steps was rebuilt.
        rows: memory rows attended over.
        dual: ``(n, d_out)`` the layer output rebuilt from ``W_0`` and the memory (plus the stored residual
            for a store recorded with ``exact=False``).
        primal: ``(n, d_out)`` the stored final weights applied to the queries; ``None`` at an earlier
            ``at_step`` or for an unfinished store.
        rel_err: ``(n,)`` ``||dual - primal|| / ||primal||`` per query: the exactness certificate.
        score: what ``top``, ``top_examples`` and ``mass`` rank and sum: ``"raw"``, the similarity ``k . q``, or
            ``"unit"``, each row's attention weight for the query's output unit ``units[i]``,
            ``-(Q_s[u, :] (.) k) . q`` (:data:`SCORES`).
        top: top-k rows by score.
        top_examples: top-k training examples by summed score.
        units: ``(n,)`` the output unit whose contributions rank proponents and opponents.
        unit_base: ``(n,)`` the part of unit ``units[i]``'s output that no row contributes (``A (.) W_0`` and the
            initial optimizer state's share, and the bias's; an ``exact=False`` store's residual too).
        unit_output: ``(n,)`` ``unit_base`` plus every row's contribution: the unit's output rebuilt from the
            contributions that rank proponents and opponents (equal to ``dual[i, units[i]]``).
        proponents / opponents: top-k rows by positive / negative contribution to that unit.
        proponent_examples / opponent_examples: the same summed per training example.
        mass: ``{"label" | "epoch" | "step": Mass}``.
        explained: ``(n,)`` for an inexact store: ``1 - ||residual output|| / ||primal||``, the share of the
            output that the memory explains; ``None`` for an exact store.
        dual_source: ``"rows"``: ``dual``'s memory part was summed from the rows in this pass;
            ``"certificate"``: from the sums the certificate computed from the same rows at fit end.
    """

    layer: str
    at_step: int
    rows: int
    dual: torch.Tensor
    primal: torch.Tensor | None = None
    rel_err: torch.Tensor | None = None
    top: TopRows | None = None
    top_examples: TopExamples | None = None
    units: torch.Tensor | None = None
    proponents: TopRows | None = None
    opponents: TopRows | None = None
    proponent_examples: TopExamples | None = None
    opponent_examples: TopExamples | None = None
    mass: dict[str, Mass] = field(default_factory=dict)
    explained: torch.Tensor | None = None
    exact_store: bool = True
    dual_source: str = "rows"
    score: str = "raw"
    unit_base: torch.Tensor | None = None
    unit_output: torch.Tensor | None = None

    @property
    def max_rel_err(self) -> float | None:
        return None if self.rel_err is None else float(self.rel_err.max())

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings only: ``json.dumps`` takes it as it is."""

        def sub(x: Any) -> Any:
            return None if x is None else x.to_dict()

        return {
            "layer": self.layer,
            "at_step": self.at_step,
            "rows": self.rows,
            "exact_store": self.exact_store,
            "dual_source": self.dual_source,
            "score": self.score,
            "dual": _list(self.dual),
            "primal": _list(self.primal),
            "rel_err": _list(self.rel_err),
            "max_rel_err": self.max_rel_err,
            "top": sub(self.top),
            "top_examples": sub(self.top_examples),
            "units": _list(self.units),
            "unit_base": _list(self.unit_base),
            "unit_output": _list(self.unit_output),
            "proponents": sub(self.proponents),
            "opponents": sub(self.opponents),
            "proponent_examples": sub(self.proponent_examples),
            "opponent_examples": sub(self.opponent_examples),
            "mass": {k: m.to_dict() for k, m in self.mass.items()},
            "explained": _list(self.explained),
        }


@dataclass
class Explanation:
    """What :meth:`DualInference.explain` returns: the model's output and prediction, and one
    :class:`AttentionResult` per tracked layer (queries = that layer's input rows for the batch)."""

    output: torch.Tensor | None
    prediction: torch.Tensor | None
    layers: dict[str, AttentionResult]

    def __getitem__(self, layer: str) -> AttentionResult:
        return self.layers[layer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prediction": _list(self.prediction),
            "output": _list(self.output),
            "layers": {k: r.to_dict() for k, r in self.layers.items()},
        }


# ------------------------------------------------------------------------------------------------------
# reading blocks ahead
# ------------------------------------------------------------------------------------------------------
@dataclass
class _Stats:
    """Query-independent facts about a layer's rows, gathered once by a light pass over metadata."""

    n_examples: int
    n_labels: int  # label buckets: label + 1 (so -1 -> 0)
    n_epochs: int
    example_label: np.ndarray  # (n_examples,) int64, -1 unknown
    example_ids: np.ndarray | None = None  # dataset index of each example column, when numbered densely


#: automatic block size: keys and values of about this many float32 bytes per block ...
BLOCK_BYTES = 96 * 2**20
#: ... and at most this many bytes of scores per block and query chunk
SCORE_BYTES = 256 * 2**20


class _Prefetcher:
    """Reads blocks ``[start, stop)`` of a layer on a background thread, ``depth`` blocks ahead.

    On CUDA each block goes through pinned host memory and a non-blocking copy on a side stream; the
    consumer waits on the block's event, so copies overlap the compute stream. The thread holds the GIL
    only inside h5py and numpy calls; torch's matrix products release it.
    """

    _DONE = object()

    def __init__(
        self, make: Callable[[int, int], dict[str, Any]], n_rows: int, block_rows: int, device: torch.device, depth: int = 2,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        self._make = make
        self._bounds = _share_of([(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)], *share)
        self._device = device
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(target=self._run, name="dualform-prefetch", daemon=True)
        self._thread.start()

    def _to_device(self, host: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if self._stream is None:
            return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in host.items()}, None
        out: dict[str, Any] = {}
        with torch.cuda.stream(self._stream):
            for k, v in host.items():
                if not isinstance(v, np.ndarray):
                    out[k] = v
                    continue
                src = torch.from_numpy(v)
                # The caching host allocator keeps a pinned block alive until the copy that reads it
                # has finished, so a fresh pinned tensor per block is safe and cheap after the first.
                pinned = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                pinned.copy_(src)
                out[k] = pinned.to(self._device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        return out, event

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for start, stop in self._bounds:
                if self._stop.is_set():
                    return
                if not self._put(self._to_device(self._make(start, stop))):
                    return
            self._put(self._DONE)
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._put(err)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._q.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            block, event = item
            if event is not None:
                current = torch.cuda.current_stream(self._device)
                current.wait_event(event)
                for t in block.values():
                    if isinstance(t, torch.Tensor) and t.is_cuda:
                        t.record_stream(current)  # allocated on the side stream, used on this one
            yield block

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


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
        self.device = _resolve_device(device)
        self.block_rows = block_rows
        self.accumulate = accumulate
        self.query_chunk = query_chunk
        self.progress = progress
        self._group = _resolve_group(distributed)
        budget = resolve_budget(cache, self.device)
        self._open_path = os.fspath(path)
        self.store = open_store(path)  # a store, or the shards of a DDP run
        self.path = self.store.path
        self._stats: dict[str, _Stats] = {}
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

        def make(start: int, stop: int) -> dict[str, Any]:
            blk = pass_rows(lay, start, stop)
            upd = blk["step"] - coef.first_step
            on_device = isinstance(blk["values"], torch.Tensor)  # a device cache keeps keys and values there
            keys = cast_rows(blk["keys"], keys_dtype) if keys_dtype else blk["keys"]
            cw = c_w[upd].astype(np_acc)
            if unit_score:  # -c_s (k . q): the key scaled by the step's (positive) step size; each row's c_w is then -1
                scale = -c_w[upd]
                if isinstance(keys, torch.Tensor):
                    keys = keys * torch.from_numpy(scale).to(keys.device, keys.dtype)[:, None]
                else:
                    keys = keys * scale.astype(keys.dtype)[:, None]
                cw = np.full_like(cw, -1.0)
            out = {
                "keys": keys,
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

        pf = _Prefetcher(make, n_rows, self.rows_per_block(lay), dev, share=self._share())
        bar = _bar(self.progress and self._share()[0] == 0, n_rows, f"attend {lay.name}")
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
            if bar is not None:
                bar.close()
        if self._group is not None:
            _all_merge(state, self._group)
        return self._result(lay, coef, n_rows, state, stats, units, primal, residual, step_buckets, q, scan,
                            stored is not None)

    def _result(
        self, lay: LayerReader, coef: Any, n_rows: int, state: AttentionAccumulator, stats: _Stats | None,
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
    def _check_queries(self, lay: LayerReader, queries: Any, call: str) -> torch.Tensor:
        if isinstance(queries, np.ndarray):
            queries = torch.from_numpy(queries)
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"`{call}(queries=...)` must be a torch.Tensor or numpy array of shape (n, {lay.d_in}), got {type(queries).__name__}.")
        if queries.dim() == 1:
            queries = queries.unsqueeze(0)
        if queries.dim() != 2 or queries.shape[1] != lay.d_in or queries.shape[0] == 0:
            raise ValueError(
                f"`{call}(queries=...)` for layer {lay.name!r} must have shape (n, {lay.d_in}) with n >= 1 "
                f"(the layer's input width is {lay.d_in}); got {tuple(queries.shape)}."
            )
        if not queries.is_floating_point():
            queries = queries.float()
        finite = torch.isfinite(queries)
        if not bool(finite.all()):
            bad = (~finite.all(dim=1)).nonzero().squeeze(1)[:5].tolist()
            raise ValueError(f"`{call}(queries=...)` holds NaN or inf (query rows {bad}...); every query must be finite.")
        return queries.detach()

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

        def make(start: int, stop: int) -> dict[str, Any]:
            return pass_rows(lay, start, stop, ("keys", "values", "step"))

        pf = _Prefetcher(make, lay.rows_before(coef.end_step), self.rows_per_block(lay), dev)
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

    def _layer_stats(self, lay: LayerReader) -> _Stats:
        """Widths of the per-example and per-group tables: one pass over the index/label/epoch columns.

        Every width comes from values in the file, so each is checked against the file's own shapes first
        (distinct values never outnumber the rows): labels and epochs beyond :data:`DENSE_INDEX_FLOOR` and
        twice the rows are damage (:class:`StoreError`); dataset indices that sparse (a subset of a large
        dataset) are numbered densely, so the per-example tables hold one column per example seen.

        Raises:
            StoreError: labels or epochs too large for the store's rows (a damaged file).
        """
        if lay.name in self._stats and self._stats[lay.name] is not None:
            return self._stats[lay.name]
        max_index, max_label, max_epoch = -1, -1, 0
        for s in range(0, lay.n_rows, _META_BLOCK):
            blk = lay.read(s, s + _META_BLOCK, ("index", "label", "epoch", "step"))  # read() checks them
            if len(blk["index"]):
                max_index = max(max_index, int(blk["index"].max()))
                max_label = max(max_label, int(blk["label"].max()))
                max_epoch = max(max_epoch, int(blk["epoch"].max()))
        bound = max(DENSE_INDEX_FLOOR, 2 * lay.n_rows)
        if max_label + 2 > bound or max_epoch + 1 > bound:
            raise StoreError(
                f"{self.path}: layer {lay.name!r} holds labels up to {max_label} and epochs up to {max_epoch} in "
                f"{lay.n_rows} rows; tables that wide ({bound} at most for this store) mean a damaged file."
            )
        ids = None
        if max_index + 1 > bound:  # sparse indices: number the examples densely
            found = [np.unique(b[b >= 0]) for b in (lay.read(s, s + _META_BLOCK, ("index",))["index"]
                                                    for s in range(0, lay.n_rows, _META_BLOCK))]
            ids = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
        n_examples = len(ids) if ids is not None else max_index + 1
        ex_label = np.full(n_examples, -1, dtype=np.int64)
        for s in range(0, lay.n_rows, _META_BLOCK):
            blk = lay.read(s, s + _META_BLOCK, ("index", "label"))
            ok = blk["index"] >= 0
            cols = blk["index"][ok] if ids is None else np.searchsorted(ids, blk["index"][ok])
            ex_label[cols] = blk["label"][ok]
        st = _Stats(n_examples=n_examples, n_labels=max_label + 2, n_epochs=max_epoch + 1, example_label=ex_label,
                    example_ids=ids)
        self._stats[lay.name] = st
        return st

    # -- explain ---------------------------------------------------------------------------------------
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
        """Run ``model`` once on ``batch`` with forward hooks and attend at every tracked layer.

        Each tracked layer's input rows for the batch (leading dimensions flattened) are its queries. The
        model runs in eval mode under ``torch.no_grad()`` (its mode is restored afterwards).

        Args:
            model: the trained model (a LightningModule works): module names must be the store's layer names.
            batch: a tensor, or a tuple/list whose first element is the input, or whatever ``forward`` takes.
            top_k: passed to :meth:`attend`.
            layers: a subset of :attr:`layers` (default: all).
            contribution_to: used for the last tracked layer, whose output is normally the model's;
                ``"pred"`` there means the model's prediction (argmax of its output) when the shapes agree.
            forward: ``forward(model, batch) -> output``; default ``model(batch)`` or ``model(batch[0])``.
            **attend_kwargs: any other :meth:`attend` argument (``at_step``, ``per_example`` ...).

        Raises:
            KeyError: a tracked layer is not a module of ``model``.
        """
        names = list(layers) if layers is not None else self.layers
        for name in names:
            self.layer(name)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise KeyError(
                f"`explain(model, ...)`: the model has no module named {missing}; the store tracks {self.layers}. "
                "Pass the model that was trained (module names must match)."
            )
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = []
        for name in names:
            d_in = self.layer(name).d_in

            def hook(mod: nn.Module, inputs: tuple, output: Any, name: str = name, d_in: int = d_in) -> None:
                # the rows the layer multiplies by its weight: unfolded patches, one-hot tokens, flattened rows
                keys, _ = keys_of(mod, inputs[0])
                captured[name].append(keys.float() if keys.is_floating_point() else one_hot_keys(keys, d_in))

            handles.append(modules[name].register_forward_hook(hook))
        was_training = model.training
        try:
            model.eval()
            with torch.no_grad():
                if forward is not None:
                    output = forward(model, batch)
                elif isinstance(batch, (list, tuple)):
                    output = model(batch[0])
                else:
                    output = model(batch)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        out_t = output if isinstance(output, torch.Tensor) else None
        prediction = out_t.argmax(dim=-1) if (out_t is not None and out_t.is_floating_point() and out_t.dim() >= 1) else None
        results: dict[str, AttentionResult] = {}
        last = names[-1] if names else None
        for name in names:
            if not captured[name]:
                raise ValueError(f"`explain`: layer {name!r} was not called by the model's forward on this batch.")
            q = torch.cat(captured[name])
            contrib: Any = "auto"  # unit scores (element-wise rules) rank by the layer's own predicted unit
            if name == last:
                contrib = contribution_to
                if contribution_to == "pred" and prediction is not None and prediction.numel() == q.shape[0]:
                    contrib = prediction.reshape(-1).cpu()
            results[name] = self.attend(name, q, top_k=min(top_k, self.layer(name).n_rows), contribution_to=contrib, **attend_kwargs)
        return Explanation(
            output=out_t.detach().cpu() if out_t is not None else None,
            prediction=prediction.cpu() if prediction is not None else None,
            layers=results,
        )

    # -- verify ----------------------------------------------------------------------------------------
    def stored_sums_error(self, layer: str) -> float | None:
        """Relative error of the final weights rebuilt from the certificate's stored memory sums (what
        :meth:`attend` uses by default for ``dual`` at the end of a complete store) against the stored final
        weights; None when the store keeps no such sums for the layer. For a store of an element-wise rule:
        the error of the replayed weights the certificate kept."""
        lay = self.layer(layer)
        if self.store.form == "element-wise":
            _, end = lay.end_step()
            stored = lay.stored_memory_sums(end, lay.rows_before(end))
            if stored is None:
                return None
            err = 0.0
            for got, final in ((stored[0], lay.weight_final), (stored[1], lay.bias_final)):
                if got is not None and final is not None:
                    ref = final.astype(np.float64)
                    err = max(err, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300)))
            return err
        coef = lay.coefficients()
        stored = lay.stored_memory_sums(coef.end_step, lay.rows_before(coef.end_step))
        if stored is None:
            return None
        from lightning_dualform.attend.certificate import sums_rebuild_error

        return sums_rebuild_error(lay, coef, stored)

    def verify(self, queries: dict[str, torch.Tensor] | None = None, *, n_samples: int = 256, seed: int = 0) -> dict[str, float]:
        """Max relative error ``||dual - primal|| / ||primal||`` per layer, ``dual`` summed from the rows. For a store
        of an element-wise rule also the error of what ``attend`` ranks by: the predicted unit's output rebuilt
        from every row's contribution (``unit_output``), relative to ``||primal||``.

        Args:
            queries: ``{layer: (n, d_in)}``; default: ``n_samples`` stored keys of each layer, drawn at random.

        Raises:
            StoreError: the store has no final weights to compare with (an unfinished run).
            KeyError: an unknown layer in ``queries``.
        """
        gen = np.random.default_rng(seed)
        names = list(queries) if queries is not None else self.layers
        out: dict[str, float] = {}
        for name in names:
            lay = self.layer(name)
            if lay.weight_final is None:
                raise StoreError(f"{self.path}: layer {name!r} has no final weights (the run did not finish); nothing to verify against.")
            if queries is not None:
                q = queries[name]
            else:
                if lay.n_rows == 0:
                    continue
                picks = np.sort(gen.choice(lay.n_rows, size=min(n_samples, lay.n_rows), replace=False))
                q = torch.from_numpy(np.concatenate([lay.read(int(i), int(i) + 1, ("keys",))["keys"] for i in picks]))
            if self.store.form == "element-wise":
                # what attend ranks by: every row's contribution to the predicted unit, from the replay's Q_s
                res = self.attend(name, q, top_k=0, per_example=False, mass=False, reuse_certificate=False,
                                  contribution_to="pred", score="unit")
                target = res.primal.double().gather(1, res.units[:, None]).squeeze(1)
                unit_err = (res.unit_output - target).abs() / _norm_rows(res.primal.double()).clamp_min(1e-300)
                out[name] = max(float(res.max_rel_err), float(unit_err.max()))
            else:
                res = self.attend(name, q, top_k=0, per_example=False, mass=False, reuse_certificate=False)
                out[name] = float(res.max_rel_err)
        return out


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`DualInference(device={device!r})` is not a device. Expected 'cpu', 'cuda', 'cuda:N' or None.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`DualInference(device={device!r})`: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False). Use device='cpu' or device=None."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`DualInference(device={device!r})`: only {torch.cuda.device_count()} CUDA device(s) here.")
    elif dev.type != "cpu":
        raise ValueError(f"`DualInference(device={device!r})`: only 'cpu' and 'cuda' devices are supported.")
    return dev


def _resolve_group(distributed: Any) -> Any:
    """``None`` (one process), ``True`` (the default group) or a process group."""
    if distributed is False or distributed is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"`DualInference(distributed={distributed!r})` needs an initialized torch.distributed process group; "
            "call torch.distributed.init_process_group(...) first, or leave distributed=False."
        )
    return True if distributed is True else distributed


def _share_of(bounds: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """Rank ``rank``'s contiguous share of the blocks (sizes differ by at most one block)."""
    per, extra = divmod(len(bounds), world)
    start = rank * per + min(rank, extra)
    return bounds[start : start + per + (rank < extra)]


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


def _bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", unit_scale=True)


def overall_rel_err(dual: torch.Tensor, primal: torch.Tensor) -> float:
    """``||dual - primal||_F / ||primal||_F`` over all queries (a query whose output is near zero does not
    blow it up, as its own relative error would)."""
    d, p = dual.double(), primal.double()
    ref = float(torch.linalg.norm(p))
    diff = float(torch.linalg.norm(d - p))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


def _norm_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _rel_rows(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return _norm_rows(x - ref) / _norm_rows(ref).clamp_min(torch.finfo(ref.dtype).tiny)


def _top_rows(found: tuple[torch.Tensor, dict[str, torch.Tensor]], sign: int = 0) -> TopRows:
    score, meta = found
    cpu = torch.device("cpu")
    score = score.to(cpu)
    meta = {k: v.to(cpu) for k, v in meta.items()}
    if sign:
        pad = score * sign <= 0
        meta = {k: v.masked_fill(pad, -1) for k, v in meta.items()}
        score = score.masked_fill(pad, 0.0)
    return TopRows(score=score, **meta)


def _top_examples(
    sums: torch.Tensor, present: torch.Tensor, rows: torch.Tensor, ex_label: torch.Tensor, k: int, sign: int,
    ids: np.ndarray | None = None,
) -> TopExamples:
    """Top-k examples of ``(n, n_examples)`` sums; ``sign`` 0: largest, 1: largest positive, -1: most negative.
    ``ids``: the dataset index of each column when the examples were numbered densely."""
    cpu = torch.device("cpu")
    largest = sign >= 0
    kk = min(k, int(present.sum()))
    if sums.device.type == "cpu" and sums.t().is_contiguous() and _fused.kernel() is not None:
        # the fused pass's (n_examples, n) table: one more threshold pass, no transposed copy of the table
        score, index = _fused_topk_rows(sums.t(), present, kk, largest)
    else:
        sums = sums.contiguous()
        masked = sums if bool(present.all()) else sums.masked_fill(~present, float("-inf") if largest else float("inf"))
        score, index = stable_topk(masked, kk, largest=largest)  # equal sums: the lower index first, as fused
    label, nrows = ex_label[index], rows[index]
    if ids is not None:
        index = torch.from_numpy(ids).to(index.device)[index]
    if sign:
        pad = score * sign <= 0
        index, label, nrows = (t.masked_fill(pad, -1) for t in (index, label, nrows))
        score = score.masked_fill(pad, 0.0)
    return TopExamples(score=score.to(cpu), index=index.to(cpu), label=label.to(cpu), rows=nrows.to(cpu))


def _fused_topk_rows(table_t: torch.Tensor, present: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(table_t[present].T, k, dim=1)`` for an ``(E, n)`` table, with the compiled threshold pass."""
    idx = torch.arange(table_t.shape[0])
    if not bool(present.all()):
        idx = present.nonzero().squeeze(1)
        table_t = table_t.index_select(0, idx)
    n, dt = table_t.shape[1], table_t.dtype
    meta = idx[:, None].contiguous()

    def running() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.zeros(n, k, dtype=dt), torch.full((n, k, 1), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64)

    if largest:
        top = running()
        _fused.fold(table_t, meta, k=k, top=top)
        return top[0], top[1][:, :, 0]
    # smallest: the opponents' routine with contribution = value * 1 + 0
    ones = torch.ones(table_t.shape[0], 1, dtype=dt)
    pro, con = running(), running()
    _fused.fold(table_t, meta, k=k, units=torch.zeros(n, dtype=torch.int64), coef_w=ones, coef_b=torch.zeros_like(ones),
                pro=pro, con=con)
    return -con[0], con[1][:, :, 0]
