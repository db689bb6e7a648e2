"""lightning-dualform: see which training examples a Lightning model's prediction draws on.

A linear layer trained by gradient descent is exactly unnormalised dot attention over every input it
saw in training (Irie, Csordás, Schmidhuber, ICML 2022). :class:`DualFormCallback` records that
memory while a ``Trainer`` fits; :class:`DualInference` answers queries over it.
"""

__version__ = "0.1.0"

from lightning_dualform.callback import DualFormCallback  # noqa: E402
from lightning_dualform.errors import DualFormError, InexactError, StoreError, WriterError  # noqa: E402
from lightning_dualform.store import StoreReader  # noqa: E402
from lightning_dualform.inference import AttentionResult, DualInference, Explanation, Mass, TopExamples, TopRows  # noqa: E402

__all__ = [
    "DualFormCallback",
    "DualFormError",
    "InexactError",
    "StoreError",
    "StoreReader",
    "WriterError",
    "__version__",
    "AttentionResult",
    "DualInference",
    "Explanation",
    "Mass",
    "TopExamples",
    "TopRows",
]
