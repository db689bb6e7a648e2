"""The training examples a store's rows belong to: sorted dataset indices (the table's columns) and labels."""

from __future__ import annotations

from typing import Any

import numpy as np

#: rows read at a time while collecting indices
BLOCK_ROWS = 1 << 18


def store_examples(store: Any, layers: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(examples, labels)``: the sorted distinct dataset indices of the rows of ``layers`` and each one's
    label (its first row's).

    Raises:
        ValueError: rows without a dataset index (-1): influence needs to know which example a row is.
    """
    idx_parts, lab_parts = [], []
    for name in layers:
        lay = store.layer(name)
        for a in range(0, lay.n_rows, BLOCK_ROWS):
            blk = lay.read(a, min(a + BLOCK_ROWS, lay.n_rows), ("index", "label"))
            u, first = np.unique(blk["index"], return_index=True)
            idx_parts.append(u)
            lab_parts.append(blk["label"][first])
    if not idx_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = np.concatenate(idx_parts)
    lab = np.concatenate(lab_parts)
    examples, first = np.unique(idx, return_index=True)
    if len(examples) and examples[0] < 0:
        raise ValueError(
            f"{store.path}: some rows carry no dataset index (-1), so their example is unknown. Record the run with "
            "indices (DualFormCallback(index_key=...), or DualFormRecorder.batch(indices=...))."
        )
    return examples.astype(np.int64), lab[first].astype(np.int64)


def columns_of(examples: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The column of each dataset index in ``index`` (every one must be in ``examples``)."""
    return np.searchsorted(examples, index)
