"""Attention over many query examples at once: a store's recorded query sets (:func:`attend_recorded`) or any
inputs run through the model (:func:`attend_queries`), answered as one :class:`QueryAttention` that the analyses
(:mod:`lightning_dualform.analysis`), the CLI's ``attend`` and the demo share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from lightning_dualform._args import as_int
from lightning_dualform.attend.finite import nonfinite_rows, refuse_stored_nonfinite
from lightning_dualform.attend.inference import AttentionResult, DualInference
from lightning_dualform.attend.request import AttendRequest, Contribution, request_from

_R = AttendRequest  # the defaults of the attend knobs are the request's


@dataclass
class QueryAttention:
    """Queries and what :meth:`DualInference.attend` answered for them, per layer: the one type every
    caller of ``attend`` over many query examples shares (the analyses, the CLI's ``attend`` and its JSON,
    the demo, the pictures).

    Attributes:
        source: ``"split:<name>"`` for a recorded query set, else where the queries came from (a file).
        examples: ``(n,)`` positions of the chosen examples in the query set (row numbers for a file).
        index / label / prediction: ``(n,)`` their dataset index, label and the model's prediction (-1: unknown;
            for queries from a file, ``index`` is the row number).
        inputs: ``(n, ...)`` raw inputs of the examples for pictures, or ``None``.
        results: ``{layer: AttentionResult}``; a result has one row per query row of that layer.
        example: ``{layer: (R,)}`` which of the ``n`` examples each query row belongs to (``0..n-1``).
        position: ``{layer: (R,)}`` the row's position inside its example (a sequence step, a conv location).
        keys: ``{layer: (R, d_in)}`` the query rows themselves.
        settings: the ``attend`` arguments, for the JSON.
    """

    source: str
    examples: np.ndarray
    index: np.ndarray
    label: np.ndarray
    prediction: np.ndarray
    inputs: np.ndarray | None = None
    results: dict[str, AttentionResult] = field(default_factory=dict)
    example: dict[str, np.ndarray] = field(default_factory=dict)
    position: dict[str, np.ndarray] = field(default_factory=dict)
    keys: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> str | None:
        """The recorded query set, or None for queries from elsewhere."""
        return self.source[len("split:"):] if self.source.startswith("split:") else None

    @property
    def layers(self) -> list[str]:
        return list(self.results)

    @property
    def rows(self) -> dict[str, dict[str, np.ndarray]]:
        """``{layer: {"example": (R,), "position": (R,)}}`` of the attended rows."""
        return {n: {"example": self.example[n], "position": self.position[n]} for n in self.results}

    def queries(self, layer: str, examples: Sequence[int] | None = None) -> np.ndarray:
        """Query rows ``(r, d_in)`` of ``layer`` for the given example numbers (``0..n-1``; default: all)."""
        if examples is None:
            return self.keys[layer]
        return self.keys[layer][np.isin(self.example[layer], np.asarray(examples))]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, numbers and strings (what ``lightning-dualform attend --json`` writes)."""
        return {
            "source": self.source,
            "queries": {
                "index": self.index.tolist(),
                "label": self.label.tolist(),
                "prediction": self.prediction.tolist(),
            },
            "settings": self.settings,
            "query_rows": {k: {c: v.tolist() for c, v in r.items()} for k, r in self.rows.items()},
            "layers": {k: r.to_dict() for k, r in self.results.items()},
        }


