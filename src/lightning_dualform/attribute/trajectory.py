"""The training run replayed from a store: every tracked parameter and the optimizer's state at every step.

The store holds each step's rows, so each step's raw gradient ``G_s = sum_rows v k^T`` (``sum_rows v`` for a bias)
of every tracked parameter, the per-step tables of the update rule and the state before the first step. Feeding
``G_s`` through the rule's differentiable step (:mod:`.optimizers`) rebuilds the model after every step, in
float64, without running the model: that is what a replaying method needs (TracIn at every step, the
metagradient's reverse sweep). Memory is bounded by snapshots: :meth:`Trajectory.snapshots` keeps the state every
``K`` steps, and a segment is replayed again from its snapshot when a reverse sweep reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_dualform.attend.replay import LayerReplay, StepRows
from lightning_dualform.attribute.examples import columns_of
from lightning_dualform.attribute.kernels import dense_scores
from lightning_dualform.attribute.model import BoundModel
from lightning_dualform.attribute.optimizers import TENSOR_STATE, State, initial_state, step_function
from lightning_dualform.optim.rule import row_of

_COLUMNS = ("keys", "values", "step", "index", "label")


@dataclass
class Point:
    """The model and the optimizer's state before update number ``s``."""

    s: int
    params: dict[str, torch.Tensor]
    states: dict[str, State]

    def detached(self) -> "Point":
        return Point(self.s, {k: v.detach() for k, v in self.params.items()},
                     {k: {e: (t.detach() if isinstance(t, torch.Tensor) else t) for e, t in st.items()}
                      for k, st in self.states.items()})


