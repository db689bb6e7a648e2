"""The ``lightning-dualform`` command: ``info``, ``attend``, ``verify``, ``view`` and ``demo``.

Exit codes: 0 success, 1 failure (``verify`` beyond tolerance, an unexpected error), 2 a user's mistake
(missing file, not a store, unknown layer, bad index, wrong query width, unwritable output, bad option),
reported as one line on stderr; ``--debug`` adds the traceback.

Example::

    lightning-dualform demo --out demo/
    lightning-dualform info demo/mnist.h5
    lightning-dualform attend demo/mnist.h5 --split test --index 3,17 --top-k 5 --plot top.png --json top.json
    lightning-dualform verify demo/mnist.h5
    lightning-dualform view demo/mnist.h5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lightning_dualform._version import __version__
from lightning_dualform.errors import StoreError

if TYPE_CHECKING:
    from lightning_dualform.analysis import QueryAttention

log = logging.getLogger(__name__)

PROG = "lightning-dualform"
_IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
#: recorded queries attended when --index is not given
DEFAULT_QUERIES = 4
#: --step-buckets beyond this are refused (the mass tables are queries x buckets; attend() also refuses more
#: buckets than steps beyond 1024)
MAX_STEP_BUCKETS_CLI = 1 << 16
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?%?")


class UsageError(Exception):
    """A user's mistake that the CLI reports in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes through :class:`UsageError` (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = _Parser(
        prog=PROG,
        description="See which training examples a model's prediction draws on: the exact dual form of its "
        "linear layers as attention over the training patterns recorded by DualFormCallback.",
        formatter_class=fmt,
        epilog="Start with `lightning-dualform demo --out demo/`. Exit codes: 0 ok, 1 failure, 2 bad input.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    # Accepted before or after the subcommand; SUPPRESS keeps a subcommand's default from undoing the top level's.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logging")
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help="no progress bars or notes on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("info", parents=[common], formatter_class=fmt, help="what a store holds",
                       description="Layers, rows, steps, optimizer, dtype, size, certificate and query sets of a store.")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--json", metavar="FILE", default=None, help="also write the facts as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("attend", parents=[common], formatter_class=fmt, help="which training patterns queries attend to",
                       description="Attend queries over each layer's training memory and show the top patterns.")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--split", default=None, help="recorded query set (default: 'test', or the store's only one)")
    s.add_argument("--index", default=None,
                   help="dataset indices of recorded queries: '3,17', '0:10' or 'all' (default: the first "
                   f"{DEFAULT_QUERIES} recorded)")
    s.add_argument("--queries", metavar="FILE", default=None,
                   help="queries (n, d_in) from a .npy (no pickle) or .pt (weights_only) file instead of a split")
    s.add_argument("--layer", action="append", default=None,
                   help="layer to attend at; repeat or comma-separate for several (default: all)")
    s.add_argument("--top-k", type=int, default=5, help="training patterns kept per query and layer")
    s.add_argument("--by", choices=("pattern", "example"), default="pattern",
                   help="rank single training patterns (one per presentation) or examples (epochs summed)")
    s.add_argument("--contribution-to", default="pred",
                   help="rank proponents/opponents at the output layer by their contribution to 'pred' (the "
                   "predicted class), 'label' (the recorded label), a unit number, or 'none'")
    s.add_argument("--score", choices=("auto", "raw", "unit"), default="auto",
                   help="what ranks the training patterns: 'raw', the similarity k . q; 'unit', each pattern's attention "
                   "weight for the query's unit, -(Q_s[u] (.) k) . q, which the optimizer sets (Adam, AdamW, ...: their "
                   "patterns' weights depend on the unit); 'auto': 'unit' for stores of element-wise optimizers, 'raw' "
                   "otherwise")
    s.add_argument("--at-step", type=int, default=None, help="the model after this many optimizer steps (default: the end)")
    s.add_argument("--step-buckets", type=int, default=20, help="time buckets of the attention mass over training")
    s.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    s.add_argument("--block-rows", type=int, default=None, help="memory rows read and multiplied at a time (default: about 96 MiB per block)")
    s.add_argument("--json", metavar="FILE", default=None, help="write every number of the answer as JSON")
    s.add_argument("--plot", metavar="FILE.png", default=None, help="draw the answer (.png, .pdf or .svg; needs matplotlib)")
    s.set_defaults(func=cmd_attend)

    s = sub.add_parser("verify", parents=[common], formatter_class=fmt, help="check that the dual form is exact",
                       description="Rebuild each layer's outputs from the memory and compare with the trained "
                       "weights. Fails (exit 1) when a layer is beyond its tolerance: 1e-4 relative for float32 "
                       "rows, 2e-2 for float16, 1e-1 for bfloat16 (1e-2 / 5e-2 under 16-/bf16-mixed precision).")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--samples", type=int, default=256, help="stored training keys used as queries per layer")
    s.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    s.add_argument("--block-rows", type=int, default=None, help="memory rows read and multiplied at a time (default: about 96 MiB per block)")
    s.add_argument("--json", metavar="FILE", default=None, help="also write the verdict as JSON")
    s.add_argument("--write-certificate", action="store_true",
                   help="(re)compute the certificate and its memory sums and write them into the store first (a "
                   "complete store whose certificate is missing: a process killed while writing it, or certify=False)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("view", parents=[common], formatter_class=fmt, help="explore a store in a local web page",
                       description="Serve a page on 127.0.0.1 to explore a store: pick a recorded query (or upload a "
                       ".npy row) and see, per layer, the training examples it attends to as images, signed "
                       "contributions, mass per class and over training, the certificate, and any earlier step. "
                       "The process keeps the store's rows in memory (--cache), so answers after the first cost the "
                       "products. Offline: the page loads nothing from elsewhere.")
    s.add_argument("store", metavar="STORE", help="a .h5 store written by DualFormCallback")
    s.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    s.add_argument("--no-browser", action="store_true", help="do not open a browser; print the address only")
    s.add_argument("--cache", default="auto",
                   help="memory kept for the store's rows: 'auto' (half of what is available), 'none', or a size "
                   "such as 2G, 512M (binary units) or a number of bytes")
    s.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N' (with a cache on CUDA, rows are kept on the device)")
    s.add_argument("--block-rows", type=int, default=None, help="memory rows read and multiplied at a time (default: about 96 MiB per block)")
    s.add_argument("--no-warm", action="store_true", help="do not read every layer into the cache at start")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("demo", parents=[common], formatter_class=fmt,
                       help="train the paper's MNIST MLP, record, attend and draw (under a minute)",
                       description="Train a 784-800-800-10 ReLU MLP (SGD, momentum 0.9, gradient clipping 1.0, "
                       "batch 128) on the 10,000 embedded MNIST digits (seeded 80/20 split) with DualFormCallback, "
                       "record the test queries, attend and write OUT/mnist.h5, OUT/attend.png and OUT/summary.json.")
    s.add_argument("--out", default="demo", help="output folder")
    s.add_argument("--epochs", type=int, default=2, help="training epochs (each adds about 150 MB to the store)")
    s.add_argument("--limit", type=int, default=None, help="use only this many digits in all (default: all 10,000)")
    s.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.05 for SGD, 1e-3 for AdamW)")
    s.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: the paper's (momentum 0.9); adamw: torch.optim.AdamW (weight decay 0.01), whose dual form is "
                   "exact too: the picture then ranks each training digit by its attention weight for the predicted unit")
    s.add_argument("--seed", type=int, default=0, help="seeds the split, the shuffle and the weights")
    s.add_argument("--no-plot", action="store_true", help="skip the picture (no matplotlib needed)")
    s.set_defaults(func=cmd_demo)
    return p


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
        return _fail(_message(err), 2)
    except Exception as err:  # a bug or an environment failure: still one line unless --debug
        if debug:
            traceback.print_exc()
        return _fail(f"{type(err).__name__}: {_message(err)} (rerun with --debug for the traceback)", 1)


