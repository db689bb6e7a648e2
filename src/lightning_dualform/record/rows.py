"""A step's rows, from the module hooks' calls to what the store takes: pure functions of tensors.

:func:`take_rows` collects each layer's completed calls with every row's metadata; :func:`gather_rows` makes one
tensor per column and layer, already in the stored dtype (one pass: the copy is the conversion); a device's rows
go to pinned host memory (:func:`to_pinned`) and :func:`step_rows` makes them the store's
:class:`~lightning_dualform.store.format.StepRows` on the writer thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_dualform.layers import pixels_of
from lightning_dualform.record.batches import (
    BatchInfo,
    layer_layout,
    row_metadata,
    unknown_layout,
    unknown_layout_message,
)
from lightning_dualform.record.capture import CallRows, LayerCapture
from lightning_dualform.store.format import StepRows

#: a layer's completed calls since the last step: ``(call, index, position, label)`` per call
Pending = dict[str, list[tuple[CallRows, torch.Tensor, torch.Tensor, torch.Tensor]]]


def take_rows(captures: dict[str, LayerCapture], warn_once: Callable[[str, str], None] | None = None,
              owner: str = "lightning-dualform", layouts: Callable[[str], str | None] | None = None) -> Pending:
    """The completed calls of every layer since the last step, with each row's index, position and label (rows
    whose gradient never reaches the weight, such as an embedding's ``padding_idx``, left out).

    A call whose layout cannot be told, ``(B, B, ...)`` (:func:`~lightning_dualform.record.batches.unknown_layout`),
    gets index and label -1 unless ``layouts(name)`` declares the layer's layout; ``warn_once(key, message)`` is
    then told, with one key per layer.
    """
    pending: Pending = {}
    for name, cap in captures.items():
        offsets: dict[int, int] = {}  # per batch: positions already used by earlier calls of this layer
        layout = layer_layout(cap.module, layouts(name) if layouts is not None else None)
        for call in cap.take_completed():
            info = call.batch if call.batch is not None else BatchInfo(size=None, indices=None, labels=None)
            offset = offsets.get(id(info), 0)
            index, position, label, per_ex = row_metadata(call, info, offset, layout=layout)
            if warn_once is not None and len(call.lead_shape) > 1 and unknown_layout(call, info.size, layout):
                warn_once(f"unknown-layout:{name}", unknown_layout_message(owner, name, call.lead_shape, info.size))
            offsets[id(info)] = offset + per_ex
            if call.keep is not None:  # rows whose gradient never reaches the weight
                keep = call.keep
                call.keys, call.values = call.keys[keep], call.values[keep]
                index, position, label = index[keep.cpu()], position[keep.cpu()], label[keep.cpu()]
            pending.setdefault(name, []).append((call, index, position, label))
    return pending


def gather_rows(parts: list[tuple[CallRows, torch.Tensor, torch.Tensor, torch.Tensor]],
                row_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """One (keys, values, index, position, label) tuple per layer and step. Keys and values are fresh
    copies, already in the stored dtype (one pass: the copy is the conversion)."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():  # token ids (embeddings) stay integers
            return t.long()
        # keys under autocast are bf16 copies: widen to float32 first, so that float16 storage rounds once
        return t.to(torch.float32).to(row_dtype) if t.dtype != torch.float32 else t.to(row_dtype)

    def gather(ts: list[torch.Tensor], private: bool) -> torch.Tensor:
        out = torch.cat([convert(t) for t in ts]) if len(ts) > 1 else convert(ts[0])
        if not private and any(out.data_ptr() == t.data_ptr() for t in ts):
            out = out.clone()  # the caller's tensor: copy it before training goes on
        return out.view(torch.int16) if out.dtype == torch.bfloat16 else out

    # Activations and gradients are autograd's own tensors, never written to again: the writer thread
    # copies them into its buffers, off the training thread. Keys straight from the batch are copied here.
    geom = parts[0][0].geometry
    if geom is not None:
        # a convolution's maps as channel-last pixel rows, and its metadata once per (example, call): the rows
        # of one map are its output locations, so the first location's entries describe the map
        keys = gather([pixels_of(p[0].keys) for p in parts], all(p[0].private_keys for p in parts))
        every = geom.locations
        index = torch.cat([p[1][::every] for p in parts])
        position = torch.cat([p[2][::every] for p in parts])
        label = torch.cat([p[3][::every] for p in parts])
    else:
        keys = gather([p[0].keys for p in parts], all(p[0].private_keys for p in parts))
        index = torch.cat([p[1] for p in parts])
        position = torch.cat([p[2] for p in parts])
        label = torch.cat([p[3] for p in parts])
    values = gather([p[0].values for p in parts], True)
    return keys, values, index, position, label


def stored_floats(t: torch.Tensor, row_dtype: str) -> torch.Tensor:
    """Rows as :func:`gather_rows` hands them to the writer, as float32 (token ids stay integers)."""
    if not t.is_floating_point() and row_dtype == "bfloat16" and t.dtype == torch.int16:
        return t.view(torch.bfloat16).float()
    return t.float() if t.is_floating_point() else t


def to_pinned(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def step_rows(rows: dict, event: Any, sizes: dict[str, tuple[int, ...]], step: int, epoch: int) -> dict[str, StepRows]:
    """One step's rows as the store takes them (runs on the writer thread: a device's copy to pinned host memory
    is waited for there)."""
    if event is not None:
        event.synchronize()
    return {
        name: StepRows(keys=k.numpy(), values=v.numpy(), index=i.numpy(), position=p.numpy(), label=lab.numpy(),
                       step=step, epoch=epoch, map_size=sizes.get(name))
        for name, (k, v, i, p, lab) in rows.items()
    }
