"""The certificate as training goes: a random projection of each layer's weights, rebuilt from the rows.

For a fixed random ``Z`` ``(d_in, k)`` per layer, each step's rows give ``G_s Z = V^T (K Z)`` (a product of
``rows x d_in x k`` numbers, from the rows exactly as they are stored), and the update rule's scalar
recurrence (``optim/sgd.py``) carries ``(W Z, buf Z)`` from the first recorded step to the last:

    W_T Z = a W_0 Z + b buf_0 Z + sum_s c_s (G_s Z)

At fit end ``||W_T Z - (W_T Z)_rebuilt|| / ||W_T Z||`` is the certificate, with no second pass over the
store. The projections and the recurrence run on the writer thread (:meth:`SketchCertificate.advance`), from
the host rows it is about to store, so training never waits for them. Under DDP each rank carries its own rows'
part: the recurrence is linear in ``(W_0 Z, buf_0 Z)`` and in the steps' ``G_s Z``, so rank 0 starts from the
weights and every other rank from zeros, and one all-reduce at fit end (:meth:`SketchCertificate.all_reduce`)
gives every rank the projection of all the rows, where an all-reduce per step did before. The bias, whose key
is the constant 1, is carried whole. The same products of the rows as captured check them against the gradient
the optimizer used (``W.grad Z = f G_s Z``: the Freivalds test, ``record/gradient_check.py``) on the training
thread, on the steps the check samples.

What it proves, and how likely a miss is: for Gaussian ``Z`` with ``k`` columns and any error matrix ``E``
(the rebuilt weights minus the real ones), ``||E Z||_F^2`` is ``||E||_F^2`` times a weighted chi-square over
``k`` or more degrees of freedom divided by ``k`` (the worst case is a rank-one ``E``: exactly ``chi2_k / k``),
while ``||W Z||_F^2 / k`` concentrates at ``||W||_F^2``. So the sketched relative error falls below ``1/c`` of
the true one with probability at most ``(e^(1 - d) d)^(k/2)``, ``d = 1/c^2``: with ``k = 8``, 5e-7 for
``c = 10`` and 5e-23 for ``c = 1000``. A wrong row (a changed value, a wrong step coefficient) moves the
rebuilt weights by far more than float32 rounding, so the certificate misses it only with such
probabilities. ``lightning-dualform verify`` re-reads the whole store instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lightning_dualform.optim.sgd import _step_matrix
from lightning_dualform.record import gradient_check
from lightning_dualform.store.conv import ConvGeometry

#: Columns of each layer's projection.
PROBES = 8


@dataclass
class LayerSketch:
    """The projected state ``(W Z, buf Z)`` and bias ``(b, buf_b)`` of one layer, in float64 on the host (under
    DDP: this rank's part of it, see the module docstring)."""

    z: torch.Tensor  # (d_in, k), float32 on the host (the host rows are multiplied by it)
    p: torch.Tensor  # (d_out, k) W Z
    buf: torch.Tensor  # (d_out, k) momentum buffer Z (zeros until one exists)
    bias: torch.Tensor | None = None  # (d_out,)
    bias_buf: torch.Tensor | None = None
    steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain lists (a checkpoint holds it): enough to continue the projection after a resume."""
        out = {"p": self.p.cpu().tolist(), "buf": self.buf.cpu().tolist(), "steps": self.steps}
        if self.bias is not None:
            out.update(bias=self.bias.cpu().tolist(), bias_buf=self.bias_buf.cpu().tolist())
        return out


@dataclass
class SketchCertificate:
    """Every tracked layer's :class:`LayerSketch`; see the module docstring."""

    layers: dict[str, LayerSketch] = field(default_factory=dict)

    @staticmethod
    def probes(name: str, d_in: int, device: torch.device, k: int = PROBES) -> torch.Tensor:
        """The layer's ``Z``: Gaussian, the same for a layer name in every process and every resume."""
        seed = sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(d_in, k, generator=gen).to(device)

    #: the modules (their kind: an embedding's keys are token ids) and convolutions' geometry, for the projections
    modules: dict[str, nn.Module] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @classmethod
    def for_run(cls, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, resume: dict[str, Any] | None,
                *, rank: int = 0, world_size: int = 1) -> "SketchCertificate | None":
        """The projections of a run of ``torch.optim.SGD`` from its first recorded step (the weights and the
        momentum buffers then; zeros on ranks other than 0), or from those a checkpoint of this rank saved
        (``resume["sketch"]``: :meth:`state_dict`); None where a resume's checkpoint holds none for these layers
        (one from before they existed, or another rank's: certified at the end instead)."""
        from lightning_dualform.layers import layer_shape, weight_matrix

        saved = _saved_layers((resume or {}).get("sketch"), rank, world_size)
        if resume is not None and (saved is None or set(saved) != set(modules)):
            return None
        sketch = cls(modules=dict(modules), rank=rank, world_size=world_size)
        state = optimizer.state
        for name, m in modules.items():
            z = cls.probes(name, layer_shape(m)[0], torch.device("cpu"))
            if saved is not None:
                sketch.start(name, z, None, None, None, None, resumed=saved[name])
                continue
            w, b = m.weight, getattr(m, "bias", None)
            buf = state.get(w, {}).get("momentum_buffer")
            bbuf = state.get(b, {}).get("momentum_buffer") if b is not None else None
            host = (lambda t: None if t is None else t.detach().float().cpu()) if rank == 0 else (
                lambda t: None if t is None else torch.zeros(t.shape))  # the other ranks carry only their rows
            sketch.start(name, z, host(weight_matrix(m)), host(weight_matrix(m, buf) if buf is not None else None),
                         host(b), host(bbuf))
        return sketch

    def start(self, name: str, z: torch.Tensor, w0: torch.Tensor | None, buf0: torch.Tensor | None,
              b0: torch.Tensor | None, bbuf0: torch.Tensor | None, resumed: dict[str, Any] | None = None) -> None:
        """Begin a layer's projection at the store's first step (``w0`` ``(d_out, d_in)``...), or continue the
        one a checkpoint saved (``resumed``: :meth:`LayerSketch.state_dict`)."""
        f64 = dict(device=z.device, dtype=torch.float64)
        if resumed is not None:
            s = LayerSketch(z=z, p=torch.tensor(resumed["p"], **f64), buf=torch.tensor(resumed["buf"], **f64),
                            steps=int(resumed.get("steps", 0)))
            if "bias" in resumed:
                s.bias, s.bias_buf = torch.tensor(resumed["bias"], **f64), torch.tensor(resumed["bias_buf"], **f64)
        else:
            p = w0.to(**f64) @ z.double()
            buf = buf0.to(**f64) @ z.double() if buf0 is not None else torch.zeros_like(p)
            s = LayerSketch(z=z, p=p, buf=buf)
            if b0 is not None:
                s.bias = b0.to(**f64)
                s.bias_buf = bbuf0.to(**f64) if bbuf0 is not None else torch.zeros_like(s.bias)
        self.layers[name] = s

    def advance(self, rows: dict[str, tuple], updates: dict[str, tuple[float, Any, Any]], *,
                geometry: dict[str, ConvGeometry], stored_dtype: str,
                known: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Apply one recorded step to every layer (on the writer thread): project this rank's host rows
        ``rows[name] = (keys, values, ...)`` as :func:`~lightning_dualform.record.rows.gather_rows` stored them in
        ``stored_dtype``, and carry the recurrence with ``updates[name] = (grad_scale, weight_row, bias_row)``.
        ``known`` holds projections already made of exactly these rows (the gradient check's, float32 rows on
        one process), which are not made again."""
        todo = {n: m for n, m in self.modules.items()
                if n in self.layers and n in updates and not (known and n in known)}
        made = gradient_check.project_rows({n: r for n, r in rows.items() if n in todo}, todo,
                                           {n: self.layers[n].z for n in todo}, geometry,
                                           stored_dtype=stored_dtype, all_reduce=_local) if todo else {}
        for name, (scale, w_up, b_up) in updates.items():
            if name not in self.layers:
                continue
            gz, gb = made[name] if name in made else known[name]
            self.step(name, gz, gb, scale, w_up, b_up)

    def all_reduce(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum every rank's part (the projected weights and biases; the buffers are not needed at the end) into
        the projection of all the rows, on every rank: one collective for all layers."""
        if self.world_size <= 1:
            return
        names = sorted(self.layers)
        parts = [t.reshape(-1) for n in names for t in (self.layers[n].p, self.layers[n].bias) if t is not None]
        flat = all_reduce(torch.cat(parts))
        i = 0
        for n in names:
            s = self.layers[n]
            s.p = flat[i : i + s.p.numel()].reshape(s.p.shape)
            i += s.p.numel()
            if s.bias is not None:
                s.bias = flat[i : i + s.bias.numel()]
                i += s.bias.numel()
        self.world_size = 1  # (the parts are summed: no second reduction)

    def step(self, name: str, gz: torch.Tensor | None, gb: torch.Tensor | None, grad_scale: float, w_up: Any,
             b_up: Any | None) -> None:
        """Apply one recorded step: ``gz`` ``(d_out, k)`` = the rows' ``V^T (K Z)`` (summed over ranks), ``gb``
        ``(d_out,)`` = their ``sum v``; ``w_up``/``b_up`` the step's table rows (``optim.sgd.PARAM_COLUMNS``)."""
        s = self.layers[name]
        s.steps += 1
        s.p, s.buf = _apply(w_up, s.p, s.buf, gz, grad_scale)
        if s.bias is not None and b_up is not None:
            s.bias, s.bias_buf = _apply(b_up, s.bias, s.bias_buf, gb, grad_scale)

    def result(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict[str, float]:
        """``rel_err_weight`` of the projection against the final ``weight`` ``(d_out, d_in)``, ``rel_err_bias``."""
        s = self.layers[name]
        real = weight.to(s.p.device, torch.float64) @ s.z.double()
        err_w = _rel(s.p - real, real)
        err_b = 0.0
        if s.bias is not None and bias is not None:
            b = bias.to(s.bias.device, torch.float64)
            err_b = _rel(s.bias - b, b)
        return {"rel_err_weight": err_w, "rel_err_bias": err_b, "rel_err": max(err_w, err_b)}

    def state_dict(self) -> dict[str, Any]:
        """This rank's part of the projections (a checkpoint of this rank continues it)."""
        return {"rank": self.rank, "world_size": self.world_size,
                "layers": {name: s.state_dict() for name, s in self.layers.items()}}


def _saved_layers(saved: Any, rank: int, world_size: int) -> dict[str, Any] | None:
    """The per-layer states a checkpoint saved for this rank, or None where it saved none for it. A checkpoint
    from before the parts were per rank holds the projection of all the rows (every rank had the same): rank 0
    continues it, the others start from zeros."""
    if not isinstance(saved, dict):
        return None
    if "layers" not in saved:  # the older layout: {layer: state}, all-reduced every step
        if rank == 0:
            return saved
        return {n: _zeroed(s) for n, s in saved.items()} if all(isinstance(s, dict) for s in saved.values()) else None
    if saved.get("rank") != rank or saved.get("world_size") != world_size or not isinstance(saved["layers"], dict):
        return None
    return saved["layers"]


def _zeroed(state: dict[str, Any]) -> dict[str, Any]:
    zero = lambda v: torch.zeros_like(torch.tensor(v, dtype=torch.float64)).tolist()  # noqa: E731
    return {k: (zero(v) if k != "steps" else v) for k, v in state.items()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t  # this rank's rows only: the parts are summed once, at the end


def _field(up: Any, name: str) -> Any:
    return up[name] if isinstance(up, dict) else getattr(up, name)


def _apply(up: Any, p: torch.Tensor, buf: torch.Tensor, g: torch.Tensor | None,
           grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, buf) <- M (p, buf) + b (grad_scale g)`` of one SGD step (identity when the step was not applied)."""
    if not bool(_field(up, "applied")):
        return p, buf
    m, b = _step_matrix(float(_field(up, "lr")), float(_field(up, "momentum")), float(_field(up, "dampening")),
                        float(_field(up, "weight_decay")), bool(_field(up, "nesterov")), bool(_field(up, "maximize")),
                        bool(_field(up, "fresh_buffer")))
    g = torch.zeros_like(p) if g is None else g.to(p.dtype) * grad_scale
    return m[0, 0] * p + m[0, 1] * buf + b[0] * g, m[1, 0] * p + m[1, 1] * buf + b[1] * g


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(err))
    return num / denom if denom > 0 else num
