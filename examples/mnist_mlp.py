"""The paper's MNIST study: a 784-800-800-10 MLP trained by SGD, read as attention over its training digits.

Irie, Csordás and Schmidhuber (ICML 2022), section 4: batch 128, SGD with momentum 0.9, learning rate
3e-3, gradient norm clipping 1.0, about 5,000 steps. By default this script trains on the 8,000 training
digits of the embedded 10,000-digit MNIST subset for 300 steps (a few minutes on a 2-core CPU, store
about 1.2 GB... see --hidden to shrink it) and analyses 500 test digits. ``--data-dir`` with the standard IDX
files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``) trains on the full 60,000 digits; add
``--max-steps 5000`` for the paper's run.

Outputs in ``--out``: ``mnist.h5`` (the store), ``votes.md``, ``topk.png``, ``score_curves.png``,
``top_steps.png``, ``class_mass.png``, ``summary.json``. With ``--optimizer adamw`` the model trains with
``torch.optim.AdamW`` (``--adamw-lr``, weight decay 0.01; its dual form is exact too), and the same run with
SGD goes into ``mnist_sgd.h5``: ``sgd_vs_adamw.png`` shows, for the same test digits, the top training
digits of both runs.

    python examples/mnist_mlp.py --out runs/mnist
    python examples/mnist_mlp.py --optimizer adamw --out runs/mnist-adamw
    python examples/mnist_mlp.py --data-dir ~/data/mnist --max-steps 5000 --out runs/mnist-full
"""

from __future__ import annotations

import gzip
import os
import struct
import sys
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch

import common
from lightning_dualform.datasets import MNIST_CLASSES, load_images, split

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (plain or ``.gz``) as a uint8 array: images ``(N, 28, 28)`` or labels ``(N,)``.

    Raises:
        ValueError: not an IDX file of unsigned bytes, or shorter than its header says.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} bytes of data; the file is truncated.")
    return body.reshape(shape)


def load_idx_dir(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``train_images, train_labels, test_images, test_labels`` from a folder of IDX files."""
    found = {}
    for key, name in IDX_FILES.items():
        for cand in (name, name + ".gz", name.replace("-idx", ".idx"), name.replace("-idx", ".idx") + ".gz"):
            if os.path.isfile(os.path.join(data_dir, cand)):
                found[key] = os.path.join(data_dir, cand)
                break
    missing = [IDX_FILES[k] for k in IDX_FILES if k not in found]
    if missing:
        raise FileNotFoundError(f"--data-dir {data_dir}: missing {missing} (plain or .gz). Leave --data-dir out to use the embedded digits.")
    arrays = {k: read_idx(p) for k, p in found.items()}
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def tensors(images: np.ndarray, labels: np.ndarray) -> common.IndexedTensors:
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return common.IndexedTensors(x, torch.from_numpy(labels.astype(np.int64)))


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    p.add_argument("--data-dir", default=None, help="folder with the standard MNIST IDX files (default: the embedded 10k digits)")
    p.add_argument("--hidden", type=int, default=800, help="width of the two hidden layers (the paper: 800)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: the paper's; adamw: torch.optim.AdamW, plus the same run with SGD beside it (sgd_vs_adamw.png)")
    p.add_argument("--adamw-lr", type=float, default=1e-3, help="AdamW's learning rate (with --optimizer adamw)")
    args = p.parse_args(argv)
    out = common.prepare_out(args, "mnist_mlp")
    pl.seed_everything(args.seed, verbose=False)
    try:
        if args.data_dir:
            tri, trl, tei, tel = load_idx_dir(args.data_dir)
        else:
            images, labels = load_images("mnist")
            train, test = split(len(labels), 0.2, args.seed)
            tri, trl, tei, tel = images[train], labels[train], images[test], labels[test]
    except (FileNotFoundError, ValueError) as err:
        print(f"mnist_mlp: {err}", file=sys.stderr)
        return 2
    train_set, test_set = tensors(tri, trl), tensors(tei, tel)
    to_image = lambda x: np.asarray(x).reshape(28, 28)  # noqa: E731
    adamw = args.optimizer == "adamw"
    lr = args.adamw_lr if adamw else args.lr
    store = os.path.join(out, "mnist.h5")
    accuracy = {}
    for opt, path in ((("sgd", os.path.join(out, "mnist_sgd.h5")),) if adamw else ()) + ((args.optimizer, store),):
        pl.seed_everything(args.seed, verbose=False)  # the same initial weights and batches for both runs
        train, test = common.loaders(args, train_set, test_set)
        model = common.Classifier(common.mlp(784, args.hidden), lr=args.adamw_lr if opt == "adamw" else args.lr,
                                  momentum=args.momentum, optimizer=opt)
        common.fit_and_test(args, model, path, train, test)
        accuracy[opt] = model.accuracy
    summary = common.analyse_classifier(
        store, out, args, classes=MNIST_CLASSES, to_image=to_image,
        title=f"MNIST, MLP 784-800-800-10, {'AdamW' if adamw else 'SGD'}",
        extra={"test_accuracy": accuracy[args.optimizer], "train_examples": len(train_set), "test_examples": len(test_set),
               "lr": lr, "optimizer": args.optimizer, **({"sgd_test_accuracy": accuracy["sgd"]} if adamw else {})},
    )
    if adamw:
        compare(out, args, to_image)
    print(f"mnist_mlp: test accuracy {100 * accuracy[args.optimizer]:.1f}% after {summary['steps']} steps; outputs in {out}")
    print(open(os.path.join(out, "votes.md")).read())
    return 0


def compare(out: str, args, to_image) -> str:
    """``sgd_vs_adamw.png``: the same test digits (two right, one wrong in the AdamW run) in both runs."""
    from lightning_dualform import DualInference
    from lightning_dualform.analysis import attend_recorded

    runs = {}
    with DualInference(os.path.join(out, "mnist_sgd.h5"), device="cpu") as sgd, \
            DualInference(os.path.join(out, "mnist.h5"), device="cpu") as adamw:
        for name, di in (("SGD", sgd), ("AdamW", adamw)):
            layers = common.linear_layers(di)
            runs[name] = (di, attend_recorded(di, "test", layers=layers[-1:], limit=args.queries, top_k=args.top_k,
                                              contribution_to="pred"))
        run = runs["AdamW"][1]
        picks = common.pick_examples(run.label, run.prediction)
        path = os.path.join(out, "sgd_vs_adamw.png")
        common.plot_runs_side_by_side(runs, picks, path, MNIST_CLASSES, to_image, args.top_k)
    return path


if __name__ == "__main__":
    sys.exit(main())
