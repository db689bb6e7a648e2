"""lightning-dualform: see which training examples a Lightning model's prediction draws on.

A linear layer trained by gradient descent is exactly unnormalised dot attention over every input it
saw in training (Irie, Csordás, Schmidhuber, ICML 2022). :class:`DualFormCallback` records that
memory while a ``Trainer`` fits (:class:`DualFormRecorder` in a loop of your own, or Fabric's);
:class:`DualInference` answers queries over it; :class:`DualFormAttentionLogger` draws what a few validation
inputs attend to on the Trainer's loggers.

The public API is what ``__all__`` names, plus the modules :mod:`~lightning_dualform.analysis`,
:mod:`~lightning_dualform.datasets`, :mod:`~lightning_dualform.plots` and :mod:`~lightning_dualform.studies`
(the paper's measures and figures). The subpackages ``record``,
``store``, ``optim``, ``attend`` and ``cli`` are the library's rooms; their contents may change.

The names are imported when first used (PEP 562): ``import lightning_dualform`` costs nothing beyond the
version string, so that ``lightning-dualform --version`` or ``info`` never loads torch or Lightning.
``from lightning_dualform import DualInference`` works as ever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_dualform._lazy import lazy_exports
from lightning_dualform._version import __version__

#: each public name and the module that defines it
_WHERE = {
    "DualFormAttentionLogger": "lightning_dualform.record.attention_logging",
    "DualFormCallback": "lightning_dualform.record.callback",
    "DualFormRecorder": "lightning_dualform.record.recorder",
    "DualFormError": "lightning_dualform.errors",
    "InexactError": "lightning_dualform.errors",
    "StoreError": "lightning_dualform.errors",
    "WriterError": "lightning_dualform.errors",
    "StoreReader": "lightning_dualform.store.reader",
    "AttendRequest": "lightning_dualform.attend.request",
    "AttentionResult": "lightning_dualform.attend.inference",
    "DualInference": "lightning_dualform.attend.inference",
    "Explanation": "lightning_dualform.attend.inference",
    "Mass": "lightning_dualform.attend.inference",
    "TopExamples": "lightning_dualform.attend.inference",
    "TopRows": "lightning_dualform.attend.inference",
}

__all__ = [
    "DualFormAttentionLogger",
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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from lightning_dualform.attend.inference import (
        AttentionResult,
        DualInference,
        Explanation,
        Mass,
        TopExamples,
        TopRows,
    )
    from lightning_dualform.attend.request import AttendRequest
    from lightning_dualform.errors import DualFormError, InexactError, StoreError, WriterError
    from lightning_dualform.record.attention_logging import DualFormAttentionLogger
    from lightning_dualform.record.callback import DualFormCallback
    from lightning_dualform.record.recorder import DualFormRecorder
    from lightning_dualform.store.reader import StoreReader


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
