"""A store's per-step update tables while it is written: each layer's ``grad_scale`` and its parameters' rule
columns (``layers/<name>/updates``), one row per optimizer step.

:class:`StepTables` looks the datasets up once (h5py resolves a path and makes a dtype on every access), refuses
a step that no replay could rebuild (a NaN or infinite scale or hyper-parameter), and appends the buffered steps.
"""

from __future__ import annotations

import math
from typing import Any, Container

import h5py
import numpy as np

from lightning_dualform.store import _h5

#: per layer, ``(grad_scale, weight_row, bias_row)``: a row is ``{column: value}`` or an object with those attributes
Updates = dict[str, tuple[float, Any, Any]]


class StepTables:
    """The update tables of ``layers`` in ``f`` (an open store)."""

    def __init__(self, f: h5py.File, layers: list[str]) -> None:
        self._tables: dict[str, dict[str, Any]] = {}
        self._float_columns: dict[str, dict[str, list[str]]] = {}
        for name in layers:
            ug = f["layers"][name]["updates"]
            t: dict[str, Any] = {"grad_scale": ug["grad_scale"]}
            for pname in ("weight", "bias"):
                if pname in ug:
                    t[pname] = dict(ug[pname].items())
            self._tables[name] = t
            self._float_columns[name] = {p: [c for c, ds in t[p].items() if ds.dtype.kind == "f"]
                                         for p in ("weight", "bias") if p in t}

    def check_finite(self, path: str, step: int, updates: Updates, skip: Container[str] = ()) -> None:
        """Refuse a step whose gradient scale or hyper-parameters are NaN or inf (a learning rate of NaN, a
        diverged run): no replay can rebuild such a step, and a reader would refuse the store as damaged. Layers
        in ``skip`` (dropped ones) are not checked."""
        for name, (scale, w_row, b_row) in updates.items():
            columns = self._float_columns.get(name)
            if columns is None or name in skip:
                continue
            bad = [] if math.isfinite(float(scale)) else [f"gradient scale {float(scale)}"]
            for pname, row in (("weight", w_row), ("bias", b_row)):
                if row is None or pname not in columns:
                    continue
                bad += [f"{pname} {col} {float(column(row, col))}" for col in columns[pname]
                        if not math.isfinite(float(column(row, col)))]
            if bad:
                raise ValueError(
                    f"{path}: optimizer step {step} of layer {name!r} is not finite ({', '.join(bad)}): the "
                    "learning rate or another hyper-parameter is NaN or inf, or training diverged (NaN gradients). "
                    "The store keeps the steps before it; fix the run and record again."
                )

    def append(self, steps: list[tuple[int, int, Updates]]) -> None:
        """Append the rows of ``steps`` (``(step, epoch, updates)`` each) to every layer's tables."""
        for name, t in self._tables.items():
            _h5.append(t["grad_scale"], np.array([u[name][0] for _, _, u in steps], dtype=np.float64))
            for pi, pname in ((1, "weight"), (2, "bias")):
                for col, ds in t.get(pname, {}).items():
                    _h5.append(ds, np.array([column(u[name][pi], col) for _, _, u in steps], dtype=ds.dtype))


def column(row: Any, col: str) -> Any:
    return row[col] if isinstance(row, dict) else getattr(row, col)
