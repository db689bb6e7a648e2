"""``DualInference.explain``: run a model once on a batch with forward hooks and attend at every tracked
layer, each layer's input rows for the batch being its queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from lightning_dualform._unwrap import unwrap_model
from lightning_dualform.attend.request import AttendRequest, Contribution, request_from
from lightning_dualform.attend.results import AttentionResult, Explanation
from lightning_dualform.layers import keys_of, one_hot_keys

if TYPE_CHECKING:
    from lightning_dualform.attend.inference import DualInference

_R = AttendRequest  # the defaults are the request's


def explain(
    di: "DualInference",
    model: nn.Module,
    batch: Any,
    *,
    top_k: int = _R.top_k,
    layers: Sequence[str] | None = None,
    contribution_to: Contribution = _R.contribution_to,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    request: AttendRequest | None = None,
    **attend_kwargs: Any,
) -> Explanation:
    """Run ``model`` once on ``batch`` with forward hooks and attend at every tracked layer.

    Each tracked layer's input rows for the batch (leading dimensions flattened) are its queries. The
    model runs in eval mode under ``torch.no_grad()`` (its mode is restored afterwards).

    Args:
        model: the trained model (a LightningModule works; so do the wrappers of a loop: Fabric's module,
            ``DistributedDataParallel``): module names must be the store's layer names.
        batch: a tensor, or a tuple/list whose first element is the input, or whatever ``forward`` takes.
        top_k: as :meth:`attend` (capped at each layer's rows).
        layers: a subset of :attr:`layers` (default: all).
        contribution_to: used for the last of ``layers``, whose output is normally the model's: ``"pred"``
            there, and ``"auto"`` (the default) at the store's output layer, mean the model's prediction (the
            argmax of its output) when the shapes agree. The other layers take :meth:`attend`'s ``"auto"``.
        forward: ``forward(model, batch) -> output``; default ``model(batch)`` or ``model(batch[0])``.
        request: a prepared :class:`~lightning_dualform.attend.request.AttendRequest` instead of the keywords.
        **attend_kwargs: any other :meth:`attend` knob (``at_step``, ``per_example``, ``score`` ...).

    Raises:
        KeyError: a tracked layer is not a module of ``model``.
    """
    req = request_from("explain", request, {"top_k": top_k, "contribution_to": contribution_to, **attend_kwargs})
    names = list(layers) if layers is not None else di.layers
    for name in names:
        di.layer(name)
    inner = unwrap_model(model)  # hooks go on the user's own modules; the forward runs through the wrapper
    modules = dict(inner.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        have = [n for n, m in modules.items() if n and not list(m.children())][:8]
        raise KeyError(
            f"`explain(model, ...)`: the model has no module named {missing}, which the store tracks (the model's "
            f"layers include {have}). Pass the model that was trained (module names must match the store's)."
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
    output_layer = di.layers[-1] if di.layers else None
    for name in names:
        if not captured[name]:
            raise ValueError(f"`explain`: layer {name!r} was not called by the model's forward on this batch.")
        q = torch.cat(captured[name])
        # unit scores (element-wise rules) rank by the layer's own predicted unit: attend's "auto"
        contrib: Any = req.contribution_to if name == last else "auto"
        wants_prediction = isinstance(contrib, str) and (
            contrib == "pred" or (contrib == "auto" and name == output_layer))
        if name == last and wants_prediction and prediction is not None and prediction.numel() == q.shape[0]:
            contrib = prediction.reshape(-1).cpu()  # the model's own prediction
        layer_req = req.replace(top_k=min(req.top_k, di.layer(name).n_rows), contribution_to=contrib)
        results[name] = di.attend(name, q, request=layer_req)
    return Explanation(
        output=out_t.detach().cpu() if out_t is not None else None,
        prediction=prediction.cpu() if prediction is not None else None,
        layers=results,
    )
