"""Recording the dual form while a model trains: the Lightning callback, module hooks, batch metadata,
the disk planner and query recording."""

from lightning_dualform.record.callback import DualFormCallback

__all__ = ["DualFormCallback"]
