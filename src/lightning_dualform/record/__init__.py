"""Recording the dual form while a model trains: the engine (hooks, rows, the writer), its Lightning
adapter :class:`DualFormCallback`, its plain-PyTorch/Fabric adapter :class:`DualFormRecorder`, the attention
pictures on the Trainer's loggers (:class:`DualFormAttentionLogger`), batch metadata, the run policy, the
disk planner and query recording."""

from lightning_dualform.record.attention_logging import DualFormAttentionLogger
from lightning_dualform.record.callback import DualFormCallback
from lightning_dualform.record.recorder import DualFormRecorder

__all__ = ["DualFormAttentionLogger", "DualFormCallback", "DualFormRecorder"]
