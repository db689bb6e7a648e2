"""What the callback tells the Trainer's loggers, under a ``dualform/`` prefix.

Through Lightning's public ``Logger`` API, so every configured logger gets it (CSV, TensorBoard, W&B,
MLflow ...): the store's rows and bytes as it grows and the time training waited for the writer; the
certificate per layer at fit end; and, when asked, the demo's attention picture for a few validation
inputs, where a logger takes images. With no logger configured nothing is computed.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from lightning_dualform.store.certificate import LayerCertificate

log = logging.getLogger(__name__)

PREFIX = "dualform/"


def log_progress(trainer: Any, rows: dict[str, int], store_path: str | None, writer_wait_s: float) -> None:
    """``dualform/rows`` (all layers), ``dualform/rows/<layer>``, ``dualform/store_bytes`` and
    ``dualform/writer_wait_s`` at the current global step."""
    if not trainer.loggers:
        return
    metrics: dict[str, float] = {f"{PREFIX}rows": float(sum(rows.values()))}
    metrics.update({f"{PREFIX}rows/{name}": float(n) for name, n in rows.items()})
    if store_path is not None and os.path.exists(store_path):
        metrics[f"{PREFIX}store_bytes"] = float(os.path.getsize(store_path))
    metrics[f"{PREFIX}writer_wait_s"] = float(writer_wait_s)
    _log_metrics(trainer, metrics)


def log_certificate(trainer: Any, certificate: dict[str, LayerCertificate]) -> None:
    """``dualform/certificate/<layer>/rel_err``, ``.../exact`` (1 or 0), ``.../tolerance`` and ``.../explained``."""
    if not trainer.loggers or not certificate:
        return
    metrics: dict[str, float] = {}
    for name, cert in certificate.items():
        for key in ("rel_err", "tolerance", "explained"):
            metrics[f"{PREFIX}certificate/{name}/{key}"] = float(getattr(cert, key))
        metrics[f"{PREFIX}certificate/{name}/exact"] = float(cert.exact)
    _log_metrics(trainer, metrics, save=True)


def _log_metrics(trainer: Any, metrics: dict[str, float], save: bool = False) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=int(trainer.global_step))
        if save:  # at fit end the Trainer may have finalised its loggers already
            logger.save()


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
    from lightning_dualform.analysis import QueryAttention
    from lightning_dualform.attend.inference import DualInference
    from lightning_dualform.plots import attention_image

    n = inputs.shape[0]
    with DualInference(store_path, device="cpu") as di:
        ex = di.explain(model, inputs, top_k=top_k)
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
