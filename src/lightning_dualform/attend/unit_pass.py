"""One ``attend`` pass over a layer of an element-wise rule's store (Adam, AdamW, Adagrad, RMSprop, ...).

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

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from lightning_dualform.attend.kernels import META_COLUMNS, AttentionAccumulator, Block
from lightning_dualform.attend.replay import LayerReplay, StepRows, unit_transform

_ROW_COLUMNS = ("keys", "values", "step", "epoch", "index", "position", "label")
_META = ("step", "epoch", "index", "position", "label")
#: bytes of scores one fold of the unit sweep gathers from consecutive steps (a step's rows are few: folding
#: them one step at a time would cost a parallel region per step and per result)
_CHUNK_BYTES = 64 * 2**20


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


def elementwise_attend(di: Any, lay: Any, q: torch.Tensor, *, at_step: int | None, top_k: int, contribution_to: Any,
                       per_example: bool, mass: bool, step_buckets: int, score: str, reuse_certificate: bool) -> Any:
    """:meth:`DualInference.attend` on a layer of an element-wise rule's store (see the module docstring).

    Args:
        di: the :class:`~lightning_dualform.attend.inference.DualInference` (its device, accumulation dtype,
            block size and result assembly).
        lay: the layer's reader. q: ``(n, d_in)`` queries (checked). Others: as :meth:`DualInference.attend`.
    """
    from lightning_dualform.attend.inference import _top_examples, _top_rows

    acc = di.accumulate
    cpu = torch.device("cpu")
    rep = LayerReplay(lay, at_step, block_rows=di.rows_per_block(lay), columns=_ROW_COLUMNS)
    if top_k > rep.n_rows:
        raise ValueError(
            f"`attend(top_k={top_k})` is larger than the memory of layer {lay.name!r}: it holds {rep.n_rows} rows "
            f"up to step {rep.end}. Use top_k <= {rep.n_rows}."
        )
    final = rep.end == di.store.last_step
    primal = di._primal(lay, q) if final else None
    # dual: the replayed weights (the certificate's, when it kept them for exactly these rows), applied
    stored = lay.stored_memory_sums(rep.end, rep.n_rows) if (final and reuse_certificate) else None
    w, b = stored if stored is not None else rep.weights()
    x64 = q.detach().to(cpu, torch.float64)
    dual = x64 @ torch.from_numpy(w).t()
    if b is not None:
        dual += torch.from_numpy(b)
    units = di._units(lay, q, contribution_to, primal if primal is not None else dual.to(acc), None, None)
    if score == "unit" and units is None:
        raise ValueError(
            f"`attend(score='unit')` on layer {lay.name!r} ({di.store.update_rule} store): a row's attention weight "
            "depends on the output unit; name one with contribution_to= ('pred', an int, or one unit per query), "
            "or pass score='raw' for the similarity k . q."
        )
    stats = di._layer_stats(lay) if (per_example or mass) else None
    coef = SimpleNamespace(first_step=rep.first, end_step=rep.end)
    base_out = dual.to(acc)

    def accumulator(with_units: bool, with_mass: bool, with_examples: bool) -> AttentionAccumulator:
        return AttentionAccumulator(
            queries=q.to(cpu, acc), base=base_out, top_k=top_k, units=units if with_units else None,
            n_examples=stats.n_examples if (with_examples and stats) else 0,
            n_labels=stats.n_labels if (with_mass and stats) else 0,
            n_epochs=stats.n_epochs if (with_mass and stats) else 0,
            n_step_buckets=step_buckets if (with_mass and stats) else 0,
            query_chunk=di.query_chunk, with_dual=False,
        )

    main = accumulator(score == "unit", mass, per_example)
    if score == "raw":
        _raw_pass(rep, main, step_buckets, acc, di.rows_per_block(lay))
    unit_base = unit_output = None
    if units is not None:
        side = main if score == "unit" else accumulator(True, False, per_example)
        unit_base, unit_output = _unit_sweep(rep, side, x64, units, step_buckets, acc)
    res = di._result(lay, coef, rep.n_rows, main, stats, units if score == "unit" else None, primal, None, step_buckets, q,
                     "exact", stored is not None)
    res.dual_source = "certificate" if stored is not None else "rows"
    res.score = score
    if units is not None:
        res.units = units.to(cpu)
        res.unit_base = unit_base
        res.unit_output = unit_output
        if score == "raw" and top_k:
            res.proponents = _top_rows(side.proponents(), sign=1)
            res.opponents = _top_rows(side.opponents(), sign=-1)
        if score == "raw" and side.example_contrib is not None and stats is not None and top_k:
            present = side.example_rows > 0
            ex_label = torch.from_numpy(stats.example_label)
            res.proponent_examples = _top_examples(side.example_contrib, present, side.example_rows, ex_label, top_k, 1)
            res.opponent_examples = _top_examples(side.example_contrib, present, side.example_rows, ex_label, top_k, -1)
    return res


def _raw_pass(rep: LayerReplay, state: AttentionAccumulator, step_buckets: int, acc: torch.dtype, block_rows: int) -> None:
    """The paper's scores ``k . q`` folded in row order, in blocks (contributions are the unit sweep's)."""
    lay = rep.layer
    for a in range(0, rep.n_rows, block_rows):
        b = min(a + block_rows, rep.n_rows)
        state.fold(_block(lay.read(a, b, _ROW_COLUMNS), np.arange(a, b), rep.first, rep.end, step_buckets, acc, state))


def _unit_sweep(rep: LayerReplay, state: AttentionAccumulator, x64: torch.Tensor, units: torch.Tensor, step_buckets: int,
                acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold every row's unit score and contribution into ``state``; returns the base term of each query's unit
    and the unit's output rebuilt from the contributions (base plus their sum), both ``(n,)`` float64.

    Per step: ``T = -(Q_s[u_q, :] (.) x_q)`` (numpy); the products ``K_s T^T`` of consecutive steps run as one
    batched product, and their scores are gathered into one block of about :data:`_CHUNK_BYTES` and folded at once."""
    u = units.cpu().numpy().astype(np.int64)
    held = rep.unit_rows(u)
    pos = np.searchsorted(held, u) if held is not None else u
    x = x64.numpy()
    n, d_out = len(u), rep.layer.d_out
    np_acc = np.float64 if acc == torch.float64 else np.float32
    cap = max(1, _CHUNK_BYTES // max(1, n * np.dtype(np_acc).itemsize))
    total = np.zeros(n)
    chunk = max(1, int(state.query_chunk))
    pending: list[tuple[StepRows, np.ndarray, np.ndarray]] = []  # (rows, scores (B, n), coef_b (B, d_out))
    held_rows = 0

    def flush() -> None:
        nonlocal pending, held_rows
        if not pending:
            return
        cols = {c: np.concatenate([r.data[c] for r, _, _ in pending]) for c in ("values", *_META)}
        rows = np.concatenate([np.arange(r.row0, r.row0 + len(r)) for r, _, _ in pending])
        blk = _block(cols, rows, rep.first, rep.end, step_buckets, acc, state, keys=False)
        blk.scores_t = torch.from_numpy(np.concatenate([sc for _, sc, _ in pending]))
        blk.coef_w = torch.from_numpy(np.negative(cols["values"], dtype=np_acc))
        blk.coef_b = torch.from_numpy(np.concatenate([cb for _, _, cb in pending]))
        state.fold(blk)
        pending, held_rows = [], 0

    # the products K_s T_s^T of consecutive steps go through one batched product (see replay.GRAD_BATCH_BYTES)
    batch = max(1, _CHUNK_BYTES // max(1, n * x.shape[1] * np.dtype(np_acc).itemsize)) if n <= chunk else 1
    steps: list[tuple[StepRows, np.ndarray | None, np.ndarray]] = []  # (rows, T = -(Q_s[u] (.) x) or None, qb)
    xneg = -x
    ts = np.empty((batch, n, x.shape[1]), dtype=np_acc) if batch > 1 else None

    def take(rows: StepRows, sc: np.ndarray, qb: np.ndarray) -> None:
        nonlocal held_rows
        v = rows.values.astype(np.float64)
        vu = v[:, u]  # (B, n): each row's value at each query's unit
        total[:] += np.einsum("bn,bn->n", vu, qb[u][None, :] - sc)
        pending.append((rows, sc, (v * qb[None, :]).astype(np_acc)))
        held_rows += len(rows)
        if held_rows >= cap:
            flush()

    def score_steps() -> None:
        if not steps:
            return
        if len(steps) > 1:
            width = max(len(r) for r, _, _ in steps)
            ks = np.zeros((len(steps), width, x.shape[1]), dtype=np_acc)
            for i, (r, _, _) in enumerate(steps):
                ks[i, : len(r)] = r.keys
            out = torch.bmm(torch.from_numpy(ks), torch.from_numpy(ts[: len(steps)]).transpose(1, 2)).numpy()
            for i, (r, _, qb) in enumerate(steps):
                take(r, out[i, : len(r)], qb)
        else:
            r, t, qb = steps[0]
            keys = torch.from_numpy(np.ascontiguousarray(r.keys, dtype=np_acc))
            scores = torch.empty(len(r), n, dtype=acc)
            for q0 in range(0, n, chunk):  # queries in chunks: T is (n, d_in) per step
                q1 = min(q0 + chunk, n)
                tq = t[q0:q1] if t is not None else _transform(q0, q1)
                scores[:, q0:q1] = torch.mm(keys, torch.from_numpy(tq).t())
            take(r, scores.numpy(), qb)
        steps.clear()

    current: dict[str, Any] = {}

    def _transform(q0: int, q1: int, out: np.ndarray | None = None) -> np.ndarray:
        """``-(Q_s[u_q, :] (.) x_q)`` of queries ``q0..q1`` in the accumulation dtype (into ``out``)."""
        q = current["q_w"]
        if out is None:
            out = np.empty((q1 - q0, x.shape[1]), dtype=np_acc)
        if isinstance(q, np.ndarray) and q.ndim == 2:  # the common case: one gather, one product
            np.multiply(q[pos[q0:q1]], xneg[q0:q1], out=out, casting="same_kind")
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
        if batch == 1:
            steps.append((rows, None, qb))
            score_steps()
            return
        steps.append((rows, _transform(0, n, ts[len(steps)]), qb))
        if len(steps) >= batch:
            score_steps()

    base_w, base_b = rep.sweep_units(u, visit)
    score_steps()
    flush()
    base = np.einsum("nd,nd->n", np.asarray(base_w)[pos], x)
    if base_b is not None:
        base = base + np.asarray(base_b)[pos]
    return torch.from_numpy(base), torch.from_numpy(base + total)
