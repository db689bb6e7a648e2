"""The ``attend`` pass over a layer of an element-wise rule's store (Adam, AdamW, Adagrad, RMSprop, ...).

For such a rule the output unit ``u`` of a query ``x`` is (``docs/dual-form.md``)::

    y_u(x) = base_u(x) + sum_rows v_iu ((Q_{s_i}[u, :] (.) k_i) . x + Qb_{s_i}[u])

so a training row's attention weight depends on the unit asked about. With ``score="unit"`` each query ``q``
names its unit ``u_q`` (``contribution_to``) and a row's score is ``-(Q_s[u_q, :] (.) k_i) . x_q``: its key
dotted with the query under the optimizer's per-step, per-entry step size (``-Q_s``: an optimizer step
descends, so ``Q_s`` is negative where a gradient step lowers the loss, and ``-Q_s`` plays the part of SGD's
learning rate); its contribution to the unit is ``v_iu ((Q_s[u_q] (.) k_i) . x_q + Qb_s[u_q])`` and every
row's contribution plus the base term is the unit's output. ``top``, ``top_examples`` and ``mass`` rank and sum
these scores. With ``score="raw"`` they use the paper's ``k_i . x_q`` instead (read in a forward pass of its
own); the contributions stay exact.

The weights' ``Q_s`` come from :meth:`~lightning_dualform.attend.replay.LayerReplay.sweep_units`, from the last
step down, so rows are folded in reverse order: between rows of exactly equal unit score, the later row ranks
first here (the raw scores keep the library's rule, the earlier row first).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from lightning_dualform.attend.finite import check_answer
from lightning_dualform.attend.kernels import META_COLUMNS, AttentionAccumulator, Block
from lightning_dualform.attend.passes import assemble
from lightning_dualform.attend.passes.base import AttendPass, check_top_k
from lightning_dualform.attend.passes.outputs import primal_output
from lightning_dualform.attend.passes.units import resolve_units
from lightning_dualform.attend.replay import LayerReplay, StepRows, unit_transform
from lightning_dualform.attend.request import AttendRequest
from lightning_dualform.attend.results import AttentionResult, overall_rel_err
from lightning_dualform.store.certificate import store_tolerance
from lightning_dualform.store.source import LayerSource
from lightning_dualform.store.certificate import beyond_tolerance_cause

_ROW_COLUMNS = ("keys", "values", "step", "epoch", "index", "position", "label")
_META = ("step", "epoch", "index", "position", "label")
#: bytes of scores one fold of the unit sweep gathers from consecutive steps (a step's rows are few: folding
#: them one step at a time would cost a parallel region per step and per result)
_CHUNK_BYTES = 64 * 2**20


class ElementwisePass(AttendPass):
    """Attend over an element-wise rule's memory, replayed in float64 (see the module docstring)."""

    forms = ("element-wise",)

    def prepare(self, request: AttendRequest, *, output_layer: bool) -> AttendRequest:
        if request.scan != "exact":
            raise ValueError(
                f"`attend(scan={request.scan!r})`: a store of an element-wise rule ({self.ctx.store.update_rule}) is "
                "scanned exactly only."
            )
        return request.resolved(element_wise=True, output_layer=output_layer)

    def run(self, layer: LayerSource, queries: torch.Tensor, request: AttendRequest) -> AttentionResult:
        ctx, req, q = self.ctx, request, queries
        acc = ctx.accumulate
        cpu = torch.device("cpu")
        rep = LayerReplay(layer, req.at_step, block_rows=ctx.rows_per_block(layer), columns=_ROW_COLUMNS)
        check_top_k(layer, req.top_k, rep.n_rows, rep.end)
        final = rep.end == ctx.store.last_step
        primal = primal_output(layer, q, acc, ctx.device) if final else None
        # dual: the replayed weights (the certificate's, when it kept them for exactly these rows), applied
        stored = layer.stored_memory_sums(rep.end, rep.n_rows) if (final and req.reuse_certificate) else None
        if stored is not None and not self._stored_replay_agrees(layer, stored):
            stored = None
        if stored is not None:
            w, b = stored
        elif req.reuse_certificate:  # (a certificate made as training went keeps none: replay once per session)
            key = (layer.name, rep.end, rep.n_rows)
            if key not in ctx.replayed:
                ctx.replayed[key] = rep.weights()
            w, b = ctx.replayed[key]
        else:
            w, b = rep.weights()
        x64 = q.detach().to(cpu, torch.float64)
        dual = x64 @ torch.from_numpy(w).t()
        if b is not None:
            dual += torch.from_numpy(b)
        units = resolve_units(layer, q.shape[0], req.contribution_to,
                              lambda: primal if primal is not None else dual.to(acc))
        if req.score == "unit" and units is None:
            raise ValueError(
                f"`attend(score='unit')` on layer {layer.name!r} ({ctx.store.update_rule} store): a row's attention "
                "weight depends on the output unit; name one with contribution_to= ('pred', an int, or one unit per "
                "query), or pass score='raw' for the similarity k . q."
            )
        stats = ctx.layer_stats(layer) if (req.per_example or req.mass) else None
        base_out = dual.to(acc)

        # The accumulator sees each query's unit as its place among the distinct units asked about: a block's
        # contribution coefficients then have one column per distinct unit, not d_out.
        compact = None if units is None else torch.from_numpy(
            np.unique(units.numpy(), return_inverse=True)[1].reshape(-1).astype(np.int64))

        def accumulator(with_units: bool, with_mass: bool, with_examples: bool) -> AttentionAccumulator:
            return AttentionAccumulator(
                queries=q.to(cpu, acc), base=base_out, top_k=req.top_k, units=compact if with_units else None,
                n_examples=stats.n_examples if (with_examples and stats) else 0,
                n_labels=stats.n_labels if (with_mass and stats) else 0,
                n_epochs=stats.n_epochs if (with_mass and stats) else 0,
                n_step_buckets=req.step_buckets if (with_mass and stats) else 0,
                query_chunk=ctx.query_chunk, with_dual=False,
            )

        unit_score = req.score == "unit"
        main = accumulator(unit_score, req.mass, req.per_example)
        if not unit_score:
            _raw_pass(rep, main, req.step_buckets, acc, ctx.rows_per_block(layer))
        side = main
        unit_base = unit_output = None
        if units is not None:
            side = main if unit_score else accumulator(True, False, req.per_example)
            unit_base, unit_output = _unit_sweep(rep, side, x64, units, req.step_buckets, acc)
        res = assemble.new_result(layer.name, at_step=rep.end, rows=rep.n_rows, dual=main.dual, primal=primal,
                                  exact_store=bool(ctx.store.optimizer_exact and layer.exact),
                                  dual_source="certificate" if stored is not None else "rows", score=req.score)
        assemble.add_top(res, main, stats)
        if units is not None:
            assemble.add_contributions(res, side, stats, units)  # the sweep's contributions, whatever ranked `top`
            res.unit_base = unit_base
            res.unit_output = unit_output
        assemble.add_mass(res, main, first_step=rep.first, end_step=rep.end, step_buckets=req.step_buckets)
        # a NaN or inf anywhere in the rows it read is in the answer's sums: refused, not merely "not exact"
        check_answer(layer, res, path=ctx.path, queries=q, block_rows=ctx.rows_per_block(layer))
        if res.primal is not None:
            self._check_answer(res, from_rows=stored is None)
        return res

    def _check_answer(self, res: AttentionResult, *, from_rows: bool) -> None:
        """Every output the answer rebuilt against the stored final weights' output for the same queries: ``dual``
        (``rel_err``, from ``new_result``) and, where the sweep ran, each query's unit output rebuilt from the rows
        this pass read (``unit_rel_err``). The store's rows, optimizer state and tables shape the ranking through
        those unit outputs: beyond the store's tolerance the answer is not the model's, and it says so."""
        tol = store_tolerance(self.ctx.store)
        res.tolerance = tol
        primal = res.primal.double()
        dual = "`dual`" + ("" if from_rows else " (the certificate's replayed weights)")
        errs = {dual: overall_rel_err(res.dual, res.primal)}
        if res.unit_output is not None and res.units is not None:
            want = primal.gather(1, res.units.long()[:, None]).squeeze(1)
            diff = res.unit_output.double() - want
            res.unit_rel_err = diff.abs() / torch.linalg.norm(primal, dim=1).clamp_min(1e-300)
            ref, gap = float(torch.linalg.norm(primal)), float(torch.linalg.norm(diff))
            errs["the unit outputs rebuilt from the rows"] = gap / ref if ref > 0 else (0.0 if gap == 0 else math.inf)
        beyond = {what: e for what, e in errs.items() if not e <= tol}  # NaN counts as beyond
        if beyond and res.exact_store:
            said = "; ".join(f"{what} by {e:.2e}" for what, e in beyond.items())
            warnings.warn(
                f"{self.ctx.path}: layer {res.layer!r}: the answer differs from the stored final weights' output: "
                f"{said} relative (over all queries; tolerance {tol:.0e}): its optimizer state, per-step tables or rows "
                f"do not rebuild the trained model. {beyond_tolerance_cause(self.ctx.store.layer(res.layer).certificate)}",
                RuntimeWarning, stacklevel=4,
            )

    def _stored_replay_agrees(self, layer: LayerSource, stored: tuple[np.ndarray, np.ndarray | None]) -> bool:
        """Whether the certificate's kept replay weights are as far from the stored final weights as the
        certificate says, within the store's tolerance (a few vector operations). Weights that disagree must never
        shape an answer silently: warn, and the caller replays the rows instead."""
        from lightning_dualform.attend.certificate import replay_weights_error, store_tolerance

        err = replay_weights_error(layer, stored)
        tol = store_tolerance(self.ctx.store)
        said = layer.certificate.rel_err if layer.certificate is not None else 0.0
        if not abs(err - float(said)) <= tol:
            warnings.warn(
                f"{self.ctx.path}: layer {layer.name!r}: the certificate's kept replay weights differ from the final "
                f"weights by {err:.2e} relative where the certificate says {float(said):.2e} (tolerance {tol:.0e}): "
                "they are damaged. Answers replay the rows instead; `lightning-dualform verify --write-certificate` writes "
                "them again.",
                RuntimeWarning, stacklevel=4,
            )
            return False
        return True


