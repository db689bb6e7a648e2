"""The certificate as training goes for element-wise rules (Adam, AdamW, ...): the store's replay over a few rows.

An element-wise rule does not move the weights by a scalar recurrence: Adam's denominators ``sqrt(v) + eps``
differ entry by entry, so no projection ``W Z`` can be carried through its steps (``record/sketch.py`` does
that for SGD), and the certificate used to be a replay of the whole store at fit end: a second pass over every
row, 1.8 times the fit for the paper's MLP with AdamW. But every such rule the library records except Adafactor
is *row-local*: an entry of the weight moves by its own gradient entry and state only. So the replay a reader
runs (:func:`~lightning_dualform.optim.replay.advance_one`: the rule's own float64 code, the step's table row and
gradient factor as the store keeps them) runs as training goes on :data:`ROWS` random rows ``U`` of each
weight, and on the whole bias, from the optimizer's state before the first recorded step. Each step it needs
``G_U = V[:, U]^T K`` from the step's rows as stored (``|U| x d_in`` numbers; summed over DDP ranks), and at fit
end the replayed rows are compared with the trained ones.

What it proves: the rows, the table rows, the factors and the starting state reproduce the trained weights on
the rows sampled. A recording error that reaches every output unit (a missing, extra or wrong row: a row's
value vector is dense; a wrong learning rate or factor) shows on any row; one confined to a fraction ``p`` of
the units is missed with probability ``(1 - p)^16`` (0.2% for ``p = 1/3``), and so is rounding the rule amplifies
in a few units (a weight gradient that cancels, then Adam's ``m / sqrt(v)``): measured on a ResNet-18's
convolutions, which therefore keep the whole replay (``docs/benchmarks.md``). ``lightning-dualform verify``
replays every row. A resume continues the replay its checkpoint saved (:meth:`RowReplayCertificate.state_dict`);
a convolution or an embedding, Adafactor, and a resume from a checkpoint without the replay are certified at
fit end by the whole replay instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lightning_dualform.optim import UpdateRule
from lightning_dualform.optim.maps import OptimizerState
from lightning_dualform.optim.replay import advance_one
from lightning_dualform.record import rows as rows_mod
from lightning_dualform.record.sketch import layer_seed
from lightning_dualform.store.format import SCALAR_RULES

log = logging.getLogger(__name__)

#: Rows of each weight the replay carries.
ROWS = 16
_PARAM = "param"


@dataclass
class LayerRows:
    """One layer's replay: the weight's state on rows ``units`` and the bias's state (None: no bias)."""

    units: np.ndarray
    weight: OptimizerState
    bias: OptimizerState | None
    bias_init: np.ndarray | None  # a bias no optimizer group holds never moves: compared with this


