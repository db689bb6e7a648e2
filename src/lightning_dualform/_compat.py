"""The private internals of our dependencies that the library relies on, behind one door.

Each is used only where no public path does the job (measured or explained at the use), and each has a
contract test in ``tests/test_compat.py`` that fails loudly when the behaviour it relies on changes:

- :func:`observe_dataloaders`: Lightning's ``Strategy.process_dataloader`` is the last place a training
  DataLoader passes through after a ``DistributedSampler`` is injected and before the fit loop iterates it
  (the first epoch's iterator exists before any callback hook runs). It is patched on the strategy
  *instance* only when dataset indices are to be observed (a batch that carries its index needs nothing).
- :func:`replace_sampler`: ``DataLoader`` refuses to set ``sampler``/``batch_sampler`` after ``__init__``
  (to stop users mixing iterators); we put a pass-through wrapper there that only observes what the
  original yields.
- :func:`h5py_lock`: h5py's global lock, so that the ctypes calls of ``store/_hdf5_nogil.py`` stay
  serialised with h5py's own calls into the same HDF5 library.
"""

from __future__ import annotations

from typing import Any, Callable


def observe_dataloaders(strategy: Any, observe: Callable[[Any], Any]) -> Callable[[], None]:
    """Make ``strategy.process_dataloader`` hand every DataLoader it prepares to ``observe`` (after
    Lightning's own processing). Returns the function that undoes it."""
    original = strategy.process_dataloader

    def process_dataloader(dataloader: object) -> object:
        dataloader = original(dataloader)
        observe(dataloader)
        return dataloader

    strategy.process_dataloader = process_dataloader

    def undo() -> None:
        try:
            del strategy.process_dataloader  # the instance attribute: the class's method shows through again
        except AttributeError:
            pass

    return undo


def replace_sampler(dataloader: Any, attr: str, value: Any) -> None:
    """Set ``dataloader.sampler`` or ``.batch_sampler`` after construction (the DataLoader guards them)."""
    object.__setattr__(dataloader, attr, value)


def h5py_lock() -> Any:
    """h5py's global lock (``h5py._objects.phil``), or None when this h5py has none (the ctypes path is off)."""
    try:
        from h5py._objects import phil
    except ImportError:  # pragma: no cover - a future h5py
        return None
    return phil
