"""Attention throughput: ``DualInference.attend`` against the matrix products alone and the raw read.

Builds (once) a store of the paper's MLP 784-800-800-10 trained with SGD momentum on 40,000 Fashion-MNIST
images, then for each layer measures in one process:

  (a) ``attend`` for 1,000 queries with top-k and per-example aggregation (exact float32 scan);
  (b) the same matrix products on the same rows already in memory (``torch.matmul``, one block);
  (c) the raw sequential read of the layer's key and value bytes from the store;

and prints (a) / max(b, c) (goal: <= 1.25), rows/s and GB/s, and the same for the ``scan="bf16"`` mode with
how often its top-k differs from the exact one.

Each of ``--repeat`` rounds times (c), (b), (a) and the bf16 scan one after another; the medians are
reported (the machine may be shared).

``--baseline SRC`` compares two versions of the library instead, in one process: the package under ``SRC``
(e.g. ``/tmp/main/src``, a checkout of another commit) is loaded as ``lightning_dualform_baseline`` beside the
one on the path, and the same ``attend`` calls alternate between them (``--repeat`` each, the order swapped every
round, so that load from other jobs hits both alike); it prints the median wall and process CPU times, their
ratios, and whether both versions gave the same answer (every number of ``to_dict()``).

Run:  python benchmarks/attend.py [--store /tmp/dualform-bench/attend.h5] [--epochs 3] [--layers net.0 net.4]
      python benchmarks/attend.py --baseline /path/to/other/src --layers net.2 net.4 --repeat 8
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import h5py
import numpy as np
import torch

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fashion_mnist_npm70k.npz")


def build_store(path: str, n_train: int, epochs: int, data: str) -> None:
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dualform import DualFormCallback

    d = np.load(data)
    x = torch.from_numpy(d["images"][:n_train].reshape(n_train, -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(d["labels"][:n_train].astype(np.int64))

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(), nn.Linear(800, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: tuple, i: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(0)
    model = MLP()
    trainer = L.Trainer(max_epochs=epochs, callbacks=[DualFormCallback(path, overwrite=True)], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True))
    torch.save(model.state_dict(), path + ".model.pt")


def queries_for(path: str, data: str, n: int) -> dict[str, torch.Tensor]:
    """Each layer's input for ``n`` held-out images (the last ones of the file)."""
    from torch import nn

    net = nn.Sequential(nn.Linear(784, 800), nn.ReLU(), nn.Linear(800, 800), nn.ReLU(), nn.Linear(800, 10))
    net.load_state_dict({k.removeprefix("net."): v for k, v in torch.load(path + ".model.pt").items()})
    d = np.load(data)
    x = torch.from_numpy(d["images"][-n:].reshape(n, -1).astype(np.float32) / 255.0)
    out = {}
    with torch.no_grad():
        out["net.0"] = x
        h = net[1](net[0](x))
        out["net.2"] = h
        out["net.4"] = net[3](net[2](h))
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/dualform-bench/attend.h5", help="store path (built when missing)")
    p.add_argument("--data", default=DATA, help="npz with images and labels")
    p.add_argument("--train", type=int, default=40_000, help="training images")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--queries", type=int, default=1000, help="number of queries")
    p.add_argument("--top-k", type=int, default=10, help="top-k")
    p.add_argument("--step-buckets", type=int, default=20, help="step buckets of the mass (given explicitly, so that "
                   "runs of library versions with other defaults compare)")
    p.add_argument("--block-rows", type=int, default=None, help="DualInference block_rows (default: automatic)")
    p.add_argument("--layers", nargs="*", default=["net.0", "net.2", "net.4"], help="layers to measure")
    p.add_argument("--query-chunk", type=int, default=2048, help="DualInference query_chunk")
    p.add_argument(
        "--repeat", type=int, default=3, help="interleaved rounds of (c), (b), (a), bf16 (medians are reported)"
    )
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 scan")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--baseline", default=None, metavar="SRC",
                   help="compare with the library under SRC (a src/ folder holding lightning_dualform), same process")
    args = p.parse_args()

    from lightning_dualform import DualInference

    if not os.path.exists(args.store):
        t = time.perf_counter()
        build_store(args.store, args.train, args.epochs, args.data)
        print(f"built {args.store} in {time.perf_counter() - t:.1f} s ({os.path.getsize(args.store) / 1e9:.2f} GB)")
    from lightning_dualform.store.format import MEMORY_SUM_MAX_ELEMENTS

    with h5py.File(args.store, "r") as f:
        has_sums = all("memory_weight_final_crc32" in g.attrs for g in f["layers"].values()
                       if int(g.attrs["d_in"]) * int(g.attrs["d_out"]) <= MEMORY_SUM_MAX_ELEMENTS)
    if not has_sums:  # a store written before the certificate kept its sums: add them (what fit end does now)
        from lightning_dualform.attend.certificate import certify_store

        t = time.perf_counter()
        certify_store(args.store)
        print(f"certificate (keeps the memory sums) computed in {time.perf_counter() - t:.1f} s")
    qs = queries_for(args.store, args.data, args.queries)
    if args.baseline:
        compare(args, qs)
        return
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {dev}")
    print("layer  rows  (a) attend s  (b) matmul s  (c) read s  ratio  rows/s  GB/s  | (a') rows s  ratio  "
          "| bf16 s  speed-up  top-k differs")
    with DualInference(args.store, device=dev, block_rows=args.block_rows, query_chunk=args.query_chunk) as di:
        for name in args.layers:
            lay = di.layer(name)
            q = qs[name]
            nbytes = lay.n_rows * (lay.d_in + lay.d_out) * 4

            block = di.rows_per_block(lay)

            def read() -> None:
                for s in range(0, lay.n_rows, block):
                    lay.read(s, s + block, ("keys", "values"))

            rows = lay.read(0, lay.n_rows, ("keys", "values", "step"))
            coef = lay.coefficients()
            k = torch.from_numpy(rows["keys"]).to(dev)
            v = torch.from_numpy(rows["values"]).to(dev)
            c = torch.from_numpy(coef.c_w[rows["step"] - coef.first_step]).float().to(dev)
            qd = q.to(dev)
            del rows

            def matmul() -> None:
                s = torch.matmul(qd, k.t())
                torch.matmul(s * c, v)
                sync()

            unit = "pred" if name == "net.4" else None

            def attend(scan: str, reuse: bool = True):
                return di.attend(name, q, top_k=args.top_k, contribution_to=unit, per_example=True, scan=scan,
                                 reuse_certificate=reuse, step_buckets=args.step_buckets)

            di.attend(name, q[:8], top_k=args.top_k, contribution_to=unit)  # metadata pass and warm-up, not timed
            # interleaved rounds, so that load from other jobs on the machine hits every measurement alike
            ts: dict[str, list[float]] = {"a": [], "r": [], "b": [], "c": [], "f": []}
            for _ in range(args.repeat):
                ts["c"].append(timed(read))
                ts["b"].append(timed(matmul))
                ts["a"].append(timed(lambda: attend("exact")))
                ts["r"].append(timed(lambda: attend("exact", reuse=False)))
                if not args.no_bf16:
                    ts["f"].append(timed(lambda: attend("bf16")))
            k = v = c = None  # the device's copies go before the next layer's
            t_a, t_b, t_c, t_r = median(ts["a"]), median(ts["b"]), median(ts["c"]), median(ts["r"])
            t_f = median(ts["f"]) if ts["f"] else float("nan")
            exact = attend("exact")
            from_rows = attend("exact", reuse=False)
            fast = attend("bf16") if not args.no_bf16 else exact
            # compare scores, not row ids: an example seen in several epochs gives tied rows (layer 0 keys repeat)
            tol = 1e-4 * exact.top.score.abs().amax(dim=1, keepdim=True)
            differs = float(((exact.top.score - fast.top.score).abs() > tol).any(dim=1).float().mean())
            print("   rounds (s): " + "  ".join(f"{key}=" + ",".join(f"{x:.2f}" for x in xs) for key, xs in ts.items()))
            ratio = t_a / max(t_b, t_c)
            print(
                f"{name}  block {block}  {lay.n_rows}  {t_a:.2f}  {t_b:.2f}  {t_c:.2f}  {ratio:.2f}  "
                f"{lay.n_rows / t_a:,.0f}  {nbytes / t_a / 1e9:.2f}  | {t_r:.2f}  {t_r / max(t_b, t_c):.2f}  | "
                f"{t_f:.2f}  {t_a / t_f:.2f}x  {100 * differs:.1f}% of queries (max rel err: exact "
                f"{exact.max_rel_err:.1e} from the {exact.dual_source}, {from_rows.max_rel_err:.1e} from the "
                f"{from_rows.dual_source}, bf16 {fast.max_rel_err:.1e} from the {fast.dual_source})",
                flush=True,
            )


