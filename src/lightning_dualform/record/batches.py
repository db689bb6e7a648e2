"""What a training or query batch tells the recorder: dataset indices, labels, raw inputs, and where
each captured row comes from (example and position).

Dataset indices are observed, never asked for: :class:`IndexRecorder` wraps the DataLoader's sampler
that Lightning is about to iterate and remembers what it yields.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_dualform._compat import replace_sampler
from lightning_dualform.record.capture import CallRows

INPUT_KEYS = ("x", "input", "inputs", "image", "images")
LABEL_KEYS = ("label", "labels", "y", "target", "targets")


class IndexRecorder:
    """Wraps a DataLoader's (batch) sampler and remembers the indices it yields, in order.

    The DataLoader may fetch ahead (workers, Lightning's prefetch), so indices wait in a FIFO until the
    training step that consumes their batch pops them. A new ``iter()`` (a new epoch) starts afresh. Each
    consumer (two callbacks on one Trainer) reads its own FIFO (:meth:`queue`).
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._queues: list[deque] = []

    def queue(self) -> deque:
        """A FIFO of its own for one more consumer; it receives every index from now on."""
        q: deque = deque()
        self._queues.append(q)
        return q

    @property
    def fifo(self) -> deque:
        """The first consumer's FIFO."""
        return self._queues[0] if self._queues else self.queue()

    def __iter__(self):
        for q in self._queues:
            q.clear()
        return self._gen()

    def _gen(self):
        for item in self._inner:
            for q in self._queues:
                q.append(item)
            yield item

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:  # batch_size, drop_last, sampler ... of the wrapped one
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)


def wrap_dataloader(dl: Any) -> IndexRecorder | None:
    """Install an index recorder on a torch DataLoader; None when it has no sampler to record.

    :func:`unwrap_dataloader` puts the original back (the loader may be the user's own object).
    """
    if not isinstance(dl, torch.utils.data.DataLoader):
        return None
    if isinstance(dl.dataset, torch.utils.data.IterableDataset):
        return None
    attr = "batch_sampler" if dl.batch_sampler is not None else "sampler"
    current = getattr(dl, attr)
    if isinstance(current, IndexRecorder):
        return current
    rec = IndexRecorder(current)
    # DataLoader forbids setting its sampler after __init__ to stop users from mixing iterators; we only
    # observe what the original sampler yields (see _compat.py).
    replace_sampler(dl, attr, rec)
    return rec


def unwrap_dataloader(dl: Any) -> None:
    for attr in ("batch_sampler", "sampler"):
        current = getattr(dl, attr, None)
        if isinstance(current, IndexRecorder):
            replace_sampler(dl, attr, current._inner)


@dataclass
class BatchInfo:
    size: int | None
    indices: torch.Tensor | None  # (B,)
    labels: torch.Tensor | None  # (B,) or (B, ...)


def batch_labels(batch: Any, label_key: str | int | None = None) -> torch.Tensor | None:
    """Integer labels of a batch: ``batch[label_key]``, a usual dict key, or the second element of a tuple."""
    cand = None
    if isinstance(batch, dict):
        keys = [label_key] if label_key is not None else LABEL_KEYS
        cand = next((batch[k] for k in keys if k in batch), None)
    elif isinstance(batch, (list, tuple)):
        pos = label_key if isinstance(label_key, int) else 1
        cand = batch[pos] if len(batch) > pos else None
    if isinstance(cand, torch.Tensor) and not cand.is_floating_point() and not cand.is_complex() and cand.dim() >= 1:
        return cand.detach().to("cpu", torch.int64)
    return None


def batch_indices(batch: Any, index_key: str | int | None) -> torch.Tensor | None:
    """Dataset indices the batch carries itself: ``batch[index_key]`` of a dict batch, or the element at
    position ``index_key`` of a tuple batch; an integer tensor (or list) with one index per example."""
    cand = None
    if isinstance(batch, dict) and isinstance(index_key, str):
        cand = batch.get(index_key)
    elif isinstance(batch, (list, tuple)) and isinstance(index_key, int) and not isinstance(index_key, bool):
        cand = batch[index_key] if -len(batch) <= index_key < len(batch) else None
    if cand is None:
        return None
    t = torch.as_tensor(cand)
    if t.is_floating_point() or t.is_complex() or t.dim() > 1:
        return None
    return t.detach().to("cpu", torch.int64).reshape(-1)


def batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size(next(iter(batch.values())))
    return None


def layer_layout(module: Any, declared: str | None = None) -> str | None:
    """How a layer's ``(B, B, ...)`` calls are laid out: ``"batch_first"`` for a convolution (its rows are
    ``(B, locations)`` whatever the user's layout), else what the user declared (``layout=``), else ``None``."""
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return "batch_first"
    return declared


def unknown_layout(call: CallRows, size: int | None, layout: str | None = None) -> bool:
    """True when a call's leading shape has the batch size in both of its first two dimensions, ``(B, B, ...)``,
    and no ``layout`` says which: batch first ``(B, T, ...)`` and sequence first ``(T, B, ...)`` with ``T == B``
    look the same, so which example a row comes from cannot be told."""
    lead = call.lead_shape
    return (len(lead) >= 2 and lead[0] == lead[1] == size and bool(size) and layout is None
            and call.geometry is None)


def unknown_layout_message(owner: str, layer: str, lead: tuple[int, ...], size: int | None) -> str:
    """What to tell the user, once per layer, when :func:`unknown_layout` holds."""
    return (f"{owner}: layer {layer!r} was called on an input of leading shape {tuple(lead)} in a batch of {size} "
            f"examples. Both of its first two dimensions equal the batch size, so it cannot be told whether it is "
            f"batch first (B, T, ...) or sequence first (T, B, ...), as nn.Transformer's default is. The rows of such "
            f"calls of {layer!r} are stored without dataset indices, labels or per-example positions (index -1): they name no "
            f"training examples (its weights are recorded as before). To keep the examples, say how the layer is laid out: "
            f"{owner}(layout='sequence_first') (or 'batch_first'; a dict {{layer name: layout}} for some layers), or use "
            f"a sequence length other than the batch size.")