def _message(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    text = " ".join(str(text).split())
    return text or type(err).__name__


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


# ------------------------------------------------------------------------------------------------------
# checks of user input
# ------------------------------------------------------------------------------------------------------
def _check_store_path(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file; pass a store written by DualFormCallback (try `{PROG} demo`).")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder; pass the .h5 store file inside it.")


def _check_output(path: str | None, option: str, suffixes: tuple[str, ...] | None = None) -> None:
    """Fail before any long work when an output cannot be written."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder; give a file name.")
    if suffixes is not None and os.path.splitext(path)[1].lower() not in suffixes:
        raise UsageError(f"{option} {path}: unsupported file type; use one of {', '.join(suffixes)}.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first.")
    exists = os.path.exists(path)
    if (exists and not os.access(path, os.W_OK)) or (not exists and not os.access(folder, os.W_OK)):
        raise UsageError(f"{option} {path}: not writable; choose another path.")


class Output:
    """An output opened before the computation, so that an unwritable path fails first; written at the end.

    A regular file is written under a temporary name beside it and renamed into place (a failed run never
    leaves a truncated file); a device or pipe (``/dev/stdout``, ``/dev/full``) is opened at once and sent a
    newline (JSON allows it), which is where a full device says so.
    """

    def __init__(self, path: str | None, option: str, suffixes: tuple[str, ...] | None = None) -> None:
        self.path, self.option = path, option
        self._tmp: str | None = None
        self._fd: int | None = None
        if path is None:
            return
        _check_output(path, option, suffixes)
        try:
            if not os.path.exists(path) or os.path.isfile(path):
                root, ext = os.path.splitext(os.path.basename(path))
                fd, self._tmp = tempfile.mkstemp(prefix=f".{root}-", suffix=ext, dir=os.path.dirname(os.path.abspath(path)))
                os.close(fd)
            else:
                self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(self._fd, True)
                os.write(self._fd, b"\n")
        except OSError as err:
            self.discard()
            raise UsageError(f"{option} {path}: cannot be written ({err.strerror or err}); choose another path.") from None

    def write_text(self, text: str) -> None:
        self._finish(lambda target: open(target, "w").write(text), text.encode())

    def write_with(self, draw: Any) -> None:
        """``draw(path)`` writes the file (a plot)."""
        self._finish(draw, None)

    def _finish(self, write: Any, data: bytes | None) -> None:
        if self.path is None:
            return
        try:
            if self._tmp is not None:
                write(self._tmp)
                os.replace(self._tmp, self.path)
                self._tmp = None
            else:
                if data is None:  # a device: draw into a temporary file, then copy it out
                    ext = os.path.splitext(self.path)[1]
                    fd, tmp = tempfile.mkstemp(suffix=ext)
                    os.close(fd)
                    try:
                        write(tmp)
                        data = open(tmp, "rb").read()
                    finally:
                        os.remove(tmp)
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
        finally:
            self.discard()

    def discard(self) -> None:
        if self._tmp is not None and os.path.exists(self._tmp):
            os.remove(self._tmp)
        self._tmp = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{option} {value}: expected a positive integer.")


def _json_text(data: Any) -> str:
    return json.dumps(data, indent=1, default=_json_default) + "\n"


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def parse_index(text: str, available: np.ndarray, split: str) -> np.ndarray:
    """Positions (recording order) of the queries named by ``text``: ``'3,17'``, ``'0:10'``, ``'all'``."""
    if text.strip() == "all":
        return np.arange(len(available))
    wanted: list[int] = []
    known = np.unique(available)
    span = f"{known.min()}..{known.max()}" if len(known) else "none"
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo, hi = (int(x) for x in part.split(":", 1))
                if hi - lo > len(available) - len(wanted):  # bounded by what exists, never materialised
                    raise UsageError(
                        f"--index {text}: the range {part} names {hi - lo} dataset indices, more than the {len(available)} "
                        f"recorded {split} queries (indices {span}); use a range inside them, or all."
                    )
                wanted.extend(range(lo, hi))
            elif part:
                wanted.append(int(part))
        except ValueError:
            raise UsageError(f"--index {text}: {part!r} is not an integer or a range like 0:10; use e.g. 3,17 or 0:10 or all.") from None
        if len(wanted) > len(available):
            raise UsageError(f"--index {text}: names more queries than the {len(available)} recorded {split} queries (indices {span}).")
    if not wanted:
        raise UsageError(f"--index {text}: names no query; use e.g. 3,17 or 0:10 or all.")
    first: dict[int, int] = {}
    for p, i in enumerate(available.tolist()):
        first.setdefault(int(i), p)
    missing = [i for i in wanted if i not in first]
    if missing:
        raise UsageError(
            f"--index {text}: no recorded {split} query has dataset index {missing[:5]}; "
            f"the split holds {len(available)} queries with indices {span}."
        )
    return np.array([first[i] for i in wanted], dtype=np.int64)


def load_queries(path: str) -> np.ndarray:
    """``(n, d)`` float32 queries from a .npy (``allow_pickle=False``) or .pt (``weights_only=True``) file."""
    _check_store_path_like(path, "--queries")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            q = np.load(path, allow_pickle=False)
        elif ext in (".pt", ".pth"):
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, torch.Tensor):
                raise UsageError(f"--queries {path}: holds a {type(obj).__name__}, not a tensor; save one tensor of shape (n, d_in).")
            q = obj.detach().float().numpy()
        else:
            raise UsageError(f"--queries {path}: unsupported file type {ext or '(none)'}; use .npy or .pt.")
    except UsageError:
        raise
    except Exception as err:  # numpy/torch say many things about files they cannot read
        raise UsageError(f"--queries {path}: cannot read it without pickle ({_message(err)[:150]}); save a plain numeric array.") from err
    return checked_queries(q, f"--queries {path}")


def load_npy_bytes(data: bytes, what: str) -> np.ndarray:
    """``(n, d)`` float32 queries from the bytes of a ``.npy`` file (``allow_pickle=False``), as
    :func:`load_queries` reads a file; ``what`` names the source in messages."""
    import io

    try:
        q = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # a pickled or damaged file, another format
        raise UsageError(f"{what}: cannot read it as .npy without pickle ({_message(err)[:150]}); save a plain numeric array with numpy.save.") from err
    return checked_queries(q, what)


def checked_queries(q: Any, what: str) -> np.ndarray:
    """A numeric, finite, non-empty array as ``(n, d)`` float32 (images flattened), or a :class:`UsageError`."""
    if not isinstance(q, np.ndarray) or q.dtype == object or not np.issubdtype(q.dtype, np.number):
        raise UsageError(f"{what}: expected a numeric array of shape (n, d_in).")
    if q.ndim == 0:
        raise UsageError(f"{what}: holds a single number; expected an array of shape (n, d_in).")
    if q.ndim == 1:
        q = q[None]
    elif q.ndim > 2:
        q = q.reshape(q.shape[0], -1)  # images (n, 28, 28) -> (n, 784)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise UsageError(f"{what}: holds no queries.")
    if not np.isfinite(q).all():
        raise UsageError(f"{what}: holds NaN or inf; every query must be finite.")
    return np.ascontiguousarray(q, dtype=np.float32)


def _check_store_path_like(path: str, option: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file.")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a folder, not a file.")


def _parse_contribution(text: str) -> str | int | None:
    t = text.strip().lower()
    if t == "none":
        return None
    if t in ("pred", "label"):
        return t
    try:
        unit = int(t)
    except ValueError:
        raise UsageError(f"--contribution-to {text}: expected pred, label, none or an output unit number.") from None
    if unit < 0:
        raise UsageError(f"--contribution-to {text}: a unit number must be >= 0.")
    return unit


def _parse_layers(values: list[str] | None, known: list[str]) -> list[str] | None:
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise UsageError(f"--layer {bad[0]}: unknown layer; this store has {', '.join(known)}.")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------------
def store_facts(path: str) -> dict[str, Any]:
    """What ``info`` shows, as plain data (also its ``--json``)."""
    from lightning_dualform.store.shards import read_shard_index

    shards = read_shard_index(path)
    if shards is not None:  # a DDP run's index file: describe each rank's store (never an index again)
        missing = [sh for sh in shards if not os.path.exists(sh)]
        if missing:
            raise StoreError(f"{path}: the DDP index names shard files that are missing: {missing}.")
        return {"path": path, "shards": [_store_facts(sh) for sh in shards]}
    return _store_facts(path)


def _store_facts(path: str) -> dict[str, Any]:
    from lightning_dualform.attend.certificate import missing_certificate
    from lightning_dualform.store.reader import StoreReader

    with StoreReader(path) as s:
        layers = []
        for name in s.layers:
            lay = s.layer(name)
            la = lay.attrs
            cert = {k[len("certificate_"):]: la[k] for k in la if k.startswith("certificate_")}
            layers.append({
                "name": name, "kind": lay.kind, "d_in": lay.d_in, "d_out": lay.d_out, "bias": lay.has_bias,
                "rows": lay.n_rows, "exact": lay.exact, "inexact_reason": lay.inexact_reason, "certificate": cert,
                "rows_without_index": la.get("rows_without_index"),
            })
        queries = []
        for split in s.query_splits:
            qs = s.queries(split)
            known = (qs.label >= 0) & (qs.prediction >= 0)
            acc = float((qs.label[known] == qs.prediction[known]).mean()) if known.any() else None
            queries.append({"split": split, "n": qs.n, "layers": qs.layers, "inputs": qs.inputs is not None, "accuracy": acc})
        epochs = sorted(set(np.asarray(s.update_epochs).tolist()))
        m = s.meta
        return {
            "path": path,
            "size_bytes": os.path.getsize(path),
            "status": s.status,
            "format_version": m.format_version,
            "library_version": m.library_version or None,
            "created": m.created or None,
            "recorded_by": m.recorded_by,
            "model_class": m.model_class or None,
            "steps": {"first": s.first_step, "last": s.last_step, "recorded": s.n_steps},
            "epochs": len(epochs),  # counted from the step table (the `epochs` attribute counts one more after fit)
            "optimizer": s.optimizer,
            "optimizer_exact": s.optimizer_exact,
            "update_rule": s.update_rule,
            "form": s.form,
            "gradient_clip_val": m.gradient_clip_val,
            "gradient_clip_algorithm": m.gradient_clip_algorithm,
            "accumulate_grad_batches": m.accumulate_grad_batches,
            "precision": m.precision,
            "float32_products": m.float32_products,
            "world_size": m.world_size,
            "row_dtype": s.row_dtype,
            "compression": m.compression,
            "train_inputs": s.train_inputs(np.array([-1])) is not None,
            "layers": layers,
            "queries": queries,
            "certificate_missing": missing_certificate(s),
            "repairs": list(s.repairs),
        }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


#: what a rule's form means for the memory, as ``info`` says it
_FORMS = {
    "scalar": "exact: per-step scalar coefficients, attention over k . q",
    "element-wise": "exact: element-wise steps, replayed from the stored optimizer state; each pattern's attention "
                    "weight depends on the output unit (attend --score unit)",
    "plain": "NOT exact: recorded with exact=False, the memory's residual is stored",
}


def _rule_line(f: dict[str, Any]) -> str:
    form = f.get("form", "scalar")
    return f"{f.get('update_rule', 'sgd')} ({_FORMS.get(form, form)})"


def _optimizer_line(opt: dict[str, Any]) -> str:
    name = opt.get("name") or "?"
    groups = opt.get("param_groups") or []
    keys = ("lr", "betas", "eps", "momentum", "dampening", "alpha", "rho", "lr_decay", "weight_decay", "nesterov",
            "amsgrad", "centered", "decoupled_weight_decay", "maximize")
    parts = []
    for i, g in enumerate(groups):
        items = " ".join(f"{k}={_num(g[k])}" for k in keys if k in g)
        parts.append(items if len(groups) == 1 else f"group {i}: {items}")
    return name + ("  " + "; ".join(parts) if parts else "")


def _num(v: Any) -> str:
    if isinstance(v, list):
        return "(" + ", ".join(_num(x) for x in v) + ")"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Text table; numbers right-aligned, text left-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else _num(c) for c in r] for r in rows]
    numeric = [all(not isinstance(r[j], str) or _NUMBER.fullmatch(r[j]) for r in rows) if rows else False
               for j in range(len(headers))]
    widths = [max(len(r[j]) for r in cells) for j in range(len(headers))]
    lines = []
    for i, r in enumerate(cells):
        lines.append(indent + "  ".join(c.rjust(w) if numeric[j] else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_info(f: dict[str, Any]) -> str:
    if "shards" in f:
        head = f"{f['path']}: DDP shard index of {len(f['shards'])} rank stores"
        return "\n\n".join([head] + [render_info(s) for s in f["shards"]])
    st = f["steps"]
    clip = f.get("gradient_clip_val") or 0
    out = [
        f"{f['path']}  ({_human_bytes(f['size_bytes'])}, {f['status']}, format {f['format_version']}, "
        f"written by lightning-dualform {f['library_version']} on {f['created']})",
        f"model      {f['model_class']} (recorded by {f.get('recorded_by') or 'DualFormCallback'})",
        f"training   {st['recorded']} optimizer steps ({st['first']}..{st['last']}), {f['epochs']} epoch(s), "
        f"precision {f['precision']}"
        + (f" (float32 products in {f['float32_products']})" if f.get("float32_products", "ieee") != "ieee" else "")
        + f", world size {f['world_size']}",
        f"optimizer  {_optimizer_line(f['optimizer'])}"
        + (f"; gradient clipping {clip:g} ({f['gradient_clip_algorithm']})" if clip else "")
        + ("; each step's gradient factor (clipping, loss scale, DDP) measured" if f.get("gradient_clip_algorithm") == "measured" else "")
        + ("" if f["optimizer_exact"] else "  [recorded with exact=False: the memory is approximate]"),
        f"rule       {_rule_line(f)}",
        f"rows       {f['row_dtype']}, compression {f['compression']}, raw training inputs "
        + ("stored" if f["train_inputs"] else "not stored"),
        "",
        "layers",
    ]
    rows = []
    for lay in f["layers"]:
        c = lay["certificate"]
        if "rel_err" in c:
            verdict = "exact" if c.get("exact") else "INEXACT"
            cert = f"{c['rel_err']:.2e} ({verdict}, tol {c.get('tolerance', float('nan')):.0e})"
        elif f["status"] == "complete":
            cert = "MISSING (write it: lightning-dualform verify --write-certificate)"
        else:
            cert = "none yet (the run is unfinished)"
        rows.append([lay["name"], lay["kind"], f"{lay['d_in']} -> {lay['d_out']}", "yes" if lay["bias"] else "no",
                     lay["rows"], cert])
    out.append(table(["layer", "kind", "shape", "bias", "rows", "certificate (rel. err. of rebuilt weights)"], rows))
    unknown = {lay["name"]: lay["rows_without_index"] for lay in f["layers"] if lay.get("rows_without_index")}
    if unknown:
        out.append("  rows without a dataset index (stored as -1): "
                   + ", ".join(f"{n} {k}" + (" (all)" if k == lay_rows else "")
                               for n, k, lay_rows in ((n, k, next(x["rows"] for x in f["layers"] if x["name"] == n))
                                                      for n, k in unknown.items()))
                   + ". Give them with DualFormRecorder.batch(indices=...) or the callback's index_key.")
    out.append("")
    if f["queries"]:
        out.append("query sets")
        out.append(table(
            ["split", "queries", "accuracy", "raw inputs", "layers"],
            [[q["split"], q["n"], "-" if q["accuracy"] is None else f"{100 * q['accuracy']:.1f}%",
              "yes" if q["inputs"] else "no", ", ".join(q["layers"])] for q in f["queries"]],
        ))
    else:
        out.append("query sets: none (record with DualFormCallback(record_queries=('test',)) and trainer.test)")
    return "\n".join(out)


def cmd_info(args: argparse.Namespace) -> int:
    _check_store_path(args.store)
    out = Output(args.json, "--json")
    try:
        facts = store_facts(args.store)
        print(render_info(facts))
        out.write_text(_json_text(facts))
    finally:
        out.discard()
    return 0


# ------------------------------------------------------------------------------------------------------
# attend
# ------------------------------------------------------------------------------------------------------
def cmd_attend(args: argparse.Namespace) -> int:
    _check_store_path(args.store)
    _check_output(args.json, "--json")
    _check_output(args.plot, "--plot", _IMAGE_SUFFIXES)
    _positive(args.block_rows, "--block-rows")
    if args.step_buckets is not None and args.step_buckets > MAX_STEP_BUCKETS_CLI:
        raise UsageError(f"--step-buckets {args.step_buckets}: at most {MAX_STEP_BUCKETS_CLI} (more buckets than steps hold nothing).")
    _positive(args.step_buckets, "--step-buckets")
    if args.top_k < 0:
        raise UsageError(f"--top-k {args.top_k}: expected 0 or more.")
    if args.queries is not None and (args.split is not None or args.index is not None):
        raise UsageError("--queries reads queries from a file; leave out --split and --index, or drop --queries.")
    _parse_contribution(args.contribution_to)  # a mistake here is reported before any long work
    if args.plot:
        from lightning_dualform.plots import require_matplotlib

        require_matplotlib()
    queries = load_queries(args.queries) if args.queries is not None else None
    json_out = Output(args.json, "--json")
    plot_out = Output(args.plot, "--plot", _IMAGE_SUFFIXES)
    try:
        _attend(args, di_kwargs={"device": args.device, "block_rows": args.block_rows, "progress": _progress(args)},
                queries=queries, json_out=json_out, plot_out=plot_out)
    finally:
        json_out.discard()
        plot_out.discard()
    return 0


def _attend(args: argparse.Namespace, di_kwargs: dict[str, Any], queries: np.ndarray | None,
            json_out: Output, plot_out: Output) -> None:
    from lightning_dualform.attend.inference import DualInference

    t0 = time.perf_counter()
    with DualInference(args.store, **di_kwargs) as di:
        run = attend_run(di, args.store, split=args.split, index=args.index, queries=queries, source=args.queries or "",
                         layer=args.layer, top_k=args.top_k, by=args.by, contribution_to=args.contribution_to,
                         at_step=args.at_step, step_buckets=args.step_buckets, score=args.score)
        print(render_attend(run, by=args.by, store=di.store))
        if args.json:
            json_out.write_text(_json_text(run.to_dict()))
            _note(args, f"wrote {args.json}")
        if args.plot:
            from lightning_dualform.plots import plot_attention

            plot_out.write_with(lambda target: plot_attention(run, di.store, target, by=args.by))
            _note(args, f"wrote {args.plot}")
    log.debug("attend took %.2f s", time.perf_counter() - t0)


def attend_run(
    di: Any,
    store: str,
    *,
    split: str | None = None,
    index: str | None = None,
    queries: np.ndarray | None = None,
    source: str = "",
    layer: Sequence[str] | None = None,
    top_k: int = 5,
    by: str = "pattern",
    contribution_to: str = "pred",
    at_step: int | None = None,
    step_buckets: int = 20,
    score: str = "auto",
) -> QueryAttention:
    """What ``attend`` computes, from its options as the command line takes them; its ``to_dict()`` is what
    ``--json`` writes. The viewer's ``/api/attend`` calls it too, so both answer the same.

    Args:
        di: the open store (a :class:`~lightning_dualform.DualInference`).
        store: the store's path as given (its absolute path goes into ``settings["store"]``).
        split, index: recorded queries: the split (default: 'test' or the only one) and ``--index`` text
            (``'3,17'``, ``'0:10'``, ``'all'``; default: the first :data:`DEFAULT_QUERIES`).
        queries, source: ``(n, d)`` queries instead (from :func:`load_queries`) and where they came from.
        layer: ``--layer`` values (names, or comma-separated names; default: every layer).
        top_k, by, contribution_to, at_step, step_buckets, score: as ``--top-k``, ``--by``, ``--contribution-to``,
            ``--at-step``, ``--step-buckets``, ``--score``.

    Raises:
        UsageError: a bad option (unknown split, layer or index, a negative ``top_k`` ...).
        ValueError, KeyError: what :func:`~lightning_dualform.analysis.attend_queries` raises.
    """
    from lightning_dualform.analysis import attend_queries

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UsageError(f"--top-k {top_k}: expected 0 or more.")
    _positive(step_buckets, "--step-buckets")
    if step_buckets is not None and step_buckets > MAX_STEP_BUCKETS_CLI:
        raise UsageError(f"--step-buckets {step_buckets}: at most {MAX_STEP_BUCKETS_CLI} (more buckets than steps hold nothing).")
    if by not in ("pattern", "example"):
        raise UsageError(f"--by {by}: expected pattern or example.")
    if queries is not None and (split is not None or index is not None):
        raise UsageError("--queries reads queries from a file; leave out --split and --index, or drop --queries.")
    if score not in ("auto", "raw", "unit"):
        raise UsageError(f"--score {score}: expected auto, raw or unit.")
    contribution = _parse_contribution(contribution_to)
    layers = _parse_layers(list(layer) if layer else None, di.layers)
    if isinstance(contribution, int):
        d_out = di.layer(di.layers[-1]).d_out
        if contribution >= d_out:
            raise UsageError(f"--contribution-to {contribution}: the output layer {di.layers[-1]} has units 0..{d_out - 1}.")
    if contribution is None and score != "raw" and di.store.form == "element-wise":
        raise UsageError(
            f"--contribution-to none: in this {di.store.update_rule} store a pattern's attention weight depends on "
            "the output unit; name one (pred, label, a unit number), or rank by similarity with --score raw."
        )
    if queries is not None:
        run = attend_queries(di, queries=queries, source=source, layers=layers, top_k=top_k,
                             contribution_to=contribution, at_step=at_step, step_buckets=step_buckets, score=score)
    else:
        split = _pick_split(di.store, split)
        qs = di.store.queries(split)
        positions = parse_index(index, qs.index, split) if index is not None else np.arange(min(DEFAULT_QUERIES, qs.n))
        run = attend_queries(di, split=split, positions=positions, layers=layers, top_k=top_k,
                             contribution_to=contribution, at_step=at_step, step_buckets=step_buckets, score=score)
    run.settings.update({"by": by, "store": os.path.abspath(store)})
    return run


def _pick_split(store: Any, split: str | None) -> str:
    splits = store.query_splits
    if split is None:
        if not splits:
            raise UsageError(
                f"{store.path} has no recorded queries; pass --queries FILE, or record them with "
                "DualFormCallback(record_queries=('test',)) and trainer.test(...)."
            )
        if "test" in splits:
            return "test"
        if len(splits) == 1:
            return splits[0]
        raise UsageError(f"{store.path} has several query sets ({', '.join(splits)}); choose one with --split.")
    if split not in splits:
        raise UsageError(f"--split {split}: {store.path} has no such query set; it has {', '.join(splits) or 'none'}.")
    return split


def _query_title(run: QueryAttention, j: int) -> str:
    if run.source.startswith("split:"):
        parts = [f"query {run.source[6:]}[{int(run.index[j])}]"]
    else:
        parts = [f"query {j} of {os.path.basename(run.source)}"]
    if run.label[j] >= 0:
        parts.append(f"label {int(run.label[j])}")
    if run.prediction[j] >= 0:
        parts.append(f"predicted {int(run.prediction[j])}" + (" (wrong)" if 0 <= run.label[j] != run.prediction[j] else ""))
    return ", ".join(parts)


def ranked(res: Any, r: int, by: str, kind: str = "top") -> tuple[list[str], list[list[Any]]]:
    """Rows of one query's ranking (``kind``: top, proponents, opponents) as table cells."""
    if by == "example":
        t = {"top": res.top_examples, "proponents": res.proponent_examples, "opponents": res.opponent_examples}[kind]
        if t is None:
            return [], []
        rows = [[i + 1, int(t.index[r, i]), int(t.label[r, i]), int(t.rows[r, i]), float(t.score[r, i])]
                for i in range(t.index.shape[1]) if int(t.index[r, i]) >= 0]
        return ["rank", "index", "label", "rows", "score" if kind == "top" else "contribution"], rows
    t = {"top": res.top, "proponents": res.proponents, "opponents": res.opponents}[kind]
    if t is None:
        return [], []
    rows = [[i + 1, int(t.index[r, i]), int(t.label[r, i]), int(t.epoch[r, i]), int(t.step[r, i]), float(t.score[r, i])]
            for i in range(t.row.shape[1]) if int(t.row[r, i]) >= 0]
    return ["rank", "index", "label", "epoch", "step", "score" if kind == "top" else "contribution"], rows


def _fmt_rows(rows: list[list[Any]]) -> list[list[Any]]:
    return [[*r[:-1], f"{r[-1]:+.4g}"] for r in rows]


def mass_line(res: Any, r: int, n: int = 3) -> str:
    """The labels whose training patterns carry most of the signed attention mass, as shares of |mass|."""
    m = res.mass.get("label")
    if m is None:
        return ""
    signed = m.signed[r].double()
    total = float(m.absolute[r].sum()) or 1.0
    order = signed.argsort(descending=True)[:n].tolist()
    parts = [f"{'none' if int(m.keys[i]) < 0 else int(m.keys[i])}: {100 * float(signed[i]) / total:+.0f}%" for i in order]
    return "mass by label  " + ", ".join(parts)


def render_attend(run: QueryAttention, by: str, store: Any = None) -> str:
    out = []
    steps = ""
    first = next(iter(run.results.values()), None)
    if first is not None:
        steps = f" after {first.at_step} optimizer steps"
    ranking = {"raw": "similarity k . q", "unit": "attention weight for each query's unit, -(Q_s[u] (.) k) . q"}
    scores = sorted({getattr(r, "score", "raw") for r in run.results.values()})
    out.append(f"attention over training patterns{steps}; ranked by {'single patterns' if by == 'pattern' else 'examples (epochs summed)'}"
               f", score = {' / '.join(ranking[s] for s in scores)}")
    for j in range(len(run.index)):
        out.append("")
        out.append(_query_title(run, j))
        for name, res in run.results.items():
            ex = run.rows[name]["example"]
            for r in np.flatnonzero(ex == j).tolist():
                pos = int(run.rows[name]["position"][r])
                err = "" if res.rel_err is None else f", dual vs weights rel. err. {float(res.rel_err[r]):.1e}"
                if res.rel_err is not None and res.dual_source == "certificate":
                    replayed = store is not None and getattr(store, "form", "scalar") == "element-wise"
                    err += " (weights replayed by the certificate)" if replayed else " (memory sums from the certificate)"
                where = f" position {pos}" if len(np.flatnonzero(ex == j)) > 1 else ""
                unit = f", attention weights for unit {int(res.units[r])}" if res.score == "unit" and res.units is not None else ""
                out.append(f"  {name}{where}: {res.rows} rows{err}{unit}")
                headers, rows = ranked(res, r, by, "top")
                if rows:
                    out.append(table(headers, _fmt_rows(rows), indent="    "))
                line = mass_line(res, r)
                if line:
                    out.append("    " + line)
                if res.units is not None:
                    unit = int(res.units[r])
                    for kind in ("proponents", "opponents"):
                        headers, rows = ranked(res, r, by, kind)
                        out.append(f"    {kind} of output unit {unit}" + ("" if rows else ": none"))
                        if rows:
                            out.append(table(headers, _fmt_rows(rows), indent="    "))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------------
def verify_store(path: str, *, samples: int = 256, device: str = "cpu", block_rows: int | None = None, progress: bool = False,
                 write_certificate: bool = False) -> dict[str, Any]:
    """Per layer: the stored certificate, the dual-vs-weights error on sampled training keys and on the
    recorded queries, and the error of the final weights rebuilt from the certificate's stored sums (what
    ``attend`` uses by default), against :func:`lightning_dualform.attend.certificate.tolerance`. Outputs are
    accumulated in float64, so the check measures the store and not its own round-off.

    Args:
        write_certificate: (re)write the certificate first (a complete store whose certificate is missing,
            because a process was killed while writing it or the run used ``certify=False``).
    """
    import torch

    from lightning_dualform.attend.certificate import certify_store, missing_certificate, store_tolerance
    from lightning_dualform.attend.inference import DualInference
    from lightning_dualform.store.shards import read_shard_index

    wrote = False
    if write_certificate:
        if read_shard_index(path) is not None:
            raise UsageError(f"--write-certificate {path}: a DDP run's certificate sums over all shards; write it with "
                             "the run (certify=True), or certify each shard's store separately.")
        certify_store(path, probe=True)
        wrote = True
    with DualInference(path, device=device, block_rows=block_rows, accumulate=torch.float64, progress=progress) as di:
        s = di.store
        tol = store_tolerance(s)
        sampled = di.verify(n_samples=samples)
        recorded: dict[str, float] = {}
        for split in s.query_splits:
            qs = s.queries(split)
            qk = {n: qs.layer_rows(n)["keys"][: max(samples, 1)] for n in qs.layers if n in di.layers}
            qk = {n: k for n, k in qk.items() if len(k)}
            if qk:
                for n, e in di.verify(queries={n: torch.from_numpy(k) for n, k in qk.items()}).items():
                    recorded[n] = max(recorded.get(n, 0.0), e)
        missing = set(missing_certificate(s))
        layers = []
        for name in di.layers:
            lay = di.layer(name)
            cert = lay.attrs.get("certificate_rel_err")
            sums = di.stored_sums_error(name)
            errs = [e for e in (sampled.get(name), recorded.get(name), cert, sums) if e is not None]
            worst = max(errs) if errs else None
            ok = worst is not None and worst <= tol and lay.exact and s.optimizer_exact
            notes = []
            if not (lay.exact and s.optimizer_exact):
                notes.append(lay.inexact_reason or "recorded with exact=False")
            if sums is not None and not sums <= tol:
                notes.append("the certificate's stored sums do not rebuild the final weights")
            if name in missing:
                notes.append("certificate missing: --write-certificate writes it")
            layers.append({"layer": name, "rows": lay.n_rows, "certificate": cert, "sampled": sampled.get(name),
                           "queries": recorded.get(name), "stored_sums": sums, "worst": worst, "ok": bool(ok),
                           "note": "; ".join(notes)})
    return {"path": path, "tolerance": tol, "row_dtype": s.row_dtype, "ok": all(r["ok"] for r in layers), "layers": layers,
            "certificate_written": wrote, "certificate_missing": sorted(missing), "repairs": list(getattr(s, "repairs", []))}


def cmd_verify(args: argparse.Namespace) -> int:
    _check_store_path(args.store)
    _positive(args.samples, "--samples")
    _positive(args.block_rows, "--block-rows")
    out = Output(args.json, "--json")
    try:
        code = _verify(args, out)
    finally:
        out.discard()
    return code


def _verify(args: argparse.Namespace, out: Output) -> int:
    v = verify_store(args.store, samples=args.samples, device=args.device, block_rows=args.block_rows,
                     progress=_progress(args), write_certificate=args.write_certificate)
    if v["certificate_written"]:
        _note(args, f"wrote the certificate of {args.store}")

    def e(x: float | None) -> str:
        return "-" if x is None else f"{x:.2e}"

    rows = [[r["layer"], r["rows"], e(r["certificate"]), e(r["sampled"]), e(r["queries"]), e(r["stored_sums"]),
             ("ok" if r["ok"] else "FAIL") + (f" ({r['note']})" if r["note"] else "")] for r in v["layers"]]
    print(f"{v['path']}: dual form against the trained weights, tolerance {v['tolerance']:.0e} ({v['row_dtype']} rows)")
    print(table(["layer", "rows", "certificate", "training keys", "recorded queries", "stored sums", "verdict"], rows))
    print("exact" if v["ok"] else "NOT exact: at least one layer is beyond the tolerance")
    if v["certificate_missing"]:
        print(f"the store is complete but its certificate is missing for {', '.join(v['certificate_missing'])}: "
              f"`{PROG} verify --write-certificate {args.store}` writes it")
    out.write_text(_json_text(v))
    return 0 if v["ok"] else 1


# ------------------------------------------------------------------------------------------------------
# view
# ------------------------------------------------------------------------------------------------------
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_cache(text: str) -> int | str | None:
    """``--cache``: ``'auto'``, ``'none'`` (None), or a size in bytes with an optional K/M/G/T (binary) unit."""
    t = text.strip().lower()
    if t in ("auto", "none"):
        return None if t == "none" else "auto"
    m = _SIZE.fullmatch(t)
    if m is None:
        raise UsageError(f"--cache {text}: expected auto, none, or a size such as 2G, 512M or 1000000.")
    size = int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2) or "b"))
    if size < 1:
        raise UsageError(f"--cache {text}: the size must be at least one byte (or none).")
    return size


