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

The authors' setting (``sweeps/ff_as_attention/ff_as_attention_cifar10_10samples.yaml``): the MLP, inputs
standardised per channel with the training set's statistics, 5,000 steps of batch 128, SGD lr 3e-3 with momentum
0.9, clipping 1.0, 5 seeds, ``|k·q|``: ``--paper``. The fast default standardises too (``--raw-pixels`` feeds [0, 1]).

Outputs in ``--out``: ``paper_tables.md``, ``paper_results.json`` (the paper's measures, both scores, mean ± std
over ``--seeds``), ``study_*.png``; for one seed without ``--paper`` also ``cifar10_<model>.h5``, ``votes.md``,
``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png``, ``summary.json``.

    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py --model mlp --out runs/cifar-mlp
    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py --model cnn --max-steps 5000
    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py --paper --out runs/paper-cifar
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import os
import pickle
import sys
import time
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

import common
import study

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


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (``ddof=1``) of uint8 ``(N, 3, 32, 32)`` images: the authors'
    ``measure_mean_std``. Returns ``(3, 1, 1)`` arrays."""
    x = images.astype(np.float64)
    return x.mean(axis=(0, 2, 3)).reshape(3, 1, 1), x.std(axis=(0, 2, 3), ddof=1).reshape(3, 1, 1)


def to_inputs(images: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor:
    """uint8 ``(N, 3, 32, 32)`` -> float32, standardised per channel, or in [0, 1] when ``stats`` is None."""
    if stats is None:
        return torch.from_numpy(images).float().div_(255.0)
    return torch.from_numpy(((images.astype(np.float32) - stats[0]) / stats[1]).astype(np.float32))


def to_image(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """A stored input (CHW, standardised or in [0, 1]) back to an HWC picture in [0, 1]."""
    x = np.asarray(x, dtype=np.float32).reshape(3, 32, 32)
    if stats is not None:
        x = (x * stats[1] + stats[0]) / 255.0
    return np.clip(x.transpose(1, 2, 0), 0, 1)


PAPER = {"max_steps": 5000, "dtype": "float16"}


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    p.add_argument("--data-dir", default=None, help="folder with the CIFAR-10 python batches (required: no embedded CIFAR)")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the paper's MLP or a small CNN")
    p.add_argument("--hidden", type=int, default=800, help="MLP hidden width")
    p.add_argument("--channels", type=int, default=16, help="CNN channels of the first convolution")
    p.add_argument("--train-batches", type=int, default=5, choices=range(1, 6), metavar="1..5", help="training batch files to load")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    study.add_study_args(p)
    args = study.parse(p, argv, PAPER)
    try:
        tri, trl, tei, tel = load_cifar10(args.data_dir, args.train_batches)
    except (FileNotFoundError, ValueError) as err:
        print(f"cifar10: {err}", file=sys.stderr)
        return 2
    out = common.prepare_out(args, f"cifar10_{args.model}")
    if args.limit:
        tri, trl = tri[: args.limit], trl[: args.limit]
    stats = None if args.raw_pixels else channel_stats(tri)
    train_set = common.IndexedTensors(to_inputs(tri, stats), torch.from_numpy(trl))
    test_set = common.IndexedTensors(to_inputs(tei, stats), torch.from_numpy(tel))
    order = np.random.RandomState(0).permutation(len(tel))[: args.vote_queries]
    train_q = np.random.RandomState(0x123).permutation(len(trl))[: args.train_queries]
    pics = lambda imgs: imgs.transpose(0, 2, 3, 1) / 255.0  # noqa: E731
    query_sets = [study.QuerySet("test", test_set.x[order], tel[order], np.zeros(len(order), np.int64), pics(tei[order])),
                  study.QuerySet("train", train_set.x[train_q], trl[train_q], np.zeros(len(train_q), np.int64), pics(tri[train_q]))]
    setting = (f"CIFAR-10, {args.model.upper()}, {len(train_set)} training / {len(test_set)} test images, "
               f"{'raw [0, 1] pixels' if stats is None else 'standardised per channel'}, {args.max_steps} steps of batch "
               f"{args.batch_size}, SGD lr {args.lr} momentum {args.momentum}, clip {args.clip}, rows {args.dtype}.")
    results = []
    for k in range(args.seeds):
        seed = args.seed + k
        seed_dir = os.path.join(out, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        keep = k == 0 and not (args.paper or args.no_legacy)
        store = os.path.join(out if keep else seed_dir, f"cifar10_{args.model}.h5")
        pl.seed_everything(seed, verbose=False)
        t0, c0 = time.perf_counter(), time.process_time()
        train, test = common.loaders(argparse.Namespace(**{**vars(args), "seed": seed}), train_set, test_set)
        net = common.mlp(3072, args.hidden) if args.model == "mlp" else small_cnn(args.channels)
        model = common.Classifier(net, lr=args.lr, momentum=args.momentum)
        common.fit_and_test(args, model, store, train, test, record_test=not (args.paper or args.no_legacy))
        train_s = time.perf_counter() - t0
        train_cpu_s = time.process_time() - c0
        if keep:
            summary = common.analyse_classifier(
                store, out, args, classes=CLASSES, to_image=lambda x: to_image(x, stats), title=f"CIFAR-10, {args.model.upper()} (k·q mass)",
                extra={"test_accuracy": model.accuracy, "model": args.model, "standardized": stats is not None,
                       "train_examples": len(train_set), "test_examples": len(test_set)},
            )
            print(f"cifar10: recorded layers {summary['layers']}")
        figures = out if k == 0 and study.draws(args, "study") else None
        res = study.study_seed(store, model, query_sets, seed=seed, out=figures, picks=args.picks,
                               classes=CLASSES, dataset_names=("CIFAR-10",), dataset_of=None,
                               train_pictures=lambda idx: pics(tri[idx]), prefix="study")
        res.update(train_s=train_s, train_cpu_s=train_cpu_s, test_accuracy=model.accuracy, steps=args.max_steps)
        with open(os.path.join(seed_dir, "result.json"), "w") as fh:
            json.dump(res, fh, indent=1, default=float)
        results.append(res)
        print(f"cifar10: seed {seed}: {args.model} test accuracy {100 * model.accuracy:.1f}% after {args.max_steps} steps", flush=True)
        if not (args.keep_stores or keep):
            os.remove(store)
    md = study.write_tables(out, results, title=f"CIFAR-10 ({args.model}): the paper's measures", dataset_names=("CIFAR-10",),
                            setting=setting)
    if not args.quiet:
        print(md)
    print(f"cifar10: outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
