"""The output unit each query's contributions are taken for, from a request's ``contribution_to``."""

from __future__ import annotations

from typing import Any, Callable

import torch

from lightning_dualform.store.source import LayerSource


def resolve_units(
    layer: LayerSource, n: int, contribution_to: Any, prediction: Callable[[], torch.Tensor]
) -> torch.Tensor | None:
    """``(n,)`` int64 units for ``n`` queries, or None for no contributions.

    Args:
        layer: the layer (its width bounds the units).
        n: the number of queries.
        contribution_to: a prepared request's value (``"auto"`` already resolved): None, ``"pred"``, an ``int``
            or a 1-d integer tensor (checked by :class:`~lightning_dualform.attend.request.AttendRequest`).
        prediction: the layer's output ``(n, d_out)`` whose argmax ``"pred"`` means; called only then (it may
            cost a pass over the memory).

    Raises:
        ValueError: units outside ``0..d_out - 1``, or a tensor with another number of units than queries.
    """
    if contribution_to is None:
        return None
    if isinstance(contribution_to, str):
        if contribution_to != "pred":
            raise ValueError(f"`attend(contribution_to={contribution_to!r})`: expected None, 'pred', an int unit or a "
                             "(n,) LongTensor.")
        return prediction().argmax(dim=1).to(torch.int64)
    if isinstance(contribution_to, torch.Tensor):
        units = contribution_to.to(torch.int64)
        if units.dim() != 1 or units.shape[0] != n:
            raise ValueError(
                f"`attend(contribution_to=...)` as a tensor must be an integer tensor of shape ({n},), one unit per "
                f"query; got {tuple(units.shape)} {units.dtype}."
            )
    else:
        units = torch.full((n,), int(contribution_to), dtype=torch.int64)
    if bool(((units < 0) | (units >= layer.d_out)).any()):
        raise ValueError(
            f"`attend(contribution_to=...)`: output units must lie in 0..{layer.d_out - 1} (layer {layer.name!r} has "
            f"{layer.d_out} outputs); got {sorted(set(units.tolist()))[:10]}."
        )
    return units
