"""Checking the arguments of :class:`~lightning_dualform.attend.inference.DualInference` and its passes: the
device, the process group, the queries. Each error says what was passed, what is allowed and what to do."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_dualform.store.source import LayerSource


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`DualInference(device={device!r})` is not a device. Expected 'cpu', 'cuda', 'cuda:N' or None.") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`DualInference(device={device!r})`: CUDA is not available on this machine "
                "(torch.cuda.is_available() is False). Use device='cpu' or device=None."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`DualInference(device={device!r})`: only {torch.cuda.device_count()} CUDA device(s) here.")
    elif dev.type != "cpu":
        raise ValueError(f"`DualInference(device={device!r})`: only 'cpu' and 'cuda' devices are supported.")
    return dev


def resolve_group(distributed: Any) -> Any:
    """``None`` (one process), ``True`` (the default group) or a process group."""
    if distributed is False or distributed is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"`DualInference(distributed={distributed!r})` needs an initialized torch.distributed process group; "
            "call torch.distributed.init_process_group(...) first, or leave distributed=False."
        )
    return True if distributed is True else distributed


#: the largest magnitude a float32 holds: the rows are float32 (or narrower), and so is every product
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_queries(lay: LayerSource, queries: Any, call: str) -> torch.Tensor:
    """``queries`` as a real ``(n, d_in)`` tensor, or an error that names what is wrong with them.

    Raises:
        TypeError: not a tensor or array, or complex (the imaginary part would be dropped without a word).
        ValueError: the wrong shape, NaN or inf, or values beyond float32's range (the pass would turn them into
            inf, then NaN, which would read as a damaged store); a meta tensor (no values), a sparse one, or one
            on a device whose values cannot be read.
    """
    if isinstance(queries, np.ndarray):
        if queries.dtype.kind == "c":
            raise TypeError(_complex(call, queries.dtype))
        if queries.dtype.kind not in "biuf":
            raise TypeError(f"`{call}(queries=...)` must hold real numbers; got a numpy array of dtype "
                            f"{queries.dtype}.")
        queries = torch.from_numpy(queries)
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"`{call}(queries=...)` must be a torch.Tensor or numpy array of shape (n, {lay.d_in}), got {type(queries).__name__}.")
    if queries.is_complex():
        raise TypeError(_complex(call, queries.dtype))
    if queries.device.type == "meta":
        raise ValueError(f"`{call}(queries=...)` is a meta tensor: it has a shape but no values to attend with. Pass "
                         "the queries' values, on the CPU or a CUDA device.")
    if queries.layout != torch.strided:
        raise ValueError(f"`{call}(queries=...)` is a {queries.layout} tensor; pass a dense one (queries.to_dense()).")
    if queries.device.type not in ("cpu", "cuda"):
        try:
            queries = queries.cpu()
        except (RuntimeError, NotImplementedError) as err:
            raise ValueError(f"`{call}(queries=...)` is on device {queries.device}, whose values cannot be read here "
                             f"({err}); pass the queries on the CPU or a CUDA device.") from err
    if queries.dim() == 1:
        queries = queries.unsqueeze(0)
    if queries.dim() != 2 or queries.shape[1] != lay.d_in or queries.shape[0] == 0:
        raise ValueError(
            f"`{call}(queries=...)` for layer {lay.name!r} must have shape (n, {lay.d_in}) with n >= 1 "
            f"(the layer's input width is {lay.d_in}); got {tuple(queries.shape)}."
        )
    if not queries.is_floating_point():
        queries = queries.float()
    finite = torch.isfinite(queries)
    if not bool(finite.all()):
        bad = (~finite.all(dim=1)).nonzero().squeeze(1)[:5].tolist()
        raise ValueError(f"`{call}(queries=...)` holds NaN or inf (query rows {bad}...); every query must be finite.")
    if queries.dtype == torch.float64:
        big = queries.abs() > FLOAT32_MAX
        if bool(big.any()):
            bad = big.any(dim=1).nonzero().squeeze(1)[:5].tolist()
            raise ValueError(
                f"`{call}(queries=...)` holds values beyond float32's range (query rows {bad}, largest magnitude "
                f"{float(queries.abs().max()):.3g} > {FLOAT32_MAX:.3g}); the stored rows and the products are float32, "
                "where these become inf. Scale the queries down."
            )
    return queries.detach()


def _complex(call: str, dtype: Any) -> str:
    return (f"`{call}(queries=...)` is complex ({dtype}); queries are real inputs of a layer, and the imaginary part "
            "would be dropped. Pass real values (e.g. `queries.real`, if that is what you mean).")