def cmd_view(args: argparse.Namespace) -> int:
    from lightning_dualform.cli.view import serve

    _check_store_path(args.store)
    _positive(args.block_rows, "--block-rows")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0..65535.")
    cache = parse_cache(args.cache)
    return serve(args.store, port=args.port, device=args.device, cache=cache, block_rows=args.block_rows,
                 open_browser=not args.no_browser, warm=not args.no_warm,
                 echo=lambda m: print(m, flush=True))


# ------------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from lightning_dualform.cli.demo import run_demo

    _positive(args.epochs, "--epochs")
    if args.limit is not None and args.limit < 10:
        raise UsageError(f"--limit {args.limit}: expected at least 10 digits.")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a file; pass a folder.")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(args.out) and (not os.path.isdir(parent) or not os.access(parent, os.W_OK)):
        raise UsageError(f"--out {args.out}: cannot create this folder here; choose another path.")
    if os.path.isdir(args.out) and not os.access(args.out, os.W_OK):
        raise UsageError(f"--out {args.out}: the folder is not writable; choose another one.")
    if not args.no_plot:
        from lightning_dualform.plots import require_matplotlib

        require_matplotlib()

    def echo(msg: str) -> None:
        _note(args, msg)

    s = run_demo(args.out, epochs=args.epochs, limit=args.limit, lr=args.lr, seed=args.seed, optimizer=args.optimizer,
                 quiet=args.quiet, progress=_progress(args), plot=not args.no_plot, echo=echo)
    cert = s["certificate"]
    worst = max((c["rel_err"] for c in cert.values()), default=float("nan"))
    exact = all(c["exact"] for c in cert.values())
    print(f"demo finished in {s['seconds']:.0f} s (training {s['fit_seconds']:.0f} s)")
    opt = f"SGD lr {s['lr']:g} momentum 0.9" if s["optimizer"] == "sgd" else f"AdamW lr {s['lr']:g} weight decay 0.01"
    print(f"  data       {s['train_examples']} training / {s['test_examples']} test MNIST digits, {s['epochs']} epoch(s), "
          f"{opt}, clipping 1.0, batch 128")
    print(f"  accuracy   {100 * s['accuracy']:.1f}% on the test digits")
    print(f"  store      {s['store']} ({_human_bytes(s['store_bytes'])})")
    print(f"  exactness  {'exact' if exact else 'NOT exact'}: rebuilt weights within {worst:.1e} relative "
          "(" + ", ".join(f"{k} {c['rel_err']:.1e}" for k, c in cert.items()) + ")")
    if "plot" in s:
        print(f"  picture    {s['plot']} (test digits {', '.join(str(i) for i in s['queries']['index'])})")
    print(f"next: {PROG} info {s['store']}")
    print(f"      {PROG} attend {s['store']} --split test --top-k 5 --plot top.png --json top.json")
    print(f"      {PROG} verify {s['store']}")
    return 0
