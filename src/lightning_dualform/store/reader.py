"""Reading a store: open and check the file, then serve layers, per-step tables and row blocks.

Every reader of the library goes through :class:`StoreReader` (or its sharded twin in
:mod:`~lightning_dualform.store.shards`). Low-level failures while reading become
:class:`~lightning_dualform.errors.StoreError` naming the file.

Opening is bounded in time whatever the file holds: a path that is not a regular file is refused before
it is read, the HDF5 structure is walked in a child process first (:mod:`._probe`), and a store that no
writer has open is opened plainly, so a damaged metadata block fails at once (:mod:`._h5open`). Before
that, what a killed writer left is repaired when no writer is alive (:mod:`._repair`), and a store that a
live writer is rewriting gives :class:`~lightning_dualform.errors.StoreBusyError` ("retry") rather than
a false "damaged". Every number read from the file is checked against the file's own shapes before it
sizes, indexes or sums anything (:mod:`.validate`). The optimizer math over the stored tables (coefficients,
base weights, the initial optimizer state) is :mod:`lightning_dualform.optim.stored`'s; a layer reader hands
it the tables.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import h5py
import numpy as np

from lightning_dualform._args import as_int
from lightning_dualform.errors import StaleQueriesError, StoreBusyError, StoreError
from lightning_dualform.optim import OptimizerState, UpdateRule
from lightning_dualform.optim.stored import Coefficients, base_weights, initial_state, layer_coefficients
from lightning_dualform.store import _h5, _journal, _probe, _raw_chunks, _repair, validate
from lightning_dualform.store import conv as _conv
from lightning_dualform.store._h5open import open_any
from lightning_dualform.store.bindings import ATTRS_CRC32, REQUIRED_FROM, STATE_CRC32, attrs_crc32, state_crc32
from lightning_dualform.store.certificate import TABLES_CRC32, KeptMarks, LayerCertificate, kept_datasets
from lightning_dualform.store.filters import decode_rows
from lightning_dualform.store.format import (
    ROW_COLUMNS,
    STATE_GROUP,
    table_columns,
    tables_crc32,
    weights_crc32,
)
from lightning_dualform.store.query_sets import QuerySet
from lightning_dualform.store.view import StoreView

__all__ = ["Coefficients", "LayerReader", "QuerySet", "StoreReader", "StoreView"]


#: the Trainer method that records a query split
_STAGE = {"test": "test", "validate": "validate"}

class LayerReader:
    """Read access to one layer of a store (a :class:`~lightning_dualform.store.source.LayerSource`; its group
    checked on open: :func:`.validate.check_layer`)."""

    def __init__(self, store: "StoreReader", name: str, group: h5py.Group) -> None:
        self.store = store
        self.name = name
        self._g = group
        where = f"{store.path}: layer {name!r}"
        facts = validate.check_layer(group, where, row_dtype=store.row_dtype, complete=store.complete,
                                     n_steps=store.n_steps, update_rule=store.update_rule)
        self.kind, self.d_in, self.d_out, self.has_bias = facts.kind, facts.d_in, facts.d_out, facts.has_bias
        self.order, self.exact, self.inexact_reason = facts.order, facts.exact, facts.inexact_reason
        #: training rows stored without a dataset index (-1), counted at finalisation (None before it)
        self.rows_without_index = facts.rows_without_index
        self.layout, self.geometry = facts.layout, facts.geometry
        self.weight_shape, self.param_dtype = facts.weight_shape, facts.param_dtype
        self.attrs = facts.attrs
        #: the exactness certificate, when one was written (a finished store may lack it: ``certify=False``,
        #: or a process killed while writing it; ``lightning-dualform verify --write-certificate`` writes it)
        self.certificate: LayerCertificate | None = facts.certificate
        self.n_rows = facts.committed_rows
        # rows past the committed steps (a writer killed between its counters) are not part of the store
        self._step_lo, self._step_hi = store.first_step, store.first_step + store.n_steps
        self._epochs = store.update_epochs
        if self.n_rows:
            committed = self.n_rows
            self.n_rows = self.rows_before(self._step_hi)
            if self.n_rows < committed:
                validate.check_tail(group, where, rows=self.n_rows, committed=committed, geometry=self.geometry,
                                    step_lo=self._step_lo, step_hi=self._step_hi, complete=store.complete)
            if self.n_rows:  # (a convolution's maps: one step entry per map)
                ends = np.asarray(group["step"][[0, self._stored("step", self.n_rows) - 1]])
                if ends[0] < self._step_lo or ends[1] >= self._step_hi:
                    raise StoreError(f"{where}: its rows' steps {ends.tolist()} lie outside the step table "
                                     f"{self._step_lo}..{self._step_hi - 1}; the file is damaged.")
        self._chunk_readers: dict[str, _raw_chunks.ChunkReader | None] = {}
        #: whether the initial state and parameters were checked against their CRC (done when first handed out)
        self._state_checked = not store.complete
        self._pinned: Callable[[str], np.ndarray] | None = None  # the state's datasets, while its CRC is checked
        if store.complete:
            self._check_bindings(where)

    def _binding(self, key: str, where: str) -> int | None:
        """A binding CRC of the layer (``store/bindings.py``), or None where an older store lacks it.

        Raises:
            StoreError: a complete store of format 4 or later lacks it, or it is not a CRC-32.
        """
        attrs = self._g.attrs
        if key not in attrs:
            if self.store.meta.format_version >= REQUIRED_FROM:
                raise StoreError(
                    f"{where}: attribute {key!r} is missing: a complete store of format "
                    f"{self.store.meta.format_version} binds its layers' per-step tables, attributes and optimizer "
                    "state by CRC-32 at finalisation, and nothing else removes it. The file was damaged or rewritten by "
                    "another program: its answers cannot be trusted. Use the original file, or train again."
                )
            return None
        return _h5.int_attr(attrs, key, where, lo=0, hi=2**32 - 1)

    def _check_bindings(self, where: str) -> None:
        """The per-step tables and the attributes against their CRC-32 (the state waits for its first use)."""
        want = self._binding(TABLES_CRC32, where)
        if want is not None:
            u = self.updates()
            got = tables_crc32(u["step"], u["grad_scale"], {p: u[p] for p in ("weight", "bias") if p in u})
            _bound(where, "its per-step tables", got, want)
        want = self._binding(ATTRS_CRC32, where)
        if want is not None:
            _bound(where, "its attributes (convolution geometry, shapes, rule)", attrs_crc32(self.store._f.attrs, self._g),
                   want)
        if self._binding(STATE_CRC32, where) is None:
            self._state_checked = True  # an older store: nothing to check it against

    @_h5.guarded
    def _check_state_binding(self) -> dict[str, OptimizerState]:
        """The initial optimizer state and parameters against :data:`~.bindings.STATE_CRC32`, once; returns the
        states it built on the way (each dataset is read once for both)."""
        if self._state_checked:
            return {}
        where = f"{self.store.path}: layer {self.name!r}"
        want = self._binding(STATE_CRC32, where)
        built: dict[str, OptimizerState] = {}
        if want is not None:
            raw: dict[str, np.ndarray] = {}

            def read(path: str) -> np.ndarray:
                if path not in raw:
                    raw[path] = np.asarray(self._g[path][()])
                return raw[path]

            self._pinned = read
            try:
                if self.store.rule is not None:  # the checks of a malformed state say more than a CRC: first
                    for pname in ("weight", "bias") if self.has_bias else ("weight",):
                        built[pname] = self._read_initial_state(pname)
                got = state_crc32(self._g, read)
            finally:
                self._pinned = None
            _bound(where, "its initial optimizer state or parameters", got, want)
        self._state_checked = True
        return built

    def _raw(self, path: str) -> np.ndarray:
        """A dataset of the layer group as stored (read once while the state's CRC is checked)."""
        return self._pinned(path) if self._pinned is not None else np.asarray(self._g[path][()])

    @property
    def has_certificate(self) -> bool:
        """Whether the certificate was written for this layer (:attr:`certificate` is not None)."""
        return self.certificate is not None

    def _stored(self, col: str, rows: int) -> int:
        """Stored entries of column ``col`` that ``rows`` virtual rows (whole maps) take."""
        return validate.stored_entries(self.geometry, col, rows)

    def to_view(self, a: np.ndarray) -> np.ndarray:
        """An array in the weight parameter's own shape as the ``(d_out, d_in)`` matrix that multiplies keys
        (a convolution's weight flattened per output channel, an embedding's table transposed)."""
        if self.kind == "embedding":
            return a.T
        return a.reshape(self.d_out, self.d_in)

    def to_param(self, a: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`to_view`."""
        if self.kind == "embedding":
            return a.T
        return a.reshape(self.weight_shape)

    # -- weights ---------------------------------------------------------------------------------------
    @_h5.guarded
    def _array(self, name: str) -> np.ndarray | None:
        return np.asarray(self._g[name][()], dtype=np.float32) if name in self._g else None

    @property
    def weight_init(self) -> np.ndarray:
        return self._array("weight_init")

    @property
    def bias_init(self) -> np.ndarray | None:
        return self._array("bias_init")

    @property
    def weight_final(self) -> np.ndarray | None:
        return self._array("weight_final")

    @property
    def bias_final(self) -> np.ndarray | None:
        return self._array("bias_final")

    @_h5.guarded
    def stored_memory_sums(self, end_step: int, n_rows: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``sum_rows c_w v k^T`` and ``sum_rows c_b v`` as the certificate computed them (float64), when the
        file holds them for exactly this end step, number of rows and final weights of a finished store;
        otherwise None (the caller sums the rows). For a store of an element-wise rule: the weights and bias
        its replay rebuilt (``replay_weight``, ``replay_bias``) under the same conditions."""
        g = self._g
        names = kept_datasets(self.store.form)
        if self.store.status != "complete" or names[0] not in g or "weight_final" not in g:
            return None
        marks = KeptMarks.from_attrs(g.attrs, f"{self.store.path}: layer {self.name!r}")
        if marks is None or (marks.end_step, marks.rows) != (end_step, n_rows):
            return None
        # sums of other final weights: the rows were rewritten by a writer that did not know about them
        if marks.weight_final_crc32 != weights_crc32(self.weight_final):
            return None
        w = self._checked_sum(names[0], (self.d_out, self.d_in))
        b = self._checked_sum(names[1], (self.d_out,)) if self.has_bias else None
        return w, b

    def _checked_sum(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        ds = self._g.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype.kind != "f":
            got = f"{ds.shape} {ds.dtype}" if isinstance(ds, h5py.Dataset) else repr(ds)
            raise StoreError(
                f"{self.store.path}: layer {self.name!r} dataset {name!r} is {got}, expected float {shape}; the file is damaged."
            )
        data = np.asarray(ds[()], dtype=np.float64)
        if not np.isfinite(data).all():
            raise StoreError(f"{self.store.path}: layer {self.name!r} dataset {name!r} holds NaN or inf; the file is damaged.")
        return data

    @property
    def weight_residual(self) -> np.ndarray | None:
        return self._array("weight_residual")

    @property
    def bias_residual(self) -> np.ndarray | None:
        return self._array("bias_residual")

    # -- per-step tables and the optimizer math over them (optim/stored.py) ------------------------------
    @_h5.guarded
    def updates(self) -> dict[str, Any]:
        """The committed per-step tables: ``step``, ``grad_scale``, and a column dict per parameter (the
        columns of the store's update rule, :func:`~lightning_dualform.store.format.table_columns`).

        Raises:
            StoreError: a column is missing, shorter than the committed steps, of the wrong kind, or holds
                NaN/inf (a hostile or damaged file).
        """
        n = self.store.n_steps
        ug = self._g["updates"]
        where = f"{self.store.path}: layer {self.name!r}"
        out: dict[str, Any] = {"step": self.store.update_steps,
                               "grad_scale": validate.read_column(ug, "grad_scale", n, np.float64, where)}
        for pname in ("weight", "bias"):
            if pname == "bias" and not self.has_bias:
                continue
            if pname not in ug:
                raise StoreError(f"{where} has no update table for its {pname}; the file is damaged.")
            out[pname] = {c.name: validate.read_column(ug[pname], c.name, n, c.dtype, f"{where} {pname}")
                          for c in table_columns(self.store.update_rule)}
            if self.store.rule is not None:
                try:
                    self.store.rule.check_values(out[pname])
                except ValueError as err:
                    raise StoreError(f"{where} {pname}: {err}; the file is damaged or was rewritten.") from None
        return out

    def end_step(self, at_step: int | None = None) -> tuple[int, int]:
        """``(first, end)``: the store's first step and the model wanted (default: the last one).

        Raises:
            ValueError: ``at_step`` outside ``first..last``.
        """
        if at_step is not None:
            at_step = as_int(at_step, "at_step", allowed="None or an integer optimizer step")
        first = self.store.first_step
        last = self.store.last_step
        end = last if at_step is None else at_step
        if not first <= end <= last:
            raise ValueError(
                f"at_step={at_step} is outside what {self.store.path} covers: steps {first}..{last} "
                f"(the model after {first} to {last} optimizer steps)."
            )
        return first, end

    def coefficients(self, at_step: int | None = None) -> Coefficients:
        """Scalars rebuilding the layer as it was after ``at_step`` optimizer steps (default: the end):
        :func:`~lightning_dualform.optim.stored.layer_coefficients` of its tables.

        Only for stores whose :attr:`StoreReader.form` is ``"scalar"`` or ``"plain"``; an element-wise rule's
        layer is rebuilt by a replay (:class:`~lightning_dualform.attend.replay.LayerReplay`).
        """
        if self.store.form == "element-wise":
            raise ValueError(
                f"{self.store.path}: layer {self.name!r} was trained by {self.store.update_rule!r}, whose step is "
                "element-wise: it has no per-step scalar coefficients. Rebuild it with "
                "lightning_dualform.attend.replay.LayerReplay (or DualInference / certificate.rebuild_weights)."
            )
        first, end = self.end_step(at_step)
        rule = None if self.store.form == "plain" else self.store.rule
        return layer_coefficients(self.updates(), first, end, rule=rule, initial_state=self.initial_state)

    @_h5.guarded
    def initial_state(self, pname: str = "weight") -> OptimizerState:
        """The optimizer state of the weight (``"weight"``) or bias before the first recorded step, float64,
        in the parameter's own shape (:attr:`weight_shape` for the weight), the parameter itself included
        (:func:`~lightning_dualform.optim.stored.initial_state` of what the file keeps).

        Raises:
            StoreError: the store keeps no state for this parameter, or an entry has the wrong shape, is not
                finite, or a required one is missing.
        """
        built = self._check_state_binding()
        return built[pname] if pname in built else self._read_initial_state(pname)

    def _read_initial_state(self, pname: str) -> OptimizerState:
        rule: UpdateRule | None = self.store.rule
        where = f"{self.store.path}: layer {self.name!r} {pname}"
        if rule is None:
            raise ValueError(f"{where}: the store has no update rule ({self.store.update_rule!r}), hence no optimizer state.")
        if pname == "bias" and not self.has_bias:
            raise ValueError(f"{where}: the layer has no bias.")
        shape = self.weight_shape if pname == "weight" else (self.d_out,)
        init = f"{pname}_init"
        init = np.asarray(self._raw(init), dtype=np.float32) if init in self._g else None
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, Any] = {}
        buffer = None
        if rule.name != "sgd":
            g = self._g.get(STATE_GROUP)
            pg = g.get(pname) if isinstance(g, h5py.Group) else None
            if not isinstance(pg, h5py.Group):
                raise StoreError(f"{where}: the store keeps no optimizer state ({STATE_GROUP}/{pname}); the file is damaged.")
            for key, ds in pg.items():
                if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
                    raise StoreError(f"{where}: state entry {key!r} is not a float dataset; the file is damaged.")
                arrays[key] = np.asarray(self._raw(f"{STATE_GROUP}/{pname}/{key}"), dtype=np.float64)
            for key, v in pg.attrs.items():
                if not isinstance(v, (np.floating, float)) or isinstance(v, bool):
                    raise StoreError(f"{where}: state attribute {key!r} is {v!r}, not a number; the file is damaged.")
                if not np.isfinite(v):
                    raise StoreError(f"{where}: state attribute {key!r} is {v!r}; the file is damaged.")
                scalars[key] = v
        else:
            buf = f"{pname}_buffer_init"
            buf = np.asarray(self._raw(buf), dtype=np.float32) if buf in self._g else None
            if buf is not None:
                buffer = self.to_param(buf) if pname == "weight" else buf
        try:
            state = initial_state(rule, shape, self.to_param(init) if pname == "weight" else init, arrays=arrays,
                                  scalars=scalars, momentum_buffer=buffer, param_dtype=self.param_dtype)
        except ValueError as err:
            raise StoreError(f"{where}: {err}; the file is damaged or was written for another layer.") from None
        return state

    def base_weights(
        self, at_step: int | None = None, coef: Coefficients | None = None, with_residual: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The part of the weights that the memory does not hold: ``a W_0 (+ b buf_0)``, and the same for
        the bias; for a store of an inexact run at its end, the stored residual is added too
        (:func:`~lightning_dualform.optim.stored.base_weights`).

        ``W_T q = base_weight q + base_bias + sum_rows (c_w (k.q) + c_b) v``. Scalar and plain stores only.
        """
        coef = coef or self.coefficients(at_step)
        self._check_state_binding()
        residual = None
        if with_residual and coef.end_step == self.store.last_step and self.store.form == "plain":
            residual = (self.weight_residual, self.bias_residual)
        return base_weights(
            coef, self.weight_init, self.bias_init if self.has_bias else None,
            weight_buffer=self._array("weight_buffer_init") if coef.b_w else None,
            bias_buffer=self._array("bias_buffer_init") if coef.b_b else None,
            residual=residual,
        )

    @_h5.guarded
    def rows_before(self, step: int) -> int:
        """Number of leading rows recorded before optimizer step ``step`` (rows are in step order; :meth:`read`
        checks that they are)."""
        if self.n_rows == 0:
            return 0
        col = self._g["step"]
        per = self.geometry.locations if self.geometry is not None else 1  # maps: one step entry per map
        lo, hi = 0, self.n_rows // per  # binary search on disk: never loads the whole column
        while lo < hi:
            mid = (lo + hi) // 2
            if int(col[mid]) < step:
                lo = mid + 1
            else:
                hi = mid
        return lo * per

    # -- rows ------------------------------------------------------------------------------------------
    @_h5.guarded
    def read(self, start: int, stop: int, columns: tuple[str, ...] = ("keys", "values", *ROW_COLUMNS)) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of the committed rows; keys/values decoded to float32.

        A convolution stored as maps gives its virtual rows: keys unfolded from the maps (the layer's padding
        re-applied), metadata repeated per output location (``position`` counting on from the map's).

        Raises:
            StoreError: the rows' metadata contradicts the file: a step outside the step table or out of
                order, an epoch that is not its step's, a negative index or label, a token id outside the table.
        """
        start = max(0, int(start))
        stop = min(int(stop), self.n_rows)
        stop = max(stop, start)
        if self.geometry is not None:
            out = self._read_virtual(start, stop, columns)
            self._check_meta(start, out)
            return out
        out: dict[str, np.ndarray] = {}
        for col in columns:
            if col == "tokens":  # an embedding's stored token ids, (n,)
                out[col] = self._g["keys"][start:stop, 0]
                continue
            # the bulk columns are read without holding the GIL (the prefetch thread reads while torch runs):
            # whole chunks straight from the file, checksummed here, where the layout allows; else H5Dread
            data = self._bulk(col, start, stop) if col in ("keys", "values") else self._g[col][start:stop]
            if col == "keys" and self.kind == "embedding":
                onehot = np.zeros((len(data), self.d_in), dtype=np.float32)
                ids = data[:, 0]
                if len(ids) and (ids.min() < 0 or ids.max() >= self.d_in):
                    raise StoreError(f"{self.store.path}: layer {self.name!r} holds token ids outside 0..{self.d_in - 1}.")
                onehot[np.arange(len(data)), ids] = 1.0
                out[col] = onehot
            else:
                out[col] = decode_rows(data, self.store.row_dtype) if col in ("keys", "values") else data
        self._check_meta(start, out)
        return out

    @_h5.guarded
    def read_maps(self, start: int, stop: int, columns: tuple[str, ...] = ()) -> dict[str, Any]:
        """The compact block behind virtual rows ``start:stop`` of a convolution stored as maps: ``maps``
        ``(E, C_in, *input_size)`` float32 (the maps the rows lie in), ``skip`` (virtual rows of the first map
        before ``start``), ``rows`` (``stop - start``), ``locations`` (virtual rows per map), and ``columns`` of
        the rows themselves (``values`` decoded; metadata per virtual row, checked as :meth:`read` checks it). Unfold
        with ``layers.unfold_maps`` on the compute device, then take rows ``skip:skip + rows``."""
        if self.geometry is None:
            raise ValueError(f"layer {self.name!r} is not stored as maps (layout {self.layout!r}).")
        stop = min(stop, self.n_rows)
        start = min(start, stop)
        loc = self.geometry.locations
        e0, e1 = start // loc, -(-stop // loc)
        pix = self._bulk("keys", e0 * self.geometry.pixels, e1 * self.geometry.pixels)
        maps = _conv.maps_from_pixels(decode_rows(pix, self.store.row_dtype), self.geometry)
        rows = self._read_virtual(start, stop, tuple(c for c in columns if c != "keys"))
        self._check_meta(start, rows)
        return {"maps": np.ascontiguousarray(maps), "skip": start - e0 * loc, "rows": stop - start, "locations": loc, **rows}

    def _read_virtual(self, start: int, stop: int, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
        geom = self.geometry
        loc = geom.locations
        start = min(start, stop)
        e0, e1 = start // loc, -(-stop // loc)
        lo, hi = start - e0 * loc, start - e0 * loc + (stop - start)
        out: dict[str, np.ndarray] = {}
        for col in columns:
            if col == "keys":
                pix = self._bulk("keys", e0 * geom.pixels, e1 * geom.pixels)
                maps = _conv.maps_from_pixels(decode_rows(pix, self.store.row_dtype), geom)
                out[col] = _conv.unfold(maps, geom)[lo:hi]
            elif col == "values":
                out[col] = decode_rows(self._bulk("values", start, stop), self.store.row_dtype)
            elif col in ROW_COLUMNS:
                per_map = np.asarray(self._g[col][e0:e1])
                rows = np.repeat(per_map, loc)
                if col == "position":  # the map's first position, counting on over its locations
                    rows = rows + np.tile(np.arange(loc, dtype=rows.dtype), e1 - e0)
                out[col] = rows[lo:hi]
            else:
                raise ValueError(f"layer {self.name!r} (a convolution) has no column {col!r}.")
        return out

    def _check_meta(self, start: int, out: dict[str, np.ndarray]) -> None:
        """The block's metadata against the file's own tables (:func:`.validate.check_block`)."""
        if "step" in out and len(out["step"]) and start > 0:
            per = self.geometry.locations if self.geometry is not None else 1  # maps: one step entry per map
            prev = int(self._g["step"][(start - 1) // per])
        else:
            prev = self._step_lo
        validate.check_block(out, start, f"{self.store.path}: layer {self.name!r}", prev_step=prev,
                             step_lo=self._step_lo, step_hi=self._step_hi, epochs=self._epochs)

    def _bulk(self, col: str, start: int, stop: int) -> np.ndarray:
        ds = self._g[col]
        if col not in self._chunk_readers:
            self._chunk_readers[col] = _raw_chunks.ChunkReader.for_dataset(ds)
        return _raw_chunks.read_rows(self._chunk_readers[col], ds, start, stop)

    def close(self) -> None:
        """Close the file descriptors of the raw chunk readers (the store closes the HDF5 file)."""
        for r in self._chunk_readers.values():
            if r is not None:
                r.close()
        self._chunk_readers.clear()


def _bound(where: str, what: str, got: int, want: int) -> None:
    """Refuse a layer whose ``what`` no longer has the CRC-32 it was finished with."""
    if got != want:
        raise StoreError(
            f"{where}: {what} changed after the certificate was written or the store finished (CRC {got:#010x}, "
            f"recorded {want:#010x}); the file is damaged or was rewritten by another program, and answers rebuilt "
            "from it would be wrong. Use the original file, or train again."
        )


class StoreReader(StoreView):
    """A store opened for reading. Validates the file before anything else touches it.

    Args:
        path: the store file.
        probe: walk the file's HDF5 structure in a child process first (off only for files this process
            has just written and closed).
        busy_wait: seconds to wait for another process that is rewriting the store (finalising it,
            writing its certificate or query sets) before giving up with :class:`StoreBusyError`.

    Raises:
        StoreError: the path is missing, not a regular file, not HDF5, not a lightning-dualform store, from
            a newer format version, or internally inconsistent.
        StoreBusyError: another process is rewriting it (retry).
    """

    def __init__(self, path: str | os.PathLike, *, probe: bool = True, busy_wait: float = _repair.BUSY_WAIT_S) -> None:
        self.path = os.fspath(path)
        deadline = time.monotonic() + busy_wait
        while True:
            self.repairs = _repair.prepare_for_read(self.path, busy_wait=max(0.0, deadline - time.monotonic()))
            before = _writer_state(self.path)
            try:
                self._open(probe)
            except StoreError as err:
                doing = _repair.busy(self.path) or before[0]  # (a writer that just finished: read again)
                if doing is None and not isinstance(err, StoreBusyError) and _writer_state(self.path)[1] != before[1]:
                    doing = "a writer that began and ended while it was read"  # (the file changed under the read)
                if doing is None or isinstance(err, StoreBusyError):
                    raise
                if time.monotonic() >= deadline:
                    raise _repair.busy_error(self.path, doing) from err
                time.sleep(0.1)  # a live writer was rewriting what we read: read again
                continue
            # A write session (finalisation, certificate, queries) rewrites the file in place: one that began
            # while we read, or began and ended, may have torn what we saw. (SWMR appends never do.)
            after = _writer_state(self.path)
            doing = after[0] or before[0]
            if doing is not None and (
                os.path.exists(_journal.journal_path(self.path))
                or (after[1] != before[1] and not (_phase(before[0]) == _phase(after[0]) == "training"))
            ):
                self._f.close()
                if time.monotonic() >= deadline:
                    raise _repair.busy_error(self.path, doing)
                time.sleep(0.05)
                continue
            return

    def _open(self, probe: bool) -> None:
        if probe:
            problem = _probe.probe(self.path)
            if problem is not None:
                raise validate.probe_error(self.path, problem)
        try:
            self._f = open_any(self.path)
        except OSError as err:
            raise StoreError(f"{self.path}: not a readable HDF5 file ({_h5.short(err)}). Is it a lightning-dualform store, and complete?") from err
        try:
            self._validate()
        except StoreError:
            self._f.close()
            raise
        except Exception as err:  # h5py raises many kinds on damaged files; none may escape raw
            self._f.close()
            raise StoreError(f"{self.path}: damaged store ({type(err).__name__}: {_h5.short(err)}).") from err

    def _validate(self) -> None:
        root = validate.check_root(self._f, self.path)
        self.attrs = root.attrs
        self.meta = root.meta
        self.row_dtype = root.meta.row_dtype
        self.status = root.meta.status
        self.optimizer = root.meta.optimizer
        self.optimizer_exact = root.meta.optimizer_exact
        self.update_rule = root.meta.update_rule
        self.n_steps = root.n_steps
        self.update_steps = root.update_steps
        self.update_epochs = root.update_epochs
        self._n_inputs = root.n_inputs
        self._input_pos: dict[int, int] | None = None
        lg = self._f["layers"]
        self._layers = {n: LayerReader(self, n, lg[n]) for n in root.layers}

    @property
    def first_step(self) -> int:
        return int(self.update_steps[0]) if len(self.update_steps) else 0

    @property
    def n_inputs(self) -> int:
        """How many training examples have their raw input stored."""
        return self._n_inputs

    @property
    def query_splits(self) -> list[str]:
        """Names of the recorded query sets (e.g. ``["test"]``)."""
        return sorted(self._f["queries"]) if "queries" in self._f else []

    def queries(self, split: str, *, stale_ok: bool = False) -> QuerySet:
        """The query set ``split``.

        Raises:
            KeyError: the store has none of that name.
            StaleQueriesError: it went through another model than the store's (``QuerySet.stale`` says which);
                ``stale_ok=True`` reads it anyway (to list it, say).
        """
        if split not in self.query_splits:
            raise KeyError(
                f"{self.path} has no query set {split!r}; it has {self.query_splits or 'none'}. Record one with "
                f"DualFormCallback(record_queries=({split!r},)) and trainer.{_STAGE.get(split, 'predict')}(...)."
            )
        qs = QuerySet(self, split, self._f["queries"][split])
        if qs.stale is not None and not stale_ok:
            raise StaleQueriesError(
                f"{self.path}: the {split!r} queries are not this store's model's: {qs.stale}, so their layer inputs "
                f"and predictions are that model's. Record them again (trainer.{_STAGE.get(split, 'predict')}(...) "
                f"with DualFormCallback(record_queries=({split!r},))), or attend over inputs of your own.")
        return qs

    @_h5.guarded
    def train_inputs(self, indices: np.ndarray) -> np.ndarray | None:
        """Raw inputs of training examples by dataset index (None where the store has none).

        Returns an array ``(len(indices), *input_shape)``; unknown indices give NaN rows (float) or zeros.
        """
        if "inputs" not in self._f:
            return None
        ig = self._f["inputs"]
        n = self._n_inputs
        if self._input_pos is None:
            stored = np.asarray(ig["index"][:n])
            self._input_pos = dict(zip(stored.tolist(), range(n)))
        pos = [self._input_pos.get(int(i), -1) for i in np.asarray(indices).reshape(-1)]
        data = ig["data"]
        out = np.zeros((len(pos), *data.shape[1:]), dtype=data.dtype)
        if np.issubdtype(out.dtype, np.floating):
            out[:] = np.nan
        for j, p in enumerate(pos):
            if p >= 0:
                out[j] = data[p]
        return out

    def close(self) -> None:
        for layer in getattr(self, "_layers", {}).values():
            layer.close()
        self._f.close()


def _writer_state(path: str) -> tuple[str | None, tuple[int, int, int] | None]:
    """What another process's writer is doing with ``path``, and the file's identity, size and mtime."""
    doing = _repair.busy(path)
    try:
        st = os.stat(path)
        return doing, (st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        return doing, None


def _phase(doing: str | None) -> str | None:
    return None if doing is None else doing.split(": ", 1)[-1]
