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

from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F

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
        if outputs.dim() != 2 or outputs.shape[0] != n:
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
    return out
