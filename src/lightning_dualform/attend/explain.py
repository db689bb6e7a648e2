"""``DualInference.explain``: which training examples a batch's predictions depend on.

It leads with influence on each prediction's margin (first order by default, at every tracked layer; see
:mod:`lightning_dualform.attribute`), and keeps the paper's view beside it: the model runs once on the batch with
forward hooks and every tracked layer attends with its input rows for the batch as queries. The attention
weights say how each layer's output is assembled from its training rows; they are not a prediction of what
removing or up-weighting an example would do (``docs/inference.md``).

The influence function comes in as an argument (``DualInference.explain`` passes
:func:`lightning_dualform.attribute.influence`): ``attend/`` sits below ``attribute/`` in the house's order.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from lightning_dualform._unwrap import named_modules, uncompiled, unwrap_model
from lightning_dualform.attend.request import AttendRequest, Contribution, request_from
from lightning_dualform.attend.results import AttentionResult, Explanation
from lightning_dualform.layers import first_other_layer, keys_of, one_hot_keys

if TYPE_CHECKING:
    from lightning_dualform.attend.inference import DualInference

_R = AttendRequest  # the defaults are the request's

#: ``explain(method=...)``: ``"auto"`` is first order where it applies (class scores out, rows with dataset
#: indices), else attention alone with the reason in ``Explanation.influence_note``; ``None`` skips influence.
ExplainMethod = Literal["auto", "first_order", "every_step", "metagradient"]
EXPLAIN_METHODS: tuple[str, ...] = ("auto", "first_order", "every_step", "metagradient")


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
    method: ExplainMethod | None = "auto",
    target: Any = "margin",
    targets: Any = None,
    attention: bool = True,
    influence_options: Mapping[str, Any] | None = None,
    influence_fn: Callable[..., Any] | None = None,
    **attend_kwargs: Any,
) -> Explanation:
    """Which training examples each prediction of ``batch`` depends on: influence first, attention beside it.

    ``Explanation.influence`` scores every training example by its influence on each prediction's margin
    (``df/dw_i``, :func:`lightning_dualform.attribute.influence`; ``.top(k)`` gives proponents and opponents).
    ``Explanation.layers`` holds the paper's view: each tracked layer's input rows for the batch (leading
    dimensions flattened) are its queries, attended over its training rows. The model runs in eval mode (its
    mode is restored afterwards); the attention under ``torch.no_grad()``.

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
        method: the influence method: ``"auto"`` (default) is ``"first_order"`` where it applies, else the
            attention alone, with the reason in ``influence_note`` and a warning (outputs that are not class
            scores, rows without dataset indices, a model that is not the store's trained one); ``"first_order"``,
            ``"every_step"``, ``"metagradient"`` raise instead; ``None`` skips influence.
        target, targets: what the influence is about: ``target`` ``"margin"`` (default), ``"loss"``, ``"logit"``
            or a callable; ``targets`` the class of each query (default: the model's prediction).
        attention: also attend at every tracked layer (the paper's view; ``False`` skips the passes).
        influence_options: more keywords for the influence (``loss_fn``, ``data``, ``query_batch``, ``dtype``
            ...), as :func:`lightning_dualform.attribute.influence` takes them.
        influence_fn: the influence function (:meth:`DualInference.explain` passes the library's).
        **attend_kwargs: any other :meth:`attend` knob (``at_step``, ``per_example``, ``score`` ...).

    Raises:
        KeyError: a tracked layer is not a module of ``model``.
        ValueError: an unknown ``method``, or an explicit one that cannot answer (the message says why).
    """
    if method is not None and method not in EXPLAIN_METHODS:
        raise ValueError(f"`explain(method={method!r})` is not supported. Expected one of {EXPLAIN_METHODS} or None "
                         "(attention only).")
    if method not in (None, "auto") and influence_fn is None:
        raise ValueError(f"`explain(method={method!r})` needs the influence function; call DualInference.explain.")
    if not isinstance(attention, bool):
        raise TypeError(f"`explain(attention={attention!r})`: expected True or False.")
    req = request_from("explain", request, {"top_k": top_k, "contribution_to": contribution_to, **attend_kwargs})
    names = list(layers) if layers is not None else di.layers
    for name in names:
        di.layer(name)
    inner = unwrap_model(model)  # hooks go on the user's own modules; the forward runs through the wrapper
    modules = named_modules(inner)
    missing = [n for n in names if n not in modules]
    if missing:
        have = [n for n, m in modules.items() if n and not list(m.children())][:8]
        raise KeyError(
            f"`explain(model, ...)`: the model has no module named {missing}, which the store tracks (the model's "
            f"layers include {have}). Pass the model that was trained (module names must match the store's)."
        )
    if req.at_step is None:  # every tracked layer the model has, attended or not (they make the inputs)
        _check_trained(di.store, modules, [n for n in di.layers if n in modules])
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
        with torch.no_grad(), uncompiled(model) as eager:  # (a graph compiled before the hooks would not call them)
            if forward is not None:
                output = forward(eager, batch)
            elif isinstance(batch, (list, tuple)):
                output = eager(batch[0])
            else:
                output = eager(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out_t = output if isinstance(output, torch.Tensor) else None
    prediction = out_t.argmax(dim=-1) if (out_t is not None and out_t.is_floating_point() and out_t.dim() >= 1) else None
    influence, note = None, None
    if method is not None and influence_fn is not None:
        influence, note = _influence(di, influence_fn, inner, batch, forward, method, target,
                                     targets if targets is not None else prediction, dict(influence_options or {}),
                                     asked=targets is not None)
    results: dict[str, AttentionResult] = {}
    if not attention:
        names = []
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
        influence=influence,
        influence_note=note,
    )


def _check_trained(store: Any, modules: dict[str, nn.Module], names: Sequence[str]) -> None:
    """Refuse a model whose attended layers do not hold the store's final weights: ``explain`` attends with the
    model's own layer inputs, which another model makes otherwise, over this store's memory, and the certificate
    would still say exact (it rebuilds the stored layer, not the model's).

    Raises:
        ValueError: naming the first layer that differs, and by how much.
    """
    other = first_other_layer(store, modules, list(names))
    if other is not None:
        name, pname, err = other
        raise ValueError(
            f"`explain(model, ...)`: the model's {name}.{pname} differs from the store's final weights "
            f"(relative error {err:.2e}), so it is not the model this store recorded, and its layer inputs "
            "would be attended over another model's memory. Pass the trained model (after the run's last "
            "step; a model of an earlier step with at_step= that step), or attend over the store with "
            "inputs of your own: di.attend(layer, queries).")


def _influence(di: "DualInference", influence_fn: Callable[..., Any], model: nn.Module, batch: Any,
               forward: Callable[[nn.Module, Any], Any] | None, method: str, target: Any, targets: Any,
               options: dict[str, Any], asked: bool = False) -> tuple[Any, str | None]:
    """The influence table of the batch's queries, or ``(None, reason)`` where ``method="auto"`` does not apply
    (``asked``: the caller gave ``targets=``, so influence was asked for and its errors are raised)."""
    if forward is not None:
        inputs = batch
    elif isinstance(batch, (list, tuple)):
        inputs = batch[0]
    else:
        inputs = batch
    explicit = method != "auto" or asked
    try:
        if torch.is_inference_mode_enabled():  # (a Trainer's validation or test loop): no gradient can be taken
            raise ValueError("influence differentiates the model, which torch.inference_mode() forbids; call explain "
                             "outside it (or with method=None)")
        with torch.enable_grad():  # explain's own forward runs under no_grad; a caller's no_grad is no reason to fail
            res = influence_fn(di.store, model, inputs, targets, target=target,
                               method="first_order" if method == "auto" else method, forward=forward, **options)
    except (ValueError, KeyError) as err:
        if explicit:
            raise
        reason = str(err.args[0]) if err.args else str(err)
        warnings.warn(f"`explain`: no influence for this batch, attention only ({reason}). Pass method=None to "
                      "ask for attention alone.", stacklevel=4)
        return None, reason
    return res, None
