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
from typing import Any, Callable, Iterator

import torch

#: The modes, from exact to loosest: IEEE float32, TF32 inputs, bfloat16 inputs.
MODES = ("ieee", "tf32", "bf16")


def _mode(backend: Any, legacy: Callable[[], str]) -> str:
    """A backend's float32 mode: ``fp32_precision`` (torch >= 2.9: ``"none"`` is the default, IEEE) or,
    on older torch, what ``legacy`` reads from the older flags."""
    value = getattr(backend, "fp32_precision", None)
    if value is None:
        return legacy()
    return "ieee" if value in ("none", "ieee") else str(value)


def loosest(modes: list[str]) -> str:
    """The least precise of ``modes`` (a mode this module does not know counts as the loosest: it only
    widens a tolerance)."""
    return max(modes, key=lambda m: MODES.index(m) if m in MODES else len(MODES))


def float32_mode(device_type: str, *, conv: bool = False) -> str:
    """The least precise way this process may multiply float32 matrices on ``device_type`` (``"cuda"`` or
    ``"cpu"``): for linear layers and, with ``conv``, for convolutions. One of :data:`MODES` (or a newer
    name torch reports)."""
    b = torch.backends
    if device_type == "cuda":
        modes = [_mode(b.cuda.matmul, lambda: "tf32" if b.cuda.matmul.allow_tf32 else "ieee")]
        if conv:
            modes.append(_mode(getattr(b.cudnn, "conv", None), lambda: "tf32" if b.cudnn.allow_tf32 else "ieee"))
    elif device_type == "cpu":
        mkldnn = getattr(b, "mkldnn", None)
        modes = [_mode(getattr(mkldnn, "matmul", None),
                       lambda: "bf16" if torch.get_float32_matmul_precision() == "medium" else "ieee")]
        if conv:
            modes.append(_mode(getattr(mkldnn, "conv", None), lambda: "ieee"))
    else:
        return "ieee"
    return loosest(modes)


@contextlib.contextmanager
def full_float32_products(device: torch.device, *, bf16_reduction: bool = True) -> Iterator[None]:
    """Inside: float32 matrix products on ``device`` in IEEE float32 (and, with ``bf16_reduction=False``
    on CUDA, bfloat16 products accumulated in float32). Settings are touched only where the user loosened
    them, and restored on the way out. They are process-wide: a product another thread runs meanwhile
    is made in full precision too."""
    restore: list[Callable[[], None]] = []
    b = torch.backends
    try:
        if device.type == "cuda":
            _tighten(b.cuda.matmul, "allow_tf32", restore)
            if not bf16_reduction and b.cuda.matmul.allow_bf16_reduced_precision_reduction:
                b.cuda.matmul.allow_bf16_reduced_precision_reduction = False
                restore.append(lambda: setattr(b.cuda.matmul, "allow_bf16_reduced_precision_reduction", True))
        elif device.type == "cpu":
            mkldnn = getattr(getattr(b, "mkldnn", None), "matmul", None)
            if getattr(mkldnn, "fp32_precision", None) is not None:
                _tighten(mkldnn, None, restore)
            elif torch.get_float32_matmul_precision() != "highest":  # torch < 2.9: the one global setting
                old = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision("highest")
                restore.append(lambda: torch.set_float32_matmul_precision(old))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _tighten(backend: Any, legacy_flag: str | None, restore: list[Callable[[], None]]) -> None:
    """Set ``backend`` to IEEE float32 if it is not, and note how to undo it."""
    old = getattr(backend, "fp32_precision", None)
    if old is not None:
        if old not in ("none", "ieee"):
            backend.fp32_precision = "ieee"
            restore.append(lambda: setattr(backend, "fp32_precision", old))
    elif legacy_flag is not None and getattr(backend, legacy_flag):
        setattr(backend, legacy_flag, False)
        restore.append(lambda: setattr(backend, legacy_flag, True))
