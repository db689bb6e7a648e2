"""How this process multiplies float32 matrices, and a context in which it does so in full float32.

PyTorch trades float32 precision for speed when asked: ``torch.set_float32_matmul_precision("high")``
lets CUDA multiply in TF32 (10 mantissa bits), ``"medium"`` lets oneDNN on CPUs with AMX multiply in
bfloat16 (8 bits), and cuDNN convolutions use TF32 by default on GPUs that have it. A layer trained so
gets each step's weight gradient from a rounded product, which no sum of outer products reproduces: the
memory rebuilds it only to about that rounding, so the callback records the mode and the certificate's
tolerance follows it. Our own products (attention, rebuilt outputs) must not round so, whatever the user
chose for training: :func:`full_float32_products` turns it off around them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # imported where a product is made: a store's reader needs only loosest()
    import torch

#: The modes, from exact to loosest: IEEE float32, TF32 inputs, bfloat16 inputs.
MODES = ("ieee", "tf32", "bf16")


def loosest(modes: list[str]) -> str:
    """The least precise of ``modes`` (a mode this module does not know counts as the loosest: it only
    widens a tolerance)."""
    return max(modes, key=lambda m: MODES.index(m) if m in MODES else len(MODES))


def _allowed(backend: Any, legacy: Callable[[], str]) -> str:
    """The rounding a backend is allowed: ``fp32_precision`` (torch >= 2.9; ``"none"`` is the default,
    IEEE) or, on older torch, what ``legacy`` reads from the older flags."""
    value = getattr(backend, "fp32_precision", None)
    if value is None:
        return legacy()
    return "ieee" if value in ("none", "ieee") else str(value)


def _rounds(device: torch.device, conv: bool) -> bool:
    """Whether one float32 product (a matmul, or a convolution) on ``device`` actually rounds: the flags
    only allow it (there is no TF32 on CPUs or on GPUs before Ampere, no bfloat16 path without AMX)."""
    import torch
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(0)
    if conv:
        a, w = torch.randn(8, 32, 16, 16, generator=g), torch.randn(64, 32, 3, 3, generator=g)
        ref = F.conv2d(a.double(), w.double())
        out = F.conv2d(a.to(device), w.to(device)).cpu().double()
    else:  # large enough for oneDNN to take its bfloat16 path under "medium" (small products stay exact)
        a, w = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
        ref = a.double() @ w.double().t()
        out = F.linear(a.to(device), w.to(device)).cpu().double()  # what nn.Linear multiplies with
    return float((out - ref).norm() / ref.norm()) > 1e-5


def float32_mode(device: torch.device | str, *, conv: bool = False) -> str:
    """How this process rounds float32 products on ``device``, for linear layers and, with ``conv``, for
    convolutions: one of :data:`MODES` (or a newer name torch reports), the loosest of the two. A mode the
    flags allow counts only if a probe product on ``device`` shows the rounding."""
    import torch

    device = torch.device(device)
    b = torch.backends
    if device.type == "cuda":
        kinds = [(False, _allowed(b.cuda.matmul, lambda: "tf32" if b.cuda.matmul.allow_tf32 else "ieee"))]
        if conv:
            kinds.append((True, _allowed(getattr(b.cudnn, "conv", None), lambda: "tf32" if b.cudnn.allow_tf32 else "ieee")))
    elif device.type == "cpu":
        mkldnn = getattr(b, "mkldnn", None)
        kinds = [(False, _allowed(getattr(mkldnn, "matmul", None),
                                  lambda: "bf16" if torch.get_float32_matmul_precision() == "medium" else "ieee"))]
        if conv:
            kinds.append((True, _allowed(getattr(mkldnn, "conv", None), lambda: "ieee")))
    else:
        return "ieee"
    return loosest([mode for is_conv, mode in kinds if mode != "ieee" and _rounds(device, is_conv)] or ["ieee"])


# The settings are process-wide: the first context to enter tightens them, the last to leave restores
# them, so that one thread leaving cannot loosen them under another that is still multiplying.
_lock = threading.Lock()
_depth = 0
_undo: list[Callable[[], None]] = []


@contextlib.contextmanager
def full_float32_products() -> Iterator[None]:
    """Inside: float32 matrix products in IEEE float32 on every device, and bfloat16 products on CUDA
    accumulated in float32. Settings are touched only where the user loosened them, and restored on the
    way out (also when the body raises). They are process-wide: products other threads run meanwhile
    are made in full precision too."""
    global _depth, _undo
    with _lock:
        if _depth == 0:
            undo: list[Callable[[], None]] = []
            try:
                _tighten(undo)
            except BaseException:
                _run(undo)
                raise
            _undo = undo
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                undo, _undo = _undo, []
                _run(undo)


def _tighten(undo: list[Callable[[], None]]) -> None:
    import torch

    b = torch.backends
    if getattr(b.cuda.matmul, "fp32_precision", None) is not None:  # torch >= 2.9
        _tighten_backend(b.cuda.matmul, undo)
        mkldnn = getattr(getattr(b, "mkldnn", None), "matmul", None)
        if getattr(mkldnn, "fp32_precision", None) is not None:
            _tighten_backend(mkldnn, undo)
    elif torch.get_float32_matmul_precision() != "highest":
        # older torch: one global setting behind both cuBLAS's TF32 flag and oneDNN's bfloat16 path
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        undo.append(lambda: torch.set_float32_matmul_precision(old))
    if b.cuda.matmul.allow_bf16_reduced_precision_reduction:  # attention.bf16_score_bound needs float32 sums
        b.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        undo.append(lambda: setattr(b.cuda.matmul, "allow_bf16_reduced_precision_reduction", True))


def _tighten_backend(backend: Any, undo: list[Callable[[], None]]) -> None:
    """Set ``backend.fp32_precision`` to IEEE if it is not, and note how to undo it. The attribute reads
    the value in effect, which may be inherited from a parent backend: the undo lets the backend inherit
    again and sets the old value only if inheriting does not give it back."""
    old = backend.fp32_precision
    if old in ("none", "ieee"):
        return
    backend.fp32_precision = "ieee"

    def restore() -> None:
        backend.fp32_precision = "none"
        if backend.fp32_precision != old:
            backend.fp32_precision = old

    undo.append(restore)


def _run(undo: list[Callable[[], None]]) -> None:
    """Run every undo, last first, even when one raises (the first error is raised after)."""
    error: BaseException | None = None
    for fn in reversed(undo):
        try:
            fn()
        except BaseException as err:  # noqa: PERF203
            error = error or err
    if error is not None:
        raise error
