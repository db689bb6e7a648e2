"""The paper's analyses of a store, as functions of a :class:`DualInference` and its answers.

Irie, Csordás and Schmidhuber (ICML 2022) read each linear layer of a trained network as attention over
its training inputs and, for a set of test inputs, looked at

- the top-k training patterns per layer (:func:`top_rows`),
- every attention score ``k . q`` sorted within each class (:func:`score_curves`),
- the training steps at which the highest scores occur (:func:`top_score_steps`, :func:`step_histogram`),
- the total attention per class (:func:`class_mass`) and per task (:func:`task_mass`, where a task is any
  function of a row's dataset index, step or epoch that the caller names),
- the "vote": the class with the most attention mass, and how often it equals the label and the model's
  prediction, for correctly and for wrongly classified test inputs, per layer (:func:`vote_table`).

Functions that need every score stream the layer's rows in blocks (memory ``n_queries x block_rows``
plus what they return); the others only read an :class:`~lightning_dualform.attend.inference.AttentionResult`.
Nothing here draws: the examples (``examples/``) turn these numbers into figures.

Example::

    with DualInference("runs/mnist.h5") as di:
        run = attend_recorded(di, "test", limit=500, top_k=3)
        table = vote_table(run)
        print(table.to_markdown())
        curves = score_curves(di, "net.4", run.queries("net.4", [0]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch

from lightning_dualform._args import as_int
from lightning_dualform._float32_products import full_float32_products
from lightning_dualform.attend.inference import AttentionResult, DualInference
from lightning_dualform.attend.request import AttendRequest
from lightning_dualform.query_runs import QueryAttention, attend_queries, attend_recorded

_R = AttendRequest  # the defaults of the attend knobs are the request's

#: A task is a range or a set of values of the chosen column, or a predicate over a block of them.
TaskSpec = Union[range, Sequence[int], np.ndarray, Callable[[np.ndarray], np.ndarray]]
_MASS_KINDS = ("signed", "absolute")
_TASK_COLUMNS = ("index", "step", "epoch")


# ------------------------------------------------------------------------------------------------------
# top-k and their steps (from an AttentionResult)
# ------------------------------------------------------------------------------------------------------
def top_rows(result: AttentionResult, query: int, k: int | None = None, *, by: str = "row") -> list[dict[str, Any]]:
    """The ``k`` most attended training patterns of one query, best first, as plain dicts.

    Args:
        result: an :meth:`DualInference.attend` answer.
        query: which query row of it.
        k: how many (default: all that the result kept).
        by: ``"row"`` (one presentation of an example, with its ``step``/``epoch``/``position``; ranked by the
            result's ``score``), ``"example"`` (scores of all presentations summed; needs ``per_example=True``),
            or ``"proponents"`` / ``"opponents"`` (rows by contribution to the query's unit; needs
            ``contribution_to``; ``score`` is then the contribution).

    Raises:
        ValueError: a bad ``by``, or the result kept no top rows/examples.
    """
    kinds = {"row": "top", "example": "top_examples", "proponents": "proponents", "opponents": "opponents"}
    if by not in kinds:
        raise ValueError(f"`top_rows(by={by!r})`: expected one of {tuple(kinds)}.")
    top = getattr(result, kinds[by])
    if top is None:
        need = {
            "example": " and per_example=True",
            "proponents": " and contribution_to",
            "opponents": " and contribution_to",
        }
        raise ValueError(f"`top_rows(by={by!r})`: the result of layer {result.layer!r} kept none; attend with top_k > 0"
                         + need.get(by, "") + ".")
    by = "row" if by in ("proponents", "opponents") else by
    cols = (
        ("score", "row", "step", "epoch", "index", "position", "label")
        if by == "row"
        else ("score", "index", "label", "rows")
    )
    query = as_int(query, "top_rows(query=...)", lo=0, hi=top.score.shape[0] - 1)
    n = top.score.shape[1] if k is None else min(as_int(k, "top_rows(k=...)", lo=0), top.score.shape[1])
    pad = top.row if by == "row" else top.index
    out = []
    for j in range(n):
        if int(pad[query, j]) < 0:
            break
        out.append({c: getattr(top, c)[query, j].item() for c in cols})
    return out


def top_score_steps(result: AttentionResult, k: int | None = None) -> np.ndarray:
    """Training steps of each query's ``k`` highest-scoring rows: ``(n, k)`` int64, best first."""
    if result.top is None:
        raise ValueError(
            f"`top_score_steps`: the result of layer {result.layer!r} kept no top rows; attend with top_k > 0."
        )
    steps = result.top.step.numpy()
    return steps if k is None else steps[:, : as_int(k, "top_score_steps(k=...)", lo=0)]


def step_histogram(
    result: AttentionResult, first_step: int, bins: int = 20, k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram over all queries of the steps of their top-``k`` rows, over ``[first_step, result.at_step)``.

    Returns ``(edges (bins + 1,), counts (bins,))``.
    """
    bins = as_int(bins, "step_histogram(bins=...)", lo=1, hi=1 << 20)
    steps = top_score_steps(result, k)
    assert result.top is not None  # top_score_steps says so otherwise
    steps = steps[result.top.row.numpy()[:, : steps.shape[1]] >= 0]
    return_edges = np.linspace(first_step, max(result.at_step, first_step + 1), bins + 1)
    counts, _ = np.histogram(steps, bins=return_edges)
    return return_edges, counts


# ------------------------------------------------------------------------------------------------------
# mass per class and the vote
# ------------------------------------------------------------------------------------------------------
def class_mass(
    result: AttentionResult,
    *,
    kind: str = "signed",
    example: np.ndarray | None = None,
    n_examples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Total attention per class: ``(classes (C,), mass (n, C))``, rows with no label left out.

    ``mass[i, c]`` is the sum of ``k . q_i`` (``kind="signed"``) or of ``|k . q_i|`` (``"absolute"``) over every
    memory row whose label is ``classes[c]``. With ``example`` (``(R,)``, one entry per query row), the rows of
    one example (a sequence's steps, a convolution's locations) are summed: ``mass`` is then ``(n_examples, C)``.

    Raises:
        ValueError: the result has no label mass (attended with ``mass=False``) or the store has no labels.
    """
    if kind not in _MASS_KINDS:
        raise ValueError(f"`class_mass(kind={kind!r})`: expected one of {_MASS_KINDS}.")
    m = result.mass.get("label")
    if m is None:
        raise ValueError(
            f"`class_mass`: the result of layer {result.layer!r} has no label mass; attend with mass=True."
        )
    keys = m.keys.numpy()
    table = (m.signed if kind == "signed" else m.absolute).double().numpy()
    labelled = keys >= 0
    if not labelled.any():
        raise ValueError(
            f"`class_mass`: layer {result.layer!r} has no labelled memory rows (labels were stored as -1)."
        )
    classes, table = keys[labelled], table[:, labelled]
    if example is not None:
        example = np.asarray(example, dtype=np.int64)
        if len(example) != table.shape[0]:
            raise ValueError(f"`class_mass(example=...)`: {len(example)} entries for {table.shape[0]} query rows.")
        n = int(example.max()) + 1 if n_examples is None and len(example) else int(n_examples or 0)
        summed = np.zeros((n, table.shape[1]))
        np.add.at(summed, example, table)
        table = summed
    return classes, table


def votes(classes: np.ndarray, mass: np.ndarray) -> np.ndarray:
    """The class with the most attention mass per query: ``(n,)`` (``classes[argmax]``)."""
    return np.asarray(classes)[np.argmax(mass, axis=1)]


@dataclass
class VoteRow:
    """Vote rates of one layer. Rates are fractions; NaN where a group is empty."""

    layer: str
    n_correct: int
    n_wrong: int
    label_correct: float  # vote == label among correctly classified inputs (== vote == prediction there)
    label_wrong: float  # vote == label among wrongly classified inputs
    pred_wrong: float  # vote == prediction among wrongly classified inputs
    label_all: float
    pred_all: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VoteTable:
    """The paper's vote accuracy table: one :class:`VoteRow` per layer."""

    rows: list[VoteRow]
    kind: str = "signed"
    accuracy: float = float("nan")
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "accuracy": self.accuracy, "n": self.n, "rows": [r.to_dict() for r in self.rows]}

    def to_markdown(self, digits: int = 1) -> str:
        """A GitHub markdown table (percentages)."""

        def pct(x: float) -> str:
            return "–" if math.isnan(x) else f"{100 * x:.{digits}f}"

        c = self.rows[0].n_correct if self.rows else 0
        w = self.rows[0].n_wrong if self.rows else 0
        headers = ["layer", f"correct ({c}): vote = label = pred", f"wrong ({w}): vote = label",
                   f"wrong ({w}): vote = pred", f"all ({c + w}): vote = label", f"all ({c + w}): vote = pred"]
        body = [
            [r.layer, pct(r.label_correct), pct(r.label_wrong), pct(r.pred_wrong), pct(r.label_all), pct(r.pred_all)]
            for r in self.rows
        ]
        return markdown_table(headers, body)


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")


def vote_table(
    run: QueryAttention | Mapping[str, AttentionResult],
    label: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    *,
    example: Mapping[str, np.ndarray] | None = None,
    kind: str = "signed",
) -> VoteTable:
    """How often each layer's vote (class of most attention mass) equals the label and the prediction.

    Args:
        run: a :class:`QueryAttention` (its labels, predictions and row-to-example maps are used), or
            ``{layer: AttentionResult}`` with ``label`` and ``prediction`` given.
        label / prediction: ``(n,)`` per query example (override those of ``run``).
        example: ``{layer: (R,)}`` example of each query row, where a layer has several rows per example.
        kind: ``"signed"`` or ``"absolute"`` mass.

    Raises:
        ValueError: labels or predictions missing or of the wrong length.
    """
    if isinstance(run, QueryAttention):
        results = run.results
        label = run.label if label is None else label
        prediction = run.prediction if prediction is None else prediction
        example = run.example if example is None else example
    else:
        results = dict(run)
    if label is None or prediction is None:
        raise ValueError("`vote_table`: pass `label` and `prediction` (one per query example) with a dict of results.")
    label, prediction = np.asarray(label).reshape(-1), np.asarray(prediction).reshape(-1)
    n = len(label)
    if len(prediction) != n:
        raise ValueError(f"`vote_table`: {n} labels but {len(prediction)} predictions.")
    correct = label == prediction
    rows = []
    for name, res in results.items():
        ex = None if example is None else example.get(name)
        if ex is None and res.dual.shape[0] != n:
            raise ValueError(
                f"`vote_table`: layer {name!r} answered {res.dual.shape[0]} query rows for {n} examples; "
                "pass `example`."
            )
        classes, mass = class_mass(res, kind=kind, example=ex, n_examples=n)
        v = votes(classes, mass)
        rows.append(VoteRow(
            layer=name, n_correct=int(correct.sum()), n_wrong=int((~correct).sum()),
            label_correct=_rate((v == label)[correct]), label_wrong=_rate((v == label)[~correct]),
            pred_wrong=_rate((v == prediction)[~correct]), label_all=_rate(v == label), pred_all=_rate(v == prediction),
        ))
    return VoteTable(rows=rows, kind=kind, accuracy=_rate(correct), n=n)


# ------------------------------------------------------------------------------------------------------
# streamed analyses: every score of a few queries
# ------------------------------------------------------------------------------------------------------
def _as_queries(di: DualInference, layer: str, queries: Any, call: str) -> torch.Tensor:
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries)
    if q.dim() == 1:
        q = q[None]
    d_in = di.layer(layer).d_in
    if q.dim() != 2 or q.shape[1] != d_in:
        raise ValueError(f"`{call}`: queries of layer {layer!r} must be (n, {d_in}); got {tuple(q.shape)}.")
    return q.to(di.accumulate)


