"""The HDF5 store: layout, appending rows, committing, finalising, and reading blocks back.

The layout is documented in ``docs/store-format.md``; this module is its only writer and the readers'
only way in. Nothing here knows about Lightning.

Durability: the file is written in HDF5 SWMR mode, so a reader (or a crash) sees a consistent file.
Rows become visible only when :meth:`StoreWriter.commit` advances the ``committed_*`` counters,
which happens after the rows and the per-step tables they need are on disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from lightning_dualform.errors import StoreError
from lightning_dualform.optim import PARAM_COLUMNS, coefficients, plain_sgd_coefficients

FORMAT_NAME = "lightning-dualform"
FORMAT_VERSION = 1

ROW_DTYPES = ("float32", "float16", "bfloat16")
#: Per-row metadata columns: name -> numpy dtype.
ROW_COLUMNS = {"step": np.int64, "epoch": np.int32, "index": np.int64, "position": np.int32, "label": np.int64}
_FLOAT_COLS = ("lr", "momentum", "dampening", "weight_decay")
_META_CHUNK = 1 << 16


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
    """float32 rows -> the on-disk representation of ``row_dtype``."""
    if row_dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if row_dtype == "float16":
        return x.astype(np.float16)
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


class StoreWriter:
    """Creates a store and appends to it. Not thread-safe: one writer thread owns it."""

    def __init__(
        self,
        path: str,
        layers: list[LayerSpec],
        *,
        row_dtype: str = "float32",
        compression: str | None = None,
        chunk_rows: int = 1024,
        attrs: dict[str, Any] | None = None,
    ) -> None:
        if row_dtype not in ROW_DTYPES:
            raise ValueError(f"dtype={row_dtype!r} is not supported. Expected one of {ROW_DTYPES}.")
        self.path = path
        self.row_dtype = row_dtype
        self.chunk_rows = int(chunk_rows)
        filters = compression_kwargs(compression)
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        tmp = path + ".creating"
        # Build the skeleton under a temporary name so a crash during creation never leaves a half store.
        with h5py.File(tmp, "w", libver="latest") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            f.attrs["row_dtype"] = row_dtype
            f.attrs["compression"] = compression or "none"
            f.attrs["status"] = "recording"
            f.attrs["layer_order"] = json.dumps([spec.name for spec in layers])
            _set_attrs(f, attrs or {})
            f.create_dataset("committed_steps", data=np.zeros(1, dtype=np.int64))
            f.create_dataset("update_step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            f.create_dataset("update_epoch", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(4096,))
            lg = f.create_group("layers")
            disk_dtype = np.uint16 if row_dtype == "bfloat16" else np.dtype(row_dtype)
            for order, spec in enumerate(layers):
                g = lg.create_group(spec.name)
                g.attrs.update(
                    {
                        "kind": spec.kind,
                        "order": order,
                        "d_in": spec.d_in,
                        "d_out": spec.d_out,
                        "has_bias": spec.has_bias,
                        "exact": True,
                        "inexact_reason": "",
                    }
                )
                _set_attrs(g, spec.extra)
                g.create_dataset("committed_rows", data=np.zeros(1, dtype=np.int64))
                for name, width in (("keys", spec.d_in), ("values", spec.d_out)):
                    g.create_dataset(
                        name, shape=(0, width), maxshape=(None, width), dtype=disk_dtype,
                        chunks=(self.chunk_rows, width), **filters,
                    )
                for col, dt in ROW_COLUMNS.items():
                    g.create_dataset(col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(_META_CHUNK,), **filters)
                g.create_dataset("weight_init", data=spec.weight_init.astype(np.float32))
                if spec.has_bias:
                    g.create_dataset("bias_init", data=spec.bias_init.astype(np.float32))
                ug = g.create_group("updates")
                ug.create_dataset("grad_scale", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(4096,))
                for pname in ("weight", "bias") if spec.has_bias else ("weight",):
                    pg = ug.create_group(pname)
                    for col in PARAM_COLUMNS:
                        dt = np.float64 if col in _FLOAT_COLS else np.bool_
                        pg.create_dataset(col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
        os.replace(tmp, path)
        self._open_swmr()
        self._pending: dict[str, list[StepRows]] = {spec.name: [] for spec in layers}
        self._pending_steps: list[tuple[int, int, dict[str, tuple[float, Any, Any]]]] = []
        self._layers = [spec.name for spec in layers]
        self._pending_rows = 0
        self._inexact: dict[str, str] = {}
        self._dropped: dict[str, str] = {}

    def _open_swmr(self) -> None:
        self.file = h5py.File(self.path, "r+", libver="latest")
        self.file.swmr_mode = True

    # -- appending ---------------------------------------------------------------------------------
    def add_step(
        self,
        step: int,
        epoch: int,
        rows: dict[str, StepRows],
        updates: dict[str, tuple[float, Any, Any]],
    ) -> None:
        """Buffer one optimizer step: its rows per layer and ``(grad_scale, weight_update, bias_update)``.

        Rows carry their step and epoch implicitly. Buffers are written in large appends by :meth:`commit`
        or when they grow past a few chunks.
        """
        for name, r in rows.items():
            self._pending[name].append(r)
        self._pending_steps.append((step, epoch, updates))
        self._pending_rows += max((len(r.keys) for r in rows.values()), default=0)
        if self._pending_rows >= 4 * self.chunk_rows or len(self._pending_steps) >= 256:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending_steps:
            return
        steps = self._pending_steps
        step_ids = np.array([s for s, _, _ in steps], dtype=np.int64)
        epochs = np.array([e for _, e, _ in steps], dtype=np.int32)
        _append(self.file["update_step"], step_ids)
        _append(self.file["update_epoch"], epochs)
        for name in self._layers:
            g = self.file["layers"][name]
            ug = g["updates"]
            _append(ug["grad_scale"], np.array([u[name][0] for _, _, u in steps], dtype=np.float64))
            for pi, pname in ((1, "weight"), (2, "bias")):
                if pname not in ug:
                    continue
                for col in PARAM_COLUMNS:
                    vals = [getattr(u[name][pi], col) for _, _, u in steps]
                    _append(ug[pname][col], np.array(vals, dtype=ug[pname][col].dtype))
            chunks = self._pending[name]
            if chunks and name not in self._dropped:
                counts = [len(r.keys) for r in chunks]
                _append(g["keys"], encode_rows(np.concatenate([r.keys for r in chunks]), self.row_dtype))
                _append(g["values"], encode_rows(np.concatenate([r.values for r in chunks]), self.row_dtype))
                _append(g["step"], np.repeat(np.array([r.step for r in chunks], np.int64), counts))
                _append(g["epoch"], np.repeat(np.array([r.epoch for r in chunks], np.int32), counts))
                for col in ("index", "position", "label"):
                    _append(g[col], np.concatenate([getattr(r, col) for r in chunks]).astype(ROW_COLUMNS[col]))
            self._pending[name] = []
        self._pending_steps = []
        self._pending_rows = 0

    def commit(self) -> None:
        """Write everything buffered, then make it visible: counters last, then flush to disk."""
        self._write_pending()
        for name in self._layers:
            g = self.file["layers"][name]
            g["committed_rows"][0] = g["keys"].shape[0]
        self.file["committed_steps"][0] = self.file["update_step"].shape[0]
        self.file.flush()

    def drop_layer(self, name: str, reason: str) -> None:
        """Stop recording a layer whose rows cannot explain its weights; it is removed at finalisation."""
        self._dropped[name] = reason
        self._pending[name] = []

    def mark_inexact(self, name: str, reason: str) -> None:
        """Record that a layer's rows do not explain its weights (written at finalisation)."""
        self._inexact.setdefault(name, reason)

    # -- finishing -----------------------------------------------------------------------------------
    def finalize(self, final_weights: dict[str, tuple[np.ndarray, np.ndarray | None]], attrs: dict[str, Any]) -> None:
        """Commit, leave SWMR mode, write final weights, status and certificate inputs."""
        self.commit()
        self.file.close()
        with h5py.File(self.path, "r+") as f:
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
        """Commit and close without finalising (e.g. after an exception in training)."""
        if self.file.id.valid:
            self.commit()
            self.file.close()


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
    g.create_dataset(name, data=data)


