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
- :func:`observe_norm_clipping`: Lightning's ``Precision.clip_grad_by_norm`` computes the gradients' total
  norm and drops it; the plugin *instance* gets the same two lines that keep it (a second norm was a
  pass over every gradient each step: 0.5 ms of the paper MLP's 11 ms step on a 2-core CPU).
- :func:`compiled_original`: the module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), so
  that a compiled model (or submodule) answers to the names its layers have without compiling: torch offers no
  public way back to the original, and the wrapper puts ``_orig_mod`` into every name below it.
- :func:`lightning_compiled_methods`: ``trainer.fit(torch.compile(model))`` unwraps the compiled model and puts
  compiled versions of its ``forward`` and ``*_step`` methods on the LightningModule *instance*, keeping the
  originals in its ``_compiler_ctx``; ``explain``/``influence`` run the originals (Lightning's public
  ``to_uncompiled`` would undo it for good).
- :func:`tensor_version`: a tensor's version counter, which every in-place operation moves: the one cheap way to
  notice a weight edited between optimizer steps (``record/weight_watch.py``); torch offers no public one.
- :func:`h5py_lock`: h5py's global lock, so that the ctypes calls of ``store/_hdf5_nogil.py`` stay
  serialised with h5py's own calls into the same HDF5 library.
"""

from __future__ import annotations

import sys
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


def compiled_original(module: object) -> Any:
    """The module a ``torch.compile`` wrapper holds, or None when ``module`` is not one. (Without
    ``torch._dynamo`` imported no module can be compiled: it is not imported here, which would take a second.)"""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    if wrapper is not None and isinstance(module, wrapper):
        return module._orig_mod
    return None


#: the methods Lightning compiles on a LightningModule (``lightning.pytorch.utilities.compile.from_compiled``)
_COMPILED_METHODS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def lightning_compiled_methods(module: Any) -> dict[str, Any]:
    """The original methods of a LightningModule that Lightning compiled in place (``{}`` for any other module)."""
    ctx = getattr(module, "_compiler_ctx", None)
    if not isinstance(ctx, dict):
        return {}
    return {name: ctx[f"original_{name}"] for name in _COMPILED_METHODS if f"original_{name}" in ctx}


def tensor_version(t: Any) -> int:
    """How many in-place operations ``t``'s data has seen (``Tensor._version``)."""
    return int(t._version)


def h5py_lock() -> Any:
    """h5py's global lock (``h5py._objects.phil``), or None when this h5py has none (the ctypes path is off)."""
    try:
        from h5py._objects import phil
    except ImportError:  # pragma: no cover - a future h5py
        return None
    return phil


def observe_norm_clipping(plugin: Any, observe: Callable[[Any, float], None]) -> Callable[[], None] | None:
    """Make Lightning's norm clipping hand its total gradient norm to ``observe(total, clip_val)``.

    ``Precision.clip_grad_by_norm`` calls ``torch.nn.utils.clip_grad_norm_``, which returns the norm, and drops
    it; the recording then had to compute the same norm again, a pass over every gradient each step. This
    puts on the plugin *instance* a method that does what the stock one does (``clip_grad_norm_(
    self.main_params(optimizer), clip_val)``) and hands the norm to every observer (two callbacks share it).
    Only for a plugin whose class keeps the stock method (FSDP's and DeepSpeed's clip their own way) and whose
    instance has no method of someone else's there: None then, and nothing is changed. Returns the function
    that undoes it (the last observer's undo removes the method).
    """
    import torch
    from lightning.pytorch.plugins.precision import Precision

    if getattr(type(plugin), "clip_grad_by_norm", None) is not Precision.clip_grad_by_norm:
        return None
    method = vars(plugin).get("clip_grad_by_norm")
    observers: list[Callable[[Any, float], None]] | None = getattr(method, "_dualform_observers", None)
    if observers is None:
        if method is not None:
            return None
        observers = []

        def clip_grad_by_norm(optimizer: Any, clip_val: float) -> None:
            total = torch.nn.utils.clip_grad_norm_(plugin.main_params(optimizer), clip_val)
            for fn in list(observers):
                fn(total, float(clip_val))

        clip_grad_by_norm._dualform_observers = observers  # type: ignore[attr-defined]
        plugin.clip_grad_by_norm = method = clip_grad_by_norm
    observers.append(observe)

    def undo() -> None:
        observers[:] = [fn for fn in observers if fn is not observe]
        if not observers and vars(plugin).get("clip_grad_by_norm") is method:
            del plugin.clip_grad_by_norm  # the instance attribute: the class's method shows through again

    return undo
