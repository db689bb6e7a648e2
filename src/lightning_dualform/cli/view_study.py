"""The viewer's panel of the paper authors' measures (``/api/study``) for one recorded query.

Per linear layer, what ``lightning_dualform.studies`` computes over every stored row, as the examples' study
tables do: the vote (the class with the largest total score), the class totals, the share of the top-500 rows
that carry the query's label, the share of the query's total held by the top 1% of rows (the "spotlight"
test) and the top 500 rows' score, label and step against rank (the authors' per-query plot). The score is the
authors' ``|k·q|`` or the signed ``k·q`` that the layer's output sums.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

#: rows drawn against rank (the authors drew 500)
RANK_ROWS = 500


def study_answer(store: Any, qs: Any, position: int, score: Literal["abs", "signed"]) -> dict[str, Any]:
    """The measures of query ``position`` (recording order) of the query set ``qs``, per linear layer of ``store``.

    Args:
        store: an open :class:`~lightning_dualform.store.reader.StoreReader`.
        qs: one of its recorded query sets (``store.queries(split)``).
        position: the query's position in it.
        score: ``"abs"`` (``|k·q|``) or ``"signed"`` (``k·q``).

    Raises:
        ValueError: a sharded store (the measures read one file), or a bad score.
    """
    from lightning_dualform.store.reader import StoreReader
    from lightning_dualform.studies import scan_layer_scores, score_label, votes

    if not isinstance(store, StoreReader):
        raise ValueError("the authors' measures read one store file; open one rank's shard to see them.")
    label = int(qs.label[position])
    layers: dict[str, Any] = {}
    for name in store.layers:
        lay = store.layer(name)
        if lay.kind != "linear" or name not in qs.layers or lay.n_rows == 0:
            continue
        rows = qs.layer_rows(name, np.array([position]))
        if not len(rows["keys"]):
            continue
        query = np.asarray(rows["keys"][:1], dtype=np.float32)  # its first position, as the layer cards
        one_pct = max(1, math.ceil(0.01 * lay.n_rows))
        scan = scan_layer_scores(store, name, query, scores=(score,),
                                 top_k=min(max(RANK_ROWS, one_pct), lay.n_rows))[score]
        top = {c: scan.top[c][0, :RANK_ROWS] for c in ("score", "label", "step", "index")}
        mass = scan.class_mass[0]
        layers[name] = {
            "vote": int(votes(scan)[0]),
            "class_total": mass.tolist(),
            "total": float(scan.total[0]),
            "rows": int(lay.n_rows),
            "top1pct_rows": one_pct,
            "top1pct_share": float(scan.top_share(one_pct)[0]),
            "top_label_share": float((top["label"] == label).mean()) if label >= 0 and len(top["label"]) else None,
            "rank": {c: v.tolist() for c, v in top.items()},
        }
    return {"split": qs.split, "index": int(qs.index[position]), "label": label,
            "prediction": int(qs.prediction[position]), "score": score, "score_name": score_label(score),
            "layers": layers}

