"""What every update rule provides: its per-step columns, the state it needs, and one step of its maths.

A rule replicates one ``torch.optim`` optimizer op for op. Recording needs two readers, both on the
public API of a live optimizer (``param_groups`` and ``state``):

- :meth:`UpdateRule.read_step`, called before each ``optimizer.step()``, gives one row of the per-step
  hyper-parameter table (:attr:`UpdateRule.columns`); its columns read from the param group alone
  (:meth:`UpdateRule.hyper`) are read again after the step, where the group holds what the step used
  (code run inside ``step()``, such as Lightning's ``training_step``, may have changed them);
- :meth:`UpdateRule.read_state`, called before the first recorded step (or at any step, for a
  snapshot), gives the optimizer's state of a parameter as an :class:`~.maps.OptimizerState`.

A replay then calls :meth:`UpdateRule.advance` per step: it updates the nonlinear state in place and
returns the step's :class:`~.maps.StepMaps`.
"""

from __future__ import annotations

import math

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import numpy as np

if TYPE_CHECKING:  # torch is imported where a live optimizer is read: a store's reader never needs it
    import torch

from lightning_dualform.optim.maps import PARAM, OptimizerState, StepMaps

#: A value of one per-step column.
HyperValue = float | bool


class Column(NamedTuple):
    """One column of a rule's per-step table: its name and its numpy dtype (float64 or bool)."""

    name: str
    dtype: type


def float_columns(*names: str) -> tuple[Column, ...]:
    return tuple(Column(n, np.float64) for n in names)


def bool_columns(*names: str) -> tuple[Column, ...]:
    return tuple(Column(n, np.bool_) for n in names)


#: Every table ends with this column: False when the step left the parameter (and its state) untouched
#: (its ``.grad`` was None, or a loss scaler skipped the step).
APPLIED = Column("applied", np.bool_)


