"""The shards of a DDP run: the small index file that names them, and reading them as one store.

Each rank writes its own file; all of them share the per-step tables (every rank applies the same
update) and split the rows. :class:`ShardedStoreReader` presents them with the interface of
:class:`~lightning_dualform.store.reader.StoreReader`, so everything that reads a store reads a sharded one.

Rows are numbered step-major across shards (the rows of step ``s`` of rank 0, then of rank 1, ...), so
that, as in a single store, the model at step ``T'`` uses a prefix of the rows.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any

import h5py
import numpy as np

from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5, _probe, _repair
from lightning_dualform.store._h5open import open_any
from lightning_dualform.store.format import FORMAT_VERSION, ROW_COLUMNS, SHARDS_FORMAT
from lightning_dualform.store.metadata import StoreMetadata
from lightning_dualform.store.reader import Coefficients, LayerReader, QuerySet, StoreReader, StoreView


#: more shards than this in an index is damage, not a DDP run
MAX_SHARDS = 1 << 16


def write_shard_index(path: str, shards: list[str], *, overwrite: bool = True) -> None:
    """A small file at ``path`` naming the per-rank stores of a DDP run (paths relative to it).

    Args:
        overwrite: replace a file at ``path`` that is not a shard index (a store of an earlier run); an index
            is always replaced.

    Raises:
        StoreError: something other than a regular file is at ``path`` (never replaced).
        FileExistsError: a file that is not a shard index is at ``path`` and ``overwrite`` is False.
    """
    _repair.check_replaceable(path)
    if not overwrite:
        check_index_path(path)
    base = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.creating-{os.getpid()}-{os.urandom(4).hex()}"  # never shared with another writer
    try:
        with h5py.File(tmp, "x", locking=False) as f:  # (O_EXCL: never through a link)
            f.attrs["format"] = SHARDS_FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["shards"] = json.dumps([os.path.relpath(os.path.abspath(s), base) for s in shards])
        _repair.check_replaceable(path)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def check_index_path(path: str, owner: str = "DualFormCallback") -> None:
    """Before a DDP run (without ``overwrite=True``) writes its shard index at ``path``: every rank calls it at
    set-up, so that a refusal stops all of them.

    Raises:
        StoreError: something other than a regular file is at ``path``.
        FileExistsError: a file that is not a shard index (a single-process store) is there.
    """
    _repair.check_replaceable(path)
    if os.path.lexists(path) and read_shard_index(path) is None:
        raise FileExistsError(
            f"{owner}: {path} already exists and is not the shard index of a DDP run (a DDP run writes its index "
            f"there and each rank's store beside it). Choose another path, delete it, or pass `{owner}(..., "
            "overwrite=True)` to replace it."
        )


def read_shard_index(path: str, *, probe: bool = True) -> list[str] | None:
    """The shard files an index names (absolute paths), or None when ``path`` is not an index.

    The file is walked in a child process first (:mod:`._probe`), like every store.

    Raises:
        StoreError: ``path`` is an index, but its list is empty, not a list of file names, names the index
            itself, or names one file twice (under any spelling).
    """
    path = os.fspath(path)
    try:
        _repair.check_regular_file(path)
    except StoreError:
        return None
    if probe and _probe.probe(path) is not None:
        return None  # not a readable HDF5 file: whoever opens it as a store says what is wrong
    try:
        with open_any(path) as f:
            if _h5.attr(f.attrs.get("format", "")) != SHARDS_FORMAT:
                return None
            names = _h5.json_attr(f.attrs, "shards", path, list, None)
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError):
        return None
    if not names or len(names) > MAX_SHARDS or not all(isinstance(n, str) and n for n in names):
        raise StoreError(
            f"{path}: a DDP shard index whose list of shards is empty or not a list of file names; the file is damaged."
        )
    base = os.path.dirname(os.path.abspath(path))
    out = [os.path.normpath(os.path.join(base, n)) for n in names]
    seen: dict[tuple, str] = {}
    me = os.stat(path)
    for shard in out:
        try:
            st = os.stat(shard)
        except OSError:
            continue  # a missing shard: open_store says so
        if os.path.samestat(st, me):
            raise StoreError(f"{path}: the DDP shard index names itself as a shard; the file is damaged.")
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise StoreError(
                f"{path}: the DDP shard index names {shard} twice (also as {seen[key]}); the file is damaged."
            )
        seen[key] = shard
    return out


def open_store(path: str | os.PathLike, *, probe: bool = True) -> "StoreReader | ShardedStoreReader":
    """Open a store, a DDP shard index, or (when the index is missing) the ``name.rank*.h5`` files beside it."""
    path = os.fspath(path)
    if os.path.lexists(path):
        _repair.check_regular_file(path)
        shards = read_shard_index(path, probe=probe)
    else:
        shards = _rank_files(path) or None
    if shards is None:
        return StoreReader(path, probe=probe)
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        raise StoreError(f"{path}: the DDP index names shard files that are missing: {missing}.")
    return ShardedStoreReader(path, shards, probe=probe)


def _rank_files(path: str) -> list[str]:
    root, ext = os.path.splitext(path)
    found = glob.glob(glob.escape(root) + ".rank*" + (ext or ".h5"))
    pattern = re.compile(re.escape(root) + r"\.rank(\d+)" + re.escape(ext or ".h5") + "$")
    ranked = sorted((int(m.group(1)), f) for f in found if (m := pattern.match(f)))
    return [f for _, f in ranked]


class ShardedLayerReader:
    """One layer over all shards (a :class:`~lightning_dualform.store.source.LayerSource`, as ``LayerReader``)."""

    geometry = None  # its blocks interleave shards: it serves unfolded rows, never compact blocks

    def __init__(self, store: "ShardedStoreReader", parts: list[LayerReader]) -> None:
        self.store = store
        self.parts = parts
        first = parts[0]
        for other in parts[1:]:
            if (other.d_in, other.d_out, other.has_bias) != (first.d_in, first.d_out, first.has_bias):
                raise StoreError(f"{store.path}: shards disagree on the shape of layer {first.name!r}.")
        for attr in ("name", "kind", "d_in", "d_out", "has_bias", "order", "attrs", "certificate"):
            setattr(self, attr, getattr(first, attr))
        self.exact = all(p.exact for p in parts)
        self.inexact_reason = "; ".join(p.inexact_reason for p in parts if p.inexact_reason)
        # rows of each (step, shard) cell, step-major: the virtual row order
        steps = np.arange(store.first_step, store.last_step + 1)
        bounds = [np.searchsorted(self._steps(p), steps) for p in parts]  # (S+1,) per shard
        self._cell_rows = np.stack([np.diff(b) for b in bounds], axis=1)  # (S, W)
        self._shard_start = np.stack([b[:-1] for b in bounds], axis=1)  # local first row of each cell
        self._cell_start = np.concatenate([[0], np.cumsum(self._cell_rows.reshape(-1))])
        self.n_rows = int(self._cell_start[-1])

    @staticmethod
    def _steps(part: LayerReader) -> np.ndarray:
        return np.concatenate(
            [part.read(s, s + (1 << 20), ("step",))["step"] for s in range(0, part.n_rows, 1 << 20)]
            or [np.zeros(0, np.int64)]
        )

    # weights, tables and coefficients are identical in every shard: the first one answers
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "parts":
            raise AttributeError(name)
        return getattr(self.parts[0], name)

    def coefficients(self, at_step: int | None = None) -> Coefficients:
        return self.parts[0].coefficients(at_step)

    def stored_memory_sums(self, end_step: int, n_rows: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The certificate's sums over all shards' rows, only when the run is complete and every shard holds
        the same ones (each checks its own status, row count, end step and final weights)."""
        if not self.store.complete:
            return None
        found = [p.stored_memory_sums(end_step, n_rows) for p in self.parts]
        first = found[0]
        if any(f is None for f in found) or first is None:
            return None
        for w, b in found[1:]:
            if (
                not np.array_equal(w, first[0])
                or (b is None) != (first[1] is None)
                or (b is not None and not np.array_equal(b, first[1]))
            ):
                return None
        return first

    def base_weights(self, at_step: int | None = None, coef: Coefficients | None = None, with_residual: bool = True):
        return self.parts[0].base_weights(at_step, coef, with_residual)

    def rows_before(self, step: int) -> int:
        i = int(np.clip(step - self.store.first_step, 0, len(self._cell_rows)))
        return int(self._cell_start[i * len(self.parts)])

    def read(
        self, start: int, stop: int, columns: tuple[str, ...] = ("keys", "values", *ROW_COLUMNS)
    ) -> dict[str, np.ndarray]:
        """Virtual rows ``start:stop``: one contiguous read per shard, then put in step-major order."""
        stop = min(stop, self.n_rows)
        if stop <= start:
            return {c: self.parts[0].read(0, 0, (c,))[c] for c in columns}
        w = len(self.parts)
        lo = int(np.searchsorted(self._cell_start, start, side="right")) - 1
        hi = int(np.searchsorted(self._cell_start, stop, side="left"))
        pieces: list[tuple[int, int, int]] = []  # (shard, local start, local stop) in virtual order
        for cell in range(lo, hi):
            n = int(self._cell_rows.reshape(-1)[cell])
            if n == 0:
                continue
            i, shard = divmod(cell, w)
            a = int(self._shard_start[i, shard])
            v0 = int(self._cell_start[cell])
            a0, a1 = a + max(0, start - v0), a + min(n, stop - v0)
            if a1 > a0:
                pieces.append((shard, a0, a1))
        spans = {}
        for shard in {p[0] for p in pieces}:
            mine = [p for p in pieces if p[0] == shard]
            spans[shard] = (mine[0][1], mine[-1][2])
        data = {s: self.parts[s].read(a, b, columns) for s, (a, b) in spans.items()}
        return {
            c: np.concatenate([data[s][c][a - spans[s][0] : b - spans[s][0]] for s, a, b in pieces]) for c in columns
        }