def attend_recorded(
    di: DualInference,
    split: str = "test",
    *,
    layers: Sequence[str] | None = None,
    examples: Sequence[int] | np.ndarray | None = None,
    limit: int | None = None,
    positions: Callable[[str, np.ndarray], np.ndarray] | None = None,
    top_k: int = _R.top_k,
    request: AttendRequest | None = None,
    **attend_kwargs: Any,
) -> QueryAttention:
    """Attend every layer with the query rows a ``DualFormCallback(record_queries=...)`` run stored.

    Args:
        di: an open store.
        split: the recorded query set.
        layers: layers to attend (default: all that the query set has rows for).
        examples: positions of query examples to use (default: the first ``limit``, or all).
        limit: use the first ``limit`` examples (ignored when ``examples`` is given).
        positions: ``positions(layer, position_column) -> bool mask`` keeps only some rows of each example
            (e.g. the last step of a sequence); default: all rows.
        top_k: passed to :meth:`DualInference.attend` (capped at the layer's rows).
        request: a prepared :class:`~lightning_dualform.attend.request.AttendRequest` instead of the knobs, for
            every layer.
        **attend_kwargs: any other :meth:`DualInference.attend` knob (``at_step``, ``contribution_to`` ...), for
            every layer.

    Raises:
        KeyError: no such query set or layer.
        ValueError: ``examples`` outside the query set.
        StoreError: recorded query rows with NaN or inf (the store is damaged).
    """
    req = request_from("attend_recorded", request, {"top_k": top_k, **attend_kwargs})
    if limit is not None:
        limit = as_int(limit, "attend_recorded(limit=...)", lo=0, allowed="None or a non-negative integer")
    qs = di.store.queries(split)
    if examples is None:
        examples = np.arange(qs.n if limit is None else min(limit, qs.n))
    examples = np.asarray(examples, dtype=np.int64).reshape(-1)
    if len(examples) and (examples.min() < 0 or examples.max() >= qs.n):
        raise ValueError(
            f"`attend_recorded(examples=...)`: positions must lie in 0..{qs.n - 1} "
            f"(the {split!r} query set has {qs.n})."
        )
    names = list(layers) if layers is not None else [n for n in di.layers if n in qs.layers]
    raw = qs.inputs
    run = QueryAttention(f"split:{split}", examples, qs.index[examples], qs.label[examples], qs.prediction[examples],
                         inputs=None if raw is None else raw[examples])
    remap = np.full(qs.n, -1, dtype=np.int64)
    remap[examples] = np.arange(len(examples))
    for name in names:
        if name not in qs.layers:
            raise KeyError(f"the query set {split!r} has no rows for layer {name}; it has {', '.join(qs.layers)}.")
        rows = qs.layer_rows(name)
        keep = remap[rows["example"]] >= 0
        if positions is not None:
            keep &= np.asarray(positions(name, rows["position"]), dtype=bool)
        keys = rows["keys"][keep]
        _refuse_damaged_rows(di, split, name, keys, rows["example"][keep])
        run.example[name] = remap[rows["example"][keep]]
        run.position[name] = rows["position"][keep].astype(np.int64)
        run.keys[name] = keys
        if len(keys) == 0:
            continue
        k = min(req.top_k, di.layer(name).n_rows)
        run.results[name] = di.attend(name, torch.from_numpy(keys), request=req.replace(top_k=k))
    given = set(attend_kwargs) if request is None else set(req.to_dict())
    run.settings = {"top_k": req.top_k, "layers": names,
                    **{k: v for k, v in req.to_dict().items() if k in given and _jsonable(v)}}
    return run