def iter_scores(
    di: DualInference, layer: str, queries: Any, *, at_step: int | None = None,
    columns: Sequence[str] = ("step", "epoch", "index", "position", "label"), block_rows: int | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, np.ndarray]]]:
    """Stream ``(scores (n, B), {column: (B,)})`` over the rows of ``layer`` the model after ``at_step``
    steps was built from. Scores are the paper's ``k . q`` (whatever the optimizer; the unit scores of an
    element-wise rule come from :meth:`DualInference.attend`), in the accumulation dtype, on the CPU."""
    lay = di.layer(layer)
    q = _as_queries(di, layer, queries, "iter_scores")
    if at_step is not None:
        at_step = as_int(at_step, "iter_scores(at_step=...)", allowed="None or an integer optimizer step")
    _, end = lay.end_step(at_step)
    n_rows = lay.rows_before(end)
    b = as_int(block_rows, "iter_scores(block_rows=...)", lo=1) if block_rows is not None else di.rows_per_block(lay)
    for start in range(0, n_rows, b):
        blk = lay.read(start, min(start + b, n_rows), ("keys", *columns))
        keys = torch.from_numpy(blk.pop("keys")).to(q.dtype)
        with full_float32_products():  # (not around the yield: the settings are process-wide)
            scores = q @ keys.t()
        yield scores, blk


