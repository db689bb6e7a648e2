"""Writing the query sets recorded after fit (``trainer.test/validate/predict``) into a finished store.

A store that is complete before ``trainer.test`` stays complete whatever happens to ``trainer.test``: the
whole recording of a split is one all-or-nothing write session (:mod:`._journal`) under the store's writer
lock. :meth:`QueryWriter.close` commits it; :meth:`QueryWriter.abort`, a failure while writing (a full
disk), or a kill roll the file back to how it was, with the split's previous query set, if any.
"""

from __future__ import annotations

import datetime as _dt

import numpy as np

from lightning_dualform.store import _h5, _journal, _repair
from lightning_dualform.store._lock import WriterLock


class QueryWriter:
    """Writes the query inputs recorded during ``trainer.test/validate/predict`` into a finished store.

    Layout: ``/queries/<split>/{index,label,prediction,inputs}`` per example and
    ``/queries/<split>/layers/<layer>/{keys,example,position}`` per row.

    Raises:
        StoreBusyError: another process writes the store.
    """

    def __init__(self, path: str, split: str, layers: dict[str, int], after_step: int | None = None,
                 other_model: bool = False) -> None:
        self.path = path
        self.split = split
        self.n = 0
        self._lock = WriterLock.acquire(path, f"recording {split} queries")
        self._session: _journal.WriteSession | None = None
        try:
            _repair.check_regular_file(path)
            _repair.recover_for_write(path)
            self._session = _journal.write_session(path, f"recording of the {split!r} queries", reserve=256 << 10)
            file = self._session.file
            assert file is not None  # a session opens with its file
            self.file = file
            qg = self.file.require_group("queries")
            if split in qg:
                del qg[split]  # a new test run replaces the previous query set of the same split
            self.group = qg.create_group(split)
            self.group.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            if after_step is not None:  # the model the queries went through: after this many optimizer steps
                self.group.attrs["after_step"] = int(after_step)
            if other_model:  # ... or not the store's final model at all (another checkpoint's)
                self.group.attrs["other_model"] = True
            for col, dt in (("index", np.int64), ("label", np.int64), ("prediction", np.int64)):
                _h5.create(self.group, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
            lg = self.group.create_group("layers")
            for name, d_in in layers.items():
                g = lg.create_group(name)
                _h5.create(g, "keys", shape=(0, d_in), maxshape=(None, d_in), dtype=np.float32, chunks=(256, d_in))
                _h5.create(g, "example", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
                _h5.create(g, "position", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
                _h5.create(g, "label", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        except BaseException:
            self.abort()
            raise

    def add_batch(
        self, index: np.ndarray, label: np.ndarray, prediction: np.ndarray, inputs: np.ndarray | None,
        rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """One batch: per-example columns, and per layer ``(keys, example-in-batch, position, label)``
        (the row's own label: per position for sequences). A failure rolls the whole recording back."""
        if self._session is None or not self._session.open:
            raise RuntimeError(f"{self.path}: the {self.split!r} query recording was closed or rolled back.")
        try:
            nbytes = 24 * len(index) + (inputs.nbytes if inputs is not None else 0)
            nbytes += sum(4 * k.size + 20 * len(k) for k, *_ in rows.values())
            self._session.reserve(2 * nbytes + (64 << 10))  # never let HDF5 meet a full disk (see _space.py)
            self._add_batch(index, label, prediction, inputs, rows)
        except BaseException:
            self.abort()
            raise

    def _add_batch(
        self, index: np.ndarray, label: np.ndarray, prediction: np.ndarray, inputs: np.ndarray | None,
        rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
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
        """Commit the query set: from here on readers see it (idempotent; nothing to do after an abort)."""
        session, self._session = self._session, None
        try:
            if session is not None and session.open:
                if "inputs" in self.group and self.group["inputs"].shape[0] != self.n:
                    del self.group["inputs"]  # inputs of another shape came in midway: keep none rather than some
                self.group.attrs["n"] = self.n
                session.commit()
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Roll the store back to how it was before this recording began (idempotent)."""
        session, self._session = self._session, None
        try:
            if session is not None:
                session.abort()
        finally:
            self._lock.release()