class RowReplayCertificate:
    """Every tracked layer's :class:`LayerRows`; see the module docstring."""

    method = "rows"
    needs_projections = False  # (the SGD sketch's per-step products are not used)

    def __init__(self, rule: UpdateRule, row_dtype: str,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.rule = rule
        self.row_dtype = row_dtype
        self.all_reduce = all_reduce
        self.layers: dict[str, LayerRows] = {}

    @staticmethod
    def units(name: str, d_out: int, k: int = ROWS) -> np.ndarray:
        """The rows a layer's replay carries: random, the same for a layer name in every process."""
        perm = torch.randperm(d_out, generator=torch.Generator().manual_seed(layer_seed(name)))
        return np.sort(perm[: min(k, d_out)].numpy()).astype(np.int64)

    @classmethod
    def for_run(cls, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, rule: UpdateRule | None,
                groups: dict[str, tuple[int | None, int | None]], resume: dict[str, Any] | None, row_dtype: str,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> "RowReplayCertificate | None":
        """The replay of a run from its first recorded step; None where it does not apply (see the module
        docstring): the store is then certified at fit end."""
        if rule is None or not rule.row_local or rule.name in SCALAR_RULES:
            return None  # (a scalar rule's certificate sums its rows: SGD's projections, or the full one)
        if not all(type(m) is nn.Linear for m in modules.values()):
            return None
        saved = (resume or {}).get("sketch")
        ours = isinstance(saved, dict) and set(saved) == set(modules) and all(
            isinstance(v, dict) and v.get("kind") == "rows" for v in saved.values())
        if resume is not None and not ours:
            return None  # a checkpoint without the replay's rows: the whole replay at the end
        cert = cls(rule, row_dtype, all_reduce)
        for name, m in modules.items():
            wi, bi = groups[name]
            if wi is None:
                return None  # (a weight no group holds; the full certificate says so)
            if saved is not None:
                try:  # (a checkpoint is the user's file: what does not fit this layer and rule is not used)
                    layer = _layer_from_plain(saved[name])
                    _check_saved(rule, layer, m)
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    log.warning("the checkpoint's row replay of layer %r does not fit it (%s); the store is "
                                "certified by the whole replay at fit end instead.", name, err)
                    return None
                cert.layers[name] = layer
                continue
            units = cls.units(name, m.out_features)
            weight = rule.read_state(optimizer, m.weight).take_rows(units)
            bias = rule.read_state(optimizer, m.bias) if m.bias is not None and bi is not None else None
            b0 = m.bias.detach().double().cpu().numpy() if m.bias is not None and bias is None else None
            cert.layers[name] = LayerRows(units, weight, bias, b0)
        return cert

    def take_step(self, name: str, projections: Any, rows: tuple | None, grad_scale: float, w_up: Any,
                  b_up: Any | None) -> None:
        """Apply one recorded step from the layer's rows as stored (``None``: none this step, a zero gradient)."""
        r = self.layers[name]
        d_in = r.weight.shape[1]
        if rows is not None:
            keys = rows_mod.stored_floats(rows[0], self.row_dtype).double()
            values = rows_mod.stored_floats(rows[1], self.row_dtype).double()
            gu = values[:, torch.from_numpy(r.units).to(values.device)].t() @ keys  # (|U|, d_in)
            gb = values.sum(0)
        else:
            gu = torch.zeros(len(r.units), d_in, dtype=torch.float64)
            gb = torch.zeros(r.weight.shape[0], dtype=torch.float64)
        if self.all_reduce is not None:  # every rank's rows make the step's gradient
            flat = self.all_reduce(torch.cat([gu.reshape(-1), gb.to(gu.device)]))
            gu, gb = flat[: gu.numel()].reshape(gu.shape), flat[gu.numel():]
        advance_one(self.rule, r.weight, gu.cpu().numpy(), w_up, grad_scale)
        if r.bias is not None and b_up is not None:
            advance_one(self.rule, r.bias, gb.cpu().numpy(), b_up, grad_scale)

    def result(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, float]:
        """``rel_err_weight`` of the replayed rows against the same rows of the final ``weight`` ``(d_out, d_in)``,
        ``rel_err_bias`` against the final ``bias``."""
        r = self.layers[name]
        assert r.weight.linear is not None
        real = weight.double().cpu().numpy()[r.units]
        err_w = _rel(r.weight.linear[_PARAM] - real, real)
        err_b = 0.0
        if bias is not None:
            b = bias.double().cpu().numpy()
            rebuilt = r.bias.linear[_PARAM] if r.bias is not None and r.bias.linear is not None else r.bias_init
            if rebuilt is not None:
                err_b = _rel(rebuilt - b, b)
        return {"rel_err_weight": err_w, "rel_err_bias": err_b, "rel_err": max(err_w, err_b)}

    def width(self, name: str) -> int:
        """The rows replayed (the certificate's ``probes``)."""
        return len(self.layers[name].units)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and numbers (a checkpoint holds it): enough to continue the replay after a resume."""
        return {name: _layer_to_plain(r) for name, r in self.layers.items()}


def _rel(err: np.ndarray, ref: np.ndarray) -> float:
    denom = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(err))
    return num / denom if denom > 0 else num


def _check_saved(rule: UpdateRule, r: LayerRows, m: nn.Module) -> None:
    """Raise ``ValueError`` unless a checkpoint's replay fits layer ``m`` and the rule: its rows within the weight,
    its states of the rule and shape, finite."""
    d_out, d_in = int(m.weight.shape[0]), int(m.weight.shape[1])
    u = r.units
    if u.ndim != 1 or not len(u) or u.min() < 0 or u.max() >= d_out or len(np.unique(u)) != len(u):
        raise ValueError(f"rows {u.tolist()[:8]} are not distinct rows of a weight of {d_out}")
    if tuple(r.weight.shape) != (d_out, d_in) or r.weight.rows is None or not np.array_equal(r.weight.rows, u):
        raise ValueError(f"the weight's state holds shape {r.weight.shape}, not ({d_out}, {d_in}) on those rows")
    rule.check_state(r.weight)
    if r.bias is not None:
        if m.bias is None or tuple(r.bias.shape) != (d_out,):
            raise ValueError("a bias state for a layer without that bias")
        rule.check_state(r.bias)
    for st in (r.weight, r.bias):
        for v in ({**st.nonlinear, **(st.linear or {})}.values() if st is not None else ()):
            if not np.all(np.isfinite(v)):
                raise ValueError("a state entry that is not finite")


def _value_to_plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"array": v.tolist(), "dtype": str(v.dtype), "shape": list(v.shape)}
    if isinstance(v, np.floating):  # (torch rounds some scalars, NAdam's mu_product, to float32: kept so)
        return {"scalar": float(v), "dtype": str(v.dtype)}
    return float(v)


def _value_from_plain(v: Any) -> Any:
    if isinstance(v, dict) and "array" in v:
        return np.asarray(v["array"], dtype=v["dtype"]).reshape(v["shape"])
    if isinstance(v, dict):
        return np.dtype(v["dtype"]).type(v["scalar"])
    return float(v)


def _state_to_plain(st: OptimizerState | None) -> dict[str, Any] | None:
    if st is None:
        return None
    return {"start": st.start, "shape": list(st.shape), "param_dtype": st.param_dtype,
            "rows": None if st.rows is None else st.rows.tolist(),
            "nonlinear": {k: _value_to_plain(v) for k, v in st.nonlinear.items()},
            "linear": None if st.linear is None else {k: _value_to_plain(v) for k, v in st.linear.items()}}


def _state_from_plain(d: dict[str, Any] | None) -> OptimizerState | None:
    if d is None:
        return None
    nonlinear = {k: _value_from_plain(v) for k, v in d["nonlinear"].items()}
    linear = None if d["linear"] is None else {k: _value_from_plain(v) for k, v in d["linear"].items()}
    rows = None if d["rows"] is None else np.asarray(d["rows"], dtype=np.int64)
    return OptimizerState(int(d["start"]), tuple(d["shape"]), nonlinear, linear, rows, d["param_dtype"])


def _layer_to_plain(r: LayerRows) -> dict[str, Any]:
    return {"kind": "rows", "units": r.units.tolist(), "weight": _state_to_plain(r.weight),
            "bias": _state_to_plain(r.bias), "bias_init": None if r.bias_init is None else r.bias_init.tolist()}


def _layer_from_plain(d: dict[str, Any]) -> LayerRows:
    weight = _state_from_plain(d["weight"])
    if weight is None:
        raise ValueError("no state for the weight")
    return LayerRows(np.asarray(d["units"], dtype=np.int64), weight, _state_from_plain(d["bias"]),
                     None if d["bias_init"] is None else np.asarray(d["bias_init"], dtype=np.float64))
