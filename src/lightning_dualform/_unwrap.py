"""The user's own module inside the wrappers a training loop puts around it (shared by the recorder, which hooks
the layers it records, and ``DualInference.explain``, which hooks the same layers to read their inputs)."""

from __future__ import annotations

from torch import nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside the wrappers a loop puts around it: ``DistributedDataParallel``,
    ``DataParallel`` and Fabric's module wrapper (whose ``module`` is the original, by Fabric's public API)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
            continue
        try:
            from lightning.fabric.wrappers import is_wrapped
        except ImportError:  # pragma: no cover - lightning is a dependency
            return model
        if is_wrapped(model) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        return model
