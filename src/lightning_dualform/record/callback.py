"""``DualFormCallback``: records the dual form of a Lightning model's linear layers while it trains.

This module holds Lightning hooks only. Capturing rows is :mod:`~lightning_dualform.record.capture`, the
update rule is :mod:`~lightning_dualform.optim`, the file is :mod:`~lightning_dualform.store` behind the
:mod:`~lightning_dualform.store.background` thread, and the certificate is :mod:`~lightning_dualform.attend.certificate`.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
import numpy as np
from torch import nn
from typing_extensions import override

from lightning_dualform._version import __version__
from lightning_dualform.record.batches import (
    BatchInfo,
    IndexRecorder,
    batch_inputs,
    batch_labels,
    batch_size,
    duplicates,
    row_metadata,
    unwrap_dataloader,
    wrap_dataloader,
)
from lightning_dualform.record.capture import (
    CallRows,
    LayerCapture,
    find_layers,
    layer_kind,
    layer_shape,
    project_keys,
    weight_matrix,
)
from lightning_dualform.attend.certificate import FLOAT32_PRODUCTS_TOLERANCE, certify_store
from lightning_dualform.errors import DiskSpaceError, InexactError
from lightning_dualform._float32_products import float32_mode, loosest
from lightning_dualform.optim import ParamUpdate
from lightning_dualform.record.planner import Plan, estimate, free_bytes
from lightning_dualform.record.queries import QueryRecorder
from lightning_dualform.store.filters import compression_kwargs
from lightning_dualform.store.format import ROW_DTYPES, LayerSpec, StepRows, settings_of
from lightning_dualform.store.shards import write_shard_index
from lightning_dualform.store.writer import StoreWriter
from lightning_dualform.store.background import AsyncWriter

log = logging.getLogger(__name__)

_QUERY_STAGES = ("test", "validate", "predict")
#: The gradient check's tolerance (relative to |W.grad| |r|) by training precision, and by how float32
#: products are rounded (TF32 keeps float16's 10 mantissa bits, bfloat16 8).
_SKETCH_TOLERANCE = {"bf16-mixed": 2e-2, "16-mixed": 5e-3}
_SKETCH_TOLERANCE_BY_PRODUCTS = {"tf32": 5e-3, "bf16": 2e-2}
#: Training held back by the writer for this share of the time since the store opened (and at least
#: _SLOW_WRITER_MIN_S in all) is worth a warning: the store's settings cost more than the rows are worth.
_SLOW_WRITER_SHARE = 0.2
_SLOW_WRITER_MIN_S = 2.0
_PACE_CHECK_EVERY = 64  # optimizer steps


def rank_path(path: str, rank: int, world_size: int) -> str:
    """The file a global rank writes: ``path`` itself alone, ``name.rank{r}.h5`` under DDP."""
    if world_size <= 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.h5'}"


class DualFormCallback(Callback):
    """Record every tracked layer's training keys and values into an HDF5 store.

    With plain SGD (any momentum, dampening, Nesterov, weight decay, ``maximize``, schedules, param
    groups, norm clipping, gradient accumulation, DDP) the store rebuilds each tracked layer exactly::

        W_T x = a W_0 x + sum_rows c_step(row) * v_row * (k_row . x)

    Args:
        path: the store to write (``.h5``). Under DDP each rank writes ``name.rank{r}.h5``.
        layers: ``None`` tracks every ``nn.Linear`` of the LightningModule; a list of
            ``named_modules()`` names, or a predicate ``(name, module) -> bool``, narrows it.
        dtype: stored row type: ``"float32"`` (exact), ``"float16"`` or ``"bfloat16"`` (half the disk,
            about 1e-3 / 1e-2 relative error in rebuilt outputs).
        compression: ``None``, ``"lzf"``, ``"gzip"``, ``"gzip-N"``; ``"lz4"``, ``"zstd"``, ``"blosc-zstd"``
            with the optional ``hdf5plugin``. Lossless, but written through HDF5's filter pipeline on one
            thread: slower than fast training produces rows (lzf made an H200 fit 8x slower,
            ``docs/benchmarks.md``). Training that waits on the writer gets a warning.
        chunk_rows: rows per HDF5 chunk of keys and values; ``None`` sizes chunks to about 512 KiB per layer.
        exact: ``True`` refuses runs that the dual form cannot rebuild exactly (Adam and any non-SGD
            optimizer, value clipping, custom clipping). ``False`` records them anyway and stores the
            residual between the real weights and the memory's rebuild.
        overwrite: replace an existing file at ``path`` (otherwise an existing file is an error).
        index_key: for an ``IterableDataset`` (no sampler to observe), the key of a dict batch that holds
            each example's dataset index.
        label_key: key (dict batch) or position (tuple batch) of the labels; default: ``"label"``,
            ``"labels"``, ``"y"``, ``"target"``, ``"targets"``, or the second element of a tuple batch
            when it is an integer tensor.
        max_queue: optimizer steps that may wait for the writer before training blocks.
        certify: compute the exactness certificate at fit end (reads the store once).
        record_queries: stages whose inputs are stored as queries: any of ``"test"``, ``"validate"``,
            ``"predict"`` (during ``trainer.test/validate/predict`` after fit, into the same store).
        store_inputs: store each training example's raw input once (for pictures of what a query attends to).
        input_key: key (dict batch) or position (tuple batch) of the raw input; default: ``"x"``,
            ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, or the first element of a tuple batch.
        commit_seconds: the writer makes rows durable at least this often (and at every epoch end and checkpoint).
        check_every: the captured rows of each layer are checked against the gradient autograd accumulated in
            its weight (a cheap random projection of ``W.grad = sum v k^T``) on the first 20 steps of a fit and
            then every ``check_every`` steps; ``1`` checks every step.
        check_disk: after the first step, estimate the store's size for the whole run (printed) and refuse to
            go on when it exceeds the free space of the target disk.

    Example::

        trainer = L.Trainer(callbacks=[DualFormCallback("runs/mnist.h5")], max_epochs=5)
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        path: str | os.PathLike = "dualform.h5",
        layers: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
        *,
        dtype: str = "float32",
        compression: str | None = None,
        chunk_rows: int | None = None,
        exact: bool = True,
        overwrite: bool = False,
        index_key: str = "index",
        label_key: str | int | None = None,
        max_queue: int = 32,
        certify: bool = True,
        record_queries: Sequence[str] = (),
        store_inputs: bool = True,
        input_key: str | int | None = None,
        commit_seconds: float = 30.0,
        check_disk: bool = True,
        check_every: int = 50,
    ) -> None:
        if dtype not in ROW_DTYPES:
            raise ValueError(f"`DualFormCallback(dtype={dtype!r})` is not supported. Expected one of {ROW_DTYPES}.")
        compression_kwargs(compression)  # validates, and checks that hdf5plugin is there when needed
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"`DualFormCallback(chunk_rows={chunk_rows!r})` must be None or a positive integer.")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"`DualFormCallback(check_every={check_every!r})` must be a positive integer.")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"`DualFormCallback(max_queue={max_queue!r})` must be a positive integer.")
        bad_stages = [q for q in record_queries if q not in _QUERY_STAGES]
        if isinstance(record_queries, str) or bad_stages:
            raise ValueError(
                f"`DualFormCallback(record_queries={record_queries!r})`: expected a tuple of {tuple(_QUERY_STAGES)}."
            )
        if layers is not None and not callable(layers) and not isinstance(layers, (list, tuple)):
            raise TypeError(
                f"`DualFormCallback(layers={layers!r})`: expected None, a list of module names, or a predicate."
            )
        self.path = os.fspath(path)
        self.layer_selection = list(layers) if isinstance(layers, (list, tuple)) else layers
        self.dtype = dtype
        self.compression = compression
        self.chunk_rows = chunk_rows
        self.exact = exact
        self.overwrite = overwrite
        self.index_key = index_key
        self.label_key = label_key
        self.max_queue = max_queue
        self.certify = certify
        self.record_queries = tuple(record_queries)
        self.store_inputs = store_inputs
        self.input_key = input_key
        self.commit_seconds = commit_seconds
        self.check_disk = check_disk
        self.check_every = check_every
        self._steps_seen = 0
        self._last_epoch: int | None = None
        self.plan: Plan | None = None
        self._torch_row_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]

        self.store_path: str | None = None
        self.certificate: dict[str, dict[str, float]] = {}
        self._captures: dict[str, LayerCapture] = {}
        self._writer: AsyncWriter | None = None
        self._active = False
        self._recorders: dict[int, IndexRecorder] = {}
        self._wrapped: list[Any] = []
        self._orig_process_dataloader: Callable | None = None
        self._clip_plugin: Any = None  # the precision plugin whose norm clipping reports its factor to us
        self._deferred: _PendingStep | None = None  # a step waiting for its clip factor
        self._batch: BatchInfo | None = None
        self._step_rows: dict[str, list[tuple[CallRows, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._param_groups: dict[str, tuple[int | None, int | None]] = {}
        self._probes: dict[str, torch.Tensor] = {}
        self._dropped: dict[str, str] = {}
        self._inexact: dict[str, str] = {}
        self._float32_products = "ieee"  # how the tracked layers' float32 products are rounded (at fit start)
        self._warned: set[str] = set()
        self._optimizer: torch.optim.Optimizer | None = None
        self._grad_world_scale = 1.0
        self._chosen: dict[str, nn.Module] = {}
        self._resume: dict[str, Any] | None = None
        self._committed: dict[str, Any] | None = None
        self._seen_inputs = np.zeros(0, dtype=bool)
        self._query: QueryRecorder | None = None
        self._batch_input_bytes = 0
        self._dataset_size = 0

    # ------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" and stage not in self.record_queries:
            return
        strategy = trainer.strategy
        original = strategy.process_dataloader
        self._orig_process_dataloader = original

        def process_dataloader(dataloader: object) -> object:
            # The last place a DataLoader passes through before Lightning iterates it (after any
            # DistributedSampler is injected): observe its sampler here.
            dataloader = original(dataloader)
            rec = wrap_dataloader(dataloader)
            if rec is not None:
                self._recorders[id(dataloader)] = rec
                self._wrapped.append(dataloader)
            return dataloader

        strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
        if stage == "fit":
            self._report_clipping(trainer)

    def _report_clipping(self, trainer: "pl.Trainer") -> None:
        """Let Lightning's own norm clipping tell us its factor (it runs right after our
        ``on_before_optimizer_step``), instead of computing the same gradient norm twice (0.5 ms a step
        for a 1.3 M-parameter MLP on a CPU). Only where the plugin clips as Lightning's base class does."""
        from lightning.pytorch.plugins.precision import Precision

        plugin = trainer.precision_plugin
        if type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm:
            return  # a plugin with its own norm clipping: the factor is computed in our hook instead
        if "clip_grad_by_norm" in vars(plugin):
            return  # already overridden (another DualFormCallback): compute the factor in our hook

        def clip_grad_by_norm(optimizer: torch.optim.Optimizer, clip_val: float) -> None:
            # Lightning's Precision.clip_grad_by_norm, keeping the norm it returns
            total = torch.nn.utils.clip_grad_norm_(plugin.main_params(optimizer), clip_val)
            self._submit_deferred(_clip_coefficient(total, clip_val))

        plugin.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]
        self._clip_plugin = plugin

    @override
    def state_dict(self) -> dict[str, Any]:
        # Called while a checkpoint is written: make every row so far durable and remember the counts,
        # so that a resume truncates the store back to exactly this point.
        if self._writer is not None:
            if self._deferred is not None:  # saved between our hook and the clipping: the factor from here
                self._submit_deferred(self._clip_factor(self._deferred.trainer, self._deferred.optimizer))
            self._committed = self._writer.call_result(self._writer.store.commit)
        if self._committed is None:
            return {}
        return {"format_version": 1, "store_path": self.store_path, **self._committed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict.get("rows") is not None else None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_run(trainer, pl_module)
        chosen, notes = find_layers(pl_module, self.layer_selection)
        if not chosen:
            raise ValueError(
                "DualFormCallback found no layer to track: the model has no trainable nn.Linear"
                + (" matching `layers`." if self.layer_selection is not None else ".")
            )
        self._map_params(trainer, chosen, notes)
        for note in notes:
            rank_zero_info(f"DualFormCallback: {note}")
        self._chosen = chosen
        self._note_float32_products(trainer, chosen)
        self.store_path = rank_path(self.path, trainer.global_rank, trainer.world_size)
        if os.path.exists(self.store_path) and not self.overwrite and self._resume is None:
            raise FileExistsError(
                f"DualFormCallback: {self.store_path} already exists. Choose another path, delete it, pass "
                "`DualFormCallback(..., overwrite=True)` to replace it, or resume the run that wrote it with "
                "`trainer.fit(..., ckpt_path=...)` to continue it."
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Hooks go on now; the store opens at the first batch, once optimizer state and global step are
        # restored (a resume) and the input shape is known.
        gen = torch.Generator().manual_seed(0)
        for name, module in self._chosen.items():
            cap = LayerCapture(name, module, lambda: self._active)
            cap.attach()
            self._captures[name] = cap
            self._probes[name] = torch.randn(layer_shape(module)[0], generator=gen).to(module.weight.device)

    def _open_store(self, trainer: "pl.Trainer", batch: Any) -> None:
        specs = [self._layer_spec(name, m) for name, m in self._chosen.items()]
        settings = settings_of(specs, self.dtype, self.compression)
        raw = batch_inputs(batch, self.input_key) if self.store_inputs else None
        resume = self._resume if (self._resume and os.path.exists(self.store_path) and not self.overwrite) else None
        if self._resume and resume is None and not self.overwrite:
            raise FileNotFoundError(
                f"DualFormCallback: resuming from a checkpoint that recorded into {self.store_path}, but that file "
                "is gone. Restore it, or pass `overwrite=True` (or another path) to start a new store from this step."
            )
        if resume is not None:
            make = lambda: StoreWriter.resume(  # noqa: E731
                self.store_path, settings, resume["rows"], int(resume["steps"]), resume.get("inputs"),
                last_step=int(trainer.global_step) - 1, commit_seconds=self.commit_seconds,
                update_attrs=self._resumed_attrs,
            )
        else:
            attrs = self._run_attrs(trainer, trainer.lightning_module)
            if os.path.exists(self.store_path):
                os.remove(self.store_path)  # overwrite=True was given (checked at fit start)
            make = lambda: StoreWriter.create(  # noqa: E731
                self.store_path, specs, row_dtype=self.dtype, compression=self.compression,
                chunk_rows=self.chunk_rows, attrs=attrs, commit_seconds=self.commit_seconds,
                input_shape=tuple(raw.shape[1:]) if raw is not None else None,
                input_dtype=str(raw.dtype).replace("torch.", "") if raw is not None else "float32",
            )
        self._batch_input_bytes = int(raw[0].numel() * raw.element_size()) if raw is not None and len(raw) else 0
        dl = trainer.train_dataloader
        try:
            self._dataset_size = len(dl.dataset)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            self._dataset_size = 0
        self._writer = AsyncWriter(make, max_queue=self.max_queue)
        if trainer.world_size > 1 and trainer.global_rank == 0:
            # the index exists from the first step on, so a crashed or running DDP store opens as one
            write_shard_index(self.path, [rank_path(self.path, r, trainer.world_size) for r in range(trainer.world_size)])
        seen = self._writer.store.input_indices()
        self._seen_inputs = np.zeros(int(seen.max()) + 1 if len(seen) else 0, dtype=bool)
        self._seen_inputs[seen] = True
        width = sum(s.d_in + s.d_out for s in specs) * (4 if self.dtype == "float32" else 2)
        verb = f"continuing at step {trainer.global_step}" if resume else "recording"
        rank_zero_info(
            f"DualFormCallback: {verb} {len(specs)} layer(s) {list(self._chosen)} into {self.store_path} "
            f"({self.dtype}, compression={self.compression}); about {width / 1024:.1f} KiB per training example "
            "and position, per epoch."
        )

    def _check_run(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Refuse (or, with ``exact=False``, note) what breaks the sum-of-outer-products form."""
        problems: list[str] = []
        if not pl_module.automatic_optimization:
            problems.append("manual optimization (the callback cannot see how steps combine gradients)")
        if len(trainer.optimizers) != 1:
            problems.append(f"{len(trainer.optimizers)} optimizers (exactly one is supported)")
        for opt in trainer.optimizers:
            if type(opt) is not torch.optim.SGD:
                problems.append(
                    f"{type(opt).__name__}: its per-element update is not a scalar times the gradient, so the "
                    "trained weights are not a sum of training outer products"
                )
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            problems.append('gradient_clip_algorithm="value" (clips each element separately)')
        if is_overridden("configure_gradient_clipping", pl_module):
            problems.append("a custom configure_gradient_clipping (its scaling cannot be recorded)")
        if str(trainer.precision) not in ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed"):
            problems.append(f"precision={trainer.precision!r} (weights themselves are rounded at every update)")
        name = type(trainer.strategy).__name__
        if name not in ("SingleDeviceStrategy", "DDPStrategy"):
            problems.append(f"strategy {name} (only single-device and DDP are supported)")
        if problems and self.exact:
            raise InexactError(
                "DualFormCallback cannot record this run exactly: " + "; ".join(problems) + ". Use "
                "torch.optim.SGD (momentum, Nesterov, weight decay, schedules and norm clipping are all exact), "
                "or pass `DualFormCallback(..., exact=False)` to record anyway: the store then keeps the residual "
                "the memory does not explain, and every answer reports it."
            )
        self._sketch_tolerance = _SKETCH_TOLERANCE.get(str(trainer.precision), 1e-3)
        self._optimizer_exact = not problems
        self._problems = problems
        if problems:
            rank_zero_warn("DualFormCallback(exact=False): recording an inexact run: " + "; ".join(problems))
        from lightning.pytorch.strategies import DDPStrategy

        self._grad_world_scale = 1.0 / trainer.world_size if isinstance(trainer.strategy, DDPStrategy) else 1.0

    def _map_params(self, trainer: "pl.Trainer", chosen: dict[str, nn.Module], notes: list[str]) -> None:
        # Group *numbers*, not the group dicts: restoring a checkpoint replaces the dicts (and a scheduler
        # then changes the new ones), so each step reads optimizer.param_groups[i] afresh.
        groups: dict[int, int] = {}
        self._optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if self._optimizer is not None:
            for i, g in enumerate(self._optimizer.param_groups):
                for p in g["params"]:
                    groups[id(p)] = i
        for name, m in chosen.items():
            wi = groups.get(id(m.weight))
            bi = groups.get(id(_bias(m))) if _bias(m) is not None else None
            if wi is None:
                notes.append(f"{name}.weight is in no optimizer param group: it never changes (W_T = W_0).")
            self._param_groups[name] = (wi, bi)

    def _layer_spec(self, name: str, m: nn.Module) -> LayerSpec:
        d_in, d_out, extra = layer_shape(m)
        w = weight_matrix(m).float().cpu().numpy()
        b = _bias(m).detach().float().cpu().numpy() if _bias(m) is not None else None
        state = self._optimizer.state if self._optimizer is not None else {}

        def buffer(p: torch.Tensor | None, is_weight: bool) -> np.ndarray | None:
            buf = state.get(p, {}).get("momentum_buffer") if p is not None else None
            if buf is None:
                return None
            return (weight_matrix(m, buf) if is_weight else buf.detach()).float().cpu().numpy()

        return LayerSpec(name=name, kind=layer_kind(m), d_in=d_in, d_out=d_out, has_bias=b is not None,
                         weight_init=w, bias_init=b, extra=extra, weight_buffer_init=buffer(m.weight, True),
                         bias_buffer_init=buffer(_bias(m), False))

    def _note_float32_products(self, trainer: "pl.Trainer", chosen: dict[str, nn.Module]) -> None:
        """How the tracked layers' float32 products are rounded (TF32, bf16): the rows then rebuild each
        step's gradient only to that rounding, so the checks' tolerances widen and the store records it."""
        if str(trainer.precision) in ("64-true", "64"):
            self._float32_products = "ieee"  # float64 products are never rounded so
            return
        device = trainer.strategy.root_device
        conv = any(layer_kind(m).startswith("conv") for m in chosen.values())
        mode = float32_mode(device, conv=conv)
        self._float32_products = mode
        if mode == "ieee":
            return
        self._sketch_tolerance = max(self._sketch_tolerance, _SKETCH_TOLERANCE_BY_PRODUCTS.get(mode, 2e-2))
        if str(trainer.precision) in ("32-true", "32"):
            causes = ("torch.set_float32_matmul_precision('high'/'medium'), or cuDNN's TF32 convolutions"
                      if device.type == "cuda" else "torch.set_float32_matmul_precision('medium') or oneDNN's settings")
            rank_zero_warn(
                f"DualFormCallback: float32 products on {device.type} are rounded to {mode} ({causes}), so each "
                "step's weight gradient carries that rounding and the store rebuilds the layers only to about "
                f"it: the certificate's tolerance is {FLOAT32_PRODUCTS_TOLERANCE.get(mode, 5e-2):.0e}. For a "
                "float32-exact record, train with torch.set_float32_matmul_precision('highest')"
                + (" and torch.backends.cudnn.allow_tf32 = False." if conv and device.type == "cuda" else ".")
            )

    def _resumed_attrs(self, stored: Any) -> dict[str, Any]:
        """The rows before the checkpoint keep the rounding they were made with: the store's mode is the
        loosest of its runs' (written when the resume starts, so a crash after it keeps it too)."""
        before = str(stored.get("float32_products", "ieee"))
        self._float32_products = loosest([before, self._float32_products])
        return {"float32_products": self._float32_products}

    def _run_attrs(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
        import lightning

        opt = trainer.optimizers[0] if trainer.optimizers else None
        opt_info: dict[str, Any] = {"name": type(opt).__name__ if opt else None, "param_groups": []}
        if opt is not None:
            for g in opt.param_groups:
                opt_info["param_groups"].append(
                    {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool) else v)
                     for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str, torch.Tensor))}
                )
        return {
            "library_version": __version__,
            "torch_version": torch.__version__,
            "lightning_version": lightning.__version__,
            "model_class": type(pl_module).__name__,
            "optimizer": opt_info,
            "optimizer_exact": self._optimizer_exact,
            "inexact_causes": self._problems,
            "gradient_clip_val": float(trainer.gradient_clip_val or 0.0),
            "gradient_clip_algorithm": str(trainer.gradient_clip_algorithm or "norm"),
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
            "precision": str(trainer.precision),
            "float32_products": self._float32_products,
            "rank": int(trainer.global_rank),
            "world_size": int(trainer.world_size),
        }

    # ------------------------------------------------------------------------------------------------
    # per batch
    # ------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if not self._captures:
            return
        if self._writer is None:
            self._open_store(trainer, batch)
        indices = self._batch_indices(trainer, trainer.train_dataloader, batch)
        if self.store_inputs and indices is not None:
            self._record_inputs(batch, indices)
        labels = batch_labels(batch, self.label_key)
        size = len(indices) if indices is not None else (labels.shape[0] if labels is not None else batch_size(batch))
        self._batch = BatchInfo(size=size, indices=indices, labels=labels)
        for cap in self._captures.values():
            cap.calls.clear()
        self._active = True

    def _record_inputs(self, batch: Any, indices: torch.Tensor) -> None:
        """Queue the raw inputs of examples not stored yet (each example once, not once per epoch)."""
        raw = batch_inputs(batch, self.input_key)
        if raw is None or raw.shape[0] != len(indices):
            return
        idx = indices.numpy()
        if len(idx) and idx.max() >= len(self._seen_inputs):
            grown = np.zeros(max(int(idx.max()) + 1, 2 * len(self._seen_inputs)), dtype=bool)
            grown[: len(self._seen_inputs)] = self._seen_inputs
            self._seen_inputs = grown
        new = ~self._seen_inputs[idx]
        new &= ~duplicates(idx)
        if not new.any():
            return
        self._seen_inputs[idx[new]] = True
        data = raw.detach()[torch.from_numpy(new).to(raw.device)].cpu().numpy()
        self._writer.submit(self._writer.store.add_inputs, idx[new].copy(), data)

    def _batch_indices(self, trainer: "pl.Trainer", dl: Any, batch: Any) -> torch.Tensor | None:
        rec = self._recorders.get(id(dl))
        if rec is not None and rec.fifo:
            item = rec.fifo.popleft()
            return torch.as_tensor(item if isinstance(item, (list, tuple)) else [item], dtype=torch.int64).reshape(-1)
        if isinstance(batch, dict) and self.index_key in batch:
            return torch.as_tensor(batch[self.index_key]).detach().cpu().reshape(-1).long()
        self._warn_once(
            "no-index",
            "DualFormCallback: the training dataloader has no sampler to observe (an IterableDataset or a "
            f"custom loader); dataset indices are stored as -1. Put each example's index in the batch under "
            f"the key {self.index_key!r} (a dict batch) to record them.",
        )
        return None

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active or self._batch is None:
            return
        info = self._batch
        for name, cap in self._captures.items():
            offset = 0
            for call in cap.take_completed():
                index, position, label, per_ex = row_metadata(call, info, offset)
                offset += per_ex
                if call.keep is not None:  # rows whose gradient never reaches the weight
                    keep = call.keep
                    call.keys, call.values = call.keys[keep], call.values[keep]
                    index, position, label = index[keep.cpu()], position[keep.cpu()], label[keep.cpu()]
                self._step_rows.setdefault(name, []).append((call, index, position, label))

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer) -> None:
        if self._writer is None:
            return
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        self._last_epoch = epoch
        loss_scale, skipped = _loss_scale(trainer, optimizer)
        self._submit_deferred(1.0)  # (never left over: clipping or the batch's end submits it)
        defer = _clips_by_norm(trainer) and self._clip_plugin is not None and not skipped
        clip = 1.0 if defer else self._clip_factor(trainer, optimizer)
        grad_scale = 0.0 if skipped else clip * self._grad_world_scale / loss_scale

        rows: dict[str, tuple] = {}
        updates: dict[str, tuple[float, ParamUpdate, ParamUpdate | None]] = {}
        pending = self._step_rows
        self._step_rows = {}
        # structural faults (a weight used outside its module's forward) show from the first step on
        if self._steps_seen < 20 or self._steps_seen % self.check_every == 0:
            self._check_rows(trainer, pending, loss_scale, skipped)
        self._steps_seen += 1
        if self.plan is None and not skipped:
            self._make_plan(trainer, pending)
        for name, cap in self._captures.items():
            m = cap.module
            wi, bi = self._param_groups[name]
            wg = optimizer.param_groups[wi] if wi is not None else None
            bg = optimizer.param_groups[bi] if bi is not None else None
            w_up = _param_update(optimizer, m.weight, wg, skipped)
            b_up = _param_update(optimizer, _bias(m), bg, skipped) if _bias(m) is not None else None
            updates[name] = (grad_scale, w_up, b_up)
            if name in self._dropped or skipped or not pending.get(name):
                continue
            rows[name] = _gather_rows(pending[name], self._torch_row_dtype)
        event = None
        if any(t[0].is_cuda for t in rows.values()):
            rows = {n: tuple(_to_pinned(t) for t in r) for n, r in rows.items()}
            event = torch.cuda.Event()
            event.record()
        self._deferred = _PendingStep(step, epoch, rows, updates, event, optimizer, trainer)
        if not defer:
            self._submit_deferred(1.0)

    def _submit_deferred(self, clip: float) -> None:
        """Hand the step waiting for its clip factor to the writer. Lightning clips right after
        ``on_before_optimizer_step``; a step still waiting at the batch's end was not clipped (factor 1)."""
        if self._deferred is None:
            return
        pending, self._deferred = self._deferred, None
        updates = pending.updates
        if clip != 1.0:
            updates = {name: (scale * clip, w_up, b_up) for name, (scale, w_up, b_up) in updates.items()}
        self._writer.submit(_write_step, self._writer.store, pending.step, pending.epoch, pending.rows, updates, pending.event)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        self._active = False
        if self._writer is not None:
            self._submit_deferred(1.0)
            if self._steps_seen % _PACE_CHECK_EVERY == 0:
                self._check_writer_pace()

    def _check_writer_pace(self) -> None:
        """Warn once when training spends much of its time waiting for the writer's full queue (on every
        rank: each writes its own file, and one slow disk holds all ranks back)."""
        blocked = self._writer.blocked_s
        elapsed = time.monotonic() - self._writer.started
        if "slow-writer" in self._warned or blocked < _SLOW_WRITER_MIN_S or blocked < _SLOW_WRITER_SHARE * elapsed:
            return
        self._warned.add("slow-writer")
        advice = []
        if self.compression:
            advice.append("compression costs the most (it runs inside HDF5's filter pipeline on one thread): use "
                          "compression=None and compress the finished store if needed")
        if self.dtype == "float32":
            advice.append("dtype='float16' halves the bytes")
        advice += ["`layers=[...]` tracks fewer layers", "a faster disk helps"]
        advice[0] = advice[0][0].upper() + advice[0][1:]
        warnings.warn(
            f"DualFormCallback: training waited {blocked:.1f} s of the last {elapsed:.1f} s for the store writer "
            f"({self._writer.path}, {self.dtype} rows, compression={self.compression!r}): the rows come faster "
            f"than they can be written. {'; '.join(advice)}.",
            UserWarning, stacklevel=2,
        )

    # ------------------------------------------------------------------------------------------------
    # checks and scalars
    # ------------------------------------------------------------------------------------------------
    def _clip_factor(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer) -> float:
        if not _clips_by_norm(trainer):
            return 1.0
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return 1.0
        # the same computation as torch.nn.utils.clip_grad_norm_, which Lightning calls right after this hook
        if hasattr(torch.nn.utils, "get_total_norm"):
            total = torch.nn.utils.get_total_norm(grads, 2.0)
        else:
            total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
        return _clip_coefficient(total, trainer.gradient_clip_val)

    def _check_rows(self, trainer: "pl.Trainer", pending: dict, loss_scale: float, skipped: bool) -> None:
        """Check each layer's captured rows against the gradient autograd accumulated in its weight.

        ``W.grad @ r`` must equal ``sum_rows v (k . r)`` (scaled) for a fixed random probe ``r``: a cheap
        sketch of the full identity ``W.grad = sum v k^T`` that catches weights used outside the module's
        forward (e.g. ``nn.MultiheadAttention.out_proj``) and any other missing rows.
        """
        if skipped:
            return
        names = [n for n in self._captures if n not in self._dropped]
        lhs, rhs, bounds = [], [], []
        for name in names:
            m = self._captures[name].module
            r = self._probes[name]
            g = m.weight.grad
            d_out = layer_shape(m)[1]
            if g is None:
                lhs.append(torch.zeros(d_out, device=r.device))
                bounds.append(0.0)
            else:
                g = weight_matrix(m, g).float()
                lhs.append(g @ r)
                # independent rounding of relative size eps in each entry of W.grad moves (W.grad @ r)_i by
                # about eps * sqrt(sum_j (W.grad_ij r_j)^2): measured against that (about |W.grad|_F), rounding
                # (bf16, fp16) stays near eps even where W.grad @ r cancels, and missing rows stay O(1)
                bounds.append(float(torch.linalg.vector_norm(torch.sqrt((g * g) @ (r * r)))))
            acc = torch.zeros(d_out, device=r.device, dtype=torch.float32)
            for call, *_ in pending.get(name, []):
                acc += call.values.float().t() @ project_keys(m, call.keys, r)
            rhs.append(acc)
        if not names:
            return
        sizes = [x.numel() for x in rhs]
        rhs_all = torch.cat(rhs)
        if trainer.world_size > 1 and self._grad_world_scale != 1.0:
            rhs_all = trainer.strategy.reduce(rhs_all, reduce_op="sum")
        rhs_all = rhs_all * (self._grad_world_scale / loss_scale)
        for name, l_vec, r_vec, bound in zip(names, lhs, torch.split(rhs_all, sizes), bounds):
            diff = float(torch.linalg.vector_norm(l_vec - r_vec))
            err = diff / bound if bound > 0 else (0.0 if diff == 0 else math.inf)
            if err <= self._sketch_tolerance:
                continue
            if not pending.get(name):
                self._dropped[name] = "its weight received gradients in steps where its forward hook saw no input " \
                    "(the weight is used outside the module's forward, e.g. nn.MultiheadAttention.out_proj)"
                self._writer.submit(self._writer.store.drop_layer, name, self._dropped[name])
                rank_zero_warn(f"DualFormCallback: layer {name!r} left out of the store: {self._dropped[name]}.")
            elif name not in self._inexact:
                self._inexact[name] = (
                    f"at step {trainer.global_step} its captured rows explain its gradient only up to relative error "
                    f"{err:.2e} (part of the weight is used outside the module's forward)"
                )
                self._writer.submit(self._writer.store.mark_inexact, name, self._inexact[name])
                rank_zero_warn(f"DualFormCallback: layer {name!r} is recorded as INEXACT: {self._inexact[name]}.")

    def _make_plan(self, trainer: "pl.Trainer", pending: dict) -> None:
        """Estimate the whole run's store from this first step; refuse when the disk cannot hold it."""
        rows = {name: sum(call.keys.shape[0] for call, *_ in parts) for name, parts in pending.items()}
        shapes = {}
        for name, m in self._chosen.items():
            d_in, d_out, _ = layer_shape(m)
            shapes[name] = (layer_kind(m), d_in, d_out, _bias(m) is not None)
        batches = trainer.num_training_batches
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        epochs = math.inf
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            epochs = trainer.max_epochs - trainer.current_epoch
        if trainer.max_steps is not None and trainer.max_steps >= 0 and steps_per_epoch:
            epochs = min(epochs, (trainer.max_steps - trainer.global_step) / steps_per_epoch)
        input_bytes = 0
        if self.store_inputs and self._batch_input_bytes and self._dataset_size:
            input_bytes = self._batch_input_bytes * self._dataset_size
        self.plan = estimate(rows, shapes, 4 if self.dtype == "float32" else 2, steps_per_epoch, epochs, input_bytes,
                             chunk_rows=self.chunk_rows)
        rank_zero_info(f"DualFormCallback: {self.plan.describe()}.")
        if not self.check_disk:
            return
        directory = os.path.dirname(os.path.abspath(self.store_path))
        free = free_bytes(directory)
        needed = self.plan.total_bytes - (os.path.getsize(self.store_path) if self._resume else 0)
        if needed > free:
            raise DiskSpaceError(
                f"DualFormCallback: the store {self.store_path} needs about {needed / 1e9:.2f} GB for this run "
                f"({self.plan.describe()}) but only {free / 1e9:.2f} GB are free in {directory}. Free space, choose "
                "another path, narrow `layers=`, use dtype='float16' or compression='lzf', or pass check_disk=False."
            )

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(msg)

    # ------------------------------------------------------------------------------------------------
    # durability and the end
    # ------------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # on the writer thread after the epoch's steps; training goes on (a checkpoint's state_dict waits).
        # The counts it returns are what a checkpoint saved after fit (no writer left) must hold.
        if self._writer is not None:
            self._writer.submit(self._commit_counts, self._writer.store)

    def _commit_counts(self, store: StoreWriter) -> None:
        """Runs on the writer thread."""
        self._committed = store.commit()

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._writer is None:
            return
        finals = {
            name: (
                weight_matrix(cap.module).float().cpu().numpy(),
                _bias(cap.module).detach().float().cpu().numpy() if _bias(cap.module) is not None else None,
            )
            for name, cap in self._captures.items()
            if name not in self._dropped
        }
        self._detach()
        writer, self._writer = self._writer, None
        # Lightning has already advanced current_epoch when fit ends: count the epochs that ran steps
        epochs = self._last_epoch + 1 if self._last_epoch is not None else 0
        writer.call(writer.store.finalize, finals, {"final_step": int(trainer.global_step), "epochs": epochs})
        writer.stop()
        if writer.blocked_s >= 1.0:
            rank_zero_info(f"DualFormCallback: training waited {writer.blocked_s:.1f} s in all for the store writer.")
        self._committed = writer.store.committed  # for a checkpoint saved after fit
        if trainer.world_size > 1:
            trainer.strategy.barrier("dualform-finalized")
        if self.certify:
            # Under DDP each shard holds one rank's rows: the memory is the sum over ranks.
            reduce = (lambda t: trainer.strategy.reduce(t.to(trainer.strategy.root_device), reduce_op="sum").cpu()) \
                if trainer.world_size > 1 else None
            self.certificate = certify_store(self.store_path, all_reduce=reduce)
            for name, cert in self.certificate.items():
                verdict = f"exact within {cert['tolerance']:.0e}" if cert["exact"] else "INEXACT"
                rank_zero_info(
                    f"DualFormCallback: {name}: rebuilt weights match the trained ones to relative error "
                    f"{cert['rel_err']:.2e} ({verdict}; the memory explains {100 * cert['explained']:.4g}% of the weights)."
                )

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._query_end()
        self._detach()
        self._deferred = None  # its batch did not finish
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.call(writer.store.close)
            finally:
                writer.stop()
            if isinstance(exception, DiskSpaceError) and not self._resume and writer.store.committed["steps"] == 0:
                os.remove(writer.path)  # refused before the first step: leave no empty store behind

    # ------------------------------------------------------------------------------------------------
    # query recording (trainer.test / validate / predict after fit): see queries.py
    # ------------------------------------------------------------------------------------------------
    def _query_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", split: str) -> None:
        if split not in self.record_queries or trainer.sanity_checking or self._writer is not None:
            return  # validation inside fit is not a query set; the store is busy recording then
        from lightning.pytorch.trainer.states import TrainerFn

        if split == "validate" and trainer.state.fn != TrainerFn.VALIDATING:
            return
        path = self.store_path or rank_path(self.path, trainer.global_rank, trainer.world_size)
        self._query = QueryRecorder.start(path, split, pl_module)

    def _query_batch_start(self, trainer: "pl.Trainer", batch: Any, dataloader_idx: int, loaders: Any) -> None:
        if self._query is not None:
            dl = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
            indices = self._batch_indices(trainer, dl, batch)
            self._query.batch_start(batch, indices, batch_labels(batch, self.label_key), batch_inputs(batch, self.input_key))

    def _query_batch_end(self, outputs: Any) -> None:
        if self._query is not None:
            self._query.batch_end(outputs)

    def _query_end(self) -> None:
        query, self._query = self._query, None
        if query is not None:
            query.close()

    @override
    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._query_start(trainer, pl_module, "test")

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._query_start(trainer, pl_module, "validate")

    @override
    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._query_start(trainer, pl_module, "predict")

    @override
    def on_test_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_batch_start(trainer, batch, dataloader_idx, trainer.test_dataloaders)

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_batch_start(trainer, batch, dataloader_idx, trainer.val_dataloaders)

    @override
    def on_predict_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_batch_start(trainer, batch, dataloader_idx, trainer.predict_dataloaders)

    @override
    def on_test_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_batch_end(outputs)

    @override
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_batch_end(outputs)

    @override
    def on_predict_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._query_batch_end(outputs)

    @override
    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._query_end()

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._query_end()

    @override
    def on_predict_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._query_end()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._query_end()
        self._detach()
        if self._orig_process_dataloader is not None:
            _drop_instance_override(trainer.strategy, "process_dataloader")
            self._orig_process_dataloader = None
        if self._clip_plugin is not None:
            _drop_instance_override(self._clip_plugin, "clip_grad_by_norm")
            self._clip_plugin = None
        for dl in self._wrapped:
            unwrap_dataloader(dl)
        self._wrapped.clear()
        self._recorders.clear()
        if self._writer is not None:  # fit ended without on_fit_end (e.g. interrupted): keep what is there
            writer, self._writer = self._writer, None
            try:
                writer.call(writer.store.close)
            finally:
                writer.stop()

    def _detach(self) -> None:
        self._active = False
        for cap in self._captures.values():
            cap.detach()


# ------------------------------------------------------------------------------------------------------
# helpers (pure functions of tensors)
# ------------------------------------------------------------------------------------------------------
@dataclass
class _PendingStep:
    """A step's rows and scalars, held from ``on_before_optimizer_step`` until its clip factor is known."""

    step: int
    epoch: int
    rows: dict
    updates: dict
    event: Any
    optimizer: torch.optim.Optimizer
    trainer: "pl.Trainer"


def _clips_by_norm(trainer: "pl.Trainer") -> bool:
    return bool(trainer.gradient_clip_val) and (trainer.gradient_clip_algorithm or "norm") == "norm"


def _clip_coefficient(total_norm: torch.Tensor, clip_val: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by, computed as it does."""
    return float(torch.clamp(float(clip_val) / (total_norm + 1e-6), max=1.0))


def _drop_instance_override(obj: Any, name: str) -> None:
    """Remove an attribute set on the instance, so that the class's method shows through again."""
    try:
        delattr(obj, name)
    except AttributeError:
        pass


def _bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)  # nn.Embedding has none


def _gather_rows(parts: list[tuple[CallRows, torch.Tensor, torch.Tensor, torch.Tensor]], row_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
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
    keys = gather([p[0].keys for p in parts], all(p[0].private_keys for p in parts))
    values = gather([p[0].values for p in parts], True)
    index = torch.cat([p[1] for p in parts])
    position = torch.cat([p[2] for p in parts])
    label = torch.cat([p[3] for p in parts])
    return keys, values, index, position, label


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def _write_step(store: StoreWriter, step: int, epoch: int, rows: dict, updates: dict, event: Any) -> None:
    """Runs on the writer thread."""
    if event is not None:
        event.synchronize()
    converted = {
        name: StepRows(
            keys=k.numpy(), values=v.numpy(), index=i.numpy(), position=p.numpy(), label=lab.numpy(), step=step, epoch=epoch
        )
        for name, (k, v, i, p, lab) in rows.items()
    }
    store.add_step(step, epoch, converted, updates)


def _param_update(optimizer: torch.optim.Optimizer, p: torch.Tensor | None, group: dict | None, skipped: bool) -> ParamUpdate:
    if p is None or group is None:
        return ParamUpdate(lr=0.0, applied=False)
    state = optimizer.state.get(p, {})
    return ParamUpdate(
        lr=float(group["lr"]),
        momentum=float(group.get("momentum", 0.0)),
        dampening=float(group.get("dampening", 0.0)),
        weight_decay=float(group.get("weight_decay", 0.0)),
        nesterov=bool(group.get("nesterov", False)),
        maximize=bool(group.get("maximize", False)),
        fresh_buffer=state.get("momentum_buffer") is None,
        applied=(p.grad is not None) and not skipped,
    )


def _loss_scale(trainer: "pl.Trainer", optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """The loss scale the captured values carry, and whether the scaler will skip this step."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0, False
    state = scaler._per_optimizer_states[id(optimizer)]
    found = state.get("found_inf_per_device", {})
    skipped = bool(sum(float(v) for v in found.values())) if found else False
    return float(scaler.get_scale()), skipped
