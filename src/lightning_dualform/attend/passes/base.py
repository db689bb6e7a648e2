"""The one interface of an ``attend`` pass, and the context every pass computes in.

A pass answers one :class:`~lightning_dualform.attend.request.AttendRequest` over one layer's memory. Two live
side by side, chosen by the store's update rule (:func:`~lightning_dualform.attend.passes.pass_for`):

- :class:`~lightning_dualform.attend.passes.scalar.ScalarPass`: SGD and the scalar rules, whose rows carry a
  coefficient per step (``c_w (k . q) + c_b``): blocks streamed by the prefetch thread, the fused kernel, the
  bf16 scan, the certificate's sums, ranks of a process group;
- :class:`~lightning_dualform.attend.passes.elementwise.ElementwisePass`: Adam, AdamW, ... replayed in float64,
  whose rows' attention weights depend on the output unit (``-(Q_s[u] (.) k) . q``).

A third (per-example influence over the same rows, weighting each layer's contributions) is a third subclass
beside them. What a pass shares with the others is a public function of its own module: the outputs of stored
or rebuilt weights (:mod:`.outputs`), the units a request names (:mod:`.units`), the per-layer tables
(:mod:`lightning_dualform.attend.stats`) and the result assembly (:mod:`.assemble`). A pass never calls
another pass, nor the front door (:class:`~lightning_dualform.attend.inference.DualInference`), which only
builds the request, picks the pass, and owns the store, the cache and the device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lightning_dualform.attend.blocks import BLOCK_BYTES, SCORE_BYTES
from lightning_dualform.attend.kernels import AttentionAccumulator
from lightning_dualform.attend.request import AttendRequest
from lightning_dualform.attend.results import AttentionResult
from lightning_dualform.attend.stats import LayerStats, layer_stats
from lightning_dualform.store.source import LayerSource


@dataclass
class PassContext:
    """Where and how a pass computes, and what it may keep between passes (owned by the front door).

    Args:
        store: the open store (``path``, ``form``, ``last_step``, ``optimizer_exact`` ...).
        device: where the products run.
        accumulate: ``torch.float32`` or ``torch.float64``, the dtype of scores and sums.
        query_chunk: queries multiplied together against one block.
        block_rows: rows per block, or None for the automatic size (:func:`rows_per_block`).
        progress: show a progress bar (rank 0 only).
        group: a ``torch.distributed`` process group (``True``: the default one), or None.
        stats: per-layer :class:`LayerStats`, gathered once per layer (the front door empties it when the
            store changes on disk).
        sums_checked: whether the certificate's sums of ``(layer, end step, rows)`` rebuild the final
            weights (checked once).
        replayed: an element-wise layer's weights replayed to ``(layer, end step, rows)`` where the store keeps
            none (its certificate was made as training went): replayed once per session.
    """

    store: Any
    device: torch.device
    accumulate: torch.dtype
    query_chunk: int
    block_rows: int | None = None
    progress: bool = False
    group: Any = None
    stats: dict[str, LayerStats] = field(default_factory=dict)
    sums_checked: dict[tuple, bool] = field(default_factory=dict)
    replayed: dict[tuple, tuple] = field(default_factory=dict)
    #: bytes of host arrays the last pass handed to the compute device (a benchmark's figure)
    moved_bytes: int = 0

    @property
    def path(self) -> str:
        return self.store.path

    def share(self) -> tuple[int, int]:
        """``(rank, world size)`` of this process's share of the blocks."""
        if self.group is None:
            return 0, 1
        import torch.distributed as dist

        group = None if self.group is True else self.group
        return dist.get_rank(group), dist.get_world_size(group)

    def rows_per_block(self, layer: LayerSource) -> int:
        """The block size of passes over ``layer``."""
        return rows_per_block(layer, self.block_rows, self.accumulate, self.query_chunk)

    def layer_stats(self, layer: LayerSource) -> LayerStats:
        """The layer's :class:`~lightning_dualform.attend.stats.LayerStats`, gathered once per layer."""
        if self.stats.get(layer.name) is None:
            self.stats[layer.name] = layer_stats(layer)
        return self.stats[layer.name]


def rows_per_block(layer: LayerSource, block_rows: int | None, accumulate: torch.dtype, query_chunk: int) -> int:
    """``block_rows``, or the automatic size for the layer's widths: about :data:`~.blocks.BLOCK_BYTES` of float32
    keys and values, at most :data:`~.blocks.SCORE_BYTES` of scores per query chunk, 4,096 to 65,536 rows."""
    if block_rows is not None:
        return block_rows
    rows = 2 ** round(math.log2(BLOCK_BYTES / (4 * (layer.d_in + layer.d_out))))
    # the (block, query_chunk) score buffer stays within SCORE_BYTES as well (small GPUs, float64)
    itemsize = torch.empty(0, dtype=accumulate).element_size()
    rows = min(rows, 2 ** int(math.log2(max(1, SCORE_BYTES // (itemsize * query_chunk)))))
    return int(min(65536, max(4096, rows)))


class AttendPass(ABC):
    """One way of attending a layer's memory. Subclasses implement :meth:`prepare` and :meth:`run`.

    Args:
        ctx: where and how to compute (one context per ``attend`` call).
    """

    #: the store form this pass answers (``StoreReader.form``)
    forms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: PassContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def prepare(self, request: AttendRequest, *, output_layer: bool) -> AttendRequest:
        """The request as this pass answers it: its ``"auto"`` knobs made concrete
        (:meth:`AttendRequest.resolved`), and what this pass cannot answer refused.

        Args:
            output_layer: the layer is the store's last tracked layer.

        Raises:
            ValueError: a knob this pass does not support.
        """

    @abstractmethod
    def run(self, layer: LayerSource, queries: torch.Tensor, request: AttendRequest) -> AttentionResult:
        """Attend ``queries`` ``(n, d_in)`` (checked) over the memory of ``layer`` with a prepared ``request``.

        Raises:
            ValueError: ``top_k`` larger than the memory, ``at_step`` outside the store, units out of range.
            StoreError: a damaged file.
        """


def check_top_k(layer: LayerSource, top_k: int, n_rows: int, end_step: int) -> None:
    """Refuse a ``top_k`` larger than the ``n_rows`` rows of the model after ``end_step`` steps, with what to do:
    a smaller ``top_k``, or, where that model has seen no row of the layer, a later ``at_step``.

    Raises:
        ValueError: ``top_k > n_rows``.
    """
    if top_k <= n_rows:
        return
    if n_rows:
        raise ValueError(
            f"`attend(top_k={top_k})` is larger than the memory of layer {layer.name!r}: it holds {n_rows} rows up to "
            f"step {end_step}. Use top_k <= {n_rows}."
        )
    head = f"`attend(top_k={top_k})`: layer {layer.name!r} holds no training rows"
    if layer.n_rows == 0:
        raise ValueError(f"{head} at any step (its run committed none): there is nothing to rank; top_k=0 answers "
                         "with the rebuilt output alone.")
    first = int(layer.read(0, 1, ("step",))["step"][0]) + 1  # the first step whose model has seen a row
    model = "the model before any optimizer step" if end_step == 0 else f"the model after step {end_step}"
    raise ValueError(
        f"{head} up to step {end_step} ({model} has seen none of its training rows), so there is nothing to rank. "
        f"Use at_step={first} or later (its first rows come with step {first}), or top_k=0 for the rebuilt output "
        "alone."
    )


def all_merge(state: AttentionAccumulator, group: Any) -> None:
    """Sum and merge the ranks' partial results of ``state``: afterwards every rank holds the full result."""
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
