"""``DualFormAttentionLogger``: the attention picture of a few validation inputs, on the Trainer's loggers.

A callback of its own beside :class:`~lightning_dualform.DualFormCallback`, as Lightning's
``LearningRateMonitor`` stands beside ``ModelCheckpoint``: the recording callback writes the store, this one
reads it. Every ``every_n_epochs`` validation epochs it attends over the store as committed then (one pass over
the rows) for the first ``queries`` validation inputs, and hands the demo's picture
(:func:`~lightning_dualform.plots.attention_image`) to every logger that takes images: a ``log_image`` method
(W&B, Neptune, Comet), a TensorBoard ``SummaryWriter`` (``add_image``) or an MLflow client (``log_image``).
With no such logger nothing is computed.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_dualform.record.batches import batch_indices, batch_inputs, batch_labels
from lightning_dualform.record.trainer_logging import PREFIX

if TYPE_CHECKING:
    from lightning_dualform.record.callback import DualFormCallback

__all__ = ["DualFormAttentionLogger"]

_OWNER = "DualFormAttentionLogger"
#: the tag the picture is logged under
TAG = f"{PREFIX}attention"


class DualFormAttentionLogger(Callback):
    """Log the attention picture of the first validation inputs every few epochs, where a logger takes images.

    Args:
        every_n_epochs: draw after every this many validation epochs (one pass over the rows each time).
        queries: how many validation inputs (the first of the first validation batch) the picture shows.
        top_k: training patterns shown per query and layer.
        store: which :class:`~lightning_dualform.DualFormCallback` to read, by its ``path``, when the Trainer
            has several (default: the only one).

    Raises:
        ValueError: a bad argument.
        MisconfigurationException: (at ``setup``) the Trainer has no ``DualFormCallback`` to read, or several
            and ``store`` names none of them.

    Example::

        trainer = L.Trainer(callbacks=[DualFormCallback("runs/mnist.h5"), DualFormAttentionLogger(every_n_epochs=2)],
                            logger=TensorBoardLogger("logs"))
    """

    def __init__(self, every_n_epochs: int = 1, queries: int = 4, *, top_k: int = 5, store: str | None = None) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("queries", queries), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{_OWNER}({name}={value!r})` must be a positive integer.")
        self.every_n_epochs = every_n_epochs
        self.queries = queries
        self.top_k = top_k
        self.store = store
        self._source: DualFormCallback | None = None
        self._batch: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self._warned = False

    def bind(self, source: "DualFormCallback") -> None:
        """Read the store ``source`` writes (the Trainer's ``DualFormCallback`` is found at ``setup`` otherwise)."""
        self._source = source

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self._source is not None or stage != "fit":
            return
        from lightning_dualform.record.callback import DualFormCallback

        found = [cb for cb in trainer.callbacks if isinstance(cb, DualFormCallback)]
        if self.store is not None:
            found = [cb for cb in found if str(cb.path) == str(self.store)]
        if len(found) != 1:
            paths = [str(cb.path) for cb in trainer.callbacks if isinstance(cb, DualFormCallback)]
            raise MisconfigurationException(
                f"Cannot use `{_OWNER}` with a Trainer that has "
                + ("no DualFormCallback: add one (it writes the store this callback reads)." if not paths else
                   f"DualFormCallbacks writing {paths}: pass `{_OWNER}(store=...)` with one of these paths.")
            )
        self._source = found[0]

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        src = self._source
        if batch_idx or dataloader_idx or self._batch is not None or trainer.sanity_checking or src is None:
            return
        raw = batch_inputs(batch, src.input_key)
        if raw is not None:
            k = self.queries
            labels = batch_labels(batch, src.label_key)
            indices = batch_indices(batch, src.index_key)
            self._batch = (raw[:k].detach().cpu(), None if labels is None else labels[:k],
                           None if indices is None else indices[:k])

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        src = self._source
        if (src is None or trainer.sanity_checking or self._batch is None or not src.recording
                or (trainer.current_epoch + 1) % self.every_n_epochs
                or not any(takes_images(lg) for lg in trainer.loggers)):
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if not self._warned:
                self._warned = True
                rank_zero_warn(f"{_OWNER}: the picture needs matplotlib (pip install 'lightning-dualform[plot]'); "
                               "nothing is drawn.")
            return
        src.commit()  # every row so far committed: the picture attends over them
        inputs, labels, indices = self._batch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the store is incomplete mid-fit, as expected)
            image = attention_picture(src.store_path, pl_module, inputs, labels, indices, top_k=self.top_k)
        for lg in trainer.loggers:
            if takes_images(lg):
                log_image(lg, TAG, image, int(trainer.global_step))


def takes_images(logger: Any) -> bool:
    """Whether a Lightning logger can take an image: a ``log_image`` method (W&B, Neptune, Comet), a
    TensorBoard ``SummaryWriter`` (``add_image``), or an MLflow client (``log_image``)."""
    if callable(getattr(logger, "log_image", None)):
        return True
    experiment = _experiment(logger)
    return callable(getattr(experiment, "add_image", None)) or (
        callable(getattr(experiment, "log_image", None)) and getattr(logger, "run_id", None) is not None)


def _experiment(logger: Any) -> Any:
    try:
        return logger.experiment
    except Exception:  # a logger whose experiment cannot start (no package, offline): no images there
        return None


def log_image(logger: Any, tag: str, image: np.ndarray, step: int) -> None:
    """Hand one ``(H, W, 3)`` uint8 picture to a logger that takes images (see :func:`takes_images`)."""
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key=tag, images=[image], step=step)
        return
    experiment = _experiment(logger)
    if callable(getattr(experiment, "add_image", None)):  # TensorBoard
        experiment.add_image(tag, image, step, dataformats="HWC")
    elif callable(getattr(experiment, "log_image", None)):  # MLflow's client
        experiment.log_image(logger.run_id, image, f"{tag.replace('/', '_')}_step{step}.png")


def attention_picture(store_path: str, model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None,
                      indices: torch.Tensor | None, top_k: int = 5) -> np.ndarray:
    """The demo's picture (:func:`~lightning_dualform.plots.attention_image`) of what ``inputs`` attend to,
    over the store as committed now, at every tracked layer."""
    from lightning_dualform.query_runs import QueryAttention
    from lightning_dualform.attend.inference import DualInference
    from lightning_dualform.plots import attention_image

    n = inputs.shape[0]
    with DualInference(store_path, device="cpu") as di:
        ex = di.explain(model, inputs, top_k=top_k, method=None)  # the paper's picture: attention only
        run = QueryAttention(
            source="split:validation", examples=np.arange(n),
            index=indices.numpy() if indices is not None else np.arange(n),
            label=labels.numpy() if labels is not None else np.full(n, -1),
            prediction=ex.prediction.reshape(n, -1)[:, 0].numpy() if ex.prediction is not None else np.full(n, -1),
            inputs=inputs.detach().cpu().numpy(),
        )
        for name, res in ex.layers.items():
            rows = res.dual.shape[0]
            per_example = max(rows // n, 1)
            run.results[name] = res
            run.example[name] = np.arange(rows) // per_example
            run.position[name] = np.arange(rows) % per_example
        return attention_image(run, di.store, max_queries=n)
