"""Module hooks that capture a layer's keys (inputs) and values (output gradients) during training.

A forward hook keeps the input rows of every call; a tensor hook on the call's output receives ``v`` in
the backward pass. Nothing is copied here: the engine decides when rows are complete and hands them to
the writer. How a call's input becomes key rows, per layer kind, is :mod:`lightning_dualform.layers`.

A convolution's call keeps its input map ``(B, C_in, *spatial)`` instead of the unfolded key rows (the store
keeps the maps, ``store/conv.py``): :func:`call_keys` unfolds them where rows are needed, and
:func:`project_call` projects them (``K Z``) as a convolution, without unfolding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lightning_dualform._unwrap import layer_name, named_modules
from lightning_dualform.layers import (
    FUSED_TYPES,
    SUPPORTED_TYPES,
    conv_maps,
    keys_of,
    kept_rows,
    project_keys,
    project_maps,
    unfold_maps,
    unsupported_reason,
    values_of,
)
from lightning_dualform.store.conv import ConvGeometry


@dataclass
class CallRows:
    """The rows of one call of a layer in one forward pass."""

    keys: torch.Tensor  # (R, d_in), detached; (R, 1) token ids for an embedding
    lead_shape: tuple[int, ...]  # how rows map to examples: (B,), (B, T) or (B, locations)
    call: int  # call number within the current micro-batch
    values: torch.Tensor | None = None  # (R, d_out), set in a backward that accumulated the layer's gradient
    # the output gradient of the last backward that reached the call, until the weight's (or bias's) .grad takes
    # it: a backward that accumulates no .grad (torch.autograd.grad, e.g. an input saliency) adds nothing
    pending: torch.Tensor | None = None
    output: torch.Tensor | None = None  # (R, d_out) forward output, kept only when asked (query recording)
    keep: torch.Tensor | None = None  # (R,) rows that reach the weight (an embedding's padding_idx does not)
    # True when the keys are autograd's own result (an activation), which nothing writes to later; an input
    # from outside autograd (the batch) may be reused by user code, so it is copied before it is handed on
    private_keys: bool = False
    batch: Any = None  # what the recorder knew about the batch when the call ran (indices, labels)
    # a convolution's geometry: ``keys`` is then its input map (B, C_in, *spatial), unpadded, and ``values``
    # the output gradient as rows (B * L, C_out)
    geometry: ConvGeometry | None = None

    @property
    def n_rows(self) -> int:
        """Key rows of the call: ``B * L`` for a convolution's map, else the rows of ``keys``."""
        if self.geometry is not None:
            return self.keys.shape[0] * self.geometry.locations
        return self.keys.shape[0]


def call_keys(call: "CallRows") -> torch.Tensor:
    """The key rows ``(R, d_in)`` of a call (a convolution's map unfolded)."""
    return unfold_maps(call.geometry, call.keys) if call.geometry is not None else call.keys


def project_call(module: nn.Module, call: "CallRows", r: torch.Tensor) -> torch.Tensor:
    """``K r`` for the keys of a call (a convolution's map projected as a convolution)."""
    if call.geometry is not None:
        return project_maps(call.geometry, call.keys, r)
    return project_keys(module, call.keys, r)