def _block(data: dict[str, np.ndarray], rows: np.ndarray, first: int, end: int, step_buckets: int, acc: torch.dtype,
           state: AttentionAccumulator, keys: bool = True) -> Block:
    """A :class:`Block` of rows (``data``: the store's columns; ``rows``: their row numbers), with the metadata the
    inference pass prepares (label and step groups, packed metadata, mass groups)."""
    b = len(rows)
    meta = {c: torch.from_numpy(np.ascontiguousarray(data[c], dtype=np.int64)) for c in _META}
    meta["row"] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    span = max(end - first, 1)
    step_group = torch.clamp((meta["step"] - first) * step_buckets // span, 0, step_buckets - 1)
    label_group = meta["label"] + 1
    groups = None
    if state.mass_offsets:
        cols = {"label": label_group, "epoch": meta["epoch"], "step": step_group}
        groups = torch.stack([cols[n] + off for n, off in state.mass_offsets.items()], dim=1).contiguous()
    np_acc = np.float64 if acc == torch.float64 else np.float32
    values = torch.from_numpy(np.ascontiguousarray(data["values"], dtype=np_acc))
    zeros = torch.zeros(b, dtype=acc)
    k = torch.from_numpy(np.ascontiguousarray(data["keys"], dtype=np_acc)) if keys else torch.empty(b, 0, dtype=acc)
    return Block(keys=k, values=values, c_w=zeros, c_b=zeros, meta=meta, label_group=label_group, step_group=step_group,
                 packed_meta=torch.stack([meta[c] for c in META_COLUMNS], dim=1).contiguous(), groups=groups)


def _raw_pass(
    rep: LayerReplay, state: AttentionAccumulator, step_buckets: int, acc: torch.dtype, block_rows: int
) -> None:
    """The paper's scores ``k . q`` folded in row order, in blocks (contributions are the unit sweep's)."""
    lay = rep.layer
    for a in range(0, rep.n_rows, block_rows):
        b = min(a + block_rows, rep.n_rows)
        state.fold(_block(lay.read(a, b, _ROW_COLUMNS), np.arange(a, b), rep.first, rep.end, step_buckets, acc, state))


def _unit_sweep(
    rep: LayerReplay, state: AttentionAccumulator, x64: torch.Tensor, units: torch.Tensor, step_buckets: int,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold every row's unit score and contribution into ``state``; returns the base term of each query's unit
    and the unit's output rebuilt from the contributions (base plus their sum), both ``(n,)`` float64.

    Per step: ``T = -(Q_s[u_q, :] (.) x_q)`` (numpy); the products ``K_s T^T`` of consecutive steps run as one
    batched product, written into a score block of about :data:`_CHUNK_BYTES` that is folded at once."""
    u = units.cpu().numpy().astype(np.int64)
    uniq, upos = np.unique(u, return_inverse=True)  # the accumulator's units are upos (see elementwise_attend)
    upos = upos.reshape(-1)
    held = rep.unit_rows(u)
    pos = np.searchsorted(held, u) if held is not None else u
    x = x64.numpy()
    n, d_in, d_out = len(u), x.shape[1], rep.layer.d_out
    np_acc = np.float64 if acc == torch.float64 else np.float32
    xneg = (-x).astype(np_acc)
    cap = max(1, _CHUNK_BYTES // max(1, n * np.dtype(np_acc).itemsize))  # score rows per fold
    chunk = max(1, int(state.query_chunk))
    # consecutive steps' products K_s T_s^T run as one batched product (see replay.GRAD_BATCH_BYTES)
    batch = max(1, _CHUNK_BYTES // max(1, n * d_in * np.dtype(np_acc).itemsize)) if n <= chunk else 1
    ts = np.empty((batch, n, d_in), dtype=np_acc)  # T of the steps waiting for their product
    scores = np.empty((cap + batch * 256, n), dtype=np_acc)  # the block being gathered (grown if a step is larger)
    total = torch.zeros(n, dtype=torch.float64)
    upos_t, col_t = torch.from_numpy(upos), torch.arange(n)
    waiting: list[tuple[StepRows, np.ndarray]] = []  # steps whose T waits in ts: (rows, qb)
    gathered: list[tuple[StepRows, np.ndarray]] = []  # steps whose scores are in `scores`: (rows, coef_b)
    filled = 0
    current: dict[str, Any] = {}

    def fold() -> None:
        nonlocal filled
        if not gathered:
            return
        cols = {c: np.concatenate([r.data[c] for r, _ in gathered]) for c in _META}
        # (the accumulator's units are compact: one column per distinct unit)
        cols["values"] = np.concatenate([r.values[:, uniq] for r, _ in gathered])
        rows = np.concatenate([np.arange(r.row0, r.row0 + len(r)) for r, _ in gathered])
        blk = _block(cols, rows, rep.first, rep.end, step_buckets, acc, state, keys=False)
        blk.scores_t = torch.from_numpy(scores[:filled])
        blk.coef_w = torch.from_numpy(np.negative(cols["values"], dtype=np_acc))  # (rows, |U|)
        blk.coef_b = torch.from_numpy(np.concatenate([cb for _, cb in gathered]))
        state.fold(blk)
        # the rows' contributions to each query's unit, summed: score * coef_w[u] + coef_b[u], as one small product
        # over the distinct units (|U| x rows x n) instead of gathering coef_w[:, u] for every query (rows x n)
        m = blk.coef_w.t() @ blk.scores_t  # (|U|, n)
        total.add_(m[upos_t, col_t].double() + blk.coef_b.sum(0)[upos_t].double())
        gathered.clear()
        filled = 0

    def room(rows_needed: int) -> None:
        nonlocal scores
        if filled + rows_needed > len(scores):
            fold()
        if rows_needed > len(scores):
            scores = np.empty((rows_needed, n), dtype=np_acc)

    def gather(r: StepRows, qb: np.ndarray) -> None:
        gathered.append((r, (r.values[:, uniq].astype(np.float64) * qb[uniq][None, :]).astype(np_acc)))

    def product() -> None:
        nonlocal filled
        if not waiting:
            return
        widths = [len(r) for r, _ in waiting]
        width, c = max(widths), len(waiting)
        room(c * width)
        if c > 1:
            ks = np.zeros((c, width, d_in), dtype=np_acc)
            for i, (r, _) in enumerate(waiting):
                ks[i, : len(r)] = r.keys
            tt = torch.from_numpy(ts[:c]).transpose(1, 2)
            if min(widths) == width:  # equal steps (the usual case): straight into the block
                dest = torch.from_numpy(scores[filled: filled + c * width]).view(c, width, n)
                torch.bmm(torch.from_numpy(ks), tt, out=dest)
                filled += c * width
            else:
                out = torch.bmm(torch.from_numpy(ks), tt).numpy()
                for i, w in enumerate(widths):
                    scores[filled: filled + w] = out[i, :w]
                    filled += w
        else:
            r = waiting[0][0]
            keys = torch.from_numpy(np.ascontiguousarray(r.keys, dtype=np_acc))
            dest = torch.from_numpy(scores[filled: filled + len(r)])
            for q0 in range(0, n, chunk):  # queries in chunks: T is (n, d_in) per step
                q1 = min(q0 + chunk, n)
                tq = ts[0] if batch > 1 or (q0 == 0 and q1 == n and chunk >= n) else _transform(q0, q1)
                dest[:, q0:q1] = torch.mm(keys, torch.from_numpy(tq[: q1 - q0]).t())
            filled += len(r)
        for r, qb in waiting:
            gather(r, qb)
        waiting.clear()
        if filled >= cap:
            fold()

    def _transform(q0: int, q1: int, out: np.ndarray | None = None) -> np.ndarray:
        """``-(Q_s[u_q, :] (.) x_q)`` of queries ``q0..q1`` in the accumulation dtype (into ``out``)."""
        q = current["q_w"]
        if out is None:
            out = np.empty((q1 - q0, d_in), dtype=np_acc)
        if isinstance(q, np.ndarray) and q.ndim == 2:  # the common case: a gather and a product, in place
            np.take(q.astype(np_acc, copy=False), pos[q0:q1], axis=0, out=out)
            out *= xneg[q0:q1]
        else:
            out[...] = unit_transform(q, pos[q0:q1], xneg[q0:q1])
        return out

    def visit(rows: StepRows, q_w: Any, q_b: Any) -> None:
        if not len(rows):
            return
        qb = np.zeros(d_out)
        if np.ndim(q_b) or float(q_b) != 0.0:
            qb[u] = unit_transform(q_b, pos, None)  # Qb_s[u_q]
        # the unit score -(Q_s[u] (.) k) . x = k . T with T = -(Q_s[u] (.) x)
        current["q_w"] = q_w
        if batch > 1 or chunk >= n:
            _transform(0, n, ts[len(waiting)])
        waiting.append((rows, qb))
        if len(waiting) >= batch:
            product()

    base_w, base_b = rep.sweep_units(u, visit)
    product()
    fold()
    base = np.einsum("nd,nd->n", np.asarray(base_w)[pos], x)
    if base_b is not None:
        base = base + np.asarray(base_b)[pos]
    return torch.from_numpy(base), torch.from_numpy(base) + total
