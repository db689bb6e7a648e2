"""The batch of each recorded step, rebuilt for a replay: which examples (from the rows' dataset indices) and
their inputs and labels (from the store's raw inputs, or from data the user passes)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

#: ``data=`` of a replay: a map-style dataset (``data[i]`` is example ``i``), or ``batch_for(indices) -> batch``
Data = Any
Loss = Callable[[nn.Module, Any], torch.Tensor]


class BatchSource:
    """Builds the batch of a step from its examples' dataset indices and stored labels.

    Args:
        store: the opened store.
        data: ``None`` (the store's raw inputs, ``DualFormCallback(store_inputs=True)``, the default, with the
            rows' labels: the batch is ``(inputs, labels)``), a map-style dataset (its items are collated with
            ``torch.utils.data.default_collate``), or a callable ``batch_for(indices) -> batch``.
        dtype: floating tensors of the batch are cast to it (the replay's dtype).

    Raises:
        ValueError: ``data=None`` and the store keeps no raw inputs.
    """

    def __init__(self, store: Any, data: Data, dtype: torch.dtype) -> None:
        self.store = store
        self.data = data
        self.dtype = dtype
        if data is None and getattr(store, "n_inputs", 0) == 0:
            raise ValueError(f"{store.path} keeps no raw training inputs, so the batches cannot be rebuilt from it. "
                             "Pass data= (the training dataset, indexable by the dataset indices the store records).")
        self._kept: tuple[np.ndarray, np.ndarray] | None = None  # (sorted indices, inputs), when they fit in memory

    def keep(self, examples: np.ndarray, budget: int = 512 * 2**20) -> None:
        """Read the store's inputs of ``examples`` once (a sweep asks for every batch once per query batch), when
        they take at most ``budget`` bytes."""
        if self.data is not None or not len(examples):
            return
        one = self.store.train_inputs(examples[:1])
        if one is None or one.nbytes * len(examples) > budget:
            return
        self._kept = (examples, self.store.train_inputs(examples))

    def __call__(self, indices: np.ndarray, labels: np.ndarray) -> Any:
        if self.data is None:
            if self._kept is not None:
                pos = np.searchsorted(self._kept[0], indices)
                ok = (pos < len(self._kept[0])) & (self._kept[0][np.minimum(pos, len(self._kept[0]) - 1)] == indices)
                x = self._kept[1][pos] if ok.all() else self.store.train_inputs(indices)
            else:
                x = self.store.train_inputs(indices)
            if x is None or (np.issubdtype(x.dtype, np.floating) and np.isnan(x.reshape(len(x), -1)).all(1).any()):
                raise ValueError(f"{self.store.path} keeps no raw input for some of the examples "
                                 f"{indices.tolist()[:8]}...; pass data= (the training dataset).")
            batch: Any = (torch.as_tensor(x), torch.as_tensor(labels, dtype=torch.int64))
        elif callable(self.data) and not hasattr(self.data, "__getitem__"):
            batch = self.data(indices)
        else:
            batch = torch.utils.data.default_collate([self.data[int(i)] for i in indices])
        return _cast(batch, self.dtype)


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        parts = [_cast(b, dtype) for b in batch]
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    return batch


def default_loss(model: nn.Module) -> Loss:
    """The training loss of a batch: a LightningModule's ``training_step`` (its loss, or ``["loss"]`` of a dict it
    returns), else the mean cross-entropy of ``model(batch[0])`` against ``batch[1]``."""
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover - lightning is a dependency
        pl = None
    if pl is not None and isinstance(model, pl.LightningModule):
        def step(m: nn.Module, batch: Any) -> torch.Tensor:
            out = m.training_step(batch, 0)
            return out["loss"] if isinstance(out, dict) else out
        return step

    def ce(m: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])
    return ce
