"""The layer math of every kind we record, on torch tensors: keys, values, weights, a convolution's unfolding.

A tracked layer computes ``y = W k + b`` for each key row ``k``; autograd then gives ``v = dL/dy`` per
row, and ``W.grad = sum_rows v k^T``, ``b.grad = sum_rows v``. Layer kinds differ only in how a call's
input becomes key rows (:func:`keys_of`) and how the weight reads as a ``(d_out, d_in)`` matrix
(:func:`weight_matrix`): ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (a linear map on unfolded patches),
``nn.Embedding`` (a linear map on one-hot token keys, :func:`one_hot_keys`).

A convolution's input map ``(B, C_in, *spatial)`` is what the store keeps (``store/conv.py`` holds its
geometry and the numpy unfold): :func:`unfold_maps` unfolds maps into key rows on any device,
:func:`project_maps` projects them (``K Z``) as a convolution and :func:`maps_weight_sum` sums ``G^T K`` as
the convolution's weight gradient, both without unfolding.

Both sides use these functions: the recording hooks (``record/capture.py``) and the passes over a store
(``attend/``). Pure functions of tensors and modules; nothing here holds state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.grad import conv1d_weight, conv2d_weight

from lightning_dualform.store.conv import ConvGeometry

#: Module types captured exactly.
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
#: Module types that hold linear weights but run them inside fused kernels (not capturable).
FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN)


def _unsupported(module: nn.Module) -> TypeError:
    """The error for a module of no supported type (the callers pass tracked layers only)."""
    return TypeError(
        f"{type(module).__name__} is not a layer type we record; supported: {[t.__name__ for t in SUPPORTED_TYPES]}."
    )


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    return "linear"


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a layer of a supported type still cannot be written as an exact sum of outer products."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        return f"groups={module.groups} (only groups=1 convolutions are captured)"
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None:
            return "max_norm renormalises the weight inside the forward pass"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq rescales gradients by in-batch token counts"
    return None


def layer_shape(module: nn.Module) -> tuple[int, int, dict]:
    """``(d_in, d_out, extra attributes)`` of the layer viewed as a linear map on key rows."""
    if isinstance(module, nn.Embedding):
        padding_idx = -1 if module.padding_idx is None else module.padding_idx
        return module.num_embeddings, module.embedding_dim, {"padding_idx": padding_idx}
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        w = module.weight
        extra = {
            "kernel_size": list(module.kernel_size), "stride": list(module.stride), "dilation": list(module.dilation),
            "padding": list(conv_padding(module)), "padding_mode": module.padding_mode,
            "in_channels": module.in_channels,
        }
        return int(w[0].numel()), int(w.shape[0]), extra
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, {}
    raise _unsupported(module)


def weight_matrix(module: nn.Module, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's weight (or a tensor of its shape: gradient, momentum buffer) as the ``(d_out, d_in)``
    matrix that multiplies key rows."""
    weight = module.weight if tensor is None else tensor
    if not isinstance(weight, torch.Tensor):
        raise _unsupported(module)
    w = weight.detach()
    if isinstance(module, nn.Embedding):
        return w.t()  # (num_embeddings, dim) -> (dim, num_embeddings)
    return w.reshape(w.shape[0], -1)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes this tensor's matmuls in, or None outside autocast."""
    dev = x.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 or a device without autocast
        return None
    return None


def conv_padding(module: nn.Module) -> tuple[int, ...]:
    """The ``F.pad`` widths (last dimension first) that the convolution applies to its input, from its
    public ``padding``, ``kernel_size`` and ``dilation``: ``"same"`` pads ``d (k - 1)`` in all, the extra one
    on the right, as torch does."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)):
        raise _unsupported(module)
    dims = len(module.kernel_size)
    padding = module.padding
    if padding == "valid":
        return (0,) * (2 * dims)
    pad: list[int] = []
    for i in reversed(range(dims)):
        if isinstance(padding, str):  # "same" (torch takes no other string)
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            left = total // 2
            pad += [left, total - left]
        else:
            pad += [padding[i], padding[i]]
    return tuple(pad)


def conv_geometry(module: nn.Module, input_size: tuple[int, ...]) -> ConvGeometry:
    """The geometry of a convolution applied to maps of spatial size ``input_size``."""
    _, _, extra = layer_shape(module)
    return ConvGeometry.from_attrs(extra, input_size)


def padded_maps(geom: ConvGeometry, x: torch.Tensor) -> torch.Tensor:
    """Maps ``(B, C, *spatial)`` with the layer's padding applied in its ``padding_mode`` (``F.pad``)."""
    if any(geom.padding):
        mode = "constant" if geom.padding_mode == "zeros" else geom.padding_mode
        x = nn.functional.pad(x, geom.padding, mode=mode)
    return x