def load_baseline(src: str):
    """The package under ``src`` as ``lightning_dualform_baseline`` (a copy with its imports renamed, in a temporary
    folder that child processes, such as the store's probe, find on ``PYTHONPATH`` too)."""
    import importlib
    import re
    import shutil
    import sys
    import tempfile

    root = tempfile.mkdtemp(prefix="dualform-baseline-")
    dst = os.path.join(root, "lightning_dualform_baseline")
    shutil.copytree(os.path.join(src, "lightning_dualform"), dst, ignore=shutil.ignore_patterns("__pycache__"))
    for folder, _, files in os.walk(dst):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as fh:
                    text = fh.read()
                with open(path, "w") as fh:
                    fh.write(re.sub(r"\blightning_dualform\b(?=[. ])", "lightning_dualform_baseline", text))
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    return importlib.import_module("lightning_dualform_baseline")


def compare(args: argparse.Namespace, qs: dict[str, torch.Tensor]) -> None:
    """``--baseline``: the same attend calls alternated between the baseline library and this one."""
    import statistics

    import lightning_dualform

    base = load_baseline(args.baseline)
    kw = dict(top_k=args.top_k, per_example=True, mass=True, step_buckets=args.step_buckets)
    print(f"load {os.getloadavg()}, torch threads {torch.get_num_threads()}, {args.repeat} calls each")
    print("layer | baseline wall | this wall | ratio | baseline cpu | this cpu | ratio | same answer")
    libs = {"baseline": base, "this": lightning_dualform}
    for name in args.layers:
        unit = "pred" if name == args.layers[-1] and name == "net.4" else None
        dis = {k: lib.DualInference(args.store, device=args.device, block_rows=args.block_rows,
                                    query_chunk=args.query_chunk) for k, lib in libs.items()}
        try:
            got = {k: di.attend(name, qs[name], contribution_to=unit, **kw).to_dict() for k, di in dis.items()}
            for m in got["this"]["mass"].values():  # (a field newer versions add)
                m.pop("kind", None)
            for m in got["baseline"]["mass"].values():
                m.pop("kind", None)
            times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in dis}
            for r in range(args.repeat):
                for k in (("baseline", "this") if r % 2 == 0 else ("this", "baseline")):
                    w, c = time.perf_counter(), time.process_time()
                    dis[k].attend(name, qs[name], contribution_to=unit, **kw)
                    times[k]["wall"].append(time.perf_counter() - w)
                    times[k]["cpu"].append(time.process_time() - c)
        finally:
            for di in dis.values():
                di.close()
        med = {k: {t: statistics.median(v) for t, v in d.items()} for k, d in times.items()}
        print(f"{name} | {med['baseline']['wall']:.2f} s | {med['this']['wall']:.2f} s | "
              f"{med['this']['wall'] / med['baseline']['wall']:.3f} | {med['baseline']['cpu']:.2f} s | "
              f"{med['this']['cpu']:.2f} s | {med['this']['cpu'] / med['baseline']['cpu']:.3f} | "
              f"{got['this'] == got['baseline']}", flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
