"""The optional compiled kernels: plain C shared libraries built at install time (``setup.py``), loaded with
``ctypes``.

The library's hot loops (the attention bookkeeping in :mod:`.attend._fused`, the chunk checksum in
:mod:`.store._fletcher`) are plain C without Python or torch headers. ``pip install`` builds them next to
the package (``lightning_dualform/_kernels/``) where a C compiler is present; they are never compiled at run
time. ``ctypes`` releases the GIL during calls. Without them, or with ``LIGHTNING_DUALFORM_KERNEL=0``,
:func:`load` returns ``None`` and callers use their torch or h5py paths, which give the same answers
(``tests/test_attention.py``, ``tests/test_inference.py``, ``tests/test_chunk_append.py``).
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
    """The compiled library ``name`` (loaded once per process), or ``None`` when it was not built or is off.

    ``declare`` sets the functions' ``argtypes``/``restype`` on the loaded library.
    """
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            lib = None
            found = path(name) if enabled() else None
            if found is not None:
                try:
                    lib = ctypes.CDLL(found)
                    declare(lib)
                except (OSError, AttributeError) as err:
                    log.info("compiled kernel %s unusable (%s): the torch/h5py path is used", found, err)
                    lib = None
            elif enabled():
                log.info(
                    "compiled kernel %s not installed (no C compiler at install time): the torch/h5py path is used",
                    name,
                )
            _loaded[name] = lib
    return _loaded[name]