def conv_patches(geom: ConvGeometry, x: torch.Tensor) -> torch.Tensor:
    """``(B, C*k..., L)`` patches of maps ``(B, C, *spatial)`` that the convolution multiplies by its weight."""
    x = padded_maps(geom, x)
    if geom.dims == 1:
        x = x.unsqueeze(-2)
        return nn.functional.unfold(x, (1, geom.kernel_size[0]), dilation=(1, geom.dilation[0]),
                                    stride=(1, geom.stride[0]))
    return nn.functional.unfold(x, geom.kernel_size, dilation=geom.dilation, stride=geom.stride)


def unfold_maps(geom: ConvGeometry, maps: torch.Tensor) -> torch.Tensor:
    """Key rows ``(B * L, d_in)`` of maps ``(B, C, *spatial)``, in the order the store numbers virtual rows."""
    patches = conv_patches(geom, maps)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def maps_from_pixels(pixels: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """Pixel rows ``(B * P, C)`` (as stored) -> maps ``(B, C, *spatial)``."""
    b = pixels.shape[0] // geom.pixels
    return pixels.reshape(b, *geom.input_size, pixels.shape[1]).movedim(-1, 1)


def pixels_of(maps: torch.Tensor) -> torch.Tensor:
    """Maps ``(B, C, *spatial)`` -> pixel rows ``(B * P, C)``: channel-last, as the store keeps them."""
    return maps.movedim(1, -1).reshape(-1, maps.shape[1])


def project_maps(geom: ConvGeometry, maps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``K Z`` ``(B * L, k)`` for the key rows ``K`` of maps ``(B, C, *spatial)`` and ``Z`` ``(d_in, k)``, as a
    convolution of the padded maps with ``Z`` read as ``k`` filters: no unfolded keys."""
    filters = z.t().reshape(z.shape[1], geom.in_channels, *geom.kernel_size).to(z.dtype)
    conv = nn.functional.conv1d if geom.dims == 1 else nn.functional.conv2d
    out = conv(padded_maps(geom, maps.to(z.dtype)), filters, stride=geom.stride, dilation=geom.dilation)  # (B, k, *out)
    return out.movedim(1, -1).reshape(-1, z.shape[1])


def maps_weight_sum(geom: ConvGeometry, maps: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``G^T K`` ``(C_out, d_in)`` for the key rows ``K`` ``(B * L, d_in)`` of maps ``(B, C, *spatial)`` and the rows
    ``G`` ``(B * L, C_out)`` of ``grads`` ``(B, C_out, *output_size)``, without unfolding: the weight gradient of the
    convolution of the padded maps (``torch.nn.grad.conv*d_weight``) with ``grads`` as its output gradient. Its
    columns are channel-major then kernel offsets, as the unfolded keys'. In ``grads``' dtype."""
    conv_weight = conv1d_weight if geom.dims == 1 else conv2d_weight
    x = padded_maps(geom, maps.to(grads.dtype))
    shape = (grads.shape[1], geom.in_channels, *geom.kernel_size)
    gw = conv_weight(x, shape, grads, stride=geom.stride, padding=0, dilation=geom.dilation)
    return gw.reshape(grads.shape[1], geom.d_in)


def _conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, C*k..., L)`` patches that the convolution multiplies by its weight."""
    return conv_patches(conv_geometry(module, tuple(x.shape[2:])), x)


def conv_maps(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ConvGeometry]:
    """A convolution's input as the store keeps it: the unpadded map ``(B, C_in, *spatial)`` (an unbatched input
    as one example) and its geometry; under autocast, the rounded copy the layer multiplies."""
    x = x.detach()
    spatial = 1 if isinstance(module, nn.Conv1d) else 2
    xb = x if x.dim() == spatial + 2 else x.unsqueeze(0)
    low = autocast_dtype(x)
    if low is not None and xb.is_floating_point() and xb.dtype != low:
        xb = xb.to(low)
    return xb, conv_geometry(module, tuple(xb.shape[2:]))


def keys_of(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Key rows of one call: ``(R, d_in)`` and the leading shape they were flattened from.

    ``nn.Linear`` flattens leading dimensions; a convolution unfolds one row per (example, output
    location); an embedding keeps the token ids ``(R, 1)`` (its keys are one-hot). Under autocast the
    layer multiplies a rounded copy of its input; the keys are that copy, since it is what the weight
    gradient was computed from.
    """
    x = x.detach()
    if isinstance(module, nn.Embedding):
        return x.reshape(-1, 1), tuple(x.shape)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        batched = x.dim() == spatial + 2
        xb = x if batched else x.unsqueeze(0)
        patches = _conv_patches(module, xb)  # (B, d_in, L)
        keys = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        lead: tuple[int, ...] = (patches.shape[0], patches.shape[2]) if batched else (patches.shape[2],)
    elif isinstance(module, nn.Linear):
        keys = x.reshape(-1, module.in_features)
        lead = tuple(x.shape[:-1])
    else:
        raise _unsupported(module)
    low = autocast_dtype(x)
    if low is not None and keys.is_floating_point() and keys.dtype != low:
        keys = keys.to(low)
    return keys, lead


