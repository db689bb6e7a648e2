"""Checks of an untrusted store file: what it says is checked against the file's own shapes before it sizes,
indexes or sums anything.

The readers (``store/reader.py``) call these on open and on every block: counters against the datasets they
count, a layer's shapes, dtypes and per-step tables against its attributes and the store's update rule, a row's
step against the step table, its epoch against the step's epoch, per-step scalars for being finite. Each
failure is a :class:`~lightning_dualform.errors.StoreError` that names the file, the object and what is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5
from lightning_dualform.store import conv as _conv
from lightning_dualform.store.certificate import LayerCertificate
from lightning_dualform.store.format import LAYER_KINDS, ROW_COLUMNS, table_columns
from lightning_dualform.store.metadata import StoreMetadata

#: largest width of a table sized by a value read from the file (labels, epochs) when the file's own
#: shapes do not allow more: distinct values never outnumber the rows, so a wider table means damage
TABLE_WIDTH_FLOOR = 1 << 20


def probe_error(path: str, problem: str) -> StoreError:
    """The error for a file the child-process walk (``store/_probe.py``) found unreadable or damaged."""
    if problem.startswith("OSError") and ("signature" in problem or "not an HDF5" in problem.lower()
                                          or "file signature not found" in problem):
        return StoreError(f"{path}: not a readable HDF5 file ({problem}). Is it a lightning-dualform store, and "
                          "complete?")
    if "bad version number" in problem:  # HDF5 met an object version newer than it knows
        return StoreError(
            f"{path}: written by a newer HDF5 library than this h5py's (HDF5 "
            f"{h5py.version.hdf5_version}; {problem}). Upgrade h5py, or rewrite the file with "
            "`h5repack` of the newer HDF5 (stores written by this version read on HDF5 1.14 and later)."
        )
    return StoreError(f"{path}: damaged HDF5 file: {problem.rstrip('.')}.{_h5.damage_hint(problem)}")


# -- the root -----------------------------------------------------------------------------------------
@dataclass
class RootFacts:
    """What a store's root says, checked."""

    attrs: dict[str, Any]  # decoded root attributes
    meta: StoreMetadata
    n_steps: int  # committed steps
    update_steps: np.ndarray  # (n_steps,) int64, consecutive
    update_epochs: np.ndarray  # (n_steps,) int64, non-decreasing
    layers: list[str]  # layer groups, in ``layer_order`` (then any others, sorted)
    n_inputs: int  # committed raw inputs


def check_root(f: h5py.File, path: str) -> RootFacts:
    """The root attributes, the step table, the layers group and the raw inputs of a store file.

    Raises:
        StoreError: not a store, a newer format, or anything inconsistent.
    """
    p = path
    attrs = {k: _h5.attr(v) for k, v in f.attrs.items()}
    meta = StoreMetadata.from_attrs(attrs, path)  # types, format version, dtype, status
    if "inexact_causes" in attrs and bool(meta.inexact_causes) == meta.optimizer_exact:
        raise StoreError(  # the writer sets both from one list
            f"{p}: optimizer_exact={meta.optimizer_exact} but inexact_causes={meta.inexact_causes!r}; the file is "
            "damaged."
        )
    order = meta.layer_order
    if not all(isinstance(n, str) for n in order):
        raise StoreError(f"{p}: attribute 'layer_order' is not a list of layer names; the file is damaged.")
    steps = _h5.dataset(f, "update_step", p, "iu", 1)
    epochs = _h5.dataset(f, "update_epoch", p, "iu", 1)
    n_steps = _h5.counter(f, "committed_steps", p, min(steps.shape[0], epochs.shape[0]))
    if meta.status == "complete" and steps.shape[0] != n_steps:
        raise StoreError(f"{p}: a complete store commits every step, but it commits {n_steps} of {steps.shape[0]}; "
                         "the file is damaged.")
    update_steps = np.asarray(steps[:n_steps], dtype=np.int64)
    update_epochs = np.asarray(epochs[:n_steps], dtype=np.int64)
    if len(update_steps) and (update_steps[0] < 0 or np.any(np.diff(update_steps) != 1)):
        raise StoreError(f"{p}: the step table is not consecutive; the file is inconsistent.")
    if len(update_epochs) and (
        update_epochs[0] < 0 or np.any(np.diff(update_epochs) < 0)
        or update_epochs[-1] >= max(TABLE_WIDTH_FLOOR, 2 * n_steps)
    ):
        raise StoreError(f"{p}: the epochs of the step table are negative, decreasing or implausibly large; the file "
                         "is damaged.")
    lg = f.get("layers")
    if not isinstance(lg, h5py.Group):
        raise StoreError(f"{p}: no 'layers' group; the file is damaged or not a store.")
    if len(set(order)) != len(order):
        raise StoreError(f"{p}: attribute 'layer_order' names a layer twice; the file is damaged.")
    # the writer keeps the list and the groups equal (a dropped layer leaves both at finalisation): a name without
    # a group, or a group the list does not name, would make another layer the output layer
    missing, unnamed = [n for n in order if n not in lg], sorted(n for n in lg if n not in order)
    if missing or unnamed:
        what = (f"names {missing}, which have no group under 'layers'" if missing else "") + \
            (" and " if missing and unnamed else "") + (f"does not name the groups {unnamed}" if unnamed else "")
        raise StoreError(f"{p}: attribute 'layer_order' {what}; the file is damaged.")
    names = list(order)
    for n in names:
        if not isinstance(lg[n], h5py.Group):
            raise StoreError(f"{p}: layers/{n} is not a group; the file is damaged.")
    n_inputs = 0
    if "inputs" in f:
        ig = f["inputs"]
        if not isinstance(ig, h5py.Group):
            raise StoreError(f"{p}: 'inputs' is not a group; the file is damaged.")
        index = _h5.dataset(ig, "index", f"{p}: inputs", "iu", 1)
        data = ig.get("data")
        if not isinstance(data, h5py.Dataset) or data.ndim < 1:
            raise StoreError(f"{p}: inputs has no 'data' dataset; the file is damaged.")
        n_inputs = _h5.counter(ig, "committed", f"{p}: inputs", min(index.shape[0], data.shape[0]))
    if "queries" in f and not isinstance(f["queries"], h5py.Group):
        raise StoreError(f"{p}: 'queries' is not a group; the file is damaged.")
    return RootFacts(attrs, meta, n_steps, update_steps, update_epochs, names, n_inputs)


