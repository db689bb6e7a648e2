"""Tracked weights changed between optimizer steps, outside the optimizer.

The rows rebuild what the optimizer did with their gradients; a weight edited in place between two steps (a norm
constraint after ``step()``, a callback re-initialising units, a clamp) is a change no row explains. SGD's
certificate projects every row of the weights and sees it at fit end; an element-wise rule's replays a few rows
(``record/row_replay.py``) and misses it on the others. So under such a rule each tracked weight is watched:
after every step its version counter (``_compat.tensor_version``: an in-place edit moves it), its storage (``p.data =
new`` replaces it) and a fingerprint ``W z`` (one product with a fixed random vector); before the next step, after
the step's closure where it has one (Lightning's runs ``training_step``, the backward and every hook before the
update, inside ``step()``), and at fit end, a weight whose counter or storage moved is compared by fingerprint (a
copy written back unchanged, such as an EMA swap around validation, is no change).

What it cannot see: an edit by a step post-hook registered before the recording's.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lightning_dualform._compat import tensor_version
from lightning_dualform.layers import weight_matrix
from lightning_dualform.record.sketch import layer_seed


class WeightWatch:
    """The watched layers' weights after the last optimizer step: versions and fingerprints."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._z: dict[str, torch.Tensor] = {}
        self._seen: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    def _params(self, module: nn.Module) -> list[torch.Tensor]:
        return [p for p in (module.weight, getattr(module, "bias", None)) if isinstance(p, torch.Tensor)]

    def _stamp(self, module: nn.Module) -> tuple[int, ...]:
        """Each parameter's version counter and storage (``p.data = new`` replaces the storage, not the counter)."""
        return tuple(x for p in self._params(module) for x in (tensor_version(p), p.data_ptr()))

    def _fingerprint(self, name: str, module: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            w = weight_matrix(module).float()
            z = self._z.get(name)
            if z is None or z.device != w.device:
                gen = torch.Generator().manual_seed(layer_seed(name))
                z = self._z[name] = torch.randn(w.shape[1], generator=gen, dtype=torch.float32).to(w.device)
            b = getattr(module, "bias", None)
            fp = w @ z
            return torch.cat([fp, b.detach().float().reshape(-1)]) if isinstance(b, torch.Tensor) else fp

    def after_step(self) -> None:
        """Remember every watched weight as the optimizer left it."""
        for name, m in self.modules.items():
            self._seen[name] = (self._stamp(m), self._fingerprint(name, m))

    def changed(self) -> list[str]:
        """The layers whose weights changed since :meth:`after_step` (none before the first step)."""
        out = []
        for name, m in self.modules.items():
            seen = self._seen.get(name)
            if seen is None or self._stamp(m) == seen[0]:
                continue
            if not torch.equal(self._fingerprint(name, m), seen[1]):
                out.append(name)
        return out


def checked_closure(args: tuple, kwargs: dict, check: Callable[[], None]) -> tuple[tuple, dict] | None:
    """An optimizer step pre-hook's answer that runs ``check`` after the step's closure, just before the update
    (Lightning passes ``step(closure=...)``; its closure runs ``training_step``, the backward and the hooks before
    the optimizer step); None where the step has no closure (nothing to change)."""
    closure = kwargs.get("closure") if kwargs else None
    if closure is None and args:
        closure, rest = args[0], args[1:]
        if callable(closure):
            return (_then(closure, check), *rest), kwargs
        return None
    if not callable(closure):
        return None
    return args, {**kwargs, "closure": _then(closure, check)}


def _then(closure: Callable[[], Any], check: Callable[[], None]) -> Callable[[], Any]:
    def run() -> Any:
        out = closure()
        check()
        return out

    return run
