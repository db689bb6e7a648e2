"""Keeping a store's decoded rows in memory between passes: :class:`BlockCache` and :class:`CachedLayer`.

Someone exploring a store asks one question after another over the same layers. Without a cache every
:meth:`~lightning_dualform.DualInference.attend` streams the layer from disk again (decoding and
checking every chunk). With ``DualInference(path, cache=...)`` the blocks a pass reads are kept, up to a
byte budget, least recently used first out, so that a repeated pass reads nothing and costs the products.

What is kept is exactly what :meth:`LayerReader.read <lightning_dualform.store.reader.LayerReader.read>`
returns for ``(layer, start, stop, columns)``: decoded rows, never anything that depends on a query or on
``attend``'s options, so answers cannot mix. A later read is served from an entry of the same layer and
first row that covers it (its columns a superset, its last row at or past the wanted one: the shorter last
block of an earlier ``at_step`` is a prefix of a kept block). On a CUDA device the float columns (keys and
values, the bulk) are kept in device memory and the small integer columns in host memory; on the CPU all
stays numpy. The small per-layer facts a pass needs besides the rows (the update coefficients, the weight
matrices, the certificate's sums, where a step's rows begin) are kept by :class:`CachedLayer` beside the
blocks, outside the budget (a few weight-sized matrices per layer).

A cache is only right for the file it was filled from. :class:`StoreStamp` records each file's identity,
size, modification and change times; :meth:`DualInference.refresh` compares it before every pass and, when
the store was rewritten (a resume), appended to (a writer) or replaced, drops the cache and opens the store
again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

import numpy as np
import torch

from lightning_dualform.store.format import ROW_COLUMNS
from lightning_dualform.store.source import LayerSource

#: ``DualInference(cache=...)``: a budget in bytes, ``"auto"``, or ``None`` (no cache)
CacheSpec = Union[int, Literal["auto"], None]
#: share of the memory available when the cache is made that ``cache="auto"`` takes
AUTO_SHARE = 0.5

Rows = dict[str, Any]  # column -> np.ndarray (host) or torch.Tensor (device)


def resolve_budget(cache: CacheSpec, device: torch.device) -> int | None:
    """The byte budget for ``DualInference(cache=cache)``, or ``None`` for no cache.

    ``"auto"`` is :data:`AUTO_SHARE` (half) of the memory available now: on CUDA the device's free memory
    (``torch.cuda.mem_get_info``), else the host's available memory (Linux ``MemAvailable``; elsewhere the
    free physical pages). The budget caps the cache; it only fills with what passes read.

    Raises:
        ValueError: anything but a positive integer, ``"auto"`` or ``None``.
    """
    if cache is None:
        return None
    if isinstance(cache, str):
        if cache != "auto":
            raise ValueError(f"`DualInference(cache={cache!r})`: expected a budget in bytes (int > 0), 'auto' or None.")
        free = _free_device_bytes(device) if device.type == "cuda" else _available_host_bytes()
        return max(1, int(free * AUTO_SHARE))
    if isinstance(cache, bool) or not isinstance(cache, (int, np.integer)) or cache < 1:
        raise ValueError(f"`DualInference(cache={cache!r})`: expected a budget in bytes (int > 0), 'auto' or None.")
    return int(cache)


def _free_device_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 30  # no way to ask: 1 GiB, so "auto" still caches something


# ------------------------------------------------------------------------------------------------------
# which files, as they were
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreStamp:
    """Identity and state of a store's files: ``(path, device, inode, size, mtime_ns, ctime_ns)`` each.

    Any write changes the modification time; replacing the file changes the inode; restoring an old
    modification time (``cp -p``, ``touch -d``) still changes the change time, which no user can set.
    """

    files: tuple[tuple[str, int, int, int, int, int], ...]

    @classmethod
    def of(cls, store: Any) -> "StoreStamp":
        paths = list(getattr(store, "shards", None) or [])
        if os.path.isfile(store.path):  # a store, or a DDP run's index file
            paths.insert(0, store.path)
        return cls(tuple(_stat(p) for p in paths))


def _stat(path: str) -> tuple[str, int, int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1, -1, -1, -1)  # gone: differs from any earlier stamp of an existing file
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# ------------------------------------------------------------------------------------------------------
# the blocks
# ------------------------------------------------------------------------------------------------------
@dataclass
class LayerCacheInfo:
    """What the cache holds of one layer."""

    blocks: int = 0
    rows: int = 0  # distinct rows covered (blocks with other columns or an earlier end overlap)
    bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"blocks": self.blocks, "rows": self.rows, "bytes": self.bytes}


@dataclass
class CacheInfo:
    """A snapshot of a :class:`BlockCache`: budget and use in bytes, hits and misses of block reads."""

    budget: int
    bytes: int
    device: str
    hits: int
    misses: int
    evictions: int
    layers: dict[str, LayerCacheInfo] = field(default_factory=dict)
    facts_bytes: int = 0  # per-layer weights and tables kept beside the blocks (outside the budget)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget, "bytes": self.bytes, "device": self.device, "hits": self.hits,
            "misses": self.misses, "evictions": self.evictions, "facts_bytes": self.facts_bytes,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
        }

    def __str__(self) -> str:
        held = ", ".join(f"{k} ({v.rows:,} rows)" for k, v in self.layers.items()) or "nothing"
        return (f"{_human(self.bytes)} of {_human(self.budget)} on {self.device}: {held}; "
                f"{self.hits} hits, {self.misses} misses, {self.evictions} evictions")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return int(getattr(x, "nbytes", 0))


@dataclass
class _Entry:
    layer: str
    start: int
    stop: int
    rows: Rows
    nbytes: int


class BlockCache:
    """Decoded row blocks by ``(layer, start, stop, columns)``, within a byte budget, least recently used
    out first. Thread-safe (a prefetch thread fills it while another thread may ask).

    Args:
        budget: bytes the kept blocks may take. A block larger than the budget is not kept.
        device: where passes compute. On CUDA, float columns are kept there as tensors.
        tensors: keep float columns as torch tensors on ``device`` (default: only on CUDA). On the CPU
            this exercises the device code path (tests).
    """

    def __init__(self, budget: int, device: torch.device | str = "cpu", *, tensors: bool | None = None) -> None:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
            raise ValueError(f"`BlockCache(budget={budget!r})` must be a positive number of bytes.")
        self.budget = int(budget)
        self.device = torch.device(device)
        self.tensors = self.device.type == "cuda" if tensors is None else bool(tensors)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first
        self._by_start: dict[tuple[str, int], list[tuple]] = {}
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, layer: str, start: int, stop: int, columns: tuple[str, ...]) -> Rows | None:
        """Rows ``start:stop`` of ``columns`` from a kept block that covers them (views, no copy), or None."""
        with self._lock:
            for key in self._by_start.get((layer, start), ()):
                e = self._entries[key]
                if e.stop >= stop and set(columns) <= set(e.rows):
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return {c: e.rows[c] for c in columns} if e.stop == stop else _prefix(e.rows, stop - start, columns)
            self.misses += 1
            return None

    def put(self, layer: str, start: int, stop: int, rows: Rows) -> Rows:
        """Keep ``rows`` (as :meth:`LayerReader.read` returned them); returns what to use in their place
        (on a device, the float columns moved there). Evicts least recently used blocks to make room."""
        if self.tensors:
            rows = {c: torch.from_numpy(v).to(self.device) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
                    for c, v in rows.items()}
        size = sum(_nbytes(v) for v in rows.values())
        if size > self.budget:
            return rows
        key = (layer, start, stop, tuple(sorted(rows)))
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self.bytes + size > self.budget and self._entries:
                self._drop(next(iter(self._entries)))
                self.evictions += 1
            self._entries[key] = _Entry(layer, start, stop, rows, size)
            self._by_start.setdefault((layer, start), []).append(key)
            self.bytes += size
        return rows

    def _drop(self, key: tuple) -> None:
        e = self._entries.pop(key)
        keys = self._by_start[(e.layer, e.start)]
        keys.remove(key)
        if not keys:
            del self._by_start[(e.layer, e.start)]
        self.bytes -= e.nbytes

    def clear(self) -> None:
        """Drop every block (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._by_start.clear()
            self.bytes = 0

    def info(self) -> CacheInfo:
        with self._lock:
            layers: dict[str, LayerCacheInfo] = {}
            spans: dict[str, list[tuple[int, int]]] = {}
            for e in self._entries.values():
                li = layers.setdefault(e.layer, LayerCacheInfo())
                li.blocks += 1
                li.bytes += e.nbytes
                spans.setdefault(e.layer, []).append((e.start, e.stop))
            for name, s in spans.items():
                layers[name].rows = _covered(s)
            return CacheInfo(budget=self.budget, bytes=self.bytes, device=str(self.device), hits=self.hits,
                             misses=self.misses, evictions=self.evictions, layers=layers)


def _prefix(rows: Rows, n: int, columns: tuple[str, ...]) -> Rows:
    """The first ``n`` rows of a kept block: its arrays cut at ``n``; a compact block's maps cut after the map
    that holds its row ``n - 1`` (``maps``, ``skip``, ``rows``, ``locations``: :meth:`LayerReader.read_maps`)."""
    out: Rows = {}
    for c in columns:
        v = rows[c]
        if c == "maps":
            v = v[: -(-(rows["skip"] + n) // rows["locations"])]
        elif c == "rows":
            v = n
        elif isinstance(v, (np.ndarray, torch.Tensor)):
            v = v[:n]
        out[c] = v
    return out


def _covered(spans: list[tuple[int, int]]) -> int:
    total, end = 0, -1
    for a, b in sorted(spans):
        a = max(a, end)
        if b > a:
            total += b - a
            end = b
    return total


# ------------------------------------------------------------------------------------------------------
# a layer reader that reads through the cache
# ------------------------------------------------------------------------------------------------------
class CachedLayer:
    """A layer reader (:class:`~lightning_dualform.store.reader.LayerReader` or its sharded twin) whose
    row reads go through a :class:`BlockCache` and whose small per-layer facts are read once: a
    :class:`~lightning_dualform.store.source.LayerSource` like the reader it wraps.

    It answers everything the wrapped reader answers; only :meth:`read` and the memoised methods below
    behave differently (same values, fewer reads). Arrays handed out by the memoised methods that a
    caller may change (:meth:`base_weights`) are fresh copies.
    """

    def __init__(self, layer: LayerSource, cache: BlockCache) -> None:
        self._layer = layer
        self._cache = cache
        self._facts: OrderedDict[tuple, Any] = OrderedDict()
        self._facts_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)

    def __repr__(self) -> str:
        return f"CachedLayer({self._layer.name!r})"

    @property
    def wrapped(self) -> Any:
        """The layer reader that reads the file."""
        return self._layer

    def read(self, start: int, stop: int, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` as :meth:`LayerReader.read` returns them (numpy arrays), from the cache when it
        holds them (on a device cache, the float columns are copied back to the host)."""
        rows = self.read_kept(start, stop, columns)
        return {c: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for c, v in rows.items()}

    def read_kept(self, start: int, stop: int, columns: tuple[str, ...] | None = None) -> Rows:
        """Rows ``start:stop`` in the form the cache keeps them: numpy arrays, or on a device cache (CUDA)
        the float columns as tensors on the device. What a pass reads (:func:`pass_rows`)."""
        stop = min(stop, self._layer.n_rows)
        start = min(start, stop)
        cols = tuple(columns) if columns is not None else ("keys", "values", *ROW_COLUMNS)
        hit = self._cache.get(self._layer.name, start, stop, cols)
        if hit is not None:
            return hit
        rows = self._layer.read(start, stop, cols)
        return self._cache.put(self._layer.name, start, stop, rows)

    def read_maps_kept(self, start: int, stop: int, columns: tuple[str, ...] = ()) -> Rows:
        """A convolution's compact block (:meth:`LayerReader.read_maps`) in the form the cache keeps it: its maps
        (a device tensor on a CUDA cache: ``1 / prod(kernel)`` of the unfolded keys' bytes, about), ``skip``,
        ``rows``, ``locations`` and ``columns`` of the virtual rows."""
        stop = min(stop, self._layer.n_rows)
        start = min(start, stop)
        cols = ("maps", "skip", "rows", "locations", *(c for c in columns if c != "keys"))
        hit = self._cache.get(self._layer.name, start, stop, cols)
        if hit is not None:
            return hit
        rows = self._layer.read_maps(start, stop, cols[4:])
        return self._cache.put(self._layer.name, start, stop, rows)

    # -- facts read once -------------------------------------------------------------------------------
    #: facts kept per kind, most recently used first out last: a slider over ``at_step`` asks for a new step
    #: each time, and the base weights of a step are two weight-sized float64 matrices
    KEEP = {"coefficients": 32, "rows_before": 512, "memory_sums": 4, "base_weights": 2}

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._facts_lock:
            if key in self._facts:
                self._facts.move_to_end(key)
                return self._facts[key]
        value = make()
        with self._facts_lock:
            self._facts[key] = value
            keep = self.KEEP.get(key[0])
            if keep is not None:
                same = [k for k in self._facts if k[0] == key[0]]
                for k in same[: max(0, len(same) - keep)]:
                    del self._facts[k]
        return value

    @property
    def facts_bytes(self) -> int:
        """Bytes of the arrays kept by the memoised methods."""

        def size(v: Any) -> int:
            if isinstance(v, (tuple, list)):
                return sum(size(x) for x in v)
            if isinstance(v, dict):
                return sum(size(x) for x in v.values())
            if hasattr(v, "__dataclass_fields__"):
                return sum(size(getattr(v, f)) for f in v.__dataclass_fields__)
            return _nbytes(v)

        with self._facts_lock:
            return sum(size(v) for v in self._facts.values())

    def updates(self) -> dict[str, Any]:
        return self._memo(("updates",), self._layer.updates)

    def coefficients(self, at_step: int | None = None) -> Any:
        return self._memo(("coefficients", at_step), lambda: self._layer.coefficients(at_step))

    def rows_before(self, step: int) -> int:
        return self._memo(("rows_before", int(step)), lambda: self._layer.rows_before(step))

    def stored_memory_sums(self, end_step: int, n_rows: int) -> Any:
        return self._memo(("memory_sums", end_step, n_rows), lambda: self._layer.stored_memory_sums(end_step, n_rows))

    def base_weights(self, at_step: int | None = None, coef: Any = None, with_residual: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        coef = coef or self.coefficients(at_step)
        w, b = self._memo(("base_weights", coef.end_step, bool(with_residual)),
                          lambda: self._layer.base_weights(coef=coef, with_residual=with_residual))
        return w.copy(), None if b is None else b.copy()

    @property
    def weight_init(self) -> np.ndarray:
        return self._memo(("weight_init",), lambda: self._layer.weight_init)

    @property
    def bias_init(self) -> np.ndarray | None:
        return self._memo(("bias_init",), lambda: self._layer.bias_init)

    @property
    def weight_final(self) -> np.ndarray | None:
        return self._memo(("weight_final",), lambda: self._layer.weight_final)

    @property
    def bias_final(self) -> np.ndarray | None:
        return self._memo(("bias_final",), lambda: self._layer.bias_final)

    @property
    def weight_residual(self) -> np.ndarray | None:
        return self._memo(("weight_residual",), lambda: self._layer.weight_residual)

    @property
    def bias_residual(self) -> np.ndarray | None:
        return self._memo(("bias_residual",), lambda: self._layer.bias_residual)


def pass_rows(layer: LayerSource, start: int, stop: int, columns: tuple[str, ...] | None = None) -> Rows:
    """The rows a pass over ``layer`` reads: through the cache in the form it keeps them (float columns as
    device tensors on a CUDA cache), or the reader's numpy arrays without a cache."""
    if isinstance(layer, CachedLayer):
        return layer.read_kept(start, stop, columns)
    return layer.read(start, stop) if columns is None else layer.read(start, stop, columns)


def pass_maps(layer: LayerSource, start: int, stop: int, columns: tuple[str, ...] = ()) -> Rows:
    """A convolution's compact block for a pass (:meth:`LayerReader.read_maps`): through the cache, or read."""
    if isinstance(layer, CachedLayer):
        return layer.read_maps_kept(start, stop, columns)
    return layer.read_maps(start, stop, tuple(c for c in columns if c != "keys"))


def cast_rows(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype`` (a numpy dtype), without a copy when it already is: numpy arrays from the file, or
    tensors a device cache keeps."""
    if isinstance(x, torch.Tensor):
        return x.to(torch.from_numpy(np.empty(0, dtype=dtype)).dtype)
    return x.astype(dtype, copy=False)
