"""Blocked attention over the training memory: pure functions of tensors (no files, no threads).

A tracked layer after training is ``W_T q = a_w W_0 q + a_b b_0 + sum_rows (c_w (k . q) + c_b) v``: unnormalised
dot attention of the query ``q`` over every training key ``k``, with the rows' values ``v`` scaled by the
per-step coefficients ``c_w`` (weight) and ``c_b`` (bias, whose key is the constant 1).

The memory is far larger than RAM, so everything here folds one block of rows at a time into running
results. Each function has a dense one-liner it must agree with (see ``tests/test_attention.py``):

====================  =====================================================================
function              dense reference
====================  =====================================================================
:func:`fold_dual`     ``out + (q @ K.T * c_w + c_b) @ V``
:func:`merge_topk`    ``torch.topk(all_scores, k)`` (equal scores: the earlier row first)
:func:`contributions` ``weights * V[:, unit].T``: row ``r``'s share of output unit ``unit[i]``
:func:`scatter_sum`   ``acc.scatter_add(1, group.expand(n, -1), x)`` (rows with group ``-1`` skipped)
:func:`fold_memory`   ``w + (V * c_w).T @ K``: the memory sum ``sum_rows c_w v k^T``
====================  =====================================================================

:class:`AttentionAccumulator` strings them together: one pass over the store gives the dual output,
the top-k rows by score and by contribution, per-example sums and the attention mass per group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from lightning_dualform.attend import _fused

if TYPE_CHECKING:
    from lightning_dualform.store.conv import ConvGeometry

#: Per-row metadata carried along with the top-k results.
META_COLUMNS = ("row", "step", "epoch", "index", "position", "label")


# ------------------------------------------------------------------------------------------------------
# single-block functions
# ------------------------------------------------------------------------------------------------------
#: bfloat16's unit roundoff (8 significant bits).
BF16_U = 2.0**-8


def bf16_score_bound(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(n,)``: a bound on ``|s_scan - q . k|`` over every key of the block, for scores computed from
    bfloat16 copies of ``queries`` and ``keys`` with float32 accumulation and a bfloat16 result.

    Rounding each factor to bfloat16 moves a product by at most ``(2u + u^2) |q_i k_i|``; summing ``d``
    products in float32 adds at most ``d 2^-24`` of ``sum |q_i k_i|``, and rounding the result to bfloat16
    ``u`` of it; ``sum |q_i k_i| <= |q| |k|``; the float32 re-computation of candidates may differ by as much
    again as the float32 sum, and flushed subnormals by ``2^-126`` per term. A factor 1.01 covers the
    second-order terms; an overflowing norm gives an infinite bound (every row is re-scored). (On CUDA
    the pass turns off cuBLAS's reduced-precision bfloat16 reductions, which this bound does not cover.)
    """
    d = queries.shape[1]
    u, f32 = BF16_U, 2.0**-24
    acc = d * f32 / (1 - d * f32) if d * f32 < 0.5 else float("inf")
    # the scan's float32 sum, and the float32 re-computation the candidates are then ranked by
    gamma = 1.01 * ((2 * u + u * u) + u + 2 * acc) * (1 + u) ** 2
    qn = torch.linalg.vector_norm(queries.double(), dim=1)
    kmax = torch.linalg.vector_norm(keys, dim=1).max().double() if keys.shape[0] else qn.new_zeros(())
    if not 1e-12 <= float(kmax) <= 1e18:  # float32 squares may under- or overflow: again in float64 (slower)
        kmax = torch.linalg.vector_norm(keys.double(), dim=1).max() if keys.shape[0] else kmax
    # subnormal products and factors may be flushed to zero (AMX does): at most 2^-126 each
    tiny = 2.0**-126 * (d + d**0.5 * (qn + kmax))
    bound = gamma * qn * kmax + tiny
    return torch.nan_to_num(bound, nan=float("inf")).to(queries.dtype if queries.is_floating_point() else torch.float32)


