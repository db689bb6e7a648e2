"""A background thread that owns the :class:`~lightning_dualform.store.StoreWriter`.

Training hands over whole steps through a bounded queue, so a slow disk slows training only when the
queue is full. A failure in the thread (disk full, permissions) is kept and re-raised in the training
thread at its next call as :class:`~lightning_dualform.errors.WriterError`, naming the file and cause.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from lightning_dualform.errors import WriterError
from lightning_dualform.store.writer import StoreWriter

_STOP = object()


class AsyncWriter:
    """Runs ``StoreWriter`` calls in order on one thread.

    Args:
        make_store: builds the ``StoreWriter`` (called on the writer thread's behalf, but eagerly, so
            creation errors surface at once in the caller).
        max_queue: steps that may wait in memory before ``submit`` blocks.
    """

    def __init__(self, make_store: Callable[[], StoreWriter], max_queue: int = 32) -> None:
        self.store = make_store()
        self.path = self.store.path
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self.started = time.monotonic()
        #: seconds callers spent waiting for room in the full queue: training held back by the writer
        self.blocked_s = 0.0
        self._thread = threading.Thread(target=self._run, name="dualform-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, done = item
                if self._error is None:
                    try:
                        fn(*args)
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
        abandon = getattr(self.store, "abandon", None)
        if abandon is not None:
            try:
                abandon()
            except Exception:  # the original error is what the user must see
                pass

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise WriterError(
                f"DualFormCallback could not write {self.path}: {type(err).__name__}: {err}. "
                "Recording stopped so that no rows are silently lost; free disk space or fix permissions, "
                "then resume from the last checkpoint."
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

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Queue ``fn(*args)`` to run on the writer thread."""
        self._put((fn, args, None))

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the writer thread after everything queued, and wait for it."""
        self.call_result(fn, *args)

    def call_result(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Like :meth:`call`, and return what ``fn`` returned."""
        done = threading.Event()
        box: list = []
        self._put((lambda: box.append(fn(*args)), (), done))
        while not done.wait(0.5):
            if not self._thread.is_alive():
                break
        self._raise_if_failed()
        return box[0] if box else None

    def stop(self) -> None:
        """Let the queue drain and end the thread (does not commit: call ``call(store.commit)`` first)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    @property
    def failed(self) -> bool:
        return self._error is not None
