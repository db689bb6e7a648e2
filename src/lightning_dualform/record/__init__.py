"""Recording the dual form while a model trains: the engine (hooks, rows, the writer), its Lightning
adapter :class:`DualFormCallback`, its plain-PyTorch/Fabric adapter :class:`DualFormRecorder`, the attention
pictures on the Trainer's loggers (:class:`DualFormAttentionLogger`), batch metadata, the run policy, the
disk planner and query recording.

Names are imported on first use (:mod:`lightning_dualform._lazy`): a module of this package that needs no
Lightning (``capture``, ``batches``) does not load it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_dualform._lazy import lazy_exports

__all__ = ["DualFormAttentionLogger", "DualFormCallback", "DualFormRecorder"]

if TYPE_CHECKING:
    from lightning_dualform.record.attention_logging import DualFormAttentionLogger
    from lightning_dualform.record.callback import DualFormCallback
    from lightning_dualform.record.recorder import DualFormRecorder

_WHERE = {
    "DualFormAttentionLogger": "lightning_dualform.record.attention_logging",
    "DualFormCallback": "lightning_dualform.record.callback",
    "DualFormRecorder": "lightning_dualform.record.recorder",
}
__getattr__, __dir__ = lazy_exports(__name__, _WHERE, __all__)
