"""lightning-dualform: see which training examples a Lightning model's prediction draws on.

A linear layer trained by gradient descent is exactly unnormalised dot attention over every input it
saw in training (Irie, Csordás, Schmidhuber, ICML 2022). :class:`DualFormCallback` records that
memory while a ``Trainer`` fits (:class:`DualFormRecorder` in a loop of your own, or Fabric's);
:class:`DualInference` answers queries over it.

The public API is what ``__all__`` names, plus the modules :mod:`~lightning_dualform.analysis`,
:mod:`~lightning_dualform.datasets` and :mod:`~lightning_dualform.plots`. The subpackages ``record``,
``store``, ``optim``, ``attend`` and ``cli`` are the library's rooms; their contents may change.
"""

from lightning_dualform._version import __version__
from lightning_dualform.attend.inference import AttentionResult, DualInference, Explanation, Mass, TopExamples, TopRows
from lightning_dualform.attend.request import AttendRequest
from lightning_dualform.errors import DualFormError, InexactError, StoreError, WriterError
from lightning_dualform.record.callback import DualFormCallback
from lightning_dualform.record.recorder import DualFormRecorder
from lightning_dualform.store.reader import StoreReader

__all__ = [
    "DualFormCallback",
    "DualFormRecorder",
    "DualFormError",
    "InexactError",
    "StoreError",
    "StoreReader",
    "WriterError",
    "__version__",
    "AttendRequest",
    "AttentionResult",
    "DualInference",
    "Explanation",
    "Mass",
    "TopExamples",
    "TopRows",
]
