"""A layer of an element-wise rule's store (Adam, AdamW, Adagrad, ...), rebuilt by replaying its optimizer.

For such a rule the trained weight is ``W_T = A (.) W_0 + sum_k C_k (.) x0_k + sum_s Q_s (.) G_s``
(``docs/dual-form.md``): ``Q_s`` are matrices that depend on the optimizer's nonlinear state, which the
store does not keep step by step but recomputes, in float64, from the state before the first step
(``LayerReader.initial_state``), the per-step table and the gradients the rows give,
``G_s = sum_{rows i of step s} v_i k_i^T`` (under DDP the sharded reader numbers rows step-major over the
shards, so a step's rows are every rank's: the all-reduced gradient).

:class:`LayerReplay` reads the rows step by step and offers

- :meth:`LayerReplay.weights`: the rebuilt weight and bias after ``at_step`` steps (one forward pass);
- :meth:`LayerReplay.sweep_units`: the attention form for queries that each ask about one output unit
  ``u``: per step, from the last down, ``Q_s[u, :]`` and the bias's ``Qb_s[u]`` with the step's rows, then
  the base term. Only the units asked about are replayed (every rule but Adafactor updates each weight entry
  from that entry alone); memory stays bounded by segments: the state of those units is kept every ``K``
  steps by a first forward pass, and each segment is replayed forward from its snapshot, its rows kept
  (read once) for the backward walk. Rows are read at most twice, once when the whole run fits one segment.

Everything is float64 numpy (the optimizer's own arithmetic, :mod:`lightning_dualform.optim`); gradients
are summed with torch's float64 products.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lightning_dualform.optim import PARAM, Adjoint, OptimizerState, RankOne, StepMaps, UpdateRule
from lightning_dualform.optim.maps import Value, apply_forward
from lightning_dualform.optim.rule import row_of
from lightning_dualform.store.source import LayerSource

#: Memory a unit sweep may hold for its snapshots, one segment's step maps and one segment's rows.
REPLAY_BYTES = 512 * 2**20
#: Gradients of consecutive steps computed in one batched product (at most this many bytes of them): a step
#: has few rows, and one small multi-threaded product per step costs far more than its work (on a busy machine
#: each waits for a descheduled thread); a batch of steps runs at the big-block speed.
GRAD_BATCH_BYTES = 64 * 2**20
_PARAMS = ("weight", "bias")


@dataclass
class StepRows:
    """The rows of one recorded step (update number ``s``): keys ``(B, d_in)``, values ``(B, d_out)`` (float32)
    and their metadata columns, as the store's reader gives them; ``row0`` is the number of the first."""

    s: int
    data: dict[str, np.ndarray]
    row0: int = 0

    @property
    def keys(self) -> np.ndarray:
        return self.data["keys"]

    @property
    def values(self) -> np.ndarray:
        return self.data["values"]

    def __len__(self) -> int:
        return len(self.data["values"])


