"""``DualFormRecorder``: the dual form of a model trained by a plain PyTorch or Lightning Fabric loop.

The framework-free adapter of :class:`~lightning_dualform.record.engine.RecordingEngine`. It finds steps
through the optimizer's step hooks and measures, at every step, the factor between the gradient its rows
give and the one the optimizer applied: clipping by hand or by ``fabric.clip_gradients``, DDP averaging
and loss scaling all multiply every gradient entry of a layer by one number, which a float32 random
projection of ``W.grad`` recovers (to about 1e-6; snapped to ``2^k / world_size`` within 1e-5, the
exact value of a loss scale or DDP average). The same projection checks that the rows explain the
gradient; a layer whose gradient was changed otherwise is recorded as inexact.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from lightning_dualform._unwrap import unwrap_model
from lightning_dualform.attend.certificate import certify_store
from lightning_dualform.errors import InexactError
from lightning_dualform.record.batches import BatchInfo
from lightning_dualform.record.capture import find_layers
from lightning_dualform.record.engine import RecordingEngine
from lightning_dualform.record.options import LayoutChoice, RecordOptions, RowDtype
from lightning_dualform.record.planner import Plan
from lightning_dualform.record.policy import RunFacts, inexact_causes, refusal
from lightning_dualform.record.specs import Distributed, rank_path
from lightning_dualform.store import check_replaceable
from lightning_dualform.store.shards import check_index_path

__all__ = ["DualFormRecorder"]

log = logging.getLogger(__name__)
_OWNER = "DualFormRecorder"
_STATE_VERSION = 1


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside Fabric's optimizer wrapper (its public ``optimizer`` property)."""
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(f"`{_OWNER}(optimizer=...)` must be a torch.optim.Optimizer (or Fabric's wrapper of one), got {type(optimizer).__name__}.")


