"""CIFAR-10 as in the paper: the MLP (3072-800-800-10) and a small CNN, read as attention over training images.

There is no embedded CIFAR-10: pass ``--data-dir`` with the standard python batches (``data_batch_1`` ..
``data_batch_5`` and ``test_batch``, as in ``cifar-10-batches-py`` from the CIFAR-10 page).

Those batches are Python pickles, and unpickling a file can run any code its author chose. They are
therefore read by :class:`SafeUnpickler`, which resolves only the handful of globals the real files
need (numpy's array reconstruction, ``_frombuffer`` and dtype; plain dicts, lists, bytes, str and int need no global
at all) and refuses everything else with an error, so a hostile file fails instead of running code.

The CNN's convolutions are recorded as linear layers on unfolded patches (one memory row per example and
output location) when the installed lightning-dualform captures ``nn.Conv2d``; otherwise the callback
leaves them out and only the linear head is recorded. Either way the analysis reads the linear layers
(one query row per test image); the conv layers are certified exact but not attended here (a query per
location over rows per location is costly on a CPU).

Outputs in ``--out``: ``cifar10_<model>.h5``, ``votes.md``, ``topk.png``, ``score_curves.png``,
``top_steps.png``, ``class_mass.png``, ``summary.json``.

    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py --model mlp --out runs/cifar-mlp
    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py --model cnn --max-steps 5000
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import sys
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

import common

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch may name: how numpy rebuilds an ndarray, under its old and new paths."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core.multiarray._reconstruct (numpy._core in numpy 2)
    allowed: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = reconstruct
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy.core.numeric._frombuffer: pickle protocol 5 arrays
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = frombuffer
    for mod in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "ndarray")] = np.ndarray
        allowed[(mod, "dtype")] = np.dtype
    for name in ("dict", "list", "bytes", "str", "int"):
        allowed[("builtins", name)] = allowed[("__builtin__", name)] = getattr(builtins, name)
    allowed[("_codecs", "encode")] = _latin1_encode  # how Python 3 pickles bytes under protocol 2
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :func:`_allowed_globals`; anything else is an error."""

    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays, lists, bytes, str and int"
            ) from None


def load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: images uint8 ``(N, 3, 32, 32)`` and labels int64 ``(N,)``.

    Raises:
        ValueError: the file is not a CIFAR-10 batch (or asks for anything but numpy arrays and plain data).
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        d = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({err}).") from err
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}.")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    data, labels = d.get("data"), d.get("labels", d.get("fine_labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be a uint8 array (N, 3072); got {getattr(data, 'dtype', type(data).__name__)} "
                         f"{getattr(data, 'shape', '')}.")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: 'labels' must be {len(data)} integers in 0..9.")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | None, train_batches: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``train_images, train_labels, test_images, test_labels`` from a ``cifar-10-batches-py`` folder."""
    if not data_dir:
        raise FileNotFoundError(
            "CIFAR-10 is not embedded in lightning-dualform (it is 160 MB). Download the python version from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, unpack it, and pass --data-dir path/to/cifar-10-batches-py."
        )
    names = [*TRAIN_FILES[:train_batches], TEST_FILE]
    missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"--data-dir {data_dir}: missing {missing}. Expected the python batches data_batch_1..5 and test_batch "
            "(the folder cifar-10-batches-py of cifar-10-python.tar.gz)."
        )
    parts = [load_batch(os.path.join(data_dir, n)) for n in TRAIN_FILES[:train_batches]]
    test_x, test_y = load_batch(os.path.join(data_dir, TEST_FILE))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y


def small_cnn(channels: int = 16) -> nn.Sequential:
    """Two stride-2 3x3 convolutions (32 -> 16 -> 8) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * channels * 8 * 8, 10),
    )


def to_image(x: np.ndarray) -> np.ndarray:
    """A stored input (normalised CHW) back to an HWC picture in [0, 1]."""
    return np.clip(np.asarray(x, dtype=np.float32).reshape(3, 32, 32).transpose(1, 2, 0), 0, 1)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches (required: no embedded CIFAR)")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the paper's MLP or a small CNN")
    p.add_argument("--hidden", type=int, default=800, help="MLP hidden width")
    p.add_argument("--channels", type=int, default=16, help="CNN channels of the first convolution")
    p.add_argument("--train-batches", type=int, default=5, choices=range(1, 6), metavar="1..5", help="training batch files to load")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    args = p.parse_args(argv)
    try:
        tri, trl, tei, tel = load_cifar10(args.data_dir, args.train_batches)
    except (FileNotFoundError, ValueError) as err:
        print(f"cifar10: {err}", file=sys.stderr)
        return 2
    out = common.prepare_out(args, f"cifar10_{args.model}")
    pl.seed_everything(args.seed, verbose=False)
    if args.limit:
        tri, trl = tri[: args.limit], trl[: args.limit]
    tr_x = torch.from_numpy(tri).float().div_(255.0)  # pictures stay readable: no mean/std normalisation
    te_x = torch.from_numpy(tei).float().div_(255.0)
    train_set = common.IndexedTensors(tr_x, torch.from_numpy(trl))
    test_set = common.IndexedTensors(te_x, torch.from_numpy(tel))
    train, test = common.loaders(args, train_set, test_set)
    net = common.mlp(3072, args.hidden) if args.model == "mlp" else small_cnn(args.channels)
    model = common.Classifier(net, lr=args.lr, momentum=args.momentum)
    store = os.path.join(out, f"cifar10_{args.model}.h5")
    common.fit_and_test(args, model, store, train, test)
    summary = common.analyse_classifier(
        store, out, args, classes=CLASSES, to_image=to_image, title=f"CIFAR-10, {args.model.upper()}",
        extra={"test_accuracy": model.accuracy, "model": args.model,
               "train_examples": len(train_set), "test_examples": len(test_set)},
    )
    print(f"cifar10: {args.model} test accuracy {100 * model.accuracy:.1f}% after {summary['steps']} steps; "
          f"recorded layers {summary['layers']}; outputs in {out}")
    print(open(os.path.join(out, "votes.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
