"""What the library's "which examples?" views (``explain``, the CLI, the pictures, the viewer) show by default:
influence on the prediction's margin, labelled with what it is.

:func:`which_examples` is the one call those views make: for each query, the training examples whose up-weighting
raises (proponents) or lowers (opponents) the margin of its class the most, with the label of what the numbers
mean. ``attend``'s attention weights remain available as the paper's view, labelled as such.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_dualform.attribute.influence import Method, influence
from lightning_dualform.attribute.result import METHOD_MEANING, Influence
from lightning_dualform.attribute.targets import Target

#: How a view labels the attention weights of ``attend`` beside influence.
ATTENTION_MEANING = ("attention weight k . q of a stored row (the paper's view: how the layer's output is assembled "
                     "from its training rows; not a prediction of what removing the example would do)")


#: How a view names each method, short (a heading's first words).
METHOD_TITLE = {"first_order": "first-order influence", "every_step": "TracIn at every step",
                "metagradient": "exact metagradient (MAGIC)"}
#: What each built-in target is, for the views' labels.
TARGET_MEANING = {"margin": "the margin of the class (its logit minus the logsumexp of the others)",
                  "loss": "the cross-entropy loss of the class", "logit": "the logit of the class"}


def influence_label(res: Influence, all_layers: list[str] | None = None) -> str:
    """One line that says what the numbers of ``res`` are: the method, the target and the layers they cover.

    Args:
        res: an influence table.
        all_layers: the store's tracked layers; when ``res`` covers fewer, the label says which ("through layer
            net.4 only").
    """
    title = METHOD_TITLE.get(res.method, res.method)
    what = f"d{res.target}/dw" if res.target in TARGET_MEANING else f"df/dw (f = {res.target})"
    plural = "s" if len(res.layers) > 1 else ""
    if res.method != "first_order":
        scope = "through the replayed training"
    elif all_layers is not None and list(res.layers) == list(all_layers):
        scope = f"all {len(res.layers)} recorded layer{plural}"
    elif all_layers is not None:
        scope = f"through layer{plural} {', '.join(res.layers)} only"
    else:
        scope = f"through layer{plural} {', '.join(res.layers)}"
    return (f"{title} on the {res.target} ({scope}): {what}, the change of the {res.target} per unit of the "
            "example's loss weight (positive: up-weighting the example raises it)")


def influence_meaning(res: Influence, all_layers: list[str] | None = None) -> str:
    """What a score of ``res`` is, in full (:data:`~.result.METHOD_MEANING`, narrowed to the layers it covers)."""
    if res.method == "first_order" and (all_layers is None or list(res.layers) != list(all_layers)):
        return ("first-order change of f at the final model when the example's loss weight grows (the dual form's "
                f"rows of {', '.join(res.layers)} only, weighted by df/dy there)")
    return METHOD_MEANING.get(res.method, res.method)


def influence_answer(res: Influence, top_k: int = 10, all_layers: list[str] | None = None,
                     classes: Any = None) -> dict[str, Any]:
    """The JSON every view shows of an influence table: per query, its ``f`` and the ``top_k`` proponents and
    opponents, with what the numbers are (``label``; no timing, so equal questions give equal answers).

    Args:
        res: the table.
        top_k: proponents and opponents per query.
        all_layers: the store's tracked layers (the label then says when ``res`` covers fewer).
        classes: ``(n,)`` the class each query's ``f`` is about (default: ``res.extra["targets"]`` if any).

    Returns:
        ``{"method", "target", "layers", "scope", "label", "meaning", "n_examples", "queries": [{"class", "value",
        "proponents": [{"index", "label", "score"}, ...], "opponents": [...]}, ...], "replay"}``.
    """
    pro, opp = res.top(top_k)
    classes = res.extra.get("targets") if classes is None else [int(c) for c in classes]
    queries = []
    for q in range(res.scores.shape[0]):
        def side(top: Any) -> list[dict[str, Any]]:
            return [{"index": int(i), "label": int(lab), "score": float(s)}
                    for i, lab, s in zip(top.index[q], top.label[q], top.score[q]) if i >= 0]
        queries.append({"class": None if classes is None else int(classes[q]), "value": float(res.values[q]),
                        "proponents": side(pro), "opponents": side(opp)})
    scope = res.extra.get("scope") or ("all layers" if all_layers is not None and list(res.layers) == list(all_layers)
                                       else "the layers listed")
    return {"method": res.method, "target": res.target, "layers": list(res.layers), "scope": scope,
            "label": influence_label(res, all_layers), "meaning": influence_meaning(res, all_layers),
            "n_examples": int(len(res.examples)), "queries": queries,
            "replay": res.replay.to_dict() if res.replay is not None else None}


def which_examples(store: Any, model: nn.Module, inputs: Any, targets: Any = None, *, top_k: int = 10,
                   method: Method = "first_order", target: Target = "margin", **kwargs: Any) -> dict[str, Any]:
    """JSON-ready answer to "which training examples does each prediction depend on?".

    Args:
        store: an opened store or a path.
        model, inputs, targets: as for :func:`~lightning_dualform.attribute.influence` (``targets=None``: each
            query's predicted class, so the margin is the prediction's).
        top_k: proponents and opponents per query.
        method, target, **kwargs: passed to :func:`~lightning_dualform.attribute.influence`.

    Returns:
        :func:`influence_answer`'s dict: ``{"method", "target", "layers", "scope", "label", "meaning",
        "n_examples", "queries": [{"class", "value", "proponents": [{"index", "label", "score"}, ...],
        "opponents": [...]}, ...], "replay"}``.
    """
    res = influence(store, model, inputs, targets, method=method, target=target, **kwargs)
    all_layers = list(store.layers) if hasattr(store, "layers") else None
    if all_layers is None and kwargs.get("layers") is None:
        all_layers = list(res.layers)  # a path, every layer
    return influence_answer(res, top_k, all_layers, classes=targets)
