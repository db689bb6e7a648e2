"""The run policy: which training set-ups the dual form rebuilds exactly, and how closely.

Pure functions of plain facts about a run (no Trainer, no files), so each rule is tested on its own. The
callback and the recorder gather the facts, call :func:`inexact_causes`, and refuse the run (``exact=True``)
or record it with the causes (``exact=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_dualform.errors import InexactError
from lightning_dualform.optim import rule_for
#: Trainer precisions under which each step's weight gradient is a sum of outer products of the captured
#: rows (mixed precision rounds it; :data:`GRADIENT_CHECK_TOLERANCE` allows for that).
EXACT_PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "bf16-mixed")
#: The gradient check's tolerance (relative to ``|W.grad| |r|``) by training precision ...
GRADIENT_CHECK_TOLERANCE = {"bf16-mixed": 2e-2, "16-mixed": 5e-3}
#: ... by how float32 products are rounded (TF32 keeps float16's 10 mantissa bits, bfloat16 8) ...
GRADIENT_CHECK_TOLERANCE_BY_PRODUCTS = {"tf32": 5e-3, "bf16": 2e-2}
#: ... and by the stored rows' type (the check multiplies the rows as they are stored).
GRADIENT_CHECK_TOLERANCE_BY_ROWS = {"float16": 5e-3, "bfloat16": 2e-2}
DEFAULT_GRADIENT_CHECK_TOLERANCE = 1e-3


@dataclass
class RunFacts:
    """What the policy looks at. Defaults describe a plain single-process float32 loop."""

    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    manual_optimization: bool = False
    clip_algorithm: str | None = None  # "norm", "value" or None (no clipping)
    precision: str = "32-true"
    strategy: str = "SingleDeviceStrategy"
    parameter_dtypes: tuple[torch.dtype, ...] = ()


def inexact_causes(facts: RunFacts) -> list[str]:
    """Why the run's trained weights are not a sum of the recorded outer products; empty when they are."""
    problems: list[str] = []
    if facts.manual_optimization:
        problems.append("manual optimization (the callback cannot see how steps combine gradients; in a "
                        "training_step of your own, record each optimizer with a DualFormRecorder, docs/recorder.md)")
    if len(facts.optimizers) != 1:
        problems.append(f"{len(facts.optimizers)} optimizers (exactly one is supported)")
    for opt in facts.optimizers:
        try:
            rule_for(opt)  # every optimizer whose step is linear in the gradient once its own state is fixed
        except InexactError as err:
            problems.append(str(err).rstrip("."))
    if facts.clip_algorithm == "value":
        problems.append('gradient_clip_algorithm="value" (clips each element separately)')
    if facts.precision not in EXACT_PRECISIONS:
        problems.append(f"precision={facts.precision!r} (weights themselves are rounded at every update)")
    low = sorted({str(d).replace("torch.", "") for d in facts.parameter_dtypes if d in (torch.float16, torch.bfloat16)})
    if low:
        problems.append(f"{'/'.join(low)} parameters (weights themselves are rounded at every update)")
    if facts.strategy not in ("SingleDeviceStrategy", "DDPStrategy"):
        problems.append(f"strategy {facts.strategy} (only single-device and DDP are supported)")
    return problems


def refusal(owner: str, problems: list[str]) -> str:
    """The message of the :class:`~lightning_dualform.errors.InexactError` an exact recording raises."""
    return (
        f"{owner} cannot record this run exactly: " + "; ".join(problems) + ". Remove the cause (schedules, "
        "param groups, norm clipping, gradient accumulation, DDP and mixed precision are all exact with a "
        f"supported optimizer), or pass `{owner}(..., exact=False)` to record anyway: the store then keeps the "
        "residual the memory does not explain, and every answer reports it."
    )


def gradient_check_tolerance(precision: str, float32_products: str = "ieee", row_dtype: str = "float32") -> float:
    """How far the stored rows may miss a step's weight gradient before a layer counts as inexact."""
    tol = max(GRADIENT_CHECK_TOLERANCE.get(precision, DEFAULT_GRADIENT_CHECK_TOLERANCE),
              GRADIENT_CHECK_TOLERANCE_BY_ROWS.get(row_dtype, 0.0))
    if float32_products != "ieee":
        tol = max(tol, GRADIENT_CHECK_TOLERANCE_BY_PRODUCTS.get(float32_products, 2e-2))
    return tol
