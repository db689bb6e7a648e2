"""Checks of integer arguments that size or index something, shared by every public entry point.

An argument that counts or indexes (``at_step``, ``top_k``, ``step_buckets``, a unit number) must be an
integer: Python's, numpy's (``np.int64(5)``), or anything else that implements ``__index__``. A bool
(``True`` is 1 to Python), a float (``100.7`` would be truncated), or a string is refused with a
``TypeError`` that names the call and the value; a value out of range with a ``ValueError``.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np


def as_int(value: Any, call: str, *, lo: int | None = None, hi: int | None = None, allowed: str = "") -> int:
    """``value`` as an ``int`` within ``[lo, hi]``.

    Args:
        value: the argument.
        call: how the user wrote the call, e.g. ``"attend(top_k=...)"``: quoted in errors.
        lo, hi: inclusive bounds (None: unbounded).
        allowed: what to say is allowed, when more than "an integer" (e.g. "None or an integer").

    Raises:
        TypeError: not an integer (a bool, float, string ...).
        ValueError: outside ``[lo, hi]``.
    """
    if isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) in (np.bool_, "bool") \
            or str(getattr(value, "dtype", "")) == "torch.bool":
        raise TypeError(f"`{call}` got {value!r}, a bool; expected {allowed or 'an integer'}.")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"`{call}` got {value!r} ({type(value).__name__}); expected {allowed or 'an integer'}."
        ) from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise ValueError(f"`{call}` got {v}; expected {allowed or 'an integer'} in {span}.")
    return v
