"""Replaying an optimizer forward in float64, and sweeping its adjoint backward segment by segment.

Forward (:func:`replay`): from an :class:`~.maps.OptimizerState` and the raw gradients ``G_s`` the
rows give, recompute the nonlinear state step by step, the step maps, and the parameter ``p_T``.

Backward (:class:`Sweep`): ``p_T = A (.) p_0 + sum_k C_k (.) x0_k + sum_s Q_s (.) G_s``, produced one
``Q_s`` at a time from ``s = T - 1`` down. Memory stays bounded by snapshots: the forward state is
kept every ``K`` steps (:func:`snapshot_interval`); for each segment, last first, the sweep replays the
segment forward from its snapshot, keeps its ``K`` step maps (one array each), then walks them
backward. Each segment's gradients are therefore read twice, once per direction.

:class:`QuerySweep` is the attention form: per step, each query's ``Q_s[u_q, :] (.) x_q`` (the score
of a training row ``i`` of step ``s`` is its key dotted with it, times ``v_i[u_q]``), then the base
term ``(A (.) p_0 + sum_k C_k (.) x0_k)[u_q, :] . x_q``. Together they sum to ``p_T[u_q, :] . x_q``.

Rows: every rule but Adafactor updates each weight entry from that entry alone (L2 decay couples the
gradient to ``p`` entry by entry), so replay and sweep may hold only rows ``U`` of a weight matrix
(the units queries ask about), with ``G_s[U, :]``; the result equals the full computation on those rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_dualform.optim.maps import Adjoint, Form, OptimizerState, RankOne, StepMaps, Value, apply_forward
from lightning_dualform.optim.rule import UpdateRule, row_of

#: ``read_grads(start, stop, rows)``: the raw gradients ``G_s`` of steps ``start..stop-1`` in order,
#: restricted to ``rows`` of the parameter (``None``: all rows), each in the parameter's shape (``None``
#: allowed for a step that was not applied).
GradSource = Callable[[int, int, "np.ndarray | None"], Iterable["np.ndarray | None"]]


@dataclass
class Replay:
    """The result of :func:`replay`.

    Attributes:
        state: the state after the last replayed step (``state.linear[PARAM]`` is ``p_stop``).
        maps: per replayed step (from the start state's step on), its :class:`~.maps.StepMaps` (``None``
            for a step not applied); empty unless ``keep_maps``.
        snapshots: states at the start and every ``snapshot_every`` steps; empty unless asked.
    """

    state: OptimizerState
    maps: list[StepMaps | None] = field(default_factory=list)
    snapshots: list[OptimizerState] = field(default_factory=list)


def replay(
    rule: UpdateRule,
    table: Mapping[str, np.ndarray],
    grad_scale: np.ndarray,
    state: OptimizerState,
    grads: Iterable[np.ndarray | None],
    stop: int | None = None,
    *,
    keep_maps: bool = False,
    snapshot_every: int | None = None,
    snapshot_linear: bool = False,
) -> Replay:
    """Run ``rule`` forward in float64 from ``state`` over steps ``state.start .. stop - 1``.

    Args:
        rule: the optimizer's rule (:func:`~.registry.rule_for`).
        table: per-step columns (``rule.columns``), each ``(S,)``, indexed by recorded step.
        grad_scale: ``(S,)`` factor turning the raw gradient ``G_s`` into the one the optimizer used.
        state: the starting state (not modified); restricted to rows ``U`` when ``state.rows`` is set.
        grads: ``G_s`` for each step from ``state.start`` on, in the parameter's shape (rows ``U`` only
            when the state holds rows ``U``); ``None`` for a step that was not applied.
        stop: the step to stop before (``p_stop`` is the model after ``stop`` updates); ``None``: ``S``.
        keep_maps: keep each step's maps (one array each; for sweeping this stretch backward).
        snapshot_every: also keep a copy of the state at ``state.start`` and every that many steps.
        snapshot_linear: keep the linear state in every snapshot; by default a snapshot keeps it only
            when a step of its segment needs it (:meth:`UpdateRule.needs_param`) or it is the first.

    Raises:
        ValueError: a table column is missing or short, a gradient has the wrong shape, the gradients
            run out, or a step needs the parameter and the state does not hold it.
    """
    stop = len(grad_scale) if stop is None else int(stop)
    if stop < state.start:
        raise ValueError(f"cannot replay from step {state.start} to step {stop}: the state is past the horizon")
    rule.check_table(table, stop)
    rule.check_state(state)
    if len(grad_scale) < stop:
        raise ValueError(f"grad_scale has {len(grad_scale)} entries, fewer than the {stop} steps asked for")
    if snapshot_every is not None and int(snapshot_every) < 1:
        raise ValueError(f"snapshot_every={snapshot_every!r}: expected a positive number of steps")
    st = state.copy()
    shape = _held_shape(st)
    out = Replay(st)
    it = iter(grads)
    for s in range(state.start, stop):
        if snapshot_every is not None and (s - state.start) % int(snapshot_every) == 0:
            seg_stop = min(stop, s + int(snapshot_every))
            keep_lin = snapshot_linear or s == state.start or any(
                rule.needs_param(row_of(table, t)) for t in range(s, seg_stop) if table["applied"][t]
            )
            out.snapshots.append(st.copy() if keep_lin or st.linear is None else st.without_linear())
        try:
            G = next(it)
        except StopIteration:
            raise ValueError(f"the gradients ran out at step {s} (replaying steps {state.start}..{stop - 1})") from None
        step = advance_one(rule, st, G, row_of(table, s), float(grad_scale[s]), shape)
        if keep_maps:
            out.maps.append(step)
    return out


def advance_one(rule: UpdateRule, st: OptimizerState, G: np.ndarray | None, hp: Mapping[str, Any], grad_scale: float,
                shape: tuple[int, ...] | None = None) -> StepMaps | None:
    """Advance ``st`` (in place) by its step ``st.start``: the raw gradient ``G``, the step's table row ``hp`` and
    factor ``grad_scale``. Returns the step's maps (None for a step the table marks as not applied)."""
    s = st.start
    shape = _held_shape(st) if shape is None else shape
    if not hp["applied"]:
        st.start = s + 1
        return None
    if G is None:
        raise ValueError(f"no gradient for step {s}, which the table marks as applied")
    G = np.asarray(G, dtype=np.float64)
    if G.shape != shape:
        raise ValueError(f"the gradient of step {s} has shape {G.shape}; the state holds shape {shape}")
    if st.linear is None and rule.needs_param(hp):
        raise ValueError(
            f"step {s} of this {rule.name} run feeds the parameter into its nonlinear state "
            "(L2 weight decay or Adafactor), but the state does not hold the parameter"
        )
    g = float(grad_scale) * G
    step = rule.advance(st, g, hp)
    if st.linear is not None:
        apply_forward(step, st.linear, g)
    st.start = s + 1
    return step


