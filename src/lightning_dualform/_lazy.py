"""Public names of a package imported on first use (PEP 562), so that importing a package costs nothing
until one of its names is used: ``lightning-dualform --version`` or ``info`` never load torch or Lightning,
and the probe's child process imports only h5py.

Usage in a package's ``__init__``::

    __getattr__, __dir__ = lazy_exports(__name__, {"StoreReader": "lightning_dualform.store.reader"}, __all__)
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(
    package: str, where: Mapping[str, str], public: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``, whose names ``where`` maps to their modules.

    Args:
        package: the package's ``__name__``.
        where: each lazily exported name and the module that defines it.
        public: the package's ``__all__`` (listed by ``dir()`` before first use).
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
