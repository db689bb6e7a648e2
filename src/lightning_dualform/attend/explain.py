"""``DualInference.explain``: run a model once on a batch with forward hooks and attend at every tracked
layer, each layer's input rows for the batch being its queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from lightning_dualform.attend.results import AttentionResult, Explanation
from lightning_dualform.layers import keys_of, one_hot_keys

if TYPE_CHECKING:
    from lightning_dualform.attend.inference import DualInference


def explain(
    di: "DualInference",
    model: nn.Module,
    batch: Any,
    *,
    top_k: int = 10,
    layers: Sequence[str] | None = None,
    contribution_to: str | int | torch.Tensor | None = "pred",
    forward: Callable[[nn.Module, Any], Any] | None = None,
    **attend_kwargs: Any,
) -> Explanation:
    """Run ``model`` once on ``batch`` with forward hooks and attend at every tracked layer.

    Each tracked layer's input rows for the batch (leading dimensions flattened) are its queries. The
    model runs in eval mode under ``torch.no_grad()`` (its mode is restored afterwards).

    Args:
        model: the trained model (a LightningModule works): module names must be the store's layer names.
        batch: a tensor, or a tuple/list whose first element is the input, or whatever ``forward`` takes.
        top_k: passed to :meth:`attend`.
        layers: a subset of :attr:`layers` (default: all).
        contribution_to: used for the last tracked layer, whose output is normally the model's;
            ``"pred"`` there means the model's prediction (argmax of its output) when the shapes agree.
        forward: ``forward(model, batch) -> output``; default ``model(batch)`` or ``model(batch[0])``.
        **attend_kwargs: any other :meth:`attend` argument (``at_step``, ``per_example`` ...).

    Raises:
        KeyError: a tracked layer is not a module of ``model``.
    """
    names = list(layers) if layers is not None else di.layers
    for name in names:
        di.layer(name)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(
            f"`explain(model, ...)`: the model has no module named {missing}; the store tracks {di.layers}. "
            "Pass the model that was trained (module names must match)."
        )
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for name in names:
        d_in = di.layer(name).d_in

        def hook(mod: nn.Module, inputs: tuple, output: Any, name: str = name, d_in: int = d_in) -> None:
            # the rows the layer multiplies by its weight: unfolded patches, one-hot tokens, flattened rows
            keys, _ = keys_of(mod, inputs[0])
            captured[name].append(keys.float() if keys.is_floating_point() else one_hot_keys(keys, d_in))

        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if forward is not None:
                output = forward(model, batch)
            elif isinstance(batch, (list, tuple)):
                output = model(batch[0])
            else:
                output = model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out_t = output if isinstance(output, torch.Tensor) else None
    prediction = out_t.argmax(dim=-1) if (out_t is not None and out_t.is_floating_point() and out_t.dim() >= 1) else None
    results: dict[str, AttentionResult] = {}
    last = names[-1] if names else None
    for name in names:
        if not captured[name]:
            raise ValueError(f"`explain`: layer {name!r} was not called by the model's forward on this batch.")
        q = torch.cat(captured[name])
        contrib: Any = "auto"  # unit scores (element-wise rules) rank by the layer's own predicted unit
        if name == last:
            contrib = contribution_to
            if contribution_to == "pred" and prediction is not None and prediction.numel() == q.shape[0]:
                contrib = prediction.reshape(-1).cpu()
        results[name] = di.attend(name, q, top_k=min(top_k, di.layer(name).n_rows), contribution_to=contrib, **attend_kwargs)
    return Explanation(
        output=out_t.detach().cpu() if out_t is not None else None,
        prediction=prediction.cpu() if prediction is not None else None,
        layers=results,
    )
