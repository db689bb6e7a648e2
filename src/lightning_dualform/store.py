"""The HDF5 store: layout, appending rows, committing, finalising, and reading blocks back.

The layout is documented in ``docs/store-format.md``; this module is its only writer and the readers'
only way in. Nothing here knows about Lightning.

Durability: the file is written in HDF5 SWMR mode, so a reader (or a crash) sees a consistent file.
Rows become visible only when :meth:`StoreWriter.commit` advances the ``committed_*`` counters,
which happens after the rows and the per-step tables they need are on disk.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import h5py
import numpy as np

from lightning_dualform import _hdf5_nogil, _probe
from lightning_dualform.chunk_append import ChunkAppender
from lightning_dualform.errors import StoreError
from lightning_dualform.optim import PARAM_COLUMNS, coefficients_with_buffer, plain_sgd_coefficients

FORMAT_NAME = "lightning-dualform"
FORMAT_VERSION = 1

ROW_DTYPES = ("float32", "float16", "bfloat16")
#: Per-row metadata columns: name -> numpy dtype.
ROW_COLUMNS = {"step": np.int64, "epoch": np.int32, "index": np.int64, "position": np.int32, "label": np.int64}
#: The certificate's sums of a layer's memory, ``sum_rows c_w v k^T`` and ``sum_rows c_b v`` (float64), kept for
#: ``attend`` (stored only up to this many weight elements: 128 MB) and removed whenever the rows change.
MEMORY_SUM_DATASETS = ("memory_weight", "memory_bias")
MEMORY_SUM_MAX_ELEMENTS = 1 << 24


def weights_crc32(w: np.ndarray) -> int:
    """CRC-32 of a float32 weight matrix as stored: ties the certificate's sums to the final weights."""
    return zlib.crc32(np.ascontiguousarray(w, dtype=np.float32).tobytes())


_FLOAT_COLS = ("lr", "momentum", "dampening", "weight_decay")
# chunk lengths of 1-D columns: HDF5 allocates whole chunks, so small stores stay small
_META_CHUNK = 4096
_TABLE_CHUNK = 512
#: automatic chunk size of keys and values: big enough that per-chunk costs vanish, small enough that a
#: chunk is checksummed and written while its rows are still in the CPU's cache (512 KiB: measured
#: 1.71x training time against 1.93x for 3 MB chunks, benchmarks/overhead.py)
CHUNK_BYTES = 512 * 1024


def chunk_rows_for(key_bytes: int, value_bytes: int, chunk_rows: int | None = None) -> int:
    """Rows per chunk of a layer's keys and values: ``chunk_rows`` when given, else the power of two
    nearest to ``CHUNK_BYTES`` over the wider row (64 to 65,536 rows)."""
    if chunk_rows is not None:
        return int(chunk_rows)
    rows = CHUNK_BYTES / max(key_bytes, value_bytes, 1)
    return int(min(65536, max(64, 2 ** round(math.log2(rows)))))