class Trajectory:
    """The replay of a store's run over every tracked parameter.

    Args:
        store: an opened store of an exact run (every rule it records has a differentiable step).
        bound: the model bound to the store.
        dtype: the replay's dtype (float64 by default: it follows a float32 run to its rounding).

    Raises:
        ValueError: a rule without a differentiable step, or layers whose step tables disagree.
    """

    def __init__(self, store: Any, bound: BoundModel, *, dtype: torch.dtype = torch.float64) -> None:
        self.store = store
        self.bound = bound
        self.dtype = dtype
        self.rule = store.update_rule
        if store.form != "scalar" and store.form != "element-wise":
            raise ValueError(f"{store.path}: a run recorded with exact=False (update rule 'plain') cannot be replayed "
                             "exactly.")
        self.step_fn = step_function(self.rule)
        self.n_steps = store.n_steps
        self.first_step = store.first_step
        self.replays = {n: LayerReplay(store.layer(n), columns=_COLUMNS) for n in bound.layers}
        self.tables: dict[str, dict] = {}
        self.grad_scale: dict[str, np.ndarray] = {}
        self.param_dtype: dict[str, str] = {}
        params0, states0 = {}, {}
        for name, (layer, pname) in bound.param_of.items():
            lay = store.layer(layer)
            u = lay.updates()
            self.tables[name] = u[pname]
            self.grad_scale[name] = np.asarray(u["grad_scale"], dtype=np.float64)
            self.param_dtype[name] = lay.param_dtype
            st = lay.initial_state(pname)
            params0[name] = torch.as_tensor(st.linear["param"], dtype=dtype)
            states0[name] = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v)
                             for k, v in initial_state(self.rule, st).items()}
        self.start = Point(0, params0, states0)

    # -- rows and gradients -------------------------------------------------------------------------------
    def rows(self, start: int, stop: int) -> Iterator[dict[str, StepRows]]:
        """Per update number ``start..stop-1``, each layer's rows of that step."""
        its = {n: rep.steps(start, stop) for n, rep in self.replays.items()}
        for _ in range(start, stop):
            yield {n: next(it) for n, it in its.items()}

    def stored_grads(self, rows: dict[str, StepRows]) -> dict[str, torch.Tensor]:
        """``G_s`` of every tracked parameter from the step's rows, in the parameter's own shape."""
        out = {}
        for name, (layer, pname) in self.bound.param_of.items():
            r = rows[layer]
            v = torch.as_tensor(r.values).to(self.dtype)
            if pname == "bias":
                out[name] = v.sum(0)
            else:
                k = torch.as_tensor(r.keys).to(self.dtype)
                out[name] = self.bound.to_module_shape(layer, "weight", v.t() @ k)
        return out

    def batch_indices(self, rows: dict[str, StepRows]) -> tuple[np.ndarray, np.ndarray]:
        """The dataset indices of the step's examples, in the order of their first rows, and their labels: from
        every layer's rows (a layer frozen for the step has none; empty where no layer has any)."""
        parts = [rows[n] for n in self.bound.layers if n in rows and len(rows[n].data["index"])]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        index = np.concatenate([r.data["index"] for r in parts])
        label = np.concatenate([r.data["label"] for r in parts])
        idx, first = np.unique(index, return_index=True)
        order = np.argsort(first)
        return idx[order], label[first[order]]

    # -- one step -------------------------------------------------------------------------------------------
    def hyper(self, name: str, s: int) -> dict:
        return row_of(self.tables[name], s)

    def advance(self, point: Point, grads: dict[str, torch.Tensor], scale: dict[str, Any] | None = None) -> Point:
        """The point after update number ``point.s`` with raw gradients ``grads`` (each times the step's gradient
        scale, or ``scale[name]`` where given: a differentiable clip factor). Differentiable in everything."""
        s = point.s
        params, states = {}, {}
        for name, p in point.params.items():
            hp = self.hyper(name, s)
            if not hp["applied"]:
                params[name], states[name] = p, point.states[name]
                continue
            gs = scale[name] if scale is not None and name in scale else float(self.grad_scale[name][s])
            params[name], states[name] = self.step_fn(p, point.states[name], gs * grads[name], hp,
                                                      self.param_dtype[name])
        return Point(s + 1, params, states)

    def state_tensors(self, point: Point) -> list[tuple[str, str, torch.Tensor]]:
        """``(param, entry, tensor)`` of the optimizer state autograd follows."""
        out = []
        for name, st in point.states.items():
            for e in TENSOR_STATE[self.rule]:
                t = st.get(e)
                if isinstance(t, torch.Tensor):
                    out.append((name, e, t))
        return out

    # -- the forward replay ----------------------------------------------------------------------------------
    def segment_length(self, budget_bytes: int = 256 * 2**20) -> int:
        """Steps per snapshot ``K ~ sqrt(S)``, more when the whole run's states fit ``budget_bytes``."""
        per = sum(p.numel() * p.element_size() for p in self.start.params.values())
        per *= 1 + len(TENSOR_STATE[self.rule])
        if per * max(self.n_steps, 1) <= budget_bytes:
            return max(self.n_steps, 1)
        return max(1, int(math.ceil(math.sqrt(self.n_steps))))

    def snapshots(self, k: int) -> tuple[list[Point], Point]:
        """The points at update numbers ``0, k, 2k, ...`` (one forward pass over the rows) and the last one."""
        snaps = [self.start]
        point = self.start
        with torch.no_grad():
            for rows in self.rows(0, self.n_steps):
                point = self.advance(point, self.stored_grads(rows))
                if point.s % k == 0 and point.s < self.n_steps:
                    snaps.append(point)
        return snaps, point

    def final_error(self, point: Point) -> dict[str, float]:
        """Relative error of the replayed last point against the store's final weights, per parameter (None
        entries for a store without final weights)."""
        out = {}
        for name, (layer, pname) in self.bound.param_of.items():
            lay = self.store.layer(layer)
            final = lay.weight_final if pname == "weight" else lay.bias_final
            if final is None or not self.store.complete:
                continue
            ref = self.bound.to_module_shape(layer, pname, final).to(self.dtype)
            out[name] = float((point.params[name] - ref).norm() / max(float(ref.norm()), 1e-30))
        return out


def score_rows(bound: BoundModel, rows: dict[str, StepRows], lam: dict[str, torch.Tensor], table: torch.Tensor,
               examples: np.ndarray) -> None:
    """``table[:, i] += <Lambda, d G_s / d w_i>`` for the examples of one step: per layer, each row's
    ``v^T Lambda_W k + Lambda_b . v``, with ``lam`` the per-query cotangent of every tracked parameter's raw
    gradient ``(n, *shape)``."""
    for layer in bound.layers:
        r = rows[layer]
        if len(r) == 0:
            continue
        lw = bound.to_view(layer, "weight", lam[f"{layer}.weight" if layer else "weight"], batched=True)
        scores = dense_scores(lw, lam.get(f"{layer}.bias" if layer else "bias"),
                              torch.as_tensor(r.keys).to(table.dtype), torch.as_tensor(r.values).to(table.dtype))
        table.index_add_(1, torch.as_tensor(columns_of(examples, r.data["index"])), scores.to(table.dtype))
