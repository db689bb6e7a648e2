"""Answering queries over a store: blocked attention kernels (:mod:`.kernels`), the stateful reader
:class:`~lightning_dualform.attend.inference.DualInference`, and the exactness certificate."""

from lightning_dualform.attend.inference import AttentionResult, DualInference, Explanation, Mass, TopExamples, TopRows
from lightning_dualform.attend.request import AttendRequest

__all__ = ["AttendRequest", "AttentionResult", "DualInference", "Explanation", "Mass", "TopExamples", "TopRows"]
