import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared helpers as `helpers`


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (the larger reliability runs; or select them with -m slow)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow") and "slow" not in (config.getoption("-m") or ""):
        skip_slow = pytest.mark.skip(reason="slow: run with --runslow (or -m slow)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_logger_levels():
    """Scripts run in-process (examples, the CLI) may quiet Lightning's loggers; keep that inside the test."""
    import logging

    names = ("lightning.pytorch", "lightning.fabric", "lightning", "lightning_dualform")
    saved = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in saved.items():
        logging.getLogger(n).setLevel(level)
