"""A new store's skeleton: every group and dataset, empty, written before the first step (SWMR mode then only
allows appending to them), and the checks of what sizes it.

:func:`write_skeleton` writes it into a private temporary file that :meth:`StoreWriter.create
<lightning_dualform.store.writer.StoreWriter.create>` renames into place; :func:`map_counts` reads back how a
convolution stored as maps counts its entries.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import h5py
import numpy as np

from lightning_dualform._args import as_int
from lightning_dualform.optim import PARAM, OptimizerState
from lightning_dualform.store import _h5
from lightning_dualform.store.conv import MAPS_LAYOUT, ConvGeometry
from lightning_dualform.store.format import (
    CONV_KINDS,
    FORMAT_VERSION,
    LAYER_KINDS,
    META_CHUNK,
    ROW_COLUMNS,
    STATE_GROUP,
    TABLE_CHUNK,
    LayerSpec,
    chunk_rows_for,
    table_columns,
)
from lightning_dualform.store.metadata import StoreMetadata

#: largest chunk of keys or values: the writer holds one chunk per column in memory (the automatic size is
#: 512 KiB; ``chunk_rows=10**8`` once meant 23.8 GiB at the first batch)
MAX_CHUNK_BYTES = 64 << 20
#: largest raw input of one example that the store keeps (bytes)
MAX_INPUT_BYTES = 1 << 30


def check_chunk_rows(chunk_rows: Any, specs: list[LayerSpec], row_dtype: str,
                     call: str = "StoreWriter.create(chunk_rows=...)") -> int | None:
    """``chunk_rows`` as an int whose chunks fit :data:`MAX_CHUNK_BYTES` for every layer, or None."""
    if chunk_rows is None:
        return None
    rows = as_int(chunk_rows, call, lo=1, allowed="None or a positive integer")
    itemsize = 2 if row_dtype in ("float16", "bfloat16") else 4
    for spec in specs:
        width = max(8 if spec.kind == "embedding" else spec.d_in * itemsize, spec.d_out * itemsize)
        if rows * width > MAX_CHUNK_BYTES:
            raise ValueError(
                f"`{call}` got {rows}: layer {spec.name!r} would have chunks of {rows * width / 2**30:.1f} GiB "
                f"(rows of {width} bytes), and the writer holds a chunk per column in memory. Use at most "
                f"{MAX_CHUNK_BYTES // width} rows for this layer ({MAX_CHUNK_BYTES >> 20} MiB), or None for the "
                "automatic size (about 512 KiB)."
            )
    return rows


def check_specs(specs: list[LayerSpec]) -> None:
    if not specs:
        raise ValueError("StoreWriter.create: no layers to record.")
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n and "/" not in n for n in names):
        raise ValueError(f"StoreWriter.create: layer names must be unique, non-empty and without '/': {names}.")
    for s in specs:
        if s.kind not in LAYER_KINDS:
            raise ValueError(f"StoreWriter.create: layer {s.name!r} has kind {s.kind!r}; expected one of "
                             f"{LAYER_KINDS}.")
        as_int(s.d_in, f"LayerSpec({s.name!r}, d_in=...)", lo=1)
        as_int(s.d_out, f"LayerSpec({s.name!r}, d_out=...)", lo=1)
        if tuple(np.shape(s.weight_init)) != (s.d_out, s.d_in):
            raise ValueError(f"StoreWriter.create: layer {s.name!r} weight_init is {np.shape(s.weight_init)}, "
                             f"expected {(s.d_out, s.d_in)}.")


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



def write_skeleton(
    tmp: str, layers: list[LayerSpec], row_dtype: str, compression: str | None, chunk_rows: int | None,
    metadata: StoreMetadata | None, input_shape: tuple[int, ...] | None, input_dtype: str, filters: dict[str, Any],
) -> None:
    """Write a store's skeleton into the new file ``tmp``: the root attributes of ``metadata`` (with the format,
    the time, the row dtype, the compression and the layer order set here), the step table, raw inputs of
    ``input_shape`` (None: none kept), and per layer its attributes, row columns, initial weights, optimizer state
    and per-step tables, all empty; flushed and fsynced before the caller names it."""
    # SWMR mode forbids creating datasets later, so everything is created here.
    with h5py.File(tmp, "x", libver=_h5.LIBVER, locking=False) as f:  # (O_EXCL: never through a link)
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
            rows = chunk_rows_for(key_width * np.dtype(key_dtype).itemsize, spec.d_out * np.dtype(disk_dtype).itemsize,
                                  chunk_rows)
            for name, width, dt in (("keys", key_width, key_dtype), ("values", spec.d_out, disk_dtype)):
                _h5.create(g, name, shape=(0, width), maxshape=(None, width), dtype=dt, chunks=(rows, width), **filters)
            for col, dt in ROW_COLUMNS.items():
                _h5.create(g, col, shape=(0,), maxshape=(None,), dtype=dt, chunks=(META_CHUNK,), **filters)
            _h5.create(g, "weight_init", data=spec.weight_init.astype(np.float32))
            if spec.has_bias:
                if spec.bias_init is None:
                    raise ValueError(f"LayerSpec {spec.name!r}: has_bias=True needs bias_init (its initial bias).")
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
                for column in table_columns(meta.update_rule):
                    _h5.create(
                        pg, column.name, shape=(0,), maxshape=(None,), dtype=column.dtype, chunks=(TABLE_CHUNK,)
                    )
        f.flush()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # the skeleton is on disk before its name is
    finally:
        os.close(fd)
