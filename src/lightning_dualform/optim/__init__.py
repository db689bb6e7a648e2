"""The update rules of the optimizers the dual form covers, as pure functions of per-step tables.

:mod:`.sgd`: ``torch.optim.SGD`` in every configuration, one scalar coefficient per step (the store's
current path).

The element-wise rules generalise it to every optimizer whose step is linear in the gradient once its
own nonlinear state is fixed: per step ``x_s = M_s (.) x_{s-1} + B_s (.) g_s`` on the linear state ``x``
(the parameter, and a first moment or momentum buffer), so that
``p_T = A (.) p_0 + sum_k C_k (.) x0_k + sum_s Q_s (.) G_s``.

- :mod:`.maps`: step maps, the adjoint, the optimizer state (pure numpy);
- :mod:`.rule`: what a rule provides (per-step columns, state reading, one step);
- :mod:`.scalar` (SGD, ASGD), :mod:`.adam_family` (Adam, AdamW, Adamax, NAdam, RAdam),
  :mod:`.adaptive` (Adagrad, RMSprop, Adadelta), :mod:`.adafactor` (rank-one ``Q_s``);
- :mod:`.registry`: :func:`rule_for` an optimizer, or a refusal that says why;
- :mod:`.replay`: the float64 forward replay, the backward sweep by snapshot segments, the attention form;
- :mod:`.stored`: a stored layer's coefficients, base weights and initial optimizer state, from its tables.
"""

from lightning_dualform.optim.maps import PARAM, Adjoint, OptimizerState, RankOne, StepMaps
from lightning_dualform.optim.registry import RULES, rule_for, supported_optimizers
from lightning_dualform.optim.replay import (
    Decomposition,
    QuerySweep,
    Replay,
    Sweep,
    decompose,
    replay,
    snapshot_interval,
)
from lightning_dualform.optim.rule import Column, UpdateRule
from lightning_dualform.optim.sgd import (
    PARAM_COLUMNS,
    ParamUpdate,
    coefficients,
    coefficients_with_buffer,
    plain_sgd_coefficients,
)
from lightning_dualform.optim.stored import Coefficients

__all__ = [
    "PARAM",
    "PARAM_COLUMNS",
    "RULES",
    "Adjoint",
    "Coefficients",
    "Column",
    "Decomposition",
    "OptimizerState",
    "ParamUpdate",
    "QuerySweep",
    "RankOne",
    "Replay",
    "StepMaps",
    "Sweep",
    "UpdateRule",
    "coefficients",
    "coefficients_with_buffer",
    "decompose",
    "plain_sgd_coefficients",
    "replay",
    "rule_for",
    "snapshot_interval",
    "supported_optimizers",
]
