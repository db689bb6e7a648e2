"""The certificate as training goes: a random projection of each layer's weights, rebuilt from the rows.

For a fixed random ``Z`` ``(d_in, k)`` per layer, each step's rows give ``G_s Z = V^T (K Z)`` (a product of
``rows x d_in x k`` numbers, from the rows as they are handed to the store, in its row type: a fault inside the
store's own write is for the full re-read, ``lightning-dualform verify``), and the update rule's scalar
recurrence (``optim/sgd.py``) carries ``(W Z, buf Z)`` from the first recorded step to the last:

    W_T Z = a W_0 Z + b buf_0 Z + sum_s c_s (G_s Z)

At fit end ``||W_T Z - (W_T Z)_rebuilt|| / ||W_T Z||`` is the certificate, with no second pass over the
store. The bias, whose key is the constant 1, is carried whole. Each step the same products check the rows
against the gradient the optimizer used (``W.grad Z = f G_s Z``: the Freivalds test), which is what
:class:`~lightning_dualform.record.engine.RecordingEngine` does with them first.

What it proves, and how likely a miss is: for Gaussian ``Z`` with ``k`` columns and any error matrix ``E``
(the rebuilt weights minus the real ones), ``||E Z||_F^2`` is ``||E||_F^2`` times a weighted chi-square over
``k`` or more degrees of freedom divided by ``k`` (the worst case is a rank-one ``E``: exactly ``chi2_k / k``),
while ``||W Z||_F^2 / k`` concentrates at ``||W||_F^2``. So the sketched relative error falls below ``1/c`` of
the true one with probability at most ``(e^(1 - d) d)^(k/2)``, ``d = 1/c^2``: with ``k = 8``, 5e-7 for
``c = 10`` and 5e-23 for ``c = 1000``. A wrong row (a changed value, a wrong step coefficient) moves the
rebuilt weights by far more than float32 rounding, so the certificate misses it only with such
probabilities. ``lightning-dualform verify`` re-reads the whole store instead.

Where the compiled kernel is installed and one process writes float32 rows of ``nn.Linear``/``nn.Embedding``
layers from the CPU, the projections and the recurrence run on the store writer's thread, from the rows as it
is handed them (:meth:`SketchCertificate.after_rows`; one thread of C, float64 sums): the training thread then
does none of it (``docs/benchmarks.md``, "The certificate on the writer's thread").
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from lightning_dualform import _native
from lightning_dualform.optim.sgd import _step_matrix
from lightning_dualform.store.certificate import LayerCertificate

#: Columns of each layer's projection.
PROBES = 8
#: A layer whose first step's rows hold at most this many numbers (``rows x (d_in + d_out)``; 1 MiB of float32)
#: is projected on the writer's thread: torch's products of such small rows cost their fixed overheads (packing,
#: waking a second thread) more than their arithmetic. Larger layers keep torch's products on the training
#: thread, where two threads do them faster than the writer's one (``docs/benchmarks.md``).
WRITER_NUMBERS = 1 << 18
_SERIAL_NUMBERS = 1 << 15  # torch's grain size: an element-wise op on fewer numbers runs on the calling thread alone


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.project_keys.argtypes, lib.project_keys.restype = [i64, i64, p, p, p], None
    lib.accumulate_values.argtypes, lib.accumulate_values.restype = [i64, i64, p, p, p, p], None


def _kernel() -> ctypes.CDLL | None:
    """The compiled projections (``_kernels/fused.c``: ``project_keys``, ``accumulate_values``), or None."""
    return _native.load("fused", _declare)


def project_host_rows(keys: np.ndarray, values: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(V^T (K Z), sum v)`` in float64 from float32 host rows (one thread of C, the GIL released): ``keys``
    ``(n, d_in)``, or an embedding's token ids ``(n, 1)`` (then ``K Z`` is ``Z[token]``); ``z`` ``(d_in, 8)``."""
    lib = _kernel()
    assert lib is not None and z.shape[1] == PROBES
    z, values = np.ascontiguousarray(z, dtype=np.float32), np.ascontiguousarray(values, dtype=np.float32)
    n, d_out = values.shape
    if keys.dtype.kind in "iu":  # an embedding: the one-hot key picks a row of Z
        a = z[keys[:, 0]]  # (a new, contiguous array)
    else:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        a = np.empty((n, PROBES), dtype=np.float32)
        lib.project_keys(n, keys.shape[1], keys.ctypes.data, z.ctypes.data, a.ctypes.data)
    gz, gb = np.zeros((d_out, PROBES)), np.zeros(d_out)
    lib.accumulate_values(n, d_out, values.ctypes.data, a.ctypes.data, gz.ctypes.data, gb.ctypes.data)
    return gz, gb


