"""The views' answer to "which training examples?": influence, from the store alone or with the model.

From the store alone (the CLI's ``attend``, the viewer without ``--model``): for queries attended by
:func:`~lightning_dualform.cli.attend.attend_run`, the training examples ranked by their first-order influence on
each prediction's margin through the output layer only
(:func:`~lightning_dualform.attribute.output_layer.output_layer_influence`: the output layer's input rows are the
recorded queries, its outputs the stored final weights', or for a store still being written the dual form's).
Hidden layers need the model (``df/dy`` there depends on the layers above): ``lightning-dualform influence STORE
--model MODULE:FACTORY`` and ``view --model`` score every layer, and replay training (``every_step``,
``metagradient``): :func:`model_influence`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_dualform.cli.output import table

if TYPE_CHECKING:
    import torch

    from lightning_dualform.query_runs import QueryAttention
    from lightning_dualform.attribute.influence import Method

#: what the views say beside the store-only score
WITH_MODEL = ("hidden layers need the model: `lightning-dualform influence STORE --model MODULE:FACTORY` scores every "
              "recorded layer, or replays training (--method every_step, metagradient)")


def unavailable(reason: str) -> dict[str, Any]:
    """The answer where no influence can be computed, with the reason (no ``queries``)."""
    return {"method": None, "label": "influence not available", "note": reason, "queries": []}


def store_influence(di: Any, run: "QueryAttention", top_k: int) -> dict[str, Any]:
    """The first-order influence on each query's predicted margin through the store's output layer, as
    :func:`~lightning_dualform.attribute.views.influence_answer` writes it (``note``: what it leaves out), or
    :func:`unavailable` with the reason.

    Args:
        di: the open store (a :class:`~lightning_dualform.DualInference`).
        run: the queries as ``attend_run`` attended them.
        top_k: proponents and opponents per query.
    """
    store = di.store
    last = di.layers[-1] if di.layers else None
    if last is None:
        return unavailable("the store tracks no layer")
    at_step = run.settings.get("at_step")
    if at_step is not None and at_step < di.last_step:
        return unavailable(f"influence is of the trained model (step {di.last_step}); --at-step {at_step} shows "
                           "attention only")
    n = len(run.index)
    keys, example = _output_rows(store, run, last)
    if keys is None:
        return unavailable(f"the queries have no rows at the output layer {last}")
    if len(example) != n or not np.array_equal(np.sort(example), np.arange(n)):
        return unavailable(f"the output layer {last} sees several rows per query (a sequence or a convolution); pass "
                           "the model (`influence --model`)")
    import torch

    order = np.argsort(example)
    res_last = run.results.get(last)
    outputs = None  # a complete store: the stored final weights, in float64 (as /api/influence and `influence`)
    if res_last is not None and not store.complete:
        outputs = res_last.dual[torch.as_tensor(order)]
    return output_rows_influence(di, np.asarray(keys)[order], top_k, outputs=outputs)


def output_rows_influence(di: Any, keys: np.ndarray, top_k: int,
                          outputs: "torch.Tensor | None" = None) -> dict[str, Any]:
    """:func:`store_influence` for the output layer's query rows ``keys`` ``(n, d_in)``, one per query (their
    outputs: ``outputs``, else the stored final weights, else, for a store still being written, the dual form's)."""
    import torch

    from lightning_dualform.attribute.output_layer import output_layer_influence
    from lightning_dualform.attribute.views import influence_answer

    last = di.layers[-1]
    q = torch.as_tensor(keys)
    if outputs is None and not di.store.complete:
        outputs = di.attend(last, q, top_k=0, per_example=False, mass=False).dual
    try:
        res = output_layer_influence(_ReadThrough(di), q, layer=last, outputs=outputs,
                                     block_rows=di.rows_per_block(di.layer(last)))
    except ValueError as err:
        return unavailable(str(err.args[0]) if err.args else str(err))
    answer = influence_answer(res, top_k, list(di.layers))
    answer["note"] = WITH_MODEL if len(di.layers) > 1 else None
    return answer


