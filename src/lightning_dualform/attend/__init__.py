"""Answering queries over a store: blocked attention kernels (:mod:`.kernels`), the stateful reader
:class:`~lightning_dualform.attend.inference.DualInference`, and the exactness certificate.

Names are imported on first use (:mod:`lightning_dualform._lazy`): importing a module of this package does
not load the pass and torch with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_dualform._lazy import lazy_exports

__all__ = ["AttendRequest", "AttentionResult", "DualInference", "Explanation", "Mass", "TopExamples", "TopRows"]

if TYPE_CHECKING:
    from lightning_dualform.attend.inference import (
        AttentionResult,
        DualInference,
        Explanation,
        Mass,
        TopExamples,
        TopRows,
    )
    from lightning_dualform.attend.request import AttendRequest

_WHERE = {**dict.fromkeys(__all__, "lightning_dualform.attend.inference"),
          "AttendRequest": "lightning_dualform.attend.request"}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
