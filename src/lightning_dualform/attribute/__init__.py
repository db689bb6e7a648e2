"""From attention to attribution: which training examples a prediction depends on, counterfactually.

:func:`influence` scores every training example of a store for each query as ``df/dw_i``, the change of a test
function (by default the prediction's margin) per unit of the example's loss weight: to first order at the final
model through the dual form's rows (``"first_order"``), by TracIn at every replayed step (``"every_step"``), or
exactly through the whole training (``"metagradient"``, MAGIC). ``docs/dual-form.md`` derives each; the figures
of how well they predict retraining are in ``docs/benchmarks.md`` (LDS).
"""

from lightning_dualform.attribute.influence import METHODS, influence
from lightning_dualform.attribute.metagradient import ReplayReport
from lightning_dualform.attribute.result import Influence, TopInfluence
from lightning_dualform.attribute.targets import TARGETS
from lightning_dualform.attribute.views import ATTENTION_MEANING, which_examples

__all__ = ["ATTENTION_MEANING", "Influence", "METHODS", "ReplayReport", "TARGETS", "TopInfluence", "influence",
           "which_examples"]
