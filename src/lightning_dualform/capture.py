"""Module hooks that capture a layer's keys (inputs) and values (output gradients) during training.

A tracked layer computes ``y = W k + b`` for each key row ``k``; autograd then gives ``v = dL/dy`` per
row, and ``W.grad = sum_rows v k^T``, ``b.grad = sum_rows v``. A forward hook keeps the input rows of
every call; a tensor hook on the call's output receives ``v`` in the backward pass. Nothing is copied
here: the callback decides when rows are complete and hands them to the writer.

Layer kinds differ only in how a call's input becomes key rows (:func:`keys_of`):
``nn.Linear`` flattens leading dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

#: Module types captured exactly.
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
#: Module types that hold linear weights but run them inside fused kernels (not capturable).
FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)


@dataclass
class CallRows:
    """The rows of one call of a layer in one forward pass."""

    keys: torch.Tensor  # (R, d_in), detached
    lead_shape: tuple[int, ...]  # the input's leading dims, e.g. (B,) or (B, T)
    call: int  # call number within the current micro-batch
    values: torch.Tensor | None = None  # (R, d_out), set in backward
    output: torch.Tensor | None = None  # (R, d_out) forward output, kept only when asked (query recording)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as the ``(d_out, d_in)`` matrix that multiplies key rows."""
    return module.weight.detach()


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes this tensor's matmuls in, or None outside autocast."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 or a device without autocast
        return None
    return None


def keys_of(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Key rows of one call: ``(R, d_in)`` and the leading shape they were flattened from.

    Under autocast the layer multiplies a rounded copy of its input; the keys are that copy (held in
    float32), since it is what the weight gradient was computed from.
    """
    d_in = module.in_features
    keys = x.detach().reshape(-1, d_in)
    low = autocast_dtype(x)
    if low is not None and keys.is_floating_point() and keys.dtype != low:
        keys = keys.to(low)
    return keys, tuple(x.shape[:-1])


def values_of(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """Value rows of one call: the output gradient as ``(R, d_out)``."""
    return grad.detach().reshape(-1, module.out_features)


@dataclass
class LayerCapture:
    """Hooks on one tracked layer; collects :class:`CallRows` while ``active`` is set."""

    name: str
    module: nn.Module
    is_active: Callable[[], bool]
    need_grad: bool = True  # training: only calls that backward reaches; queries: every call
    keep_output: bool = False
    calls: list[CallRows] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._forward_hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.calls.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self.is_active() or not isinstance(output, torch.Tensor):
            return
        keys, lead = keys_of(module, inputs[0])
        if not self.need_grad:
            out = values_of(module, output) if self.keep_output else None
            self.calls.append(CallRows(keys=keys, lead_shape=lead, call=len(self.calls), output=out))
            return
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        rec = CallRows(keys=keys, lead_shape=lead, call=len(self.calls))
        self.calls.append(rec)

        def _grad_hook(grad: torch.Tensor, rec: CallRows = rec) -> None:
            # A layer whose output is reached twice by backward would call this twice; gradients add.
            v = values_of(module, grad)
            rec.values = v if rec.values is None else rec.values + v

        output.register_hook(_grad_hook)

    def take_completed(self) -> list[CallRows]:
        """Calls whose backward has run; forgets all calls (those without values had no gradient)."""
        done = [c for c in self.calls if c.values is not None]
        self.calls = []
        return done


def find_layers(
    model: nn.Module, layers: list[str] | Callable[[str, nn.Module], bool] | None
) -> tuple[dict[str, nn.Module], list[str]]:
    """Resolve the ``layers`` argument against ``model.named_modules()``.

    Returns the selected modules by name (model order) and notes about what was left out and why.

    Raises:
        ValueError: a requested name does not exist or is not a supported layer type.
    """
    named = dict(model.named_modules())
    notes: list[str] = []
    if isinstance(layers, (list, tuple)):
        unknown = [n for n in layers if n not in named]
        if unknown:
            candidates = [n for n, m in named.items() if isinstance(m, SUPPORTED_TYPES)]
            raise ValueError(
                f"`DualFormCallback(layers=...)`: no module named {unknown} in the model. "
                f"Names are model.named_modules() names; supported layers here: {candidates}."
            )
        bad = [n for n in layers if not isinstance(named[n], SUPPORTED_TYPES)]
        if bad:
            kinds = {n: type(named[n]).__name__ for n in bad}
            raise ValueError(
                f"`DualFormCallback(layers=...)`: {kinds} cannot be captured; supported types: "
                f"{[t.__name__ for t in SUPPORTED_TYPES]}."
            )
        wanted = set(layers)
        chosen = {n: m for n, m in named.items() if n in wanted}
    else:
        pred = layers if callable(layers) else (lambda n, m: True)
        chosen = {n: m for n, m in named.items() if isinstance(m, SUPPORTED_TYPES) and pred(n, m)}
        for n, m in named.items():
            if isinstance(m, FUSED_TYPES):
                notes.append(
                    f"{n} ({type(m).__name__}) is not captured: its weights run inside a fused kernel. "
                    "Write the cell with nn.Linear layers to analyse it (see examples/char_lm.py)."
                )
    for n in list(chosen):
        m = chosen[n]
        if not m.weight.requires_grad:
            notes.append(f"{n} is skipped: its weight is frozen (requires_grad=False).")
            del chosen[n]
    return chosen, notes