class UpdateRule(ABC):
    """One optimizer's update, as per-step maps that are linear in the gradient.

    Class attributes:
        name: short name (``"adam"``); also the name a store would record.
        optimizer_names: the names in ``torch.optim`` of the classes the rule replicates (:attr:`optimizers`).
        columns: the per-step table's columns, ``applied`` last.
        state_names: the ``optimizer.state[p]`` entries a replay needs to continue a run (others, such
            as ASGD's average ``ax``, never reach the parameter).
        linear_names: the entries among them that are linear state (the parameter is always one).
        row_local: True when each weight entry's update depends on that entry alone, so a replay may
            hold only some rows of a weight matrix (False for Adafactor).
    """

    name: ClassVar[str]
    optimizer_names: ClassVar[tuple[str, ...]]
    columns: ClassVar[tuple[Column, ...]]
    state_names: ClassVar[tuple[str, ...]]
    linear_names: ClassVar[tuple[str, ...]] = ()
    #: nonlinear entries every state must hold (others are optional: amsgrad's maximum, centered's mean)
    required_state: ClassVar[tuple[str, ...]] = ("step",)
    row_local: ClassVar[bool] = True

    @property
    def optimizers(self) -> tuple[type[torch.optim.Optimizer], ...]:
        """The ``torch.optim`` classes the rule replicates (those of :attr:`optimizer_names` this torch has)."""
        import torch

        return tuple(getattr(torch.optim, n) for n in self.optimizer_names if hasattr(torch.optim, n))

    # -- reading a live optimizer ----------------------------------------------------------------------
    def read_step(
        self, optimizer: torch.optim.Optimizer, param: torch.Tensor, *, skipped: bool = False
    ) -> dict[str, HyperValue]:
        """The table row of the coming ``optimizer.step()`` for ``param``; call it before the step.

        Args:
            optimizer: the optimizer about to step.
            param: one of its parameters.
            skipped: True when the step will not run (a loss scaler found inf/NaN gradients).

        Returns:
            ``{column: value}`` for every name in :attr:`columns`.
        """
        group = group_of(optimizer, param)
        _check_real(param)
        row = self._hyper(optimizer, group, param)
        row[APPLIED.name] = (param.grad is not None) and not skipped
        return row

    def hyper(
        self, optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict | None = None
    ) -> dict[str, HyperValue]:
        """The columns of ``param``'s row that come from its param group alone (``lr``, ``betas``,
        ``weight_decay``...; not ``applied``, nor what :meth:`read_step` reads from ``optimizer.state``).

        Read them after ``optimizer.step()`` (its post-hook), where the group still holds the values the step
        used: a closure run inside ``step()`` (Lightning's ``training_step``, ``on_before_optimizer_step``) may
        change them after the step's pre-hook; schedulers change them only after the step.

        Args:
            optimizer: the optimizer.
            param: one of its parameters.
            group: ``param``'s param group, when the caller knows it (saves the search).
        """
        return self._hyper(optimizer, group_of(optimizer, param) if group is None else group, param)

    def read_state(
        self, optimizer: torch.optim.Optimizer, param: torch.Tensor, *, start: int = 0, linear: bool = True
    ) -> OptimizerState:
        """The optimizer's state of ``param`` now, in float64, as a replay's starting point.

        Entries torch has not created yet (it creates them at a parameter's first step) get the values
        torch would give them, so the same call serves a fresh run and one resumed from a checkpoint.

        Args:
            optimizer: the optimizer (before the step ``start``).
            param: one of its parameters.
            start: the recorded step the state precedes.
            linear: include the linear state (the parameter, first moments); a snapshot may leave it
                out where no step of its segment feeds the parameter into the nonlinear state
                (see :meth:`needs_param`).
        """
        import torch

        group = group_of(optimizer, param)
        _check_real(param)
        state = optimizer.state.get(param, {})
        nonlinear = self._nonlinear_state(optimizer, group, param, state)
        lin = None
        if linear:
            lin = {PARAM: to_numpy(param)}
            for name in self.linear_names:
                v = state.get(name)
                if isinstance(v, torch.Tensor):
                    lin[name] = to_numpy(v)
                elif self._linear_default(group, name):
                    lin[name] = np.zeros(tuple(param.shape))
        return OptimizerState(
            start, tuple(param.shape), nonlinear, lin, param_dtype=str(param.dtype).removeprefix("torch.")
        )

    @abstractmethod
    def _hyper(self, optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> dict[str, HyperValue]:
        """The rule's columns (without ``applied``) from a param group."""

    @abstractmethod
    def _nonlinear_state(
        self, optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor, state: Mapping
    ) -> dict:
        """The nonlinear state entries, with torch's initial values where ``state`` lacks them."""

    def _linear_default(self, group: dict, name: str) -> bool:
        """Whether a missing linear entry is held as zeros (True) or left out (it will be created zero)."""
        return True

    # -- the maths --------------------------------------------------------------------------------------
    @abstractmethod
    def advance(self, state: OptimizerState, g: np.ndarray, hp: Mapping[str, HyperValue]) -> StepMaps:
        """One applied step: update ``state.nonlinear`` in place and return the step's maps.

        Args:
            state: the state before the step (its linear part, when held, is not modified here).
            g: ``(rows, ...)`` the gradient the optimizer used, ``grad_scale * G``, float64, in the
                parameter's shape restricted to ``state.rows``.
            hp: the step's row of the table.
        """

    def needs_param(self, hp: Mapping[str, HyperValue]) -> bool:
        """Whether the step's nonlinear state depends on the parameter (L2 weight decay feeds ``p`` into
        the gradient that second moments square; Adafactor scales by the parameter's norm)."""
        return float(hp.get("weight_decay", 0.0)) != 0.0

    def check_state(self, state: OptimizerState) -> None:
        """Raise ``ValueError`` unless ``state`` holds this rule's entries, in the right shapes, finite."""
        missing = [n for n in self.required_state if n not in state.nonlinear]
        if missing:
            raise ValueError(f"the {self.name} state lacks {missing}; it holds {sorted(state.nonlinear)}")
        step = state.nonlinear.get("step")
        if step is not None and (np.ndim(step) or not np.isfinite(step) or step < 0 or float(step) != int(float(step))):
            # torch's count of the steps taken: a negative one makes the bias corrections divide by zero
            raise ValueError(f"the {self.name} state entry 'step' is {step!r}; expected a whole number of steps, "
                             "0 or more")
        if state.linear is not None and PARAM not in state.linear:
            raise ValueError(f"the linear state must hold {PARAM!r}, it holds {sorted(state.linear)}")
        held = state.shape if state.rows is None else (len(state.rows),) + state.shape[1:]
        for name, v in {**state.nonlinear, **(state.linear or {})}.items():
            if np.ndim(v) and np.shape(v) != self.entry_shape(name, held):
                raise ValueError(
                    f"the {self.name} state entry {name!r} has shape {np.shape(v)}; expected "
                    f"{self.entry_shape(name, held)}"
                )
            if not np.all(np.isfinite(v)):
                raise ValueError(f"the {self.name} state entry {name!r} is not finite")
            if name in NONNEGATIVE_STATE and np.any(np.asarray(v) < 0):
                raise ValueError(f"the {self.name} state entry {name!r} holds negative values; it sums squares")

    def entry_shape(self, name: str, held: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of state entry ``name`` for a parameter held in shape ``held``."""
        return held

    # -- tables ---------------------------------------------------------------------------------------
    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def table(self, rows: Sequence[Mapping[str, HyperValue]]) -> dict[str, np.ndarray]:
        """Stack rows of :meth:`read_step` into the per-step table ``{column: (S,) array}``."""
        return {c.name: np.array([r[c.name] for r in rows], dtype=c.dtype).reshape(len(rows)) for c in self.columns}

    def check_table(self, table: Mapping[str, np.ndarray], steps: int) -> None:
        """Raise ``ValueError`` unless ``table`` has every column with at least ``steps`` entries."""
        missing = [c for c in self.column_names if c not in table]
        if missing:
            raise ValueError(f"the {self.name} table lacks columns {missing}; it needs {list(self.column_names)}")
        short = [c for c in self.column_names if len(table[c]) < steps]
        if short:
            raise ValueError(f"the {self.name} table's columns {short} have fewer than the {steps} steps asked for")

    def check_values(self, table: Mapping[str, np.ndarray]) -> None:
        """Raise ``ValueError`` where a column holds a value torch's optimizer refuses (:data:`COLUMN_RANGES`):
        a table that no run can have written (a ``beta2`` of 2 would make the replay's bias correction complex)."""
        for name, (lo, hi, hi_open) in COLUMN_RANGES.items():
            if name not in table or name not in self.column_names:
                continue
            v = np.asarray(table[name], dtype=np.float64)
            bad = (v < lo) | ((v >= hi) if hi_open else (v > hi))
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                allowed = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
                raise ValueError(f"the {self.name} table's column {name!r} holds {float(v[i])!r} at step {i}; "
                                 f"torch allows {allowed}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: state entries that are sums or averages of squares (or their maximum): never negative in a real run
NONNEGATIVE_STATE = ("exp_avg_sq", "max_exp_avg_sq", "exp_inf", "sum", "square_avg", "acc_delta", "row_var", "col_var",
                     "variance")
#: what torch's optimizers accept of a hyper-parameter column: ``(lo, hi, hi excluded)``, ``lo`` included
COLUMN_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, False),
    "eps": (0.0, math.inf, False),
    "eps2": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, False),
    "lr_decay": (0.0, math.inf, False),
    "beta1": (0.0, 1.0, True),
    "beta2": (0.0, 1.0, True),
    "rho": (0.0, 1.0, False),
    "beta2_decay": (-math.inf, 0.0, False),
    "d": (1.0, math.inf, False),
}


def row_of(table: Mapping[str, np.ndarray], s: int) -> dict[str, HyperValue]:
    """Step ``s`` of a table as Python scalars (so that powers match torch's float arithmetic)."""
    return {k: (bool(v[s]) if v.dtype == np.bool_ else float(v[s])) for k, v in table.items()}


def _check_real(param: torch.Tensor) -> None:
    if param.is_complex():
        raise ValueError(f"complex parameters are not supported (shape {tuple(param.shape)}, dtype {param.dtype})")


def group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    """The param group holding ``param``; ``ValueError`` when the optimizer does not hold it."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError(f"{type(optimizer).__name__} does not optimize this parameter (shape {tuple(param.shape)})")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a tensor."""
    import torch

    return t.detach().to("cpu", torch.float64).numpy().copy()


def scalar_state(state: Mapping, name: str, default: float, dtype: torch.dtype | None = None) -> np.floating:
    """A scalar state entry as a numpy scalar of torch's dtype (torch rounds some of them, e.g. to float32).

    ``dtype`` is the dtype torch gives a new entry (``_get_scalar_dtype()``: float64 under a float64
    default dtype, else float32).
    """
    import torch

    v = state.get(name)
    if isinstance(v, torch.Tensor):
        return np.dtype(str(v.dtype).removeprefix("torch.")).type(v.item())
    if v is not None:
        return np.float64(float(v))
    if dtype is None:
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return np.dtype(str(dtype).removeprefix("torch.")).type(default)


def array_state(state: Mapping, name: str, param: torch.Tensor, fill: float = 0.0) -> np.ndarray:
    """A per-element state entry as float64, or ``fill`` in the parameter's shape when torch has none yet."""
    import torch

    v = state.get(name)
    if isinstance(v, torch.Tensor):
        return to_numpy(v)
    return np.full(tuple(param.shape), float(fill))


def step_count(state: Mapping) -> float:
    """Torch's per-parameter step counter (a float tensor in recent versions, an int in old ones)."""
    import torch

    v = state.get("step", 0.0)
    return float(v.item() if isinstance(v, torch.Tensor) else v)


def sign_of(hp: Mapping[str, HyperValue]) -> float:
    """``-1`` under ``maximize`` (torch negates the gradient first), else ``1``."""
    return -1.0 if hp["maximize"] else 1.0


def effective_grad(state: OptimizerState, g: np.ndarray, sign: float, l2: float) -> np.ndarray:
    """``s * g + l2 * p``: the gradient after torch's ``maximize`` and L2 weight decay."""
    if l2 == 0.0:
        return g if sign == 1.0 else -g
    if state.linear is None:
        raise ValueError(
            "a step with L2 weight decay needs the parameter: replay it from a state that holds the linear part "
            "(read_state(..., linear=True))"
        )
    return sign * g + l2 * state.linear[PARAM]
