"""Turning a pass's running tables (an :class:`~lightning_dualform.attend.kernels.AttentionAccumulator`) into
the :class:`~lightning_dualform.attend.results.AttentionResult` it returns: one function per part of the answer,
so that each pass assembles what it computed and nothing else.

- :func:`new_result`: the layer's outputs (``dual``, ``primal``, ``rel_err``, ``explained``);
- :func:`add_top`: the top rows and examples by score;
- :func:`add_contributions`: proponents and opponents, rows and examples, for the units asked about;
- :func:`add_mass`: the mass per label, epoch and step bucket;
- :func:`top_rows`, :func:`top_examples`: the small conversions behind them.
"""

from __future__ import annotations

import numpy as np
import torch

from lightning_dualform.attend import _fused
from lightning_dualform.attend.kernels import AttentionAccumulator, stable_topk, step_bucket_edges
from lightning_dualform.attend.results import AttentionResult, Mass, TopExamples, TopRows
from lightning_dualform.attend.stats import LayerStats

_CPU = torch.device("cpu")


def new_result(
    layer: str, *, at_step: int, rows: int, dual: torch.Tensor, primal: torch.Tensor | None = None,
    residual: torch.Tensor | None = None, exact_store: bool, dual_source: str, score: str,
) -> AttentionResult:
    """A result with the layer's outputs: ``dual`` (plus an inexact store's ``residual``), ``primal``, the
    per-query ``rel_err`` and, for an inexact store, the share ``explained`` by the memory."""
    if residual is not None:
        dual = dual + residual.to(dual)
    res = AttentionResult(layer=layer, at_step=at_step, rows=rows, dual=dual.to(_CPU), exact_store=exact_store,
                          dual_source=dual_source, score=score)
    if primal is not None:
        res.primal = primal.to(_CPU, dual.dtype)
        res.rel_err = rel_rows(res.dual, res.primal)
    if residual is not None:
        ref = res.primal if res.primal is not None else res.dual
        res.explained = (1 - norm_rows(residual.to(_CPU, ref.dtype)) / norm_rows(ref).clamp_min(1e-30)).clamp_min(0)
    return res


def add_top(res: AttentionResult, state: AttentionAccumulator, stats: LayerStats | None) -> None:
    """``top`` (rows by score) and ``top_examples`` (examples by summed score) from ``state``."""
    found = state.top_rows()
    if found is not None:
        res.top = top_rows(found)
    if state.example_score is not None and stats is not None and state.top_k:
        present = state.example_rows > 0
        ex_label = torch.from_numpy(stats.example_label).to(present.device)
        res.top_examples = top_examples(state.example_score, present, state.example_rows, ex_label, state.top_k, 0,
                                        stats.example_ids)


def add_contributions(
    res: AttentionResult, state: AttentionAccumulator, stats: LayerStats | None, units: torch.Tensor
) -> None:
    """``units``, ``proponents`` / ``opponents`` (rows by positive / negative contribution) and the same summed
    per example, from the state that folded the contributions."""
    res.units = units.to(_CPU)
    top_k = state.top_k
    if not top_k:
        return
    res.proponents = top_rows(state.proponents(), sign=1)
    res.opponents = top_rows(state.opponents(), sign=-1)
    if state.example_contrib is not None and stats is not None:
        present = state.example_rows > 0
        ex_label = torch.from_numpy(stats.example_label).to(present.device)
        sums, rows, ids = state.example_contrib, state.example_rows, stats.example_ids
        res.proponent_examples = top_examples(sums, present, rows, ex_label, top_k, 1, ids)
        res.opponent_examples = top_examples(sums, present, rows, ex_label, top_k, -1, ids)


def add_mass(
    res: AttentionResult, state: AttentionAccumulator, *, first_step: int, end_step: int, step_buckets: int
) -> None:
    """``mass``: each group kind's signed and absolute sums with the key of every column (the label, ``-1`` for
    none; the epoch; the first step of each step bucket, with the buckets' edges)."""
    for name, (signed, absolute) in state.mass.items():
        edges = None
        if name == "label":
            keys = torch.arange(-1, signed.shape[1] - 1)
        elif name == "epoch":
            keys = torch.arange(signed.shape[1])
        else:
            edges = step_bucket_edges(first_step, end_step, step_buckets)
            keys = torch.tensor(edges[:-1])
        res.mass[name] = Mass(keys=keys, signed=signed.to(_CPU).contiguous(), absolute=absolute.to(_CPU).contiguous(),
                              edges=edges, kind=name)


# ------------------------------------------------------------------------------------------------------
# the conversions
# ------------------------------------------------------------------------------------------------------
def norm_rows(x: torch.Tensor) -> torch.Tensor:
    """``(n,)`` Euclidean norm of each row of ``(n, d)``."""
    return torch.linalg.vector_norm(x, dim=1)


def rel_rows(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``(n,)`` ``||x_i - ref_i|| / ||ref_i||``."""
    return norm_rows(x - ref) / norm_rows(ref).clamp_min(torch.finfo(ref.dtype).tiny)


def top_rows(found: tuple[torch.Tensor, dict[str, torch.Tensor]], sign: int = 0) -> TopRows:
    """A running top-k ``(scores (n, k), {column: (n, k)})`` as :class:`TopRows` on the CPU. ``sign`` 1 / -1:
    proponents / opponents, whose entries of the wrong sign (fewer rows help or hurt than ``k``) become padding
    (``row == -1``, score 0)."""
    score, meta = found
    score = score.to(_CPU)
    meta = {k: v.to(_CPU) for k, v in meta.items()}
    if sign:
        pad = score * sign <= 0
        meta = {k: v.masked_fill(pad, -1) for k, v in meta.items()}
        score = score.masked_fill(pad, 0.0)
    return TopRows(score=score, **meta)


def top_examples(
    sums: torch.Tensor, present: torch.Tensor, rows: torch.Tensor, ex_label: torch.Tensor, k: int, sign: int,
    ids: np.ndarray | None = None,
) -> TopExamples:
    """Top-k examples of ``(n, n_examples)`` sums; ``sign`` 0: largest, 1: largest positive, -1: most negative.
    ``ids``: the dataset index of each column when the examples were numbered densely."""
    largest = sign >= 0
    kk = min(k, int(present.sum()))
    if sums.device.type == "cpu" and sums.t().is_contiguous() and _fused.kernel() is not None:
        # the fused pass's (n_examples, n) table: one more threshold pass, no transposed copy of the table
        score, index = fused_topk_rows(sums.t(), present, kk, largest)
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
    return TopExamples(score=score.to(_CPU), index=index.to(_CPU), label=label.to(_CPU), rows=nrows.to(_CPU))


def fused_topk_rows(
    table_t: torch.Tensor, present: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(table_t[present].T, k, dim=1)`` for an ``(E, n)`` table, with the compiled threshold pass."""
    idx = torch.arange(table_t.shape[0])
    if not bool(present.all()):
        idx = present.nonzero().squeeze(1)
        table_t = table_t.index_select(0, idx)
    n, dt = table_t.shape[1], table_t.dtype
    meta = idx[:, None].contiguous()

    def running() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        meta_k = torch.full((n, k, 1), -1, dtype=torch.int64)
        return torch.zeros(n, k, dtype=dt), meta_k, torch.zeros(n, dtype=torch.int64)

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
