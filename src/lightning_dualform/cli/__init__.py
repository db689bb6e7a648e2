"""The ``lightning-dualform`` command line."""

from lightning_dualform.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
