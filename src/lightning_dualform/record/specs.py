"""What the store is told about a run and its layers before recording starts, and where each rank writes.

:func:`layer_spec` describes a tracked layer (its shape as a linear map, its initial weights and the optimizer
state before the first recorded step); :func:`describe_optimizer` the optimizer's settings as JSON-able data;
:class:`Distributed` the process group whose rows make one gradient; :func:`rank_path` the file a rank writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lightning_dualform.layers import layer_kind, layer_shape, weight_matrix
from lightning_dualform.optim import UpdateRule
from lightning_dualform.store.format import LayerSpec


def rank_path(path: str, rank: int, world_size: int) -> str:
    """The file a global rank writes: ``path`` itself alone, ``name.rank{r}.h5`` under DDP."""
    if world_size <= 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.h5'}"


def bias_of(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)  # nn.Embedding has none


@dataclass
class Distributed:
    """The process group the rows' gradient is averaged over (DDP); one process: rank 0 of 1."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Distributed":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def sum_over_ranks(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """:meth:`all_reduce` under DDP; None for one process (nothing to sum: callers skip the flattening)."""
        return self.all_reduce if self.world_size > 1 else None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (``t`` itself for one process); a CPU tensor goes through the backend's device."""
        if self.world_size <= 1:
            return t
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
        out = t.to(device).clone()
        dist.all_reduce(out)
        return out.to(t.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def layer_spec(name: str, m: nn.Module, optimizer: torch.optim.Optimizer | None, rule: UpdateRule | None,
               groups: tuple[int | None, int | None]) -> LayerSpec:
    """What the store must know of layer ``name`` before its first recorded step.

    Args:
        optimizer, rule: the optimizer and its update rule (None: none, or one without a rule).
        groups: the param groups of the layer's weight and bias (None: in none; the optimizer never changes it).
    """
    d_in, d_out, extra = layer_shape(m)
    w = weight_matrix(m).float().cpu().numpy()
    b = bias_of(m).detach().float().cpu().numpy() if bias_of(m) is not None else None
    state = optimizer.state if optimizer is not None else {}
    weight_state = bias_state = None
    if rule is not None and rule.name != "sgd":  # (SGD keeps its momentum buffers below, as in format 1)
        # the state before the first recorded step: the replay starts from it
        wi, bi = groups
        if wi is not None:
            weight_state = rule.read_state(optimizer, m.weight)
        if bias_of(m) is not None and bi is not None:
            bias_state = rule.read_state(optimizer, bias_of(m))

    def buffer(p: torch.Tensor | None, is_weight: bool) -> np.ndarray | None:
        buf = state.get(p, {}).get("momentum_buffer") if p is not None else None
        if buf is None:
            return None
        return (weight_matrix(m, buf) if is_weight else buf.detach()).float().cpu().numpy()

    return LayerSpec(name=name, kind=layer_kind(m), d_in=d_in, d_out=d_out, has_bias=b is not None,
                     weight_init=w, bias_init=b, extra=extra, weight_buffer_init=buffer(m.weight, True),
                     bias_buffer_init=buffer(bias_of(m), False), weight_shape=tuple(m.weight.shape),
                     weight_state=weight_state, bias_state=bias_state,
                     state_dtype="float64" if m.weight.dtype == torch.float64 else "float32")


def describe_optimizer(opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"name", "param_groups"}``: the optimizer's class and each group's scalar settings (JSON-able)."""
    out: dict[str, Any] = {"name": type(opt).__name__ if opt else None, "param_groups": []}
    if opt is None:
        return out

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):  # Adam's betas, Adafactor's eps
            return [plain(x) for x in v]
        if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool):
            return float(v)
        return v

    def kept(v: Any) -> bool:
        if isinstance(v, (tuple, list)):
            return all(x is None or kept(x) for x in v)
        return isinstance(v, (int, float, bool, str)) or (isinstance(v, torch.Tensor) and v.numel() == 1)

    for g in opt.param_groups:
        out["param_groups"].append({k: plain(v) for k, v in g.items() if k != "params" and kept(v)})
    return out
