"""Reading a store: validate the file, then serve layers, per-step tables, coefficients and row blocks.

Every reader of the library goes through :class:`StoreReader` (or its sharded twin in
:mod:`~lightning_dualform.store.shards`). Low-level failures while reading become
:class:`~lightning_dualform.errors.StoreError` naming the file.

Opening is bounded in time whatever the file holds: a path that is not a regular file is refused before
it is read, the HDF5 structure is walked in a child process first (:mod:`._probe`), and a store that no
writer has open is opened plainly, so a damaged metadata block fails at once (:mod:`._h5open`). Before
that, what a killed writer left is repaired when no writer is alive (:mod:`._repair`), and a store that a
live writer is rewriting gives :class:`~lightning_dualform.errors.StoreBusyError` ("retry") rather than
a false "damaged". Every number read from the file is checked against the file's own shapes before it
sizes, indexes or sums anything: counters against the datasets they count, a row's step against the
step table, its epoch against the step's epoch, per-step scalars for being finite.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from lightning_dualform._args import as_int
from lightning_dualform.errors import StoreBusyError, StoreError
from lightning_dualform.optim import PARAM, OptimizerState, Sweep, UpdateRule, coefficients_with_buffer, plain_sgd_coefficients
from lightning_dualform.store import _h5, _journal, _probe, _raw_chunks, _repair
from lightning_dualform.store import conv as _conv
from lightning_dualform.store._h5open import open_any
from lightning_dualform.store.filters import decode_rows
from lightning_dualform.store.format import (
    LAYER_KINDS,
    MEMORY_SUM_DATASETS,
    PLAIN_RULE,
    REPLAY_DATASETS,
    ROW_COLUMNS,
    SCALAR_RULES,
    STATE_GROUP,
    rule_named,
    table_columns,
    tables_crc32,
    weights_crc32,
)
from lightning_dualform.store.metadata import StoreMetadata

#: largest width of a table sized by a value read from the file (labels, epochs) when the file's own
#: shapes do not allow more: distinct values never outnumber the rows, so a wider table means damage
TABLE_WIDTH_FLOOR = 1 << 20

#: How a store rebuilds a layer (``StoreReader.form``): per-step scalar coefficients (SGD, ASGD), the replay of
#: an element-wise rule (Adam, AdamW, ...: ``attend/replay.py``), or the plain sum of a run recorded with
#: ``exact=False`` (plus its stored residual).
FORMS = ("scalar", "element-wise", "plain")


@dataclass
class Coefficients:
    """``W_end = a_w W_0 + sum_s c_w[s] G_s`` (and the same for the bias), indexed by update number."""

    a_w: float
    c_w: np.ndarray  # (S,)
    a_b: float
    c_b: np.ndarray  # (S,), zeros without bias
    first_step: int  # global step of update number 0
    end_step: int  # the model after this many updates (global step)
    b_w: float = 0.0  # coefficient of the momentum buffer that existed before the first step (if any)
    b_b: float = 0.0


class LayerReader:
    """Read access to one layer of a store (a :class:`~lightning_dualform.store.source.LayerSource`)."""

    def __init__(self, store: "StoreReader", name: str, group: h5py.Group) -> None:
        self.store = store
        self.name = name
        self._g = group
        where = f"{store.path}: layer {name!r}"
        a = group.attrs
        self.kind = _h5.str_attr(a, "kind", where)
        if self.kind not in LAYER_KINDS:
            raise StoreError(f"{where}: kind {self.kind!r} is not one of {LAYER_KINDS}; the file is damaged or newer.")
        self.d_in = _h5.int_attr(a, "d_in", where, lo=1, hi=1 << 40)
        self.d_out = _h5.int_attr(a, "d_out", where, lo=1, hi=1 << 40)
        self.has_bias = _h5.bool_attr(a, "has_bias", where)
        self.order = _h5.int_attr(a, "order", where, lo=0, hi=1 << 31)
        self.exact = _h5.bool_attr(a, "exact", where, default=True)
        self.inexact_reason = _h5.str_attr(a, "inexact_reason", where, default="")
        lengths = {}
        for col in ("keys", "values", *ROW_COLUMNS):
            ds = _h5.dataset(group, col, where, "iuf")
            lengths[col] = ds.shape[0]
        self.n_rows = _h5.counter(group, "committed_rows", where, 1 << 62)
        self.geometry = self._maps_geometry(store, name, group)
        #: stored entries per virtual row's map: pixels (keys), value rows, metadata (1); all 1 without maps
        self._per_map = ({"keys": self.geometry.pixels, "values": self.geometry.locations}
                         if self.geometry is not None else {})
        locations = self.geometry.locations if self.geometry is not None else 1
        if self.n_rows % locations:
            raise StoreError(f"{where} says {self.n_rows} rows are committed, not whole maps of {locations} locations; "
                             "the file is inconsistent.")
        for col, length in lengths.items():
            if length < self._stored(col, self.n_rows):
                raise StoreError(
                    f"{store.path}: layer {name!r} says {self.n_rows} rows are committed but {col!r} holds only "
                    f"{length}; the file is truncated or inconsistent."
                )
        if store.complete and any(length != self._stored(col, self.n_rows) for col, length in lengths.items()):
            raise StoreError(f"{where}: a complete store commits every row, but it commits {self.n_rows} of {lengths}; the file is damaged.")
        key_width = 1 if self.kind == "embedding" else self.d_in
        if self.layout == _conv.MAPS_LAYOUT:
            key_width = int(a.get("in_channels", -1))
        if group["keys"].shape[1:] != (key_width,) or group["values"].shape[1:] != (self.d_out,):
            raise StoreError(
                f"{store.path}: layer {name!r} keys/values have shapes {group['keys'].shape}/{group['values'].shape}, "
                f"expected (*, {key_width})/(*, {self.d_out}); the file is inconsistent."
            )
        want = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[store.row_dtype]
        if group["values"].dtype != want or (self.kind != "embedding" and group["keys"].dtype != want) \
                or (self.kind == "embedding" and group["keys"].dtype.kind not in "iu"):
            raise StoreError(
                f"{where}: keys/values are {group['keys'].dtype}/{group['values'].dtype}, but the store says its rows "
                f"are {store.row_dtype}; the file is damaged."
            )
        for col, dt in ROW_COLUMNS.items():
            if group[col].ndim != 1 or group[col].dtype.kind not in "iu":
                raise StoreError(f"{where}: column {col!r} is {group[col].shape} {group[col].dtype}, expected integers; the file is damaged.")
        self._check_weights()
        self._check_updates(store.n_steps)
        # rows past the committed steps (a writer killed between its counters) are not part of the store
        self._step_lo, self._step_hi = store.first_step, store.first_step + store.n_steps
        self._epochs = store.update_epochs
        if self.n_rows:
            committed = self.n_rows
            self.n_rows = self.rows_before(self._step_hi)
            if self.n_rows < committed:
                self._check_tail(committed, where)
            if self.n_rows:  # (a convolution's maps: one step entry per map)
                ends = np.asarray(group["step"][[0, self._stored("step", self.n_rows) - 1]])
                if ends[0] < self._step_lo or ends[1] >= self._step_hi:
                    raise StoreError(f"{where}: its rows' steps {ends.tolist()} lie outside the step table {self._step_lo}..{self._step_hi - 1}; the file is damaged.")
        self.attrs = {k: _h5.attr(v) for k, v in a.items()}
        self._chunk_readers: dict[str, _raw_chunks.ChunkReader | None] = {}
        shape = a.get("weight_shape")
        try:
            self.weight_shape = (self.d_out, self.d_in) if shape is None else tuple(int(d) for d in np.asarray(shape).reshape(-1))
        except (TypeError, ValueError) as err:
            raise StoreError(f"{store.path}: layer {name!r} attribute 'weight_shape' is {shape!r}; the file is damaged.") from err
        self.param_dtype = str(self.attrs.get("param_dtype", "float32"))
        if self.param_dtype not in ("float32", "float64"):
            raise StoreError(f"{store.path}: layer {name!r} attribute 'param_dtype' is {self.param_dtype!r}; the file is damaged.")
        if int(np.prod(self.weight_shape)) != self.d_out * self.d_in or len(self.weight_shape) < 2:
            raise StoreError(
                f"{store.path}: layer {name!r} says its weight has shape {self.weight_shape}, which does not hold a "
                f"({self.d_out}, {self.d_in}) layer; the file is damaged."
            )
        self._check_certificate_attrs(where)
        if store.complete and "certificate_tables_crc32" in a:
            want = _h5.int_attr(a, "certificate_tables_crc32", where, lo=0, hi=2**32 - 1)
            u = self.updates()
            got = tables_crc32(u["step"], u["grad_scale"], {p: u[p] for p in ("weight", "bias") if p in u})
            if got != want:
                raise StoreError(
                    f"{where}: its per-step tables changed after the certificate was written (CRC {got:#010x}, "
                    f"certified {want:#010x}); the file is damaged or was rewritten by another program."
                )

    def _check_tail(self, committed: int, where: str) -> None:
        """Committed rows past the committed steps: a writer commits rows before steps, so one killed between
        the two (or one still writing) leaves rows of the next steps, all at or past the step table's end and
        in order. Anything else (a step that fell back, a complete store with such rows) is damage: dropping
        those rows would lose committed ones without a word."""
        if self.store.complete:
            raise StoreError(f"{where}: a complete store commits only rows of its steps, but rows {self.n_rows}.. have "
                             f"steps past {self._step_hi - 1}; the file is damaged.")
        col, prev = self._g["step"], self._step_hi
        table = self._g.file["update_step"]
        if self._g.file.swmr_mode:
            table.refresh()  # a live writer writes a step's table entry before the counters that show its rows
        table_end = self._step_lo + int(table.shape[0])
        first, end = self._stored("step", self.n_rows), self._stored("step", committed)  # entries (maps: one per map)
        for start in range(first, end, 1 << 20):
            tail = np.asarray(col[start : min(start + (1 << 20), end)])
            if int(tail[0]) < prev or (len(tail) > 1 and bool((np.diff(tail) < 0).any())):
                raise StoreError(f"{where}: rows {start}.. are not in step order; the file is damaged.")
            if int(tail[-1]) >= table_end:
                raise StoreError(f"{where}: rows {start}.. have steps up to {int(tail[-1])}, past the step table's end "
                                 f"({table_end - 1}); the file is damaged.")
            prev = int(tail[-1])

    def _check_weights(self) -> None:
        where = f"{self.store.path}: layer {self.name!r}"
        shapes = {"weight_init": (self.d_out, self.d_in), "weight_final": (self.d_out, self.d_in),
                  "weight_residual": (self.d_out, self.d_in), "weight_buffer_init": (self.d_out, self.d_in),
                  "bias_init": (self.d_out,), "bias_final": (self.d_out,), "bias_residual": (self.d_out,),
                  "bias_buffer_init": (self.d_out,)}
        for name, shape in shapes.items():
            if name not in self._g:
                if name == "weight_init" or (name == "bias_init" and self.has_bias):
                    raise StoreError(f"{where} has no {name!r}; the file is damaged or not a store.")
                continue
            ds = self._g[name]
            if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype.kind != "f":
                got = f"{ds.shape} {ds.dtype}" if isinstance(ds, h5py.Dataset) else "a group"
                raise StoreError(f"{where}: {name!r} is {got}, expected float {shape}; the file is damaged.")
        if self.has_bias != ("bias" in self._g.get("updates", {})):
            raise StoreError(f"{where}: has_bias={self.has_bias} but its update tables disagree; the file is damaged.")

    def _check_updates(self, n_steps: int) -> None:
        """Every per-step table of the store's update rule covers the committed steps, with the column's
        dtype; the float scalars are finite."""
        where = f"{self.store.path}: layer {self.name!r}"
        ug = self._g.get("updates")
        if not isinstance(ug, h5py.Group):
            raise StoreError(f"{where} has no update tables; the file is damaged or not a store.")
        self._column(ug, "grad_scale", n_steps, np.float64, where)
        for pname in ("weight", "bias") if self.has_bias else ("weight",):
            pg = ug.get(pname)
            if not isinstance(pg, h5py.Group):
                raise StoreError(f"{where} has no update table for its {pname}; the file is damaged.")
            for c in table_columns(self.store.update_rule):
                self._column(pg, c.name, n_steps, c.dtype, f"{where} {pname}")

    def _check_certificate_attrs(self, where: str) -> None:
        """The certificate's numbers are numbers (``info``, ``verify`` and the viewer print and compare them)."""
        for key in ("certificate_rel_err", "certificate_rel_err_weight", "certificate_rel_err_bias",
                    "certificate_explained", "certificate_tolerance", "certificate_probes"):
            v = self.attrs.get(key)
            if v is not None and (isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating))):
                raise StoreError(f"{where}: attribute {key!r} is {v!r}, not a number; the file is damaged.")
        if "certificate_exact" in self.attrs:
            _h5.bool_attr(self._g.attrs, "certificate_exact", where)
        if "certificate_method" in self.attrs:
            _h5.str_attr(self._g.attrs, "certificate_method", where)

    @property
    def has_certificate(self) -> bool:
        """Whether the certificate was written for this layer (a finished store may lack it: ``certify=False``,
        or a process killed while writing it; ``lightning-dualform verify --write-certificate`` writes it)."""
        return "certificate_rel_err" in self.attrs

    def _maps_geometry(self, store: "StoreReader", name: str, group: h5py.Group) -> _conv.ConvGeometry | None:
        """The geometry of a convolution stored as maps (format 3), or None (rows stored as they are read, or
        no map stored yet)."""
        self.layout = _h5.attr(group.attrs.get("layout", "rows"))
        if self.layout != _conv.MAPS_LAYOUT:
            if self.layout != "rows":
                raise StoreError(f"{store.path}: layer {name!r} has layout {self.layout!r}; this library reads 'rows' and 'maps'.")
            return None
        where = f"{store.path}: layer {name!r}"
        ds = group.get("input_size")
        if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "iu" or ds.ndim != 1:
            raise StoreError(f"{where} is stored as maps but has no integer 'input_size'; the file is damaged.")
        size = np.asarray(ds[()])
        if not size.any():
            if self.n_rows:
                raise StoreError(f"{where} holds {self.n_rows} rows but no map size; the file is damaged.")
            return None
        try:
            geom = _conv.ConvGeometry.from_attrs({k: _h5.attr(v) for k, v in group.attrs.items()}, size)
        except ValueError as err:
            raise StoreError(f"{where}: {err}; the file is damaged.") from None
        if geom.d_in != self.d_in:
            raise StoreError(f"{where}: its geometry unfolds {geom.d_in} values per key, but d_in is {self.d_in}; the file is damaged.")
        return geom

    def _stored(self, col: str, rows: int) -> int:
        """Stored entries of column ``col`` that ``rows`` virtual rows (whole maps) take."""
        if self.geometry is None:
            return rows
        return rows // self.geometry.locations * self._per_map.get(col, 1)

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
        names = REPLAY_DATASETS if self.store.form == "element-wise" else MEMORY_SUM_DATASETS
        if self.store.status != "complete" or names[0] not in g or "weight_final" not in g:
            return None
        a = g.attrs
        marks = {}
        for key in ("memory_end_step", "memory_rows", "memory_weight_final_crc32"):
            if key not in a:
                return None
            v = a[key]
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise StoreError(f"{self.store.path}: layer {self.name!r} attribute {key!r} is {v!r}, not an integer; the file is damaged.")
            marks[key] = int(v)
        if (marks["memory_end_step"], marks["memory_rows"]) != (end_step, n_rows):
            return None
        # sums of other final weights: the rows were rewritten by a writer that did not know about them
        if marks["memory_weight_final_crc32"] != weights_crc32(self.weight_final):
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

    # -- coefficients ----------------------------------------------------------------------------------
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
        out: dict[str, Any] = {"step": self.store.update_steps, "grad_scale": self._column(ug, "grad_scale", n, np.float64, where)}
        for pname in ("weight", "bias"):
            if pname == "bias" and not self.has_bias:
                continue
            if pname not in ug:
                raise StoreError(f"{where} has no update table for its {pname}; the file is damaged.")
            out[pname] = {c.name: self._column(ug[pname], c.name, n, c.dtype, f"{where} {pname}")
                          for c in table_columns(self.store.update_rule)}
        return out

    @staticmethod
    def _column(group: h5py.Group, name: str, n: int, dtype: type, where: str) -> np.ndarray:
        ds = group.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            raise StoreError(f"{where}: the per-step column {name!r} is missing; the file is damaged or not of this update rule.")
        if ds.shape[0] < n:
            raise StoreError(f"{where}: the per-step column {name!r} holds {ds.shape[0]} steps, fewer than the {n} committed; the file is truncated.")
        want_bool = np.dtype(dtype) == np.bool_
        if (ds.dtype == np.bool_) != want_bool or (not want_bool and ds.dtype.kind != "f"):
            raise StoreError(f"{where}: the per-step column {name!r} is {ds.dtype}, expected {np.dtype(dtype)}; the file is damaged.")
        data = np.asarray(ds[:n])
        if not want_bool and not np.isfinite(data).all():
            raise StoreError(f"{where}: the per-step column {name!r} holds NaN or inf; the file is damaged.")
        return data

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
        """Scalars rebuilding the layer as it was after ``at_step`` optimizer steps (default: the end).

        Only for stores whose :attr:`StoreReader.form` is ``"scalar"`` or ``"plain"``; an element-wise rule's
        layer is rebuilt by a replay (:class:`~lightning_dualform.attend.replay.LayerReplay`).
        """
        if self.store.form == "element-wise":
            raise ValueError(
                f"{self.store.path}: layer {self.name!r} was trained by {self.store.update_rule!r}, whose step is "
                "element-wise: it has no per-step scalar coefficients. Rebuild it with "
                "lightning_dualform.attend.replay.LayerReplay (or DualInference / certificate.rebuild_weights)."
            )
        u = self.updates()
        steps = u["step"]
        first, end = self.end_step(at_step)
        n_used = end - first

        def param(pname: str) -> tuple[float, float, np.ndarray]:
            if pname not in u:
                return 1.0, 0.0, np.zeros(len(steps))
            t = u[pname]
            if self.store.form == "plain":
                a, c = plain_sgd_coefficients(t["lr"], u["grad_scale"], t["applied"], n_used)
                return a, 0.0, c
            if self.store.update_rule == "sgd":
                return coefficients_with_buffer(t, u["grad_scale"], n_used)
            return self._scalar_rule_coefficients(pname, t, u["grad_scale"], n_used)

        a_w, b_w, c_w = param("weight")
        a_b, b_b, c_b = param("bias")
        return Coefficients(a_w, c_w, a_b, c_b, first, end, b_w, b_b)

    def _scalar_rule_coefficients(self, pname: str, table: dict, grad_scale: np.ndarray, n_used: int) -> tuple[float, float, np.ndarray]:
        """``a``, ``b = 0`` and ``c_s`` of a rule whose maps are scalars (ASGD): its adjoint swept over a
        one-entry stand-in of the parameter (the maps never look at the gradient or the parameter)."""
        rule = self.store.rule
        st = self.initial_state(pname)
        one = OptimizerState(0, (1,), {k: (v.reshape(-1)[:1].copy() if isinstance(v, np.ndarray) and v.ndim else v)
                                       for k, v in st.nonlinear.items()}, {PARAM: np.zeros(1)}, param_dtype=st.param_dtype)
        c = np.zeros(len(grad_scale))
        sweep = Sweep(rule, table, grad_scale, [one], lambda a, b, rows: (np.zeros(1) for _ in range(a, b)), stop=n_used)
        for s, q in sweep:
            c[s] = float(q)
        return float(sweep.adjoint.A), 0.0, c

    # -- optimizer state -------------------------------------------------------------------------------
    @_h5.guarded
    def initial_state(self, pname: str = "weight") -> OptimizerState:
        """The optimizer state of the weight (``"weight"``) or bias before the first recorded step, float64,
        in the parameter's own shape (:attr:`weight_shape` for the weight), the parameter itself included.

        Raises:
            StoreError: the store keeps no state for this parameter, or an entry has the wrong shape, is not
                finite, or a required one is missing.
        """
        rule: UpdateRule | None = self.store.rule
        where = f"{self.store.path}: layer {self.name!r} {pname}"
        if rule is None:
            raise ValueError(f"{where}: the store has no update rule ({self.store.update_rule!r}), hence no optimizer state.")
        if pname == "bias" and not self.has_bias:
            raise ValueError(f"{where}: the layer has no bias.")
        shape = self.weight_shape if pname == "weight" else (self.d_out,)
        init = self.weight_init if pname == "weight" else self.bias_init
        p0 = (self.to_param(init) if pname == "weight" else init).astype(np.float64)
        linear = {PARAM: p0}
        nonlinear: dict[str, Any] = {}
        if rule.name != "sgd":
            g = self._g.get(STATE_GROUP)
            pg = g.get(pname) if isinstance(g, h5py.Group) else None
            if not isinstance(pg, h5py.Group):
                raise StoreError(f"{where}: the store keeps no optimizer state ({STATE_GROUP}/{pname}); the file is damaged.")
            for key, ds in pg.items():
                if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
                    raise StoreError(f"{where}: state entry {key!r} is not a float dataset; the file is damaged.")
                target = linear if key in rule.linear_names else nonlinear
                target[key] = np.asarray(ds[()], dtype=np.float64)
            for key, v in pg.attrs.items():
                if not isinstance(v, (np.floating, float)) or isinstance(v, bool):
                    raise StoreError(f"{where}: state attribute {key!r} is {v!r}, not a number; the file is damaged.")
                if not np.isfinite(v):
                    raise StoreError(f"{where}: state attribute {key!r} is {v!r}; the file is damaged.")
                nonlinear[key] = v if isinstance(v, np.floating) and key != "step" else float(v)
        elif "weight_buffer_init" in self._g or "bias_buffer_init" in self._g:
            buf = self._array(f"{pname}_buffer_init")
            if buf is not None:
                linear["momentum_buffer"] = (self.to_param(buf) if pname == "weight" else buf).astype(np.float64)
        state = OptimizerState(0, tuple(shape), nonlinear, linear, param_dtype=self.param_dtype)
        try:
            rule.check_state(state)
        except ValueError as err:
            raise StoreError(f"{where}: {err}; the file is damaged or was written for another layer.") from None
        return state

    def base_weights(
        self, at_step: int | None = None, coef: Coefficients | None = None, with_residual: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The part of the weights that the memory does not hold: ``a W_0 (+ b buf_0)``, and the same for
        the bias; for a store of an inexact run at its end, the stored residual is added too.

        ``W_T q = base_weight q + base_bias + sum_rows (c_w (k.q) + c_b) v``. Scalar and plain stores only.
        """
        coef = coef or self.coefficients(at_step)
        w = coef.a_w * self.weight_init.astype(np.float64)
        if coef.b_w and "weight_buffer_init" in self._g:
            w += coef.b_w * self._array("weight_buffer_init")
        b = None
        if self.has_bias:
            b = coef.a_b * self.bias_init.astype(np.float64)
            if coef.b_b and "bias_buffer_init" in self._g:
                b += coef.b_b * self._array("bias_buffer_init")
        if with_residual and coef.end_step == self.store.last_step and self.store.form == "plain":
            if self.weight_residual is not None:
                w += self.weight_residual
            if b is not None and self.bias_residual is not None:
                b += self.bias_residual
        return w, b

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
        with ``capture.unfold_maps`` on the compute device, then take rows ``skip:skip + rows``."""
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
        """The block's metadata against the file's own tables (a few vector ops per block)."""
        if not out or not len(next(iter(out.values()))):
            return
        where = f"{self.store.path}: layer {self.name!r}"
        step = out.get("step")
        if step is not None:
            per = self.geometry.locations if self.geometry is not None else 1  # maps: one step entry per map
            prev = int(self._g["step"][(start - 1) // per]) if start > 0 else self._step_lo
            if int(step.min()) < self._step_lo or int(step.max()) >= self._step_hi:
                raise StoreError(
                    f"{where}: rows {start}.. have steps {int(step.min())}..{int(step.max())} outside the step table "
                    f"{self._step_lo}..{self._step_hi - 1}; the file is damaged."
                )
            if int(step[0]) < prev or (len(step) > 1 and bool((np.diff(step) < 0).any())):
                raise StoreError(f"{where}: rows {start}.. are not in step order; the file is damaged.")
            epoch = out.get("epoch")
            if epoch is not None and len(self._epochs):
                expected = self._epochs[step - self._step_lo]
                if not np.array_equal(epoch, expected):
                    raise StoreError(f"{where}: rows {start}.. carry epochs that are not their steps' epochs; the file is damaged.")
        for col in ("index", "label"):
            v = out.get(col)
            if v is not None and len(v) and int(v.min()) < -1:
                raise StoreError(f"{where}: column {col!r} holds {int(v.min())} (-1 means unknown); the file is damaged.")

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


class StoreView:
    """What every opened store offers beyond its files: layers by name, the step range, status.

    Subclasses set ``path``, ``status``, ``n_steps``, ``first_step``, ``update_rule``, ``optimizer_exact`` and
    ``_layers`` (name -> layer reader).
    """

    path: str
    status: str
    n_steps: int
    update_rule: str
    optimizer_exact: bool
    _layers: dict[str, Any]

    @property
    def rule(self) -> UpdateRule | None:
        """The optimizer's update rule (``None`` for a ``"plain"`` store)."""
        return rule_named(self.update_rule)

    @property
    def form(self) -> str:
        """How layers are rebuilt (:data:`FORMS`): ``"scalar"`` (SGD, ASGD: per-step coefficients),
        ``"element-wise"`` (Adam, AdamW, Adagrad, ...: a replay of the optimizer) or ``"plain"`` (a run
        recorded with ``exact=False``: ``p_0 - sum lr_s g_s`` plus the stored residual)."""
        if not self.optimizer_exact or self.update_rule == PLAIN_RULE:
            return "plain"
        return "scalar" if self.update_rule in SCALAR_RULES else "element-wise"

    @property
    def layers(self) -> list[str]:
        """Tracked layer names, in model order."""
        return list(self._layers)

    @property
    def last_step(self) -> int:
        """The model after this many optimizer steps is the latest the store can rebuild."""
        return self.first_step + self.n_steps

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def layer(self, name: str) -> Any:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; this store has {self.layers}") from None

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
                if problem.startswith("OSError") and ("signature" in problem or "not an HDF5" in problem.lower()
                                                      or "file signature not found" in problem):
                    raise StoreError(f"{self.path}: not a readable HDF5 file ({problem}). Is it a lightning-dualform store, and complete?")
                if "bad version number" in problem:  # HDF5 met an object version newer than it knows
                    raise StoreError(
                        f"{self.path}: written by a newer HDF5 library than this h5py's (HDF5 "
                        f"{h5py.version.hdf5_version}; {problem}). Upgrade h5py, or rewrite the file with "
                        "`h5repack` of the newer HDF5 (stores written by this version read on HDF5 1.14 and later)."
                    )
                raise StoreError(f"{self.path}: damaged HDF5 file: {problem}.")
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
        p = self.path
        self.attrs = {k: _h5.attr(v) for k, v in self._f.attrs.items()}
        self.meta = StoreMetadata.from_attrs(self.attrs, self.path)  # types, format version, dtype, status
        self.row_dtype = self.meta.row_dtype
        self.status = self.meta.status
        self.optimizer = self.meta.optimizer
        self.optimizer_exact = self.meta.optimizer_exact
        if "inexact_causes" in self.attrs and bool(self.meta.inexact_causes) == self.optimizer_exact:
            raise StoreError(  # the writer sets both from one list
                f"{p}: optimizer_exact={self.optimizer_exact} but inexact_causes={self.meta.inexact_causes!r}; the file is damaged."
            )
        self.update_rule = self.meta.update_rule
        order = self.meta.layer_order
        if not all(isinstance(n, str) for n in order):
            raise StoreError(f"{p}: attribute 'layer_order' is not a list of layer names; the file is damaged.")
        steps = _h5.dataset(self._f, "update_step", p, "iu", 1)
        epochs = _h5.dataset(self._f, "update_epoch", p, "iu", 1)
        self.n_steps = _h5.counter(self._f, "committed_steps", p, min(steps.shape[0], epochs.shape[0]))
        if self.complete and steps.shape[0] != self.n_steps:
            raise StoreError(f"{p}: a complete store commits every step, but it commits {self.n_steps} of {steps.shape[0]}; the file is damaged.")
        self.update_steps = np.asarray(steps[: self.n_steps], dtype=np.int64)
        self.update_epochs = np.asarray(epochs[: self.n_steps], dtype=np.int64)
        if len(self.update_steps) and (self.update_steps[0] < 0 or np.any(np.diff(self.update_steps) != 1)):
            raise StoreError(f"{p}: the step table is not consecutive; the file is inconsistent.")
        if len(self.update_epochs) and (
            self.update_epochs[0] < 0 or np.any(np.diff(self.update_epochs) < 0)
            or self.update_epochs[-1] >= max(TABLE_WIDTH_FLOOR, 2 * self.n_steps)
        ):
            raise StoreError(f"{p}: the epochs of the step table are negative, decreasing or implausibly large; the file is damaged.")
        lg = self._f.get("layers")
        if not isinstance(lg, h5py.Group):
            raise StoreError(f"{p}: no 'layers' group; the file is damaged or not a store.")
        names = [n for n in order if n in lg] + sorted(n for n in lg if n not in order)
        if len(set(order)) != len(order):
            raise StoreError(f"{p}: attribute 'layer_order' names a layer twice; the file is damaged.")
        for n in names:
            if not isinstance(lg[n], h5py.Group):
                raise StoreError(f"{p}: layers/{n} is not a group; the file is damaged.")
        self._layers = {n: LayerReader(self, n, lg[n]) for n in names}
        self._input_pos: dict[int, int] | None = None
        if "inputs" in self._f:
            ig = self._f["inputs"]
            if not isinstance(ig, h5py.Group):
                raise StoreError(f"{p}: 'inputs' is not a group; the file is damaged.")
            index = _h5.dataset(ig, "index", f"{p}: inputs", "iu", 1)
            data = ig.get("data")
            if not isinstance(data, h5py.Dataset) or data.ndim < 1:
                raise StoreError(f"{p}: inputs has no 'data' dataset; the file is damaged.")
            self._n_inputs = _h5.counter(ig, "committed", f"{p}: inputs", min(index.shape[0], data.shape[0]))
        else:
            self._n_inputs = 0
        if "queries" in self._f and not isinstance(self._f["queries"], h5py.Group):
            raise StoreError(f"{p}: 'queries' is not a group; the file is damaged.")

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

    def queries(self, split: str) -> "QuerySet":
        if split not in self.query_splits:
            raise KeyError(
                f"{self.path} has no query set {split!r}; it has {self.query_splits or 'none'}. Record one with "
                f"DualFormCallback(record_queries=({split!r},)) and trainer.{ {'test': 'test', 'validate': 'validate'}.get(split, 'predict') }(...)."
            )
        return QuerySet(self, split, self._f["queries"][split])

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


class QuerySet:
    """The query inputs recorded for one split (``trainer.test`` etc.)."""

    def __init__(self, store: StoreReader, split: str, group: h5py.Group) -> None:
        self.path = store.path
        self.split = split
        self._g = group
        self._store = store
        where = f"{store.path}: query set {split!r}"
        if not isinstance(group, h5py.Group):
            raise StoreError(f"{where} is not a group; the file is damaged.")
        try:
            cols = {c: _h5.dataset(group, c, where, "iu", 1) for c in ("index", "label", "prediction")}
        except StoreError as err:
            raise StoreError(f"{where} is incomplete ({err}).") from err
        self.n = cols["index"].shape[0]
        if cols["label"].shape[0] != self.n or cols["prediction"].shape[0] != self.n:
            raise StoreError(f"{store.path}: query set {split!r} has inconsistent lengths.")
        self.index = np.asarray(cols["index"][()])
        self.label = np.asarray(cols["label"][()])
        self.prediction = np.asarray(cols["prediction"][()])
        if "n" in group.attrs and _h5.int_attr(group.attrs, "n", where) != self.n:
            raise StoreError(f"{where}: holds {self.n} queries but says {group.attrs['n']}; the file is damaged.")
        if "inputs" in group and not isinstance(group["inputs"], h5py.Dataset):
            raise StoreError(f"{where}: its raw inputs are not a dataset; the file is damaged.")
        lg = group.get("layers")
        self.layers = list(lg) if isinstance(lg, h5py.Group) else []

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
        if not isinstance(g, h5py.Group) or not all(isinstance(g.get(k), h5py.Dataset) for k in ("keys", "example")):
            raise StoreError(f"{where} is not a group with keys and example columns; the file is damaged.")
        cols = [k for k in ("keys", "example", "position", "label") if k in g]
        keys_ds = g["keys"]
        width = self._store.layer(layer).d_in if layer in self._store.layers else None
        if keys_ds.ndim != 2 or (width is not None and keys_ds.shape[1] != width) or keys_ds.dtype.kind != "f":
            raise StoreError(f"{where}: keys are {keys_ds.shape} {keys_ds.dtype}, expected float (R, {width}); the file is damaged.")
        if any(not isinstance(g[k], h5py.Dataset) or g[k].shape[:1] != keys_ds.shape[:1] for k in cols) \
                or g["example"].dtype.kind not in "iu":
            raise StoreError(f"{where}: its columns have unequal lengths or types; the file is damaged.")
        which = np.asarray(g["example"][()])
        if len(which) and (int(which.min()) < 0 or int(which.max()) >= self.n):
            raise StoreError(f"{where}: rows name query examples outside 0..{self.n - 1}; the file is damaged.")
        if examples is None:
            return {k: (which if k == "example" else np.asarray(g[k][()])) for k in cols}
        rows = np.flatnonzero(np.isin(which, np.asarray(examples)))
        lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        return {k: (which if k == "example" else np.asarray(g[k][lo:hi]) if k == "keys" else np.asarray(g[k][()]))[
            rows - lo if k == "keys" else rows] for k in cols}
