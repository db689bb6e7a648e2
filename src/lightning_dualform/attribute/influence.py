"""The front door of attribution: ``influence(store, model, inputs, targets, ...) -> Influence``.

Three methods answer "how much does training example ``i`` matter to this prediction?" as ``df/dw_i``, the change
of a test function ``f`` (:mod:`.targets`) per unit of the example's loss weight:

- ``"first_order"`` (:mod:`.first_order`): at the final model, through the dual form's rows. Reads the store once
  (twice for an element-wise rule); needs only the trained model.
- ``"every_step"`` (:mod:`.every_step`): TracIn at every recorded step, the model replayed from the store.
- ``"metagradient"`` (:mod:`.metagradient`): exact, through the whole training (MAGIC); needs the loss and the
  batches, and a run the store can replay.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn

from lightning_dualform._unwrap import uncompiled
from lightning_dualform.attend.finite import nonfinite_rows, shown
from lightning_dualform.attribute.batches import Data, Loss
from lightning_dualform.attribute.every_step import every_step_table
from lightning_dualform.attribute.examples import store_examples
from lightning_dualform.attribute.first_order import first_order_table
from lightning_dualform.attribute.metagradient import metagradient_table
from lightning_dualform.attribute.model import BoundModel, Forward
from lightning_dualform.attribute.result import Influence
from lightning_dualform.attribute.targets import Target, as_targets, check_outputs, check_target, target_name

Method = Literal["first_order", "every_step", "metagradient"]
METHODS: tuple[str, ...] = ("first_order", "every_step", "metagradient")


def influence(
    store: Any,
    model: nn.Module,
    inputs: Any,
    targets: Any = None,
    *,
    target: Target = "margin",
    method: Method = "first_order",
    layers: list[str] | None = None,
    forward: Forward | None = None,
    loss_fn: Loss | None = None,
    data: Data = None,
    query_batch: int = 64,
    max_grad_norm: float | str | None = "auto",
    tolerance: float = 1e-4,
    dtype: torch.dtype = torch.float64,
) -> Influence:
    """Influence of every training example of ``store`` on ``f`` of each query.

    Args:
        store: an opened store (``StoreReader``, the sharded reader) or a path.
        model: the trained model (module names must be the store's layer names; its tracked weights must be the
            store's final weights).
        inputs: the queries, ``(n, ...)``: what ``model`` (or ``forward(model, inputs)``) takes.
        targets: ``(n,)`` the class each query's ``f`` is about; ``None``: the model's prediction.
        target: ``"margin"`` (default), ``"loss"``, ``"logit"`` or ``target(outputs, targets) -> (n,)``.
        method: ``"first_order"`` (default), ``"every_step"`` or ``"metagradient"``.
        layers: for ``"first_order"``, the tracked layers to sum (default: all); the replaying methods use all.
        forward: ``forward(model, inputs) -> outputs`` when ``model(inputs)`` is not the call.
        loss_fn, data, query_batch, max_grad_norm, tolerance: for ``"metagradient"``
            (:func:`~.metagradient.metagradient_table`):
            the batch loss ``loss_fn(model, batch)`` (default: a LightningModule's ``training_step``, else mean
            cross-entropy), where batches come from (default: the store's raw inputs and labels), queries per
            reverse sweep, the gradient-norm clip, and how far a replayed gradient may stray.
        dtype: accumulation dtype of the table.

    Returns:
        :class:`~.result.Influence`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``targets`` are not class numbers; ``layers`` not names.
        ValueError: a bad argument (inputs with NaN or inf, targets that are not whole numbers or not one per query,
            ``layers=[]``), a model whose outputs are not finite, a store without dataset indices, a model that is
            not the trained one, or (for the replaying methods) a run that cannot be replayed exactly (the message
            says why).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`influence(model=...)` must be the trained torch.nn.Module (a LightningModule works); got "
                        f"{type(model).__name__}.")
    check_target(target)
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers):
            raise TypeError(f"`influence(layers={layers!r})` must be a list of layer names (or None for all).")
        if not len(layers):
            raise ValueError("`influence(layers=[])` names no layer: pass some of the store's tracked layers, or "
                             "layers=None (the default) for all of them.")
    if method not in METHODS:
        raise ValueError(f"`influence(method={method!r})` is not supported. Expected one of {METHODS}.")
    if isinstance(query_batch, bool) or not isinstance(query_batch, int) or query_batch < 1:
        raise ValueError(f"`influence(query_batch={query_batch!r})` must be a positive integer.")
    own = None
    if isinstance(store, (str, os.PathLike)):
        from lightning_dualform.store.shards import open_store

        store = own = open_store(store)
    try:
        with uncompiled(model) as eager:  # a replay swaps parameters in: compiled code would recompile for each
            return _influence(store, eager, inputs, targets, target, method, layers, forward, loss_fn, data,
                              query_batch, max_grad_norm, tolerance, dtype)
    finally:
        if own is not None:
            own.close()