@dataclass
class LayerSketch:
    """The projected state ``(W Z, buf Z)`` and bias ``(b, buf_b)`` of one layer, in float64 on its device."""

    z: torch.Tensor  # (d_in, k), float32 (the rows are multiplied by it)
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
    _host_z: dict[str, np.ndarray] = field(default_factory=dict)  # each Z as float32 numpy (the writer's side)
    _on_writer: dict[str, bool] = field(default_factory=dict)  # where each layer's projections run, for the run
    method = "sketch"
    needs_projections = True  # each step's G_s Z (record/gradient_check.project_rows)

    @staticmethod
    def probes(name: str, d_in: int, device: torch.device, k: int = PROBES) -> torch.Tensor:
        """The layer's ``Z``: Gaussian, the same for a layer name in every process and every resume."""
        gen = torch.Generator().manual_seed(layer_seed(name))
        return torch.randn(d_in, k, generator=gen, dtype=torch.float32).to(device)  # (whatever the default dtype)

    @classmethod
    def for_run(cls, modules: dict[str, torch.nn.Module], probes: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer, resume: dict[str, Any] | None) -> "SketchCertificate | None":
        """The projections of a run of ``torch.optim.SGD`` from its first recorded step (the weights and the
        momentum buffers then), or from those a checkpoint saved (``resume["sketch"]``); None where a resume's
        checkpoint holds none for these layers (one from before they existed: certified at the end instead)."""
        from lightning_dualform.layers import weight_matrix

        saved = (resume or {}).get("sketch")
        if resume is not None and (not isinstance(saved, dict) or set(saved) != set(modules)):
            return None
        sketch = cls()
        state = optimizer.state
        for name, m in modules.items():
            w, b = m.weight, getattr(m, "bias", None)
            buf = state.get(w, {}).get("momentum_buffer")
            bbuf = state.get(b, {}).get("momentum_buffer") if b is not None else None
            sketch.start(name, probes[name], weight_matrix(m).float(),
                         weight_matrix(m, buf).float() if buf is not None else None,
                         b.detach().float() if b is not None else None,
                         bbuf.detach().float() if bbuf is not None else None,
                         resumed=saved[name] if saved is not None else None)
        return sketch

    def start(self, name: str, z: torch.Tensor, w0: torch.Tensor, buf0: torch.Tensor | None, b0: torch.Tensor | None,
              bbuf0: torch.Tensor | None, resumed: dict[str, Any] | None = None) -> None:
        """Begin a layer's projection at the store's first step (``w0`` ``(d_out, d_in)``...), or continue the
        one a checkpoint saved (``resumed``: :meth:`LayerSketch.state_dict`)."""
        dev = z.device
        f64 = dict(device=dev, dtype=torch.float64)
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

    def step(self, name: str, gz: torch.Tensor | None, gb: torch.Tensor | None, grad_scale: float, w_up: Any,
             b_up: Any | None) -> None:
        """Apply one recorded step: ``gz`` ``(d_out, k)`` = the rows' ``V^T (K Z)`` (summed over ranks), ``gb``
        ``(d_out,)`` = their ``sum v``; ``w_up``/``b_up`` the step's table rows (``optim.sgd.PARAM_COLUMNS``)."""
        s = self.layers[name]
        s.steps += 1
        s.p, s.buf = _apply(w_up, s.p, s.buf, gz, grad_scale)
        if s.bias is not None and b_up is not None:
            s.bias, s.bias_buf = _apply(b_up, s.bias, s.bias_buf, gb, grad_scale)

    def take_step(self, name: str, projections: tuple[torch.Tensor, torch.Tensor] | None, rows: Any,
                  grad_scale: float, w_up: Any, b_up: Any | None) -> None:
        """:meth:`step` from the step's projections ``(G Z, sum v)`` (None: no rows this step)."""
        gz, gb = projections if projections is not None else (None, None)
        self.step(name, gz, gb, grad_scale, w_up, b_up)

    def place_on_writer(self, modules: dict[str, torch.nn.Module], row_dtype: str, world_size: int) -> None:
        """Let the projections run on the writer's thread (:meth:`after_rows`) where they can: the kernel is
        installed, one process writes float32 rows of linear layers and embeddings from the CPU."""
        if row_dtype != "float32" or world_size != 1 or _kernel() is None:
            return
        if not all(type(m) in (torch.nn.Linear, torch.nn.Embedding) and m.weight.device.type == "cpu"
                   for m in modules.values()):
            return
        self._host_z = {name: s.z.cpu().numpy() for name, s in self.layers.items()}

    @property
    def on_writer(self) -> bool:
        """Whether :meth:`place_on_writer` let the writer's thread make the projections (of layers small enough:
        :meth:`writer_layers`)."""
        return bool(self._host_z)

    def writer_layers(self, rows: dict[str, tuple]) -> set[str]:
        """The layers whose projections the writer's thread makes (:meth:`after_rows`; only where
        :meth:`place_on_writer` allowed it): each placed at its first step with rows (``(keys, values, ...)``) by :data:`WRITER_NUMBERS`,
        and kept there for the run (a layer's steps must reach its recurrence in order)."""
        for name, (keys, values, *_) in rows.items():
            if name in self._host_z and name not in self._on_writer:
                # (and a state torch updates on one thread: a wider one would start an OpenMP team on the writer's)
                self._on_writer[name] = (keys.shape[0] * (keys.shape[-1] + values.shape[-1]) <= WRITER_NUMBERS
                                         and values.shape[-1] * PROBES <= _SERIAL_NUMBERS)
        return {name for name, yes in self._on_writer.items() if yes}

    def after_rows(self, make_rows: Callable[[], dict[str, Any]],
                   updates: dict[str, tuple[float, Any, Any | None]]) -> Callable[[], dict[str, Any]]:
        """``make_rows`` (run on the writer thread) followed by the projections of the rows it made and the
        recurrence (:meth:`step`) of the layers in ``updates``, there: steps arrive in order, and the engine reads
        the state only after the writer has handled every step before (a commit, or the finish's drain)."""
        def run() -> dict[str, Any]:
            rows = make_rows()
            for name, (scale, w_up, b_up) in updates.items():
                if name in self.layers:
                    r = rows.get(name)
                    gz, gb = project_host_rows(r.keys, r.values, self._host_z[name]) if r is not None else (None, None)
                    self.step(name, None if gz is None else torch.from_numpy(gz),
                              None if gb is None else torch.from_numpy(gb), scale, w_up, b_up)
            return rows
        return run

    def width(self, name: str) -> int:
        """The projection's columns (the certificate's ``probes``)."""
        return int(self.layers[name].z.shape[1])

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
        return {name: s.state_dict() for name, s in self.layers.items()}