class DualFormRecorder:
    """Record the dual form of ``model``'s linear layers while a loop you wrote trains it with ``optimizer``.

    Use it as a context manager around the training loop; every ``optimizer.step()`` inside is recorded (the
    optimizer's step hooks find it). Leaving the block without an exception finishes the store (final
    weights and the certificate); an exception leaves a store that opens at its last committed step.

    Args:
        path: the store to write. Under ``torch.distributed`` each rank writes ``name.rank{r}.h5``.
        model: the model being trained (a ``DistributedDataParallel`` or a module from ``fabric.setup`` is fine).
        optimizer: its optimizer (or the one ``fabric.setup`` returned).
        layers, dtype, compression, chunk_rows, exact, overwrite, max_queue, certify, store_inputs,
            commit_seconds, check_disk, check_every, layout: as for :class:`~lightning_dualform.DualFormCallback`
            (``check_every`` is ignored: the recorder checks every step, since it measures each step's factor).
        expected_steps: the number of optimizer steps the loop will take, for the disk plan (``None``: the plan
            is printed per step and the disk is not checked).

    Example::

        with DualFormRecorder("run.h5", model, optimizer) as rec:
            for i, (x, y) in zip(indices, loader):
                rec.batch(indices=i, labels=y, inputs=x)   # optional: dataset indices, labels, raw inputs
                loss = loss_fn(model(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        model: nn.Module,
        optimizer: Any,
        layers: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
        *,
        dtype: RowDtype = "float32",
        compression: str | None = None,
        chunk_rows: int | None = None,
        exact: bool = True,
        overwrite: bool = False,
        max_queue: int = 32,
        certify: bool | Literal["full"] = True,
        store_inputs: bool = True,
        commit_seconds: float = 30.0,
        check_disk: bool = True,
        check_every: int = 1,
        layout: LayoutChoice = None,
        expected_steps: int | None = None,
    ) -> None:
        self.options = RecordOptions.checked(
            _OWNER, path, layers, dtype=dtype, compression=compression, chunk_rows=chunk_rows, exact=exact,
            overwrite=overwrite, max_queue=max_queue, certify=certify, store_inputs=store_inputs,
            commit_seconds=commit_seconds, check_disk=check_disk, check_every=check_every, layout=layout,
        )
        if not isinstance(model, nn.Module):
            raise TypeError(f"`{_OWNER}(model=...)` must be a torch.nn.Module, got {type(model).__name__}.")
        if expected_steps is not None and (isinstance(expected_steps, bool) or not isinstance(expected_steps, int) or expected_steps < 1):
            raise ValueError(f"`{_OWNER}(expected_steps={expected_steps!r})` must be None or a positive integer.")
        self.model = unwrap_model(model)
        self.optimizer = unwrap_optimizer(optimizer)
        self.expected_steps = expected_steps
        self.dist = Distributed.current()
        self.path = self.options.path
        self.store_path = rank_path(self.path, self.dist.rank, self.dist.world_size)
        self.epoch = 0
        self._engine: RecordingEngine | None = None
        self._resume: dict[str, Any] | None = None
        self._problems: list[str] = []
        self._early_inputs: list[tuple[torch.Tensor, BatchInfo]] = []

    # ------------------------------------------------------------------------------------------------
    # the public loop interface
    # ------------------------------------------------------------------------------------------------
    def __enter__(self) -> "DualFormRecorder":
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.close()

    def start(self) -> None:
        """Check the run, choose the layers and put the hooks on (``with`` does it)."""
        if self._engine is not None:
            raise RuntimeError(f"{_OWNER} for {self.store_path} is already started.")
        opts = self.options
        self._problems = inexact_causes(RunFacts(
            optimizers=[self.optimizer],
            strategy="DDPStrategy" if self.dist.world_size > 1 else "SingleDeviceStrategy",
            parameter_dtypes=tuple({p.dtype for p in self.model.parameters()}),
        ))
        if self._problems and opts.exact:
            raise InexactError(refusal(_OWNER, self._problems))
        if self._problems:
            warnings.warn(f"{_OWNER}(exact=False): recording an inexact run: " + "; ".join(self._problems), UserWarning, stacklevel=3)
        if os.path.lexists(self.store_path) and self._resume is None:
            check_replaceable(self.store_path)  # a folder, a pipe, a file not HDF5: refused, overwrite or not
        if os.path.lexists(self.store_path) and not opts.overwrite and self._resume is None:
            raise FileExistsError(
                f"{_OWNER}: {self.store_path} already exists. Choose another path, delete it, pass "
                f"`{_OWNER}(..., overwrite=True)` to replace it, or continue it with `load_state_dict(state)` "
                "(the state a checkpoint of this run saved from `state_dict()`)."
            )
        if self.dist.world_size > 1 and not opts.overwrite and self._resume is None:
            check_index_path(self.path, _OWNER)  # rank 0 writes the shard index there: never over another store
        if self._resume is not None and not os.path.exists(self.store_path):
            raise FileNotFoundError(
                f"{_OWNER}: the saved state continues {self.store_path}, but that file is gone. Restore it, or "
                "start a new store without load_state_dict()."
            )
        chosen, notes = find_layers(self.model, opts.layers)
        if not chosen:
            raise ValueError(f"{_OWNER} found no layer to track: the model has no trainable layer of a kind it "
                             "records (nn.Linear, nn.Conv1d, nn.Conv2d with groups=1, nn.Embedding)"
                             + (" matching `layers`." if opts.layers is not None else "."))
        engine = RecordingEngine(opts, _OWNER, certifier=certify_store, info=self._info, warn=self._warn)
        engine.dist = self.dist
        engine.track(chosen, self.optimizer, notes)
        for note in notes:
            self._info(f"{_OWNER}: {note}")
        engine.horizon = self._horizon
        engine.run_exact = not self._problems
        self._engine = engine
        engine.attach()
        engine.active = True
        # every step the optimizer takes, numbered here, its gradient factor measured; the store opens at the first
        engine.hook_optimizer(open_store=self._open, epoch=lambda: self.epoch)

    def batch(self, indices: Any = None, labels: Any = None, inputs: torch.Tensor | None = None, *,
              epoch: int | None = None) -> None:
        """Say what the next forward pass trains on (optional; call it before the forward).

        Args:
            indices: ``(B,)`` dataset index of each example (stored with its rows; ``-1`` without).
            labels: ``(B,)`` integer labels, or per position for sequences (``(B, T)``).
            inputs: ``(B, ...)`` the raw inputs, stored once per example for pictures (with ``store_inputs``).
            epoch: the epoch from now on (stored with each row; default: the last one given, 0 at first).
        """
        if self._engine is None:
            raise RuntimeError(f"`{_OWNER}.batch(...)` must be called inside `with {_OWNER}(...)` (or after start()).")
        if epoch is not None:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"`{_OWNER}.batch(epoch={epoch!r})` must be a non-negative integer.")
            self.epoch = epoch
        idx = _index_tensor(indices)
        lab = None
        if labels is not None:
            lab = torch.as_tensor(labels).detach()
            if lab.is_floating_point() or lab.is_complex():
                raise ValueError(f"`{_OWNER}.batch(labels=...)` must hold integers, got {lab.dtype}.")
            lab = lab.to("cpu", torch.int64)
        size = len(idx) if idx is not None else (lab.shape[0] if lab is not None and lab.dim() else None)
        if idx is not None and lab is not None and lab.dim() and lab.shape[0] != len(idx):
            raise ValueError(f"`{_OWNER}.batch(...)`: {len(idx)} indices but {lab.shape[0]} labels.")
        raw = inputs if isinstance(inputs, torch.Tensor) and self.options.store_inputs else None
        info = BatchInfo(size=size, indices=idx, labels=lab)
        if self._engine.writer is None and raw is not None and idx is not None:
            # the store opens at the first step (the first batches' inputs size /inputs): they wait till then
            self._early_inputs.append((raw, info))
            raw = None
        self._engine.begin_batch(info, raw)

    @property
    def steps(self) -> int:
        """Optimizer steps recorded so far (including those before a resume)."""
        return self._engine.steps_recorded if self._engine is not None else 0

    @property
    def certificate(self) -> dict[str, dict[str, Any]]:
        """Per layer, after :meth:`finish`: ``rel_err`` of the rebuilt weights, ``tolerance``, ``exact``, ``explained``,
        ``method``."""
        if self._engine is None:
            return {}
        return {name: cert.as_dict() for name, cert in self._engine.certificate.items()}

    @property
    def plan(self) -> Plan | None:
        return self._engine.plan if self._engine is not None else None

    @property
    def inexact_layers(self) -> dict[str, str]:
        return dict(self._engine.inexact) if self._engine is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint of the loop must save to continue this store exactly (small, JSON-able): the
        rows so far are made durable first. Save it with the model's and optimizer's state."""
        state = self._engine.state_dict() if self._engine is not None else {}
        if not state:
            return {}
        return {**state, "recorder_version": _STATE_VERSION, "epoch": self.epoch,
                "store_path_resolved": os.path.realpath(self.store_path)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the store a checkpoint's :meth:`state_dict` describes (before :meth:`start`): everything
        the store holds after that point is dropped, and recording goes on from there.

        Raises:
            ValueError: ``state`` is not a recorder's state, or belongs to another store file.
        """
        if self._engine is not None:
            raise RuntimeError(f"`{_OWNER}.load_state_dict(...)` must come before start() (before `with`).")
        if not isinstance(state, dict) or state.get("rows") is None or "steps" not in state:
            raise ValueError(f"`{_OWNER}.load_state_dict(...)`: not a recorder state (expected the dict state_dict() returned).")
        saved = state.get("store_path_resolved") or state.get("store_path")
        if saved is not None and os.path.realpath(saved) != os.path.realpath(self.store_path):
            raise ValueError(
                f"`{_OWNER}.load_state_dict(...)`: the state continues {saved}, but this recorder writes "
                f"{self.store_path}. Pass the same path, or start a new store without load_state_dict()."
            )
        self._resume = dict(state)
        self.epoch = int(state.get("epoch", 0))

    def finish(self) -> None:
        """Finalise the store and compute the certificate (``with`` does it when the block ends normally)."""
        engine = self._engine
        if engine is None:
            return
        engine.unhook_optimizer()
        if engine.writer is None:  # no step was ever taken: nothing to finish
            engine.detach()
            return
        epochs = engine.last_epoch + 1 if engine.last_epoch is not None else 0
        engine.finish(engine.steps_recorded, epochs)

    def close(self) -> None:
        """Stop without finalising (``with`` does it on an exception): the store opens at its last committed step."""
        if self._engine is not None:
            self._engine.close()

    # ------------------------------------------------------------------------------------------------
    # the store, opened at the first step
    # ------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        engine = self._engine
        first = next(iter(engine.chosen.values()))
        engine.set_precision(self._precision(), first.weight.device)
        meta = engine.run_metadata(
            self.model, recorded_by=_OWNER, optimizer_exact=not self._problems, inexact_causes=self._problems,
            gradient_clip_val=0.0, gradient_clip_algorithm="measured", accumulate_grad_batches=0,
        )
        resume = self._resume
        raw = self._early_inputs[0][0] if self._early_inputs else None
        engine.open(self.store_path, meta, raw=raw, resume=resume,
                    last_step=int(resume["steps"]) - 1 if resume is not None else None,
                    shard_index=[rank_path(self.path, r, self.dist.world_size) for r in range(self.dist.world_size)]
                    if self.dist.world_size > 1 and self.dist.rank == 0 else None)
        current = engine.batch
        for early_raw, info in self._early_inputs:  # the first batches' raw inputs, now that /inputs exists
            engine.begin_batch(info, early_raw)
        self._early_inputs = []
        if current is not None:
            engine.begin_batch(current)

    def _precision(self) -> str:
        """The training precision as Lightning names it, from what the captured calls saw."""
        dtypes = {p.dtype for p in self.model.parameters()}
        if torch.float64 in dtypes:
            return "64-true"
        for cap in self._engine.captures.values():
            for call in cap.calls:
                if call.keys.is_floating_point() and call.keys.dtype in (torch.bfloat16, torch.float16):
                    return "bf16-mixed" if call.keys.dtype == torch.bfloat16 else "16-mixed"
        return "32-true"

    def _horizon(self) -> tuple[int, float, int]:
        if self.expected_steps is None:
            return 0, math.inf, 0
        return self.expected_steps - self.steps, 1.0, 0

    def _info(self, msg: str) -> None:
        if self.dist.rank == 0:
            log.info(msg)

    def _warn(self, msg: str) -> None:
        if self.dist.rank == 0:
            warnings.warn(msg, UserWarning, stacklevel=4)


def _index_tensor(indices: Any) -> torch.Tensor | None:
    if indices is None:
        return None
    t = torch.as_tensor(indices).detach()
    if t.is_floating_point() or t.is_complex() or t.dim() > 1:
        raise ValueError(f"`{_OWNER}.batch(indices=...)` must be one integer index per example, got {t.dtype} {tuple(t.shape)}.")
    return t.to("cpu", torch.int64).reshape(-1)

