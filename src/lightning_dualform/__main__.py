"""``python -m lightning_dualform``: the same as the ``lightning-dualform`` command."""

import sys

from lightning_dualform.cli import main

if __name__ == "__main__":
    sys.exit(main())
