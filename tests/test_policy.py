"""The run policy (record/policy.py) on its own: which runs are exact, the refusal, the check tolerance."""

from __future__ import annotations

import pytest
import torch

from lightning_dualform.record.policy import RunFacts, gradient_check_tolerance, inexact_causes, refusal

P = [torch.nn.Parameter(torch.zeros(2, 2))]


@pytest.mark.parametrize("facts, cause", [
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1)]), None),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)],
              clip_algorithm="norm", precision="bf16-mixed", strategy="DDPStrategy"), None),
    (RunFacts(optimizers=[]), "0 optimizers"),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1), torch.optim.SGD(P, lr=0.1)]), "2 optimizers"),
    (RunFacts(optimizers=[torch.optim.Rprop(P)]), "Rprop"),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1)], clip_algorithm="value"), 'gradient_clip_algorithm="value"'),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1)], precision="bf16-true"), "precision='bf16-true'"),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1)], parameter_dtypes=(torch.float16,)), "float16 parameters"),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1)], strategy="FSDPStrategy"), "FSDPStrategy"),
    (RunFacts(optimizers=[torch.optim.SGD(P, lr=0.1)], manual_optimization=True), "manual optimization"),
])
def test_inexact_causes(facts, cause):
    got = inexact_causes(facts)
    if cause is None:
        assert got == []
    else:
        assert any(cause in c for c in got), got


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.optim.AdamW(P),
        lambda: torch.optim.Adam(P, amsgrad=True, weight_decay=0.1),
        lambda: torch.optim.Adagrad(P),
        lambda: torch.optim.RMSprop(P, momentum=0.9, centered=True),
        lambda: torch.optim.Adamax(P),
        lambda: torch.optim.NAdam(P),
        lambda: torch.optim.RAdam(P),
        lambda: torch.optim.Adadelta(P),
        lambda: torch.optim.ASGD(P),
    ],
    ids=["adamw", "adam", "adagrad", "rmsprop", "adamax", "nadam", "radam", "adadelta", "asgd"],
)
def test_optimizers_with_an_exact_rule_are_exact(make):
    assert inexact_causes(RunFacts(optimizers=[make()], clip_algorithm="norm", strategy="DDPStrategy")) == []


def test_refusal_names_the_causes_the_remedy_and_the_opt_in():
    msg = refusal("DualFormRecorder", inexact_causes(RunFacts(optimizers=[torch.optim.Rprop(P)])))
    assert "torch.optim.rprop.Rprop: its step uses only the sign" in msg
    assert "Supported: " in msg and "torch.optim.AdamW" in msg and "torch.optim.SGD" in msg
    assert "DualFormRecorder(..., exact=False)" in msg


def test_gradient_check_tolerance_widens_with_rounding():
    assert gradient_check_tolerance("32-true") == 1e-3
    assert gradient_check_tolerance("bf16-mixed") == 2e-2
    assert gradient_check_tolerance("16-mixed") == 5e-3
    assert gradient_check_tolerance("32-true", "tf32") == 5e-3
    assert gradient_check_tolerance("16-mixed", "bf16") == 2e-2
    assert gradient_check_tolerance("32-true", "some-new-mode") == 2e-2  # unknown rounding: the loosest
    assert gradient_check_tolerance("32-true", row_dtype="float16") == 5e-3  # the check multiplies stored rows
    assert gradient_check_tolerance("32-true", row_dtype="bfloat16") == 2e-2
