"""The budgets of an element-wise optimizer's store (issue 15), AdamW beside SGD in one run.

The paper's MLP (784-800-800-10, ReLU, batch 128, gradient clipping 1.0) trains on ``--examples`` (20,000)
Fashion-MNIST images (the 70,000-image file of ../shared/data, or the embedded 10,000 repeated) for
``--epochs`` (2), once with SGD (lr 3e-3, momentum 0.9) and once with AdamW (lr 1e-3, weight decay 0.01).

- ``size``: the bytes of each store beyond its rows (keys, values and their per-row columns): per-step
  tables, the optimizer state before the first step, the certificate's sums or replayed weights, raw
  inputs; budget: AdamW's extra bytes at most 25% of its rows' bytes. Also the certificate's time.
- ``overhead``: fit time with ``DualFormCallback`` over fit time without, for each optimizer, in
  ``--repeats`` (3) rounds that run the four fits in an order rotated by one per round (certificate off,
  timed in ``size``; with ``--certify`` on, as a user gets it); budget: AdamW's ratio at most SGD's plus 0.10.
- ``attend``: ``DualInference.attend`` of ``--queries`` (1,000) held-out images' layer inputs, one unit each
  (``contribution_to="pred"``; top-10, per-example sums, mass: the defaults), over the AdamW store and the
  SGD store, per layer, interleaved over ``--repeats`` rounds; with the peak resident memory the call added
  (sampled every 10 ms). Budget: AdamW at most 2x SGD, memory bounded as for SGD.

Usage::

    python benchmarks/optimizers.py                                   # full (about 10 min on 2 idle cores)
    python benchmarks/optimizers.py --examples 4096 --epochs 1 --repeats 1 --queries 200   # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import FASHION_70K, MLP, machine, median, trainer, write_json  # noqa: E402
from overhead import make_datamodule  # noqa: E402

from lightning_dualform import DualFormCallback, DualInference  # noqa: E402
from lightning_dualform.attend.certificate import certify_store  # noqa: E402
from lightning_dualform.datasets import ImageDataset  # noqa: E402
from lightning_dualform.store.format import ROW_COLUMNS  # noqa: E402

OPTIMIZERS = ("sgd", "adamw")


class OptMLP(MLP):
    """The paper's MLP with SGD (its setting) or AdamW (lr 1e-3, weight decay 0.01: torch's defaults but lr)."""

    def __init__(self, optimizer: str, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.optimizer_name = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)
        return super().configure_optimizers()


def fit(dm: Any, epochs: int, optimizer: str, store: str | None, certify: bool = False) -> tuple[float, OptMLP, float]:
    """``(wall seconds, model, process CPU seconds)`` of one fit (CPU time counts every thread, the writer's too,
    and not the time the process waited for a core: on a shared machine it varies far less than wall time)."""
    model = OptMLP(optimizer)
    cbs = [DualFormCallback(store, overwrite=True, certify=certify)] if store else []
    tr = trainer(epochs, cbs)
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    tr.fit(model, dm.train_dataloader())
    return time.perf_counter() - t0, model, time.process_time() - c0


def store_bytes(path: str) -> dict[str, int]:
    """Bytes on disk by part: rows (keys, values and per-row columns), tables, state, derived, inputs, other."""
    parts = {"rows": 0, "tables": 0, "state": 0, "derived": 0, "weights": 0, "inputs": 0}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        size = obj.id.get_storage_size()
        leaf = name.rsplit("/", 1)[-1]
        if name.startswith("inputs/"):
            parts["inputs"] += size
        elif "/updates/" in name or name in ("update_step", "update_epoch"):
            parts["tables"] += size
        elif "/state/" in name:
            parts["state"] += size
        elif leaf in ("keys", "values", *ROW_COLUMNS):
            parts["rows"] += size
        elif leaf.startswith(("memory_", "replay_")):
            parts["derived"] += size
        else:
            parts["weights"] += size

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    total = os.path.getsize(path)
    parts["file"] = total
    parts["other"] = total - sum(v for k, v in parts.items() if k != "file")
    return parts


class PeakRSS:
    """The largest resident set size (bytes) seen while the block runs, sampled every 10 ms, above the start."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def added(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def layer_inputs(model: OptMLP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of each tracked layer for images ``x`` (the queries of attend)."""
    out: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, o, n=n: out.__setitem__(n, inp[0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model.eval()(x.reshape(len(x), -1))
    for h in hooks:
        h.remove()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=FASHION_70K, help="npz with images/labels (embedded 10k repeated if missing)")
    ap.add_argument("--examples", type=int, default=20000, help="training images")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the timings")
    ap.add_argument("--queries", type=int, default=1000, help="held-out images attended")
    ap.add_argument("--layers", default="net.0,net.2,net.4", help="layers attended")
    ap.add_argument("--parts", default="size,overhead,attend", help="what to measure")
    ap.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reuse", action="store_true", help="reuse the stores already in --workdir (skips 'size')")
    ap.add_argument("--certify", action="store_true",
                    help="'overhead' with the certificate (the callback's default: as training goes for SGD, a replay "
                         "of the store at fit end for AdamW); without it the fits record with certify=False")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"load {info['loadavg_at_start']}, {info['date']}")
    dm = make_datamodule(args.data, args.examples + args.queries, 128, seed=0)
    full = dm.train_set  # the last --queries images are held out: the queries of attend
    held_x = full._x[args.examples:].clone()
    dm.train_set = ImageDataset(full.images, full.labels.numpy(), np.arange(args.examples))
    result: dict[str, Any] = {"machine": info, "args": vars(args)}
    work = args.workdir or tempfile.mkdtemp(prefix="dualform-opt-")
    os.makedirs(work, exist_ok=True)
    stores = {o: os.path.join(work, f"{o}.h5") for o in OPTIMIZERS}
    models: dict[str, OptMLP] = {}
    try:
        # -- stores, their size and their certificate ------------------------------------------------
        result["size"] = {}
        for o in OPTIMIZERS if not args.reuse else ():
            t, models[o], _ = fit(dm, args.epochs, o, stores[o], certify=False)
            t0 = time.perf_counter()
            cert = certify_store(stores[o])
            t_cert = time.perf_counter() - t0
            b = store_bytes(stores[o])
            result["size"][o] = {**b, "fit_s": t, "certificate_s": t_cert,
                                 "certificate": {k: v.rel_err for k, v in cert.items()}}
        print("\nstore bytes (MB) by part, and the certificate")
        print(f"  {'optimizer':<9} {'rows':>9} {'tables':>7} {'state':>7} {'derived':>8} {'inputs':>7} {'weights':>8} "
              f"{'other':>6} {'file':>9}  extra/rows  certificate (s, max rel. err.)")
        for o, r in result["size"].items():
            extra = r["file"] - r["rows"] - r["inputs"]
            r["extra_over_rows"] = extra / r["rows"]
            mb = {k: v / 1e6 for k, v in r.items() if isinstance(v, int)}
            print(f"  {o:<9} {mb['rows']:9.1f} {mb['tables']:7.2f} {mb['state']:7.2f} {mb['derived']:8.2f} "
                  f"{mb['inputs']:7.1f} {mb['weights']:8.2f} {mb['other']:6.2f} {mb['file']:9.1f}  {100 * extra / r['rows']:8.2f}%"
                  f"   {r['certificate_s']:.1f} s, {max(r['certificate'].values()):.1e}")
        print("  (extra = file - rows - raw inputs: the raw inputs are stored alike for every optimizer)")

        if args.reuse:  # the trained models, from the stores' final weights
            for o in OPTIMIZERS:
                models[o] = OptMLP(o)
                with h5py.File(stores[o], "r") as f:
                    for name, m in models[o].named_modules():
                        if isinstance(m, torch.nn.Linear):
                            m.weight.data = torch.from_numpy(f["layers"][name]["weight_final"][()])
                            m.bias.data = torch.from_numpy(f["layers"][name]["bias_final"][()])

        # -- training overhead ------------------------------------------------------------------------
        if "overhead" in parts:
            runs = [(o, cb) for o in OPTIMIZERS for cb in (False, True)]
            times: dict[tuple[str, bool], list[float]] = {r: [] for r in runs}
            cpu: dict[tuple[str, bool], list[float]] = {r: [] for r in runs}
            ratios: dict[str, list[float]] = {o: [] for o in OPTIMIZERS}
            cpu_ratios: dict[str, list[float]] = {o: [] for o in OPTIMIZERS}
            fit(dm, 1, "sgd", None)  # warm-up
            for rep in range(args.repeats):
                order = runs[rep % len(runs):] + runs[: rep % len(runs)]
                got, got_cpu = {}, {}
                for o, cb in order:
                    t, _, c = fit(dm, args.epochs, o, os.path.join(work, "overhead.h5") if cb else None,
                                  certify=args.certify)
                    got[(o, cb)], got_cpu[(o, cb)] = t, c
                    times[(o, cb)].append(t)
                    cpu[(o, cb)].append(c)
                    if cb:
                        os.remove(os.path.join(work, "overhead.h5"))
                for o in OPTIMIZERS:
                    ratios[o].append(got[(o, True)] / got[(o, False)])
                    cpu_ratios[o].append(got_cpu[(o, True)] / got_cpu[(o, False)])
            result["overhead"] = {o: {"ratios": ratios[o], "median": median(ratios[o]),
                                      "min_over_min": min(times[(o, True)]) / min(times[(o, False)]),
                                      "cpu_ratios": cpu_ratios[o], "cpu_median": median(cpu_ratios[o]),
                                      "times": {str(cb): times[(o, cb)] for cb in (False, True)},
                                      "cpu": {str(cb): cpu[(o, cb)] for cb in (False, True)}} for o in OPTIMIZERS}
            print("\nfit with the callback over without: wall (median of rounds; min/min) and process CPU time (median)")
            for o in OPTIMIZERS:
                r = result["overhead"][o]
                print(f"  {o:<6} wall {r['median']:.3f} ({r['min_over_min']:.3f})   CPU {r['cpu_median']:.3f}   fits without: "
                      + ", ".join(f"{t:.1f}" for t in r["times"]["False"]) + " s")
            for key, what in (("median", "wall"), ("min_over_min", "wall min/min"), ("cpu_median", "CPU")):
                d = result["overhead"]["adamw"][key] - result["overhead"]["sgd"][key]
                print(f"  AdamW - SGD ({what}): {d:+.3f} (budget +0.10)")

        # -- attend ----------------------------------------------------------------------------------
        if "attend" in parts:
            x = held_x
            result["attend"] = {}
            print(f"\nattend of {len(x)} queries, one unit each (contribution_to='pred'), top-10, per-example, mass")
            print(f"  {'layer':<6} {'SGD s':>8} {'AdamW s':>8} {'ratio':>6} {'SGD MB':>8} {'AdamW MB':>9}  units  score")
            for name in args.layers.split(","):
                t = {o: [] for o in OPTIMIZERS}
                mem = {o: [] for o in OPTIMIZERS}
                units = {}
                for rep in range(args.repeats):
                    for o in (OPTIMIZERS if rep % 2 == 0 else OPTIMIZERS[::-1]):
                        q = layer_inputs(models[o], x)[name]
                        gc.collect()
                        with DualInference(stores[o], device="cpu") as di, PeakRSS() as peak:
                            t0 = time.perf_counter()
                            res = di.attend(name, q, top_k=10, contribution_to="pred")
                            t[o].append(time.perf_counter() - t0)
                        mem[o].append(peak.added)
                        units[o] = (len(torch.unique(res.units)), res.score, res.dual_source)
                r = {o: {"s": t[o], "median_s": median(t[o]), "peak_added_mb": max(mem[o]) / 1e6, "units": units[o][0],
                         "score": units[o][1], "dual_source": units[o][2]} for o in OPTIMIZERS}
                r["ratio"] = r["adamw"]["median_s"] / r["sgd"]["median_s"]
                result["attend"][name] = r
                print(f"  {name:<6} {r['sgd']['median_s']:8.2f} {r['adamw']['median_s']:8.2f} {r['ratio']:6.2f} "
                      f"{r['sgd']['peak_added_mb']:8.0f} {r['adamw']['peak_added_mb']:9.0f}  {r['adamw']['units']:5d}  "
                      f"{r['sgd']['score']}/{r['adamw']['score']}")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    write_json(args.out, "optimizers.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
