"""The query inputs and rows recorded for one split (``trainer.test`` etc.): a store's query sets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np

from lightning_dualform.store import _h5, validate

if TYPE_CHECKING:
    from lightning_dualform.store.reader import StoreReader


class QuerySet:
    """The query inputs recorded for one split (``trainer.test`` etc.)."""

    def __init__(self, store: "StoreReader", split: str, group: h5py.Group) -> None:
        self.path = store.path
        self.split = split
        self._g = group
        self._store = store
        where = f"{store.path}: query set {split!r}"
        self.index, self.label, self.prediction, self.layers = validate.check_query_set(group, where)
        self.n = len(self.index)
        after = group.attrs.get("after_step")
        #: the model the queries went through: after this many optimizer steps (None: recorded before sets said it)
        self.after_step = int(after) if after is not None else None
        self.stale = self._stale(store.last_step, bool(group.attrs.get("rolled_back", False)),
                                 bool(group.attrs.get("other_model", False)))

    def _stale(self, last_step: int, rolled_back: bool, other_model: bool) -> str | None:
        """Why the set is not the store's model's, or None: it went through another model than the store's final
        one (another checkpoint's), a model a resume rolled back, or the model after another step count than the
        store's last."""
        if other_model:
            return ("they were recorded with a model whose weights are not the store's final ones (such as one "
                    "trainer.test(ckpt_path=...) loaded from another checkpoint)")
        if rolled_back:
            return ("they were recorded with a model whose last steps a resume rolled back"
                    + (f" (the model after {self.after_step} optimizer steps)" if self.after_step is not None else ""))
        if self.after_step is not None and self.after_step != last_step:
            return (f"they were recorded with the model after {self.after_step} optimizer steps, and the store now "
                    f"rebuilds the model after {last_step} (the run was resumed and trained on)")
        return None

    @property
    @_h5.guarded
    def inputs(self) -> np.ndarray | None:
        """Raw inputs ``(n, *shape)`` of the query examples, when they were recorded (for every query: older
        stores may hold a part of them when the inputs' shape changed midway; then None)."""
        if "inputs" not in self._g or self._g["inputs"].shape[:1] != (self.n,):
            return None
        return np.asarray(self._g["inputs"][()])

    @property
    def has_inputs(self) -> bool:
        """Whether raw inputs were recorded (without reading them)."""
        return "inputs" in self._g

    @_h5.guarded
    def inputs_at(self, positions: np.ndarray) -> np.ndarray | None:
        """Raw inputs ``(len(positions), *shape)`` of the query examples at ``positions`` (recording order),
        reading only those rows; None when no inputs were recorded."""
        if "inputs" not in self._g:
            return None
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        ds = self._g["inputs"]
        if len(positions) == 0:
            return np.zeros((0, *ds.shape[1:]), dtype=ds.dtype)
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if (hi - lo) <= 4 * len(positions):  # close together: one slice
            return np.asarray(ds[lo:hi])[positions - lo]
        unique, back = np.unique(positions, return_inverse=True)
        return np.asarray(ds[unique])[back]

    @_h5.guarded
    def layer_rows(self, layer: str, examples: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``keys (R, d_in)``, ``example (R,)`` (query number), ``position (R,)`` and ``label (R,)``
        (the row's own label, per position for sequences; -1 when none) of one layer; with ``examples``,
        only the rows of those query numbers (reading the keys of the span they lie in)."""
        if layer not in self.layers:
            raise KeyError(f"query set {self.split!r} has no rows for layer {layer!r}; it has {self.layers}")
        g = self._g["layers"][layer]
        where = f"{self.path}: query set {self.split!r}, layer {layer!r}"
        width = self._store.layer(layer).d_in if layer in self._store.layers else None
        cols, which = validate.check_query_rows(g, where, width, self.n)
        if examples is None:
            return {k: (which if k == "example" else np.asarray(g[k][()])) for k in cols}
        rows = np.flatnonzero(np.isin(which, np.asarray(examples)))
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        return {k: (which if k == "example" else np.asarray(g[k][lo:hi]) if k == "keys" else np.asarray(g[k][()]))[
            rows - lo if k == "keys" else rows] for k in cols}
