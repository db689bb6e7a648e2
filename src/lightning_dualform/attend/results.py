"""What a pass of :class:`~lightning_dualform.attend.inference.DualInference` returns: the result types
(:class:`AttentionResult`, :class:`TopRows`, :class:`TopExamples`, :class:`Mass`, :class:`Explanation`) and the
small functions that turn an accumulator's running tables into them (top rows, top examples, relative errors)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_dualform.attend import _fused
from lightning_dualform.attend.kernels import META_COLUMNS, stable_topk


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
