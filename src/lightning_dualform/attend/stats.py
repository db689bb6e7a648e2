"""Query-independent facts about a layer's rows (examples, labels, epochs), gathered once per layer by a
light pass over the metadata columns: the widths of a pass's per-example and per-group tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lightning_dualform.errors import StoreError
from lightning_dualform.store.source import LayerSource

_META_BLOCK = 1 << 16
#: a dense per-example table is used while the largest dataset index is below this or twice the rows;
#: sparser indices (a subset of a big dataset, or a damaged file) are numbered densely first
DENSE_INDEX_FLOOR = 1 << 20


@dataclass
class LayerStats:
    """Query-independent facts about a layer's rows, gathered once by a light pass over metadata."""

    n_examples: int
    n_labels: int  # label buckets: label + 1 (so -1 -> 0)
    n_epochs: int
    example_label: np.ndarray  # (n_examples,) int64, -1 unknown
    example_ids: np.ndarray | None = None  # dataset index of each example column, when numbered densely


def layer_stats(lay: LayerSource) -> LayerStats:
    """Widths of the per-example and per-group tables: one pass over the index/label/epoch columns.

    Every width comes from values in the file, so each is checked against the file's own shapes first
    (distinct values never outnumber the rows): labels and epochs beyond :data:`DENSE_INDEX_FLOOR` and
    twice the rows are damage (:class:`StoreError`); dataset indices that sparse (a subset of a large
    dataset) are numbered densely, so the per-example tables hold one column per example seen.

    Raises:
        StoreError: labels or epochs too large for the store's rows (a damaged file).
    """
    max_index, max_label, max_epoch = -1, -1, 0
    for s in range(0, lay.n_rows, _META_BLOCK):
        blk = lay.read(s, s + _META_BLOCK, ("index", "label", "epoch", "step"))  # read() checks them
        if len(blk["index"]):
            max_index = max(max_index, int(blk["index"].max()))
            max_label = max(max_label, int(blk["label"].max()))
            max_epoch = max(max_epoch, int(blk["epoch"].max()))
    bound = max(DENSE_INDEX_FLOOR, 2 * lay.n_rows)
    if max_label + 2 > bound or max_epoch + 1 > bound:
        raise StoreError(
            f"{lay.store.path}: layer {lay.name!r} holds labels up to {max_label} and epochs up to {max_epoch} in "
            f"{lay.n_rows} rows; tables that wide ({bound} at most for this store) mean a damaged file."
        )
    ids = None
    if max_index + 1 > bound:  # sparse indices: number the examples densely
        found = [np.unique(b[b >= 0]) for b in (lay.read(s, s + _META_BLOCK, ("index",))["index"]
                                                for s in range(0, lay.n_rows, _META_BLOCK))]
        ids = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    n_examples = len(ids) if ids is not None else max_index + 1
    ex_label = np.full(n_examples, -1, dtype=np.int64)
    for s in range(0, lay.n_rows, _META_BLOCK):
        blk = lay.read(s, s + _META_BLOCK, ("index", "label"))
        ok = blk["index"] >= 0
        cols = blk["index"][ok] if ids is None else np.searchsorted(ids, blk["index"][ok])
        ex_label[cols] = blk["label"][ok]
    return LayerStats(n_examples=n_examples, n_labels=max_label + 2, n_epochs=max_epoch + 1, example_label=ex_label,
                      example_ids=ids)
