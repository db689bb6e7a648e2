"""Writing a store: create its skeleton, append steps, commit, resume from a checkpoint, finalise.

Durability: the file is written in HDF5 SWMR mode, so a reader (or a crash) sees a consistent file.
Rows become visible only when :meth:`StoreWriter.commit` advances the ``committed_*`` counters,
which happens after the rows and the per-step tables they need are on disk. Nothing here knows about
Lightning or torch.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from typing import Any, Callable

import h5py
import numpy as np

from lightning_dualform.errors import StoreError
from lightning_dualform.optim import PARAM, OptimizerState
from lightning_dualform.store import _h5
from lightning_dualform.store._chunks import ChunkAppender
from lightning_dualform.store._superblock import clear_swmr_flags
from lightning_dualform.store.conv import MAPS_LAYOUT, ConvGeometry
from lightning_dualform.store.filters import compression_kwargs, encode_rows
from lightning_dualform.store.metadata import StoreMetadata
from lightning_dualform.store.format import (
    CONV_KINDS,
    DERIVED_DATASETS,
    FORMAT_VERSION,
    META_CHUNK,
    ROW_COLUMNS,
    ROW_DTYPES,
    STATE_GROUP,
    TABLE_CHUNK,
    LayerSpec,
    StepRows,
    chunk_rows_for,
    table_columns,
)


def stored_settings(path: str) -> dict[str, Any]:
    """The settings a store on disk was written with (see :func:`settings_of`)."""
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        layers = {
            n: [_h5.attr(g.attrs["kind"]), int(g.attrs["d_in"]), int(g.attrs["d_out"]), bool(g.attrs["has_bias"]),
                *([_h5.attr(g.attrs.get("layout", "rows"))] if _h5.attr(g.attrs["kind"]) in CONV_KINDS else [])]
            for n, g in f["layers"].items()
        }
        return {"layers": layers, "row_dtype": _h5.attr(f.attrs["row_dtype"]), "compression": _h5.attr(f.attrs["compression"]),
                "update_rule": _h5.attr(f.attrs.get("update_rule", "sgd"))}  # format 1: SGD only


def map_counts(group: h5py.Group) -> tuple[int, int] | None:
    """``(P, L)`` of a convolution layer stored as maps: pixels per map and virtual rows per map; ``None`` for
    a layer of one stored row per key row, or maps whose size no step has fixed yet.

    Raises:
        ValueError: the layer's geometry attributes or ``input_size`` are malformed.
    """
    if _h5.attr(group.attrs.get("layout", "rows")) != MAPS_LAYOUT:
        return None
    size = np.asarray(group["input_size"][()])
    if not size.any():
        return None
    geom = ConvGeometry.from_attrs({k: _h5.attr(v) for k, v in group.attrs.items()}, size)
    return geom.pixels, geom.locations


def write_state(group: h5py.Group, state: OptimizerState, dtype: str) -> None:
    """An optimizer state's entries (the parameter itself excepted: it is ``weight_init``/``bias_init``) into
    ``group``: arrays as datasets in ``dtype``, scalars as attributes in their own numpy dtype (NAdam's
    ``mu_product`` and ASGD's ``eta`` are rounded to float32 by torch, and the replay rounds them the same way).
    Arrays are gzip-compressed: those torch has not created yet are zeros, and cost almost nothing."""
    entries = {**state.nonlinear, **{k: v for k, v in (state.linear or {}).items() if k != PARAM}}
    for name, v in entries.items():
        if isinstance(v, np.ndarray) and v.ndim:
            _h5.create(group, name, data=v.astype(dtype), compression="gzip", compression_opts=1)
        else:
            group.attrs[name] = v if isinstance(v, np.floating) else np.float64(v)



class StoreWriter:
    """Creates (or continues) a store and appends to it. Not thread-safe: one writer thread owns it.

    Use :meth:`create` for a new store and :meth:`resume` to continue one from a checkpoint.
    """

    def __init__(self, path: str, kinds: dict[str, str], row_dtype: str, commit_seconds: float) -> None:
        self.path = path
        self._kinds = dict(kinds)
        layers = list(kinds)
        self.row_dtype = row_dtype
        self.commit_seconds = commit_seconds
        self._layers = list(layers)
        self._pending: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in self._layers}
        self._pending_rows: dict[str, int] = {n: 0 for n in self._layers}
        self._pending_steps: list[tuple[int, int, dict[str, tuple[float, Any, Any]]]] = []
        self._pending_inputs: list[tuple[np.ndarray, np.ndarray]] = []
        self._inexact: dict[str, str] = {}
        self._dropped: dict[str, str] = {}
        self._last_commit = time.monotonic()
        # the default 1 MB chunk cache: appends end on chunk boundaries and bypass it (a large cache makes
        # HDF5 push every checksummed chunk through it: 3x slower writes, measured)
        self.file = h5py.File(self.path, "r+", libver="latest", locking=False)
        self.file.swmr_mode = True
        # h5py resolves every path on each access: look each dataset up once
        self._ds = {
            name: {col: g[col] for col in ("keys", "values", *ROW_COLUMNS, "committed_rows")}
            for name, g in ((n, self.file["layers"][n]) for n in self._layers)
        }
        self._tables = {name: self._table_handles(self.file["layers"][name]["updates"]) for name in self._layers}
        self._chunk_rows = {name: ds["keys"].chunks[0] for name, ds in self._ds.items()}  # as the file has them
        # keys and values of uncompressed stores skip h5py's filter pipeline (see chunk_append.py)
        self._appenders = {
            name: {col: app for col in ("keys", "values") if (app := ChunkAppender.for_dataset(ds[col])) is not None}
            for name, ds in self._ds.items()
        }
        self._input_appender = ChunkAppender.for_dataset(self.file["inputs"]["data"] if "inputs" in self.file else None)
        # a convolution stored as maps: its datasets count pixels (keys), virtual rows (values) and maps (the
        # metadata columns); the multipliers per map are fixed by the first step's map size
        self._maps = {n: _h5.attr(self.file["layers"][n].attrs.get("layout", "rows")) == MAPS_LAYOUT for n in self._layers}
        self._mult: dict[str, dict[str, int]] = {}
        for name in self._layers:
            counts = map_counts(self.file["layers"][name]) if self._maps[name] else None
            if counts is not None:
                self._mult[name] = {"keys": counts[0], "values": counts[1]}
        self.committed = self._counts()

    @classmethod
    def create(
        cls,
        path: str,
        layers: list[LayerSpec],
        *,
        row_dtype: str = "float32",
        compression: str | None = None,
        chunk_rows: int | None = None,
        metadata: StoreMetadata | None = None,
        input_shape: tuple[int, ...] | None = None,
        input_dtype: str = "float32",
        commit_seconds: float = 30.0,
    ) -> "StoreWriter":
        """Write a new store's skeleton (every dataset, empty) and open it for appending."""
        if row_dtype not in ROW_DTYPES:
            raise ValueError(f"dtype={row_dtype!r} is not supported. Expected one of {ROW_DTYPES}.")
        filters = compression_kwargs(compression)
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = path + ".creating"
        # Build the skeleton under a temporary name so a crash during creation never leaves a half store;
        # SWMR mode forbids creating datasets later, so everything is created here.
        with h5py.File(tmp, "w", libver="latest", locking=False) as f:
            meta = metadata if metadata is not None else StoreMetadata()
            meta.format_version = FORMAT_VERSION
            meta.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            meta.row_dtype = row_dtype
            meta.compression = compression or "none"
            meta.status = "recording"
            meta.layer_order = [spec.name for spec in layers]
            _h5.set_attrs(f, meta.to_attrs())
            _h5.create(f, "committed_steps", data=np.zeros(1, dtype=np.int64))
            _h5.create(f, "update_step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(TABLE_CHUNK,))
            _h5.create(f, "update_epoch", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(TABLE_CHUNK,))
            if input_shape is not None:
                ig = f.create_group("inputs")
                _h5.create(ig, "committed", data=np.zeros(1, dtype=np.int64))
                _h5.create(ig, "index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
                width = int(np.prod(input_shape)) if input_shape else 1
                _h5.create(ig, 
                    "data", shape=(0, *input_shape), maxshape=(None, *input_shape), dtype=input_dtype,
                    chunks=(max(1, min(1024, (1 << 20) // max(1, width * 4))), *input_shape), **filters,
                )
            lg = f.create_group("layers")
            disk_dtype = np.uint16 if row_dtype == "bfloat16" else np.dtype(row_dtype)
            for order, spec in enumerate(layers):
                g = lg.create_group(spec.name)
                g.attrs.update(
                    {"kind": spec.kind, "order": order, "d_in": spec.d_in, "d_out": spec.d_out,
                     "has_bias": spec.has_bias, "exact": True, "inexact_reason": ""}
                )
                _h5.set_attrs(g, spec.extra)
                _h5.create(g, "committed_rows", data=np.zeros(1, dtype=np.int64))
                # an embedding's keys are one-hot: its token ids are stored instead, as int64 (N, 1)
                key_width, key_dtype = (1, np.int64) if spec.kind == "embedding" else (spec.d_in, disk_dtype)
                if spec.kind in CONV_KINDS:  # its input maps as pixel rows (store/conv.py); their size comes later
                    g.attrs["layout"] = MAPS_LAYOUT
                    key_width = int(spec.extra["in_channels"])
                    _h5.create(g, "input_size", data=np.zeros(len(spec.extra["kernel_size"]), dtype=np.int64))
                rows = chunk_rows_for(key_width * np.dtype(key_dtype).itemsize, spec.d_out * np.dtype(disk_dtype).itemsize, chunk_rows)
                for name, width, dt in (("keys", key_width, key_dtype), ("values", spec.d_out, disk_dtype)):
                    _h5.create(g, name, shape=(0, width), maxshape=(None, width), dtype=dt, chunks=(rows, width), **filters)
                for col, dt in ROW_COLUMNS.items():
                    _h5.create(g, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(META_CHUNK,), **filters)
                _h5.create(g, "weight_init", data=spec.weight_init.astype(np.float32))
                if spec.has_bias:
                    _h5.create(g, "bias_init", data=spec.bias_init.astype(np.float32))
                if spec.weight_buffer_init is not None:
                    _h5.create(g, "weight_buffer_init", data=spec.weight_buffer_init.astype(np.float32))
                if spec.bias_buffer_init is not None:
                    _h5.create(g, "bias_buffer_init", data=spec.bias_buffer_init.astype(np.float32))
                if spec.weight_shape is not None:
                    g.attrs["weight_shape"] = np.asarray(spec.weight_shape, dtype=np.int64)
                    g.attrs["param_dtype"] = spec.state_dtype  # torch rounds scalar factors of p to it
                if spec.weight_state is not None:
                    sg = g.create_group(STATE_GROUP)
                    for pname, st in (("weight", spec.weight_state), ("bias", spec.bias_state)):
                        if st is not None:
                            write_state(sg.create_group(pname), st, spec.state_dtype)
                ug = g.create_group("updates")
                _h5.create(ug, "grad_scale", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(TABLE_CHUNK,))
                for pname in ("weight", "bias") if spec.has_bias else ("weight",):
                    pg = ug.create_group(pname)
                    for col in table_columns(meta.update_rule):
                        _h5.create(pg, col.name, shape=(0,), maxshape=(None,), dtype=col.dtype, chunks=(TABLE_CHUNK,))
        os.replace(tmp, path)
        return cls(path, {s.name: s.kind for s in layers}, row_dtype, commit_seconds)

    @classmethod
    def resume(
        cls,
        path: str,
        settings: dict[str, Any],
        rows: dict[str, int],
        steps: int,
        inputs: int | None,
        *,
        last_step: int | None = None,
        commit_seconds: float = 30.0,
        update_attrs: Callable[[StoreMetadata], dict[str, Any]] | None = None,
    ) -> "StoreWriter":
        """Continue a store from a checkpoint: truncate everything written after it, then append.

        ``update_attrs`` gets the file's :class:`StoreMetadata` and returns the root attributes to set before
        any row changes (what the resumed run changes about the whole store).

        Raises:
            StoreError: the file is not a store, holds fewer rows than the checkpoint says (rows that the
                checkpoint counts are missing: they cannot be made up), or its ``steps``-th recorded step
                is not ``last_step`` (the checkpoint's counts do not describe this store: truncating to
                them would delete recorded steps, so nothing is touched).
            ValueError: the store was written with other settings than this run's.
        """
        clear_swmr_flags(path)
        try:
            stored = stored_settings(path)
        except (OSError, KeyError) as err:
            raise StoreError(f"{path}: cannot continue this file: it is not a readable store ({_h5.short(err)}).") from err
        diffs = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if diffs:
            shown = "; ".join(f"{k}: store has {a!r}, this run has {b!r}" for k, (a, b) in diffs.items())
            raise ValueError(
                f"DualFormCallback: {path} was written with other settings ({shown}). Use the same settings, "
                "another path, or `overwrite=True` to start the store afresh."
            )
        with h5py.File(path, "r+", libver="latest", locking=False) as f:
            have = int(f["update_step"].shape[0])
            if have < steps:
                raise StoreError(f"{path}: the checkpoint counts {steps} optimizer steps but the store holds {have}; rows are missing.")
            if last_step is not None and steps > 0 and int(f["update_step"][steps - 1]) != last_step:
                raise StoreError(
                    f"{path}: the checkpoint says the store's first {steps} steps end at step {last_step}, but the "
                    f"store's step {steps} is training step {int(f['update_step'][steps - 1])}. The checkpoint does not "
                    "describe this store; nothing was truncated. Resume from a checkpoint saved with this store, or "
                    "record into another path."
                )
            counts = {name: map_counts(g) for name, g in f["layers"].items()}
            for name, g in f["layers"].items():
                n = int(rows.get(name, 0))
                if g["values"].shape[0] < n or (counts[name] is not None and n % counts[name][1]):
                    raise StoreError(f"{path}: layer {name!r}: the checkpoint counts {n} rows but the store holds {g['values'].shape[0]}.")
            # Before any row changes: what was derived from the old rows goes, and the file says it is being
            # written (an interrupted resume must not leave a "complete" store, or sums of other rows).
            f.attrs["status"] = "recording"
            if update_attrs is not None:
                meta = StoreMetadata.from_attrs({k: _h5.attr(v) for k, v in f.attrs.items()}, path)
                _h5.set_attrs(f, update_attrs(meta))
            for g in f["layers"].values():
                for dname in ("weight_final", "bias_final", "weight_residual", "bias_residual", *DERIVED_DATASETS):
                    if dname in g:
                        del g[dname]
                for key in [k for k in g.attrs if k.startswith(("certificate_", "memory_"))]:
                    del g.attrs[key]
            f.flush()
            _h5.truncate(f["update_step"], steps)
            _h5.truncate(f["update_epoch"], steps)
            f["committed_steps"][0] = steps
            for name, g in f["layers"].items():
                n = int(rows.get(name, 0))
                # a convolution's maps: n virtual rows are n / L maps, n P / L pixels
                p, per_map = counts[name] if counts[name] is not None else (1, 1)
                for col in ("keys", "values", *ROW_COLUMNS):
                    _h5.truncate(g[col], n if col == "values" else (n // per_map) * (p if col == "keys" else 1))
                g["committed_rows"][0] = n
                ug = g["updates"]
                _h5.truncate(ug["grad_scale"], steps)
                for pname in ("weight", "bias"):
                    if pname in ug:
                        for col in ug[pname].values():
                            _h5.truncate(col, steps)
            if "inputs" in f and inputs is not None:
                for col in ("index", "data"):
                    _h5.truncate(f["inputs"][col], inputs)
                f["inputs"]["committed"][0] = inputs
        kinds = {n: stored["layers"][n][0] for n in rows if n in stored["layers"]}
        return cls(path, kinds, stored["row_dtype"], commit_seconds)

    @staticmethod
    def _table_handles(ug: h5py.Group) -> dict[str, Any]:
        out: dict[str, Any] = {"grad_scale": ug["grad_scale"]}
        for pname in ("weight", "bias"):
            if pname in ug:
                out[pname] = dict(ug[pname].items())
        return out

    def _counts(self) -> dict[str, Any]:
        f = self.file
        return {
            "steps": int(f["committed_steps"][0]),
            "rows": {n: int(f["layers"][n]["committed_rows"][0]) for n in self._layers if n in f["layers"]},
            "inputs": int(f["inputs"]["committed"][0]) if "inputs" in f else None,
        }

    def input_sizes(self) -> dict[str, tuple[int, ...]]:
        """The map size of each convolution stored as maps whose size is fixed (by its first rows)."""
        out = {}
        for name in self._layers:
            if name in self._mult:
                out[name] = tuple(int(v) for v in self.file["layers"][name]["input_size"][()])
        return out

    def input_indices(self) -> np.ndarray:
        """Dataset indices whose raw input is already stored (committed)."""
        if "inputs" not in self.file:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.file["inputs"]["index"][: int(self.file["inputs"]["committed"][0])])

    # -- appending ---------------------------------------------------------------------------------
    def add_step(self, step: int, epoch: int, rows: dict[str, StepRows], updates: dict[str, tuple[float, Any, Any]]) -> None:
        """Buffer one optimizer step: its rows per layer and ``(grad_scale, weight_row, bias_row)``, a row being
        the step's ``{column: value}`` of the store's update rule (or an object with those attributes).

        Rows are written in large appends that end on chunk boundaries (so no chunk is written twice);
        the small per-step tables at commit. A commit follows every ``commit_seconds``.
        """
        for name, r in rows.items():
            if name in self._dropped:
                continue
            n = len(r.index)  # entries of the metadata columns (one per map for a convolution)
            if self._maps[name]:
                self._set_map_size(name, r)
            block = {
                "keys": r.keys.astype(np.int64) if self._kinds[name] == "embedding" else encode_rows(r.keys, self.row_dtype),
                "values": encode_rows(r.values, self.row_dtype),
                "index": r.index, "position": r.position, "label": r.label,
                "step": np.full(n, step, np.int64), "epoch": np.full(n, epoch, np.int32),
            }
            for col, appender in self._appenders[name].items():
                appender.append(block.pop(col))
            self._pending[name].append(block)
            self._pending_rows[name] += n
            if self._pending_rows[name] >= max(4 * self._chunk_rows[name], META_CHUNK):
                self._write_rows(name, aligned=True)
        self._pending_steps.append((step, epoch, updates))
        if len(self._pending_steps) >= 4096:
            self._write_tables()
        if time.monotonic() - self._last_commit > self.commit_seconds:
            self.commit()

    def _set_map_size(self, name: str, r: StepRows) -> None:
        """Fix a convolution's map size at its first rows (written now, before any row that depends on it)."""
        ds = self.file["layers"][name]["input_size"]
        have = tuple(int(v) for v in ds[()])
        if r.map_size is None or (any(have) and have != tuple(r.map_size)):
            raise StoreError(f"{self.path}: layer {name!r} is stored as maps of size {have}, not {r.map_size}.")
        if not any(have):
            ds[...] = np.asarray(r.map_size, dtype=np.int64)
            counts = map_counts(self.file["layers"][name])
            self._mult[name] = {"keys": counts[0], "values": counts[1]}
        mult = self._mult[name]
        if len(r.keys) != mult["keys"] * len(r.index) or len(r.values) != mult["values"] * len(r.index):
            raise StoreError(f"{self.path}: layer {name!r}: {len(r.keys)} pixel rows and {len(r.values)} value rows "
                             f"for {len(r.index)} maps of {mult['keys']} pixels and {mult['values']} locations.")

    def add_inputs(self, index: np.ndarray, data: np.ndarray) -> None:
        """Raw inputs of training examples seen for the first time (all written by the next commit)."""
        if self._input_appender is not None:  # the bytes go out now, chunk by chunk; the indices at commit
            self._input_appender.append(np.ascontiguousarray(data, dtype=self._input_appender.ds.dtype))
            data = None
        self._pending_inputs.append((index, data))

    def _write_rows(self, name: str, aligned: bool) -> None:
        blocks = self._pending[name]
        if not blocks:
            return
        ds = self._ds[name]
        total = self._pending_rows[name]
        m = total
        if aligned:  # stop at a chunk boundary; keep the rest for the next append
            ref = "step" if "keys" in self._appenders[name] or self._maps[name] else "keys"
            m = total - (ds[ref].shape[0] + total) % ds[ref].chunks[0]
            if m <= 0:
                return
        mult = self._mult.get(name, {})  # a convolution's maps: m maps are m * P pixels and m * L value rows
        cols = {c: (np.concatenate([b[c] for b in blocks]) if len(blocks) > 1 else blocks[0][c]) for c in blocks[0]}
        for col, data in cols.items():
            k = m * mult.get(col, 1)
            _h5.append(ds[col], data[:k].astype(ROW_COLUMNS[col], copy=False) if col in ROW_COLUMNS else data[:k])
        self._pending[name] = [{c: v[m * mult.get(c, 1):] for c, v in cols.items()}] if m < total else []
        self._pending_rows[name] = total - m

    def _write_tables(self) -> None:
        if self._pending_inputs and "inputs" in self.file:
            ig = self.file["inputs"]
            if self._input_appender is None:
                _h5.append(ig["data"], np.concatenate([d for _, d in self._pending_inputs]).astype(ig["data"].dtype, copy=False))
            _h5.append(ig["index"], np.concatenate([i for i, _ in self._pending_inputs]))
        self._pending_inputs = []
        if not self._pending_steps:
            return
        steps = self._pending_steps
        _h5.append(self.file["update_step"], np.array([s for s, _, _ in steps], dtype=np.int64))
        _h5.append(self.file["update_epoch"], np.array([e for _, e, _ in steps], dtype=np.int32))
        for name in self._layers:
            t = self._tables[name]
            _h5.append(t["grad_scale"], np.array([u[name][0] for _, _, u in steps], dtype=np.float64))
            for pi, pname in ((1, "weight"), (2, "bias")):
                if pname not in t:
                    continue
                for col, ds in t[pname].items():
                    _h5.append(ds, np.array([_column(u[name][pi], col) for _, _, u in steps], dtype=ds.dtype))
        self._pending_steps = []

    def _write_pending(self) -> None:
        for name in self._layers:
            self._write_rows(name, aligned=False)
            for appender in self._appenders[name].values():
                appender.flush()
        if self._input_appender is not None:
            self._input_appender.flush()
        self._write_tables()

    def commit(self) -> dict[str, Any]:
        """Write everything buffered, flush it, then advance the counters that make it visible.

        Returns the committed counts: ``{"steps": int, "rows": {layer: int}, "inputs": int | None}``.
        """
        self._write_pending()
        self.file.flush()  # data first ...
        f = self.file
        for name in self._layers:
            if name in self._dropped:  # removed at finalisation; its counter stays where it was
                continue
            ds = self._ds[name]
            mult = self._mult.get(name, {})
            lengths = {col: ds[col].shape[0] for col in ("keys", "values", *ROW_COLUMNS)}
            # (in maps: pixels and value rows per map)
            maps = {col: n // mult.get(col, 1) if n % mult.get(col, 1) == 0 else -1 for col, n in lengths.items()}
            if len(set(maps.values())) != 1:  # never point the counter at rows without all their columns
                raise StoreError(f"{self.path}: layer {name!r}: columns of unequal length {lengths}; not committed.")
            ds["committed_rows"][0] = lengths["values"]
        if "inputs" in f:
            ig = f["inputs"]
            if ig["index"].shape[0] != ig["data"].shape[0]:
                raise StoreError(f"{self.path}: {ig['index'].shape[0]} input indices for {ig['data'].shape[0]} inputs; not committed.")
            ig["committed"][0] = ig["index"].shape[0]
        f["committed_steps"][0] = f["update_step"].shape[0]
        f.flush()  # ... then the counters that point at it
        self._last_commit = time.monotonic()
        self.committed = self._counts()
        return self.committed

    def drop_layer(self, name: str, reason: str) -> None:
        """Stop recording a layer whose rows cannot explain its weights; it is removed at finalisation."""
        self._dropped[name] = reason
        self._pending[name] = []
        self._pending_rows[name] = 0
        self._appenders[name] = {}

    def mark_inexact(self, name: str, reason: str) -> None:
        """Record that a layer's rows do not fully explain its weights (written at finalisation)."""
        self._inexact.setdefault(name, reason)

    # -- finishing -----------------------------------------------------------------------------------
    def finalize(self, final_weights: dict[str, tuple[np.ndarray, np.ndarray | None]], final_step: int, epochs: int,
                 certificate: dict[str, dict[str, Any]] | None = None) -> None:
        """Commit, leave SWMR mode, write final weights, the certificate made as training went (if any) and
        status."""
        self.commit()
        self.file.close()
        with h5py.File(self.path, "r+", locking=False) as f:
            for name, (w, b) in final_weights.items():
                g = f["layers"][name]
                _h5.replace(g, "weight_final", w.astype(np.float32))
                if b is not None:
                    _h5.replace(g, "bias_final", b.astype(np.float32))
            for name in self._dropped:
                del f["layers"][name]
            _h5.set_attrs(f, {"dropped_layers": self._dropped, "layer_order": [n for n in self._layers if n not in self._dropped]})
            for g in f["layers"].values():  # (rows before a resume count too)
                g.attrs["rows_without_index"] = _count_negative(g["index"], int(g["committed_rows"][0]))
            for name, cert in (certificate or {}).items():
                if name in f["layers"]:
                    _h5.set_attrs(f["layers"][name], {f"certificate_{k}": v for k, v in cert.items()})
            for name, reason in self._inexact.items():
                if name not in f["layers"]:
                    continue  # marked inexact, then dropped altogether
                f["layers"][name].attrs["exact"] = False
                f["layers"][name].attrs["inexact_reason"] = reason
            _h5.set_attrs(f, {"final_step": int(final_step), "epochs": int(epochs)})
            f.attrs["status"] = "complete"

    def close(self) -> None:
        """Commit and close without finalising (after an exception, or when fit stops early)."""
        if self.file.id.valid:
            self.commit()
            self.file.close()


def _column(row: Any, col: str) -> Any:
    return row[col] if isinstance(row, dict) else getattr(row, col)


def _count_negative(ds: h5py.Dataset, n: int, block: int = 1 << 22) -> int:
    """Entries below zero among the first ``n`` of a 1-D dataset, read in blocks."""
    return sum(int((ds[s : min(s + block, n)] < 0).sum()) for s in range(0, n, block))
