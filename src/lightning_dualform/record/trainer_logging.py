"""What the callback tells the Trainer's loggers, under a ``dualform/`` prefix.

Through Lightning's public ``Logger`` API, so every configured logger gets it (CSV, TensorBoard, W&B,
MLflow ...): the store's rows and bytes as it grows and the time training waited for the writer; the
certificate per layer at fit end. Each row carries the ``epoch``, as the rows Lightning logs for
``self.log`` do. With no logger configured nothing is computed. (The attention picture is a callback of its
own: :mod:`.attention_logging`.)
"""

from __future__ import annotations

import os
from typing import Any

from lightning_dualform.store.certificate import LayerCertificate

PREFIX = "dualform/"


def log_progress(trainer: Any, rows: dict[str, int], store_path: str | None, writer_wait_s: float, *,
                 epoch: int) -> None:
    """``dualform/rows`` (all layers), ``dualform/rows/<layer>``, ``dualform/store_bytes`` and
    ``dualform/writer_wait_s`` at the current global step, in ``epoch``."""
    if not trainer.loggers:
        return
    metrics: dict[str, float] = {f"{PREFIX}rows": float(sum(rows.values()))}
    metrics.update({f"{PREFIX}rows/{name}": float(n) for name, n in rows.items()})
    if store_path is not None and os.path.exists(store_path):
        metrics[f"{PREFIX}store_bytes"] = float(os.path.getsize(store_path))
    metrics[f"{PREFIX}writer_wait_s"] = float(writer_wait_s)
    _log_metrics(trainer, metrics, epoch)


def log_certificate(trainer: Any, certificate: dict[str, LayerCertificate], *, epoch: int) -> None:
    """``dualform/certificate/<layer>/rel_err``, ``.../exact`` (1 or 0), ``.../tolerance`` and ``.../explained``,
    in ``epoch`` (the last that trained: Lightning has counted one more when fit ends)."""
    if not trainer.loggers or not certificate:
        return
    metrics: dict[str, float] = {}
    for name, cert in certificate.items():
        for key in ("rel_err", "tolerance", "explained"):
            metrics[f"{PREFIX}certificate/{name}/{key}"] = float(getattr(cert, key))
        metrics[f"{PREFIX}certificate/{name}/exact"] = float(cert.exact)
    _log_metrics(trainer, metrics, epoch, save=True)


def _log_metrics(trainer: Any, metrics: dict[str, float], epoch: int, save: bool = False) -> None:
    metrics = {**metrics, "epoch": int(epoch)}  # what Lightning's own rows carry (its logger connector adds it)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=int(trainer.global_step))
        if save:  # at fit end the Trainer may have finalised its loggers already
            logger.save()
