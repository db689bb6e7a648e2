"""The library's version, in one place (read by ``pyproject.toml`` and written into every store)."""

__version__ = "0.1.0"