class ShardedStoreReader(StoreView):
    """The shards of a DDP run as one store (same interface as :class:`~lightning_dualform.store.StoreReader`)."""

    def __init__(self, path: str, shards: list[str], *, probe: bool = True) -> None:
        self.path = path
        self.shards = shards
        self._readers: list[StoreReader] = []
        try:
            for shard in shards:
                self._readers.append(StoreReader(shard, probe=probe))
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self) -> None:
        r0 = self._readers[0]
        n = len(self._readers)
        ranks = [r.attrs.get("rank") for r in self._readers]
        sizes = [r.attrs.get("world_size") for r in self._readers]
        if any(x is not None for x in ranks + sizes):
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in ranks + sizes)
            if not ints or set(sizes) != {n} or sorted(x for x in ranks if isinstance(x, int)) != list(range(n)):
                raise StoreError(
                    f"{self.path}: the shards say ranks {ranks} of world sizes {sizes}, but the index names {n} "
                    "shards; the index or a shard is damaged."
                )
        for r in self._readers[1:]:
            if r.layers != r0.layers or r.row_dtype != r0.row_dtype:
                raise StoreError(f"{self.path}: shards {r0.path} and {r.path} hold different layers or dtypes.")
            if r.first_step != r0.first_step:
                raise StoreError(f"{self.path}: shards {r0.path} and {r.path} start at different steps.")
            if r.update_rule != r0.update_rule:
                raise StoreError(f"{self.path}: shards {r0.path} and {r.path} name different update rules "
                                 f"({r0.update_rule!r}, {r.update_rule!r}).")
        self.row_dtype, self.optimizer = r0.row_dtype, r0.optimizer
        self.first_step, self.update_rule = r0.first_step, r0.update_rule
        # each rank recorded how its own float32 products were rounded: the store as a whole, the loosest
        self.meta = StoreMetadata.merge([r.meta for r in self._readers])
        self.attrs = {**r0.attrs, "float32_products": self.meta.float32_products}
        self.optimizer_exact = self.meta.optimizer_exact
        # a crash may leave shards committed to different steps: only steps complete everywhere count
        self.n_steps = min(r.n_steps for r in self._readers)
        self.update_steps = r0.update_steps[: self.n_steps]
        self.update_epochs = r0.update_epochs[: self.n_steps]
        self.status = self.meta.status
        for name in r0.layers:
            tables = [r.layer(name).updates() for r in self._readers]
            ref = tables[0]
            for t in tables[1:]:
                n = self.n_steps
                if not np.array_equal(t["grad_scale"][:n], ref["grad_scale"][:n]):
                    raise StoreError(f"{self.path}: shards disagree on the update scalars of layer {name!r}.")
        self._layers = {
            name: ShardedLayerReader(self, [r.layer(name) for r in self._readers]) for name in r0.layers
        }
        for r in self._readers:  # steps past the common count are not visible (rows: see ShardedLayerReader)
            r.n_steps = self.n_steps
            r.update_steps = r.update_steps[: self.n_steps]
            r.update_epochs = r.update_epochs[: self.n_steps]

    @property
    def query_splits(self) -> list[str]:
        return sorted(set().union(*(r.query_splits for r in self._readers)))

    def queries(self, split: str, *, stale_ok: bool = False) -> QuerySet | _MergedQuerySet:
        """A split recorded under DDP: each rank stored its share; they are concatenated in rank order."""
        sets = [r.queries(split, stale_ok=stale_ok) for r in self._readers if split in r.query_splits]
        if len(sets) == 1:
            return sets[0]
        return _MergedQuerySet(sets)

    def train_inputs(self, indices: np.ndarray) -> np.ndarray | None:
        found = [r.train_inputs(indices) for r in self._readers]
        found = [f for f in found if f is not None]
        if not found:
            return None
        out = found[0].copy()
        for f in found[1:]:
            missing = (
                np.isnan(out.reshape(len(out), -1)).any(1)
                if np.issubdtype(out.dtype, np.floating)
                else np.zeros(len(out), bool)
            )
            out[missing] = f[missing]
        return out

    def close(self) -> None:
        for r in self._readers:
            r.close()


