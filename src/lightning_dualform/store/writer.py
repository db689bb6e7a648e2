"""Writing a store: create its skeleton, append steps, commit, resume from a checkpoint, finalise.

Durability, phase by phase (``docs/store-format.md``, "What a reader may assume"):

* Creation builds the whole skeleton under a private temporary name and renames it into place: a
  kill leaves either no store or an empty one.
* Training appends in HDF5 SWMR mode, the only mode in which HDF5 itself keeps the file consistent for a
  reader or after a crash. Rows become visible only when :meth:`StoreWriter.commit` advances the
  ``committed_*`` counters, after the rows and the per-step tables they need are on disk.
* Disk space for every write is reserved before HDF5 writes (:mod:`._space`): a full disk stops the
  writer with a clean error before HDF5 has written anything, never inside one of its flushes.
* The resume's truncation and the finalisation create, delete and resize objects, which SWMR mode does
  not allow: they run as all-or-nothing write sessions over an undo journal (:mod:`._journal`).
* One writer at a time: every phase holds the store's writer lock (:mod:`._lock`); a second writer is
  refused at its start with :class:`~lightning_dualform.errors.StoreBusyError`.

The skeleton a new store starts from is :mod:`.skeleton`'s; a resume's truncation :mod:`.truncate`'s; the
certificate's bytes :mod:`.certificate`'s. Nothing here knows about Lightning or torch.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from typing import Any, Callable

import h5py
import numpy as np

from lightning_dualform._args import as_int
from lightning_dualform.errors import StoreError
from lightning_dualform.store import _h5, _journal, _repair, _rollback
from lightning_dualform.store._chunks import ChunkAppender
from lightning_dualform.store._lock import WriterLock
from lightning_dualform.store._space import SpaceReserve
from lightning_dualform.store._step_tables import StepTables
from lightning_dualform.store._writeback import Writeback
from lightning_dualform.store.bindings import write_bindings
from lightning_dualform.store.certificate import TABLES_CRC32, LayerCertificate, stored_tables_crc32
from lightning_dualform.store.conv import MAPS_LAYOUT
from lightning_dualform.store.filters import compression_kwargs, encode_rows
from lightning_dualform.store.format import META_CHUNK, ROW_COLUMNS, ROW_DTYPES, LayerSpec, StepRows
from lightning_dualform.store.metadata import StoreMetadata
from lightning_dualform.store.skeleton import MAX_INPUT_BYTES, check_chunk_rows, check_specs, map_counts, write_skeleton
from lightning_dualform.store.truncate import stored_settings, truncate

log = logging.getLogger(__name__)

def check_commit_seconds(commit_seconds: Any, call: str = "StoreWriter(commit_seconds=...)") -> float:
    """``commit_seconds`` as a positive, finite float (an int or a float; never a bool or a string)."""
    if isinstance(commit_seconds, (bool, np.bool_)) or not isinstance(
        commit_seconds, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"`{call}` got {commit_seconds!r}; expected a number of seconds, e.g. 30.")
    value = float(commit_seconds)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{call}` got {commit_seconds!r}; expected a positive, finite number of seconds.")
    return value


class StoreWriter:
    """Creates (or continues) a store and appends to it. Not thread-safe: one writer thread owns it.

    Use :meth:`create` for a new store and :meth:`resume` to continue one from a checkpoint.
    """

    def __init__(
        self, path: str, kinds: dict[str, str], row_dtype: str, commit_seconds: float, *, lock: WriterLock | None = None
    ) -> None:
        self.path = path
        self.commit_seconds = check_commit_seconds(commit_seconds)
        self._lock = lock if lock is not None else WriterLock.acquire(path, "training")
        self._lock.set_phase("training")
        self._kinds = dict(kinds)
        layers = list(kinds)
        self.row_dtype = row_dtype
        self._layers = list(layers)
        self._pending: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in self._layers}
        self._pending_rows: dict[str, int] = {n: 0 for n in self._layers}
        self._pending_steps: list[tuple[int, int, dict[str, tuple[float, Any, Any]]]] = []
        self._pending_inputs: list[tuple[np.ndarray, np.ndarray | None]] = []  # None: written already
        self._pending_bytes = 0
        self._inexact: dict[str, str] = {}
        self._dropped: dict[str, str] = {}
        self._last_commit = time.monotonic()
        self.failed: BaseException | None = None
        self._space: SpaceReserve | None = None
        self._writeback: Writeback | None = None  # syncs the file while rows arrive (see _writeback.py)
        self.file: h5py.File | None = None
        try:
            # the default 1 MB chunk cache: appends end on chunk boundaries and bypass it (a large cache makes
            # HDF5 push every checksummed chunk through it: 3x slower writes, measured)
            self.file = h5py.File(self.path, "r+", libver=_h5.LIBVER, locking=False)
            self.file.swmr_mode = True
            self._space = SpaceReserve(self.path)
            self._writeback = Writeback(self.file.id.get_vfd_handle() if self.file.driver == "sec2" else None)
            # h5py resolves every path on each access: look each dataset up once
            self._ds = {
                name: {col: g[col] for col in ("keys", "values", *ROW_COLUMNS, "committed_rows")}
                for name, g in ((n, self.file["layers"][n]) for n in self._layers)
            }
            self._tables = StepTables(self.file, self._layers)
            self._chunk_rows = {name: ds["keys"].chunks[0] for name, ds in self._ds.items()}  # as the file has them
            self._row_bytes = {
                name: ds["keys"].dtype.itemsize * ds["keys"].shape[1]
                + ds["values"].dtype.itemsize * ds["values"].shape[1]
                + 32
                for name, ds in self._ds.items()
            }
            # keys and values of uncompressed stores skip h5py's filter pipeline (see chunk_append.py)
            self._appenders = {
                name: {
                    col: app for col in ("keys", "values") if (app := ChunkAppender.for_dataset(ds[col])) is not None
                }
                for name, ds in self._ds.items()
            }
            self._input_appender = ChunkAppender.for_dataset(
                self.file["inputs"]["data"] if "inputs" in self.file else None
            )
            # a convolution stored as maps: its datasets count pixels (keys), virtual rows (values) and maps (the
            # metadata columns); the multipliers per map are fixed by the first step's map size
            self._maps = {
                n: _h5.attr(self.file["layers"][n].attrs.get("layout", "rows")) == MAPS_LAYOUT for n in self._layers
            }
            self._mult: dict[str, dict[str, int]] = {}
            for name in self._layers:
                counts = map_counts(self.file["layers"][name]) if self._maps[name] else None
                if counts is not None:
                    self._mult[name] = {"keys": counts[0], "values": counts[1]}
            self.committed = self._counts()
        except BaseException:
            self._release(close_file=True)
            raise

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
        overwrite: bool = False,
        lock: WriterLock | None = None,
    ) -> "StoreWriter":
        """Write a new store's skeleton (every dataset, empty) and open it for appending.

        Under the store's writer lock, the skeleton is built under a private temporary name and renamed into
        place, so a kill leaves no half store, and two writers on one path never share a file.

        Args:
            overwrite: replace an existing store (a regular file; anything else at ``path`` is refused). Without
                it, an existing store is refused unless it holds no committed step (a run that stopped before its
                first commit: replaced, with a warning).
            lock: the store's writer lock, when the caller took it earlier (a training engine takes it when
                fit starts, so that a second training is refused before it trains a step); it passes to the
                writer, which releases it when it closes. Default: taken here.

        Raises:
            StoreBusyError: another writer holds the path (a second training on the same store).
            FileExistsError: a store with committed steps is there and ``overwrite`` is False.
            StoreError: something other than a regular file is at ``path`` (a FIFO, device, socket, directory or
                symlink: never replaced, with or without ``overwrite``), or at the lock's or journal's name.
            ValueError, TypeError: bad arguments (nothing is written).
        """
        if row_dtype not in ROW_DTYPES:
            raise ValueError(f"dtype={row_dtype!r} is not supported. Expected one of {ROW_DTYPES}.")
        check_specs(layers)
        chunk_rows = check_chunk_rows(chunk_rows, layers, row_dtype)
        commit_seconds = check_commit_seconds(commit_seconds)
        filters = compression_kwargs(compression)
        if input_shape is not None:
            input_shape = tuple(as_int(d, "StoreWriter.create(input_shape=...)", lo=0) for d in input_shape)
            nbytes = int(np.prod(input_shape, dtype=np.int64)) * np.dtype(input_dtype).itemsize
            if nbytes > MAX_INPUT_BYTES:
                raise ValueError(
                    f"StoreWriter.create: one training input of shape {input_shape} takes {nbytes / 2**30:.1f} GiB; "
                    f"at most {MAX_INPUT_BYTES >> 30} GiB per example is stored (pass store_inputs=False)."
                )
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        _repair.check_replaceable(path)  # before the lock: a symlink's target must not get a lock file beside it
        lock = lock if lock is not None else WriterLock.acquire(path, "creating the store")
        lock.set_phase("creating the store")
        try:
            _repair.check_replaceable(path)  # (again, under the lock)
            if os.path.lexists(path) and not overwrite:
                steps = _repair.committed_steps(path)
                if steps != 0:
                    raise FileExistsError(
                        f"{path} already exists" + (f" and holds {steps} committed steps" if steps else "")
                        + ". Choose another path, delete it, pass overwrite=True to replace it, or resume the run "
                        "that wrote it from a checkpoint."
                    )
                warnings.warn(f"lightning-dualform: {path} holds no committed step (its run stopped before it); "
                              "replacing it.", RuntimeWarning, stacklevel=2)
            note = _rollback.discard_for_replacement(path)  # a journal of the store being replaced goes with it
            if note is not None:
                warnings.warn(f"lightning-dualform: {note}.", RuntimeWarning, stacklevel=2)
            tmp = f"{path}.creating-{os.getpid()}-{os.urandom(4).hex()}"
            try:
                write_skeleton(tmp, layers, row_dtype, compression, chunk_rows, metadata, input_shape, input_dtype,
                               filters)
                _repair.check_replaceable(path)  # nothing but a regular file is ever replaced
                os.replace(tmp, path)
                _journal.fsync_dir(path)
            finally:
                if os.path.lexists(tmp):
                    os.remove(tmp)
            return cls(path, {s.name: s.kind for s in layers}, row_dtype, commit_seconds, lock=lock)
        except BaseException:
            lock.release()
            raise

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
        lock: WriterLock | None = None,
    ) -> "StoreWriter":
        """Continue a store from a checkpoint: truncate everything written after it, then append.

        ``update_attrs`` gets the file's :class:`StoreMetadata` and returns the root attributes to set before
        any row changes (what the resumed run changes about the whole store). ``lock``: as in :meth:`create`.

        The truncation is one all-or-nothing write session (:mod:`._journal`): a kill or a full disk during it
        leaves the store exactly as it was (complete, or at its last commit), and the resume can be retried.

        Raises:
            StoreError: the file is not a store, holds fewer rows than the checkpoint says (rows that the
                checkpoint counts are missing: they cannot be made up), or its ``steps``-th recorded step
                is not ``last_step`` (the checkpoint's counts do not describe this store: truncating to
                them would delete recorded steps, so nothing is touched).
            StoreBusyError: another writer holds the store.
            ValueError: the store was written with other settings than this run's.
        """
        commit_seconds = check_commit_seconds(commit_seconds)
        steps = as_int(steps, "StoreWriter.resume(steps=...)", lo=0)
        rows = {str(k): as_int(v, f"StoreWriter.resume(rows[{k!r}]=...)", lo=0) for k, v in rows.items()}
        inputs = None if inputs is None else as_int(inputs, "StoreWriter.resume(inputs=...)", lo=0)
        lock = lock if lock is not None else WriterLock.acquire(path, "resuming: checking the store")
        lock.set_phase("resuming: checking the store")
        try:
            _repair.check_regular_file(path)
            _repair.recover_for_write(path)
            try:
                stored = stored_settings(path)
            except (OSError, KeyError, ValueError, TypeError) as err:
                raise StoreError(
                    f"{path}: cannot continue this file: it is not a readable store ({_h5.short(err)})."
                ) from err
            diffs = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
            if diffs:
                shown = "; ".join(f"{k}: store has {a!r}, this run has {b!r}" for k, (a, b) in diffs.items())
                raise ValueError(
                    f"DualFormCallback: {path} was written with other settings ({shown}). Use the same settings, "
                    "another path, or `overwrite=True` to start the store afresh."
                )
            lock.set_phase("resuming: truncating to the checkpoint")
            with _journal.write_session(path, "resume (truncation to the checkpoint)") as f:
                truncate(f, path, rows, steps, inputs, last_step, update_attrs)
            kinds = {n: stored["layers"][n][0] for n in rows if n in stored["layers"]}
            return cls(path, kinds, stored["row_dtype"], commit_seconds, lock=lock)
        except BaseException:
            lock.release()
            raise

    def _counts(self) -> dict[str, Any]:
        f = self._h5file
        return {
            "steps": int(f["committed_steps"][0]),
            "rows": {n: int(f["layers"][n]["committed_rows"][0]) for n in self._layers if n in f["layers"]},
            "inputs": int(f["inputs"]["committed"][0]) if "inputs" in f else None,
            "created": str(_h5.attr(f.attrs.get("created", ""))),  # (which store: a moved one keeps it)
        }

    def set_release_gil(self, release: bool) -> None:
        """Whether chunk writes release the GIL (the default) or go through h5py's public call, which holds it.

        Releasing it lets the training thread run Python while HDF5 writes, which matters where that thread only
        launches device kernels (CUDA). Where training shares the CPU cores with the writer, the writer then
        competes with torch's threads instead of taking turns, and on a 2-core CPU training runs slower beside it
        (figures: ``docs/benchmarks.md``, "The writer's work per byte, and the GIL")."""
        for appenders in self._appenders.values():
            for app in appenders.values():
                app.release_gil = bool(release)
        if self._input_appender is not None:
            self._input_appender.release_gil = bool(release)

    def input_sizes(self) -> dict[str, tuple[int, ...]]:
        """The map size of each convolution stored as maps whose size is fixed (by its first rows)."""
        out = {}
        for name in self._layers:
            if name in self._mult:
                out[name] = tuple(int(v) for v in self._h5file["layers"][name]["input_size"][()])
        return out

    def input_indices(self) -> np.ndarray:
        """Dataset indices whose raw input is already stored (committed)."""
        if "inputs" not in self._h5file:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self._h5file["inputs"]["index"][: int(self._h5file["inputs"]["committed"][0])])

    @property
    def _h5file(self) -> h5py.File:
        """The open file (the writing methods run after :meth:`_guard`, which says so when it is closed)."""
        if self.file is None:
            raise StoreError(f"{self.path}: the store writer is closed.")
        return self.file

    # -- failures ----------------------------------------------------------------------------------
    def _guard(self) -> None:
        if self.failed is not None:
            raise StoreError(f"{self.path}: the store writer stopped after a failure ({_h5.short(self.failed)}); "
                             "the store keeps its committed steps.") from self.failed
        if self.file is None or not self.file.id.valid:
            raise StoreError(f"{self.path}: the store writer is closed.")

    def _failing(self, err: BaseException) -> None:
        """After any failure nothing more is written: a half-done HDF5 write must not be followed by others."""
        if self.failed is None:
            self.failed = err

    def _reserve(self, nbytes: int) -> None:
        if self._space is not None:
            self._space.ensure(nbytes + self._chunk_slack())

    def _chunk_slack(self) -> int:
        """Bytes a commit may write beyond the rows: each column's partial last chunk, written whole."""
        if not hasattr(self, "_slack"):
            total = 0
            for ds in self._ds.values():
                for col in ("keys", "values", *ROW_COLUMNS):
                    d = ds[col]
                    total += int(np.prod(d.chunks, dtype=np.int64)) * d.dtype.itemsize
            if self._input_appender is not None:
                total += self._input_appender._bytes
            self._slack = total + 64 * 1024 * (1 + len(self._layers))
        return self._slack

    # -- appending ---------------------------------------------------------------------------------
    def add_step(
        self, step: int, epoch: int, rows: dict[str, StepRows], updates: dict[str, tuple[float, Any, Any]]
    ) -> None:
        """Buffer one optimizer step: its rows per layer and ``(grad_scale, weight_row, bias_row)``, a row being
        the step's ``{column: value}`` of the store's update rule (or an object with those attributes).

        Rows are written in large appends that end on chunk boundaries (so no chunk is written twice);
        the small per-step tables at commit. A commit follows every ``commit_seconds``. The disk space the
        step needs is reserved before anything is written (:mod:`._space`).
        """
        self._guard()
        try:
            self._tables.check_finite(self.path, step, updates, skip=self._dropped)
            nbytes = sum(len(r.keys) * self._row_bytes[n] for n, r in rows.items() if n in self._row_bytes)
            nbytes += 256 * len(self._layers)
            self._reserve(self._pending_bytes + nbytes)
            self._pending_bytes += nbytes
            self._add_step(step, epoch, rows, updates)
            if self._writeback is not None:
                self._writeback.wrote(nbytes)
        except BaseException as err:
            self._failing(err)
            raise

    def _add_step(
        self, step: int, epoch: int, rows: dict[str, StepRows], updates: dict[str, tuple[float, Any, Any]]
    ) -> None:
        for name, r in rows.items():
            if name in self._dropped:
                continue
            n = len(r.index)  # entries of the metadata columns (one per map for a convolution)
            if self._maps[name]:
                self._set_map_size(name, r)
            block = {
                "keys": r.keys.astype(np.int64)
                if self._kinds[name] == "embedding"
                else encode_rows(r.keys, self.row_dtype),
                "values": encode_rows(r.values, self.row_dtype),
                "index": r.index,
                "position": r.position,
                "label": r.label,
                "step": np.full(n, step, np.int64),
                "epoch": np.full(n, epoch, np.int32),
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
            self._commit()

    def _set_map_size(self, name: str, r: StepRows) -> None:
        """Fix a convolution's map size at its first rows (written now, before any row that depends on it)."""
        ds = self._h5file["layers"][name]["input_size"]
        have = tuple(int(v) for v in ds[()])
        if r.map_size is None or (any(have) and have != tuple(r.map_size)):
            raise StoreError(f"{self.path}: layer {name!r} is stored as maps of size {have}, not {r.map_size}.")
        if not any(have):
            ds[...] = np.asarray(r.map_size, dtype=np.int64)
            counts = map_counts(self._h5file["layers"][name])
            assert counts is not None  # the map size was just fixed
            self._mult[name] = {"keys": counts[0], "values": counts[1]}
        mult = self._mult[name]
        if len(r.keys) != mult["keys"] * len(r.index) or len(r.values) != mult["values"] * len(r.index):
            raise StoreError(f"{self.path}: layer {name!r}: {len(r.keys)} pixel rows and {len(r.values)} value rows "
                             f"for {len(r.index)} maps of {mult['keys']} pixels and {mult['values']} locations.")

    def add_inputs(self, index: np.ndarray, data: np.ndarray) -> None:
        """Raw inputs of training examples seen for the first time (all written by the next commit)."""
        self._guard()
        try:
            nbytes = int(np.asarray(data).nbytes) + 8 * len(index)
            self._reserve(self._pending_bytes + nbytes)
            self._pending_bytes += nbytes
            kept: np.ndarray | None = data
            if self._input_appender is not None:  # the bytes go out now, chunk by chunk; the indices at commit
                self._input_appender.append(np.ascontiguousarray(data, dtype=self._input_appender.ds.dtype))
                kept = None
            self._pending_inputs.append((index, kept))
            if self._writeback is not None:
                self._writeback.wrote(nbytes)
        except BaseException as err:
            self._failing(err)
            raise

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
        if self._pending_inputs and "inputs" in self._h5file:
            ig = self._h5file["inputs"]
            if self._input_appender is None:
                _h5.append(
                    ig["data"],
                    np.concatenate([d for _, d in self._pending_inputs]).astype(ig["data"].dtype, copy=False),
                )
            _h5.append(ig["index"], np.concatenate([i for i, _ in self._pending_inputs]))
        self._pending_inputs = []
        if not self._pending_steps:
            return
        steps = self._pending_steps
        _h5.append(self._h5file["update_step"], np.array([s for s, _, _ in steps], dtype=np.int64))
        _h5.append(self._h5file["update_epoch"], np.array([e for _, e, _ in steps], dtype=np.int32))
        self._tables.append(steps)
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

        Raises:
            OSError: the disk cannot hold the buffered rows (``ENOSPC``, before anything is written): the
                store keeps its last committed steps, and the writer stops (:meth:`close` then only closes).
        """
        self._guard()
        try:
            return self._commit()
        except BaseException as err:
            self._failing(err)
            raise

    def _commit(self) -> dict[str, Any]:
        self._reserve(self._pending_bytes)
        self._write_pending()
        self._h5file.flush()  # data first ...
        f = self._h5file
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
                raise StoreError(
                    f"{self.path}: {ig['index'].shape[0]} input indices for {ig['data'].shape[0]} inputs; not "
                    "committed."
                )
            ig["committed"][0] = ig["index"].shape[0]
        f["committed_steps"][0] = f["update_step"].shape[0]
        f.flush()  # ... then the counters that point at it
        self._last_commit = time.monotonic()
        self._pending_bytes = 0
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
                 certificate: dict[str, LayerCertificate] | None = None, keep_lock: bool = False) -> WriterLock | None:
        """Commit, leave SWMR mode, then write the final weights, the certificate made as training went (if
        any) and ``status = "complete"`` in one all-or-nothing write session (a kill or a full disk during it
        leaves the store at this last commit, status ``recording``, never half finished). Releases the writer
        lock, or with ``keep_lock`` returns it still held (the full certificate follows under it, so that no
        other writer takes the store in between); the caller releases it.

        Raises:
            StoreError: a final weight of the wrong shape, or the writer failed before.
            OSError: the disk is full (the store keeps every committed step).
        """
        self._guard()
        try:
            for name, (w, b) in final_weights.items():
                if name in self._dropped:
                    continue
                spec = self._h5file["layers"][name].attrs
                want = (int(spec["d_out"]), int(spec["d_in"]))
                if np.shape(w) != want or (b is not None and np.shape(b) != want[:1]):
                    raise StoreError(
                        f"{self.path}: final weights of layer {name!r} are {np.shape(w)}, expected {want}."
                    )
            self.commit()
            if self._writeback is not None:  # (a background sync's error fails the finish here)
                self._writeback.close()
            self._release(close_file=True, keep_lock=True)
            self._lock.set_phase("finalisation")
            nbytes = sum(4 * (np.size(w) + (np.size(b) if b is not None else 0)) for w, b in final_weights.values())
            with _journal.write_session(
                self.path, "finalisation", reserve=nbytes + 64 * 1024 * len(final_weights)
            ) as f:
                for name, (w, b) in final_weights.items():
                    g = f["layers"][name]
                    _h5.replace(g, "weight_final", np.asarray(w, dtype=np.float32))
                    if b is not None:
                        _h5.replace(g, "bias_final", np.asarray(b, dtype=np.float32))
                for name in self._dropped:
                    del f["layers"][name]
                _h5.set_attrs(f, {"dropped_layers": self._dropped,
                                  "layer_order": [n for n in self._layers if n not in self._dropped]})
                n_steps = int(f["committed_steps"][0])
                for g in f["layers"].values():  # (rows before a resume count too)
                    per = (map_counts(g) or (1, 1))[1]  # a convolution's maps: one index per map of `per` rows
                    g.attrs["rows_without_index"] = per * _h5.count_negative(
                        g["index"], int(g["committed_rows"][0]) // per
                    )
                    # the per-step tables the store finished with: answers at every step rest on them
                    g.attrs[TABLES_CRC32] = stored_tables_crc32(f, g, n_steps)
                for name, cert in (certificate or {}).items():
                    if name in f["layers"]:
                        _h5.set_attrs(f["layers"][name], cert.to_attrs())
                for name, reason in self._inexact.items():
                    if name not in f["layers"]:
                        continue  # marked inexact, then dropped altogether
                    f["layers"][name].attrs["exact"] = False
                    f["layers"][name].attrs["inexact_reason"] = reason
                _h5.set_attrs(f, {"final_step": int(final_step), "epochs": int(epochs)})
                for g in f["layers"].values():  # last: they bind every attribute written above
                    write_bindings(f, g)
                f.attrs["status"] = "complete"
        except BaseException as err:
            self._failing(err)
            self._release(close_file=True)
            raise
        self._release(close_file=False, keep_lock=keep_lock)
        return self._lock if keep_lock else None

    def close(self) -> None:
        """Commit and close without finalising (after an exception, or when fit stops early).

        After a failure it only closes: nothing more is written, the store keeps its committed steps.
        """
        if self.file is not None and self.file.id.valid and self.failed is None:
            try:
                self.commit()
            finally:
                self._release(close_file=True)
        else:
            self._release(close_file=True)

    def abandon(self) -> None:
        """Close without writing anything more (after a failure): the store keeps its committed steps."""
        if self.failed is None:
            self.failed = StoreError("abandoned")
        self._release(close_file=True)

    def _release(self, close_file: bool, keep_lock: bool = False) -> None:
        if close_file and self._writeback is not None:
            wb, self._writeback = self._writeback, None
            try:
                wb.close()
            except OSError as err:  # (the store keeps its committed steps; the failed sync is only told)
                log.warning("%s: syncing to disk failed: %s", self.path, err)
        if close_file and self.file is not None:
            f, self.file = self.file, None
            try:
                if f.id.valid:
                    f.close()
            except Exception as err:  # a failed flush: nothing more can be done for the uncommitted rows
                log.warning("%s: closing after a failure: %s", self.path, _h5.short(err))
        if self._space is not None:
            space, self._space = self._space, None
            try:
                space.release()
            except OSError:
                pass
        if not keep_lock:
            self._lock.release()