# -- a layer ------------------------------------------------------------------------------------------
@dataclass
class LayerFacts:
    """What a layer group says, checked against its datasets and the store."""

    kind: str
    d_in: int
    d_out: int
    has_bias: bool
    order: int
    exact: bool
    inexact_reason: str
    rows_without_index: int | None  # counted at finalisation (None before it)
    layout: str  # "rows", or "maps" for a convolution stored as its input maps (format 3)
    geometry: _conv.ConvGeometry | None  # a convolution stored as maps, once a step fixed their size
    committed_rows: int
    weight_shape: tuple[int, ...]  # the weight parameter's own shape
    param_dtype: str
    certificate: LayerCertificate | None
    attrs: dict[str, Any]  # decoded


def stored_entries(geometry: _conv.ConvGeometry | None, col: str, rows: int) -> int:
    """Stored entries of column ``col`` that ``rows`` virtual rows (whole maps) take: pixels (keys), value rows,
    one metadata entry per map; ``rows`` itself for a layer without maps."""
    if geometry is None:
        return rows
    per_map = {"keys": geometry.pixels, "values": geometry.locations}.get(col, 1)
    return rows // geometry.locations * per_map


def check_layer(group: h5py.Group, where: str, *, row_dtype: str, complete: bool, n_steps: int,
                update_rule: str) -> LayerFacts:
    """A layer group's attributes, row columns, weights and per-step tables.

    Args:
        where: names the layer in messages (``"<path>: layer 'fc'"``).
        row_dtype, complete, n_steps, update_rule: what the store's root says (:func:`check_root`).
    """
    a = group.attrs
    kind = _h5.str_attr(a, "kind", where)
    if kind not in LAYER_KINDS:
        raise StoreError(f"{where}: kind {kind!r} is not one of {LAYER_KINDS}; the file is damaged or newer.")
    d_in = _h5.int_attr(a, "d_in", where, lo=1, hi=1 << 40)
    d_out = _h5.int_attr(a, "d_out", where, lo=1, hi=1 << 40)
    has_bias = _h5.bool_attr(a, "has_bias", where)
    order = _h5.int_attr(a, "order", where, lo=0, hi=1 << 31)
    exact = _h5.bool_attr(a, "exact", where, default=True)
    rows_without_index = (_h5.int_attr(a, "rows_without_index", where, lo=0, hi=1 << 62)
                          if "rows_without_index" in a else None)
    inexact_reason = _h5.str_attr(a, "inexact_reason", where, default="")
    lengths = {}
    for col in ("keys", "values", *ROW_COLUMNS):
        ds = _h5.dataset(group, col, where, "iuf")
        lengths[col] = ds.shape[0]
    n_rows = _h5.counter(group, "committed_rows", where, 1 << 62)
    layout, geometry = maps_geometry(group, where, n_rows, d_in)
    locations = geometry.locations if geometry is not None else 1
    if n_rows % locations:
        raise StoreError(f"{where} says {n_rows} rows are committed, not whole maps of {locations} locations; "
                         "the file is inconsistent.")
    for col, length in lengths.items():
        if length < stored_entries(geometry, col, n_rows):
            raise StoreError(
                f"{where} says {n_rows} rows are committed but {col!r} holds only "
                f"{length}; the file is truncated or inconsistent."
            )
    if complete and any(length != stored_entries(geometry, col, n_rows) for col, length in lengths.items()):
        raise StoreError(f"{where}: a complete store commits every row, but it commits {n_rows} of {lengths}; the "
                         "file is damaged.")
    key_width = 1 if kind == "embedding" else d_in
    if layout == _conv.MAPS_LAYOUT:
        key_width = int(a.get("in_channels", -1))
    if group["keys"].shape[1:] != (key_width,) or group["values"].shape[1:] != (d_out,):
        raise StoreError(
            f"{where} keys/values have shapes {group['keys'].shape}/{group['values'].shape}, "
            f"expected (*, {key_width})/(*, {d_out}); the file is inconsistent."
        )
    want = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[row_dtype]
    if group["values"].dtype != want or (kind != "embedding" and group["keys"].dtype != want) \
            or (kind == "embedding" and group["keys"].dtype.kind not in "iu"):
        raise StoreError(
            f"{where}: keys/values are {group['keys'].dtype}/{group['values'].dtype}, but the store says its rows "
            f"are {row_dtype}; the file is damaged."
        )
    for col in ROW_COLUMNS:
        if group[col].ndim != 1 or group[col].dtype.kind not in "iu":
            raise StoreError(f"{where}: column {col!r} is {group[col].shape} {group[col].dtype}, expected integers; "
                             "the file is damaged.")
    check_weights(group, where, d_in, d_out, has_bias, complete)
    check_updates(group, where, n_steps, has_bias, update_rule)
    attrs = {k: _h5.attr(v) for k, v in a.items()}
    shape = a.get("weight_shape")
    try:
        weight_shape = (d_out, d_in) if shape is None else tuple(int(d) for d in np.asarray(shape).reshape(-1))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{where} attribute 'weight_shape' is {shape!r}; the file is damaged.") from err
    param_dtype = str(attrs.get("param_dtype", "float32"))
    if param_dtype not in ("float32", "float64"):
        raise StoreError(f"{where} attribute 'param_dtype' is {param_dtype!r}; the file is damaged.")
    if int(np.prod(weight_shape)) != d_out * d_in or len(weight_shape) < 2:
        raise StoreError(
            f"{where} says its weight has shape {weight_shape}, which does not hold a "
            f"({d_out}, {d_in}) layer; the file is damaged."
        )
    certificate = LayerCertificate.from_attrs(attrs, where)
    return LayerFacts(kind, d_in, d_out, has_bias, order, exact, inexact_reason, rows_without_index, layout, geometry,
                      n_rows, weight_shape, param_dtype, certificate, attrs)