# ------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------
@dataclass
class Coefficients:
    """``W_end = a_w W_0 + sum_s c_w[s] G_s`` (and the same for the bias), indexed by update number."""

    a_w: float
    c_w: np.ndarray  # (S,)
    a_b: float
    c_b: np.ndarray  # (S,), zeros without bias
    first_step: int  # global step of update number 0
    end_step: int  # the model after this many updates (global step)


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
        if group["keys"].shape[1:] != (self.d_in,) or group["values"].shape[1:] != (self.d_out,):
            raise StoreError(
                f"{store.path}: layer {name!r} keys/values have shapes {group['keys'].shape}/{group['values'].shape}, "
                f"expected (*, {self.d_in})/(*, {self.d_out}); the file is inconsistent."
            )
        self.attrs = {k: _attr(v) for k, v in a.items()}

    # -- weights ---------------------------------------------------------------------------------------
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

    @property
    def weight_residual(self) -> np.ndarray | None:
        return self._array("weight_residual")

    @property
    def bias_residual(self) -> np.ndarray | None:
        return self._array("bias_residual")

    # -- coefficients ----------------------------------------------------------------------------------
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
        exact_rule = self.store.optimizer_exact
        if exact_rule:
            a_w, c_w = coefficients(u["weight"], u["grad_scale"], n_used)
        else:
            a_w, c_w = plain_sgd_coefficients(u["weight"]["lr"], u["grad_scale"], u["weight"]["applied"], n_used)
        if "bias" in u:
            if exact_rule:
                a_b, c_b = coefficients(u["bias"], u["grad_scale"], n_used)
            else:
                a_b, c_b = plain_sgd_coefficients(u["bias"]["lr"], u["grad_scale"], u["bias"]["applied"], n_used)
        else:
            a_b, c_b = 1.0, np.zeros_like(c_w)
        return Coefficients(a_w, c_w, a_b, c_b, first, end)

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
    def read(self, start: int, stop: int, columns: tuple[str, ...] = ("keys", "values", *ROW_COLUMNS)) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of the committed rows; keys/values decoded to float32."""
        stop = min(stop, self.n_rows)
        out: dict[str, np.ndarray] = {}
        for col in columns:
            data = self._g[col][start:stop]
            out[col] = decode_rows(data, self.store.row_dtype) if col in ("keys", "values") else data
        return out


class StoreReader:
    """A store opened for reading. Validates the file before anything else touches it.

    Raises:
        StoreError: the path is missing, not HDF5, not a lightning-dualform store, from a newer
            format version, or internally inconsistent.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise StoreError(f"{self.path}: no such file. Pass the path of a store written by DualFormCallback.")
        if os.path.isdir(self.path):
            raise StoreError(f"{self.path}: is a directory, not a store file.")
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
        for layer in self._layers.values():
            ug = layer._g["updates"]
            if ug["grad_scale"].shape[0] < self.n_steps:
                raise StoreError(f"{self.path}: layer {layer.name!r} has fewer update records than committed steps.")

    @property
    def layers(self) -> list[str]:
        """Tracked layer names, in model order."""
        return list(self._layers)

    @property
    def first_step(self) -> int:
        return int(self.update_steps[0]) if len(self.update_steps) else 0

    @property
    def last_step(self) -> int:
        """The model after this many optimizer steps is the latest the store can rebuild."""
        return self.first_step + self.n_steps

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def layer(self, name: str) -> LayerReader:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(f"unknown layer {name!r}; this store has {self.layers}") from None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _attr(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