@dataclass
class LayerCapture:
    """Hooks on one tracked layer; collects :class:`CallRows` while ``active`` is set.

    Calls stay here until :meth:`take_completed` (an optimizer step takes them; with gradient accumulation
    that is several forward and backward passes later). A call whose gradient was thrown away is dropped
    when the layer runs again: its trained parameters' ``.grad`` are then ``None`` (``zero_grad()`` after a step
    that did not happen, such as one a loss scaler skipped).
    """

    name: str
    module: nn.Module
    is_active: Callable[[], bool]
    need_grad: bool = True  # training: only calls that backward reaches; queries: every call
    keep_output: bool = False
    context: Callable[[], Any] = lambda: None  # stored with each call (the batch it belongs to)
    calls: list[CallRows] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def attach(self) -> None:
        self._handles.append(self.module.register_forward_hook(self._forward_hook))
        if self.need_grad:  # (a parameter's .grad took this backward's gradient: its calls' values count)
            for p in (self.module.weight, getattr(self.module, "bias", None)):
                if isinstance(p, torch.Tensor) and p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._accumulated))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.calls.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not self.is_active() or not isinstance(output, torch.Tensor):
            return
        geometry = None
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and self.need_grad:
            # training stores the map, not its unfolding (store/conv.py); query recording keeps key rows
            keys, geometry = conv_maps(module, inputs[0])
            lead = (keys.shape[0], geometry.locations) if inputs[0].dim() == keys.dim() else (geometry.locations,)
        else:
            keys, lead = keys_of(module, inputs[0])
        if not self.need_grad:
            out = values_of(module, output) if self.keep_output else None
            self.calls.append(CallRows(keys=keys, lead_shape=lead, call=len(self.calls), output=out))
            return
        if not torch.is_grad_enabled() or not output.requires_grad:
            return
        trained = [p for p in (module.weight, getattr(module, "bias", None))
                   if isinstance(p, torch.Tensor) and p.requires_grad]
        if self.calls and all(p.grad is None for p in trained) and any(c.values is not None for c in self.calls):
            # their gradient was zeroed, never applied (a frozen weight, whose .grad stays None, tells nothing)
            self.calls = [c for c in self.calls if c.values is None]
        x = inputs[0]
        if x.grad_fn is None and keys.data_ptr() == x.data_ptr():
            # an input from outside autograd (the batch, a parameter, a reused buffer) may change before the step
            # takes the rows (the optimizer updates a parameter in place): copied as the layer saw it
            keys = keys.clone()
        rec = CallRows(keys=keys, lead_shape=lead, call=len(self.calls), keep=kept_rows(module, keys),
                       private_keys=True, batch=self.context(), geometry=geometry)
        self.calls.append(rec)

        def _grad_hook(grad: torch.Tensor, rec: CallRows = rec) -> None:
            # once per backward that reaches the output (autograd sums its uses first); it counts when the
            # parameter's .grad takes the backward's gradient (:meth:`_accumulated`)
            rec.pending = values_of(module, grad)

        output.register_hook(_grad_hook)

    def _accumulated(self, param: torch.Tensor) -> None:
        """The backward that just ran added to the layer's .grad: the output gradients it gave its calls are
        values (a second such backward, with ``retain_graph``, adds to them as it adds to .grad)."""
        for c in self.calls:
            if c.pending is not None:
                c.values = c.pending if c.values is None else c.values + c.pending
                c.pending = None

    def take_completed(self) -> list[CallRows]:
        """Calls whose backward has run; forgets all calls (those without values had no gradient)."""
        done = [c for c in self.calls if c.values is not None]
        self.calls = []
        return done


def find_layers(
    model: nn.Module, layers: list[str] | Callable[[str, nn.Module], bool] | None
) -> tuple[dict[str, nn.Module], list[str]]:
    """Resolve the ``layers`` argument against ``model.named_modules()``, under the names a store gives them
(:func:`~lightning_dualform._unwrap.layer_name`: a compiled submodule's layers without ``_orig_mod``).

    Returns the selected modules by name (model order) and notes about what was left out and why.

    Raises:
        ValueError: a requested name does not exist or is not a supported layer type.
    """
    named = named_modules(model)
    notes: list[str] = []
    if isinstance(layers, (list, tuple)):
        layers = [layer_name(n) for n in layers]
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
            elif not isinstance(m, SUPPORTED_TYPES) and any(
                    p.dim() >= 2 and p.requires_grad for p in m.parameters(recurse=False)):
                notes.append(
                    f"{n} ({type(m).__name__}) is not recorded: its weight matrix is not one of a kind the dual form "
                    f"here covers ({', '.join(t.__name__ for t in SUPPORTED_TYPES)}); its training is not in the store."
                )
    owners: dict[int, str] = {}
    for n in list(chosen):  # one weight shared by two layers (tied): each layer's rows explain only its own use
        first = owners.setdefault(id(chosen[n].weight), n)
        if first != n:
            notes.append(f"{n} shares its weight with {first} (tied): each layer's rows explain only its own use of "
                         "it, so both are recorded INEXACT (the two layers' rows are not merged into one memory).")
    for n in list(chosen):
        m = chosen[n]
        reason = unsupported_reason(m)
        if reason is not None:
            notes.append(f"{n} ({type(m).__name__}) is skipped: {reason}.")
            del chosen[n]
            continue
        if not m.weight.requires_grad:
            notes.append(f"{n} is skipped: its weight is frozen (requires_grad=False).")
            del chosen[n]
    return chosen, notes
