"""MAGIC's metagradient over a store: the exact ``df/dw_i`` of the final model through the whole training.

Give every training example a loss weight ``w_i`` (its term in each batch's loss is multiplied by ``w_i``; the run
had ``w = 1``). Training is a chain of steps ``x_{s+1} = step_s(x_s, g_s)`` on the state ``x = (theta, optimizer
state)``, with ``g_s = gs_s G_s`` and ``G_s = sum_i w_i dl_i/dtheta (theta_s)`` over the batch of step ``s``. The
chain rule from ``f(theta_T)`` back to ``w`` is a reverse sweep (Ilyas & Engstrom 2025, "MAGIC")::

    lambda_T = (df/dtheta_T, 0)
    for s = T-1 .. 0:
        Lambda_s = lambda_{s+1} . d step_s / d G_s            (the cotangent of the step's raw gradient)
        df/dw_i += <Lambda_s, d G_s / d w_i>                  for i in the batch of s
        lambda_s = lambda_{s+1} . d step_s / d x_s  +  H_s Lambda_s     (H_s: the batch loss's Hessian)

``d G_s / d w_i`` is example ``i``'s term of the step's gradient: for a tracked layer the sum of its rows'
``v k^T`` (``v`` for a bias), which the store holds. So the weight gradient is attention over the stored rows with
the query ``Lambda_s`` carried back from ``df/dtheta_T`` (``docs/dual-form.md``, "The metagradient").

What the sweep needs and where it comes from:

- ``theta_s`` and the optimizer's state at every step: replayed from the store's rows in float64
  (:class:`~.trajectory.Trajectory`), kept every ``K ~ sqrt(S)`` steps and recomputed a segment at a time, so memory
  is ``O(sqrt(S))`` states, not the whole graph;
- the loss of a batch (``loss_fn(model, batch)``, by default the LightningModule's ``training_step`` or the mean
  cross-entropy) and the batches (the step's dataset indices from the rows; inputs from the store or ``data=``):
  for ``H_s Lambda_s``, a double backward through the batch loss;
- the optimizer's derivative (:mod:`.optimizers`: every rule the store records, with every flag), and, when the run
  clipped the gradient norm, the clip factor's derivative.

The replay must follow the stored run: at every step the loss's gradient at the replayed weights is compared with
the stored ``G_s``, and the replayed final weights with the stored ones (:class:`ReplayReport`); a step whose
gradient differs by more than ``tolerance`` stops the sweep with a message that says where. What a replay cannot
follow is refused before it starts: trainable parameters the store does not record, dropout and batch norm
(their randomness and running statistics are not recorded), mixed precision, DDP shards, inexact runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from lightning_dualform.attribute.batches import BatchSource, Data, Loss, default_loss
from lightning_dualform.attribute.model import BoundModel, Forward
from lightning_dualform.attribute.targets import Target
from lightning_dualform.attribute.trajectory import Point, Trajectory, score_rows

#: the clip factor's ``eps`` in ``max_norm / (||g|| + eps)``, as ``torch.nn.utils.clip_grad_norm_`` and Lightning use it
CLIP_EPS = 1e-6
#: rules whose step divides by ``sqrt(second moment) + eps`` (Adamax: ``max(.., |g| + eps)``): scale-free above ``eps``
SCALE_FREE_RULES = ("adam", "adamax", "nadam", "radam", "adagrad", "rmsprop")
#: below this ``eps`` such a run was measured rough in the loss weights (``docs/benchmarks.md``, "AdamW recipes")
SMOOTH_EPS = 1e-4


@dataclass
class ReplayReport:
    """How closely a replay followed the stored run.

    Attributes:
        steps: optimizer steps replayed.
        grad_error: the largest relative error, over steps, of the loss's gradient at the replayed weights
            against the stored ``G_s`` (all tracked parameters together).
        worst_step: the update number where it was largest.
        final_error: per parameter, the relative error of the replayed final weights against the stored ones.
        segment: steps per snapshot of the sweep (``K``); ``snapshots`` how many were kept.
        clip: the gradient-norm clip the replay differentiated (``None``: no clipping).
        notes: what the user should know about how well the exact derivative predicts retraining
            (:func:`smoothness_note`).
    """

    steps: int = 0
    grad_error: float = 0.0
    worst_step: int = -1
    final_error: dict[str, float] = field(default_factory=dict)
    segment: int = 0
    snapshots: int = 0
    clip: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def max_final_error(self) -> float:
        return max(self.final_error.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "grad_error": self.grad_error, "worst_step": self.worst_step,
                "final_error": self.final_error, "max_final_error": self.max_final_error, "segment": self.segment,
                "snapshots": self.snapshots, "clip": self.clip, "notes": list(self.notes)}


def smoothness_note(traj: Trajectory) -> str | None:
    """A note where the run's update rule is scale-free with a tiny ``eps`` (Adam, AdamW, ... at torch's default
    ``1e-8``), else ``None``.

    The metagradient is exact whatever the rule; whether it predicts *dropping* an example depends on the training
    being smooth in the loss weights. With ``eps`` far below a weight's gradient scale, Adam's step ``lr m_hat /
    sqrt(v_hat)`` is scale-free: a gradient entry that is a near-cancellation of a few examples still moves its
    weight by up to ``lr``, and dropping one of them can flip that step. Measured on the MNIST MLP with AdamW (two
    runs): LDS 0.32-0.39 at ``eps = 1e-8``, 0.79-0.88 at ``1e-6``, 0.90-0.91 at ``1e-4``, accuracy within 0.01.
    """
    if traj.rule not in SCALE_FREE_RULES:
        return None
    eps = min(float(traj.hyper(name, 0)["eps"]) for name in traj.tables)
    if eps >= SMOOTH_EPS:
        return None
    return (f"the run's {traj.rule} step has eps={eps:g}: training with so small an eps is not smooth in the loss "
            "weights, so this exact derivative may predict retraining without an example poorly (measured with "
            "AdamW on an MNIST MLP, two runs: LDS 0.32-0.39 at eps=1e-8, 0.79-0.88 at 1e-6, 0.90-0.91 at 1e-4, "
            f"accuracy within 0.01). Train with eps >= {SMOOTH_EPS:g} (a learning-rate warm-up helps too) where the "
            "metagradient should predict retraining.")


def check_replayable(store: Any, bound: BoundModel) -> None:
    """Refuse, naming the cause, what a replay cannot follow exactly.

    Raises:
        ValueError: untracked trainable parameters, dropout or normalisation layers, DDP shards, mixed precision,
            an inexact or unfinished store.
    """
    causes = []
    untracked = bound.untracked_trainable()
    if untracked:
        causes.append(f"trainable parameters the store does not record: {untracked} (record their layers, or freeze "
                      "them with requires_grad=False before training)")
    bad = bound.unreplayable_modules()
    if bad:
        causes.append(f"modules whose training-time forward the store cannot reproduce: {bad} (dropout masks and batch "
                      "statistics are not recorded)")
    if getattr(store, "meta", None) is None or store.meta.world_size != 1:
        causes.append("a DDP run (its shards' batches and gradient averaging are not replayed yet)")
    elif store.meta.precision not in ("32-true", "64-true") or store.meta.float32_products != "ieee":
        causes.append(f"precision {store.meta.precision!r} with float32 products {store.meta.float32_products!r} "
                      "(rounded gradients: the replay would not follow the run)")
    if store.form == "plain":
        causes.append("an inexact run (recorded with exact=False)")
    if causes:
        raise ValueError(f"{store.path} cannot be replayed exactly: " + "; ".join(causes) + ".")


def _clip_value(store: Any, max_grad_norm: float | str | None) -> float | None:
    if max_grad_norm == "auto":
        meta = store.meta
        if meta.gradient_clip_val and meta.gradient_clip_algorithm == "norm":
            return float(meta.gradient_clip_val)
        return None
    if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                      or max_grad_norm <= 0):
        raise ValueError(f"`max_grad_norm={max_grad_norm!r}` must be 'auto', None or a positive number.")
    return None if max_grad_norm is None else float(max_grad_norm)


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5 if den > 0 else num**0.5


class _LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: Loss) -> None:
        super().__init__()
        self.inner = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.inner, batch)


def metagradient_table(
    store: Any,
    bound: BoundModel,
    inputs: Any,
    targets: torch.Tensor,
    target: Target,
    examples: np.ndarray,
    *,
    loss_fn: Loss | None = None,
    data: Data = None,
    forward: Forward | None = None,
    query_batch: int = 64,
    max_grad_norm: float | str | None = "auto",
    tolerance: float = 1e-4,
    segment: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, ReplayReport]:
    """``(scores (n, len(examples)), f (n,), report)``: the metagradient of every query.

    Queries are swept ``query_batch`` at a time (one reverse sweep per batch; the cotangents of a batch ride along
    one vectorised backward). See the module docstring for the rest.

    Raises:
        ValueError: a run that cannot be replayed (:func:`check_replayable`), or a replay that leaves the stored
            run (a step's gradient off by more than ``tolerance``: the loss or the batches are not the run's).
    """
    check_replayable(store, bound)
    traj = Trajectory(store, bound, dtype=dtype)
    clip = _clip_value(store, max_grad_norm)
    if clip is None:
        scales = np.concatenate(list(traj.grad_scale.values()))
        if len(scales) and not np.allclose(scales, 1.0, rtol=0, atol=1e-12):
            raise ValueError(f"{store.path}: some steps scaled the gradient by a factor other than 1 (between "
                             f"{scales.min():.6g} and {scales.max():.6g}), and the store does not say by which norm "
                             "clip. "
                             "Pass max_grad_norm= (the clip value the run used).")
    loss_fn = loss_fn or default_loss(bound.model)
    source = BatchSource(store, data, dtype)
    source.keep(examples)
    k = segment or traj.segment_length()
    snaps, last = traj.snapshots(k)
    report = ReplayReport(steps=traj.n_steps, final_error=traj.final_error(last), segment=k, snapshots=len(snaps),
                          clip=clip)
    note = smoothness_note(traj)
    if note is not None:
        report.notes.append(note)
        warnings.warn(f"influence(method='metagradient'): {note}", stacklevel=4)
    lossmod = _LossModule(bound.model, loss_fn)
    n = targets.shape[0]
    table = torch.zeros(n, len(examples), dtype=dtype)
    values = torch.zeros(n, dtype=dtype)
    final = {k_: v.detach() for k_, v in last.params.items()}
    for a in range(0, n, query_batch):
        sl = slice(a, min(a + query_batch, n))
        q_in = inputs[sl]
        f, _, fac = bound.query_factors(final, q_in, targets[sl], target, forward, dtype=dtype)
        values[sl] = f.to(dtype)
        lam = bound.parameter_gradients(fac)
        _sweep(traj, snaps, lossmod, source, lam, table[sl], examples, clip, tolerance, report)
    return table, values, report


def _sweep(traj: Trajectory, snaps: list[Point], lossmod: _LossModule, source: BatchSource,
           lam: dict[str, torch.Tensor], table: torch.Tensor, examples: np.ndarray, clip: float | None,
           tolerance: float, report: ReplayReport) -> None:
    """One reverse sweep for a batch of queries: ``lam`` holds ``df/dtheta_T`` ``(nq, *shape)``; scores go into
    ``table`` ``(nq, n_examples)`` (a view)."""
    nq = next(iter(lam.values())).shape[0]
    lam_state: dict[tuple[str, str], torch.Tensor] = {}
    bounds = [p.s for p in snaps] + [traj.n_steps]
    model = lossmod.inner
    was_training = model.training
    model.train()
    try:
        for snap, stop in reversed(list(zip(snaps, bounds[1:]))):
            points, rows_list, grads_list = [snap], [], []
            with torch.no_grad():
                for rows in traj.rows(snap.s, stop):
                    rows_list.append(rows)
                    grads_list.append(traj.stored_grads(rows))
                    points.append(traj.advance(points[-1], grads_list[-1]))
            for j in range(len(rows_list) - 1, -1, -1):
                lam, lam_state = _back_step(traj, points[j], rows_list[j], grads_list[j], lossmod, source, lam,
                                            lam_state, table, examples, clip, tolerance, report, nq)
            del points, rows_list, grads_list
    finally:
        model.train(was_training)


def _back_step(traj: Trajectory, point: Point, rows: dict, stored: dict[str, torch.Tensor], lossmod: _LossModule,
               source: BatchSource,
               lam: dict[str, torch.Tensor], lam_state: dict[tuple[str, str], torch.Tensor], table: torch.Tensor,
               examples: np.ndarray, clip: float | None, tolerance: float, report: ReplayReport, nq: int
               ) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor]]:
    s = point.s
    names = list(point.params)
    # only what the update applied: a layer frozen for it has autograd's gradient here but no rows in the store
    applied = [k for k in names if traj.hyper(k, s)["applied"]]
    if not applied:
        return lam, lam_state  # (the update changed no tracked parameter: nothing flows back through it)
    theta = {k: v.detach().requires_grad_(True) for k, v in point.params.items()}
    states = {k: {e: (t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) else t) for e, t in st.items()}
              for k, st in point.states.items()}
    here = Point(s, theta, states)
    idx, labels = traj.batch_indices(rows)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        loss = functional_call(lossmod, {f"inner.{k}": v for k, v in theta.items()}, (source(idx, labels),))
    grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=True, allow_unused=True)
    G = {k: (g if g is not None else torch.zeros_like(theta[k])) for k, g in zip(names, grads)}
    err = _rel({k: G[k].detach() for k in applied}, {k: stored[k] for k in applied})
    if err > report.grad_error:
        report.grad_error, report.worst_step = err, s
    if err > tolerance:
        raise ValueError(
            f"the replay left the stored run at update {s} (global step {traj.first_step + s}; the updates are checked "
            "from the last back, so earlier ones may differ too): the loss's gradient at the replayed weights differs "
            f"from the stored one by {err:.2e} (relative; tolerance {tolerance:g}). The loss function, the batches "
            "(data=) or the model's forward are not those of the recorded run."
        )
    scale = None
    if clip is not None:
        norm = torch.sqrt(sum((G[k] * G[k]).sum() for k in applied))  # (a frozen layer's .grad was None)
        coef = torch.clamp(clip / (norm + CLIP_EPS), max=1.0)
        stored_gs = float(traj.grad_scale[applied[0]][s])
        factor = float(coef.detach())  # (a number to compare; coef itself stays in the graph)
        if abs(factor - stored_gs) > 1e-4 * max(stored_gs, 1e-12):
            raise ValueError(f"update {s}: the clip factor min(1, {clip:g} / ||g||) is {factor:.6g} but the store "
                             f"recorded {stored_gs:.6g}; pass the run's max_grad_norm.")
        scale = {k: coef for k in names}
    new = traj.advance(here, G, scale)
    outs, cots = [], []
    for k in names:
        outs.append(new.params[k])
        cots.append(lam[k])
    for name, e, t in traj.state_tensors(new):
        c = lam_state.get((name, e))
        if c is not None:
            outs.append(t)
            cots.append(c)
    in_state = traj.state_tensors(here)
    ins = [theta[k] for k in names] + [t for _, _, t in in_state] + [G[k] for k in names]
    res = torch.autograd.grad(outs, ins, cots, is_grads_batched=True, allow_unused=True)
    zero = lambda ref: torch.zeros((nq, *ref.shape), dtype=ref.dtype)  # noqa: E731
    new_lam = {k: (r if r is not None else zero(theta[k])) for k, r in zip(names, res[: len(names)])}
    state_res = res[len(names): len(names) + len(in_state)]
    new_state = {(name, e): r for (name, e, _), r in zip(in_state, state_res) if r is not None}
    lam_g = {k: (r if r is not None else zero(theta[k])) for k, r in zip(names, res[len(names) + len(in_state):])}
    score_rows(traj.bound, rows, lam_g, table, examples)
    return new_lam, new_state