def compression_kwargs(compression: str | None) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments for a compression name.

    ``None``, ``"lzf"``, ``"gzip"`` (level 4) or ``"gzip-N"`` work everywhere; ``"lz4"``, ``"zstd"`` and
    ``"blosc-zstd"``/``"blosc-lz4"`` (byte-shuffled) need the optional ``hdf5plugin`` package.
    """
    if compression is None or compression == "none":
        return {}
    if compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if compression.startswith("gzip-") and compression[5:].isdigit() and 1 <= int(compression[5:]) <= 9:
        return {"compression": "gzip", "compression_opts": int(compression[5:]), "shuffle": True}
    if compression in ("lz4", "zstd", "blosc-lz4", "blosc-zstd"):
        try:
            import hdf5plugin
        except ImportError as err:
            raise ValueError(
                f"compression={compression!r} needs the optional package hdf5plugin: "
                "`pip install 'lightning-dualform[compress]'`, or use 'lzf' or 'gzip'."
            ) from err
        if compression == "lz4":
            return dict(hdf5plugin.LZ4())
        if compression == "zstd":
            return dict(hdf5plugin.Zstd(clevel=3))
        cname = compression.split("-")[1]
        return dict(hdf5plugin.Blosc(cname=cname, clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    raise ValueError(
        f"compression={compression!r} is not supported. Expected None, 'lzf', 'gzip', 'gzip-1'..'gzip-9', "
        "'lz4', 'zstd', 'blosc-lz4' or 'blosc-zstd'."
    )


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16), as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def encode_rows(x: np.ndarray, row_dtype: str) -> np.ndarray:
    """float32 rows -> the on-disk representation of ``row_dtype`` (rows already in it pass through;
    the callback converts with torch, which is several times faster than numpy's float16 cast)."""
    if row_dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if row_dtype == "float16":
        return x.astype(np.float16, copy=False)
    if x.dtype in (np.uint16, np.int16):
        return x.view(np.uint16)
    return _f32_to_bf16(x)


def decode_rows(x: np.ndarray, row_dtype: str) -> np.ndarray:
    """On-disk rows -> float32."""
    if row_dtype == "bfloat16":
        return _bf16_to_f32(x)
    return x.astype(np.float32, copy=False)


@dataclass
class LayerSpec:
    """What the store needs to know about one tracked layer before recording starts."""

    name: str
    kind: str  # "linear", "conv1d", "conv2d", "embedding"
    d_in: int
    d_out: int
    has_bias: bool
    weight_init: np.ndarray  # (d_out, d_in), float32: the layer's weight viewed as a linear map
    bias_init: np.ndarray | None
    extra: dict[str, Any] = field(default_factory=dict)  # kind-specific attributes (conv geometry ...)
    weight_buffer_init: np.ndarray | None = None  # momentum buffers that exist before the first step
    bias_buffer_init: np.ndarray | None = None

    def fingerprint(self) -> list:
        return [self.kind, self.d_in, self.d_out, self.has_bias]


@dataclass
class StepRows:
    """The rows of one layer for one optimizer step (already on the host, float32)."""

    keys: np.ndarray  # (n, d_in)
    values: np.ndarray  # (n, d_out)
    index: np.ndarray  # (n,) dataset index, -1 when unknown
    position: np.ndarray  # (n,) position inside the example
    label: np.ndarray  # (n,) label, -1 when none
    step: int = 0
    epoch: int = 0


def settings_of(specs: list[LayerSpec], row_dtype: str, compression: str | None) -> dict[str, Any]:
    """What must match between a store and a run that continues it."""
    return {
        "layers": {s.name: s.fingerprint() for s in specs},
        "row_dtype": row_dtype,
        "compression": compression or "none",
    }


def stored_settings(path: str) -> dict[str, Any]:
    """The settings a store on disk was written with (see :func:`settings_of`)."""
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        layers = {
            n: [_attr(g.attrs["kind"]), int(g.attrs["d_in"]), int(g.attrs["d_out"]), bool(g.attrs["has_bias"])]
            for n, g in f["layers"].items()
        }
        return {"layers": layers, "row_dtype": _attr(f.attrs["row_dtype"]), "compression": _attr(f.attrs["compression"])}


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
        attrs: dict[str, Any] | None = None,
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
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["row_dtype"] = row_dtype
            f.attrs["compression"] = compression or "none"
            f.attrs["status"] = "recording"
            f.attrs["layer_order"] = json.dumps([spec.name for spec in layers])
            _set_attrs(f, attrs or {})
            _create(f, "committed_steps", data=np.zeros(1, dtype=np.int64))
            _create(f, "update_step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(_TABLE_CHUNK,))
            _create(f, "update_epoch", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(_TABLE_CHUNK,))
            if input_shape is not None:
                ig = f.create_group("inputs")
                _create(ig, "committed", data=np.zeros(1, dtype=np.int64))
                _create(ig, "index", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
                width = int(np.prod(input_shape)) if input_shape else 1
                _create(ig, 
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
                _set_attrs(g, spec.extra)
                _create(g, "committed_rows", data=np.zeros(1, dtype=np.int64))
                # an embedding's keys are one-hot: its token ids are stored instead, as int64 (N, 1)
                key_width, key_dtype = (1, np.int64) if spec.kind == "embedding" else (spec.d_in, disk_dtype)
                rows = chunk_rows_for(key_width * np.dtype(key_dtype).itemsize, spec.d_out * np.dtype(disk_dtype).itemsize, chunk_rows)
                for name, width, dt in (("keys", key_width, key_dtype), ("values", spec.d_out, disk_dtype)):
                    _create(g, name, shape=(0, width), maxshape=(None, width), dtype=dt, chunks=(rows, width), **filters)
                for col, dt in ROW_COLUMNS.items():
                    _create(g, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(_META_CHUNK,), **filters)
                _create(g, "weight_init", data=spec.weight_init.astype(np.float32))
                if spec.has_bias:
                    _create(g, "bias_init", data=spec.bias_init.astype(np.float32))
                if spec.weight_buffer_init is not None:
                    _create(g, "weight_buffer_init", data=spec.weight_buffer_init.astype(np.float32))
                if spec.bias_buffer_init is not None:
                    _create(g, "bias_buffer_init", data=spec.bias_buffer_init.astype(np.float32))
                ug = g.create_group("updates")
                _create(ug, "grad_scale", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(_TABLE_CHUNK,))
                for pname in ("weight", "bias") if spec.has_bias else ("weight",):
                    pg = ug.create_group(pname)
                    for col in PARAM_COLUMNS:
                        dt = np.float64 if col in _FLOAT_COLS else np.bool_
                        _create(pg, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(_TABLE_CHUNK,))
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
        update_attrs: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
    ) -> "StoreWriter":
        """Continue a store from a checkpoint: truncate everything written after it, then append.

        ``update_attrs`` gets the file's root attributes (decoded, as :attr:`StoreReader.attrs`) and returns
        those to set before any row changes (what the resumed run changes about the whole store).

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
            raise StoreError(f"{path}: cannot continue this file: it is not a readable store ({_short(err)}).") from err
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
            for name, g in f["layers"].items():
                n = int(rows.get(name, 0))
                if g["keys"].shape[0] < n:
                    raise StoreError(f"{path}: layer {name!r}: the checkpoint counts {n} rows but the store holds {g['keys'].shape[0]}.")
            # Before any row changes: what was derived from the old rows goes, and the file says it is being
            # written (an interrupted resume must not leave a "complete" store, or sums of other rows).
            f.attrs["status"] = "recording"
            if update_attrs is not None:
                _set_attrs(f, update_attrs({k: _attr(v) for k, v in f.attrs.items()}))
            for g in f["layers"].values():
                for dname in ("weight_final", "bias_final", "weight_residual", "bias_residual", *MEMORY_SUM_DATASETS):
                    if dname in g:
                        del g[dname]
                for key in [k for k in g.attrs if k.startswith(("certificate_", "memory_"))]:
                    del g.attrs[key]
            f.flush()
            _truncate(f["update_step"], steps)
            _truncate(f["update_epoch"], steps)
            f["committed_steps"][0] = steps
            for name, g in f["layers"].items():
                n = int(rows.get(name, 0))
                for col in ("keys", "values", *ROW_COLUMNS):
                    _truncate(g[col], n)
                g["committed_rows"][0] = n
                ug = g["updates"]
                _truncate(ug["grad_scale"], steps)
                for pname in ("weight", "bias"):
                    if pname in ug:
                        for col in PARAM_COLUMNS:
                            _truncate(ug[pname][col], steps)
            if "inputs" in f and inputs is not None:
                for col in ("index", "data"):
                    _truncate(f["inputs"][col], inputs)
                f["inputs"]["committed"][0] = inputs
        kinds = {n: stored["layers"][n][0] for n in rows if n in stored["layers"]}
        return cls(path, kinds, stored["row_dtype"], commit_seconds)

    @staticmethod
    def _table_handles(ug: h5py.Group) -> dict[str, Any]:
        out: dict[str, Any] = {"grad_scale": ug["grad_scale"]}
        for pname in ("weight", "bias"):
            if pname in ug:
                out[pname] = {col: ug[pname][col] for col in PARAM_COLUMNS}
        return out

    def _counts(self) -> dict[str, Any]:
        f = self.file
        return {
            "steps": int(f["committed_steps"][0]),
            "rows": {n: int(f["layers"][n]["committed_rows"][0]) for n in self._layers if n in f["layers"]},
            "inputs": int(f["inputs"]["committed"][0]) if "inputs" in f else None,
        }

    def input_indices(self) -> np.ndarray:
        """Dataset indices whose raw input is already stored (committed)."""
        if "inputs" not in self.file:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.file["inputs"]["index"][: int(self.file["inputs"]["committed"][0])])

    # -- appending ---------------------------------------------------------------------------------
    def add_step(self, step: int, epoch: int, rows: dict[str, StepRows], updates: dict[str, tuple[float, Any, Any]]) -> None:
        """Buffer one optimizer step: its rows per layer and ``(grad_scale, weight_update, bias_update)``.

        Rows are written in large appends that end on chunk boundaries (so no chunk is written twice);
        the small per-step tables at commit. A commit follows every ``commit_seconds``.
        """
        for name, r in rows.items():
            if name in self._dropped:
                continue
            n = len(r.keys)
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
            if self._pending_rows[name] >= max(4 * self._chunk_rows[name], _META_CHUNK):
                self._write_rows(name, aligned=True)
        self._pending_steps.append((step, epoch, updates))
        if len(self._pending_steps) >= 4096:
            self._write_tables()
        if time.monotonic() - self._last_commit > self.commit_seconds:
            self.commit()

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
            ref = "step" if "keys" in self._appenders[name] else "keys"
            m = total - (ds[ref].shape[0] + total) % ds[ref].chunks[0]
            if m <= 0:
                return
        cols = {c: (np.concatenate([b[c] for b in blocks]) if len(blocks) > 1 else blocks[0][c]) for c in blocks[0]}
        for col, data in cols.items():
            _append(ds[col], data[:m].astype(ROW_COLUMNS[col], copy=False) if col in ROW_COLUMNS else data[:m])
        self._pending[name] = [{c: v[m:] for c, v in cols.items()}] if m < total else []
        self._pending_rows[name] = total - m

    def _write_tables(self) -> None:
        if self._pending_inputs and "inputs" in self.file:
            ig = self.file["inputs"]
            if self._input_appender is None:
                _append(ig["data"], np.concatenate([d for _, d in self._pending_inputs]).astype(ig["data"].dtype, copy=False))
            _append(ig["index"], np.concatenate([i for i, _ in self._pending_inputs]))
        self._pending_inputs = []
        if not self._pending_steps:
            return
        steps = self._pending_steps
        _append(self.file["update_step"], np.array([s for s, _, _ in steps], dtype=np.int64))
        _append(self.file["update_epoch"], np.array([e for _, e, _ in steps], dtype=np.int32))
        for name in self._layers:
            t = self._tables[name]
            _append(t["grad_scale"], np.array([u[name][0] for _, _, u in steps], dtype=np.float64))
            for pi, pname in ((1, "weight"), (2, "bias")):
                if pname not in t:
                    continue
                for col, ds in t[pname].items():
                    _append(ds, np.array([getattr(u[name][pi], col) for _, _, u in steps], dtype=ds.dtype))
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
            lengths = {col: ds[col].shape[0] for col in ("keys", "values", *ROW_COLUMNS)}
            if len(set(lengths.values())) != 1:  # never point the counter at rows without all their columns
                raise StoreError(f"{self.path}: layer {name!r}: columns of unequal length {lengths}; not committed.")
            ds["committed_rows"][0] = lengths["keys"]
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
    def finalize(self, final_weights: dict[str, tuple[np.ndarray, np.ndarray | None]], attrs: dict[str, Any]) -> None:
        """Commit, leave SWMR mode, write final weights and status."""
        self.commit()
        self.file.close()
        with h5py.File(self.path, "r+", locking=False) as f:
            for name, (w, b) in final_weights.items():
                g = f["layers"][name]
                _replace(g, "weight_final", w.astype(np.float32))
                if b is not None:
                    _replace(g, "bias_final", b.astype(np.float32))
            for name in self._dropped:
                del f["layers"][name]
            f.attrs["dropped_layers"] = json.dumps(self._dropped)
            f.attrs["layer_order"] = json.dumps([n for n in self._layers if n not in self._dropped])
            for name, reason in self._inexact.items():
                f["layers"][name].attrs["exact"] = False
                f["layers"][name].attrs["inexact_reason"] = reason
            _set_attrs(f, attrs)
            f.attrs["status"] = "complete"

    def close(self) -> None:
        """Commit and close without finalising (after an exception, or when fit stops early)."""
        if self.file.id.valid:
            self.commit()
            self.file.close()


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
            _create(self.group, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        lg = self.group.create_group("layers")
        for name, d_in in layers.items():
            g = lg.create_group(name)
            _create(g, "keys", shape=(0, d_in), maxshape=(None, d_in), dtype=np.float32, chunks=(256, d_in))
            _create(g, "example", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            _create(g, "position", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
            _create(g, "label", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))

    def add_batch(
        self, index: np.ndarray, label: np.ndarray, prediction: np.ndarray, inputs: np.ndarray | None,
        rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    ) -> None:
        """One batch: per-example columns, and per layer ``(keys, example-in-batch, position, label)``
        (the row's own label: per position for sequences)."""
        g = self.group
        if inputs is not None:
            if "inputs" not in g:
                _create(g, "inputs", shape=(0, *inputs.shape[1:]), maxshape=(None, *inputs.shape[1:]),
                                 dtype=inputs.dtype, chunks=(64, *inputs.shape[1:]))
            if g["inputs"].shape[0] == self.n and g["inputs"].shape[1:] == inputs.shape[1:]:
                _append(g["inputs"], inputs)
        for col, data in (("index", index), ("label", label), ("prediction", prediction)):
            _append(g[col], data.astype(np.int64))
        for name, (keys, example, position, label) in rows.items():
            lg = g["layers"][name]
            _append(lg["keys"], keys.astype(np.float32))
            _append(lg["example"], example.astype(np.int64) + self.n)
            _append(lg["position"], position.astype(np.int32))
            _append(lg["label"], label.astype(np.int64))
        self.n += len(index)

    def close(self) -> None:
        if self.file.id.valid:
            self.group.attrs["n"] = self.n
            self.file.close()


SHARDS_FORMAT = "lightning-dualform-shards"


def write_shard_index(path: str, shards: list[str]) -> None:
    """A small file at ``path`` naming the per-rank stores of a DDP run (paths relative to it)."""
    base = os.path.dirname(os.path.abspath(path))
    tmp = path + ".creating"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = SHARDS_FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["shards"] = json.dumps([os.path.relpath(os.path.abspath(s), base) for s in shards])
    os.replace(tmp, path)


def read_shard_index(path: str) -> list[str] | None:
    """The shard files an index names (absolute paths), or None when ``path`` is not an index."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if _attr(f.attrs.get("format", "")) != SHARDS_FORMAT:
                return None
            names = json.loads(_attr(f.attrs["shards"]))
    except (OSError, KeyError, ValueError, TypeError):
        return None
    base = os.path.dirname(os.path.abspath(path))
    return [os.path.join(base, n) for n in names]


def _truncate(ds: h5py.Dataset, n: int) -> None:
    if ds.shape[0] != n:
        ds.resize(n, axis=0)


# HDF5 marks a file open for (SWMR) writing in its superblock; a killed writer leaves the mark and HDF5
# then refuses to reopen the file for writing. `h5clear -s` removes it; this does the same for the v2/v3
# superblocks that libver="latest" writes, after checking the superblock's own checksum.
def clear_swmr_flags(path: str) -> None:
    """Clear the 'open for writing' flags a killed writer left in a store's superblock."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3) or head[11] == 0:
        return
    n = 12 + 4 * head[9]
    if len(head) < n + 4 or struct.unpack("<I", head[n : n + 4])[0] != _lookup3(head[:n]):
        raise StoreError(f"{path}: the HDF5 superblock checksum does not match; the file is damaged.")
    patched = bytearray(head[:n])
    patched[11] = 0
    with open(path, "r+b") as fh:
        fh.write(bytes(patched) + struct.pack("<I", _lookup3(bytes(patched))))
        fh.flush()
        os.fsync(fh.fileno())


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def _lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``: HDF5's metadata checksum."""
    m = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    i = 0

    def word(j: int) -> int:
        return data[j] | (data[j + 1] << 8) | (data[j + 2] << 16) | (data[j + 3] << 24)

    while length > 12:
        a, b, c = (a + word(i)) & m, (b + word(i + 4)) & m, (c + word(i + 8)) & m
        a = ((a - c) & m) ^ _rot(c, 4); c = (c + b) & m
        b = ((b - a) & m) ^ _rot(a, 6); a = (a + c) & m
        c = ((c - b) & m) ^ _rot(b, 8); b = (b + a) & m
        a = ((a - c) & m) ^ _rot(c, 16); c = (c + b) & m
        b = ((b - a) & m) ^ _rot(a, 19); a = (a + c) & m
        c = ((c - b) & m) ^ _rot(b, 4); b = (b + a) & m
        length -= 12
        i += 12
    if length == 0:
        return c
    tail = data[i:] + bytes(12 - length)
    data, i = tail, 0
    a, b, c = (a + word(0)) & m, (b + word(4)) & m, (c + word(8)) & m
    c ^= b; c = (c - _rot(b, 14)) & m
    a ^= c; a = (a - _rot(c, 11)) & m
    b ^= a; b = (b - _rot(a, 25)) & m
    c ^= b; c = (c - _rot(b, 16)) & m
    a ^= c; a = (a - _rot(c, 4)) & m
    b ^= a; b = (b - _rot(a, 14)) & m
    c ^= b; c = (c - _rot(b, 24)) & m
    return c


def _create(group: h5py.Group, name: str, **kwargs: Any) -> h5py.Dataset:
    """Every dataset is chunked with a fletcher32 checksum per chunk: a damaged file raises on read
    instead of answering with wrong numbers."""
    return group.create_dataset(name, fletcher32=True, **kwargs)


def _set_attrs(obj: h5py.Group, attrs: dict[str, Any]) -> None:
    """Attributes as HDF5 scalars; containers as JSON text (never pickled)."""
    for k, v in attrs.items():
        if isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        elif isinstance(v, str):
            v = str.__str__(v)  # plain str, not an Enum subclass
        obj.attrs[k] = v


def _append(ds: h5py.Dataset, data: np.ndarray) -> None:
    if len(data) == 0:
        return
    n = ds.shape[0]
    ds.resize(n + len(data), axis=0)
    ds[n:] = data


def _replace(g: h5py.Group, name: str, data: np.ndarray) -> None:
    if name in g:
        del g[name]
    _create(g, name, data=data)


# ------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------
_DAMAGE = (OSError, KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError)


def _guarded(method: Callable) -> Callable:
    """Turn any low-level failure while reading stored data into a :class:`StoreError` naming the file."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except _DAMAGE as err:
            path = getattr(self, "path", None) or getattr(getattr(self, "store", None), "path", "store")
            raise StoreError(f"{path}: damaged store: {method.__name__} failed ({type(err).__name__}: {_short(err)}).") from err

    return wrapper

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
    """Read access to one layer of a store."""

    def __init__(self, store: "StoreReader", name: str, group: h5py.Group) -> None:
        self.store = store
        self.name = name
        self._g = group
        a = group.attrs
        try:
            self.kind = str(a["kind"])
            self.d_in = int(a["d_in"])
            self.d_out = int(a["d_out"])
            self.has_bias = bool(a["has_bias"])
            self.order = int(a["order"])
            self.exact = bool(a.get("exact", True))
            self.inexact_reason = str(a.get("inexact_reason", ""))
            self.n_rows = int(group["committed_rows"][0])
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise StoreError(f"{store.path}: layer {name!r} is missing its attributes or counters ({err}); the file is damaged.") from err
        for col in ("keys", "values", *ROW_COLUMNS):
            if col not in group:
                raise StoreError(f"{store.path}: layer {name!r} has no {col!r} dataset; the file is damaged or not a store.")
            if group[col].shape[0] < self.n_rows:
                raise StoreError(
                    f"{store.path}: layer {name!r} says {self.n_rows} rows are committed but {col!r} holds only "
                    f"{group[col].shape[0]}; the file is truncated or inconsistent."
                )
        key_width = 1 if self.kind == "embedding" else self.d_in
        if group["keys"].shape[1:] != (key_width,) or group["values"].shape[1:] != (self.d_out,):
            raise StoreError(
                f"{store.path}: layer {name!r} keys/values have shapes {group['keys'].shape}/{group['values'].shape}, "
                f"expected (*, {key_width})/(*, {self.d_out}); the file is inconsistent."
            )
        self.attrs = {k: _attr(v) for k, v in a.items()}

    # -- weights ---------------------------------------------------------------------------------------
    @_guarded
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

    @_guarded
    def stored_memory_sums(self, end_step: int, n_rows: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """``sum_rows c_w v k^T`` and ``sum_rows c_b v`` as the certificate computed them (float64), when the
        file holds them for exactly this end step, number of rows and final weights of a finished store;
        otherwise None (the caller sums the rows)."""
        g = self._g
        if self.store.status != "complete" or "memory_weight" not in g or "weight_final" not in g:
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
        w = self._checked_sum("memory_weight", (self.d_out, self.d_in))
        b = self._checked_sum("memory_bias", (self.d_out,)) if self.has_bias else None
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
    @_guarded
    def updates(self) -> dict[str, Any]:
        """The committed per-step tables: ``step``, ``grad_scale``, and a column dict per parameter."""
        n = self.store.n_steps
        ug = self._g["updates"]
        out: dict[str, Any] = {"step": self.store.update_steps, "grad_scale": np.asarray(ug["grad_scale"][:n])}
        for pname in ("weight", "bias"):
            if pname in ug:
                out[pname] = {col: np.asarray(ug[pname][col][:n]) for col in PARAM_COLUMNS}
        return out

    def coefficients(self, at_step: int | None = None) -> Coefficients:
        """Scalars rebuilding the layer as it was after ``at_step`` optimizer steps (default: the end)."""
        u = self.updates()
        steps = u["step"]
        first = int(steps[0]) if len(steps) else 0
        last = first + len(steps)
        end = last if at_step is None else int(at_step)
        if not first <= end <= last:
            raise ValueError(
                f"at_step={at_step} is outside what {self.store.path} covers: steps {first}..{last} "
                f"(the model after {first} to {last} optimizer steps)."
            )
        n_used = end - first

        def param(pname: str) -> tuple[float, float, np.ndarray]:
            if pname not in u:
                return 1.0, 0.0, np.zeros(len(steps))
            t = u[pname]
            if self.store.optimizer_exact:
                return coefficients_with_buffer(t, u["grad_scale"], n_used)
            a, c = plain_sgd_coefficients(t["lr"], u["grad_scale"], t["applied"], n_used)
            return a, 0.0, c

        a_w, b_w, c_w = param("weight")
        a_b, b_b, c_b = param("bias")
        return Coefficients(a_w, c_w, a_b, c_b, first, end, b_w, b_b)

    def base_weights(
        self, at_step: int | None = None, coef: Coefficients | None = None, with_residual: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The part of the weights that the memory does not hold: ``a W_0 (+ b buf_0)``, and the same for
        the bias; for a store of an inexact run at its end, the stored residual is added too.

        ``W_T q = base_weight q + base_bias + sum_rows (c_w (k.q) + c_b) v``.
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
        if with_residual and coef.end_step == self.store.last_step and not self.store.optimizer_exact:
            if self.weight_residual is not None:
                w += self.weight_residual
            if b is not None and self.bias_residual is not None:
                b += self.bias_residual
        return w, b

    @_guarded
    def rows_before(self, step: int) -> int:
        """Number of leading rows recorded before optimizer step ``step`` (rows are in step order)."""
        if self.n_rows == 0:
            return 0
        col = self._g["step"]
        lo, hi = 0, self.n_rows  # binary search on disk: never loads the whole column
        while lo < hi:
            mid = (lo + hi) // 2
            if int(col[mid]) < step:
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- rows ------------------------------------------------------------------------------------------
    @_guarded
    def read(self, start: int, stop: int, columns: tuple[str, ...] = ("keys", "values", *ROW_COLUMNS)) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of the committed rows; keys/values decoded to float32."""
        stop = min(stop, self.n_rows)
        out: dict[str, np.ndarray] = {}
        for col in columns:
            if col == "tokens":  # an embedding's stored token ids, (n,)
                out[col] = self._g["keys"][start:stop, 0]
                continue
            # the bulk columns are read without holding the GIL (the prefetch thread reads while torch runs)
            data = _hdf5_nogil.read_rows(self._g[col], start, stop) if col in ("keys", "values") else self._g[col][start:stop]
            if col == "keys" and self.kind == "embedding":
                onehot = np.zeros((len(data), self.d_in), dtype=np.float32)
                ids = data[:, 0]
                if len(ids) and (ids.min() < 0 or ids.max() >= self.d_in):
                    raise StoreError(f"{self.store.path}: layer {self.name!r} holds token ids outside 0..{self.d_in - 1}.")
                onehot[np.arange(len(data)), ids] = 1.0
                out[col] = onehot
            else:
                out[col] = decode_rows(data, self.store.row_dtype) if col in ("keys", "values") else data
        return out


class StoreView:
    """What every opened store offers beyond its files: layers by name, the step range, status.

    Subclasses set ``path``, ``status``, ``n_steps``, ``first_step`` and ``_layers`` (name -> layer reader).
    """

    path: str
    status: str
    n_steps: int
    _layers: dict[str, Any]

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

    Raises:
        StoreError: the path is missing, not HDF5, not a lightning-dualform store, from a newer
            format version, or internally inconsistent.
    """

    def __init__(self, path: str | os.PathLike, *, probe: bool = True) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise StoreError(f"{self.path}: no such file. Pass the path of a store written by DualFormCallback.")
        if os.path.isdir(self.path):
            raise StoreError(f"{self.path}: is a directory, not a store file.")
        if probe:
            with open(self.path, "rb") as fh:
                is_hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
            problem = _probe.probe(self.path) if is_hdf5 else None
            if problem is not None:
                raise StoreError(f"{self.path}: damaged HDF5 file: {problem}.")
        try:
            self._f = h5py.File(self.path, "r", swmr=True, locking=False)
        except OSError:
            try:
                self._f = h5py.File(self.path, "r", locking=False)
            except OSError as err:
                raise StoreError(f"{self.path}: not a readable HDF5 file ({_short(err)}). Is it a lightning-dualform store, and complete?") from err
        try:
            self._validate()
        except StoreError:
            self._f.close()
            raise
        except Exception as err:  # h5py raises many kinds on damaged files; none may escape raw
            self._f.close()
            raise StoreError(f"{self.path}: damaged store ({type(err).__name__}: {_short(err)}).") from err

    def _validate(self) -> None:
        a = self._f.attrs
        if _attr(a.get("format", "")) != FORMAT_NAME:
            raise StoreError(f"{self.path}: an HDF5 file but not a lightning-dualform store (no format='{FORMAT_NAME}' attribute).")
        version = int(a.get("format_version", -1))
        if version > FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {version} is newer than this library reads ({FORMAT_VERSION}); "
                "upgrade lightning-dualform."
            )
        if version < 1:
            raise StoreError(f"{self.path}: invalid store format version {version}.")
        self.attrs = {k: _attr(v) for k, v in a.items()}
        self.row_dtype = str(self.attrs.get("row_dtype", "float32"))
        if self.row_dtype not in ROW_DTYPES:
            raise StoreError(f"{self.path}: unknown row dtype {self.row_dtype!r}.")
        self.status = str(self.attrs.get("status", "unknown"))
        self.optimizer = json.loads(self.attrs.get("optimizer", "{}") or "{}")
        self.optimizer_exact = bool(self.attrs.get("optimizer_exact", True))
        self.n_steps = int(self._f["committed_steps"][0])
        if self._f["update_step"].shape[0] < self.n_steps:
            raise StoreError(f"{self.path}: {self.n_steps} steps committed but the step table is shorter; the file is truncated.")
        self.update_steps = np.asarray(self._f["update_step"][: self.n_steps])
        self.update_epochs = np.asarray(self._f["update_epoch"][: self.n_steps])
        if len(self.update_steps) and np.any(np.diff(self.update_steps) != 1):
            raise StoreError(f"{self.path}: the step table is not consecutive; the file is inconsistent.")
        order = json.loads(self.attrs.get("layer_order", "[]"))
        lg = self._f["layers"]
        names = [n for n in order if n in lg] + sorted(n for n in lg if n not in order)
        self._layers = {n: LayerReader(self, n, lg[n]) for n in names}
        self._input_pos: dict[int, int] | None = None
        for layer in self._layers.values():
            ug = layer._g["updates"]
            if ug["grad_scale"].shape[0] < self.n_steps:
                raise StoreError(f"{self.path}: layer {layer.name!r} has fewer update records than committed steps.")

    @property
    def first_step(self) -> int:
        return int(self.update_steps[0]) if len(self.update_steps) else 0

    @property
    def n_inputs(self) -> int:
        """How many training examples have their raw input stored."""
        return int(self._f["inputs"]["committed"][0]) if "inputs" in self._f else 0

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

    @_guarded
    def train_inputs(self, indices: np.ndarray) -> np.ndarray | None:
        """Raw inputs of training examples by dataset index (None where the store has none).

        Returns an array ``(len(indices), *input_shape)``; unknown indices give NaN rows (float) or zeros.
        """
        if "inputs" not in self._f:
            return None
        ig = self._f["inputs"]
        n = int(ig["committed"][0])
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
        self._f.close()


class QuerySet:
    """The query inputs recorded for one split (``trainer.test`` etc.)."""

    def __init__(self, store: StoreReader, split: str, group: h5py.Group) -> None:
        self.path = store.path
        self.split = split
        self._g = group
        try:
            self.index = np.asarray(group["index"][()])
            self.label = np.asarray(group["label"][()])
            self.prediction = np.asarray(group["prediction"][()])
        except KeyError as err:
            raise StoreError(f"{store.path}: query set {split!r} is incomplete ({err}).") from err
        self.n = len(self.index)
        if len(self.label) != self.n or len(self.prediction) != self.n:
            raise StoreError(f"{store.path}: query set {split!r} has inconsistent lengths.")
        self.layers = list(group["layers"]) if "layers" in group else []

    @property
    @_guarded
    def inputs(self) -> np.ndarray | None:
        """Raw inputs ``(n, *shape)`` of the query examples, when they were recorded."""
        return np.asarray(self._g["inputs"][()]) if "inputs" in self._g else None

    @_guarded
    def layer_rows(self, layer: str) -> dict[str, np.ndarray]:
        """``keys (R, d_in)``, ``example (R,)`` (query number), ``position (R,)`` and ``label (R,)``
        (the row's own label, per position for sequences; -1 when none) of one layer."""
        if layer not in self.layers:
            raise KeyError(f"query set {self.split!r} has no rows for layer {layer!r}; it has {self.layers}")
        g = self._g["layers"][layer]
        return {k: np.asarray(g[k][()]) for k in ("keys", "example", "position", "label") if k in g}


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