def _held_shape(state: OptimizerState) -> tuple[int, ...]:
    if state.rows is None:
        return state.shape
    return (len(state.rows),) + state.shape[1:]


def _grad_source(grads: Sequence[np.ndarray | None] | GradSource) -> GradSource:
    if callable(grads):
        return grads

    def read(start: int, stop: int, rows: np.ndarray | None) -> Iterator[np.ndarray | None]:
        for s in range(start, stop):
            G = grads[s]
            yield G if (G is None or rows is None) else np.asarray(G)[rows]

    return read


def _rows_for(rule: UpdateRule, rows: np.ndarray | Sequence[int] | None) -> np.ndarray | None:
    if rows is None:
        return None
    if not rule.row_local:
        raise ValueError(
            f"{rule.name} couples all rows of a parameter (its statistics and step size are whole-matrix "
            "quantities): pass rows=None"
        )
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) == 0 or np.any(np.diff(rows) <= 0):
        raise ValueError(f"rows must be a non-empty, sorted, duplicate-free 1-D index array, got {rows!r}")
    return rows


class Sweep:
    """``Q_s`` for ``s = stop - 1`` down to the first snapshot's step, one segment of snapshots at a time.

    Iterating yields ``(s, Q_s)`` for applied steps: ``Q_s`` is a float (a scalar times the identity),
    an array in the parameter's shape restricted to ``rows``, or a :class:`~.maps.RankOne`. After the
    iteration, :attr:`adjoint` holds ``A`` and ``C_k`` at the first snapshot and :meth:`base` gives
    ``A (.) p_0 + sum_k C_k (.) x0_k``.

    Args:
        rule, table, grad_scale: as for :func:`replay`.
        snapshots: states sorted by ``start``; the first is where the sweep ends and must hold the
            linear state for :meth:`base`. Snapshots at or past ``stop`` are ignored.
        grads: a :data:`GradSource`, or a sequence of ``G_s`` indexed by step (full shape).
        stop: the horizon ``T'``; ``None``: every step of the table.
        rows: rows ``U`` of the parameter to compute (sorted, unique); ``None``: all.

    Example:
        >>> sweep = Sweep(rule, table, gs, rep.snapshots, grads, stop=T)      # doctest: +SKIP
        >>> for s, q in sweep: ...                                             # doctest: +SKIP
        >>> p_T = sweep.base() + sum(q * G[s] for s, q in ...)                  # doctest: +SKIP
    """

    def __init__(
        self,
        rule: UpdateRule,
        table: Mapping[str, np.ndarray],
        grad_scale: np.ndarray,
        snapshots: Sequence[OptimizerState],
        grads: Sequence[np.ndarray | None] | GradSource,
        stop: int | None = None,
        rows: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        if not snapshots:
            raise ValueError("a sweep needs at least the initial state")
        self.rule, self.table, self.grad_scale = rule, table, np.asarray(grad_scale, dtype=np.float64)
        self.stop = len(self.grad_scale) if stop is None else int(stop)
        self.rows = _rows_for(rule, rows)
        starts = [s.start for s in snapshots]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError(f"snapshots must be sorted by step without repeats, got steps {starts}")
        if starts[0] > self.stop:
            raise ValueError(f"the first snapshot is at step {starts[0]}, past the horizon {self.stop}")
        self.snapshots = [s for s in snapshots if s.start < self.stop] or [snapshots[0]]
        self.read = _grad_source(grads)
        self.adjoint = Adjoint()
        self.forms: dict[int, Form] = {}
        self._done = False

    @property
    def initial(self) -> OptimizerState:
        """The first snapshot, restricted to the sweep's rows."""
        return self.snapshots[0].take_rows(self.rows)

    def segments(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each segment, in step order."""
        bounds = [s.start for s in self.snapshots] + [self.stop]
        return list(zip(bounds[:-1], bounds[1:]))

    def __iter__(self) -> Iterator[tuple[int, Value]]:
        if self._done:
            raise RuntimeError("a Sweep runs once; create a new one")
        self._done = True
        for snap, (start, stop) in reversed(list(zip(self.snapshots, self.segments()))):
            st = snap.take_rows(self.rows)
            if st.linear is not None and not any(
                self.rule.needs_param(row_of(self.table, t)) for t in range(start, stop) if self.table["applied"][t]
            ):
                st.linear = None  # the maps do not depend on it: skip its update
            rep = replay(
                self.rule, self.table, self.grad_scale, st, self.read(start, stop, self.rows), stop, keep_maps=True
            )
            for s in range(stop - 1, start - 1, -1):
                step = rep.maps[s - start]
                q = self.adjoint.back(step, float(self.grad_scale[s]))
                if step is not None:
                    self.forms[s] = step.form
                    yield s, q
            del rep

    def base(self) -> np.ndarray:
        """``A (.) p_0 + sum_k C_k (.) x0_k`` at the first snapshot (rows restricted); after iterating."""
        if not self._done:
            raise RuntimeError("iterate the sweep first: the base term needs the adjoint at the first snapshot")
        init = self.initial
        if init.linear is None:
            raise ValueError("the first snapshot does not hold the linear state, so the base term is unknown")
        return self.adjoint.base(init.linear)


@dataclass
class Decomposition:
    """``p_T = A (.) p_0 + sum_k C_k (.) x0_k + sum_s Q_s (.) G_s``, every ``Q_s`` materialised.

    Attributes:
        start, stop: the steps covered (``Q`` has ``stop - start`` entries, ``0.0`` for steps not applied).
        A, C: coefficients of the start state's parameter and other linear entries.
        Q: per step; floats, arrays (rows restricted) or :class:`~.maps.RankOne`.
        forms: per applied step, the form of ``Q_s``.
    """

    start: int
    stop: int
    A: Value
    C: dict[str, Value]
    Q: list[Value]
    forms: dict[int, Form]

    def rebuild(
        self, initial: OptimizerState, grads: Sequence[np.ndarray | None], rows: np.ndarray | None = None
    ) -> np.ndarray:
        """The parameter after ``stop`` steps from the decomposition (rows ``rows`` of it)."""
        init = initial.take_rows(rows)
        if init.linear is None:
            raise ValueError("rebuild needs the initial state's linear entries; this snapshot leaves them out")
        out = Adjoint({"param": self.A, **self.C}).base(init.linear)
        for s, q in zip(range(self.start, self.stop), self.Q):
            G = grads[s]
            if G is None or (not isinstance(q, RankOne) and np.ndim(q) == 0 and q == 0.0):
                continue
            G = np.asarray(G) if rows is None else np.asarray(G)[rows]
            out = out + q * G
        return out


def decompose(
    rule: UpdateRule,
    table: Mapping[str, np.ndarray],
    grad_scale: np.ndarray,
    state: OptimizerState,
    grads: Sequence[np.ndarray | None] | GradSource,
    stop: int | None = None,
    rows: np.ndarray | Sequence[int] | None = None,
) -> Decomposition:
    """Every ``Q_s`` at once (memory: one array per step; for small problems, checks and plots)."""
    sweep = Sweep(rule, table, grad_scale, [state], grads, stop, rows)
    q: dict[int, Value] = dict(iter(sweep))
    return Decomposition(
        state.start,
        sweep.stop,
        sweep.adjoint.A,
        sweep.adjoint.C,
        [q.get(s, 0.0) for s in range(state.start, sweep.stop)],
        sweep.forms,
    )


class QuerySweep:
    """The attention form of one parameter for queries ``x`` each asking about output unit ``units[q]``.

    Iterating yields ``(s, T_s)`` from the last applied step down (a step not applied has ``Q_s = 0``
    and is not yielded): ``T_s = Q_s[units, :] (.) x``, shape
    ``(n, d_in)`` (for a 1-D parameter such as a bias, ``x`` is ``None`` and ``T_s = Q_s[units]``,
    shape ``(n,)``). A training row of step ``s`` with key ``k`` and value ``v`` contributes
    ``v[units[q]] * (k . T_s[q])`` to query ``q``; after the iteration :meth:`base` is the ``(n,)`` base
    term, and base plus all contributions is ``p_T[units[q], :] . x[q]``.

    Only the rows the queries name are replayed (all rows for Adafactor, whose rule is not row-local).

    Args:
        rule, table, grad_scale, snapshots, grads, stop: as for :class:`Sweep` (``grads`` gets the
            rows to read).
        x: ``(n, d_in)`` queries, or ``None`` for a 1-D parameter.
        units: ``(n,)`` output unit of each query.
    """

    def __init__(
        self,
        rule: UpdateRule,
        table: Mapping[str, np.ndarray],
        grad_scale: np.ndarray,
        snapshots: Sequence[OptimizerState],
        grads: Sequence[np.ndarray | None] | GradSource,
        x: np.ndarray | None,
        units: np.ndarray | Sequence[int],
        stop: int | None = None,
    ) -> None:
        if not snapshots:
            raise ValueError("a sweep needs at least the initial state")
        units = np.asarray(units, dtype=np.int64).reshape(-1)
        shape = snapshots[0].shape
        if len(shape) == 1:
            if x is not None:
                raise ValueError("a 1-D parameter (a bias) takes x=None: its key is the constant 1")
        elif len(shape) == 2:
            if x is None or np.ndim(x) != 2 or np.shape(x) != (len(units), shape[1]):
                raise ValueError(
                    f"x must have shape (n, {shape[1]}) with n = len(units) = {len(units)}, "
                    f"got {np.shape(x) if x is not None else ()}"
                )
        else:
            raise ValueError(f"the attention form takes a 1-D or 2-D parameter, got shape {shape}")
        if len(units) and (units.min() < 0 or units.max() >= shape[0]):
            raise ValueError(f"units must lie in [0, {shape[0]}), got {units.min()}..{units.max()}")
        if rule.row_local:
            rows = np.unique(units)
            self._pos = np.searchsorted(rows, units)
        else:
            rows = None
            self._pos = units
        self.units = units
        self.x = None if x is None else np.asarray(x, dtype=np.float64)
        self.sweep = Sweep(rule, table, grad_scale, snapshots, grads, stop, rows)

    @property
    def forms(self) -> dict[int, Form]:
        return self.sweep.forms

    def transform(self, q: Value) -> np.ndarray:
        """``Q[units, :] (.) x`` of one ``Q`` (rows restricted like the sweep)."""
        n = len(self.units)
        if isinstance(q, RankOne):
            rows = q.take_rows(self._pos)
        elif np.ndim(q) == 0:
            rows = np.full((n,) + ((1,) if self.x is not None else ()), float(q))
        else:
            rows = np.asarray(q)[self._pos]
        return rows if self.x is None else rows * self.x

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        for s, q in self.sweep:
            yield s, self.transform(q)

    def base(self) -> np.ndarray:
        """``(n,)``: ``(A (.) p_0 + sum_k C_k (.) x0_k)[units[q], :] . x[q]``; after iterating."""
        b = self.sweep.base()[self._pos]
        return b if self.x is None else np.einsum("nd,nd->n", b, self.x)


def snapshot_interval(snapshot_nbytes: float, rows_nbytes_per_step: float, budget: float = 0.15) -> int:
    """The smallest ``K`` with one snapshot per ``K`` steps costing at most ``budget`` of the rows' bytes.

    Args:
        snapshot_nbytes: bytes of one snapshot (e.g. ``rule.read_state(...).nbytes(itemsize)`` summed
            over the layer's parameters).
        rows_nbytes_per_step: bytes the rows of one step take on disk.
        budget: the share of the rows' bytes snapshots may add.

    The reader then holds at most ``K`` step maps of the rows it replays (one array each).
    """
    if rows_nbytes_per_step <= 0 or budget <= 0:
        raise ValueError(f"rows_nbytes_per_step and budget must be positive, got {rows_nbytes_per_step} and {budget}")
    return max(1, math.ceil(snapshot_nbytes / (budget * rows_nbytes_per_step)))
