"""First-order influence through the output layer alone, from the store without the model's code.

For the output layer ``z = W h + b`` (the model's class scores), a query's gradient factors are its input ``h``
(which a recorded query set holds) and ``df/dz``, which depends on the scores ``z`` alone: for the margin
``f = z_y - logsumexp_{c != y} z_c`` it is ``e_y - softmax_{c != y}(z)``. So the first-order score of
:mod:`.first_order` restricted to that layer,

    score_i = sum_{rows r of i} <df/dW, Q_{s_r} (.) v_r k_r^T> + <df/db, Qb_{s_r} (.) v_r>,

needs nothing but the store: the views (the CLI's ``attend``, the viewer on a store alone, the pictures) use it
where no model is at hand. It is exactly ``influence(..., method="first_order", layers=[output layer])``
(``tests/test_views.py`` checks it), and it leaves out what the hidden layers' rows add: with the model, use
:func:`~lightning_dualform.attribute.influence` over every recorded layer.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from lightning_dualform.attribute.examples import store_examples
from lightning_dualform.attribute.first_order import BLOCK_ROWS, first_order_table
from lightning_dualform.attribute.model import QueryFactors
from lightning_dualform.attribute.result import Influence
from lightning_dualform.attribute.targets import Target, check_target, evaluate, target_name

#: layer kinds whose query rows are the layer's whole input (one row per query): linear layers
_ONE_ROW_KINDS = ("linear",)


def output_gradient(outputs: torch.Tensor, targets: torch.Tensor, target: Target = "margin") -> tuple[torch.Tensor,
                                                                                                      torch.Tensor]:
    """``(f (n,), df/dz (n, C))`` of each query's target at its class scores ``outputs`` ``(n, C)``, by autograd
    (in float64)."""
    z = outputs.detach().to(torch.float64).requires_grad_(True)
    f = evaluate(target, z, targets)
    (g,) = torch.autograd.grad(f.sum(), z)
    return f.detach(), g


def output_layer_influence(
    store: Any,
    queries: torch.Tensor | np.ndarray,
    *,
    layer: str | None = None,
    outputs: torch.Tensor | np.ndarray | None = None,
    targets: torch.Tensor | np.ndarray | None = None,
    target: Target = "margin",
    dtype: torch.dtype = torch.float64,
    block_rows: int = BLOCK_ROWS,
) -> Influence:
    """First-order influence of every training example on ``f`` of each query, through ``layer`` only.

    Args:
        store: an opened store (``StoreReader``, the sharded reader).
        queries: ``(n, d_in)`` the inputs of ``layer`` for the queries (a recorded query set's rows).
        layer: the layer whose output is the model's class scores (default: the store's last tracked layer).
        outputs: ``(n, C)`` the layer's outputs for the queries; default: the stored final weights applied
            (a store still being written has none: pass ``DualInference.attend(layer, queries).dual``).
        targets: ``(n,)`` the class each ``f`` is about; ``None``: the prediction (argmax of ``outputs``).
        target: ``"margin"`` (default), ``"loss"``, ``"logit"`` or ``target(outputs, targets) -> (n,)``.
        dtype: accumulation dtype of the table.
        block_rows: rows read at a time (a scalar rule's store); a reader with a block cache serves blocks that
            start and end where its passes' do.

    Returns:
        an :class:`~.result.Influence` with ``method="first_order"``, ``layers=[layer]`` and
        ``extra["scope"] == "output layer"``.

    Raises:
        ValueError: a layer that is not linear, queries or outputs of the wrong shape, a store without final
            weights and no ``outputs``, or rows without dataset indices.
    """
    t0 = time.perf_counter()
    check_target(target)
    name = layer if layer is not None else store.layers[-1]
    lay = store.layer(name)
    if lay.kind not in _ONE_ROW_KINDS:
        raise ValueError(f"layer {name!r} is a {lay.kind} layer; influence from the store alone needs a linear output "
                         "layer (one input row per query). Pass the model to `influence` instead.")
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries).to(dtype)
    if q.dim() != 2 or q.shape[1] != lay.d_in:
        raise ValueError(f"layer {name!r} takes queries of shape (n, {lay.d_in}); got {tuple(q.shape)}.")
    if outputs is None:
        w = lay.weight_final
        if w is None:
            raise ValueError(f"{store.path}: layer {name!r} has no final weights (the store is not complete); pass "
                             "outputs= (for instance DualInference.attend(layer, queries).dual).")
        z = q @ torch.as_tensor(np.asarray(w)).to(dtype).t()
        if lay.has_bias and lay.bias_final is not None:
            z = z + torch.as_tensor(np.asarray(lay.bias_final)).to(dtype)
    else:
        z = torch.as_tensor(np.asarray(outputs) if not isinstance(outputs, torch.Tensor) else outputs).to(dtype)
        if z.shape != (q.shape[0], lay.d_out):
            raise ValueError(f"outputs= must be ({q.shape[0]}, {lay.d_out}), the layer's output for each query; got "
                             f"{tuple(z.shape)}.")
    t = z.argmax(-1) if targets is None else torch.as_tensor(np.asarray(targets)).to(torch.int64).reshape(-1)
    f, g = output_gradient(z, t, target)
    examples, labels = store_examples(store, [name])
    factors = {name: QueryFactors(q[:, None, :], g.to(dtype)[:, None, :])}
    scores = first_order_table(store, factors, examples, dtype=dtype, block_rows=block_rows)
    return Influence(scores=scores, examples=examples, labels=labels, values=f.to(dtype), target=target_name(target),
                     method="first_order", layers=[name], seconds=time.perf_counter() - t0,
                     extra={"scope": "output layer", "targets": t.tolist()})
