"""The trained model seen through a store: which of its parameters the store records, the model at any
recorded step (``torch.func.functional_call`` with the weights the store rebuilds), and the factors of a
query's gradient ``df/dW`` at every tracked layer.

For a layer ``y = W k + b`` called at positions ``p`` of a query (one for an MLP, the output locations of a
convolution, the tokens of a sequence) with input rows ``x_p`` and output gradients ``g_p = df/dy_p``,

    df/dW = sum_p g_p x_p^T        df/db = sum_p g_p

so a query's gradient is kept as the factors ``X (n, P, d_in)`` and ``G (n, P, d_out)`` (never as the
``d_out x d_in`` matrix unless a pass asks for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from lightning_dualform._unwrap import named_modules, raw_names, unwrap_model
from lightning_dualform.attribute.targets import Target, check_outputs, evaluate
from lightning_dualform.layers import keys_of, one_hot_keys, values_of

Forward = Callable[[nn.Module, Any], torch.Tensor]

#: Modules whose training-time behaviour a replay cannot reproduce from a store (randomness it does not record,
#: running statistics it does not keep).
UNREPLAYABLE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class QueryFactors:
    """One tracked layer's factors of ``df_q/dW`` for ``n`` queries: ``x (n, P, d_in)``, ``g (n, P, d_out)``."""

    x: torch.Tensor
    g: torch.Tensor

    @property
    def positions(self) -> int:
        return self.x.shape[1]

    def dense(self) -> torch.Tensor:
        """``df_q/dW`` ``(n, d_out, d_in)``."""
        return torch.einsum("npo,npi->noi", self.g, self.x)

    def bias(self) -> torch.Tensor:
        """``df_q/db`` ``(n, d_out)``."""
        return self.g.sum(1)