def maps_geometry(group: h5py.Group, where: str, n_rows: int, d_in: int) -> tuple[str, _conv.ConvGeometry | None]:
    """A layer's layout and, for a convolution stored as maps (format 3), its geometry (None for rows stored as
    they are read, or no map stored yet)."""
    layout = _h5.attr(group.attrs.get("layout", "rows"))
    if layout != _conv.MAPS_LAYOUT:
        if layout != "rows":
            raise StoreError(f"{where} has layout {layout!r}; this library reads 'rows' and 'maps'.")
        return layout, None
    ds = group.get("input_size")
    if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "iu" or ds.ndim != 1:
        raise StoreError(f"{where} is stored as maps but has no integer 'input_size'; the file is damaged.")
    size = np.asarray(ds[()])
    if not size.any():
        if n_rows:
            raise StoreError(f"{where} holds {n_rows} rows but no map size; the file is damaged.")
        return layout, None
    try:
        geom = _conv.ConvGeometry.from_attrs({k: _h5.attr(v) for k, v in group.attrs.items()}, size)
    except ValueError as err:
        raise StoreError(f"{where}: {err}; the file is damaged.") from None
    if geom.d_in != d_in:
        raise StoreError(f"{where}: its geometry unfolds {geom.d_in} values per key, but d_in is {d_in}; the file is "
                         "damaged.")
    return layout, geom


