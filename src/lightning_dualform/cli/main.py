"""The ``lightning-dualform`` command: ``info``, ``attend``, ``influence``, ``verify``, ``view`` and ``demo``.

Exit codes: 0 success, 1 failure (``verify`` beyond tolerance, an unexpected error), 2 a user's mistake
(missing file, not a store, unknown layer, bad index, wrong query width, unwritable output, bad option),
reported as one line on stderr; ``--debug`` adds the traceback.

Example::

    lightning-dualform demo --out demo/
    lightning-dualform info demo/mnist.h5
    lightning-dualform attend demo/mnist.h5 --split test --index 3,17 --top-k 5 --plot top.png --json top.json
    lightning-dualform verify demo/mnist.h5
    lightning-dualform view demo/mnist.h5

This module holds the parser, the dispatch and the error handling; each command lives in its own module
(:mod:`~lightning_dualform.cli.info`, :mod:`~lightning_dualform.cli.attend`, :mod:`~lightning_dualform.cli.verify`,
:mod:`~lightning_dualform.cli.view`, :mod:`~lightning_dualform.cli.demo`), over the input checks of
:mod:`~lightning_dualform.cli.inputs` and the outputs of :mod:`~lightning_dualform.cli.output`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
import warnings
from typing import Any, Callable, Sequence

from lightning_dualform._version import __version__
from lightning_dualform.attend.request import AttendRequest  # (its defaults; it imports neither numpy nor torch)
from lightning_dualform.cli.usage import DEFAULT_QUERIES, PROG, TERMINAL_TOP_K, UsageError, error_message
from lightning_dualform.errors import StoreError

__all__ = ["build_parser", "main"]


class _Command:
    """A subcommand's function, imported when it runs: the parser and ``--help`` load no command's module (the
    commands import numpy, h5py, torch or Lightning as they need them)."""

    def __init__(self, name: str) -> None:
        self.module, self.function = f"lightning_dualform.cli.{name}", f"cmd_{name}"

    def load(self) -> Callable[[argparse.Namespace], int]:
        return getattr(importlib.import_module(self.module), self.function)

    def __call__(self, args: argparse.Namespace) -> int:
        return self.load()(args)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help already says it, there is none, or it is a flag."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or action.default is None or action.nargs == 0:  # (a flag says what it does)
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes through :class:`UsageError` (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each sets ``func``, the command that runs the parsed arguments."""
    fmt = _DefaultsFormatter
    p = _Parser(
        prog=PROG,
        description="See which training examples a model's prediction draws on: the exact dual form of its "
        "linear layers as attention over the training patterns recorded by DualFormCallback.",
        formatter_class=fmt,
        epilog="Start with `lightning-dualform demo --out demo/`. Exit codes: 0 ok, 1 failure, 2 bad input.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = _Parser(add_help=False)  # (its class: what add_parser(parents=...) is typed to take)
    # Accepted before or after the subcommand; SUPPRESS keeps a subcommand's default from undoing the top level's.
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logging"
    )
    common.add_argument(
        "--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars or notes on stderr"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser(
        "info",
        parents=[common],
        formatter_class=fmt,
        help="what a store holds",
        description="Layers, rows, steps, optimizer, dtype, size, certificate and query sets of a store.",
    )
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--json", metavar="FILE", default=None, help="also write the facts as JSON")
    s.set_defaults(func=_Command("info"))

    s = sub.add_parser(
        "attend",
        parents=[common],
        formatter_class=fmt,
        help="which training patterns queries attend to (the paper's view), led by influence",
        description="Attend queries over each layer's training memory and show the top patterns (the paper's view: "
        "how each layer's output is assembled from its training rows). First, per query, the training examples "
        "ranked by first-order influence on the prediction's margin through the output layer, from the store alone.",
    )
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--split", default=None, help="recorded query set (default: 'test', or the store's only one)")
    s.add_argument("--index", default=None,
                   help="dataset indices of recorded queries: '3,17', '0:10' or 'all' (default: the first "
                   f"{DEFAULT_QUERIES} recorded)")
    s.add_argument("--queries", metavar="FILE", default=None,
                   help="queries (n, d_in) from a .npy (no pickle) or .pt (weights_only) file instead of a split")
    s.add_argument("--layer", action="append", default=None,
                   help="layer to attend at; repeat or comma-separate for several (default: all)")
    s.add_argument("--top-k", type=int, default=TERMINAL_TOP_K,
                   help="training patterns kept per query and layer (a table that fits a terminal; the library's "
                   f"default is {AttendRequest.top_k})")
    s.add_argument("--by", choices=("pattern", "example"), default="pattern",
                   help="rank single training patterns (one per presentation) or examples (epochs summed)")
    s.add_argument("--contribution-to", default=AttendRequest.contribution_to,
                   help="rank proponents/opponents at the output layer by their contribution to 'pred' (the "
                   "predicted class), 'label' (the recorded label), a unit number, or 'none'; 'auto' is 'pred' "
                   "here (hidden layers of a store of an element-wise optimizer rank by their own predicted unit "
                   "whatever this says)")
    s.add_argument(
        "--score",
        choices=("auto", "raw", "unit"),
        default=AttendRequest.score,
        help="what ranks the training patterns: 'raw', the similarity k . q; 'unit', each pattern's attention "
        "weight for the query's unit, -(Q_s[u] (.) k) . q, which the optimizer sets (Adam, AdamW, ...: their "
        "patterns' weights depend on the unit); 'auto': 'unit' for stores of element-wise optimizers, 'raw' "
        "otherwise",
    )
    s.add_argument(
        "--at-step", type=int, default=None, help="the model after this many optimizer steps (default: the end)"
    )
    s.add_argument("--step-buckets", type=int, default=AttendRequest.step_buckets,
                   help="time buckets of the attention mass over training")
    _device_and_blocks(s)
    s.add_argument("--json", metavar="FILE", default=None, help="write every number of the answer as JSON")
    s.add_argument(
        "--plot", metavar="FILE.png", default=None, help="draw the answer (.png, .pdf or .svg; needs matplotlib)"
    )
    s.add_argument(
        "--no-influence",
        dest="influence",
        action="store_false",
        help="leave out the examples ranked by first-order influence on each prediction's margin through the output "
        "layer (computed from the store alone; `influence --model` scores every layer)",
    )
    s.set_defaults(func=_Command("attend"))

    s = sub.add_parser("influence", parents=[common], formatter_class=fmt,
                       help="which training examples a prediction depends on (influence on its margin)",
                       description="Score every training example by how much up-weighting it would raise each query's "
                       "target (default: the margin of its recorded label); list proponents and opponents. With "
                       "--model every recorded layer counts; without it, the output layer only (from the store).")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback or DualFormRecorder")
    s.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="import path of a function returning the model (untrained is fine: the store's final "
                   "weights are loaded into its tracked layers), e.g. mypkg.models:make_mlp; without it, first-order "
                   "influence through the output layer only, from the store alone")
    s.add_argument("--split", default=None, help="recorded query set (default: 'test', or the store's only one)")
    s.add_argument("--index", default=None, help="dataset indices of recorded queries: '3,17', '0:10' or 'all' "
                   "(default: the first 3)")
    s.add_argument("--target", choices=("margin", "loss", "logit"), default="margin",
                   help="f: the margin (true-class logit minus logsumexp of the others), the loss, or the logit")
    s.add_argument("--method", choices=("first_order", "every_step", "metagradient"), default="first_order",
                   help="first order at the final model (dual form), TracIn at every replayed step, or the exact "
                   "metagradient through training (needs the store's raw inputs and the loss)")
    s.add_argument("--top-k", type=int, default=5, help="proponents and opponents listed per query")
    s.add_argument("--json", metavar="FILE", default=None, help="write the top-k per query (and the settings) as JSON")
    s.add_argument("--scores", metavar="FILE.npy", default=None,
                   help="write the whole table (n_queries, n_examples) as .npy, with FILE.examples.npy")
    s.set_defaults(func=_Command("influence"))

    s = sub.add_parser("verify", parents=[common], formatter_class=fmt, help="check that the dual form is exact",
                       description="Rebuild each layer's outputs from the memory and compare with the trained "
                       "weights. Fails (exit 1) when a layer is beyond its tolerance: 1e-4 relative for float32 "
                       "rows, 2e-2 for float16, 1e-1 for bfloat16 (1e-2 / 5e-2 under 16-/bf16-mixed precision).")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--samples", type=int, default=256, help="stored training keys used as queries per layer")
    _device_and_blocks(s)
    s.add_argument("--json", metavar="FILE", default=None, help="also write the verdict as JSON")
    s.add_argument("--write-certificate", action="store_true",
                   help="(re)compute the certificate and its memory sums and write them into the store first (a "
                   "complete store whose certificate is missing: a process killed while writing it, or certify=False)")
    s.set_defaults(func=_Command("verify"))

    s = sub.add_parser("view", parents=[common], formatter_class=fmt, help="explore a store in a local web page",
                       description="Serve a page on 127.0.0.1 to explore a store: pick a recorded query (or upload a "
                       ".npy row) and see the training examples ranked by influence on the prediction's margin (a "
                       "method selector: first order through the output layer from the store alone; with --model, "
                       "every layer, TracIn at every step, the exact metagradient), then, per layer, the training "
                       "examples it attends to as images, signed "
                       "contributions, mass per class and over training, the certificate, and any earlier step. "
                       "The process keeps the store's rows in memory (--cache), so answers after the first cost the "
                       "products. Offline: the page loads nothing from elsewhere.")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    s.add_argument("--no-browser", action="store_true", help="do not open a browser; print the address only")
    s.add_argument("--cache", default="auto",
                   help="memory kept for the store's rows: 'auto' (half of what is available), 'none', or a size "
                   "such as 2G, 512M (binary units) or a number of bytes")
    _device_and_blocks(s, "(with a cache on CUDA, rows are kept on the device)")
    s.add_argument("--no-warm", action="store_true", help="do not read every layer into the cache at start")
    s.add_argument("--model", metavar="MODULE:FACTORY", default=None,
                   help="the model (as for `influence --model`): adds influence through every recorded layer, TracIn "
                   "at every step and the exact metagradient to the page's method selector (without it: first-order "
                   "influence through the output layer, from the store alone)")
    s.set_defaults(func=_Command("view"))

    s = sub.add_parser("demo", parents=[common], formatter_class=fmt,
                       help="train the paper's MNIST MLP, record, attend and draw (under a minute)",
                       description="Train a 784-800-800-10 ReLU MLP (SGD, momentum 0.9, gradient clipping 1.0, "
                       "batch 128) on the 10,000 embedded MNIST digits (seeded 80/20 split) with DualFormCallback, "
                       "record the test queries, attend and write OUT/mnist.h5, OUT/attend.png and OUT/summary.json.")
    s.add_argument("--out", default="demo", help="output folder")
    s.add_argument("--epochs", type=int, default=2, help="training epochs (each adds about 130 MB to the store)")
    s.add_argument("--limit", type=int, default=None,
                   help="use only this many digits in all, at most 10,000 (default: all 10,000)")
    s.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.05 for SGD, 1e-3 for AdamW)")
    s.add_argument(
        "--optimizer",
        choices=("sgd", "adamw"),
        default="sgd",
        help="sgd: the paper's (momentum 0.9); adamw: torch.optim.AdamW (weight decay 0.01), whose dual form is "
        "exact too: the picture then ranks each training digit by its attention weight for the predicted unit",
    )
    s.add_argument("--seed", type=int, default=0, help="seeds the split, the shuffle and the weights (0 to 2**32 - 1)")
    s.add_argument("--no-plot", action="store_true", help="skip the picture (no matplotlib needed)")
    s.set_defaults(func=_Command("demo"))
    return p


