"""A resume's truncation of a store to the counts its checkpoint holds, and the settings a resume must match.

:func:`truncate` runs inside the all-or-nothing write session of :meth:`StoreWriter.resume
<lightning_dualform.store.writer.StoreWriter.resume>`: everything derived from the old rows (final weights,
the certificate and its kept sums, the residual) goes first and the store says ``recording``, then every row,
table and input past the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import h5py

from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5
from lightning_dualform.store._h5open import open_readonly
from lightning_dualform.store.certificate import clear_certificate
from lightning_dualform.store.format import CONV_KINDS, ROW_COLUMNS
from lightning_dualform.store.metadata import StoreMetadata
from lightning_dualform.store.skeleton import map_counts


def stored_settings(path: str) -> dict[str, Any]:
    """The settings a store on disk was written with (see :func:`settings_of`)."""
    with open_readonly(path, swmr=False) as f:
        layers = {
            n: [_h5.attr(g.attrs["kind"]), int(g.attrs["d_in"]), int(g.attrs["d_out"]), bool(g.attrs["has_bias"]),
                *([_h5.attr(g.attrs.get("layout", "rows"))] if _h5.attr(g.attrs["kind"]) in CONV_KINDS else [])]
            for n, g in f["layers"].items()
        }
        return {"layers": layers, "row_dtype": _h5.attr(f.attrs["row_dtype"]),
                "compression": _h5.attr(f.attrs["compression"]),
                "update_rule": _h5.attr(f.attrs.get("update_rule", "sgd"))}  # format 1: SGD only


def truncate(
    f: h5py.File, path: str, rows: dict[str, int], steps: int, inputs: int | None, last_step: int | None,
    update_attrs: Callable[[StoreMetadata], dict[str, Any]] | None,
) -> None:
    """Truncate the open file ``f`` (inside a write session) to ``steps`` steps, ``rows[layer]`` rows and
    ``inputs`` raw inputs, after checking that the store holds them and that its ``steps``-th step is
    ``last_step``; ``update_attrs`` gets the file's metadata and returns root attributes to set.

    Raises:
        StoreError: the store holds fewer steps or rows than the checkpoint counts, or another last step
            (nothing is changed).
    """
    have = int(f["update_step"].shape[0])
    if have < steps:
        raise StoreError(f"{path}: the checkpoint counts {steps} optimizer steps but the store holds {have}; rows are "
                         "missing.")
    if last_step is not None and steps > 0 and int(f["update_step"][steps - 1]) != last_step:
        raise StoreError(
            f"{path}: the checkpoint says the store's first {steps} steps end at step {last_step}, but the "
            f"store's step {steps} is training step {int(f['update_step'][steps - 1])}. The checkpoint does not "
            "describe this store; nothing was truncated. Resume from a checkpoint saved with this store, or "
            "record into another path."
        )
    # (P, L) per layer: pixels and virtual rows per stored map; (1, 1) for a layer of one row per key row
    counts = {name: map_counts(g) or (1, 1) for name, g in f["layers"].items()}
    for name, g in f["layers"].items():
        n = int(rows.get(name, 0))
        if g["values"].shape[0] < n or n % counts[name][1]:
            raise StoreError(f"{path}: layer {name!r}: the checkpoint counts {n} rows but the store holds "
                             f"{g['values'].shape[0]}.")
    # what was derived from the old rows goes, and the file says it is being written (the session is
    # all or nothing, so a crash never leaves a "complete" store with rows of another run)
    f.attrs["status"] = "recording"
    if update_attrs is not None:
        meta = StoreMetadata.from_attrs({k: _h5.attr(v) for k, v in f.attrs.items()}, path)
        _h5.set_attrs(f, update_attrs(meta))
    for g in f["layers"].values():
        for dname in ("weight_final", "bias_final", "weight_residual", "bias_residual"):
            if dname in g:
                del g[dname]
        clear_certificate(g)
    # a query set recorded with a model after the steps the resume keeps describes a model rolled back: it stays
    # stale even when training comes back to that step count (the later model is another one)
    end = int(f["update_step"][steps - 1]) + 1 if steps else 0
    for qs in (f["queries"].values() if "queries" in f else ()):
        after = qs.attrs.get("after_step")
        if after is None or int(after) > end:
            qs.attrs["rolled_back"] = True
    _h5.truncate(f["update_step"], steps)
    _h5.truncate(f["update_epoch"], steps)
    f["committed_steps"][0] = steps
    for name, g in f["layers"].items():
        n = int(rows.get(name, 0))
        # a convolution's maps: n virtual rows are n / L maps, n P / L pixels
        p, per_map = counts[name]
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
