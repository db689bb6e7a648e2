"""``DualInference``: the front door of answering queries over a store, on the GPU or the CPU.

It opens the store (a file, or the shards of a DDP run), owns the device, the optional block cache and what is
kept between passes, builds each call's :class:`~lightning_dualform.attend.request.AttendRequest`, and hands it to
the pass that answers the store's kind of memory (:mod:`lightning_dualform.attend.passes`: the scalar pass for
SGD and the scalar rules, the element-wise pass for Adam, AdamW, ...). The store holds every training key and
value of each tracked layer; for SGD a layer's output for a query is

    dual(q) = a_w W_0 q + a_b b_0 + sum_rows (c_w[step] (k . q) + c_b[step]) v
    (plus ``b_w buf_0 q + b_b buf_0`` for a store that began at a checkpoint with momentum buffers)

The pieces of a pass live beside it: :mod:`.arguments` (device, process group, query checks), :mod:`.request`,
:mod:`.passes` (the passes and what they share), :mod:`.blocks` (block sizes and the prefetch thread),
:mod:`.stats` (per-layer table widths), :mod:`.results` (the result types), :mod:`.explain` and :mod:`.verify`.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lightning_dualform._float32_products import full_float32_products
from lightning_dualform.attend import explain as _explain
from lightning_dualform.attend import verify as _verify
from lightning_dualform.attend.arguments import check_queries, resolve_device, resolve_group
from lightning_dualform.attend.cache import BlockCache, CachedLayer, CacheInfo, CacheSpec, StoreStamp, resolve_budget
from lightning_dualform.attend.passes import PassContext, pass_for, rows_per_block
from lightning_dualform.attend.request import AttendRequest, Contribution, Scan, Score, request_from
from lightning_dualform.attend.results import AttentionResult, Explanation, Mass, TopExamples, TopRows
from lightning_dualform.attend.stats import LayerStats
from lightning_dualform.store.shards import open_store
from lightning_dualform.store.source import LayerSource

__all__ = ["AttentionResult", "DualInference", "Explanation", "Mass", "TopExamples", "TopRows"]

log = logging.getLogger(__name__)

_ACCUMULATE = (torch.float32, torch.float64)
_R = AttendRequest  # the defaults of attend's keywords are the request's (declared once, there)


# ------------------------------------------------------------------------------------------------------
# the front door
# ------------------------------------------------------------------------------------------------------
class DualInference:
    """Open a store and answer queries over its memory.

    Args:
        path: a store written by :class:`~lightning_dualform.DualFormCallback` (a ``str``, ``os.PathLike`` or
            ``bytes``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``; ``None`` picks CUDA when available.
        block_rows: memory rows read and multiplied at a time; ``None`` (default) sizes blocks per layer
            to about 96 MiB of keys and values and at most 256 MiB of scores per query chunk (4,096 to
            65,536 rows: large blocks keep the products efficient, ``docs/benchmarks.md``).
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
        TypeError: ``path`` is not a path (a ``str`` or ``os.PathLike``; ``bytes`` are decoded).
        ValueError: a bad argument, or a device that is not there.

    Example::

        with DualInference("runs/mnist.h5") as di:
            res = di.attend("net.2", queries, top_k=10, contribution_to="pred")
            res.top.index      # (n, 10) dataset indices of the most attended training patterns
    """

    def __init__(
        self,
        path: str | bytes | os.PathLike,
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
        self._open_path = _store_path(path)
        self.store = open_store(self._open_path)  # a store, or the shards of a DDP run
        self.path = self.store.path
        self._stats: dict[str, LayerStats] = {}  # per layer, gathered once (emptied when the store changes)
        self._sums_checked: dict[tuple, bool] = {}  # the certificate's sums checked against the final weights
        self._replayed: dict[tuple, tuple] = {}  # an element-wise layer's replayed weights, once per session
        self._last_pass_bytes = 0  # bytes of host arrays the last attend pass handed to the device
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
        self._replayed.clear()
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

    def layer(self, name: str) -> LayerSource:
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
        top_k: int = _R.top_k,
        *,
        at_step: int | None = _R.at_step,
        contribution_to: Contribution = _R.contribution_to,
        per_example: bool = _R.per_example,
        mass: bool = _R.mass,
        step_buckets: int = _R.step_buckets,
        scan: Scan = _R.scan,
        reuse_certificate: bool = _R.reuse_certificate,
        score: Score = _R.score,
        request: AttendRequest | None = None,
    ) -> AttentionResult:
        """Attend ``queries`` over the memory of ``layer`` in one streamed pass.

        Every knob and its default is :class:`~lightning_dualform.attend.request.AttendRequest`'s (see there for
        each): ``top_k``, ``at_step``, ``contribution_to`` (``"auto"``: the predicted unit at the output layer and
        on an element-wise rule's store, none at a scalar store's hidden layer), ``per_example``, ``mass``,
        ``step_buckets``, ``scan``, ``reuse_certificate``, ``score``.

        Args:
            layer: a name from :attr:`layers`.
            queries: ``(n, d_in)`` (or ``(d_in,)``) inputs of that layer.
            request: a prepared :class:`AttendRequest` instead of the keywords (which must then keep their
                defaults): one request can serve many calls, ``request.replace(at_step=...)`` another.

        Returns:
            An :class:`AttentionResult`; its ``score``, ``units`` and ``dual_source`` say what was computed.

        Raises:
            KeyError: unknown layer (the message lists the known ones).
            ValueError: queries of the wrong shape or with NaN/inf (or a meta tensor), ``top_k`` larger than the
                memory, a bad ``at_step``, ``contribution_to``, ``scan``, ``score`` or ``step_buckets``; an answer
                whose products overflow float32.
            TypeError: an integer knob given as a bool, float or string; knobs given both ways.
            StoreError: a damaged file (including damaged certificate sums: their shape, type or values; and stored
                rows with NaN or inf, which the answer's sums reveal: the message names the layer and the rows).
        """
        knobs = dict(top_k=top_k, at_step=at_step, contribution_to=contribution_to, per_example=per_example,
                     mass=mass, step_buckets=step_buckets, scan=scan, reuse_certificate=reuse_certificate, score=score)
        req = request_from("attend", request, knobs)
        self.refresh()
        lay = self.layer(layer)
        q = check_queries(lay, queries, "attend")
        ctx = self._context()
        answer = pass_for(self.store.form)(ctx)
        req = answer.prepare(req, output_layer=lay.name == self.layers[-1])
        # every product of the answer (primal, the pass, a rebuilt dual) in full float32, whatever the user
        # allowed for training (TF32, bf16 inside float32 products); the bf16 scan's bound needs float32 sums
        try:
            with full_float32_products():
                return answer.run(lay, q, req)
        finally:
            self._last_pass_bytes = ctx.moved_bytes

    def _context(self) -> PassContext:
        """What a pass needs from the front door (its memos are this object's, kept between passes)."""
        return PassContext(store=self.store, device=self.device, accumulate=self.accumulate,
                           query_chunk=self.query_chunk, block_rows=self.block_rows, progress=self.progress,
                           group=self._group, stats=self._stats, sums_checked=self._sums_checked,
                           replayed=self._replayed)

    def rows_per_block(self, layer: str | LayerSource) -> int:
        """The block size of passes over ``layer`` (a name from :attr:`layers`, or :meth:`layer`'s reader):
        ``block_rows``, or the automatic size for its widths."""
        lay = self.layer(layer) if isinstance(layer, str) else layer
        if not all(hasattr(lay, a) for a in ("d_in", "d_out")):
            raise TypeError(f"`DualInference.rows_per_block(layer=...)` takes a layer name (one of {self.layers}) or "
                            f"DualInference.layer(name); got {type(layer).__name__}.")
        return rows_per_block(lay, self.block_rows, self.accumulate, self.query_chunk)

    # -- explain and verify ----------------------------------------------------------------------------
    def explain(
        self,
        model: nn.Module,
        batch: Any,
        *,
        top_k: int = _R.top_k,
        layers: Sequence[str] | None = None,
        contribution_to: Contribution = _R.contribution_to,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        request: AttendRequest | None = None,
        method: _explain.ExplainMethod | None = "auto",
        target: Any = "margin",
        targets: Any = None,
        attention: bool = True,
        influence_options: dict[str, Any] | None = None,
        **attend_kwargs: Any,
    ) -> Explanation:
        from lightning_dualform.attribute import influence

        return _explain.explain(self, model, batch, top_k=top_k, layers=layers, contribution_to=contribution_to,
                                forward=forward, request=request, method=method, target=target, targets=targets,
                                attention=attention, influence_options=influence_options, influence_fn=influence,
                                **attend_kwargs)

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


def _store_path(path: Any) -> str:
    """``path`` as a ``str``: a ``str``, an ``os.PathLike`` or ``bytes`` (decoded as the file system does)."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if isinstance(path, (bytes, bytearray)):
        return os.fsdecode(bytes(path))
    if isinstance(path, str):
        return path
    raise TypeError(f"`DualInference(path={path!r})`: expected the path of a store (a str or os.PathLike, such as "
                    f"'runs/mnist.h5'), got {type(path).__name__}.")