def _device_and_blocks(s: argparse.ArgumentParser, device_note: str = "") -> None:
    """The two options of every command that multiplies rows: where, and how many at a time."""
    s.add_argument("--device", default="cpu", help=" ".join(("'cpu', 'cuda' or 'cuda:N'", device_note)).strip())
    s.add_argument("--block-rows", type=int, default=None,
                   help="memory rows read and multiplied at a time (default: about 96 MiB per block)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return _fail(str(err), 2)
    except SystemExit as err:  # --help, --version
        return int(err.code or 0)
    debug = args.debug
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    if os.path.isfile(getattr(args, "store", None) or ""):
        from lightning_dualform.store import _probe

        _probe.start()  # the store's checking process starts while the command imports what it needs
    with _WarningLines(args.command, logs=not debug):
        return _run(args, debug)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more (Python's documented recipe)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (UsageError, StoreError, KeyError, ValueError, TypeError, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError, ImportError) as err:
        if debug:
            traceback.print_exc()
        return _fail(error_message(err), 2)
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            traceback.print_exc()
        return _fail(f"{type(err).__name__}: {error_message(err)} (rerun with --debug for the traceback)", 1)


class _WarningLines:
    """While a command runs, its warnings read as its errors do: ``lightning-dualform: warning: <message>``, one line
    (Python's own form adds the source file, line and code), once per message, whether it came as a warning or
    as a log record of the library's (a store's repair is both: it was said twice). Under ``verify``, the advice to
    run ``verify`` is left out.

    Installed as :func:`warnings.formatwarning` (what prints a warning; recording ones, as tests do, is left alone)
    and, unless ``--debug`` shows the log itself, as a handler of the ``lightning_dualform`` logger; both are
    put back afterwards.
    """

    def __init__(self, command: str | None, logs: bool = True) -> None:
        self.command = command
        self.seen: set[str] = set()
        self._handler: logging.Handler | None = _LogLines(self) if logs else None
        self._format: Any = None

    def line(self, message: object) -> str:
        """The line to print for ``message``, or "" when it was said already."""
        text = " ".join(str(message).split())
        text = text[len(PROG) + 2:] if text.startswith(f"{PROG}: ") else text
        if self.command == "verify":
            text = re.sub(rf";\s*run `{PROG} verify`(?: on it)?", "", text)
            text = re.sub(rf"\s*Run `{PROG} verify`(?: on it)?\.", "", text)
        key = text.rstrip(". ")
        if key in self.seen:
            return ""
        self.seen.add(key)
        return f"{PROG}: warning: {text}\n"

    def formatwarning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        return self.line(message)

    def __enter__(self) -> "_WarningLines":
        self._format = warnings.formatwarning
        warnings.formatwarning = self.formatwarning
        if self._handler is not None:
            logging.getLogger("lightning_dualform").addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        warnings.formatwarning = self._format
        if self._handler is not None:
            logging.getLogger("lightning_dualform").removeHandler(self._handler)


class _LogLines(logging.Handler):
    """The library's log warnings as :class:`_WarningLines` prints warnings (without it they printed bare, through
    logging's last resort)."""

    def __init__(self, lines: _WarningLines) -> None:
        super().__init__(logging.WARNING)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.lines.line(record.getMessage())
            if text:
                sys.stderr.write(text)
        except Exception:  # (as logging's own handlers do)
            self.handleError(record)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code