def score_curves(
    di: DualInference, layer: str, queries: Any, *, at_step: int | None = None, by: str = "row",
) -> list[dict[int, np.ndarray]]:
    """Every attention score of each query, grouped by the training pattern's label and sorted (highest first).

    Args:
        by: ``"row"`` (one score per stored row: each presentation of an example) or ``"example"`` (the
            scores of an example's presentations summed).

    Returns:
        one ``{label: (m,) float64 descending}`` per query (label -1: rows without a label).

    Memory: ``n_queries x rows`` numbers; use it for a handful of queries.
    """
    if by not in ("row", "example"):
        raise ValueError(f"`score_curves(by={by!r})`: expected 'row' or 'example'.")
    parts, labels, index = [], [], []
    for s, meta in iter_scores(di, layer, queries, at_step=at_step, columns=("label", "index")):
        parts.append(s.double().numpy())
        labels.append(meta["label"])
        index.append(meta["index"])
    n = _as_queries(di, layer, queries, "score_curves").shape[0]
    scores = np.concatenate(parts, axis=1) if parts else np.zeros((n, 0))
    label = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if by == "example":
        idx = np.concatenate(index) if index else np.zeros(0, np.int64)
        known = idx >= 0
        uniq, inv = np.unique(idx[known], return_inverse=True)
        summed = np.zeros((n, len(uniq)))
        np.add.at(summed.T, inv, scores[:, known].T)
        ex_label = np.full(len(uniq), -1, np.int64)
        ex_label[inv] = label[known]
        scores, label = summed, ex_label
    out = []
    for i in range(n):
        out.append({int(c): np.sort(scores[i, label == c])[::-1].copy() for c in np.unique(label)})
    return out


