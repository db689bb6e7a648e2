"""``DualFormCallback``: records the dual form of a Lightning model's linear layers while it trains.

The Lightning adapter of :class:`~lightning_dualform.record.engine.RecordingEngine`: it tells the engine
what Lightning knows (the global step, the epoch, the batch's dataset indices, clipping, loss scaling, DDP
ranks, checkpoints) and records test/validate/predict queries after fit. The recording itself lives in
the engine.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from typing import Any, Callable, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lightning_dualform._compat import observe_dataloaders, observe_norm_clipping
from lightning_dualform.attend.certificate import certify_store
from lightning_dualform.errors import DiskSpaceError, InexactError, StoreError
from lightning_dualform.record.batches import (
    BatchInfo,
    batch_indices,
    batch_inputs,
    batch_labels,
    batch_size,
    unwrap_dataloader,
    wrap_dataloader,
)
from lightning_dualform.record import trainer_logging
from lightning_dualform.record.attention_logging import DualFormAttentionLogger
from lightning_dualform.record.capture import find_layers
from lightning_dualform.record.engine import RecordingEngine
from lightning_dualform.record.gradient_check import clip_coefficient, total_norm
from lightning_dualform.record.options import LayoutChoice, RecordOptions, RowDtype
from lightning_dualform.record.planner import Plan
from lightning_dualform.record.policy import RunFacts, inexact_causes, refusal
from lightning_dualform.record.queries import QueryRecorder
from lightning_dualform.record.specs import Distributed, rank_path
from lightning_dualform.store.certificate import LayerCertificate
from lightning_dualform.store.metadata import clip_algorithm_name
from lightning_dualform.store import StoreReader, check_replaceable
from lightning_dualform.store.shards import check_index_path

__all__ = ["DualFormCallback", "rank_path"]

_QUERY_STAGES = ("test", "validate", "predict")
_OWNER = "DualFormCallback"


class DualFormCallback(Callback):
    """Record every tracked layer's training keys and values into an HDF5 store.

    With SGD (any momentum, dampening, Nesterov, weight decay, ``maximize``) the store rebuilds each tracked
    layer exactly as attention over its training rows::

        W_T x = a W_0 x + sum_rows c_step(row) * v_row * (k_row . x)

    and with Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop, Adadelta, ASGD or Adafactor (every flag) as
    attention with a key per output unit, ``W_T[u] x = base_u(x) + sum_rows v_row[u] ((Q_step[u] (.) k_row) . x)``,
    ``Q`` replayed from the stored optimizer state (``docs/dual-form.md``); schedules, param groups, norm
    clipping, gradient accumulation, DDP and mixed precision (to its documented tolerance) for all of them.

    Args:
        path: the store to write (``.h5``). Under DDP each rank writes ``name.rank{r}.h5``.
        layers: ``None`` tracks every trainable layer of a supported kind in the LightningModule (``nn.Linear``,
            ``nn.Conv1d``, ``nn.Conv2d`` with ``groups=1``, ``nn.Embedding``; the start-up messages say what is
            left out and why); a list of ``named_modules()`` names, or a predicate ``(name, module) -> bool``,
            narrows it.
        dtype: stored row type: ``"float32"`` (exact), ``"float16"`` or ``"bfloat16"`` (half the disk,
            about 1e-3 / 1e-2 relative error in rebuilt outputs).
        compression: ``None``, ``"lzf"``, ``"gzip"``, ``"gzip-N"``; ``"lz4"``, ``"zstd"``, ``"blosc-zstd"``
            with the optional ``hdf5plugin``. Lossless, but written through HDF5's filter pipeline on one
            thread: slower than fast training produces rows (lzf made an H200 fit 8x slower,
            ``docs/benchmarks.md``). Training that waits on the writer gets a warning.
        chunk_rows: rows per HDF5 chunk of keys and values (at most 2^20); ``None`` sizes chunks to about
            512 KiB per layer.
        exact: ``True`` refuses runs that the dual form cannot rebuild exactly (an optimizer whose step is not
            linear in the gradient, such as Rprop or LBFGS; value clipping, custom clipping). ``False`` records
            them anyway and stores the residual between the real weights and the memory's rebuild.
        overwrite: replace an existing file at ``path`` (otherwise an existing file is an error).
        index_key: where a batch carries each example's dataset index: a key of a dict batch, or a position
            in a tuple batch. Without it, indices are observed from the DataLoader's sampler; an
            ``IterableDataset`` without them stores -1.
        label_key: key (dict batch) or position (tuple batch) of the labels; default: ``"label"``,
            ``"labels"``, ``"y"``, ``"target"``, ``"targets"``, or the second element of a tuple batch
            when it is an integer tensor.
        max_queue: optimizer steps that may wait for the writer before training blocks.
        certify: the exactness certificate. ``True``: as training goes, from random projections of each step's
            rows (no second pass over the store; ``record/sketch.py`` says what it proves); runs it cannot cover
            (an inexact run, a non-SGD rule, a resume from an older checkpoint) are certified by reading the
            store once at fit end. ``"full"``: also read the store at fit end, which keeps the memory's sums
            for ``DualInference.attend``'s ``dual`` (one product per block instead of two). ``False``: none.
        record_queries: stages whose inputs are stored as queries: any of ``"test"``, ``"validate"``,
            ``"predict"`` (during ``trainer.test/validate/predict`` after fit, into the same store).
        store_inputs: store each training example's raw input once (for pictures of what a query attends to).
        input_key: key (dict batch) or position (tuple batch) of the raw input; default: ``"x"``,
            ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, or the first element of a tuple batch.
        commit_seconds: the writer makes rows durable at least this often (and at every epoch end and checkpoint).
        check_every: the captured rows of each layer are checked against the gradient autograd accumulated in
            its weight (a cheap random projection of ``W.grad = sum v k^T``) on the first 20 steps of a fit and
            then every ``check_every`` steps; ``1`` checks every step.
        layout: how the tracked layers' calls of leading shape ``(B, B, ...)`` are laid out, where a sequence
            length equals the batch size and batch first ``(B, T, ...)`` cannot be told from sequence first
            ``(T, B, ...)`` (``nn.Transformer``'s default): ``"batch_first"``, ``"sequence_first"``, or a dict of
            layer names to one of them. ``None``: such calls' rows are stored without dataset indices (-1), with a
            warning. Calls whose shape says it are laid out by their shape.
        check_disk: after the first step, estimate the store's size for the whole run (printed) and refuse to
            go on when it exceeds the free space of the target disk.
        log_attention_every_n_epochs: deprecated: put
            :class:`~lightning_dualform.DualFormAttentionLogger` ``(every_n_epochs=N, queries=k)`` beside this
            callback instead (it is what this argument still runs, with ``log_attention_queries`` as ``queries``).
        log_attention_queries: deprecated, see ``log_attention_every_n_epochs``.

    Whatever loggers the Trainer has also get, under ``dualform/`` and with the epoch, the store's rows and
    bytes and the time training waited for the writer (every ``log_every_n_steps`` optimizer steps and at each
    epoch's end) and the certificate per layer at fit end. Without a logger nothing is logged.

    Example::

        trainer = L.Trainer(callbacks=[DualFormCallback("runs/mnist.h5")], max_epochs=5)
        trainer.fit(model, datamodule)
    """

    def __init__(
        self,
        path: str | os.PathLike = "dualform.h5",
        layers: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
        *,
        dtype: RowDtype = "float32",
        compression: str | None = None,
        chunk_rows: int | None = None,
        exact: bool = True,
        overwrite: bool = False,
        index_key: str | int = "index",
        label_key: str | int | None = None,
        max_queue: int = 32,
        certify: bool | Literal["full"] = True,
        record_queries: Sequence[str] = (),
        store_inputs: bool = True,
        input_key: str | int | None = None,
        commit_seconds: float = 30.0,
        check_disk: bool = True,
        check_every: int = 50,
        layout: LayoutChoice = None,
        log_attention_every_n_epochs: int | None = None,
        log_attention_queries: int = 4,
    ) -> None:
        for name, value in (("log_attention_every_n_epochs", log_attention_every_n_epochs), ("log_attention_queries", log_attention_queries)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{_OWNER}({name}={value!r})` must be a positive integer" + (" or None." if name.startswith("log_attention_every") else "."))
        self.options = RecordOptions.checked(
            _OWNER, path, layers, dtype=dtype, compression=compression, chunk_rows=chunk_rows, exact=exact,
            overwrite=overwrite, max_queue=max_queue, certify=certify, store_inputs=store_inputs,
            commit_seconds=commit_seconds, check_disk=check_disk, check_every=check_every, layout=layout,
        )
        bad_stages = [q for q in record_queries if q not in _QUERY_STAGES]
        if isinstance(record_queries, str) or bad_stages:
            raise ValueError(f"`{_OWNER}(record_queries={record_queries!r})`: expected a tuple of {_QUERY_STAGES}.")
        self.path = self.options.path
        self.index_key = index_key
        self.label_key = label_key
        self.input_key = input_key
        self.record_queries = tuple(record_queries)
        self.log_attention_every_n_epochs = log_attention_every_n_epochs
        self.log_attention_queries = log_attention_queries
        #: what ``log_attention_every_n_epochs`` still runs (a second job belongs in a second callback)
        self._attention: DualFormAttentionLogger | None = None
        if log_attention_every_n_epochs is not None:
            rank_zero_deprecation(
                f"`{_OWNER}(log_attention_every_n_epochs={log_attention_every_n_epochs})` is deprecated: add "
                f"`DualFormAttentionLogger(every_n_epochs={log_attention_every_n_epochs}, "
                f"queries={log_attention_queries})` "
                f"to the Trainer's callbacks beside `{_OWNER}` instead (it runs that callback for now)."
            )
            self._attention = DualFormAttentionLogger(log_attention_every_n_epochs, log_attention_queries)
            self._attention.bind(self)
        self.store_path: str | None = None
        self._engine: RecordingEngine | None = None
        self._resume: dict[str, Any] | None = None
        self._committed: dict[str, Any] | None = None  # counts after fit: what a later checkpoint holds
        self._certificate: dict[str, LayerCertificate] = {}
        self._plan: Plan | None = None
        self._recorders: dict[int, deque] = {}  # id(DataLoader) -> this callback's FIFO of observed indices
        self._wrapped: list[Any] = []
        self._undo_observe: Callable[[], None] | None = None
        self._undo_clip: Callable[[], None] | None = None  # Lightning's norm clipping hands its norm over
        self._clip_seen = 1.0  # the factor the last clipping applied, until the step that used it is recorded
        self._measure_factor = False  # each step's gradient factor measured (a custom configure_gradient_clipping)
        self._query: QueryRecorder | None = None
        self._query_note: str | None = None  # said when the stage's progress bar is done (teardown)
        self._logged_step = -1  # the global step whose progress the loggers last got
        self._dataset_size = 0
        self._batch_input_bytes = 0

    # ------------------------------------------------------------------------------------------------
    # what the fit produced
    # ------------------------------------------------------------------------------------------------
    @property
    def certificate(self) -> dict[str, dict[str, Any]]:
        """Per layer, after fit: ``rel_err`` of the rebuilt weights, ``tolerance``, ``exact``, ``explained``,
        ``method`` (:meth:`~lightning_dualform.store.certificate.LayerCertificate.as_dict`)."""
        certs = self._engine.certificate if self._engine is not None else self._certificate
        if not certs and self._engine is None and self.options.certify:
            warnings.warn(f"{_OWNER}.certificate: no fit ran in this process (under strategy='ddp_spawn' the fit "
                          "runs in worker processes): read the certificate from the store, `lightning-dualform info "
                          f"{self.path}` or DualInference(path).layer(name).certificate.", UserWarning, stacklevel=2)
        return {name: cert.as_dict() for name, cert in certs.items()}

    @property
    def recording(self) -> bool:
        """Whether the store is open for writing (during fit, from the first batch on)."""
        return self._engine is not None and self._engine.writer is not None

    def commit(self) -> None:
        """Make every row recorded so far durable and visible to readers (waits for the writer; nothing to do
        when not :attr:`recording`). What a reader opening the store during fit then sees."""
        if self.recording:
            self._engine.state_dict()

    @property
    def plan(self) -> Plan | None:
        """The store-size plan made after the first step."""
        return self._engine.plan if self._engine is not None else self._plan

    @property
    def inexact_layers(self) -> dict[str, str]:
        """Layers recorded as inexact during fit, with the reason (empty for an exact run)."""
        return dict(self._engine.inexact) if self._engine is not None else {}

    # ------------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" and stage not in self.record_queries:
            return

        def observe(dataloader: Any) -> None:
            rec = wrap_dataloader(dataloader)
            if rec is not None and id(dataloader) not in self._recorders:
                self._recorders[id(dataloader)] = rec.queue()  # this callback's own FIFO of indices
                self._wrapped.append(dataloader)

        # Indices a batch carries need no observing; without them, watch the samplers (see _compat.py).
        self._undo_observe = observe_dataloaders(trainer.strategy, observe)

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._engine is not None and self._engine.writer is not None:
            state = self._engine.state_dict()
        elif self._committed is not None:
            state = {"format_version": 1, "store_path": self.store_path, **self._committed}
        else:
            state = {}
        if state and self.store_path is not None:
            state["store_path_resolved"] = os.path.realpath(self.store_path)
        dist = self._engine.dist if self._engine is not None else None
        if dist is not None and dist.world_size > 1:
            # Lightning saves rank 0's callback state only: it carries every rank's counts, each for its own shard
            # (every rank takes this call: a checkpoint is saved by all of them)
            ranks = dist.all_gather_object(state)
            return {**state, "ranks": ranks} if state else {}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) if state_dict.get("rows") is not None else None

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        # Lightning files a callback's state under a key that holds the path as given: a store moved or given
        # another spelling finds none of its own. The checkpoint's one recording is then a candidate, which
        # on_fit_start takes only for the same store (_resume_matches); load_state_dict, called after this,
        # replaces it where the key matches.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        ours = [s for k, s in states.items() if isinstance(k, str) and k.startswith(f"{type(self).__name__}{{")
                and isinstance(s, dict) and s.get("rows") is not None]
        if len(ours) == 1:
            self._resume = dict(ours[0])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(path=self.path)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        opts = self.options
        problems = inexact_causes(RunFacts(
            optimizers=list(trainer.optimizers),
            manual_optimization=not pl_module.automatic_optimization,
            clip_algorithm=(trainer.gradient_clip_algorithm or "norm") if trainer.gradient_clip_val else None,
            precision=str(trainer.precision),
            strategy=type(trainer.strategy).__name__,
        ))
        if problems and opts.exact:
            raise InexactError(refusal(_OWNER, problems))
        if problems:
            rank_zero_warn(f"{_OWNER}(exact=False): recording an inexact run: " + "; ".join(problems))
        chosen, notes = find_layers(pl_module, opts.layers)
        if not chosen:
            raise ValueError(
                f"{_OWNER} found no layer to track: the model has no trainable layer of a kind it records "
                "(nn.Linear, nn.Conv1d, nn.Conv2d with groups=1, nn.Embedding)"
                + (" matching `layers`." if opts.layers is not None else ".")
            )
        engine = RecordingEngine(opts, _OWNER, certifier=certify_store, info=rank_zero_info, warn=rank_zero_warn)
        engine.track(chosen, trainer.optimizers[0] if trainer.optimizers else None, notes)
        for note in notes:
            rank_zero_info(f"{_OWNER}: {note}")
        engine.dist = _distributed(trainer)
        engine.set_precision(str(trainer.precision), trainer.strategy.root_device)
        # a configure_gradient_clipping of the module's own may scale the gradients in any way: each step's factor
        # is then measured from the weights' .grad (the check, every step, marks a layer whose change is no scaling)
        self._measure_factor = is_overridden("configure_gradient_clipping", pl_module)
        if not self._measure_factor and trainer.gradient_clip_val and (trainer.gradient_clip_algorithm or "norm") == "norm":
            self._undo_clip = observe_norm_clipping(trainer.precision_plugin, self._clipped)
        engine.horizon = lambda: self._horizon(trainer)
        engine.run_exact = not problems
        self._engine = engine
        self._problems = problems
        self._logged_step = -1
        self.store_path = rank_path(self.path, trainer.global_rank, trainer.world_size)
        self._own_rank_state(trainer)
        other = None
        if self._resume is not None and not self._resume_matches():
            other = self._resume.get("store_path_resolved") or self._resume.get("store_path")
            self._resume = None  # a checkpoint of another store: this run starts its own
        if os.path.lexists(self.store_path) and self._resume is None:
            check_replaceable(self.store_path)  # a folder, a pipe, a file not HDF5: refused, overwrite or not
        if os.path.lexists(self.store_path) and not opts.overwrite and self._resume is None:
            if other is not None:
                how = (f"The checkpoint being resumed recorded into {other}, and this file is not that store (nor "
                       "one moved or copied from it): resume with the store the checkpoint wrote, record into "
                       "another path, or pass overwrite=True to replace this file with a new store from this step.")
            elif self._committed is not None:
                how = ("This callback recorded it in an earlier trainer.fit: a second fit records into another "
                       "path, or continues this store from a checkpoint of the first fit (trainer.fit(..., "
                       "ckpt_path=...)).")
            else:
                how = (f"Choose another path, delete it, pass `{_OWNER}(..., overwrite=True)` to replace it, or "
                       "resume the run that wrote it with `trainer.fit(..., ckpt_path=...)` to continue it.")
            raise FileExistsError(f"{_OWNER}: {self.store_path} already exists. {how}")
        if trainer.world_size > 1 and not opts.overwrite and self._resume is None:
            check_index_path(self.path, _OWNER)  # rank 0 writes the shard index there: never over another store

    def _resume_matches(self) -> bool:
        """Whether the checkpoint's counts belong to this store: the same file, however its path is spelled, or a
        store moved or copied here with its folder (it was created when the checkpoint's was)."""
        saved = self._resume.get("store_path_resolved") or self._resume.get("store_path")
        if saved is None or os.path.realpath(saved) == os.path.realpath(self.store_path):
            return True
        created = self._resume.get("created")
        if not created or not os.path.isfile(self.store_path):
            return False
        try:
            with StoreReader(self.store_path) as store:
                return bool(store.meta.created == created)
        except (StoreError, OSError):
            return False

    def _own_rank_state(self, trainer: "pl.Trainer") -> None:
        """Under DDP, the checkpoint's counts of this rank's shard (it holds every rank's: :meth:`state_dict`)."""
        if self._resume is None or trainer.world_size <= 1 and "ranks" not in self._resume:
            return
        ranks = self._resume.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != trainer.world_size:
            if self.options.overwrite:
                self._resume = None  # a new store from this step, as asked
                return
            if isinstance(ranks, list):
                why = f"was saved by a run of {len(ranks)} processes and this one has {trainer.world_size}"
                fix = f"resume it with {len(ranks)} processes"
            else:
                rank0 = str(self._resume.get("store_path", "")).endswith(".rank0.h5")
                why = ("holds one process's store counts: " + (
                    "rank 0's of a DDP run saved before checkpoints carried every rank's" if rank0
                    else "a single-process run's"))
                fix = "resume it with one process" if not rank0 else "record the resumed run into another path"
            raise ValueError(
                f"{_OWNER}: the checkpoint {why}; each process continues its own shard of the store, so {fix}, "
                "record into another path, or pass overwrite=True to start a new store from this step.")
        mine = ranks[trainer.global_rank]
        self._resume = dict(mine) if isinstance(mine, dict) and mine.get("rows") is not None else None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Hooks go on now; the store opens at the first batch, once optimizer state and global step are
        # restored (a resume) and the input shape is known.
        engine = self._engine
        engine.attach()
        engine.hook_optimizer()  # each step as on_before_optimizer_step describes it (expect_step)

    def _open_store(self, trainer: "pl.Trainer", batch: Any) -> None:
        opts = self.options
        resume = self._resume if (self._resume and os.path.exists(self.store_path) and not opts.overwrite) else None
        if self._resume and resume is None and not opts.overwrite:
            raise FileNotFoundError(
                f"{_OWNER}: resuming from a checkpoint that recorded into {self.store_path}, but that file "
                "is gone. Restore it, or pass `overwrite=True` (or another path) to start a new store from this step."
            )
        raw = batch_inputs(batch, self.input_key) if opts.store_inputs else None
        self._batch_input_bytes = int(raw[0].numel() * raw.element_size()) if raw is not None and len(raw) else 0
        try:
            self._dataset_size = len(trainer.train_dataloader.dataset)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            self._dataset_size = 0
        engine = self._engine
        meta = engine.run_metadata(
            trainer.lightning_module,
            recorded_by=_OWNER,
            optimizer_exact=not self._problems,
            inexact_causes=self._problems,
            gradient_clip_val=0.0 if self._measure_factor else float(trainer.gradient_clip_val or 0.0),
            gradient_clip_algorithm="measured" if self._measure_factor else clip_algorithm_name(
                trainer.gradient_clip_algorithm or "norm"),
            accumulate_grad_batches=int(trainer.accumulate_grad_batches),
        )
        shards = None
        if trainer.world_size > 1 and trainer.global_rank == 0:
            shards = [rank_path(self.path, r, trainer.world_size) for r in range(trainer.world_size)]
        engine.open(self.store_path, meta, raw=raw, resume=resume, last_step=int(trainer.global_step) - 1,
                    shard_index=shards)

    def _horizon(self, trainer: "pl.Trainer") -> tuple[int, float, int]:
        batches = trainer.num_training_batches
        steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        epochs = math.inf
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            epochs = trainer.max_epochs - trainer.current_epoch
        if trainer.max_steps is not None and trainer.max_steps >= 0 and steps_per_epoch:
            epochs = min(epochs, (trainer.max_steps - trainer.global_step) / steps_per_epoch)
        elif trainer.max_steps is not None and trainer.max_steps >= 0:  # a loader without a length: max_steps is the run
            steps_per_epoch, epochs = max(trainer.max_steps - trainer.global_step, 0), 1.0
        input_bytes = 0
        if self.options.store_inputs and self._batch_input_bytes and self._dataset_size:
            input_bytes = self._batch_input_bytes * self._dataset_size
        return steps_per_epoch, epochs, input_bytes

    # ------------------------------------------------------------------------------------------------
    # per batch and step
    # ------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        engine = self._engine
        if engine is None or not engine.captures:
            return
        if engine.writer is None:
            self._open_store(trainer, batch)
        indices = self._batch_indices(trainer, trainer.train_dataloader, batch)
        labels = batch_labels(batch, self.label_key)
        size = len(indices) if indices is not None else (labels.shape[0] if labels is not None else batch_size(batch))
        raw = batch_inputs(batch, self.input_key) if self.options.store_inputs else None
        engine.begin_batch(BatchInfo(size=size, indices=indices, labels=labels), raw)

    def _batch_indices(self, trainer: "pl.Trainer", dl: Any, batch: Any) -> torch.Tensor | None:
        fifo = self._recorders.get(id(dl))
        observed = None
        if fifo:
            item = fifo.popleft()
            observed = torch.as_tensor(item if isinstance(item, (list, tuple)) else [item], dtype=torch.int64).reshape(-1)
        carried = batch_indices(batch, self.index_key)
        if carried is not None:
            return carried
        if observed is not None:
            return observed
        self._engine.warn_once(
            "no-index",
            f"{_OWNER}: the training dataloader has no sampler to observe (an IterableDataset or a custom "
            "loader); dataset indices are stored as -1. Put each example's index in the batch under "
            f"`index_key` ({self.index_key!r}: a dict key, or a position in a tuple batch) to record them.",
        )
        return None

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer) -> None:
        engine = self._engine
        if engine is None or engine.writer is None:
            return
        # The rows carry the loss scale; Lightning has unscaled the gradients by now and clips them next
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        scale = self._world_scale(trainer) / loss_scale
        if self._measure_factor:
            engine.expect_step(int(trainer.global_step), int(trainer.current_epoch), None)
        elif self._undo_clip is not None:  # the clipping right after this hook tells its factor: taken at the step
            self._clip_seen = 1.0
            engine.expect_step(int(trainer.global_step), int(trainer.current_epoch), lambda: self._clip_seen * scale)
        else:
            engine.expect_step(int(trainer.global_step), int(trainer.current_epoch),
                               self._clip_factor(trainer, optimizer) * scale)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int) -> None:
        engine = self._engine
        if engine is None:
            return
        # a step Lightning counted that the optimizer never took (a loss scaler skipped it) is recorded as skipped
        engine.end_batch()
        if trainer.loggers and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log_progress(trainer)

    def _log_progress(self, trainer: "pl.Trainer") -> None:
        """The store's progress on the loggers, once per optimizer step (a batch of an accumulation that took no
        step, or the epoch's end right after a logged step, adds nothing)."""
        engine = self._engine
        if engine is not None and engine.writer is not None and int(trainer.global_step) != self._logged_step:
            self._logged_step = int(trainer.global_step)
            trainer_logging.log_progress(trainer, engine.rows_recorded, self.store_path, engine.writer.blocked_s,
                                         epoch=int(trainer.current_epoch))

    def _clip_factor(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer) -> float:
        """The factor Lightning's norm clipping (right after this hook) multiplies the gradients by, computed
        as ``torch.nn.utils.clip_grad_norm_`` computes it (a plugin that clips its own way: see on_fit_start)."""
        if not trainer.gradient_clip_val or (trainer.gradient_clip_algorithm or "norm") != "norm":
            return 1.0
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return clip_coefficient(total_norm(grads), float(trainer.gradient_clip_val)) if grads else 1.0

    def _clipped(self, total: torch.Tensor, clip_val: float) -> None:
        """Lightning's norm clipping ran (:func:`~lightning_dualform._compat.observe_norm_clipping`)."""
        self._clip_seen = clip_coefficient(total, clip_val)

    @staticmethod
    def _world_scale(trainer: "pl.Trainer") -> float:
        from lightning.pytorch.strategies import DDPStrategy

        return 1.0 / trainer.world_size if isinstance(trainer.strategy, DDPStrategy) else 1.0

    # ------------------------------------------------------------------------------------------------
    # durability and the end
    # ------------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._engine is not None:
            self._engine.commit_soon()
            self._log_progress(trainer)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._attention is not None:  # (the deprecated log_attention_every_n_epochs)
            self._attention.on_validation_epoch_end(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        engine = self._engine
        if engine is None or engine.writer is None:
            return
        # Lightning has already advanced current_epoch when fit ends: count the epochs that ran steps
        epochs = engine.last_epoch + 1 if engine.last_epoch is not None else 0
        engine.finish(int(trainer.global_step), epochs)
        trainer_logging.log_certificate(trainer, engine.certificate, epoch=max(epochs - 1, 0))
        self._committed = engine.committed
        self._certificate = engine.certificate
        self._plan = engine.plan

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._query_abort()
        if self._engine is not None:
            refused_at_start = isinstance(exception, DiskSpaceError) and not self._resume
            self._engine.close(remove_if_empty=refused_at_start)  # a refused plan leaves no empty store

    # ------------------------------------------------------------------------------------------------
    # query recording (trainer.test / validate / predict after fit): see queries.py
    # ------------------------------------------------------------------------------------------------
    def _query_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", split: str) -> None:
        if split not in self.record_queries or trainer.sanity_checking:
            return
        if self.recording:
            return  # validation inside fit is not a query set; the store is busy recording then
        from lightning.pytorch.trainer.states import TrainerFn

        if split == "validate" and trainer.state.fn != TrainerFn.VALIDATING:
            return
        path = self.store_path or rank_path(self.path, trainer.global_rank, trainer.world_size)
        self._query = QueryRecorder.start(path, split, pl_module, self.options.layout_of)
        # the stage's own progress bar counts the batches; this says what the callback does beside them
        rank_zero_info(f"{_OWNER}: recording the {split} queries (inputs of {len(self._query.captures)} layer(s)) "
                       f"into {path}")

    def _query_batch_start(self, trainer: "pl.Trainer", batch: Any, dataloader_idx: int, loaders: Any) -> None:
        if self._query is not None:
            dl = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
            fifo = self._recorders.get(id(dl))
            indices = batch_indices(batch, self.index_key)
            if fifo:
                item = fifo.popleft()
                if indices is None:
                    indices = torch.as_tensor(item if isinstance(item, (list, tuple)) else [item], dtype=torch.int64).reshape(-1)
            self._query.batch_start(batch, indices, batch_labels(batch, self.label_key), batch_inputs(batch, self.input_key))

    def _query_batch_end(self, outputs: Any) -> None:
        if self._query is not None:
            self._query.batch_end(outputs)

    def _query_end(self) -> None:
        """The stage ended: commit its query set (said at teardown, once the stage's progress bar is done)."""
        query, self._query = self._query, None
        if query is not None:
            self._query_note = f"{_OWNER}: {query.close()}"

    def _query_abort(self) -> None:
        """The stage failed: the store keeps the query sets it had before the stage began."""
        query, self._query = self._query, None
        if query is not None:
            query.abort()
            rank_zero_info(f"{_OWNER}: the {query.split} stage failed; {query.path} keeps its query sets as they were.")

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
        if self._attention is not None and self._engine is not None:  # (the deprecated log_attention_every_n_epochs)
            self._attention.on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

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
        note, self._query_note = self._query_note, None
        if note is not None:
            rank_zero_info(note)
        if self._undo_observe is not None:
            self._undo_observe()
            self._undo_observe = None
        if self._undo_clip is not None:
            self._undo_clip()
            self._undo_clip = None
        for dl in self._wrapped:
            unwrap_dataloader(dl)
        self._wrapped.clear()
        self._recorders.clear()
        if self._engine is not None:
            if self._engine.writer is not None:  # fit ended without on_fit_end (e.g. interrupted): keep what is there
                self._engine.close()
            else:
                self._engine.detach()


def _distributed(trainer: "pl.Trainer") -> Distributed:
    return Distributed(int(trainer.global_rank), int(trainer.world_size)) if trainer.world_size > 1 else Distributed()
