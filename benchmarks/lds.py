"""The linear datamodeling score (LDS) of every influence method, side by side with peers and baselines.

Two settings (``docs/benchmarks.md``, "Attribution: LDS"):

- **single-model** (MAGIC's): one initialisation and one data order; each of ``--subsets`` retrainings gives
  a random ``--drop`` fraction of the training examples loss weight 0 (same batches, the batch mean still over
  the full batch), the rest 1. The prediction for a subset is minus the sum of the dropped examples' scores.
- **standard** (TRAK's): each retraining trains on a random ``--alpha`` fraction of the examples from its own
  initialisation and order; the prediction is the sum of the kept examples' scores (from the one base model).

For each test query the LDS is Spearman's correlation over subsets between the prediction and the retrained
model's margin (true-class logit minus logsumexp of the others); the table reports its mean over queries and
the standard error of that mean. Every method also reports its extra training cost (checkpoints, the store)
and its attribution time. Peers (captum, kronfluence, dattri) run where they import: install them in a venv of
your own, never as project dependencies.

The training recipe: ``--optimizer`` (SGD lr 0.05; SGD lr 0.01 momentum 0.9; AdamW lr 1e-3, weight decay 0.01),
``--lr`` (in place of those learning rates), AdamW's ``--eps`` (torch's default 1e-8), ``--warmup`` (the fraction
of the steps over which the learning rate rises linearly to its value; 0: none) and ``--batch``. Every training
runs on ``--threads`` threads (1 by default) so that the retrainings that define the truth are reproducible to the
bit; the script checks it (``reproducible_max_abs_diff`` in the JSON: the base run trained twice).

    python benchmarks/lds.py --setting single --optimizer sgd --train 1000 --epochs 3 --drop 0.05 --subsets 100
    python benchmarks/lds.py --setting single --optimizer adamw --eps 1e-4 --warmup 0.25
    python benchmarks/lds.py --setting standard --optimizer adamw --train 2000 --epochs 5 --alpha 0.5 --subsets 128
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO  # noqa: E402

MNIST = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "mnist_npm10k.npz"))
if not os.path.exists(MNIST):
    MNIST = "/work/shared/data/mnist_npm10k.npz"


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


@dataclass(frozen=True)
class Recipe:
    """How a model of the benchmark is trained: the optimizer, its learning rate, AdamW's ``eps``, a linear warm-up
    and the batch size."""

    optimizer: str = "sgd"
    eps: float = 1e-8
    warmup: float = 0.0
    learning_rate: float | None = None  # None: the optimizer's default below
    batch: int = 64

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return {"sgd": 0.05, "sgd-momentum": 0.01, "adamw": 1e-3}[self.optimizer]

    @property
    def tag(self) -> str:
        """The optimizer, then whatever differs from the defaults (for file names)."""
        out = self.optimizer
        if self.learning_rate is not None:
            out += f"-lr{self.learning_rate:g}"
        if self.optimizer == "adamw" and self.eps != 1e-8:
            out += f"-eps{self.eps:g}"
        if self.warmup:
            out += f"-warmup{self.warmup:g}"
        if self.batch != 64:
            out += f"-batch{self.batch}"
        return out

    def make(self, params, n_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr)
        elif self.optimizer == "sgd-momentum":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        elif self.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01, eps=self.eps)
        else:
            raise ValueError(self.optimizer)
        w = int(round(self.warmup * n_steps))
        if not w:
            return opt, None
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (w + 1)))


def make_opt(name: str, params) -> torch.optim.Optimizer:
    """The optimizer of ``Recipe(name)`` (no warm-up)."""
    return Recipe(name).make(params, 1)[0]


def load_data(n_train: int, n_test: int, seed: int = 0, held_out: bool = False):
    """``(x_train, y_train, x_test, y_test)`` from a seeded permutation of the 10,000 digits; with ``held_out``,
    also every digit after those (for the trained model's accuracy)."""
    d = np.load(MNIST)
    x = torch.tensor(d["images"].reshape(-1, 784), dtype=torch.float32) / 255.0
    y = torch.tensor(d["labels"], dtype=torch.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:n_train], perm[n_train:n_train + n_test]
    if held_out:
        rest = perm[n_train + n_test:]
        return x[tr], y[tr], x[te], y[te], x[rest], y[rest]
    return x[tr], y[tr], x[te], y[te]


def orders(n: int, epochs: int, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [o[i:i + batch] for o in (rng.permutation(n) for _ in range(epochs)) for i in range(0, n, batch)]


def fit(x, y, batches, recipe: Recipe | str, init_seed: int, weights: torch.Tensor | None = None,
        record: str | None = None, checkpoints: list | None = None, steps_per_epoch: int = 0) -> nn.Module:
    """Train with per-example loss weights (``loss = sum_i w_i l_i / B`` over each batch)."""
    from lightning_dualform import DualFormRecorder

    recipe = Recipe(recipe) if isinstance(recipe, str) else recipe
    model = make_model(init_seed)
    opt, sched = recipe.make(model.parameters(), len(batches))
    w = torch.ones(len(y)) if weights is None else weights
    rec = DualFormRecorder(record, model, opt, overwrite=True) if record else None
    if rec is not None:
        rec.start()
    for s, idx in enumerate(batches):
        idx_t = torch.as_tensor(idx)
        if rec is not None:
            rec.batch(indices=idx_t, labels=y[idx_t], inputs=x[idx_t], epoch=s // max(steps_per_epoch, 1))
        opt.zero_grad()
        loss = (w[idx_t] * F.cross_entropy(model(x[idx_t]), y[idx_t], reduction="none")).sum() / len(idx_t)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if checkpoints is not None and steps_per_epoch and (s + 1) % steps_per_epoch == 0:
            checkpoints.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    if rec is not None:
        rec.finish()
    return model


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    from lightning_dualform.attribute.targets import margin

    with torch.no_grad():
        return margin(model(x), y).numpy().astype(np.float64)


def spearman_per_query(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation per query (columns) over subsets (rows)."""
    def ranks(a):
        return np.argsort(np.argsort(a, axis=0), axis=0).astype(np.float64)
    rp, rt = ranks(pred), ranks(truth)
    rp -= rp.mean(0)
    rt -= rt.mean(0)
    den = np.sqrt((rp**2).sum(0) * (rt**2).sum(0))
    return np.where(den > 0, (rp * rt).sum(0) / np.maximum(den, 1e-300), 0.0)


# -- baselines ------------------------------------------------------------------------------------------
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()


def hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[:4](x)


def baselines(model, xtr, ytr, xte, yte) -> dict[str, np.ndarray]:
    same = (yte[:, None] == ytr[None, :]).double() * 2 - 1
    pix = cosine(xte, xtr).double()
    hid = cosine(hidden(model, xte), hidden(model, xtr)).double()
    rng = np.random.default_rng(0)
    return {"pixel similarity": pix.numpy(), "hidden similarity": hid.numpy(),
            "label-signed pixel similarity": (pix * same).numpy(),
            "label-signed hidden similarity": (hid * same).numpy(),
            "random": rng.standard_normal(pix.shape)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=("single", "standard"), default="single")
    p.add_argument("--optimizer", choices=("sgd", "sgd-momentum", "adamw"), default="sgd")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW's eps")
    p.add_argument("--warmup", type=float, default=0.0, help="fraction of the steps of linear learning-rate warm-up")
    p.add_argument("--lr", type=float, default=None, help="the learning rate (default: the optimizer's above)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every training (fixed: reproducible)")
    p.add_argument("--seed", type=int, default=0,
                   help="single-model: the base run's initialisation (and data order, seed + 1); 0 as in the docs")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--drop", type=float, default=0.05, help="single-model: fraction dropped per subset")
    p.add_argument("--alpha", type=float, default=0.5, help="standard: fraction kept per subset")
    p.add_argument("--subsets", type=int, default=100)
    p.add_argument("--methods", default="first_order,every_step,metagradient,baselines,tracincp,ekfac,trak")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--ensemble", type=int, default=1,
                   help="also average first order (and TracInCP, TRAK) over this many recorded runs of their own seeds")
    p.add_argument("--reuse", default=None, metavar="NPZ",
                   help="the retrainings' masks and margins saved by an earlier run with the same settings")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(args.optimizer, args.eps, args.warmup, args.lr, args.batch)
    tag = recipe.tag + (f"-seed{args.seed}" if args.seed else "")  # the results' file names
    from lightning_dualform import StoreReader
    from lightning_dualform.attribute import influence

    xtr, ytr, xte, yte, xho, yho = load_data(args.train, args.test, held_out=True)
    spe = -(-args.train // args.batch)
    batches = orders(args.train, args.epochs, args.batch, seed=1 + args.seed)
    methods = args.methods.split(",")
    work = tempfile.mkdtemp(dir=args.workdir)
    store_path = os.path.join(work, "base.h5")
    result: dict[str, Any] = {"args": vars(args), "load": os.getloadavg(), "methods": {}}

    # the base run: plain, then recorded (the store's extra cost), then with per-epoch checkpoints (TracInCP's)
    # each timed twice, in turn, the faster kept (a shared machine's load comes and goes)
    t_fit = t_rec = t_ckpt = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        base = fit(xtr, ytr, batches, recipe, args.seed)
        t_fit = min(t_fit, time.perf_counter() - t)
        t = time.perf_counter()
        fit(xtr, ytr, batches, recipe, args.seed, record=store_path, steps_per_epoch=spe)
        t_rec = min(t_rec, time.perf_counter() - t)
        ckpts: list = []
        t = time.perf_counter()
        fit(xtr, ytr, batches, recipe, args.seed, checkpoints=ckpts, steps_per_epoch=spe)
        t_ckpt = min(t_ckpt, time.perf_counter() - t)
    result.update(fit_seconds=t_fit, recorded_fit_seconds=t_rec, checkpointed_fit_seconds=t_ckpt, recipe=tag)
    # the truth is only as good as its retrainings: the same training twice must give the same model, to the bit
    again = fit(xtr, ytr, batches, recipe, args.seed, weights=torch.ones(len(ytr)))
    result["reproducible_max_abs_diff"] = float(np.abs(margins(again, xte, yte) - margins(base, xte, yte)).max())
    with torch.no_grad():
        result["held_out_accuracy"] = float((base(xho).argmax(1) == yho).float().mean())
    print(f"the base run retrained: margins within {result['reproducible_max_abs_diff']:.1e}; accuracy on the "
          f"{len(yho)} held-out digits {result['held_out_accuracy']:.3f}", flush=True)
    print(f"fit {t_fit:.2f} s, recorded {t_rec:.2f} s, with checkpoints {t_ckpt:.2f} s; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    # retrainings
    rng = np.random.default_rng(123)
    n = args.train
    masks = np.zeros((args.subsets, n), dtype=bool)  # True: kept
    truth = np.zeros((args.subsets, args.test))
    t = time.perf_counter()
    saved = os.path.join(args.out, f"lds-{args.setting}-{tag}-retrained.npz")
    if args.reuse:
        got = np.load(args.reuse)
        masks, truth = got["masks"], got["truth"]
        if masks.shape != (args.subsets, n) or truth.shape != (args.subsets, args.test):
            raise SystemExit(f"--reuse {args.reuse}: shapes {masks.shape}, {truth.shape} do not match the settings")
    for j in range(0 if args.reuse else args.subsets):
        if args.setting == "single":
            keep = np.ones(n, dtype=bool)
            keep[rng.choice(n, int(round(args.drop * n)), replace=False)] = False
            model = fit(xtr, ytr, batches, recipe, args.seed, weights=torch.as_tensor(keep, dtype=torch.float32))
        else:
            keep = np.zeros(n, dtype=bool)
            keep[rng.choice(n, int(round(args.alpha * n)), replace=False)] = True
            sub = np.flatnonzero(keep)
            model = fit(xtr[sub], ytr[sub], orders(len(sub), args.epochs, args.batch, seed=1000 + j), recipe, 1000 + j)
        masks[j] = keep
        truth[j] = margins(model, xte, yte)
    result["retrain_seconds"] = time.perf_counter() - t
    print(f"{args.subsets} retrainings in {result['retrain_seconds']:.1f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    if not args.reuse:
        np.savez(saved, masks=masks, truth=truth)

    def score(name: str, table: np.ndarray, seconds: float, extra_train: float, note: str = "") -> None:
        table = np.asarray(table, dtype=np.float64)  # (n_test, n_train), columns in dataset order
        if args.setting == "single":
            pred = -((~masks).astype(np.float64) @ table.T)
        else:
            pred = masks.astype(np.float64) @ table.T
        lds = spearman_per_query(pred, truth)
        mean, se = float(lds.mean()), float(lds.std(ddof=1) / np.sqrt(len(lds)))
        # the subsets are a sample too: the bootstrap over them gives the other half of the uncertainty
        boot = np.random.default_rng(7)
        draws = [spearman_per_query(pred[b], truth[b]).mean()
                 for b in (boot.integers(0, len(pred), len(pred)) for _ in range(100))]
        result["methods"][name] = {"lds": mean, "se": se, "se_subsets": float(np.std(draws, ddof=1)),
                                   "seconds": seconds, "extra_training_seconds": extra_train, "note": note}
        m = result["methods"][name]
        print(f"{name:34s} LDS {mean:+.3f} ± {se:.3f} (subsets ± {m['se_subsets']:.3f})   "
              f"attribution {seconds:7.2f} s   extra training {extra_train:6.2f} s", flush=True)
        json.dump(result, open(os.path.join(args.out, f"lds-{args.setting}-{tag}.json"), "w"), indent=1)

    with StoreReader(store_path, probe=False) as store:  # written and closed by this process just now
        for method in ("first_order", "every_step", "metagradient"):
            if method not in methods:
                continue
            t = time.perf_counter()
            res = influence(store, base, xte, yte, method=method, query_batch=50)
            sec = time.perf_counter() - t
            assert list(res.examples) == list(range(n))
            if res.replay is not None:
                result[f"{method}_replay"] = res.replay.to_dict()
            score(f"lightning-dualform {method}", res.scores.numpy(), sec, t_rec - t_fit)
        for target in ("loss",):
            if "first_order" in methods:
                t = time.perf_counter()
                res = influence(store, base, xte, yte, method="first_order", target=target)
                score("lightning-dualform first_order (f=loss, negated)", -res.scores.numpy(), time.perf_counter() - t,
                      t_rec - t_fit)
    if args.ensemble > 1:
        # several recorded runs, each from its own initialisation and order (TRAK's ensembles): their tables averaged
        t0 = time.perf_counter()
        tables, models, ckpt_sets = [], [], []
        extra = 0.0
        for e in range(args.ensemble):
            path = os.path.join(work, f"ens{e}.h5")
            t = time.perf_counter()
            cks: list = []
            m = fit(xtr, ytr, orders(n, args.epochs, args.batch, seed=500 + e), recipe, 500 + e, record=path,
                    steps_per_epoch=spe, checkpoints=cks)
            extra += time.perf_counter() - t
            models.append(m)
            ckpt_sets.append(cks)
            with StoreReader(path, probe=False) as st:
                tables.append(influence(st, m, xte, yte).scores.numpy())
        score(f"lightning-dualform first_order, {args.ensemble} runs", np.mean(tables, 0),
              time.perf_counter() - t0 - extra, extra)
        result["ensemble_models"] = len(models)
    if "baselines" in methods:
        for name, tab in baselines(base, xtr, ytr, xte, yte).items():
            score(name, tab, 0.0, 0.0)
    try:
        import lds_peers
    except ImportError as err:  # pragma: no cover
        print(f"peers skipped: {err}")
        lds_peers = None
    if lds_peers is not None:
        for key, fn in (("tracincp", lds_peers.captum_tracincp), ("ekfac", lds_peers.kronfluence_ekfac),
                        ("trak", lds_peers.dattri_trak)):
            if key not in methods:
                continue
            try:
                t = time.perf_counter()
                name, tab, extra = fn(base=base, ckpts=ckpts, xtr=xtr, ytr=ytr, xte=xte, yte=yte, args=args, work=work,
                                      make_model=make_model, t_ckpt=t_ckpt - t_fit, lr=recipe.lr)
                score(name, tab, time.perf_counter() - t, extra)
                if args.ensemble > 1 and key in ("tracincp", "trak"):
                    t = time.perf_counter()
                    tabs = [fn(base=m, ckpts=c, xtr=xtr, ytr=ytr, xte=xte, yte=yte, args=args, work=work,
                               make_model=make_model, t_ckpt=0.0, lr=recipe.lr)[1] for m, c in zip(models, ckpt_sets)]
                    score(f"{name}, {args.ensemble} runs", np.mean(tabs, 0), time.perf_counter() - t, extra)
            except Exception as err:  # a peer that fails is reported, not fatal
                print(f"{key}: failed ({type(err).__name__}: {err})", flush=True)
                result["methods"][key] = {"error": f"{type(err).__name__}: {err}"}
    result["load_end"] = os.getloadavg()
    json.dump(result, open(os.path.join(args.out, f"lds-{args.setting}-{tag}.json"), "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