def _output_rows(store: Any, run: "QueryAttention", last: str) -> tuple[Any, Any]:
    """The output layer's query rows and the query each belongs to: from the run, else from the recorded split."""
    if last in run.keys:
        return run.keys[last], run.example[last]
    split = run.split
    if split is None:
        return None, None
    qs = store.queries(split)
    if last not in qs.layers:
        return None, None
    rows = qs.layer_rows(last, examples=run.examples)
    where = np.full(qs.n, -1, dtype=np.int64)
    where[run.examples] = np.arange(len(run.examples))
    example = where[rows["example"]]
    keep = example >= 0
    return rows["keys"][keep], example[keep]


class _ReadThrough:
    """The store as :class:`~lightning_dualform.DualInference` reads it: its layers through the block cache when
    it has one (the viewer's), in the blocks its passes read, so that the influence after an ``attend`` reads
    nothing from disk."""

    def __init__(self, di: Any) -> None:
        self._di = di
        self.layers = list(di.layers)
        self.path = di.store.path
        self.form = di.store.form

    def layer(self, name: str) -> Any:
        return self._di.layer(name)


def render_influence(answer: dict[str, Any], j: int, indent: str = "  ") -> list[str]:
    """Text lines of query ``j``'s proponents and opponents (one table, labelled), or nothing."""
    qs = answer.get("queries") or []
    if j >= len(qs):
        return []
    q = qs[j]
    col = f"d{answer['target']}/dw" if answer.get("target") in ("margin", "loss", "logit") else "df/dw"
    scope = ", ".join(answer["layers"]) + (" only" if answer.get("scope") == "output layer" else "")
    cls = "" if q.get("class") is None else f" of class {q['class']}"
    method = answer["method"].replace("_", " ")
    head = (f"{indent}which examples ({method} influence through {scope}): {answer['target']}{cls} = "
            f"{q['value']:+.4g}; {col} per training example")
    pro, opp = q["proponents"], q["opponents"]
    rows = []
    for r in range(max(len(pro), len(opp))):
        a = pro[r] if r < len(pro) else None
        b = opp[r] if r < len(opp) else None
        rows.append([r + 1,
                     a["index"] if a else "", a["label"] if a else "", f"{a['score']:+.4g}" if a else "",
                     b["index"] if b else "", b["label"] if b else "", f"{b['score']:+.4g}" if b else ""])
    if not rows:
        return [head + ": every score is 0"]
    return [head, table(["rank", "proponent", "label", col, "opponent", "label", col], rows, indent=indent + "  ")]


def influence_heading(answer: dict[str, Any]) -> list[str]:
    """The lines above the queries: what the influence numbers are, and what they leave out."""
    if not answer.get("queries"):
        return [f"which examples: influence not available ({answer.get('note')})"]
    out = [f"which examples: {answer['label']}"]
    if answer.get("note"):
        out.append(f"  ({answer['note']})")
    return out


def model_influence(di: Any, model: Any, inputs: Any, method: "Method", top_k: int) -> dict[str, Any]:
    """Influence of every training example on the margin of each query's prediction, with the model: every recorded
    layer (``"first_order"``), TracIn at every step or the exact metagradient, as
    :func:`~lightning_dualform.attribute.views.influence_answer` writes it.

    Args:
        di: the open store.
        model: the trained model (the store's final weights in its tracked layers).
        inputs: ``(n, ...)`` the queries' raw inputs, as the model takes them.
        method: ``"first_order"``, ``"every_step"`` or ``"metagradient"``.
        top_k: proponents and opponents per query.
    """
    import torch

    from lightning_dualform.attribute import influence
    from lightning_dualform.attribute.views import influence_answer

    x = torch.as_tensor(np.asarray(inputs)).float()
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            pred = model(x).argmax(-1)
        finally:
            model.train(was)
    res = influence(di.store, model, x, pred, method=method)
    answer = influence_answer(res, top_k, list(di.layers), classes=pred)
    answer["note"] = None
    return answer
