"""Each step's table rows of the tracked parameters: the update rule's columns, read from the live optimizer.

The optimizer's step pre-hook reads every row (:meth:`StepRowReader.read`): the columns that come from the
optimizer's state (SGD's ``fresh_buffer``) must be read before the step changes it. Its post-hook reads the
param-group columns again (:meth:`StepRowReader.reread`): Lightning runs the closure (``training_step``, backward,
``on_before_optimizer_step``, clipping) inside ``optimizer.step()``, after the pre-hook, and code there may set a
group's ``lr`` or ``weight_decay``; the step uses what it finds then, and schedulers change the groups only after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_dualform.optim import UpdateRule
from lightning_dualform.record.specs import bias_of
from lightning_dualform.store.format import table_columns

#: one parameter's row: ``{column: value}`` (``applied`` among them)
StepRow = dict[str, Any]


@dataclass
class StepSettings:
    """What the optimizer's step pre-hook noted, until its post-hook records the step: per layer, the weight's
    and the bias's table rows (``None`` without a bias)."""

    updates: dict[str, tuple[StepRow, StepRow | None]]


@dataclass
class StepRowReader:
    """The rows of the parameters of the tracked layers.

    Args:
        optimizer: the optimizer being recorded.
        rule: its update rule (``None``: the plain rule, whose only column is ``lr``).
        update_rule: the store's name of the rule (the columns of a skipped row).
        groups: per layer, the param group numbers of its weight and bias (``None``: in no group). Numbers, not
            the group dicts: restoring a checkpoint replaces the dicts, so each step reads
            ``optimizer.param_groups[i]`` afresh.
    """

    optimizer: torch.optim.Optimizer
    rule: UpdateRule | None
    update_rule: str
    groups: dict[str, tuple[int | None, int | None]]

    def read(self, modules: dict[str, torch.nn.Module]) -> StepSettings:
        """The coming step's rows of every layer (call it from the optimizer's step pre-hook)."""
        updates = {}
        for name, m in modules.items():
            wi, bi = self.groups[name]
            w_up = self.table_row(m.weight, wi)
            b_up = self.table_row(bias_of(m), bi) if bias_of(m) is not None else None
            updates[name] = (w_up, b_up)
        return StepSettings(updates)

    def table_row(self, p: torch.Tensor, group: int | None) -> StepRow:
        """The coming step's row of ``p``'s table: the rule's columns, read from the optimizer's public state."""
        if group is None:  # in no param group: the optimizer never changes it
            return self.skipped_row()
        if self.rule is not None:
            row = self.rule.read_step(self.optimizer, p)
            # the closure (forward, backward) runs inside optimizer.step(), after the pre-hook: whether the
            # parameter got a gradient is known only after the step (RecordingEngine.record_step)
            row["applied"] = True
            return row
        return {**self.group_columns(p, self.optimizer.param_groups[group]), "applied": True}

    def group_columns(self, p: torch.Tensor, group: dict) -> StepRow:
        """The columns of ``p``'s row read from its param group alone (the plain rule: ``lr``)."""
        if self.rule is not None:
            return self.rule.hyper(self.optimizer, p, group)
        lr = group.get("lr", 0.0)
        return {"lr": float(lr) if isinstance(lr, (int, float, torch.Tensor)) else 0.0}

    def reread(self, settings: StepSettings, modules: dict[str, torch.nn.Module]) -> None:
        """Overwrite the rows' param-group columns with the values the step used (call it from the optimizer's
        step post-hook, before the step is recorded). Columns read from the optimizer's state, ``applied``, and
        the rows of parameters in no group stay as they are."""
        groups = self.optimizer.param_groups
        for name, (w_up, b_up) in settings.updates.items():
            m = modules.get(name)
            if m is None:
                continue
            wi, bi = self.groups[name]
            for row, p, gi in ((w_up, m.weight, wi), (b_up, bias_of(m), bi)):
                if row is None or p is None or gi is None:
                    continue
                for k, v in self.group_columns(p, groups[gi]).items():
                    if k in row:
                        row[k] = v

    def skipped_row(self) -> StepRow:
        return skipped_row(self.update_rule)


def skipped_row(update_rule: str) -> StepRow:
    """A table row of a step that leaves the parameter (and its state) alone."""
    return {c.name: (False if c.dtype is np.bool_ else 0.0) for c in table_columns(update_rule)}
