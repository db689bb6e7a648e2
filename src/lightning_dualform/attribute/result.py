"""What an influence pass returns: the dense table of scores, one column per training example."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

#: What each method's score is (``Influence.method``), for labels in results, the CLI and the viewer.
METHOD_MEANING = {
    "first_order": "first-order change of f at the final model when the example's loss weight grows (the dual "
                   "form's rows, weighted by df/dy at every recorded layer)",
    "every_step": "TracIn at every recorded step: the example's update at each step it was in, against df/dtheta "
                  "of the model at that step (the model replayed from the store)",
    "metagradient": "exact df/dw of the final model with respect to the example's loss weight, through the whole "
                    "training (MAGIC's metagradient)",
}


@dataclass
class TopInfluence:
    """The ``k`` most positive (proponents) or most negative (opponents) examples per query; ``(n, k)``."""

    index: np.ndarray
    score: np.ndarray
    label: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index.tolist(), "score": self.score.tolist(), "label": self.label.tolist()}


@dataclass
class Influence:
    """Influence of every training example on every query.

    Attributes:
        scores: ``(n_queries, n_examples)``: ``df_q / dw_i`` where ``w_i`` is example ``i``'s loss weight (its
            term in the training loss is multiplied by ``w_i``; 1 in the run, 0 removes it). Positive: up-weighting
            the example raises ``f``; removing it is predicted to change ``f`` by ``-score`` (first order).
        examples: ``(n_examples,)`` the dataset index of each column (sorted).
        labels: ``(n_examples,)`` each example's stored label (-1: none).
        values: ``(n_queries,)`` ``f`` of each query at the final model.
        target: what ``f`` is (``"margin"``, ``"loss"``, ``"logit"``, or a callable's name).
        method: ``"first_order"``, ``"every_step"`` or ``"metagradient"`` (:data:`METHOD_MEANING`).
        layers: the tracked layers the scores cover.
        replay: for replaying methods, how closely the replay followed the stored run (see
            :class:`~lightning_dualform.attribute.metagradient.ReplayReport`), else None.
        seconds: wall time of the pass.
    """

    scores: torch.Tensor
    examples: np.ndarray
    labels: np.ndarray
    values: torch.Tensor
    target: str
    method: str
    layers: list[str]
    replay: Any = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def meaning(self) -> str:
        return METHOD_MEANING.get(self.method, self.method)

    def column(self, index: int) -> int:
        """The column of dataset index ``index``.

        Raises:
            KeyError: the store has no rows of that example.
        """
        pos = int(np.searchsorted(self.examples, index))
        if pos >= len(self.examples) or self.examples[pos] != index:
            raise KeyError(f"dataset index {index} has no rows in the store")
        return pos

    def top(self, k: int = 10) -> tuple[TopInfluence, TopInfluence]:
        """``(proponents, opponents)``: per query the ``k`` examples with the largest and the most negative
        scores, best first. A query with fewer than ``k`` positive (negative) scores is padded with index -1
        and score 0."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`Influence.top(k={k!r})` must be a positive integer.")
        k = min(int(k), self.scores.shape[1])
        s = self.scores.to(torch.float64)
        out = []
        for sign in (1.0, -1.0):
            val, col = torch.topk(sign * s, k, dim=1)
            keep = val > 0
            idx = np.where(keep.numpy(), self.examples[col.numpy()], -1)
            lab = np.where(keep.numpy(), self.labels[col.numpy()], -1)
            out.append(TopInfluence(idx, (sign * val * keep).numpy(), lab))
        return out[0], out[1]

    def to_dict(self, k: int = 10) -> dict[str, Any]:
        """JSON-ready summary: the top ``k`` proponents and opponents per query (not the whole table)."""
        pro, opp = self.top(k)
        return {"method": self.method, "meaning": self.meaning, "target": self.target, "layers": self.layers,
                "n_examples": int(len(self.examples)), "values": self.values.tolist(),
                "proponents": pro.to_dict(), "opponents": opp.to_dict(), "seconds": self.seconds,
                "replay": self.replay.to_dict() if self.replay is not None else None}
