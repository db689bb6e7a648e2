"""Small C libraries compiled on first use with the system compiler, cached, and loaded with ``ctypes``.

The library's hot loops (the attention bookkeeping in :mod:`._fused`, the chunk checksum in
:mod:`._fletcher`) are plain C: no Python or torch headers, so any C compiler builds them in about a
second. Each is built with ``$CC`` (else ``cc``) into ``$XDG_CACHE_HOME/lightning_dualform/`` (else
``~/.cache``), keyed by a hash of its source, the compiler and the machine, and loaded once per process.
``ctypes`` releases the GIL during calls. Without a compiler, or with ``LIGHTNING_DUALFORM_KERNEL=0``,
:func:`load` returns ``None`` and callers use their Python fallbacks, which give the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
from typing import Callable

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """False when ``LIGHTNING_DUALFORM_KERNEL`` switches the compiled code off."""
    return os.environ.get("LIGHTNING_DUALFORM_KERNEL", "1").lower() not in ("0", "false", "no", "off")


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lightning_dualform")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(name: str, src: str, openmp: bool) -> str | None:
    cc = os.environ.get("CC", "cc")
    # -march=native: the library is built for, and cached per, the machine that runs it (its CPU's
    # instruction-set flags are in the key, so a home directory shared by different CPUs stays safe)
    key = src + cc + str(openmp) + sys.platform + platform.node() + platform.machine() + _cpu_flags()
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    so = os.path.join(out_dir, f"{name}-{tag}.so")
    if os.path.exists(so):
        return so
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_path, tmp_so = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
        with open(c_path, "w") as f:
            f.write(src)
        # $CC may carry words of its own ("ccache gcc", "gcc -m64")
        cmd = [*shlex.split(cc), "-O3", "-march=native", "-fPIC", "-shared", *(["-fopenmp"] if openmp else []), c_path, "-o", tmp_so]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:  # a compiler without -march=native
            cmd.remove("-march=native")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            log.info("native library %s not built (%s): %s", name, " ".join(cmd), proc.stderr[-500:])
            return None
        os.replace(tmp_so, so)  # atomic: concurrent builders leave one complete file
    return so


def load(name: str, src: str, declare: Callable[[ctypes.CDLL], None], *, openmp: bool = False) -> ctypes.CDLL | None:
    """The compiled library ``name`` (built once per machine, loaded once per process), or ``None``.

    ``declare`` sets the functions' ``argtypes``/``restype`` on the loaded library.
    """
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            lib = None
            if enabled():
                try:
                    so = _build(name, src, openmp)
                    if so is not None:
                        lib = ctypes.CDLL(so)
                        declare(lib)
                except (OSError, subprocess.SubprocessError, AttributeError) as err:
                    log.info("native library %s unavailable: %s", name, err)
                    lib = None
            _loaded[name] = lib
    return _loaded[name]