class _MergedQuerySet:
    """A split recorded under DDP: the ranks' shares in rank order, each example once (a ``DistributedSampler``
    pads the last ranks' shares with examples another rank already has: the repeats are left out)."""

    def __init__(self, sets: list[QuerySet]) -> None:
        self.split = sets[0].split
        self._sets = sets
        index = np.concatenate([s.index for s in sets])
        repeat = np.zeros(len(index), dtype=bool)  # a known dataset index seen before (rank order)
        known = np.nonzero(index >= 0)[0]
        first = np.unique(index[known], return_index=True)[1]
        repeat[known] = True
        repeat[known[first]] = False
        self._kept = np.nonzero(~repeat)[0]  # the merged positions' places in the concatenation
        self._renumber = np.cumsum(~repeat) - 1  # a concatenation place's merged position (where kept)
        self._repeat = repeat
        self.index = index[self._kept]
        self.label = np.concatenate([s.label for s in sets])[self._kept]
        self.prediction = np.concatenate([s.prediction for s in sets])[self._kept]
        self.n = len(self.index)
        self.layers = sets[0].layers
        self.after_step = sets[0].after_step
        self.stale = next((s.stale for s in sets if s.stale is not None), None)

    @property
    def inputs(self) -> np.ndarray | None:
        parts = [s.inputs for s in self._sets]
        return None if any(p is None for p in parts) else np.concatenate(parts)[self._kept]

    @property
    def has_inputs(self) -> bool:
        return all(s.has_inputs for s in self._sets)

    def inputs_at(self, positions: np.ndarray) -> np.ndarray | None:
        raw = self.inputs
        return None if raw is None else raw[np.asarray(positions, dtype=np.int64).reshape(-1)]

    def layer_rows(self, layer: str, examples: np.ndarray | None = None) -> dict[str, np.ndarray]:
        offset, out = 0, []
        for s in self._sets:
            rows = s.layer_rows(layer)
            rows["example"] = rows["example"] + offset
            offset += s.n
            out.append(rows)
        merged = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
        kept = ~self._repeat[merged["example"]]
        merged = {k: v[kept] for k, v in merged.items()}
        merged["example"] = self._renumber[merged["example"]]
        if examples is not None:
            keep = np.isin(merged["example"], np.asarray(examples))
            merged = {k: v[keep] for k, v in merged.items()}
        return merged
