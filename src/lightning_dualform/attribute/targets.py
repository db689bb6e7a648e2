"""What an influence score measures: the test function ``f`` of a query, computed from the model's output.

Each target maps the model's outputs ``(n, C)`` and the queries' classes ``(n,)`` to one number per query,
``(n,)``. Query ``q``'s value must depend on its own output row only (true of every built-in target and of
any per-row function), so that the gradient of ``sum_q f_q`` gives each query its own ``df_q/dy``.

- ``"margin"`` (default): ``z_y - logsumexp_{c != y} z_c``, the log-odds of the true class against all
  others. Positive exactly when the class is predicted with probability above 1/2; smooth, and free of the
  saturation of the loss (a confidently right query still has a gradient).
- ``"loss"``: the cross-entropy ``-log softmax(z)_y``. Up-weighting a helpful example *lowers* it: its score is
  negative.
- ``"logit"``: ``z_y``.
- a callable ``target(outputs, targets) -> (n,)``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

from lightning_dualform.attend.finite import nonfinite_rows

TargetName = Literal["margin", "loss", "logit"]
Target = Union[TargetName, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
TARGETS: tuple[str, ...] = ("margin", "loss", "logit")


def check_target(target: object) -> None:
    """Raise ``ValueError`` unless ``target`` is a built-in name or a callable."""
    if callable(target):
        return
    if not isinstance(target, str) or target not in TARGETS:
        raise ValueError(f"`influence(target={target!r})` is not supported. Expected one of {TARGETS} or a callable "
                         "target(outputs, targets) -> (n,) tensor.")


def as_targets(targets: Any, n: int | None) -> torch.Tensor:
    """``targets`` as ``(n,)`` int64 classes, or an error that says what is wrong with them.

    Args:
        targets: class numbers: integers, or floats that are whole numbers (``3.0``; ``3.7`` is refused, not
            truncated to 3).
        n: the number of queries when the inputs tell it (their first dimension), else None.

    Raises:
        TypeError: not numbers, complex, or bool.
        ValueError: a class that is not a whole number (or NaN, inf), or not one class per query.
    """
    try:
        t = torch.as_tensor(np.asarray(targets) if isinstance(targets, (list, tuple)) else targets)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"`influence(targets=...)` must be class numbers, one per query ((n,) integers); got "
                        f"{type(targets).__name__}: {str(err).split('.')[0]}.") from None
    if t.is_complex() or t.dtype == torch.bool or not (t.is_floating_point() or _is_int(t.dtype)):
        raise TypeError(f"`influence(targets=...)` must be class numbers, one per query ((n,) integers); got a "
                        f"{t.dtype} tensor.")
    t = t.reshape(-1)
    if t.is_floating_point():
        frac = ~torch.isfinite(t) | (t != torch.round(t))
        if bool(frac.any()):
            at = frac.nonzero().reshape(-1)[:5].tolist()
            raise ValueError(f"`influence(targets=...)` must be whole class numbers; targets {at} are "
                             f"{t[at].tolist()}. Pass the class of each query as an integer.")
    t = t.to(torch.int64)
    if n is not None and t.shape[0] != n:
        raise ValueError(f"`influence(targets=...)` has {t.shape[0]} classes for {n} inputs: pass one class per query "
                         f"(shape ({n},)), or targets=None for the model's predictions.")
    return t


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_outputs(outputs: Any, what: str = "the model's outputs") -> None:
    """Refuse class scores with NaN or inf (the inputs are finite, checked before): argmax, margins and their
    gradients would be NaN, and the influence table with them.

    Raises:
        ValueError: naming the queries whose outputs are not finite.
    """
    if isinstance(outputs, torch.Tensor) and outputs.is_floating_point() and outputs.dim() >= 1:
        at = nonfinite_rows(outputs.detach())[:5]
        if at:
            raise ValueError(f"{what} hold NaN or inf for queries {at} (of {outputs.shape[0]}), though the inputs are "
                             "finite: influence needs finite class scores. Check the model's weights and forward "
                             "(a diverged model, a log of zero).")


def target_name(target: Target) -> str:
    """A label for results and JSON: the built-in name, or the callable's name."""
    return target if isinstance(target, str) else getattr(target, "__name__", type(target).__name__)


def margin(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``z_y - logsumexp_{c != y} z_c`` per row of ``outputs`` ``(n, C)``."""
    y = targets.reshape(-1, 1)
    true = outputs.gather(1, y).squeeze(1)
    others = outputs.scatter(1, y, float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def evaluate(target: Target, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``f`` per query, ``(n,)``.

    Raises:
        ValueError: a built-in target on outputs that are not ``(n, C)`` class scores, a class out of range, or
            a callable that does not return one number per query.
    """
    n = targets.shape[0]
    if isinstance(target, str):
        if outputs.dim() == 2 and outputs.shape[0] != n:
            raise ValueError(f"got {n} targets for the model's {outputs.shape[0]} outputs (shape "
                             f"{tuple(outputs.shape)}): pass one target class per query, or targets=None for the "
                             "model's predictions.")
        if outputs.dim() != 2:
            raise ValueError(f"target={target!r} needs class scores of shape (n, C) for the {n} queries; the model "
                             f"returned {tuple(outputs.shape)}. Pass a callable target(outputs, targets) instead.")
        if n and (int(targets.min()) < 0 or int(targets.max()) >= outputs.shape[1]):
            raise ValueError(f"targets must be classes in 0..{outputs.shape[1] - 1}; got "
                             f"{int(targets.min())}..{int(targets.max())}.")
        if target == "margin":
            if outputs.shape[1] < 2:
                raise ValueError("target='margin' needs at least two classes; use target='logit'.")
            return margin(outputs, targets)
        if target == "loss":
            return F.cross_entropy(outputs, targets, reduction="none")
        return outputs.gather(1, targets.reshape(-1, 1)).squeeze(1)
    out = target(outputs, targets)
    if not isinstance(out, torch.Tensor) or out.shape != (n,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the target callable must return a tensor of shape ({n},), one value per query; got {got}.")
    bad = nonfinite_rows(out.detach())[:5]
    if bad:
        raise ValueError(f"the target callable returned NaN or inf for queries {bad} (the model's outputs are "
                         "finite): influence needs a finite f per query.")
    return out
