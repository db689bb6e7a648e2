"""The update rules of the optimizers the dual form covers, as pure functions of per-step tables.

:mod:`.sgd`: ``torch.optim.SGD`` in every configuration, one scalar coefficient per step.
"""

from lightning_dualform.optim.sgd import (
    PARAM_COLUMNS,
    ParamUpdate,
    coefficients,
    coefficients_with_buffer,
    plain_sgd_coefficients,
)

__all__ = ["PARAM_COLUMNS", "ParamUpdate", "coefficients", "coefficients_with_buffer", "plain_sgd_coefficients"]
