"""The writer thread: one :class:`~lightning_dualform.store.StoreWriter`, driven by named operations.

Training hands over whole steps through a bounded queue, so a slow disk slows training only when the
queue is full. Operations run in the order they were given, on one thread that alone touches the
file: some are queued and return at once (:meth:`AsyncWriter.add_step`, :meth:`~AsyncWriter.add_inputs`,
:meth:`~AsyncWriter.drop_layer`, :meth:`~AsyncWriter.mark_inexact`, :meth:`~AsyncWriter.commit_soon`), the
others wait for everything queued before them and for their own result (:meth:`~AsyncWriter.commit`,
:meth:`~AsyncWriter.finalize`, :meth:`~AsyncWriter.close`, and the facts a new or resumed store gives).
A failure in the thread (disk full, permissions) is kept and re-raised in the training thread at its next
call as :class:`~lightning_dualform.errors.WriterError`, naming the file and cause.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from lightning_dualform.errors import WriterError
from lightning_dualform.store._lock import WriterLock
from lightning_dualform.store.certificate import LayerCertificate
from lightning_dualform.store.format import StepRows
from lightning_dualform.store.writer import StoreWriter

_STOP = object()

#: ``{layer: (grad_scale, weight_row, bias_row)}`` of one step (see :meth:`StoreWriter.add_step`)
StepUpdates = dict[str, tuple[float, Any, Any]]
#: the committed counts: ``{"steps": int, "rows": {layer: int}, "inputs": int | None}``
Counts = dict[str, Any]


class AsyncWriter:
    """Runs a ``StoreWriter``'s operations in order on one thread.

    Args:
        make_store: builds the ``StoreWriter`` (called here, eagerly, so that creation errors surface at once in
            the caller).
        max_queue: operations that may wait in memory before a queued one blocks (each step is one).
    """

    def __init__(self, make_store: Callable[[], StoreWriter], max_queue: int = 32) -> None:
        self._store = make_store()
        self.path = self._store.path
        #: the counts of the last commit (a new store: zeros; a resumed one: the checkpoint's)
        self.committed: Counts = self._store.committed
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self.started = time.monotonic()
        #: seconds callers spent waiting for room in the full queue: training held back by the writer
        self.blocked_s = 0.0
        self._thread = threading.Thread(target=self._run, name="dualform-writer", daemon=True)
        self._thread.start()

    # -- queued: training goes on --------------------------------------------------------------------
    def add_step(self, step: int, epoch: int, rows: Callable[[], dict[str, StepRows]], updates: StepUpdates) -> None:
        """Queue one optimizer step. ``rows`` makes the step's rows on the writer thread (where a device's copy
        to the host is waited for, off the training thread)."""
        self._submit(lambda: self._store.add_step(step, epoch, rows(), updates))

    def add_inputs(self, index: np.ndarray, data: np.ndarray) -> None:
        """Queue the raw inputs ``(n, ...)`` of training examples ``index`` ``(n,)`` seen for the first time."""
        self._submit(lambda: self._store.add_inputs(index, data))

    def drop_layer(self, name: str, reason: str) -> None:
        """Queue: stop recording a layer whose rows cannot explain its weights (removed at finalisation)."""
        self._submit(lambda: self._store.drop_layer(name, reason))

    def mark_inexact(self, name: str, reason: str) -> None:
        """Queue: a layer's rows do not fully explain its weights (written at finalisation)."""
        self._submit(lambda: self._store.mark_inexact(name, reason))

    def commit_soon(self) -> None:
        """Queue a commit (the rows so far made durable; :attr:`committed` then holds its counts)."""
        self._submit(self._commit)

    # -- waited for ----------------------------------------------------------------------------------
    def commit(self) -> Counts:
        """Make everything queued durable, and return the committed counts."""
        self._call(self._commit)
        return self.committed

    def drain(self) -> None:
        """Wait until the writer thread has handled everything queued (raises its error, as every wait does)."""
        self._call(lambda: None)

    def set_release_gil(self, release: bool) -> None:
        """Whether chunk writes release the GIL (:meth:`StoreWriter.set_release_gil`)."""
        self._call(lambda: self._store.set_release_gil(release))

    def input_sizes(self) -> dict[str, tuple[int, ...]]:
        """The map size of each convolution stored as maps whose size is fixed (a resumed store's)."""
        return self._call(self._store.input_sizes)

    def input_indices(self) -> np.ndarray:
        """Dataset indices whose raw input is already stored (committed)."""
        return self._call(self._store.input_indices)

    def finalize(self, final_weights: dict[str, tuple[np.ndarray, np.ndarray | None]], final_step: int, epochs: int,
                 certificate: dict[str, LayerCertificate] | None = None, keep_lock: bool = False) -> WriterLock | None:
        """Finish the store after everything queued (:meth:`StoreWriter.finalize`) and end the thread; with
        ``keep_lock`` the store's writer lock is returned still held (the caller releases it)."""
        try:
            lock = self._call(lambda: self._store.finalize(final_weights, final_step, epochs, certificate, keep_lock))
            self.committed = self._store.committed
        finally:
            self._stop()
        return lock

    def close(self) -> None:
        """Commit what is queued and close without finalising (an exception, or fit stopped early); end the
        thread. After a failure it only closes: the store keeps its committed steps."""
        try:
            self._call(self._store.close)
        finally:
            self._stop()
        self.committed = self._store.committed

    @property
    def failed(self) -> bool:
        return self._error is not None

    # -- the thread ----------------------------------------------------------------------------------
    def _commit(self) -> None:
        self.committed = self._store.commit()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, done = item
                if self._error is None:
                    try:
                        fn()
                    except BaseException as err:  # kept for the training thread; never swallowed
                        self._error = err
                        self._abandon()
                if done is not None:
                    done.set()
            finally:
                self._queue.task_done()

    def _abandon(self) -> None:
        """After a failure the store is closed here, at once, without writing more: later calls are refused
        (the training thread gets the error), and an HDF5 file left open until interpreter exit would be
        flushed then, into whatever state the failure left (measured: a crash at exit after a full disk)."""
        try:
            self._store.abandon()
        except Exception:  # the original error is what the user must see
            pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            # the writer serves the callback and the recorder alike; only an OS error is about the disk
            fix = "free disk space or fix permissions" if isinstance(err, OSError) else "fix what the error says"
            raise WriterError(
                f"the store's writer could not write {self.path}: {type(err).__name__}: {err}. "
                f"Recording stopped so that no rows are silently lost; {fix}, then resume from the last checkpoint."
            ) from err

    def _put(self, item: Any) -> None:
        full_since = None  # when the queue was first found full: training waits from then on
        try:
            while True:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise WriterError(f"the writer thread of {self.path} is not running.")
                try:
                    self._queue.put(item, block=full_since is not None, timeout=0.5)
                    return
                except queue.Full:
                    full_since = full_since or time.monotonic()
        finally:
            if full_since is not None:
                self.blocked_s += time.monotonic() - full_since

    def _submit(self, fn: Callable[[], None]) -> None:
        """Queue ``fn()`` to run on the writer thread."""
        self._put((fn, None))

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the writer thread after everything queued, wait for it and return what it returned."""
        done = threading.Event()
        box: list = []
        self._put((lambda: box.append(fn()), done))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()
        return box[0] if box else None

    def _stop(self) -> None:
        """Let the queue drain and end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