def values_of(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """Value rows of one call: the output gradient as ``(R, d_out)``, rows ordered like :func:`keys_of`'s."""
    grad = grad.detach()
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        g = grad if grad.dim() == module.weight.dim() else grad.unsqueeze(0)
        g = g.reshape(g.shape[0], g.shape[1], -1)  # (B, C_out, L)
        return g.transpose(1, 2).reshape(-1, g.shape[1])
    if isinstance(module, nn.Embedding):
        return grad.reshape(-1, module.embedding_dim)
    if isinstance(module, nn.Linear):
        return grad.reshape(-1, module.out_features)
    raise _unsupported(module)


def kept_rows(module: nn.Module, keys: torch.Tensor) -> torch.Tensor | None:
    """Rows whose gradient reaches the weight; None when all do."""
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        return keys[:, 0] != module.padding_idx
    return None


def project_keys(module: nn.Module, keys: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``keys @ r`` for ``(R, d_in)`` keys; for an embedding's token ids, ``r[token]``."""
    if isinstance(module, nn.Embedding):
        return r[keys[:, 0]]
    return keys.to(r.dtype) @ r


def one_hot_keys(tokens: torch.Tensor, d_in: int) -> torch.Tensor:
    """Token ids ``(R, 1)`` -> the one-hot keys ``(R, d_in)`` an embedding multiplies by its weight."""
    out = torch.zeros(tokens.shape[0], d_in, dtype=torch.float32, device=tokens.device)
    out[torch.arange(tokens.shape[0], device=tokens.device), tokens[:, 0].long()] = 1.0
    return out


#: how far a model's weights may be from a store's final ones and still be the model it recorded (float32 rounding
#: of a copy, a float64 model's weights stored as float32); a half-precision copy rounds more (:func:`same_model`)
FINAL_WEIGHTS_TOLERANCE = 1e-4


def same_model(module: nn.Module, error: tuple[str, float] | None) -> bool:
    """Whether :func:`final_weights_error`'s ``error`` leaves ``module`` the stored layer (its own dtype's rounding
    allowed: a bfloat16 or float16 copy of the trained model is the trained model)."""
    if error is None:
        return True
    eps = torch.finfo(module.weight.dtype).eps if module.weight.is_floating_point() else 0.0
    return error[1] <= max(FINAL_WEIGHTS_TOLERANCE, 2 * eps)


def final_weights_error(module: nn.Module, layer: Any) -> tuple[str, float] | None:
    """How far ``module``'s weight and bias are from a stored layer's final ones (``layer``: a store's
    ``LayerReader``, with ``weight_final``, ``bias_final``, ``to_param`` and ``has_bias``): the worse of the two as
    ``(parameter name, relative error)``, or None where the store holds no final weights (a store being written)."""
    import numpy as np

    pairs = [("weight", layer.weight_final, module.weight)]
    if layer.has_bias and isinstance(getattr(module, "bias", None), torch.Tensor):
        pairs.append(("bias", layer.bias_final, module.bias))
    worst: tuple[str, float] | None = None
    for pname, final, own in pairs:
        if final is None:
            continue
        ref = np.asarray(layer.to_param(final) if pname == "weight" else final, dtype=np.float64)
        mine = own.detach().to("cpu", torch.float64).numpy().reshape(ref.shape)
        err = float(np.linalg.norm(mine - ref) / max(float(np.linalg.norm(ref)), 1e-30))
        if worst is None or err > worst[1]:
            worst = (pname, err)
    return worst


def first_other_layer(store: Any, modules: dict[str, nn.Module], names: list[str]) -> tuple[str, str, float] | None:
    """The first of ``names`` whose module in ``modules`` does not hold ``store``'s final weights (beyond its own
    dtype's rounding: :func:`same_model`), as ``(layer, parameter, relative error)``; None where every one does, or
    where the store has no final weights yet (it is still being written)."""
    if not store.complete:
        return None
    for name in names:
        worst = final_weights_error(modules[name], store.layer(name))
        if worst is not None and not same_model(modules[name], worst):
            return (name, *worst)
    return None