def attend_queries(
    di: DualInference,
    *,
    split: str | None = None,
    positions: Sequence[int] | None = None,
    queries: np.ndarray | None = None,
    source: str = "",
    layers: Sequence[str] | None = None,
    top_k: int = _R.top_k,
    contribution_to: Contribution | str = _R.contribution_to,  # (str: "label" too)
    at_step: int | None = _R.at_step,
    step_buckets: int = _R.step_buckets,
    score: str = _R.score,
    request: AttendRequest | None = None,
) -> QueryAttention:
    """Attend recorded queries (``split`` + ``positions`` in recording order; default: all of them) or loaded
    ``queries`` ``(n, d)``, as ``lightning-dualform attend`` does.

    ``contribution_to`` (``"auto"``, ``"pred"``, ``"label"``, an output unit, or ``None``) ranks proponents and
    opponents at the store's last layer, whose output is the model's (``"auto"``, the default, and ``"pred"``:
    the predicted class there; ``"label"``: each query's recorded label). The other layers take
    :meth:`DualInference.attend`'s ``"auto"``: scores only in a scalar rule's store, and in an element-wise
    rule's store, whose attention weights depend on the unit, each layer's own predicted unit. ``score`` and the
    other knobs are :class:`~lightning_dualform.attend.request.AttendRequest`'s (each result says which score
    it used); ``request`` gives them all at once instead (its ``contribution_to`` then applies at the last layer).

    Raises:
        ValueError: neither ``split`` nor ``queries``, a query width no layer takes, a layer without recorded
            rows, ``contribution_to="label"`` without labels, or ``top_k`` larger than a layer's memory.
        KeyError: an unknown split or layer.
        StoreError: recorded query rows with NaN or inf (the store is damaged).
    """
    by_label = isinstance(contribution_to, str) and contribution_to == "label"
    knobs: dict[str, Any] = {"top_k": top_k, "at_step": at_step, "step_buckets": step_buckets, "score": score}
    if not by_label:
        knobs["contribution_to"] = contribution_to
    req = request_from("attend_queries", request, knobs)
    store = di.store
    all_layers = list(di.layers)
    last = all_layers[-1] if all_layers else None
    if queries is not None:
        q = np.asarray(queries)
        widths = {n: di.layer(n).d_in for n in all_layers}
        if layers is None:
            layers = [n for n in all_layers if widths[n] == q.shape[1]]
            if not layers:
                raise ValueError(
                    f"{source}: queries have width {q.shape[1]}, but no layer takes that width "
                    f"({_widths(widths)}); save queries of one of those widths."
                )
        for name in layers:
            if widths[name] != q.shape[1]:
                raise ValueError(
                    f"{source}: queries have width {q.shape[1]} but layer {name} takes {widths[name]} "
                    f"({_widths(widths)}); pick a matching --layer or save queries of width {widths[name]}."
                )
        m = q.shape[0]
        run = QueryAttention(source, np.arange(m), np.arange(m), np.full(m, -1), np.full(m, -1))
        ref = store.train_inputs(np.array([-1]))
        if ref is not None and int(np.prod(ref.shape[1:])) == q.shape[1]:
            run.inputs = q.reshape(m, *ref.shape[1:])
        per_layer = {n: (q, np.arange(m), np.zeros(m, dtype=np.int64)) for n in layers}
    else:
        if split is None:
            raise ValueError(
                f"`attend_queries`: pass split=... (the store's query sets: {store.query_splits or 'none'}) or "
                "queries=... (an array (n, d))."
            )
        qs = store.queries(split)
        if qs.n == 0:
            raise ValueError(f"{store.path}: the query set {split!r} is empty; record some with trainer.{split}(...).")
        pos = np.arange(qs.n) if positions is None else np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and (pos.min() < 0 or pos.max() >= qs.n):
            raise ValueError(
                f"`attend_queries(positions=...)`: positions must lie in 0..{qs.n - 1} "
                f"(the {split!r} query set has {qs.n})."
            )
        run = QueryAttention(f"split:{split}", pos, qs.index[pos], qs.label[pos], qs.prediction[pos],
                             inputs=qs.inputs_at(pos))  # only the chosen examples' rows are read
        if layers is None:
            layers = [n for n in all_layers if n in qs.layers]
        per_layer = {}
        where = np.full(qs.n, -1, dtype=np.int64)  # query number within the split -> number within this run
        where[pos] = np.arange(len(pos))
        for name in layers:
            if name not in qs.layers:
                raise KeyError(f"the query set {split!r} has no rows for layer {name}; it has {', '.join(qs.layers)}.")
            r = qs.layer_rows(name, examples=pos if positions is not None else None)
            keep = where[r["example"]] >= 0
            _refuse_damaged_rows(di, split, name, r["keys"][keep], r["example"][keep])
            per_layer[name] = (r["keys"][keep], where[r["example"][keep]], r["position"][keep].astype(np.int64))
    units_label = None
    if by_label:
        if (run.label < 0).any():
            raise ValueError("--contribution-to label: some queries have no recorded label; use pred or a unit number.")
        units_label = run.label
    run.settings = {"top_k": req.top_k, "contribution_to": "label" if by_label else req.to_dict()["contribution_to"],
                    "at_step": req.at_step, "step_buckets": req.step_buckets, "layers": list(layers),
                    "score": req.score}
    for name in layers:
        keys, example, position = per_layer[name]
        if len(keys) == 0:
            raise ValueError(f"layer {name}: no recorded rows for the chosen queries.")
        # the request's unit applies at the last layer; the others take "auto" (scores only with a scalar rule,
        # their own predicted unit with an element-wise rule)
        contrib: Any = req.contribution_to if name == last else "auto"
        if units_label is not None and name == last:  # (set where contribution_to="label")
            contrib = torch.as_tensor(units_label[example], dtype=torch.int64)
        n_rows = di.layer(name).n_rows
        if req.top_k > n_rows:
            if n_rows == 0:
                raise ValueError(f"layer {name} holds no training rows yet (its run committed no step): there is "
                                 "nothing to attend to.")
            raise ValueError(
                f"--top-k {req.top_k}: layer {name} holds only {n_rows} rows; use --top-k {n_rows} or less.")
        run.results[name] = di.attend(name, keys, request=req.replace(contribution_to=contrib))
        run.keys[name] = keys
        run.example[name] = example
        run.position[name] = position
    return run


def _refuse_damaged_rows(di: DualInference, split: str, layer: str, keys: np.ndarray, example: np.ndarray) -> None:
    """A recorded query row with NaN or inf is the store's damage, not a bad query of the user's: say so (a
    ``StoreError`` naming the query set, the layer and the query examples), before ``attend`` blames the queries."""
    bad = nonfinite_rows(keys)
    if bad:
        examples = sorted({int(e) for e in np.asarray(example)[bad]})
        refuse_stored_nonfinite(di.path, f"query set {split!r}, layer {layer!r} (queries/{split}/layers/{layer}/keys)",
                                examples, unit="the recorded query rows of query examples")


def _widths(widths: dict[str, int]) -> str:
    return ", ".join(f"{n} takes {w}" for n, w in widths.items())


def _jsonable(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


__all__ = ["QueryAttention", "attend_queries", "attend_recorded"]
