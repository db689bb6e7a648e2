"""Query recording: during ``trainer.test/validate/predict`` (after fit), store each tracked layer's input
rows for every query example, with its dataset index, label, the model's prediction and raw input.

The rows go into ``/queries/<split>`` of the finished store (:class:`~lightning_dualform.store.QueryWriter`),
as one all-or-nothing write session under the store's writer lock: :meth:`QueryRecorder.close` commits the
split when the stage ends; :meth:`QueryRecorder.abort` (call it when the stage fails), a full disk or a kill
leave the store as it was before the stage began.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lightning_dualform._unwrap import named_modules
from lightning_dualform.layers import first_other_layer, layer_shape, one_hot_keys
from lightning_dualform.record.batches import (
    BatchInfo,
    layer_layout,
    batch_size,
    prediction,
    row_metadata,
    unknown_layout,
    unknown_layout_message,
)
from lightning_dualform.record.capture import LayerCapture
from lightning_dualform.store.query_writer import QueryWriter
from lightning_dualform.store.reader import StoreReader


class QueryRecorder:
    """Hooks every layer of a store on a model and writes what they see, batch by batch."""

    def __init__(self, writer: QueryWriter, split: str, path: str, captures: dict[str, LayerCapture],
                 layouts: Callable[[str], str | None] = lambda name: None) -> None:
        self.writer = writer
        self.layouts = layouts  # the layout declared per layer (``layout=``), for calls of shape (B, B, ...)
        self.split = split
        self.path = path
        self.captures = captures
        self.active = False
        self.batch: BatchInfo | None = None
        self.raw: torch.Tensor | None = None
        self.started = time.perf_counter()
        self.warned: set[str] = set()  # layers told that their layout cannot be told

    @classmethod
    def start(cls, path: str, split: str, model: nn.Module,
              layouts: Callable[[str], str | None] = lambda name: None) -> "QueryRecorder":
        """Open the store's query set ``split`` (replacing an older one) and hook the model's layers
        (``layouts(name)``: a layer's declared layout, as the fit had it).

        Raises:
            FileNotFoundError: there is no store yet.
            ValueError: the store's layers are not in this model.
        """
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"DualFormCallback(record_queries=...): {path} does not exist; run trainer.fit with this callback "
                "first (queries are stored beside the training memory)."
            )
        modules = named_modules(model)
        with StoreReader(path) as store:
            names = store.layers
            missing = [n for n in names if n not in modules]
            if missing:
                raise ValueError(f"DualFormCallback: the store's layers {missing} are not in this model.")
            widths = {n: store.layer(n).d_in for n in names}
            after_step = store.last_step
            # the model the queries go through must be the store's (trainer.test(ckpt_path=...) loads another)
            other = first_other_layer(store, modules, names)
        if other is not None:
            name, pname, err = other
            warnings.warn(f"DualFormCallback(record_queries=...): the {split} queries go through a model whose {name}."
                          f"{pname} differs from the store's final weights (relative error {err:.2e}), such as one "
                          "trainer.test(ckpt_path=...) loaded from another checkpoint: they are recorded, marked as "
                          "another model's (readers refuse them as stale).", UserWarning, stacklevel=3)
        rec = cls(QueryWriter(path, split, widths, after_step, other_model=other is not None), split, path, {}, layouts)
        for name in names:
            cap = LayerCapture(name, modules[name], lambda: rec.active, need_grad=False, keep_output=name == names[-1])
            cap.attach()
            rec.captures[name] = cap
        return rec

    def batch_start(self, batch: Any, indices: torch.Tensor | None, labels: torch.Tensor | None, raw: torch.Tensor | None) -> None:
        size = len(indices) if indices is not None else (labels.shape[0] if labels is not None else batch_size(batch))
        self.batch = BatchInfo(size=size, indices=indices, labels=labels)
        self.raw = raw
        for cap in self.captures.values():
            cap.calls.clear()
        self.active = True

    def batch_end(self, outputs: Any) -> None:
        if self.batch is None:
            return
        self.active = False
        info = self.batch
        rows = {}
        last_output = None
        for name, cap in self.captures.items():
            offset, parts = 0, []
            layout = layer_layout(cap.module, self.layouts(name))
            for call in cap.calls:
                _, position, row_label, per_ex, example = row_metadata(call, info, offset, with_example=True,
                                                                       layout=layout)
                if name not in self.warned and unknown_layout(call, info.size, layout):  # example -1: left out
                    self.warned.add(name)
                    said = unknown_layout_message("DualFormCallback", name, call.lead_shape, info.size)
                    warnings.warn(said + " In a query set such rows are left out: each must name its query.",
                                  UserWarning, stacklevel=2)
                offset += per_ex
                keys = call.keys if call.keys.is_floating_point() else one_hot_keys(call.keys, layer_shape(cap.module)[0])
                known = example >= 0  # (rows whose query cannot be told would name another batch's query)
                parts.append((keys.float().cpu()[known], example[known], position[known], row_label[known]))
                if call.output is not None:
                    last_output = call.output
            cap.calls.clear()
            if parts:
                rows[name] = tuple(torch.cat([p[i] for p in parts]).numpy() for i in range(4))
        n = info.size or 0
        index = info.indices.numpy() if info.indices is not None else np.full(n, -1)
        label = info.labels.reshape(n, -1)[:, 0].numpy() if info.labels is not None and info.labels.shape[0] == n else np.full(n, -1)
        pred = prediction(outputs, last_output, n)
        raw = self.raw.detach().cpu().numpy() if self.raw is not None and self.raw.shape[0] == n else None
        self.writer.add_batch(index, label, pred, raw, rows)
        self.batch = None

    def close(self) -> str:
        """The stage ended: detach the hooks and commit the query set. Returns what to tell the user (the
        adapter says it when the stage's progress bar is done)."""
        self.active = False
        for cap in self.captures.values():
            cap.detach()
        n = self.writer.n
        t0 = time.perf_counter()
        self.writer.close()
        now = time.perf_counter()
        return (f"recorded {n} {self.split} queries into {self.path} in {now - self.started:.1f} s "
                f"(committed in {now - t0:.1f} s).")

    def abort(self) -> None:
        """The stage failed: detach the hooks and leave the store as it was before it began (no partial split)."""
        self.active = False
        for cap in self.captures.values():
            cap.detach()
        self.writer.abort()
