"""The recording engine: a model's training steps become store rows, whatever drives the training loop.

:class:`RecordingEngine` owns everything between the module hooks and the file: which layers are tracked,
the rows of each step with their metadata, the per-step scalars of the update rule, the gradient check,
the disk plan, the writer thread, resume and the finish (final weights and the certificate). Two adapters
drive it: :class:`~lightning_dualform.DualFormCallback` from Lightning's hooks, and
:class:`~lightning_dualform.DualFormRecorder` from a plain PyTorch or Fabric loop.

The engine finds a step through the optimizer's own step hooks, which it puts on and takes off itself
(:meth:`RecordingEngine.hook_optimizer`): the pre-hook notes the update rule's settings before the optimizer
changes its state, the post-hook hands the step's rows to the writer. A step the optimizer never took (a loss
scaler skipped it) fires neither hook. The factor between the gradient the rows give and the one the
optimizer used (clipping, DDP averaging, loss scaling) is either told by the adapter with the step's number
and epoch (:meth:`RecordingEngine.expect_step`: the callback knows Lightning's settings) or measured from the
weights' ``.grad`` (the recorder, whose steps the engine counts).

The engine is the write side: it never imports ``attend/``. The full certificate at the finish is computed by
a :class:`Certifier` the adapter hands over (``attend.certificate.certify_store``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from typing import Any, Callable, Protocol

import torch
from torch import nn

from lightning_dualform._float32_products import float32_mode, loosest
from lightning_dualform._version import __version__
from lightning_dualform.errors import InexactError
from lightning_dualform.layers import (
    conv_geometry,
    layer_kind,
    layer_shape,
    weight_matrix,
)
from lightning_dualform.optim import UpdateRule, rule_for
from lightning_dualform.record.batches import BatchInfo, FirstSeen
from lightning_dualform.record.capture import LayerCapture
from lightning_dualform.record.options import RecordOptions
from lightning_dualform.record import gradient_check
from lightning_dualform.record import rows as rows_mod
from lightning_dualform.record.planner import Plan, check_disk, estimate, slow_writer_message
from lightning_dualform.record.policy import gradient_check_tolerance
from lightning_dualform.record.row_replay import RowReplayCertificate
from lightning_dualform.record.sketch import SketchCertificate, fit_certificates
from lightning_dualform.record.weight_watch import WeightWatch, checked_closure
from lightning_dualform.record.step_rows import StepRow, StepRowReader, StepSettings, skipped_row
from lightning_dualform.record.specs import Distributed, bias_of, describe_optimizer, layer_spec
from lightning_dualform.store import WriterLock
from lightning_dualform.store.background import AsyncWriter
from lightning_dualform.store.certificate import (
    FLOAT32_PRODUCTS_TOLERANCE,
    LayerCertificate,
    read_certificates,
    tolerance,
)
from lightning_dualform.store.conv import ConvGeometry
from lightning_dualform.store.format import PLAIN_RULE, SCALAR_RULES, settings_of
from lightning_dualform.store.metadata import StoreMetadata
from lightning_dualform.store.shards import write_shard_index
from lightning_dualform.store.writer import StoreWriter

log = logging.getLogger(__name__)

#: Training held back by the writer for this share of the time since the store opened (and at least
#: _SLOW_WRITER_MIN_S in all) is worth a warning: the store's settings cost more than the rows are worth.
_SLOW_WRITER_SHARE = 0.2
_SLOW_WRITER_MIN_S = 2.0
_PACE_CHECK_EVERY = 64  # optimizer steps
_ROW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Certifier(Protocol):
    """Computes a finished store's full certificate from its rows and has the store write it (``certify_store``): the
    adapters hand it over; the write side knows when to certify and under which lock, the read side how."""

    def __call__(self, path: str, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 lock: WriterLock | None = None) -> dict[str, LayerCertificate]: ...


class RecordingEngine:
    """Records the tracked layers of one model trained by one optimizer into a store.

    Args:
        options: what to record and how.
        owner: the adapter's name, for messages (``"DualFormCallback"``).
        certifier: computes the full certificate at the finish (with ``certify="full"``, or where the
            certificate made as training goes does not cover the run).
        info / warn: where messages go (rank zero only, under DDP, for the callback).
    """

    def __init__(self, options: RecordOptions, owner: str, *, certifier: Certifier,
                 info: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.owner = owner
        self.certifier = certifier
        self._info = info or log.info
        self._warn = warn or (lambda msg: warnings.warn(msg, UserWarning, stacklevel=3))
        self.captures: dict[str, LayerCapture] = {}
        self.chosen: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        #: the optimizer's update rule (``None``: an optimizer without one, recorded as ``"plain"``)
        self.rule: UpdateRule | None = None
        self.writer: AsyncWriter | None = None
        self.store_path: str | None = None
        self.plan: Plan | None = None
        self.certificate: dict[str, LayerCertificate] = {}
        self.committed: dict[str, Any] | None = None
        self.dist = Distributed()
        self.precision = "32-true"
        self.device = torch.device("cpu")  # the training device (set_precision)
        self.float32_products = "ieee"
        self.check_tolerance = gradient_check_tolerance("32-true", row_dtype=options.dtype)
        self.last_epoch: int | None = None
        self.steps_recorded = 0
        self.rows_recorded: dict[str, int] = {}  # rows handed to the writer per layer, this run
        self.active = False
        self.batch: BatchInfo | None = None
        self.dropped: dict[str, str] = {}
        self.inexact: dict[str, str] = {}
        self._param_groups: dict[str, tuple[int | None, int | None]] = {}
        self._rows: StepRowReader | None = None
        self._probes: dict[str, torch.Tensor] = {}  # Z (d_in, k) per layer: the gradient check's and the sketch's
        #: a convolution's geometry, fixed by its first recorded call (the store keeps maps of one size per layer)
        self._geometry: dict[str, ConvGeometry] = {}
        #: the certificate as training goes (None: certify at fit end by reading the store, or not at all)
        self.sketch: SketchCertificate | RowReplayCertificate | None = None
        self._watch: WeightWatch | None = None  # weights edited between steps, which a few replayed rows miss
        self.run_exact = True  # the adapter's run policy found nothing inexact
        self._steps_seen = 0
        self._warned: set[str] = set()
        self._seen_inputs = FirstSeen()
        self._row_dtype = _ROW_DTYPES[options.dtype]
        self._step_hooks: list[Any] = []
        self._settings: StepSettings | None = None  # the coming step's update rule (the optimizer's pre-hook)
        self._expected: tuple[int, int, Any] | None = None  # (step, epoch, grad_scale): expect_step
        self._open_store: Callable[[], None] | None = None
        self._epoch: Callable[[], int] | None = None
        #: ``() -> (steps per epoch, epochs left, raw input bytes)`` for the disk plan: the adapter knows them
        #: (0 steps per epoch: unknown; the plan is printed but the disk is not checked)
        self.horizon: Callable[[], tuple[int, float, int]] = lambda: (0, math.inf, 0)

    # ------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------
    def track(self, chosen: dict[str, nn.Module], optimizer: torch.optim.Optimizer | None, notes: list[str]) -> None:
        """Remember the layers to record and map their parameters to the optimizer's param groups.

        Group *numbers*, not the group dicts: restoring a checkpoint replaces the dicts (and a scheduler then
        changes the new ones), so each step reads ``optimizer.param_groups[i]`` afresh.
        """
        self.chosen = dict(chosen)
        self.options.check_layout_names(self.owner, list(chosen))
        self.optimizer = optimizer
        self.rule = None
        if optimizer is not None:
            try:
                self.rule = rule_for(optimizer)
            except InexactError:  # recorded with exact=False (the policy refused it otherwise)
                self.rule = None
        groups: dict[int, int] = {}
        if optimizer is not None:
            for i, g in enumerate(optimizer.param_groups):
                for p in g["params"]:
                    groups[id(p)] = i
        for name, m in chosen.items():
            wi = groups.get(id(m.weight))
            bi = groups.get(id(bias_of(m))) if bias_of(m) is not None else None
            if wi is None and optimizer is not None:
                # another optimizer trains it (or nothing does): its rows could not say how its weights changed
                notes.append(f"{name} is skipped: its weight is in none of the param groups of the "
                             f"{type(optimizer).__name__} being recorded (another optimizer trains it, or none does); "
                             "record a layer with the optimizer that trains it.")
                del self.chosen[name]
                continue
            self._param_groups[name] = (wi, bi)
        self._rows = StepRowReader(optimizer, self.rule, self.update_rule, self._param_groups) if optimizer else None
        if not self.chosen:
            raise ValueError(f"{self.owner} found no layer to track: no trainable layer it records has its weight in "
                             "the optimizer's param groups. Give it the optimizer that trains the layers.")

    def set_precision(self, precision: str, device: torch.device) -> None:
        """The training precision, and how float32 products on ``device`` are rounded (TF32, bf16): the rows
        then rebuild each step's weight gradient only to that rounding, so the checks' tolerances widen and
        the store records it."""
        self.precision = precision
        self.device = device
        self.float32_products = "ieee"
        if precision not in ("64-true", "64"):  # float64 products are never rounded so
            conv = any(layer_kind(m).startswith("conv") for m in self.chosen.values())
            self.float32_products = float32_mode(device, conv=conv)
        self.check_tolerance = gradient_check_tolerance(precision, self.float32_products, self.options.dtype)
        mode = self.float32_products
        if mode != "ieee" and precision in ("32-true", "32"):
            causes = ("torch.set_float32_matmul_precision('high'/'medium'), or cuDNN's TF32 convolutions"
                      if device.type == "cuda" else "torch.set_float32_matmul_precision('medium') or oneDNN's settings")
            conv = any(layer_kind(m).startswith("conv") for m in self.chosen.values())
            self._warn(
                f"{self.owner}: float32 products on {device.type} are rounded to {mode} ({causes}), so each "
                "step's weight gradient carries that rounding and the store rebuilds the layers only to about "
                f"it: the certificate's tolerance is {FLOAT32_PRODUCTS_TOLERANCE.get(mode, 5e-2):.0e}. For a "
                "float32-exact record, train with torch.set_float32_matmul_precision('highest')"
                + (" and torch.backends.cudnn.allow_tf32 = False." if conv and device.type == "cuda" else ".")
            )

    def attach(self) -> None:
        """Put a forward hook on every tracked layer (:meth:`hook_optimizer` hooks the optimizer's steps)."""
        for name, module in self.chosen.items():
            cap = LayerCapture(name, module, lambda: self.active, context=lambda: self.batch)
            cap.attach()
            self.captures[name] = cap
            self._probes[name] = SketchCertificate.probes(name, layer_shape(module)[0], module.weight.device)

    def detach(self) -> None:
        """Remove every hook: the layers' and the optimizer's."""
        self.active = False
        self.unhook_optimizer()
        for cap in self.captures.values():
            cap.detach()

    # ------------------------------------------------------------------------------------------------
    # the optimizer's steps
    # ------------------------------------------------------------------------------------------------
    def hook_optimizer(self, *, open_store: Callable[[], None] | None = None,
                       epoch: Callable[[], int] | None = None) -> None:
        """Find the optimizer's steps through its own step hooks: before each, the update rule's settings are
        read (:meth:`step_settings`); after each, those read from the param groups are read again
        (:meth:`reread_hyper`: code run inside ``step()`` may have changed them) and the step is recorded
        (:meth:`record_step`). A step the optimizer never took (a loss scaler skipped it) fires neither hook.

        Args:
            open_store: opens the store before the first step, when it is not open yet (a loop's recorder: the
                first step tells the precision and the raw inputs' shape).
            epoch: counts the steps here: every step the optimizer takes is recorded as the next one, in epoch
                ``epoch()``, with its gradient factor measured (a loop of the user's own). Without it, a step is
                recorded as the adapter described it beforehand (:meth:`expect_step`: Lightning knows the global
                step, the epoch and the factor), and a step it described that the optimizer skipped is recorded
                as skipped at :meth:`end_batch`.
        """
        if self.optimizer is None or self._step_hooks:
            return
        self._open_store = open_store
        self._epoch = epoch
        self._step_hooks = [self.optimizer.register_step_pre_hook(self._before_step),
                            self.optimizer.register_step_post_hook(self._after_step)]

    def unhook_optimizer(self) -> None:
        """Remove the optimizer's step hooks (idempotent) and forget a step in progress."""
        for h in self._step_hooks:  # (RemovableHandle)
            h.remove()
        self._step_hooks = []
        self._settings = self._expected = None

    def expect_step(self, step: int, epoch: int, grad_scale: float | Callable[[], float] | None) -> None:
        """What the adapter knows of the step the optimizer is taking: its global ``step``, ``epoch`` and the
        factor between the rows' gradient and the optimizer's (clipping, DDP averaging, loss scaling; None:
        measure it; a function: asked once the step is taken). Call it between the step's pre-hook and its update
        (Lightning's ``on_before_optimizer_step``)."""
        if self.writer is not None:
            self._expected = (int(step), int(epoch), grad_scale)

    def check_weights(self) -> None:
        """Flag a watched layer whose weights changed since the optimizer's last step (:class:`WeightWatch`)."""
        for name in self._watch.changed() if self._watch is not None else ():
            self._flag(name, 0.0, True, edited=True)

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        if self.writer is None and self._open_store is not None:
            self._open_store()
        if self.writer is not None:
            self._settings = self.step_settings()
            self.check_weights()
            if self._watch is not None:  # and again after a closure (Lightning's: training_step, backward, hooks)
                return checked_closure(args, kwargs, self.check_weights)
        return None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        settings, self._settings = self._settings, None
        expected, self._expected = self._expected, None
        if settings is None or self.writer is None:
            return
        self.reread_hyper(settings)
        if self._epoch is not None:
            self.record_step(self.steps_recorded, self._epoch(), settings, None)
            self.active = True  # rows of the next step's forward passes (until the loop says otherwise)
        elif expected is not None:
            scale = expected[2]() if callable(expected[2]) else expected[2]
            self.record_step(expected[0], expected[1], settings, scale)
        if self._watch is not None:
            self._watch.after_step()

    # ------------------------------------------------------------------------------------------------
    # the store
    # ------------------------------------------------------------------------------------------------
    def open(self, store_path: str, metadata: StoreMetadata, *, raw: torch.Tensor | None, resume: dict[str, Any] | None,
             last_step: int | None = None, shard_index: list[str] | None = None) -> None:
        """Create the store (or continue it from a checkpoint's counts) and start the writer thread.

        Args:
            store_path: this process's file.
            metadata: the run's description (written into a new store).
            raw: a batch of raw inputs (their shape and dtype size ``/inputs``), or None.
            resume: a checkpoint's counts (:meth:`state_dict`), or None for a new store.
            last_step: the global step of the resume's last recorded step (checked against the store).
            shard_index: under DDP, rank 0 writes the index that names every rank's file.
        """
        opts = self.options
        self.store_path = store_path
        specs = [layer_spec(name, m, self.optimizer, self.rule, self._param_groups[name])
                 for name, m in self.chosen.items()]
        if resume is not None:
            settings = settings_of(specs, opts.dtype, opts.compression, self.update_rule)
            make = lambda: StoreWriter.resume(  # noqa: E731
                store_path, settings, resume["rows"], int(resume["steps"]), resume.get("inputs"),
                last_step=last_step, commit_seconds=opts.commit_seconds, update_attrs=self._resumed_attrs,
            )
        else:
            # an existing store is replaced only with overwrite=True (the adapter checked at set-up), atomically,
            # and only if it is a regular file (StoreWriter.create refuses anything else)
            make = lambda: StoreWriter.create(  # noqa: E731
                store_path, specs, row_dtype=opts.dtype, compression=opts.compression, chunk_rows=opts.chunk_rows,
                metadata=metadata, commit_seconds=opts.commit_seconds, overwrite=opts.overwrite,
                input_shape=tuple(raw.shape[1:]) if raw is not None else None,
                input_dtype=str(raw.dtype).replace("torch.", "") if raw is not None else "float32",
            )
        self.writer = AsyncWriter(make, max_queue=opts.max_queue)
        # GIL-free chunk writes pay where the training thread only launches kernels; on CPU training they compete
        self.writer.set_release_gil(self.device.type == "cuda")
        if shard_index is not None:
            # the index exists from the first step on, so a crashed or running DDP store opens as one
            write_shard_index(opts.path, shard_index, overwrite=opts.overwrite or resume is not None)
        for name, size in self.writer.input_sizes().items():  # a resumed store's maps fix their size
            if name in self.chosen:
                self._geometry[name] = conv_geometry(self.chosen[name], size)
        self._seen_inputs = FirstSeen(self.writer.input_indices())
        self.steps_recorded = int(resume["steps"]) if resume is not None else 0
        self._start_sketch(resume)
        width = sum(s.d_in + s.d_out for s in specs) * (4 if opts.dtype == "float32" else 2)
        verb = f"continuing at step {last_step + 1 if last_step is not None else 0}" if resume else "recording"
        self._info(
            f"{self.owner}: {verb} {len(specs)} layer(s) {list(self.chosen)} into {store_path} "
            f"({opts.dtype}, compression={opts.compression}); about {width / 1024:.1f} KiB per training example "
            "and position, per epoch."
        )

    @property
    def update_rule(self) -> str:
        """The name the store gives the optimizer's update rule."""
        return self.rule.name if self.rule is not None else PLAIN_RULE

    def _start_sketch(self, resume: dict[str, Any] | None) -> None:
        """Certify as training goes: SGD's projections, or an element-wise rule's replay of a few rows; a resume
        continues what its checkpoint saved (one from before they existed certifies at the end instead)."""
        self.sketch, self._watch = None, None
        if not self.options.certify or not self.run_exact or self.optimizer is None:
            return  # (an inexact run keeps its residual, which only the full certificate computes)
        if type(self.optimizer) is torch.optim.SGD:
            self.sketch = SketchCertificate.for_run(self.chosen, self._probes, self.optimizer, resume)
            if self.sketch is not None:
                self.sketch.place_on_writer(self.chosen, self.options.dtype, self.dist.world_size)
        else:  # an element-wise rule: its own replay on a few rows of each weight (record/row_replay.py)
            self.sketch = RowReplayCertificate.for_run(
                self.chosen, self.optimizer, self.rule, self._param_groups, resume, self.options.dtype,
                self.dist.sum_over_ranks)
            self._watch = WeightWatch(self.chosen) if self.sketch is not None else None  # (its blind spot)

    def _resumed_attrs(self, stored: StoreMetadata) -> dict[str, Any]:
        """The rows before the checkpoint keep the rounding they were made with: the store's mode is the
        loosest of its runs' (written when the resume starts, so a crash after it keeps it too)."""
        self.float32_products = loosest([stored.float32_products, self.float32_products])
        return {"float32_products": self.float32_products}

    def run_metadata(self, model: nn.Module, **fields: Any) -> StoreMetadata:
        """The store's description of this run (the adapter adds what it knows: clipping, accumulation ...)."""
        import lightning

        return StoreMetadata(
            library_version=__version__,
            torch_version=torch.__version__,
            lightning_version=lightning.__version__,
            model_class=type(model).__name__,
            optimizer=describe_optimizer(self.optimizer),
            update_rule=self.update_rule,
            precision=self.precision,
            float32_products=self.float32_products,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            **fields,
        )

    def state_dict(self) -> dict[str, Any]:
        """The counts a checkpoint must hold to continue this store exactly: every row so far is made
        durable first, so that a resume truncates the store back to exactly this point."""
        if self.writer is not None:
            self.committed = self.writer.commit()
        if self.committed is None:
            return {}
        state = {"format_version": 1, "store_path": self.store_path, **self.committed}
        if self.sketch is not None and self.writer is not None:
            state["sketch"] = self.sketch.state_dict()  # the projections at exactly these counts
        return state

    def commit_soon(self) -> None:
        """Make the rows so far durable on the writer thread; training goes on (a checkpoint's
        :meth:`state_dict` waits for it)."""
        if self.writer is not None:
            self.writer.commit_soon()

    # ------------------------------------------------------------------------------------------------
    # batches
    # ------------------------------------------------------------------------------------------------
    def begin_batch(self, info: BatchInfo, raw: torch.Tensor | None = None) -> None:
        """Rows of the layers' calls from now on belong to this batch; queue its new raw inputs."""
        self.batch = info
        if self.options.store_inputs and raw is not None and info.indices is not None:
            self._record_inputs(raw, info.indices)
        self.active = True

    def end_batch(self) -> None:
        """The batch is over: a step the adapter expected that the optimizer never took (a loss scaler found
        inf/NaN gradients) is recorded as skipped."""
        self.active = False
        expected, self._expected = self._expected, None
        self._settings = None
        if expected is not None and self.writer is not None:
            self.record_skipped_step(expected[0], expected[1])

    def _record_inputs(self, raw: torch.Tensor, indices: torch.Tensor) -> None:
        """Queue the raw inputs of examples not stored yet (each example once, not once per epoch)."""
        if self.writer is None or raw.shape[0] != len(indices):
            return
        idx = indices.numpy()
        if (idx < 0).any():
            return
        new = self._seen_inputs.take(idx)
        if not new.any():
            return
        data = raw.detach()[torch.from_numpy(new).to(raw.device)].cpu().numpy()
        self.writer.add_inputs(idx[new].copy(), data)

    # ------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------
    def step_settings(self) -> StepSettings:
        """The update rule's settings of the coming step, read before the optimizer changes its state (call it
        from the optimizer's step pre-hook; then :meth:`reread_hyper` from its post-hook)."""
        assert self._rows is not None
        return self._rows.read({n: c.module for n, c in self.captures.items()})

    def reread_hyper(self, settings: StepSettings) -> None:
        """The rows' param-group columns as the step used them (:meth:`StepRowReader.reread`)."""
        assert self._rows is not None
        self._rows.reread(settings, {n: c.module for n, c in self.captures.items()})

    def skipped_row(self) -> StepRow:
        """A table row of a step that leaves the parameter (and its state) alone."""
        return skipped_row(self.update_rule)

    def record_step(self, step: int, epoch: int, plan: StepSettings, grad_scale: float | None) -> None:
        """Hand one optimizer step to the writer: its rows per layer and the update rule's scalars.

        ``grad_scale`` turns the rows' gradient into the one the optimizer used (clipping, DDP averaging, loss
        scaling); ``None`` measures it per layer from the weights' ``.grad``.
        """
        self.last_epoch = epoch
        pending = rows_mod.take_rows(self.captures, self.warn_once, self.owner, self.options.layout_of)
        self._check_map_sizes(pending)
        if self.plan is None:
            self._make_plan(pending)
        rows: dict[str, tuple] = {}
        sizes: dict[str, tuple[int, ...]] = {}
        for name in self.captures:
            if name in self.dropped or not pending.get(name):
                continue
            rows[name] = rows_mod.gather_rows(pending[name], self._row_dtype)  # as they will be stored
            self.rows_recorded[name] = self.rows_recorded.get(name, 0) + sum(c.n_rows for c, *_ in pending[name])
            if name in self._geometry:
                sizes[name] = self._geometry[name].input_size
        # the gradient check (and a measured factor) on the first 20 steps and every check_every-th
        check = grad_scale is None or self._steps_seen < 20 or self._steps_seen % self.options.check_every == 0
        scales: dict[str, float] = {}
        sketches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if check:
            # the check multiplies the rows as captured (half-precision storage would round away small
            # gradients and cancel), the certificate the rows as stored
            captured = rows if self.options.dtype == "float32" else {
                n: (torch.cat([c.keys for c, *_ in pending[n]]), torch.cat([c.values for c, *_ in pending[n]])) for n in rows}
            sketches = self._sketch_rows(captured, stored=False)
            scales = self._check_rows(sketches, grad_scale, has_rows=set(rows))
        # layers whose rows the writer's thread projects, and steps their sketch, itself
        writer_sketch = self.sketch if isinstance(self.sketch, SketchCertificate) and self.sketch.on_writer else None
        on_writer = writer_sketch.writer_layers(rows) if writer_sketch is not None else set()
        rest = {n: r for n, r in rows.items() if n not in on_writer}  # (a layer without rows steps without them)
        if self.sketch is not None and self.sketch.needs_projections and (not check or self.options.dtype != "float32"):
            sketches = self._sketch_rows(rest, stored=True) if rest or not on_writer else {}
        self._steps_seen += 1
        updates: dict[str, tuple[float, StepRow, StepRow | None]] = {}
        for name, cap in self.captures.items():
            w_up, b_up = plan.updates[name]
            w_up["applied"] = bool(w_up["applied"]) and cap.module.weight.grad is not None
            if b_up is not None:
                b_up["applied"] = bool(b_up["applied"]) and bias_of(cap.module).grad is not None
            scale = grad_scale if grad_scale is not None else scales.get(name, 1.0)
            updates[name] = (scale, w_up, b_up)
            if self.sketch is not None and name in self.sketch.layers and name not in on_writer:
                self.sketch.take_step(name, sketches.get(name), rows.get(name), scale, w_up, b_up)
        event = None
        if any(t[0].is_cuda for t in rows.values()):
            rows = {n: tuple(rows_mod.to_pinned(t) for t in r) for n, r in rows.items()}
            event = torch.cuda.Event()
            event.record()
        made = functools.partial(rows_mod.step_rows, rows, event, sizes, step, epoch)  # on the writer thread
        if writer_sketch is not None and on_writer:
            made = writer_sketch.after_rows(made, {n: u for n, u in updates.items() if n in on_writer})
        self.writer.add_step(step, epoch, made, updates)
        self.steps_recorded += 1
        if self._steps_seen % _PACE_CHECK_EVERY == 0:
            self._check_writer_pace()

    def record_skipped_step(self, step: int, epoch: int) -> None:
        """A step the trainer counted but the optimizer never took (a loss scaler found inf/NaN): the
        weights did not change, and the rows of its gradient are dropped."""
        self.last_epoch = epoch
        rows_mod.take_rows(self.captures)  # (the skipped step's rows are dropped)
        updates = {name: (0.0, self.skipped_row(), self.skipped_row() if bias_of(cap.module) is not None else None)
                   for name, cap in self.captures.items()}
        self.writer.add_step(step, epoch, lambda: {}, updates)  # no rows
        self.steps_recorded += 1

    def _check_map_sizes(self, pending: dict) -> None:
        """A convolution's maps share one size per store (it fixes the layout of its datasets): the first
        recorded call sets it; a layer whose maps change size later is left out of the store, with why."""
        for name, parts in pending.items():
            if name in self.dropped:
                continue
            for call, *_ in parts:
                if call.geometry is None:
                    continue
                have = self._geometry.setdefault(name, call.geometry)
                if have.input_size != call.geometry.input_size:
                    self.dropped[name] = (
                        f"its input maps changed size from {have.input_size} to {call.geometry.input_size} during "
                        "training; the store keeps a convolution's maps at one size (pad or crop inputs to one size, "
                        "or leave the layer out with `layers=`)"
                    )
                    self.writer.drop_layer(name, self.dropped[name])
                    self._warn(f"{self.owner}: layer {name!r} left out of the store: {self.dropped[name]}.")
                    break

    # ------------------------------------------------------------------------------------------------
    # checks
    # ------------------------------------------------------------------------------------------------
    def _sketch_rows(self, rows: dict[str, tuple], stored: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The step's projections of every layer still recorded (:func:`.gradient_check.project_rows`)."""
        modules = {n: c.module for n, c in self.captures.items() if n not in self.dropped}
        return gradient_check.project_rows(rows, modules, self._probes, self._geometry,
                                           all_reduce=self.dist.sum_over_ranks,
                                           stored_dtype=self.options.dtype if stored else None)

    def _check_rows(self, sketches: dict[str, tuple[torch.Tensor, torch.Tensor]], grad_scale: float | None,
                    has_rows: set[str]) -> dict[str, float]:
        """Check each layer's rows against the gradient the optimizer used (:func:`.gradient_check.check_rows`);
        a layer beyond the tolerance is dropped or marked inexact. Returns the measured factors (no
        ``grad_scale``)."""
        modules = {n: self.captures[n].module for n in sketches}
        checked = gradient_check.check_rows(sketches, modules, self._probes, grad_scale=grad_scale,
                                            world_size=self.dist.world_size)
        for name, (_, err, seen) in checked.items():
            if err > self.check_tolerance:
                self._flag(name, err, has_rows=name in has_rows or seen)
        return {name: f for name, (f, _, _) in checked.items()} if grad_scale is None else {}

    def _flag(self, name: str, err: float, has_rows: bool, edited: bool = False) -> None:
        if not has_rows:
            self.dropped[name] = ("its weight received gradients in steps where its forward hook saw no input "
                                  "(the weight is used outside the module's forward, e.g. nn.MultiheadAttention.out_proj)")
            self.writer.drop_layer(name, self.dropped[name])
            self._warn(f"{self.owner}: layer {name!r} left out of the store: {self.dropped[name]}.")
        elif name not in self.inexact:
            self.inexact[name] = (
                f"its weights were changed after optimizer step {self.steps_recorded}, outside the optimizer (a "
                "constraint, a callback or a hook editing them in place): no row explains that change" if edited else
                f"at step {self.steps_recorded} its captured rows explain its gradient only up to relative error "
                f"{err:.2e} (part of the weight is used outside the module's forward, such as a penalty on it in the "
                "loss: weight_decay= is exact; or a gradient was changed between backward and the optimizer step"
                + (" by something other than a uniform scaling)" if self._epoch is not None else ")"))
            self.writer.mark_inexact(name, self.inexact[name])
            self._warn(f"{self.owner}: layer {name!r} is recorded as INEXACT: {self.inexact[name]}.")

    def _make_plan(self, pending: dict) -> None:
        """Estimate the whole run's store from this first step; refuse when the disk cannot hold it."""
        rows = {name: sum(call.n_rows for call, *_ in parts) for name, parts in pending.items()}
        if not any(rows.values()):
            return  # nothing to plan from yet (a skipped or empty first step)
        shapes = {}
        for name, m in self.chosen.items():
            d_in, d_out, _ = layer_shape(m)
            shapes[name] = (layer_kind(m), d_in, d_out, bias_of(m) is not None)
        steps_per_epoch, epochs, input_bytes = self.horizon()
        self.plan = estimate(rows, shapes, 4 if self.options.dtype == "float32" else 2, steps_per_epoch, epochs,
                             input_bytes, chunk_rows=self.options.chunk_rows,
                             memory_sums=self.options.certify == "full" or (bool(self.options.certify) and self.sketch is None),
                             maps={n: (g.in_channels, g.pixels, g.locations) for n, g in self._geometry.items()})
        self._info(f"{self.owner}: {self.plan.describe()}.")
        if self.options.check_disk and steps_per_epoch:  # (no margin: the writer's disk reservation does the rest)
            check_disk(self.plan, self.store_path, os.path.getsize(self.store_path), self.owner, margin=False)

    def _check_writer_pace(self) -> None:
        """Warn once when training spends much of its time waiting for the writer's full queue (on every
        rank: each writes its own file, and one slow disk holds all ranks back)."""
        w = self.writer
        blocked = w.blocked_s
        elapsed = time.monotonic() - w.started
        if "slow-writer" in self._warned or blocked < _SLOW_WRITER_MIN_S or blocked < _SLOW_WRITER_SHARE * elapsed:
            return
        self._warned.add("slow-writer")
        warnings.warn(slow_writer_message(self.owner, blocked, elapsed, w.path, self.options.dtype,
                                          self.options.compression), UserWarning, stacklevel=2)

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warn(msg)

    # ------------------------------------------------------------------------------------------------
    # the end
    # ------------------------------------------------------------------------------------------------
    def finish(self, final_step: int, epochs: int) -> None:
        """Finalise the store (final weights, status ``complete``) and, with ``certify``, compute the
        certificate: every rank's rows together rebuild the weights."""
        if self.writer is None:
            return
        self.check_weights()  # (an edit after the last step: the final weights are then no rebuild of the rows)
        finals = {
            name: (
                weight_matrix(cap.module).float().cpu().numpy(),
                bias_of(cap.module).detach().float().cpu().numpy() if bias_of(cap.module) is not None else None,
            )
            for name, cap in self.captures.items()
            if name not in self.dropped
        }
        self.detach()
        if isinstance(self.sketch, SketchCertificate) and self.sketch.on_writer:
            self.writer.drain()  # (the writer's thread steps the projections: every step, before they are read)
        certificate = fit_certificates(self.sketch, set(self.chosen), finals, self.inexact,
                                       tolerance(self.options.dtype, self.precision, self.float32_products))
        writer, self.writer = self.writer, None
        full = self.options.certify == "full" or (self.options.certify and certificate is None)
        # the full certificate of this file follows under the same writer lock: no other writer between
        elementwise = self.update_rule not in (*SCALAR_RULES, PLAIN_RULE)
        keep_lock = bool(full) and not (self.dist.world_size > 1 and elementwise)
        lock = writer.finalize(finals, int(final_step), int(epochs), certificate, keep_lock)
        if writer.blocked_s >= 1.0:
            self._info(f"{self.owner}: training waited {writer.blocked_s:.1f} s in all for the store writer.")
        self.committed = writer.committed  # for a checkpoint saved after the finish
        if full:  # a pass over every stored row: say so, it can take a while
            self._info(f"{self.owner}: certifying {self.options.path}: rebuilding each layer's weights from its rows")
        try:
            self.dist.barrier()
            if full and not keep_lock:
                # An element-wise rule's replay needs every rank's rows at each step: rank 0 certifies through the
                # shards' index (all are finished: barrier above) and writes into every shard.
                if self.dist.rank == 0:
                    self.certifier(self.options.path)
                self.dist.barrier()
                self.certificate = read_certificates(self.store_path)
            elif full:
                # Under DDP each shard holds one rank's rows: the memory is the sum over ranks.
                reduce = self.dist.all_reduce if self.dist.world_size > 1 else None
                self.certificate = self.certifier(self.store_path, all_reduce=reduce, lock=lock)
        finally:
            if lock is not None:
                lock.release()
        if not full and certificate is not None:
            self.certificate = certificate
        for name, cert in self.certificate.items():
            self._info(cert.fit_end_line(self.owner, name, self.inexact.get(name)))

    def close(self, remove_if_empty: bool = False) -> None:
        """Stop without finalising (an exception, or training stopped early): commit what is there, so the
        store opens at its last step. ``remove_if_empty`` deletes a new store that never got a step."""
        self.detach()
        writer, self.writer = self.writer, None
        if writer is None:
            return
        writer.close()
        if remove_if_empty and writer.committed["steps"] == 0:
            os.remove(writer.path)