def check_weights(group: h5py.Group, where: str, d_in: int, d_out: int, has_bias: bool, complete: bool = False) -> None:
    """Every weight-shaped dataset a layer may hold is a float array of its shape; the initial ones exist, and in
    a complete store the final ones (finalisation writes them with the status, in one write session)."""
    shapes = {"weight_init": (d_out, d_in), "weight_final": (d_out, d_in),
              "weight_residual": (d_out, d_in), "weight_buffer_init": (d_out, d_in),
              "bias_init": (d_out,), "bias_final": (d_out,), "bias_residual": (d_out,),
              "bias_buffer_init": (d_out,)}
    for name, shape in shapes.items():
        if name not in group:
            if name == "weight_init" or (name == "bias_init" and has_bias):
                raise StoreError(f"{where} has no {name!r}; the file is damaged or not a store.")
            if complete and (name == "weight_final" or (name == "bias_final" and has_bias)):
                raise StoreError(f"{where} has no {name!r}, which a complete store holds for every layer; the file is "
                                 "damaged.")
            continue
        ds = group[name]
        if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype.kind != "f":
            got = f"{ds.shape} {ds.dtype}" if isinstance(ds, h5py.Dataset) else "a group"
            raise StoreError(f"{where}: {name!r} is {got}, expected float {shape}; the file is damaged.")
    if has_bias != ("bias" in group.get("updates", {})):
        raise StoreError(f"{where}: has_bias={has_bias} but its update tables disagree; the file is damaged.")


def check_updates(group: h5py.Group, where: str, n_steps: int, has_bias: bool, update_rule: str) -> None:
    """Every per-step table of the store's update rule covers the committed steps, with the column's
    dtype; the float scalars are finite."""
    ug = group.get("updates")
    if not isinstance(ug, h5py.Group):
        raise StoreError(f"{where} has no update tables; the file is damaged or not a store.")
    read_column(ug, "grad_scale", n_steps, np.float64, where)
    for pname in ("weight", "bias") if has_bias else ("weight",):
        pg = ug.get(pname)
        if not isinstance(pg, h5py.Group):
            raise StoreError(f"{where} has no update table for its {pname}; the file is damaged.")
        for c in table_columns(update_rule):
            read_column(pg, c.name, n_steps, c.dtype, f"{where} {pname}")


def read_column(group: h5py.Group, name: str, n: int, dtype: type, where: str) -> np.ndarray:
    """The first ``n`` entries of a per-step column, checked: present, long enough, of ``dtype``'s kind, finite."""
    ds = group.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
        raise StoreError(f"{where}: the per-step column {name!r} is missing; the file is damaged or not of this "
                         "update rule.")
    if ds.shape[0] < n:
        raise StoreError(f"{where}: the per-step column {name!r} holds {ds.shape[0]} steps, fewer than the {n} "
                         "committed; the file is truncated.")
    want_bool = np.dtype(dtype) == np.bool_
    if (ds.dtype == np.bool_) != want_bool or (not want_bool and ds.dtype.kind != "f"):
        raise StoreError(f"{where}: the per-step column {name!r} is {ds.dtype}, expected {np.dtype(dtype)}; the file "
                         "is damaged.")
    data = np.asarray(ds[:n])
    if not want_bool and not np.isfinite(data).all():
        raise StoreError(f"{where}: the per-step column {name!r} holds NaN or inf; the file is damaged.")
    return data


def check_tail(group: h5py.Group, where: str, *, rows: int, committed: int, geometry: _conv.ConvGeometry | None,
               step_lo: int, step_hi: int, complete: bool) -> None:
    """Committed rows past the committed steps (rows ``rows..committed``): a writer commits rows before steps, so
    one killed between the two (or one still writing) leaves rows of the next steps, all at or past the step
    table's end and in order. Anything else (a step that fell back, a complete store with such rows) is damage:
    dropping those rows would lose committed ones without a word."""
    if complete:
        raise StoreError(f"{where}: a complete store commits only rows of its steps, but rows {rows}.. have "
                         f"steps past {step_hi - 1}; the file is damaged.")
    col, prev = group["step"], step_hi
    table = group.file["update_step"]
    if group.file.swmr_mode:
        table.refresh()  # a live writer writes a step's table entry before the counters that show its rows
    table_end = step_lo + int(table.shape[0])
    first, end = stored_entries(geometry, "step", rows), stored_entries(geometry, "step", committed)  # (maps: per map)
    for start in range(first, end, 1 << 20):
        tail = np.asarray(col[start : min(start + (1 << 20), end)])
        if int(tail[0]) < prev or (len(tail) > 1 and bool((np.diff(tail) < 0).any())):
            raise StoreError(f"{where}: rows {start}.. are not in step order; the file is damaged.")
        if int(tail[-1]) >= table_end:
            raise StoreError(f"{where}: rows {start}.. have steps up to {int(tail[-1])}, past the step table's end "
                             f"({table_end - 1}); the file is damaged.")
        prev = int(tail[-1])