@dataclass
class TaskMass:
    """Attention mass per task: ``signed``/``absolute`` ``(n, T)``, ``rows`` ``(T,)`` memory rows per task.

    ``tasks`` names the columns; rows in no task fall in a last column ``"other"`` (present only when some do).
    """

    tasks: list[str]
    signed: np.ndarray
    absolute: np.ndarray
    rows: np.ndarray

    def share(self, kind: str = "absolute") -> np.ndarray:
        """Each task's fraction of a query's total mass, ``(n, T)``."""
        m = self.signed if kind == "signed" else self.absolute
        tot = m.sum(1, keepdims=True)
        return np.divide(m, tot, out=np.full_like(m, np.nan), where=tot != 0)


def _task_of(column: np.ndarray, tasks: Mapping[str, TaskSpec]) -> np.ndarray:
    """Task number of each value (first matching task wins), ``len(tasks)`` for none."""
    out = np.full(len(column), len(tasks), dtype=np.int64)
    free = np.ones(len(column), dtype=bool)
    for t, spec in enumerate(tasks.values()):
        if callable(spec):
            hit = np.asarray(spec(column), dtype=bool)
        elif isinstance(spec, range) and spec.step == 1:
            hit = (column >= spec.start) & (column < spec.stop)
        else:
            hit = np.isin(column, np.asarray(list(spec) if isinstance(spec, range) else spec))
        hit &= free
        out[hit] = t
        free &= ~hit
    return out


def task_mass(
    di: DualInference, layer: str, queries: Any, tasks: Mapping[str, TaskSpec], *, by: str = "index",
    at_step: int | None = None,
) -> TaskMass:
    """Total attention of each query on the training rows of each task.

    Args:
        tasks: ``{name: spec}``; ``spec`` selects values of the ``by`` column: a ``range`` (e.g. the dataset
            indices of one dataset of a ``ConcatDataset``, or the steps of one phase of continual
            learning), a sequence of values, or a function ``values (B,) -> bool mask (B,)``.
        by: ``"index"`` (dataset index), ``"step"`` (global optimizer step) or ``"epoch"``.

    Example::

        tm = task_mass(di, "net.0", q, {"mnist": range(0, 8000), "fashion": range(8000, 16000)})
        tm.share()[:, 0]   # fraction of each query's attention on MNIST training patterns
    """
    if by not in _TASK_COLUMNS:
        raise ValueError(f"`task_mass(by={by!r})`: expected one of {_TASK_COLUMNS}.")
    if not tasks:
        raise ValueError("`task_mass(tasks={})`: name at least one task.")
    n = _as_queries(di, layer, queries, "task_mass").shape[0]
    width = len(tasks) + 1
    signed, absolute, rows = np.zeros((n, width)), np.zeros((n, width)), np.zeros(width, np.int64)
    for s, meta in iter_scores(di, layer, queries, at_step=at_step, columns=(by,)):
        group = torch.from_numpy(_task_of(meta[by], tasks))
        s = s.double()
        signed += torch.zeros(n, width, dtype=torch.float64).index_add_(1, group, s).numpy()
        absolute += torch.zeros(n, width, dtype=torch.float64).index_add_(1, group, s.abs()).numpy()
        rows += np.bincount(group.numpy(), minlength=width)
    names = list(tasks)
    if rows[-1] == 0:
        signed, absolute, rows = signed[:, :-1], absolute[:, :-1], rows[:-1]
    else:
        names.append("other")
    return TaskMass(tasks=names, signed=signed, absolute=absolute, rows=rows)


# ------------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are written with 4 significant digits."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            return "–" if math.isnan(x) else f"{x:.4g}"
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


__all__ = [
    "QueryAttention",
    "TaskMass",
    "VoteRow",
    "VoteTable",
    "attend_queries",
    "attend_recorded",
    "class_mass",
    "iter_scores",
    "markdown_table",
    "score_curves",
    "step_histogram",
    "task_mass",
    "top_rows",
    "top_score_steps",
    "vote_table",
    "votes",
]