def row_metadata(call: CallRows, info: BatchInfo, offset: int, with_example: bool = False,
                 layout: str | None = None) -> tuple:
    """Dataset index, position and label of every row of a call, and the positions per example
    (and, with ``with_example``, each row's example number within the batch, -1 when unknown).

    The layout is told from the call's leading shape: ``(B, ...)`` batch first, ``(T, B, ...)`` sequence first.
    ``(B, B, ...)`` fits both; ``layout`` (:func:`layer_layout`) then says which, and without it the call
    (:func:`unknown_layout`) gets index, label and example -1 and positions as for an unknown layout.
    """
    n = call.n_rows
    lead = call.lead_shape
    b = info.size
    if b and n == b and len(lead) == 1 and offset == 0 and not with_example:  # one row per example (MLPs)
        index = info.indices if info.indices is not None else torch.full((n,), -1, dtype=torch.int64)
        lab = info.labels
        label = lab if lab is not None and lab.dim() == 1 and lab.shape[0] == b else torch.full((n,), -1, dtype=torch.int64)
        return index, torch.zeros(n, dtype=torch.int32), label, 1
    rows = torch.arange(n)
    both = unknown_layout(call, b)  # (B, B, ...): the shape alone cannot tell the layout
    sequence_first = False
    if both and layout is None:  # and nothing says which: no guess
        per_ex, example, position = n, None, rows + offset
    elif b and lead and lead[0] == b and not (both and layout == "sequence_first"):  # batch first: (B, ...)
        per_ex = max(n // b, 1)
        example, position = rows // per_ex, rows % per_ex + offset
    elif b and len(lead) >= 2 and lead[1] == b:  # sequence first: (T, B, ...)
        per_ex, sequence_first = n // b, True
        example, position = rows % b, rows // b + offset
    else:
        per_ex, example, position = n, None, rows + offset
    index = info.indices[example] if (example is not None and info.indices is not None) else torch.full((n,), -1, dtype=torch.int64)
    label = torch.full((n,), -1, dtype=torch.int64)
    if info.labels is not None and example is not None:
        lab = info.labels
        if lab.dim() == 1 and lab.shape[0] == b:
            label = lab[example]
        elif both:
            pass  # per-position labels (B, B): (B, T) or (T, B) cannot be told, whatever the layer's layout: -1
        elif sequence_first and tuple(lab.shape) == (lead[1], lead[0]):  # the batch's (B, T) labels of (T, B) rows
            label = lab.t().reshape(-1)
        elif tuple(lab.shape) == tuple(lead):
            label = lab.reshape(-1)
    if with_example:
        ex = example if example is not None else torch.full((n,), -1, dtype=torch.int64)
        return index, position.to(torch.int32), label, per_ex, ex
    return index, position.to(torch.int32), label, per_ex


def batch_inputs(batch: Any, key: str | int | None) -> torch.Tensor | None:
    """The raw model input of a batch: ``batch[key]``, else the first tensor of a tuple or a usual dict key."""
    cand = None
    if isinstance(batch, torch.Tensor):
        cand = batch
    elif isinstance(batch, dict):
        keys = [key] if key is not None else INPUT_KEYS
        cand = next((batch[k] for k in keys if k in batch), None)
    elif isinstance(batch, (list, tuple)) and batch:
        cand = batch[key if isinstance(key, int) else 0]
    if isinstance(cand, torch.Tensor) and cand.dim() >= 1 and not cand.is_complex():
        return cand
    return None


def prediction(outputs: Any, last_output: torch.Tensor | None, n: int) -> np.ndarray:
    """Predicted class per example: from the step's output (logits, or a dict with them), else the
    argmax of the last tracked layer's output; -1 when neither is a (n, classes) tensor."""
    cand = outputs
    if isinstance(outputs, dict):
        cand = next((outputs[k] for k in ("preds", "prediction", "predictions", "logits") if k in outputs), None)
    for t in (cand, last_output):
        if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n:  # (a scalar loss is no prediction)
            if t.dim() == 1 and not t.is_floating_point():
                return t.cpu().numpy()
            if t.dim() == 2 and t.shape[1] > 1:
                return t.argmax(1).cpu().numpy()
    return np.full(n, -1)


def duplicates(idx: np.ndarray) -> np.ndarray:
    """True for every repeat of an index within one batch (keep the first)."""
    dup = np.ones(len(idx), dtype=bool)
    dup[np.unique(idx, return_index=True)[1]] = False
    return dup


class FirstSeen:
    """The dataset indices seen so far, to store each example's raw input once (not once per epoch)."""

    def __init__(self, seen: np.ndarray | None = None) -> None:
        idx = np.asarray(seen if seen is not None else [], dtype=np.int64)
        self._seen = np.zeros(int(idx.max()) + 1 if len(idx) else 0, dtype=bool)
        self._seen[idx] = True

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Mark ``idx`` (non-negative) seen; True where an entry is seen for the first time (a repeat within
        ``idx`` counts once: its first place)."""
        if len(idx) and idx.max() >= len(self._seen):
            grown = np.zeros(max(int(idx.max()) + 1, 2 * len(self._seen)), dtype=bool)
            grown[: len(self._seen)] = self._seen
            self._seen = grown
        new = ~self._seen[idx]
        new &= ~duplicates(idx)
        self._seen[idx[new]] = True
        return new