def check_block(block: dict[str, np.ndarray], start: int, where: str, *, prev_step: int, step_lo: int, step_hi: int,
                epochs: np.ndarray) -> None:
    """A block of rows' metadata against the file's own tables (a few vector ops per block).

    Args:
        block: the rows ``start..`` as read (``step``, ``epoch``, ``index``, ``label`` where present).
        prev_step: the step of row ``start - 1`` (``step_lo`` for the first row).
        step_lo, step_hi: the committed steps' range; ``epochs``: their epochs.
    """
    if not block or not len(next(iter(block.values()))):
        return
    step = block.get("step")
    if step is not None:
        if int(step.min()) < step_lo or int(step.max()) >= step_hi:
            raise StoreError(
                f"{where}: rows {start}.. have steps {int(step.min())}..{int(step.max())} outside the step table "
                f"{step_lo}..{step_hi - 1}; the file is damaged."
            )
        if int(step[0]) < prev_step or (len(step) > 1 and bool((np.diff(step) < 0).any())):
            raise StoreError(f"{where}: rows {start}.. are not in step order; the file is damaged.")
        epoch = block.get("epoch")
        if epoch is not None and len(epochs):
            if not np.array_equal(epoch, epochs[step - step_lo]):
                raise StoreError(f"{where}: rows {start}.. carry epochs that are not their steps' epochs; the file is "
                                 "damaged.")
    for col in ("index", "label"):
        v = block.get(col)
        if v is not None and len(v) and int(v.min()) < -1:
            raise StoreError(f"{where}: column {col!r} holds {int(v.min())} (-1 means unknown); the file is damaged.")


# -- query sets ---------------------------------------------------------------------------------------
def check_query_set(group: h5py.Group, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A query set's ``index``, ``label`` and ``prediction`` columns (of one length, as its ``n`` says) and the
    layers it holds rows of."""
    if not isinstance(group, h5py.Group):
        raise StoreError(f"{where} is not a group; the file is damaged.")
    try:
        cols = {c: _h5.dataset(group, c, where, "iu", 1) for c in ("index", "label", "prediction")}
    except StoreError as err:
        raise StoreError(f"{where} is incomplete ({err}).") from err
    n = cols["index"].shape[0]
    if cols["label"].shape[0] != n or cols["prediction"].shape[0] != n:
        raise StoreError(f"{where} has inconsistent lengths.")
    if "n" in group.attrs and _h5.int_attr(group.attrs, "n", where) != n:
        raise StoreError(f"{where}: holds {n} queries but says {group.attrs['n']}; the file is damaged.")
    if "inputs" in group and not isinstance(group["inputs"], h5py.Dataset):
        raise StoreError(f"{where}: its raw inputs are not a dataset; the file is damaged.")
    lg = group.get("layers")
    layers = list(lg) if isinstance(lg, h5py.Group) else []
    return np.asarray(cols["index"][()]), np.asarray(cols["label"][()]), np.asarray(cols["prediction"][()]), layers


def check_query_rows(group: h5py.Group, where: str, width: int | None, n: int) -> tuple[list[str], np.ndarray]:
    """A query layer's row columns (``keys (R, width)`` float, ``example``, ``position``, ``label`` of one length);
    returns the columns present and ``example`` (each row's query number, within ``0..n - 1``)."""
    if not isinstance(group, h5py.Group) or not all(isinstance(group.get(k), h5py.Dataset)
                                                     for k in ("keys", "example")):
        raise StoreError(f"{where} is not a group with keys and example columns; the file is damaged.")
    cols = [k for k in ("keys", "example", "position", "label") if k in group]
    keys = group["keys"]
    if keys.ndim != 2 or (width is not None and keys.shape[1] != width) or keys.dtype.kind != "f":
        raise StoreError(f"{where}: keys are {keys.shape} {keys.dtype}, expected float (R, {width}); the file is "
                         "damaged.")
    if any(not isinstance(group[k], h5py.Dataset) or group[k].shape[:1] != keys.shape[:1] for k in cols) \
            or group["example"].dtype.kind not in "iu":
        raise StoreError(f"{where}: its columns have unequal lengths or types; the file is damaged.")
    example = np.asarray(group["example"][()])
    if len(example) and (int(example.min()) < 0 or int(example.max()) >= n):
        raise StoreError(f"{where}: rows name query examples outside 0..{n - 1}; the file is damaged.")
    return cols, example