def _influence(store, model, inputs, targets, target, method, layers, forward, loss_fn, data, query_batch,
               max_grad_norm, tolerance, dtype) -> Influence:
    t0 = time.perf_counter()
    if method != "first_order" and layers is not None:
        raise ValueError(f"`influence(method={method!r})` replays every tracked layer; `layers=` is for 'first_order'.")
    bound = BoundModel(model, store, layers)
    params = bound.final_params(dtype)
    inputs = torch.as_tensor(inputs) if isinstance(inputs, np.ndarray) else inputs
    _check_finite_inputs(inputs)
    n = inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1 else None
    if targets is None:
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                out = model(inputs) if forward is None else forward(model, inputs)
            finally:
                model.train(was)
        check_outputs(out)
        if isinstance(out, torch.Tensor) and n is not None and (out.dim() < 2 or out.shape[0] != n):
            raise ValueError(
                f"`influence(inputs=...)`: the model's output for inputs of shape {tuple(inputs.shape)} has shape "
                f"{tuple(out.shape)}, not ({n}, classes): the inputs' first dimension is the queries. Pass a batch "
                "of queries (one query x as x[None]), or targets= and a forward that returns (n, classes).")
        targets = out.argmax(-1)
    targets = as_targets(targets, n)
    examples, labels = store_examples(store, bound.layers)
    replay = None
    if method == "first_order":
        f, _, fac = bound.query_factors(params, inputs, targets, target, forward, dtype=dtype)
        scores = first_order_table(store, fac, examples, dtype=dtype)
    elif method == "every_step":
        scores, f = every_step_table(store, bound, inputs, targets, target, examples, forward=forward, dtype=dtype)
    else:
        scores, f, replay = metagradient_table(store, bound, inputs, targets, target, examples, loss_fn=loss_fn,
                                               data=data, forward=forward, query_batch=query_batch,
                                               max_grad_norm=max_grad_norm, tolerance=tolerance, dtype=dtype)
    return Influence(scores=scores, examples=examples, labels=labels, values=f.to(dtype), target=target_name(target),
                     method=method, layers=list(bound.layers), replay=replay, seconds=time.perf_counter() - t0)


def _check_finite_inputs(inputs: Any) -> None:
    """Refuse queries with NaN or inf (as ``attend`` does): every score of theirs would be NaN, and their table
    would read as "no proponents". ``inputs`` is a tensor or what ``forward`` takes (its tensors are checked).

    Raises:
        ValueError: naming the query rows (and, inside a tuple or dict, the tensor) that are not finite.
    """
    for where, t in _tensors(inputs, "inputs", 0):
        bad = nonfinite_rows(t)
        if bad:
            raise ValueError(f"`influence({where}=...)` holds NaN or inf (query rows {shown(bad)}); every query must "
                             "be finite.")


def _tensors(x: Any, where: str, depth: int) -> Iterator[tuple[str, torch.Tensor | np.ndarray]]:
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta":
            yield where, x
    elif isinstance(x, np.ndarray):
        yield where, x
    elif depth < 3 and isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{where}[{i}]", depth + 1)
    elif depth < 3 and isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, f"{where}[{k!r}]", depth + 1)
