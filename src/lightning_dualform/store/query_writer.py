"""Writing the query sets recorded after fit (``trainer.test/validate/predict``) into a finished store."""

from __future__ import annotations

import datetime as _dt

import h5py
import numpy as np

from lightning_dualform.store import _h5
from lightning_dualform.store._superblock import clear_swmr_flags


class QueryWriter:
    """Writes the query inputs recorded during ``trainer.test/validate/predict`` into a finished store.

    Layout: ``/queries/<split>/{index,label,prediction,inputs}`` per example and
    ``/queries/<split>/layers/<layer>/{keys,example,position}`` per row.
    """

    def __init__(self, path: str, split: str, layers: dict[str, int]) -> None:
        clear_swmr_flags(path)
        self.file = h5py.File(path, "r+", locking=False)
        qg = self.file.require_group("queries")
        if split in qg:
            del qg[split]  # a new test run replaces the previous query set of the same split
        self.group = qg.create_group(split)
        self.group.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.n = 0
        for col, dt in (("index", np.int64), ("label", np.int64), ("prediction", np.int64)):
            _h5.create(self.group, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        lg = self.group.create_group("layers")
        for name, d_in in layers.items():
            g = lg.create_group(name)
            _h5.create(g, "keys", shape=(0, d_in), maxshape=(None, d_in), dtype=np.float32, chunks=(256, d_in))
            _h5.create(g, "example", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            _h5.create(g, "position", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
            _h5.create(g, "label", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))

    def add_batch(
        self, index: np.ndarray, label: np.ndarray, prediction: np.ndarray, inputs: np.ndarray | None,
        rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """One batch: per-example columns, and per layer ``(keys, example-in-batch, position, label)``
        (the row's own label: per position for sequences)."""
        g = self.group
        if inputs is not None:
            if "inputs" not in g:
                _h5.create(g, "inputs", shape=(0, *inputs.shape[1:]), maxshape=(None, *inputs.shape[1:]),
                                 dtype=inputs.dtype, chunks=(64, *inputs.shape[1:]))
            if g["inputs"].shape[0] == self.n and g["inputs"].shape[1:] == inputs.shape[1:]:
                _h5.append(g["inputs"], inputs)
        for col, data in (("index", index), ("label", label), ("prediction", prediction)):
            _h5.append(g[col], data.astype(np.int64))
        for name, (keys, example, position, label) in rows.items():
            lg = g["layers"][name]
            _h5.append(lg["keys"], keys.astype(np.float32))
            _h5.append(lg["example"], example.astype(np.int64) + self.n)
            _h5.append(lg["position"], position.astype(np.int32))
            _h5.append(lg["label"], label.astype(np.int64))
        self.n += len(index)

    def close(self) -> None:
        if self.file.id.valid:
            self.group.attrs["n"] = self.n
            self.file.close()