def fit_certificates(sketch: Any, layers: set[str], finals: dict[str, tuple[np.ndarray, np.ndarray | None]],
                     inexact: dict[str, str], tol: float) -> dict[str, LayerCertificate] | None:
    """Each layer's certificate from the projections (or row replay) ``sketch`` carried through training against
    its final weights ``finals`` ``(W, b)``; None where there is none for every tracked layer."""
    if sketch is None or set(sketch.layers) != layers:
        return None
    out: dict[str, LayerCertificate] = {}
    for name, (w, b) in finals.items():
        res = sketch.result(name, torch.from_numpy(w), torch.from_numpy(b) if b is not None else None)
        out[name] = LayerCertificate.measured(res["rel_err_weight"], res["rel_err_bias"], tol, exact_run=name not in
                                              inexact, method=sketch.method, probes=sketch.width(name))
    return out


def layer_seed(name: str) -> int:
    """A layer's random seed: the same for a layer name in every process and every resume."""
    return sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2**31)


def _field(up: Any, name: str) -> Any:
    return up[name] if isinstance(up, dict) else getattr(up, name)


def _apply(up: Any, p: torch.Tensor, buf: torch.Tensor, g: torch.Tensor | None, grad_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, buf) <- M (p, buf) + b (grad_scale g)`` of one SGD step (identity when the step was not applied)."""
    if not bool(_field(up, "applied")):
        return p, buf
    (m00, m01), (m10, m11), (b0, b1) = _step_coefficients(
        float(_field(up, "lr")), float(_field(up, "momentum")), float(_field(up, "dampening")),
        float(_field(up, "weight_decay")), bool(_field(up, "nesterov")), bool(_field(up, "maximize")),
        bool(_field(up, "fresh_buffer")))
    # a few fused float64 ops per step and layer (this runs on the training thread every step)
    new_p = p * m00
    new_buf = buf * m11
    if m01:
        new_p.add_(buf, alpha=m01)
    if m10:
        new_buf.add_(p, alpha=m10)
    if g is not None:
        g64 = g.to(p.dtype)
        if b0:
            new_p.add_(g64, alpha=b0 * grad_scale)
        if b1:
            new_buf.add_(g64, alpha=b1 * grad_scale)
    return new_p, new_buf


@functools.lru_cache(maxsize=64)
def _step_coefficients(lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                       maximize: bool, fresh: bool) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """:func:`~lightning_dualform.optim.sgd._step_matrix` as plain floats, once per distinct setting."""
    m, b = _step_matrix(lr, momentum, dampening, weight_decay, nesterov, maximize, fresh)
    return (float(m[0, 0]), float(m[0, 1])), (float(m[1, 0]), float(m[1, 1])), (float(b[0]), float(b[1]))


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(err))
    return num / denom if denom > 0 else num
