"""The user's own module inside the wrappers a training loop puts around it (shared by the recorder, which hooks
the layers it records, and ``DualInference.explain``, which hooks the same layers to read their inputs), and the
names of its layers as a store has them, whether or not the model or a part of it was compiled."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from lightning_dualform._compat import compiled_original, lightning_compiled_methods

#: the name segment a ``torch.compile`` wrapper puts above the module it holds
COMPILED = "_orig_mod"


def layer_name(name: str) -> str:
    """A module's name without ``torch.compile``'s wrapper segments: ``net._orig_mod.0`` is ``net.0``."""
    if COMPILED not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILED)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` under the names a store gives them (:func:`layer_name`), the compiled wrappers
    themselves left out: a model trained compiled and the same model uncompiled have the same layers."""
    return {layer_name(name): m for name, m in model.named_modules() if compiled_original(m) is None}


def raw_names(model: nn.Module) -> dict[int, str]:
    """Each module's own name in ``model.named_modules()`` (by ``id``), for ``named_parameters``-keyed calls."""
    return {id(m): name for name, m in model.named_modules()}


@contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every ``torch.compile`` wrapper in it (itself or a submodule's) out of the way for the
    duration: yields the module to call, and puts the compiled submodules back after. Hooks registered inside then
    fire (a graph compiled before them would not call them), and a replay that swaps parameters in compiles
    nothing."""
    def original(m: nn.Module) -> nn.Module:
        while (inner := compiled_original(m)) is not None:
            m = inner
        return m

    swaps: list[tuple[nn.Module, str, Any]] = []

    def visit(m: nn.Module) -> None:
        for name, method in lightning_compiled_methods(m).items():  # (trainer.fit(torch.compile(model)) made these)
            swaps.append((m, name, vars(m).get(name)))
            setattr(m, name, method)
        for attr, child in list(m.named_children()):
            eager = original(child)
            if eager is not child:
                setattr(m, attr, eager)
                swaps.append((m, attr, child))
            visit(eager)

    top = original(model)
    try:
        visit(top)
        yield top
    finally:
        for m, attr, before in reversed(swaps):
            if before is None:
                vars(m).pop(attr, None)  # (a method put on the instance is taken away again)
            else:
                setattr(m, attr, before)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside the wrappers a loop puts around it: ``DistributedDataParallel``,
    ``DataParallel``, Fabric's module wrapper (whose ``module`` is the original, by Fabric's public API) and
    ``torch.compile``'s."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
            continue
        original = compiled_original(model)
        if original is not None:
            model = original
            continue
        try:
            from lightning.fabric.wrappers import is_wrapped
        except ImportError:  # pragma: no cover - lightning is a dependency
            return model
        if is_wrapped(model) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        return model