class BoundModel:
    """A model and the store that recorded its training.

    Args:
        model: the trained model (a LightningModule works); its module names must be the store's layer names.
        store: an opened store (``StoreReader`` or the sharded reader).
        layers: the layers to use (default: every tracked layer).

    Raises:
        KeyError: a store layer is not a module of ``model``.
    """

    def __init__(self, model: nn.Module, store: Any, layers: list[str] | None = None) -> None:
        model = unwrap_model(model)  # (a compiled model is replayed uncompiled: the same numbers)
        self.model = model
        self.store = store
        self.layers = list(layers) if layers is not None else list(store.layers)
        modules = named_modules(model)
        missing = [n for n in self.layers if n not in modules]
        if missing:
            raise KeyError(f"the model has no module named {missing}; the store tracks {store.layers}. Pass the model "
                           "that was trained (module names must match).")
        self.modules = {n: modules[n] for n in self.layers}
        #: parameter name in ``model.named_parameters()`` -> (layer, "weight" | "bias"); a compiled submodule's
        #: parameters keep their ``_orig_mod`` there
        self.param_of: dict[str, tuple[str, str]] = {}
        raw = raw_names(model)
        for n in self.layers:
            prefix = raw[id(self.modules[n])]
            self.param_of[f"{prefix}.weight" if prefix else "weight"] = (n, "weight")
            if store.layer(n).has_bias:
                self.param_of[f"{prefix}.bias" if prefix else "bias"] = (n, "bias")

    def untracked_trainable(self) -> list[str]:
        """Trainable parameters of the model that the store does not record (a replay cannot rebuild them)."""
        return [name for name, p in self.model.named_parameters() if p.requires_grad and name not in self.param_of]

    def unreplayable_modules(self) -> list[str]:
        """Modules whose training-time forward depends on what no store records: dropout (with ``p > 0``: its
        random masks), batch and instance norm (their running statistics and batch coupling)."""
        out = []
        for name, m in named_modules(self.model).items():
            if isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) == 0.0:
                continue
            if isinstance(m, UNREPLAYABLE):
                out.append(f"{name or 'model'} ({type(m).__name__})")
        return out

    # -- weights ----------------------------------------------------------------------------------------
    def to_module_shape(self, layer: str, pname: str, view: np.ndarray | torch.Tensor, *,
                        batched: bool = False) -> torch.Tensor:
        """A weight in the store's ``(d_out, d_in)`` view (or a bias) as the module's own parameter shape; with
        ``batched``, a stack of them ``(n, d_out, d_in) -> (n, *shape)``."""
        t = torch.as_tensor(view)
        if pname == "bias":
            return t
        lay = self.store.layer(layer)
        if lay.kind == "embedding":
            return t.transpose(-1, -2)
        return t.reshape(*t.shape[:1], *lay.weight_shape) if batched else t.reshape(lay.weight_shape)

    def to_view(self, layer: str, pname: str, param: torch.Tensor, *, batched: bool = False) -> torch.Tensor:
        """The inverse of :meth:`to_module_shape`."""
        if pname == "bias":
            return param
        lay = self.store.layer(layer)
        if lay.kind == "embedding":
            return param.transpose(-1, -2)
        return param.reshape(*param.shape[:1], lay.d_out, lay.d_in) if batched else param.reshape(lay.d_out, lay.d_in)

    def final_params(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The model's own tracked parameters, checked against the store's final weights.

        Raises:
            ValueError: they differ from the stored final weights (the model is not the trained one).
        """
        out = {}
        own = dict(self.model.named_parameters())
        for name, (layer, pname) in self.param_of.items():
            p = own[name].detach().to("cpu", dtype)
            lay = self.store.layer(layer)
            final = lay.weight_final if pname == "weight" else lay.bias_final
            if final is not None and self.store.complete:
                ref = self.to_module_shape(layer, pname, final).to(dtype)
                err = float((p - ref).norm() / max(float(ref.norm()), 1e-30))
                if err > 1e-4:
                    raise ValueError(
                        f"the model's {name} differs from the store's final weights (relative error {err:.2e}): pass "
                        "the trained model (the one the store recorded, after its last step)."
                    )
            out[name] = p
        return out

    # -- a query's gradient -------------------------------------------------------------------------------
    def parameter_gradients(self, factors: dict[str, QueryFactors]) -> dict[str, torch.Tensor]:
        """``df_q/dtheta`` ``(n, *shape)`` of every tracked parameter, from the queries' factors."""
        out = {}
        for name, (layer, pname) in self.param_of.items():
            fac = factors[layer]
            out[name] = fac.bias() if pname == "bias" else self.to_module_shape(layer, "weight", fac.dense(),
                                                                                batched=True)
        return out

    def query_factors(
        self,
        params: dict[str, torch.Tensor],
        inputs: Any,
        targets: torch.Tensor,
        target: Target,
        forward: Forward | None = None,
        *,
        dtype: torch.dtype = torch.float64,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, QueryFactors]]:
        """Run the model (eval mode) with ``params`` in place of its tracked parameters and differentiate ``f``.

        Returns:
            ``f (n,)``, the outputs, and per tracked layer the factors of ``df_q/dW`` (:class:`QueryFactors`).

        Raises:
            ValueError: a tracked layer is not called by the forward, or is called on inputs that do not
                batch the ``n`` queries along their first dimension.
        """
        rows: dict[str, list[tuple[torch.Tensor, tuple[int, ...], list]]] = {n: [] for n in self.layers}
        handles = []
        for name, mod in self.modules.items():
            def hook(m: nn.Module, args: tuple, out: Any, name: str = name) -> None:
                keys, lead = keys_of(m, args[0])
                holder: list = []
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(lambda grad, m=m, holder=holder: holder.append(values_of(m, grad)))
                rows[name].append((keys, lead, holder))
            handles.append(mod.register_forward_hook(hook))
        model = self.model
        was_training = model.training
        # the forward runs in the model's own dtype (its untracked parameters and buffers stay as they are)
        own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        live = {k: v.detach().to(own).requires_grad_(True) for k, v in params.items()}
        try:
            model.eval()
            if forward is None:
                outputs = functional_call(model, live, (inputs,))
            else:
                outputs = _call_with(model, live, forward, inputs)
            check_outputs(outputs)
            f = evaluate(target, outputs, targets)
            f.sum().backward()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        n = targets.shape[0]
        factors = {}
        for name, calls in rows.items():
            if not calls:
                raise ValueError(f"layer {name!r} was not called by the model's forward on the queries.")
            xs, gs = [], []
            d_in = self.store.layer(name).d_in
            for keys, lead, holder in calls:
                if not lead or lead[0] != n:
                    raise ValueError(f"layer {name!r} saw inputs of leading shape {lead}, not a batch of the {n} "
                                     "queries.")
                k = one_hot_keys(keys, d_in) if not keys.is_floating_point() else keys
                v = holder[0] if holder else torch.zeros(k.shape[0], self.store.layer(name).d_out)
                xs.append(k.to(dtype).reshape(n, -1, d_in))
                gs.append(v.to(dtype).reshape(n, -1, v.shape[-1]))
            factors[name] = QueryFactors(torch.cat(xs, 1), torch.cat(gs, 1))
        return f.detach(), outputs.detach(), factors


def _call_with(model: nn.Module, params: dict[str, torch.Tensor], forward: Forward, inputs: Any) -> torch.Tensor:
    """``forward(model, inputs)`` with ``params`` swapped in (``functional_call`` on a wrapper module)."""

    class _Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: Any) -> torch.Tensor:  # noqa: D401
            return forward(self.inner, x)

    return functional_call(_Wrap(), {f"inner.{k}": v for k, v in params.items()}, (inputs,))