class LayerReplay:
    """The optimizer of one layer of an element-wise store, replayed over the layer's rows.

    Args:
        layer: a layer reader (:class:`~lightning_dualform.store.reader.LayerReader`, or the sharded one).
        at_step: rebuild the model after this many optimizer steps (default: the end).
        block_rows: rows read at a time.
        columns: the row columns :meth:`steps` reads (keys and values always).

    Raises:
        ValueError: the store is not of an element-wise rule, or ``at_step`` is outside the store.
        StoreError: a damaged table or optimizer state.
    """

    def __init__(self, layer: LayerSource, at_step: int | None = None, *, block_rows: int = 16384,
                 columns: tuple[str, ...] = ("keys", "values", "step")) -> None:
        store = layer.store
        if store.rule is None:
            raise ValueError(f"{store.path}: the store has no update rule to replay ({store.update_rule!r}).")
        self.layer = layer
        self.rule: UpdateRule = store.rule
        u = layer.updates()
        self.first, self.end = layer.end_step(at_step)
        self.stop = self.end - self.first  # update numbers 0..stop-1 make the model
        self.grad_scale = np.asarray(u["grad_scale"], dtype=np.float64)
        self.tables = {p: u[p] for p in _PARAMS if p in u}
        self.n_rows = layer.rows_before(self.end)
        self.block_rows = int(block_rows)
        self.columns = tuple(dict.fromkeys(("keys", "values", "step", *columns)))
        #: row-local rules replay the ``(d_out, d_in)`` view of the weight and may hold some rows of it; the
        #: others (Adafactor) hold the whole parameter in its own shape (its statistics are per row and column)
        self.row_local = self.rule.row_local
        self.states = {p: self._initial(p) for p in self.tables}
        self._no_rows: dict[str, np.ndarray] | None = None

    # -- state and shapes -----------------------------------------------------------------------------
    def _initial(self, pname: str) -> OptimizerState:
        st = self.layer.initial_state(pname)
        if pname == "bias" or not self.row_local:
            return st
        shape = tuple(st.shape)

        def view(v):
            if isinstance(v, np.ndarray) and v.shape == shape:
                return np.ascontiguousarray(self.layer.to_view(v))
            return v

        return OptimizerState(0, (self.layer.d_out, self.layer.d_in), {k: view(v) for k, v in st.nonlinear.items()},
                              {k: view(v) for k, v in st.linear.items()}, param_dtype=st.param_dtype)

    def grads(self, steps: Iterator[StepRows] | list[StepRows], units: np.ndarray | None) -> Iterator[tuple[StepRows, dict[str, np.ndarray]]]:
        """``(rows, {"weight": G_s, "bias": g_s})`` per step: ``G_s = V^T K`` (rows ``units`` of it), float64, in
        the shape the replay holds. The weight's products of consecutive steps are batched
        (:data:`GRAD_BATCH_BYTES`); element-wise work stays in numpy."""
        held = (len(units) if units is not None else self.layer.d_out) * self.layer.d_in * 8
        batch = max(1, GRAD_BATCH_BYTES // max(held, 1))
        pending: list[StepRows] = []

        def flush() -> Iterator[tuple[StepRows, dict[str, np.ndarray]]]:
            vals = [r.values if units is None else r.values[:, units] for r in pending]
            width = max(len(r) for r in pending)
            if width == 0:
                gw = [np.zeros((v.shape[1], self.layer.d_in)) for v in vals]
            elif len(pending) == 1:
                gw = [torch.mm(torch.from_numpy(vals[0].astype(np.float64)).t(),
                               torch.from_numpy(pending[0].keys.astype(np.float64))).numpy()]
            else:  # zero rows pad the steps to one width: they add nothing
                vs = np.zeros((len(pending), width, vals[0].shape[1]))
                ks = np.zeros((len(pending), width, self.layer.d_in))
                for i, (r, v) in enumerate(zip(pending, vals)):
                    vs[i, : len(r)] = v
                    ks[i, : len(r)] = r.keys
                gw = list(torch.bmm(torch.from_numpy(vs).transpose(1, 2), torch.from_numpy(ks)).numpy())
            for r, v, g in zip(pending, vals, gw):
                out = {"weight": g if self.row_local else self.layer.to_param(g)}
                if "bias" in self.tables:
                    out["bias"] = v.astype(np.float64).sum(0)
                yield r, out

        for r in steps:
            pending.append(r)
            if len(pending) >= batch:
                yield from flush()
                pending = []
        if pending:
            yield from flush()

    def to_view(self, q: Value) -> Value:
        """A weight's ``Q_s`` (or base) from the replay's shape to the ``(d_out, d_in)`` view."""
        if self.row_local or self.layer.kind == "linear" or np.ndim(q) == 0 and not isinstance(q, RankOne):
            return q
        if isinstance(q, RankOne):
            q = q.dense()
        return np.ascontiguousarray(self.layer.to_view(q))

    # -- rows, step by step ------------------------------------------------------------------------------
    def steps(self, start: int = 0, stop: int | None = None) -> Iterator[StepRows]:
        """The rows of update numbers ``start..stop-1`` in order, one :class:`StepRows` per step (empty for a
        step without rows)."""
        stop = self.stop if stop is None else stop
        lay = self.layer
        r0 = lay.rows_before(self.first + start)
        r1 = lay.rows_before(self.first + stop)
        s = start
        row = r0
        pending: list[dict[str, np.ndarray]] = []
        for a in range(r0, r1, self.block_rows):
            blk = lay.read(a, min(a + self.block_rows, r1), self.columns)
            local = blk["step"] - self.first
            cuts = np.searchsorted(local, np.arange(s, stop + 1), side="left")
            for i in range(len(cuts) - 1):
                lo, hi = cuts[i], cuts[i + 1]
                if hi == len(local):  # the step may go on in the next block
                    if lo < hi:
                        pending.append({c: v[lo:hi] for c, v in blk.items()})
                    break
                part = {c: v[lo:hi] for c, v in blk.items()}
                if pending:
                    part = {c: np.concatenate([p[c] for p in pending] + [part[c]]) for c in part}
                    pending = []
                yield StepRows(s, part, row)
                row += len(part["values"])
                s += 1
        while s < stop:
            if pending:
                part = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
                pending = []
            else:
                part = self._empty()
            yield StepRows(s, part, row)
            row += len(part["values"])
            s += 1

    def _empty(self) -> dict[str, np.ndarray]:
        if self._no_rows is None:
            self._no_rows = {c: v[:0] for c, v in self.layer.read(0, 0, self.columns).items()}
        return self._no_rows

    # -- forward -----------------------------------------------------------------------------------------
    def _advance(self, pname: str, st: OptimizerState, rows: StepRows, G: np.ndarray) -> StepMaps | None:
        """One step of one parameter (raw gradient ``G``): the nonlinear state (and the linear one, when held) in place."""
        table = self.tables[pname]
        hp = row_of(table, rows.s)
        if not hp["applied"]:
            st.start = rows.s + 1
            return None
        g = float(self.grad_scale[rows.s]) * G
        if st.linear is None and self.rule.needs_param(hp):
            raise ValueError(f"step {rows.s} needs the parameter, which this snapshot does not hold")  # pragma: no cover
        step = self.rule.advance(st, g, hp)
        if st.linear is not None:
            apply_forward(step, st.linear, g)
        st.start = rows.s + 1
        return step

    def weights(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight ``(d_out, d_in)`` and bias ``(d_out,)`` after ``at_step`` steps, float64 (one read)."""
        states = {p: st.copy() for p, st in self.states.items()}
        for rows, G in self.grads(self.steps(), None):
            for p, st in states.items():
                self._advance(p, st, rows, G[p])
        w = states["weight"].linear[PARAM]
        w = w if self.row_local else self.layer.to_view(w)
        b = states["bias"].linear[PARAM] if "bias" in states else None
        return np.ascontiguousarray(w), b

    # -- the attention form -----------------------------------------------------------------------------
    def needs_param(self, pname: str, start: int, stop: int) -> bool:
        table = self.tables[pname]
        return any(self.rule.needs_param(row_of(table, t)) for t in range(start, stop) if table["applied"][t])

    def plan(self, n_units: int, budget: int = REPLAY_BYTES) -> int:
        """Steps per segment ``K`` of a sweep over ``n_units`` weight rows (``stop`` when the whole run fits
        one segment): snapshots ``ceil(S / K) x state``, ``K`` step maps and ``K`` steps of rows within
        ``budget`` where possible, else the ``K`` that needs the least."""
        S = max(self.stop, 1)
        d_in, d_out = self.layer.d_in, self.layer.d_out
        held = n_units if self.row_local else d_out
        st = self.states["weight"]
        arrays = sum(1 for v in st.nonlinear.values() if isinstance(v, np.ndarray) and v.size == st.shape[0] * d_in)
        arrays += len(st.linear) if self.needs_param("weight", 0, self.stop) else 0
        snap = max(arrays, 1) * held * d_in * 8 + held * 64
        per_map = held * d_in * 8 + held * 8
        per_rows = (self.n_rows / S) * (d_in + d_out) * 4 + 64
        if S * (per_map + per_rows) + snap <= budget:
            return self.stop
        k = max(1, int(math.sqrt(S * snap / (per_map + per_rows))))
        return min(k, self.stop)

    def sweep_units(
        self,
        units: np.ndarray,
        visit: Callable[[StepRows, Value, Value], None],
        *,
        budget: int = REPLAY_BYTES,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Walk the steps from the last down for queries asking about output units ``units``.

        ``visit(rows, q_w, q_b)`` is called once per applied step with the step's rows and ``Q_s`` of the weight
        restricted to the sweep's rows (:meth:`unit_rows`; an array ``(rows, d_in)``, a float, or a
        :class:`~lightning_dualform.optim.RankOne`, in the ``(d_out, d_in)`` view) and of the bias (``(rows,)``,
        a float, or ``0.0`` without a bias or an applied bias step).

        Returns:
            the base terms of the sweep's rows: ``(A (.) W_0 + sum_k C_k (.) x0_k)[rows]`` ``(rows, d_in)`` and the
            bias's ``(rows,)`` (``None`` without a bias): with every step's ``Q_s (.) G_s`` they give ``W_T[rows]``.
        """
        rows = self.unit_rows(units)
        k = self.plan(len(rows) if rows is not None else self.layer.d_out, budget)
        init = {p: st.take_rows(rows if self.row_local else None) if p == "weight" or self.row_local else st.copy()
                for p, st in self.states.items()}
        snaps = self._snapshots(init, rows, k)
        adj = {p: Adjoint() for p in init}
        bounds = [s for s, _ in snaps] + [self.stop]
        for (start, snap), stop in reversed(list(zip(snaps, bounds[1:]))):
            cache = list(self.steps(start, stop))
            states = {p: st.copy() for p, st in snap.items()}
            for p, st in states.items():
                if st.linear is not None and not self.needs_param(p, start, stop):
                    st.linear = None  # the maps do not depend on it: skip its update
            maps = [{p: self._advance(p, st, r, G[p]) for p, st in states.items()}
                    for r, G in self.grads(cache, rows if self.row_local else None)]
            for r, m in zip(reversed(cache), reversed(maps)):
                gs = float(self.grad_scale[r.s])
                q_w = adj["weight"].back(m["weight"], gs)
                q_b = adj["bias"].back(m["bias"], gs) if "bias" in adj else 0.0
                if m["weight"] is not None or ("bias" in m and m["bias"] is not None):
                    visit(r, self.to_view(q_w), q_b)
            del cache, maps
        base_w = self.to_view(adj["weight"].base(init["weight"].linear))
        base_b = adj["bias"].base(init["bias"].linear) if "bias" in adj else None
        return base_w, base_b

    def unit_rows(self, units: np.ndarray) -> np.ndarray | None:
        """The weight rows a sweep for ``units`` replays: the sorted distinct units (``None``: all rows, for a
        rule that is not row-local)."""
        return np.unique(np.asarray(units, dtype=np.int64)) if self.row_local else None

    def _snapshots(self, init: dict[str, OptimizerState], rows: np.ndarray | None, k: int) -> list[tuple[int, dict[str, OptimizerState]]]:
        """``(step, state)`` at the start and every ``k`` steps (one forward pass over the rows when ``k < S``)."""
        snaps = [(0, init)]
        if k >= self.stop:
            return snaps
        states = {p: st.copy() for p, st in init.items()}
        for p, st in states.items():
            if not self.needs_param(p, 0, self.stop):
                st.linear = None  # no step's maps depend on it (AdamW): replay the nonlinear state alone
        for r, G in self.grads(self.steps(0, self.stop), rows if self.row_local else None):
            for p, st in states.items():
                self._advance(p, st, r, G[p])
            nxt = r.s + 1
            if nxt % k == 0 and nxt < self.stop:
                snaps.append((nxt, {p: (st.copy() if self.needs_param(p, nxt, min(nxt + k, self.stop)) else st.without_linear())
                                    for p, st in states.items()}))
        return snaps


def unit_transform(q: Value, pos: np.ndarray, x: np.ndarray | None) -> np.ndarray:
    """``Q[units, :] (.) x`` ``(n, d_in)`` for a weight's ``Q`` held for some rows (``pos``: each query's row
    in it), or ``Q[units]`` ``(n,)`` for a bias (``x`` None)."""
    n = len(pos)
    if isinstance(q, RankOne):
        rows = q.take_rows(pos)
    elif np.ndim(q) == 0:
        rows = np.full((n,) + ((1,) if x is not None else ()), float(q))
    else:
        rows = np.asarray(q)[pos]
    return rows if x is None else rows * x
