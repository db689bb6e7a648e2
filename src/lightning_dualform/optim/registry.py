"""Which update rule replicates an optimizer, and which optimizers are refused (and why)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lightning_dualform.errors import InexactError
from lightning_dualform.optim.adafactor import AdafactorRule
from lightning_dualform.optim.adam_family import AdamaxRule, AdamRule, NAdamRule, RAdamRule
from lightning_dualform.optim.adaptive import AdadeltaRule, AdagradRule, RMSpropRule
from lightning_dualform.optim.rule import UpdateRule
from lightning_dualform.optim.scalar import ASGDRule, SGDRule

if TYPE_CHECKING:
    import torch

#: One instance of every rule, by name.
RULES: dict[str, UpdateRule] = {
    r.name: r
    for r in (
        SGDRule(),
        ASGDRule(),
        AdamRule(),
        AdamaxRule(),
        NAdamRule(),
        RAdamRule(),
        AdagradRule(),
        RMSpropRule(),
        AdadeltaRule(),
        AdafactorRule(),
    )
}

@functools.cache
def _by_class() -> dict[type, UpdateRule]:
    """Each supported ``torch.optim`` class and its rule (imports torch: a store's reader never calls it)."""
    return {cls: rule for rule in RULES.values() for cls in rule.optimizers}

#: Optimizers known not to be linear in the gradient, with the reason.
_REFUSED = {
    "Rprop": "its step uses only the sign of each gradient entry",
    "LBFGS": "its step comes from a line search and curvature pairs built from the gradients themselves",
    "SparseAdam": "it updates only the entries present in a sparse gradient",
    "Muon": "it orthogonalises the momentum by a Newton-Schulz iteration, a polynomial in the gradient",
}


def supported_optimizers() -> list[str]:
    """Names of the ``torch.optim`` classes with an exact rule in the installed torch."""
    return sorted(cls.__name__ for cls in _by_class())


def rule_for(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """The update rule that replicates ``optimizer``'s step exactly.

    A subclass of a supported optimizer is accepted when it keeps its base's ``step`` (it may change
    defaults or add bookkeeping); one that overrides ``step`` is unknown.

    Raises:
        InexactError: the optimizer's step is not linear in the gradient, or it is unknown; the message
            names it, says why and lists what is supported.
    """
    cls = type(optimizer)
    for base in cls.__mro__:
        rule = _by_class().get(base)
        if rule is None:
            continue
        if cls.step is getattr(base, "step"):  # (a registered torch.optim class; __mro__ is typed as plain types)
            return rule
        reason = f"it subclasses torch.optim.{base.__name__} but overrides step(), so its update is unknown"
        break
    else:
        refused = next((why for name, why in _REFUSED.items() if any(b.__name__ == name for b in cls.__mro__)), None)
        if refused is None:
            reason = "it is not an optimizer whose update is known to be linear in the gradient"
        else:
            reason = refused + ", which is not linear in the gradient"
    raise InexactError(
        f"{cls.__module__}.{cls.__qualname__}: {reason}, so the trained weights are not an exact dual form. "
        f"Supported: {', '.join('torch.optim.' + n for n in supported_optimizers())}."
    )
