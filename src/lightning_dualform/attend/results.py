"""What a pass of :class:`~lightning_dualform.attend.inference.DualInference` returns: the result types
(:class:`AttentionResult`, :class:`TopRows`, :class:`TopExamples`, :class:`Mass`, :class:`Explanation`). A pass
fills them from its running tables with :mod:`lightning_dualform.attend.passes.assemble`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_dualform.attend.kernels import META_COLUMNS


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
    """Attention mass per group of one kind (``kind``: ``"label"``, ``"epoch"`` or ``"step"``): ``signed[i, g]``
    is the sum of query ``i``'s scores and ``absolute[i, g]`` the sum of their absolute values over the rows of
    group ``keys[g]``; ``(n, G)``. The scores are those :attr:`AttentionResult.score` names.

    Column ``g`` is **not** group ``g``: ``keys`` says which group each column holds. The label mass's first
    column is label ``-1`` (rows recorded without a label), so class ``c`` is column ``c + 1``; a step bucket's
    key is its first step (``edges`` adds the end step). Ask by key and the columns take care of themselves::

        m = res.mass["label"]
        m[3]                 # (n,) signed mass of class 3 (= m.signed_of(3))
        m.absolute_of(3)     # (n,) its absolute mass
        m.by_key()           # {-1: (n,), 0: (n,), ...}: every group's signed mass by key
        m.column(3)          # 4: the column of class 3 in m.signed and m.absolute
    """

    keys: torch.Tensor
    signed: torch.Tensor
    absolute: torch.Tensor
    edges: list[int] | None = None  # step buckets: [first step of each bucket..., end step]
    kind: str = ""

    def column(self, key: int) -> int:
        """The column of group ``key`` in :attr:`signed` and :attr:`absolute`.

        Raises:
            KeyError: no group has that key (the message lists them).
        """
        hits = (self.keys == int(key)).nonzero()
        if not len(hits):
            raise KeyError(f"{self.kind or 'this'} mass has no group {key!r}; its keys are {self.keys.tolist()}.")
        return int(hits[0, 0])

    def signed_of(self, key: int) -> torch.Tensor:
        """``(n,)`` the signed mass of group ``key`` for every query."""
        return self.signed[:, self.column(key)]

    def absolute_of(self, key: int) -> torch.Tensor:
        """``(n,)`` the absolute mass of group ``key`` for every query."""
        return self.absolute[:, self.column(key)]

    __getitem__ = signed_of

    def by_key(self, *, absolute: bool = False) -> dict[int, torch.Tensor]:
        """``{key: (n,)}``: every group's signed (or ``absolute``) mass, by its key."""
        table = self.absolute if absolute else self.signed
        return {int(k): table[:, g] for g, k in enumerate(self.keys.tolist())}

    def __repr__(self) -> str:
        keys = self.keys.tolist()
        shown = ", ".join(str(k) + (" (no label)" if self.kind == "label" and k < 0 else "") for k in keys[:12])
        more = f", ... ({len(keys)} groups)" if len(keys) > 12 else ""
        edges = "" if self.edges is None else f"; step edges {self.edges[0]}..{self.edges[-1]}"
        return (f"Mass({self.kind or 'groups'}: columns hold keys [{shown}{more}]; signed and absolute "
                f"{tuple(self.signed.shape)}{edges})")

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "keys": _list(self.keys), "signed": _list(self.signed),
             "absolute": _list(self.absolute)}
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
            ``-(Q_s[u, :] (.) k) . q`` (:data:`~lightning_dualform.attend.request.SCORES`).
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
    """What :meth:`DualInference.explain` returns.

    Attributes:
        output, prediction: the model's output for the batch and its argmax.
        layers: the paper's view, one :class:`AttentionResult` per tracked layer (queries = that layer's input
            rows for the batch); empty with ``attention=False``.
        influence: the answer to "which training examples does each prediction depend on": an
            :class:`~lightning_dualform.attribute.Influence` (every example's ``df/dw`` on each prediction's
            margin by default; ``.top(k)``: proponents and opponents), or None (``method=None``, or
            ``method="auto"`` where it does not apply).
        influence_note: why ``influence`` is None under ``method="auto"``, else None.
    """

    output: torch.Tensor | None
    prediction: torch.Tensor | None
    layers: dict[str, AttentionResult]
    influence: Any = None
    influence_note: str | None = None

    def __getitem__(self, layer: str) -> AttentionResult:
        return self.layers[layer]

    def to_dict(self, top_k: int = 10) -> dict[str, Any]:
        """Plain lists and numbers: influence first (its top ``top_k`` proponents and opponents per query, with what
        the scores are), then the prediction, the output and every layer's attention."""
        influence = None
        if self.influence is not None:  # the answer, not its timing: equal batches give equal JSON
            influence = {k: v for k, v in self.influence.to_dict(top_k).items() if k != "seconds"}
        return {
            "influence": influence,
            "influence_note": self.influence_note,
            "prediction": _list(self.prediction),
            "output": _list(self.output),
            "layers": {name: r.to_dict() for name, r in self.layers.items()},
        }


def overall_rel_err(dual: torch.Tensor, primal: torch.Tensor) -> float:
    """``||dual - primal||_F / ||primal||_F`` over all queries (a query whose output is near zero does not
    blow it up, as its own relative error would)."""
    d, p = dual.double(), primal.double()
    ref = float(torch.linalg.norm(p))
    diff = float(torch.linalg.norm(d - p))
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
