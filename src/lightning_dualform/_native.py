"""The optional compiled kernels: plain C shared libraries built at install time (``setup.py``), loaded with
``ctypes``.

The library's hot loops (the attention bookkeeping in :mod:`.attend._fused`, the certificate's projections
in :mod:`.record.sketch`, the chunk checksum in :mod:`.store._fletcher`) are plain C without Python or torch
headers. ``pip install`` builds them next to the package (``lightning_dualform/_kernels/``) where a C compiler
is present; they are never compiled at run time. ``ctypes`` releases the GIL during calls. Without them, or
with ``LIGHTNING_DUALFORM_KERNEL=0``, :func:`load` returns ``None`` and callers use their torch or h5py paths,
which give the same answers (``tests/test_attention.py``, ``tests/test_inference.py``,
``tests/test_chunk_append.py``, ``tests/test_recorder.py``).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
import threading
from typing import Callable

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_usable: dict[tuple[str, str, str], bool] = {}  # (library, declare's module, declare's name): declared and usable
_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kernels")


def enabled() -> bool:
    """False when ``LIGHTNING_DUALFORM_KERNEL`` switches the compiled code off."""
    return os.environ.get("LIGHTNING_DUALFORM_KERNEL", "1").lower() not in ("0", "false", "no", "off")


def path(name: str) -> str | None:
    """The installed library ``name`` (``lightning_dualform/_kernels/<name>.<platform suffix>``), or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(_DIR, name + suffix)
        if os.path.isfile(candidate):
            return candidate
    return None


def load(name: str, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """The compiled library ``name`` (loaded once per process), or ``None`` when it was not built, is off, or
    lacks a function this caller's ``declare`` sets.

    ``declare`` sets the functions' ``argtypes``/``restype``; each caller's runs once (two modules may use
    different functions of one library, and a library built by an older version may have only some of them).
    """
    key = (name, getattr(declare, "__module__", ""), getattr(declare, "__qualname__", repr(declare)))
    if key in _usable:
        return _loaded[name] if _usable[key] else None
    with _lock:
        if name not in _loaded:
            lib = None
            found = path(name) if enabled() else None
            if found is not None:
                try:
                    lib = ctypes.CDLL(found)
                except OSError as err:
                    log.info("compiled kernel %s unusable (%s): the torch/h5py path is used", found, err)
            elif enabled():
                log.info(
                    "compiled kernel %s not installed (no C compiler at install time): the torch/h5py path is used",
                    name,
                )
            _loaded[name] = lib
        if key not in _usable:
            lib = _loaded[name]
            ok = lib is not None
            if lib is not None:
                try:
                    declare(lib)
                except AttributeError as err:  # (built from an older source: the torch/h5py path is used)
                    log.info("compiled kernel %s lacks a function (%s): the torch/h5py path is used", name, err)
                    ok = False
            _usable[key] = ok
    return _loaded[name] if _usable[key] else None