def block_scores(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention scores ``k . q`` of a block: ``(n, d_in) x (B, d_in) -> (n, B)``."""
    return torch.matmul(queries, keys.t(), out=out)


def row_weights(scores: torch.Tensor, c_w: torch.Tensor, c_b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's effective weight in the dual sum, ``c_w (k . q) + c_b``: ``(n, B)``.

    Args:
        scores: ``(n, B)`` scores of the block.
        c_w: ``(B,)`` weight coefficient of each row's step.
        c_b: ``(B,)`` bias coefficient of each row's step (zeros for a layer without bias).
    """
    n, b = scores.shape
    return torch.addcmul(c_b.expand(n, b), scores, c_w.expand(n, b), out=out)


def fold_dual(out: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out += weights @ values`` in place: ``(n, d_out) += (n, B) @ (B, d_out)``."""
    return out.addmm_(weights, values)


def fold_memory(w: torch.Tensor, b: torch.Tensor | None, keys: torch.Tensor, cv: torch.Tensor, bias_share: torch.Tensor | None) -> None:
    """One block's share of the memory sum, in place: ``w += cv^T keys`` ``(d_out, d_in)`` and ``b += bias_share``.

    The one kernel of ``sum_rows c_w v k^T`` (the rebuilt weights' memory part), whoever sums it: the
    certificate, a rebuilt ``dual``, the attention pass.

    Args:
        w: ``(d_out, d_in)`` running sum.
        b: ``(d_out,)`` running bias sum, or None.
        keys: ``(B, d_in)`` key rows, in ``w``'s dtype.
        cv: ``(B, d_out)`` the value rows times their step's weight coefficient, ``c_w v``.
        bias_share: ``(d_out,)`` ``c_b @ V``, the block's share of the bias.
    """
    w.addmm_(cv.t(), keys)
    if b is not None and bias_share is not None:
        b += bias_share


def fold_memory_maps(
    w: torch.Tensor, b: torch.Tensor | None, geom: "ConvGeometry", maps: torch.Tensor, skip: int, cv: torch.Tensor,
    bias_share: torch.Tensor | None,
) -> None:
    """:func:`fold_memory` for a convolution's compact block, without unfolding its keys: ``w += cv^T K`` where
    ``K`` are the key rows ``skip:skip + B`` of ``maps``.

    ``sum_rows cv_row k_row^T`` is the weight gradient of the convolution of the (padded) maps whose output
    gradient map holds ``cv`` at the rows' locations and zeros elsewhere
    (:func:`~lightning_dualform.layers.maps_weight_sum`): ``C_out x d_in x E x L`` products as the unfolded
    sum, but no ``(B, d_in)`` key matrix, ``prod(kernel)`` times the maps, is ever made.

    Args:
        w: ``(d_out, d_in)`` running sum. b: ``(d_out,)`` running bias sum, or None.
        geom: the convolution's :class:`~lightning_dualform.store.conv.ConvGeometry`.
        maps: ``(E, C_in, *input_size)`` the maps the block's rows lie in, on ``w``'s device.
        skip: rows of the first map before the block's first row.
        cv: ``(B, d_out)`` the rows' values times their step's weight coefficient, in ``w``'s dtype.
        bias_share: ``(d_out,)`` ``c_b @ V``, the block's share of the bias.
    """
    from lightning_dualform.layers import maps_weight_sum

    e, n, d_out = maps.shape[0], cv.shape[0], cv.shape[1]
    if skip or n != e * geom.locations:  # the block's first and last maps in part: zero gradient elsewhere
        full = cv.new_zeros(e * geom.locations, d_out)
        full[skip: skip + n] = cv
        cv = full
    grads = cv.reshape(e, *geom.output_size, d_out).movedim(-1, 1)  # (E, C_out, *output_size)
    w += maps_weight_sum(geom, maps, grads)
    if b is not None and bias_share is not None:
        b += bias_share


def contributions(weights: torch.Tensor, values: torch.Tensor, units: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's additive share of output unit ``units[i]`` for query ``i``: ``(n, B)``.

    Args:
        weights: ``(n, B)`` from :func:`row_weights`.
        values: ``(B, d_out)`` value rows.
        units: ``(n,)`` output unit per query (e.g. the predicted class's logit).
    """
    return torch.mul(weights, values.t()[units], out=out)


def best_first(vals: torch.Tensor, tie: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Positions of the ``k`` best of each row of ``(n, m)`` values, best first; equal values are ordered by
    the smaller ``tie`` (a row number: the earlier training row first, as the compiled pass keeps them)."""
    order = torch.argsort(tie, dim=1, stable=True)
    ranked = torch.sort(vals.gather(1, order), dim=1, descending=largest, stable=True).indices[:, :k]
    return order.gather(1, ranked)


def stable_topk(x: torch.Tensor, k: int, *, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k, dim=1, sorted=True)`` with ties broken by the lower column first.

    ``torch.topk`` keeps an arbitrary one of equal values at the k-th place, so which row an answer names
    could depend on the device or on whether the compiled pass is there. Rows whose k-th value has more
    equals than were kept are chosen again exactly (one comparison pass finds them).
    """
    vals, idx = torch.topk(x, k, dim=1, largest=largest, sorted=False)
    if k and k < x.shape[1]:
        kth = (vals.min(dim=1, keepdim=True) if largest else vals.max(dim=1, keepdim=True)).values
        unsure = (x == kth).sum(1) > (vals == kth).sum(1)
        if bool(unsure.any()):
            rows = unsure.nonzero().squeeze(1)
            xb, kb = x[rows], kth[rows]
            beyond = xb > kb if largest else xb < kb
            equal = xb == kb
            take = beyond | (equal & (equal.cumsum(1) <= k - beyond.sum(1, keepdim=True)))
            pos = take.nonzero()[:, 1].view(len(rows), k)  # row-major: k per row, in column order
            vals[rows], idx[rows] = xb.gather(1, pos), pos
    order = best_first(vals, idx, k, largest=largest)
    return vals.gather(1, order), idx.gather(1, order)


def merge_topk(
    best: torch.Tensor | None,
    best_meta: dict[str, torch.Tensor] | None,
    scores: torch.Tensor,
    meta: dict[str, torch.Tensor],
    k: int,
    *,
    largest: bool = True,
    tie: str = "row",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fold a block's ``(n, B)`` scores into a running top-k, carrying per-row metadata along.

    Args:
        best: ``(n, k')`` running scores, or ``None`` before the first block.
        best_meta: ``{column: (n, k')}`` metadata of the running entries.
        scores: ``(n, B)`` the block's scores (its rows in increasing ``tie`` order).
        meta: ``{column: (B,) or (n, B)}`` metadata of the block's rows.
        k: how many to keep.
        largest: keep the largest (``True``) or the smallest.
        tie: the metadata column that orders equal scores (the smaller first).

    Returns:
        ``(n, min(k, seen))`` scores sorted best first, and their metadata.
    """
    kb = min(k, scores.shape[1])
    vals, pos = stable_topk(scores, kb, largest=largest)
    cand_meta = {name: col[pos] if col.dim() == 1 else col.gather(1, pos) for name, col in meta.items()}
    if best is not None:
        vals = torch.cat([best, vals], dim=1)
        cand_meta = {name: torch.cat([best_meta[name], col], dim=1) for name, col in cand_meta.items()}
    kk = min(k, vals.shape[1])
    ties = cand_meta.get(tie)
    if ties is None:
        ties = torch.arange(vals.shape[1], device=vals.device).expand_as(vals)
    pos = best_first(vals, ties, kk, largest=largest)
    return vals.gather(1, pos), {name: col.gather(1, pos) for name, col in cand_meta.items()}


def scatter_sum(acc: torch.Tensor, group: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``acc[:, group[r]] += x[:, r]`` in place, skipping rows whose group is negative.

    Args:
        acc: ``(n, G)`` running sums.
        group: ``(B,)`` int64 group of each row (dataset index, label bucket ...); ``-1`` = none.
        x: ``(n, B)`` what to add.
    """
    if group.numel() and bool((group < 0).any()):
        keep = (group >= 0).nonzero().squeeze(1)
        group, x = group[keep], x.index_select(1, keep)
    return acc.index_add_(1, group, x.to(acc.dtype))


def step_bucket(step: torch.Tensor, first_step: int, end_step: int, n_buckets: int) -> torch.Tensor:
    """Equal-width bucket of each row's step over ``[first_step, end_step)``: ``(B,)`` in ``0..n_buckets-1``."""
    span = max(end_step - first_step, 1)
    return ((step - first_step) * n_buckets // span).clamp_(0, n_buckets - 1)


def step_bucket_edges(first_step: int, end_step: int, n_buckets: int) -> list[int]:
    """First step of each bucket of :func:`step_bucket`, plus ``end_step``."""
    span = max(end_step - first_step, 1)
    # smallest s with (s - first) * n // span >= b
    return [first_step + -(-b * span // n_buckets) for b in range(n_buckets)] + [end_step]


# ------------------------------------------------------------------------------------------------------
# the running state of one pass
# ------------------------------------------------------------------------------------------------------
@dataclass
class Block:
    """One block of memory rows, already on the compute device.

    ``keys`` and ``values`` are in the compute dtype; ``c_w``/``c_b`` are the rows' coefficients in the
    accumulation dtype; metadata columns are int64 of shape ``(B,)``.
    """

    keys: torch.Tensor  # (B, d_in)
    values: torch.Tensor  # (B, d_out)
    c_w: torch.Tensor  # (B,)
    c_b: torch.Tensor  # (B,)
    meta: dict[str, torch.Tensor]  # META_COLUMNS -> (B,)
    label_group: torch.Tensor | None = None  # (B,) bucket of the row's label, for the mass
    step_group: torch.Tensor | None = None  # (B,) step bucket
    exact_keys: torch.Tensor | None = None  # (B, d_in) in the accumulation dtype, for re-scoring a bf16 scan
    # Optional, derived from the fields above; a reader thread can prepare them so that the compute thread
    # only multiplies. Each is computed by ``fold`` when missing.
    coef_w: torch.Tensor | None = None  # (B, d_out) c_w v
    coef_b: torch.Tensor | None = None  # (B, d_out) c_b v
    bias_sum: torch.Tensor | None = None  # (d_out,) c_b @ V
    packed_meta: torch.Tensor | None = None  # (B, len(META_COLUMNS)) int64, columns in META_COLUMNS order
    groups: torch.Tensor | None = None  # (B, G) rows of the concatenated mass tables (see mass_offsets)
    example: torch.Tensor | None = None  # (B,) column of the row's example in the per-example tables (-1 none);
    # default: the dataset index itself (``meta["index"]``)
    #: (B, n) the block's scores, when the caller computed them (an element-wise rule's per-step scores
    #: ``-(Q_s[u, :] (.) k) . q``): the accumulator then skips its own product ``keys @ queries.T``, and a
    #: row's contribution to unit ``u`` is ``score * coef_w[:, u] + coef_b[:, u]``
    scores_t: torch.Tensor | None = None

    @property
    def example_column(self) -> torch.Tensor:
        return self.example if self.example is not None else self.meta["index"]


@dataclass
class AttentionAccumulator:
    """Running results of attending ``queries`` over a memory folded in block by block.

    Args:
        queries: ``(n, d_in)`` in the compute dtype, on the device.
        base: ``(n, d_out)`` the non-memory part ``a_w W_0 q + a_b b_0`` in the accumulation dtype.
        top_k: rows to keep per query by score (0: none).
        units: ``(n,)`` output unit per query for proponents/opponents, or ``None``.
        n_examples: width of the per-example sums (max dataset index + 1), or 0 to skip them. Memory:
            ``n x n_examples`` (twice with ``units``) in the accumulation dtype.
        n_labels, n_epochs, n_step_buckets: widths of the mass tables (0 to skip one).
        query_chunk: queries processed together; bounds the ``(query_chunk, B)`` score buffer.
        exact_queries: ``(n, d_in)`` in the accumulation dtype when ``queries`` are a low-precision scan
            (bfloat16): every row whose scan score lies within the scan's rounding bound of the running k-th
            best exact score is re-scored exactly against ``Block.exact_keys`` before it enters the running
            top-k, so the top-k by score is the exact one (see :func:`bf16_score_bound`).
        with_dual: accumulate the dual output (off when it is rebuilt another way).
        fused: fold each block's scores with the compiled single-pass kernel of
            :mod:`lightning_dualform._fused` (CPU, exact scan); ``None``: whenever it is available.
        rebuild_weights: accumulate the dual output as rebuilt weights ``sum_rows c_w v k^T`` (``d_out x d_in``
            per row) instead of ``S (c_w V)`` (``n x d_out`` per row); ``None``: whichever is cheaper.
    """

    queries: torch.Tensor
    base: torch.Tensor
    top_k: int = 10
    units: torch.Tensor | None = None
    n_examples: int = 0
    n_labels: int = 0
    n_epochs: int = 0
    n_step_buckets: int = 0
    query_chunk: int = 2048
    exact_queries: torch.Tensor | None = None
    with_dual: bool = True
    fused: bool | None = None
    rebuild_weights: bool | None = None
    rows_seen: int = 0
    top: list = field(init=False)
    pro: list = field(init=False)
    con: list = field(init=False)

    def __post_init__(self) -> None:
        n = self.queries.shape[0]
        acc, dev = self.base.dtype, self.base.device
        exact = self.exact_queries is None and self.queries.dtype == acc
        kernel_ok = dev.type == "cpu" and exact and acc in (torch.float32, torch.float64)
        if self.fused is None:
            self.fused = kernel_ok and _fused.kernel() is not None
        elif self.fused and not (kernel_ok and _fused.kernel() is not None):
            raise ValueError("AttentionAccumulator(fused=True) needs exact CPU float32/float64 queries and a built kernel.")
        d_in, d_out = self.queries.shape[1], self.base.shape[1]
        if self.rebuild_weights is None:
            self.rebuild_weights = exact and d_in < n
        self._dual = self.base.clone()
        self._w = torch.zeros(d_out, d_in, dtype=acc, device=dev) if (self.rebuild_weights and self.with_dual) else None
        self._b = torch.zeros(d_out, dtype=acc, device=dev) if self.with_dual else None
        self._merged: dict[str, tuple] = {}
        chunks = range(0, n, self.query_chunk)
        self.top = [(None, None) for _ in chunks]
        self.pro = [(None, None) for _ in chunks]
        self.con = [(None, None) for _ in chunks]
        # The fused pass keeps tables transposed, (E, n) and (G, n): it adds one memory row's scores of every
        # query as a contiguous vector. ``example_score`` and ``mass`` are (n, .) views either way.
        fused = bool(self.fused)

        def table(width: int) -> tuple[torch.Tensor, torch.Tensor]:
            if fused:
                t = torch.zeros(width, n, dtype=acc, device=dev)
                return t, t.t()
            t = torch.zeros(n, width, dtype=acc, device=dev)
            return t, t

        self._sums: list[torch.Tensor] = []  # every running sum, in its storage layout (for all-reduce)
        self.example_score = self.example_contrib = None
        if self.n_examples:
            store, self.example_score = table(self.n_examples)
            self._sums.append(store)
            if self.units is not None:
                store, self.example_contrib = table(self.n_examples)
                self._sums.append(store)
        self.example_rows = torch.zeros(self.n_examples, dtype=torch.int64, device=dev) if self.n_examples else None
        widths = [(name, g) for name, g in (("label", self.n_labels), ("epoch", self.n_epochs), ("step", self.n_step_buckets)) if g]
        total = sum(g for _, g in widths)
        (ms, ms_view), (ma, ma_view) = table(total), table(total)
        self._mass_store = (ms, ma)
        self._sums += [ms, ma]
        self.mass_offsets: dict[str, int] = {}  # first column of each group kind in the mass tables
        self.mass = {}
        off = 0
        for name, g in widths:
            self.mass_offsets[name] = off
            self.mass[name] = (ms_view[:, off : off + g], ma_view[:, off : off + g])
            off += g
        self._buf: torch.Tensor | None = None
        if self.fused:
            k, m = self.top_k, len(META_COLUMNS)

            def running() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                return (torch.zeros(n, k, dtype=acc), torch.full((n, k, m), -1, dtype=torch.int64), torch.zeros(n, dtype=torch.int64))

            self._ftop = running() if k else None
            self._fpro = running() if (k and self.units is not None) else None
            self._fcon = running() if (k and self.units is not None) else None

    @property
    def dual(self) -> torch.Tensor:
        """``(n, d_out)``: the base plus every folded row's share."""
        if self._w is not None:  # rebuilt weights: one product at the end
            return self._dual + self.queries @ self._w.t() + self._b
        if self._b is not None:
            return self._dual + self._b
        return self._dual

    def _scores_t(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``keys @ q.T``, ``(B, m)``, into a reused buffer (no allocation per block)."""
        m, b = q.shape[0], keys.shape[0]
        if self._buf is None or self._buf.numel() < m * b:
            self._buf = torch.empty(m * b, dtype=q.dtype, device=q.device)
        return torch.matmul(keys, q.t(), out=self._buf[: m * b].view(b, m))

    def fold(self, block: Block) -> None:
        """Fold one block into every running result."""
        b = block.keys.shape[0]
        if b == 0:
            return
        acc = self.base.dtype
        values = block.values if block.values.dtype == acc else block.values.to(acc)
        # the coefficient goes on V (B x d_out), not on the (n x B) scores: A (c V) = (A c) V
        cv = block.coef_w if block.coef_w is not None else values * block.c_w[:, None]
        if self._w is not None:
            fold_memory(self._w, None, block.keys if block.keys.dtype == acc else block.keys.to(acc), cv, None)
        if self._b is not None:
            self._b += block.bias_sum if block.bias_sum is not None else block.c_b @ values
        if self.example_rows is not None and not self.fused:
            idx = block.example_column
            self.example_rows += torch.bincount(idx[idx >= 0], minlength=self.n_examples)[: self.n_examples]
        if self.fused:
            self._fold_fused(block, values, cv)
        else:
            self._fold_torch(block, values, cv)
        self.rows_seen += b

    def _fold_fused(self, block: Block, values: torch.Tensor, cv: torch.Tensor) -> None:
        meta = block.packed_meta
        if meta is None:
            meta = torch.stack([block.meta[c] for c in META_COLUMNS], dim=1).contiguous()
        groups = block.groups
        if self.mass and groups is None:
            cols = {"label": block.label_group, "epoch": block.meta["epoch"], "step": block.step_group}
            groups = torch.stack([cols[name] + off for name, off in self.mass_offsets.items()], dim=1).contiguous()
        index = block.example_column.contiguous()
        coef_b = None
        if self.units is not None:
            coef_b = block.coef_b if block.coef_b is not None else values * block.c_b[:, None]
            coef_b = coef_b.contiguous()
        cv = cv.contiguous()
        n = self.queries.shape[0]
        for q0 in range(0, n, self.query_chunk):
            q1 = min(q0 + self.query_chunk, n)
            st = block.scores_t[:, q0:q1] if block.scores_t is not None else self._scores_t(self.queries[q0:q1], block.keys)
            if self.with_dual and self._w is None:
                self._dual[q0:q1].addmm_(st.t(), cv)

            def rows(t: tuple | None) -> tuple | None:
                return None if t is None else tuple(x[q0:q1] for x in t)

            def cols(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t[:, q0:q1]

            _fused.fold(
                st, meta, k=self.top_k, top=rows(self._ftop),
                example=index if self.example_score is not None else None,
                example_tab=None if self.example_score is None else cols(self.example_score.t()),
                example_contrib_tab=None if self.example_contrib is None else cols(self.example_contrib.t()),
                groups=groups, mass=(cols(self._mass_store[0]), cols(self._mass_store[1])) if groups is not None else None,
                units=None if self.units is None else self.units[q0:q1].contiguous(), coef_w=cv if self.units is not None else None,
                coef_b=coef_b, pro=rows(self._fpro), con=rows(self._fcon),
                example_rows=self.example_rows if (q0 == 0 and self.example_score is not None) else None,
            )

    def _fold_torch(self, block: Block, values: torch.Tensor, cv: torch.Tensor) -> None:
        acc = self.base.dtype
        groups = {"label": block.label_group, "epoch": block.meta["epoch"], "step": block.step_group}
        # Mass per group as one small matmul against a one-hot matrix: far cheaper than a scatter.
        onehots = {
            name: torch.nn.functional.one_hot(groups[name], self.mass[name][0].shape[1]).to(acc)
            for name in self.mass
        }
        for ci, q0 in enumerate(range(0, self.queries.shape[0], self.query_chunk)):
            q1 = min(q0 + self.query_chunk, self.queries.shape[0])
            scan = block.scores_t[:, q0:q1].t() if block.scores_t is not None else block_scores(self.queries[q0:q1], block.keys)
            if self.top_k and self.exact_queries is not None:  # ranks on the scan's own (bf16) scores
                self.top[ci] = self._rescored_topk(self.top[ci], scan, block, q0, q1)
            needs_scores = (
                (self.with_dual and self._w is None) or onehots or self.example_score is not None
                or self.units is not None or (self.top_k and self.exact_queries is None)
            )
            if not needs_scores:
                continue
            scores = scan.to(acc) if scan.dtype != acc else scan
            if self.with_dual and self._w is None:
                self._dual[q0:q1].addmm_(scores, cv)
            if self.top_k and self.exact_queries is None:
                self.top[ci] = merge_topk(*self.top[ci], scores, block.meta, self.top_k)
            for name, oh in onehots.items():
                signed, absolute = self.mass[name]
                signed[q0:q1].addmm_(scores, oh)
                absolute[q0:q1].addmm_(scores.abs(), oh)
            if self.example_score is not None:
                scatter_sum(self.example_score[q0:q1], block.example_column, scores)
            if self.units is not None:
                # score * (c_w v)[u] + (c_b v)[u], as the compiled pass computes it (the coefficients per unit may
                # also come from the caller: an element-wise rule's pass)
                cb = block.coef_b if block.coef_b is not None else values * block.c_b[:, None]
                u = self.units[q0:q1]
                contrib = torch.addcmul(cb.t()[u].to(acc), scores, cv.t()[u].to(acc))
                if self.top_k:
                    self.pro[ci] = merge_topk(*self.pro[ci], contrib, block.meta, self.top_k)
                    self.con[ci] = merge_topk(*self.con[ci], contrib, block.meta, self.top_k, largest=False)
                if self.example_contrib is not None:
                    scatter_sum(self.example_contrib[q0:q1], block.example_column, contrib)

    def _rescored_topk(
        self, best: tuple, scores: torch.Tensor, block: Block, q0: int, q1: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Merge a low-precision block into the running exact top-k: re-score exactly every row that could
        belong to it. With ``|scan - exact| <= delta_q`` for every row of the block, a row can reach the
        final top-k only if ``scan >= L_q - delta_q``, where ``L_q`` is a lower bound of the k-th best exact
        score: the running one, or the block's k-th best scan score minus ``delta_q``."""
        exact_q = self.exact_queries[q0:q1]
        keys = block.exact_keys
        delta = bf16_score_bound(exact_q, keys)  # (m,)
        kb = min(self.top_k, scores.shape[1])
        lower = torch.topk(scores, kb, dim=1, sorted=True).values[:, -1].to(delta.dtype) - delta
        run_vals, run_meta = best
        if run_vals is not None and run_vals.shape[1] >= self.top_k:
            lower = torch.maximum(lower, run_vals[:, self.top_k - 1])
        thr = lower - delta
        if scores.dtype != thr.dtype:
            # compare in the scan's dtype, with the threshold rounded down (at most 2^-8 relative either way)
            thr = (thr - thr.abs() * 2.0**-7).to(scores.dtype)
        q_idx, r_idx = (scores >= thr[:, None]).nonzero(as_tuple=True)
        # in pieces of at most 2^24 gathered numbers, so that a degenerate block (ties everywhere, one huge
        # key) costs time, not memory
        step = max(1, (1 << 24) // max(1, keys.shape[1]))
        exact = torch.cat([(keys[r_idx[i : i + step]] * exact_q[q_idx[i : i + step]]).sum(dim=1)
                           for i in range(0, len(q_idx), step)]) if len(q_idx) else keys.new_zeros(0)
        # candidates into a padded (m, most per query) matrix; padding is -inf and never outranks a row
        m = scores.shape[0]
        counts = torch.bincount(q_idx, minlength=m)
        width = max(int(counts.max()), 1) if len(q_idx) else 1
        pos = torch.arange(len(q_idx), device=q_idx.device) - (torch.cumsum(counts, 0) - counts)[q_idx]
        vals = torch.full((m, width), float("-inf"), dtype=exact.dtype, device=exact.device)
        vals[q_idx, pos] = exact
        rows = torch.full((m, width), -1, dtype=torch.int64, device=exact.device)
        rows[q_idx, pos] = r_idx
        pad = rows < 0  # padding carries metadata -1, never a real row's
        cand_meta = {name: col[rows.clamp_min(0)].masked_fill(pad, -1) for name, col in block.meta.items()}
        top, meta = merge_topk(run_vals, run_meta, vals, cand_meta, self.top_k)
        seen = self.rows_seen + scores.shape[1]  # padding can fill the list only while fewer rows were seen
        return top[:, : min(self.top_k, seen)], {k: v[:, : min(self.top_k, seen)] for k, v in meta.items()}

    def _fused_rows(self, state: tuple | None, sign: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if state is None or self.rows_seen == 0:
            return None
        kk = min(self.top_k, self.rows_seen)
        vals, meta, _ = state
        vals = vals[:, :kk] * sign if sign < 0 else vals[:, :kk].clone()
        return vals, {name: meta[:, :kk, j].clone() for j, name in enumerate(META_COLUMNS)}

    @staticmethod
    def _joined(parts: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        if not parts or parts[0][0] is None:
            return None
        return torch.cat([p[0] for p in parts]), {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}

    def top_rows(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """``(n, k)`` best scores and their metadata, sorted best first."""
        if "top" in self._merged:
            return self._merged["top"]
        return self._fused_rows(self._ftop) if self.fused else self._joined(self.top)

    def proponents(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """``(n, k)`` largest contributions (may include non-positive ones when few rows help)."""
        if "pro" in self._merged:
            return self._merged["pro"]
        return self._fused_rows(self._fpro) if self.fused else self._joined(self.pro)

    def opponents(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """``(n, k)`` smallest (most negative) contributions."""
        if "con" in self._merged:
            return self._merged["con"]
        return self._fused_rows(self._fcon, -1) if self.fused else self._joined(self.con)

    def reduce(
        self,
        all_reduce: Callable[[torch.Tensor], None],
        all_gather: Callable[[torch.Tensor], list[torch.Tensor]],
    ) -> None:
        """Combine the partial results of several accumulators that each folded a share of the blocks.

        Every participant calls it with the same queries; afterwards each holds the result of folding all
        blocks: sums (dual, per-example sums, mass, row counts) are added with ``all_reduce`` (in place,
        summing), and each participant's running top-k is gathered with ``all_gather`` (a list of every
        participant's tensor) and merged. Give ``base`` to one participant only (zeros elsewhere): the dual
        outputs are summed. ``torch.distributed`` wraps as
        ``reduce(dist.all_reduce, lambda t: gather_list(t))``; tests pass plain functions.
        """
        dual = self.dual.contiguous()
        all_reduce(dual)
        self._dual, self._w, self._b = dual, None, None
        for t in self._sums:
            all_reduce(t)
        if self.example_rows is not None:
            all_reduce(self.example_rows)
        seen = torch.tensor([self.rows_seen], dtype=torch.int64, device=dual.device)
        all_reduce(seen)
        if not self.top_k:
            self.rows_seen = int(seen)
            return
        n, k, dev = self.queries.shape[0], self.top_k, dual.device
        merged = {}
        for name, get, sign in (("top", self.top_rows, 1), ("pro", self.proponents, 1), ("con", self.opponents, -1)):
            if name != "top" and self.units is None:
                continue
            vals = torch.full((n, k), float("-inf"), dtype=dual.dtype, device=dev)
            meta = torch.full((n, k, len(META_COLUMNS)), -1, dtype=torch.int64, device=dev)
            found = get()
            if found is not None:  # a participant with fewer than k rows (or none) pads with -inf
                v, m = found
                vals[:, : v.shape[1]] = v * sign
                meta[:, : v.shape[1]] = torch.stack([m[c] for c in META_COLUMNS], dim=2)
            all_vals, all_meta = torch.cat(all_gather(vals), dim=1), torch.cat(all_gather(meta), dim=1)
            kk = min(k, int(seen))
            rows = all_meta[:, :, META_COLUMNS.index("row")]
            pos = best_first(all_vals, rows.masked_fill(rows < 0, torch.iinfo(torch.int64).max), kk)
            top = all_vals.gather(1, pos)
            picked = all_meta.gather(1, pos[:, :, None].expand(-1, -1, len(META_COLUMNS)))
            merged[name] = (top * sign, {c: picked[:, :, j] for j, c in enumerate(META_COLUMNS)})
        self._merged = merged
        self.rows_seen = int(seen)
