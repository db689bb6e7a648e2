"""TracIn at every recorded step (Pruthi et al., 2020), with the model replayed from the store.

TracIn scores example ``i`` for a query by the change its own update made to ``f`` at each step it was in:

    score_i = sum_{s: i in batch s} <df/dtheta (theta_s), U_s (.) dG_s/dw_i>

with ``U_s = d theta_{s+1} / d g_s`` the step's immediate response to its gradient (element-wise: ``-lr_s`` for plain
SGD, Adam's ``-lr / bc1 (1 - b1) / (sqrt(v_hat) + eps)`` and the derivative through ``v``), times the step's
gradient scale. Adafactor's step is not element-wise (its factored moment, step size and clip couple the entries
of a parameter): there each query's ``df/dtheta (theta_s)`` is carried through the step's transposed Jacobian
(one vector-Jacobian product per step and query batch) and the rows are scored against it. ``theta_s`` comes from
the store's replay (:class:`~.trajectory.Trajectory`), so the checkpoints are every step, not a few saved ones;
``dG_s/dw_i`` are the example's rows (:mod:`.kernels`). Unlike the first-order score it ignores what a step's
change does to later steps (momentum, Adam's state, the later gradients); unlike the metagradient it needs no loss
function and no batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.func import jvp, vjp, vmap

from lightning_dualform.attribute.examples import columns_of
from lightning_dualform.attribute.kernels import elementwise_scores
from lightning_dualform.attribute.model import BoundModel, Forward
from lightning_dualform.attribute.targets import Target
from lightning_dualform.attribute.trajectory import Point, Trajectory, score_rows
from lightning_dualform.optim.registry import RULES


def every_step_table(store: Any, bound: BoundModel, inputs: Any, targets: torch.Tensor, target: Target,
                     examples: np.ndarray, *, forward: Forward | None = None,
                     dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores (n, len(examples)), f (n,) at the final model)``."""
    if bound.untracked_trainable():
        raise ValueError(f"method='every_step' replays the model from the store, which does not record the trainable "
                         f"parameters {bound.untracked_trainable()}; record their layers, or use method='first_order'.")
    traj = Trajectory(store, bound, dtype=dtype)
    n = targets.shape[0]
    table = torch.zeros(n, len(examples), dtype=dtype)
    point = traj.start
    with torch.no_grad():
        for rows in traj.rows(0, traj.n_steps):
            G = traj.stored_grads(rows)
            with torch.enable_grad():
                _, _, fac = bound.query_factors(point.params, inputs, targets, target, forward, dtype=dtype)
            if not RULES[traj.rule].row_local:
                _coupled_step_scores(traj, point, rows, G, bound.parameter_gradients(fac), table, examples)
                point = traj.advance(point, G)
                continue
            for layer in bound.layers:
                r = rows[layer]
                if len(r) == 0:
                    continue
                u_w = _response(traj, point, f"{layer}.weight" if layer else "weight", G)
                name_b = f"{layer}.bias" if layer else "bias"
                u_b = _response(traj, point, name_b, G) if name_b in G else None
                u_w = bound.to_view(layer, "weight", u_w) if isinstance(u_w, torch.Tensor) else u_w
                here = type(fac[layer])(fac[layer].x.to(dtype), fac[layer].g.to(dtype))
                keys, values = torch.as_tensor(r.keys).to(dtype), torch.as_tensor(r.values).to(dtype)
                scores = elementwise_scores(here, keys, values, u_w, u_b)
                table.index_add_(1, torch.as_tensor(columns_of(examples, r.data["index"])), scores)
            point = traj.advance(point, G)
    with torch.enable_grad():
        f, _, _ = bound.query_factors(point.params, inputs, targets, target, forward, dtype=dtype)
    return table, f.to(dtype)


def _response(traj: Trajectory, point: Point, name: str, G: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """``d theta_{s+1} / d G_s`` of one parameter, element-wise (every supported step is element-wise in its
    gradient), times the step's gradient scale: a float when it is the same for every entry (SGD)."""
    s = point.s
    hp = traj.hyper(name, s)
    if not hp["applied"]:
        return 0.0
    gs = float(traj.grad_scale[name][s])
    p, st = point.params[name], point.states[name]

    def step(g: torch.Tensor) -> torch.Tensor:
        return traj.step_fn(p, st, g, hp, traj.param_dtype[name])[0]

    g = gs * G[name]
    _, u = jvp(step, (g,), (torch.ones_like(g),))
    u = u * gs
    flat = u.reshape(-1)
    if traj.rule == "sgd" and len(flat):
        return float(flat[0])
    return u


def _coupled_step_scores(traj: Trajectory, point: Point, rows: dict, G: dict[str, torch.Tensor],
                         grads: dict[str, torch.Tensor], table: torch.Tensor, examples: np.ndarray) -> None:
    """TracIn's step ``s`` for a rule whose step couples a parameter's entries: per parameter, ``Lambda_q =
    gs_s (d theta_{s+1} / d g_s)^T df_q/dtheta (theta_s)``, then each row's ``v^T Lambda_q k + Lambda_bq . v``."""
    s = point.s
    lam: dict[str, torch.Tensor] = {}
    for name, g_q in grads.items():
        hp = traj.hyper(name, s)
        if not hp["applied"]:
            lam[name] = torch.zeros_like(g_q)
            continue
        gs = float(traj.grad_scale[name][s])
        p, st = point.params[name], point.states[name]
        _, back = vjp(lambda g, p=p, st=st, hp=hp: traj.step_fn(p, st, g, hp, traj.param_dtype[name])[0],
                      gs * G[name])
        lam[name] = vmap(back)(g_q.to(p.dtype))[0] * gs
    score_rows(traj.bound, rows, lam, table, examples)
