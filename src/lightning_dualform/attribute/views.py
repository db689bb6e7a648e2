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
from lightning_dualform.attribute.result import METHOD_MEANING
from lightning_dualform.attribute.targets import Target

#: How a view labels the attention weights of ``attend`` beside influence.
ATTENTION_MEANING = ("attention weight k . q of a stored row (the paper's view: how the layer's output is assembled "
                     "from its training rows; not a prediction of what removing the example would do)")


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
        ``{"method", "meaning", "target", "queries": [{"value", "proponents": [{"index", "label", "score"}, ...],
        "opponents": [...]}, ...], "n_examples", "seconds", "replay"}``.
    """
    res = influence(store, model, inputs, targets, method=method, target=target, **kwargs)
    pro, opp = res.top(top_k)
    queries = []
    for q in range(res.scores.shape[0]):
        def side(top: Any) -> list[dict[str, Any]]:
            return [{"index": int(i), "label": int(lab), "score": float(s)}
                    for i, lab, s in zip(top.index[q], top.label[q], top.score[q]) if i >= 0]
        queries.append({"value": float(res.values[q]), "proponents": side(pro), "opponents": side(opp)})
    return {"method": res.method, "meaning": METHOD_MEANING[res.method], "target": res.target,
            "queries": queries, "n_examples": int(len(res.examples)), "seconds": res.seconds,
            "replay": res.replay.to_dict() if res.replay is not None else None}
