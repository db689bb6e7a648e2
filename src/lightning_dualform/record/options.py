"""The recording options that :class:`~lightning_dualform.DualFormCallback` and
:class:`~lightning_dualform.DualFormRecorder` share, checked once where they are given."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Sequence, get_args

from torch import nn

from lightning_dualform._unwrap import layer_name
from lightning_dualform.store.filters import compression_kwargs
from lightning_dualform.store.format import ROW_DTYPES

RowDtype = Literal["float32", "float16", "bfloat16"]
LayerSelection = Sequence[str] | Callable[[str, nn.Module], bool] | None
#: how a layer's calls of shape ``(B, B, ...)`` are laid out (batch first or sequence first cannot be told apart)
Layout = Literal["batch_first", "sequence_first"]
LayoutChoice = Layout | Mapping[str, Layout] | None
LAYOUTS: tuple[str, ...] = get_args(Layout)
#: The largest chunk a caller may ask for: 2^20 rows (a float32 chunk of an 800-wide layer is then 3.2 GB,
#: which HDF5 allocates whole at the first append; the automatic size keeps chunks near 512 KiB).
MAX_CHUNK_ROWS = 1 << 20

assert set(get_args(RowDtype)) == set(ROW_DTYPES)


def _positive_int(value: object, name: str, owner: str, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper is not None and value > upper):
        bound = f" at most {upper}" if upper is not None else ""
        raise ValueError(f"`{owner}({name}={value!r})` must be a positive integer{bound}.")


@dataclass(frozen=True)
class RecordOptions:
    """What to record and how (see :class:`~lightning_dualform.DualFormCallback` for each option)."""

    path: str = "dualform.h5"
    layers: LayerSelection = None
    dtype: RowDtype = "float32"
    compression: str | None = None
    chunk_rows: int | None = None
    exact: bool = True
    overwrite: bool = False
    max_queue: int = 32
    certify: bool | Literal["full"] = True
    store_inputs: bool = True
    commit_seconds: float = 30.0
    check_disk: bool = True
    check_every: int = 50
    layout: LayoutChoice = None

    def check_layout_names(self, owner: str, tracked: list[str]) -> None:
        """Refuse a ``layout`` dict that names layers not tracked (a typo would otherwise go unnoticed)."""
        unknown = sorted(set(self.layout) - set(tracked)) if isinstance(self.layout, Mapping) else []
        if unknown:
            raise ValueError(f"`{owner}(layout=...)` names layers it does not track: {unknown}. The tracked "
                             f"layers are {sorted(tracked)}.")

    def layout_of(self, name: str) -> Layout | None:
        """The layout declared for layer ``name`` (``None``: told from the calls' shapes alone)."""
        if isinstance(self.layout, Mapping):
            return self.layout.get(name)
        return self.layout

    @classmethod
    def checked(cls, owner: str, path: str | os.PathLike, layers: LayerSelection, **kw: object) -> "RecordOptions":
        """Build the options, refusing bad values with a message that quotes ``owner(...)``'s argument."""
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise TypeError(f"`{owner}(path={path!r})` must be the path of the store to write (str or os.PathLike).")
        if layers is not None and not callable(layers) and not (isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers)):
            raise TypeError(f"`{owner}(layers={layers!r})`: expected None, a list of module names, or a predicate.")
        dtype = kw.get("dtype", "float32")
        if dtype not in ROW_DTYPES:
            raise ValueError(f"`{owner}(dtype={dtype!r})` is not supported. Expected one of {ROW_DTYPES}.")
        compression_kwargs(kw.get("compression"))  # validates; checks that hdf5plugin is there when needed
        chunk_rows = kw.get("chunk_rows")
        if chunk_rows is not None:
            _positive_int(chunk_rows, "chunk_rows", owner, MAX_CHUNK_ROWS)
        for name in ("max_queue", "check_every"):
            if name in kw:
                _positive_int(kw[name], name, owner)
        seconds = kw.get("commit_seconds", 30.0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"`{owner}(commit_seconds={seconds!r})` must be a positive, finite number of seconds.")
        if "certify" in kw and kw["certify"] not in (True, False, "full"):
            raise ValueError(f"`{owner}(certify={kw['certify']!r})` must be True (as training goes), 'full' (also re-read "
                             "the store at the end) or False.")
        for name in ("exact", "overwrite", "store_inputs", "check_disk"):
            if name in kw and not isinstance(kw[name], bool):
                raise TypeError(f"`{owner}({name}={kw[name]!r})` must be True or False.")
        layout = kw.get("layout")
        if layout is not None:
            values = list(layout.values()) if isinstance(layout, Mapping) else [layout]
            if (isinstance(layout, Mapping) and not all(isinstance(k, str) for k in layout)) or not all(
                    isinstance(v, str) and v in LAYOUTS for v in values):
                raise ValueError(f"`{owner}(layout={layout!r})`: expected None, one of {LAYOUTS} for every layer, or a "
                                 f"dict of layer names to one of them.")
            if isinstance(layout, Mapping):  # (a compiled submodule's layer named either way, as layers= takes it)
                kw["layout"] = {layer_name(k): v for k, v in layout.items()}
        chosen = list(layers) if isinstance(layers, (list, tuple)) else layers
        return cls(path=os.fspath(path), layers=chosen, **kw)  # type: ignore[arg-type]
