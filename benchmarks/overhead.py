"""Training overhead of DualFormCallback: fit wall time with the callback over fit wall time without.

The paper's MLP (784-800-800-10, ReLU, batch 128, SGD lr 3e-3 momentum 0.9, gradient clipping 1.0)
trains on real Fashion-MNIST images (the 70,000-image file of ../shared/data, or the embedded 10,000
repeated when it is absent). Each repeat runs the baseline and every variant once, in a rotated order,
and the ratio of a variant is its time over the baseline time of the same repeat; the median over
repeats is reported. Stores are deleted after each run. Variants are whole fits as a user runs them
(the certificate included: ``:sketch``, the default, as training goes; ``:full`` re-reads the store at
fit end; ``:nocert``); the full certificate's re-read is also timed once on its own.

``--hook-timing float32,float16`` adds one instrumented run per listed variant that splits the callback's cost into its hooks on
the training thread, the time training waits on the writer's queue, and the writer thread's own work.

Usage::

    python benchmarks/overhead.py                                # full: 48,000 images, 2 epochs, 3 repeats
    python benchmarks/overhead.py --examples 6400 --epochs 1 --repeats 1 --variants float32   # quick
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import FASHION_70K, MLP, machine, median, trainer, write_json  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402
from lightning_dualform.attend.certificate import certify_store  # noqa: E402
from lightning_dualform.datasets import ImageDataModule, ImageDataset, load_images  # noqa: E402

DEFAULT_VARIANTS = "float32,float32:full,float16,float32:drop,float32:lz4"


def parse_variant(spec: str) -> tuple[str, str | None, bool | str]:
    """``dtype[:compression][:certificate][:nogil]`` -> (dtype, compression, certify). The certificate is
    ``sketch`` (the default: as training goes), ``full`` (also a re-read of the store at fit end) or
    ``nocert``; the compression ``drop`` runs every hook but writes no rows; ``nogil`` writes the chunks
    through the ctypes call that releases the GIL, which the library uses for CUDA training only (on the
    CPU it writes through h5py's public ``write_direct_chunk``; see :func:`fit_once`)."""
    parts = spec.split(":")
    dtype, comp, certify = parts[0], None, True
    for p in parts[1:]:
        if p in ("sketch", "full", "nocert"):
            certify = {"sketch": True, "full": "full", "nocert": False}[p]
        elif p == NOGIL:
            continue
        else:
            comp = p
    return dtype, comp, certify


def make_datamodule(path: str | None, examples: int, batch_size: int, seed: int) -> ImageDataModule:
    """``examples`` training images; from ``path`` if it exists, else the embedded set repeated."""
    if path and os.path.isfile(path):
        dm = ImageDataModule("fashion_mnist", path=path, batch_size=batch_size, test_fraction=0.0, seed=seed, limit=examples)
        dm.setup()
        if len(dm.train_set) < examples:
            raise SystemExit(f"{path} holds only {len(dm.train_set)} images; pass --examples <= that.")
        return dm
    print(f"note: {path} not found; repeating the embedded Fashion-MNIST 10k to {examples} images", file=sys.stderr)
    images, labels = load_images("fashion_mnist")
    reps = -(-examples // len(labels))
    dm = ImageDataModule("fashion_mnist", batch_size=batch_size, test_fraction=0.0, seed=seed)
    dm.train_set = ImageDataset(np.tile(images, (reps, 1, 1))[:examples], np.tile(labels, reps)[:examples])
    dm.test_set = ImageDataset(images[:0], labels[:0])
    return dm


#: ``dtype:drop``: the callback does all its training-thread work, and the writer thread drops the rows
#: (writes no step): the floor set by the hooks alone, for finding where the time goes. Not a real store.
DROP = "drop"
#: ``dtype:nogil``: chunk writes through the ctypes call that releases the GIL, as for CUDA training (the
#: measure of what releasing it costs or buys a training thread that shares the CPU's cores)
NOGIL = "nogil"


#: where the fits train (``--accelerator``)
ACCELERATOR = "cpu"


def fit_once(dm: ImageDataModule, epochs: int, variant: str | None, workdir: str, tag: str) -> dict[str, Any]:
    """One fit; returns its wall time and, with a callback, the store's size (then deletes the store)."""
    callbacks = []
    path = os.path.join(workdir, f"{tag}.h5")
    dropped = False
    if variant is not None:
        dtype, comp, certify = parse_variant(variant)
        dropped = comp == DROP
        callbacks.append(DualFormCallback(path, dtype=dtype, compression=None if dropped else comp, overwrite=True,
                                          certify=certify))
    model = MLP()
    tr = trainer(epochs, callbacks, accelerator=ACCELERATOR)
    gc.collect()
    from lightning_dualform.store.writer import StoreWriter

    add_step, set_release = StoreWriter.add_step, StoreWriter.set_release_gil
    if dropped:  # every hook, the gradient check and the certificate run; the writer gets nothing to write
        StoreWriter.add_step = lambda *a, **k: None  # type: ignore[method-assign]
    if variant is not None and NOGIL in variant.split(":")[1:]:
        StoreWriter.set_release_gil = lambda self, release: set_release(self, True)  # type: ignore[method-assign]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        tr.fit(model, datamodule=dm)
    finally:
        StoreWriter.add_step, StoreWriter.set_release_gil = add_step, set_release  # type: ignore[method-assign]
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # (the last steps' kernels count too)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out: dict[str, Any] = {
        "variant": variant or "baseline", "wall_s": wall, "cpu_s": cpu, "steps": int(tr.global_step),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    if variant is not None:
        out["store_bytes"] = os.path.getsize(path)
    return out


def remove_store(workdir: str, tag: str) -> None:
    for suffix in (".h5", ".h5.creating"):
        p = os.path.join(workdir, tag + suffix)
        if os.path.exists(p):
            os.remove(p)


# ----------------------------------------------------------------------------------------------------
# instrumented run
# ----------------------------------------------------------------------------------------------------
def _timed(table: dict[str, list[float]], key: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            table[key].append(time.perf_counter() - t)

    return wrapper


def hook_timing(dm: ImageDataModule, epochs: int, workdir: str, variant: str = "float32") -> dict[str, Any]:
    """Split one run's callback cost: hooks (training thread), queue waits, writer-thread work."""
    from lightning_dualform.record import callback as cbmod
    from lightning_dualform.record import capture as capmod
    from lightning_dualform.record import engine as engmod
    from lightning_dualform.record import rows as rowsmod
    from lightning_dualform.store import background as wrmod
    from lightning_dualform.store import writer as stmod

    table: dict[str, list[float]] = defaultdict(list)
    patched: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, key: str) -> None:
        orig = getattr(owner, name, None)
        if orig is None:  # the library changed: time what still exists
            return
        patched.append((owner, name, orig))
        setattr(owner, name, _timed(table, key, orig))

    # writer thread
    patch(stmod.StoreWriter, "add_step", "writer: StoreWriter.add_step (whole step on the writer thread)")
    patch(stmod.StoreWriter, "_write_pending", "writer: StoreWriter._write_pending (h5py appends)")
    patch(stmod.StoreWriter, "commit", "writer: StoreWriter.commit (+flush)")
    patch(stmod.StoreWriter, "finalize", "writer: StoreWriter.finalize")
    patch(stmod, "encode_rows", "writer: encode_rows")
    # training thread, inside hooks
    patch(wrmod.AsyncWriter, "_put", "train: AsyncWriter._put (queue wait)")
    patch(wrmod.AsyncWriter, "_call", "train: AsyncWriter._call (commit/finalize wait)")
    patch(engmod.RecordingEngine, "record_step", "train: RecordingEngine.record_step (all of a step)")
    patch(rowsmod, "take_rows", "train: take_rows (row metadata)")
    patch(engmod.RecordingEngine, "_sketch_rows", "train: _sketch_rows (rows x probes)")
    patch(engmod.RecordingEngine, "_check_rows", "train: _check_rows (W.grad x probes)")
    patch(engmod.RecordingEngine, "step_settings", "train: step_settings (optimizer pre-hook)")
    patch(cbmod.DualFormCallback, "_clip_factor", "train: _clip_factor (grad norm)")
    patch(rowsmod, "gather_rows", "train: gather_rows (cat/convert)")
    patch(capmod.LayerCapture, "_forward_hook", "train: LayerCapture._forward_hook")
    hooks = ["on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end",
             "on_train_epoch_end", "on_fit_start", "on_fit_end", "setup", "teardown"]
    for h in hooks:
        patch(cbmod.DualFormCallback, h, f"hook: {h}")
    # the writer thread's CPU time (it competes with torch's threads for the 2 cores)
    cpu: dict[str, float] = {}
    orig_run = wrmod.AsyncWriter._run

    def run_with_cpu(self: Any) -> None:
        t = time.thread_time()
        try:
            orig_run(self)
        finally:
            cpu["writer_thread_cpu_s"] = time.thread_time() - t

    wrmod.AsyncWriter._run = run_with_cpu
    try:
        res = fit_once(dm, epochs, variant, workdir, "hooks")
        remove_store(workdir, "hooks")
    finally:
        wrmod.AsyncWriter._run = orig_run
        for owner, name, orig in reversed(patched):
            setattr(owner, name, orig)
    rows = {k: {"calls": len(v), "total_s": round(sum(v), 4), "mean_ms": round(1e3 * sum(v) / max(len(v), 1), 4)} for k, v in table.items()}
    return {"run": res, "timers": rows, **{k: round(v, 3) for k, v in cpu.items()}}


# ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=FASHION_70K, help="npz with images/labels (embedded 10k repeated if missing)")
    ap.add_argument("--examples", type=int, default=48000, help="training images")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fit")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (baseline + every variant)")
    ap.add_argument("--batch-size", type=int, default=128, help="batch size")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of dtype[:compression]; dtype:drop runs the callback but drops the rows (the hooks' floor)")
    ap.add_argument("--accelerator", default="cpu", help="where the fits train: cpu or gpu")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-certify-timing", action="store_true", help="skip timing the certificate once")
    ap.add_argument("--hook-timing", default="", help="comma list of variants to run once more, instrumented (cost per hook)")
    ap.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for overhead.json")
    args = ap.parse_args(argv)

    global ACCELERATOR
    ACCELERATOR = args.accelerator
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        dtype, comp, certify = parse_variant(v)
        # validate early (a path that is never created)
        DualFormCallback(os.path.join(tempfile.gettempdir(), "dualform-options-check.h5"), dtype=dtype,
                         compression=None if comp == DROP else comp, certify=certify)
    from lightning_dualform.store import _hdf5_nogil

    _hdf5_nogil.library()  # looked up once, before any variant runs
    info = machine()
    dm = make_datamodule(args.data, args.examples, args.batch_size, seed=0)
    workdir = args.workdir or tempfile.mkdtemp(prefix="dualform-overhead-")
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(dm.train_set)} images x {args.epochs} epochs, batch {args.batch_size}, {args.repeats} repeats, "
          f"variants {variants}, torch threads {torch.get_num_threads()}, stores in {workdir}", flush=True)

    try:
        # warm-up: first-call costs (allocator, h5py, lazy imports) stay out of the timings
        small = make_datamodule(args.data, 2048, args.batch_size, seed=1)
        fit_once(small, 1, None, workdir, "warm")
        fit_once(small, 1, variants[0], workdir, "warm")
        remove_store(workdir, "warm")

        order = [None, *variants]
        runs: list[dict[str, Any]] = []
        for r in range(args.repeats):
            rot = order[r % len(order):] + order[: r % len(order)]
            times: dict[str, float] = {}
            cpu_times: dict[str, float] = {}
            for v in rot:
                res = fit_once(dm, args.epochs, v, workdir, f"r{r}")
                remove_store(workdir, f"r{r}")
                res["repeat"] = r
                runs.append(res)
                times[res["variant"]] = res["wall_s"]
                cpu_times[res["variant"]] = res["cpu_s"]
                extra = f", store {res['store_bytes'] / 2**20:.0f} MiB" if "store_bytes" in res else ""
                print(f"  repeat {r} {res['variant']:>20}: {res['wall_s']:.2f} s (cpu {res['cpu_s']:.2f} s), {res['steps']} steps"
                      f"{extra}, load {res['loadavg_1min']}", flush=True)
            for res in runs[-len(rot):]:
                res["ratio"] = res["wall_s"] / times["baseline"]
                res["cpu_ratio"] = res["cpu_s"] / cpu_times["baseline"]

        summary: dict[str, Any] = {}
        best_base = min(x["wall_s"] for x in runs if x["variant"] == "baseline")
        for v in order:
            name = v or "baseline"
            mine = [x for x in runs if x["variant"] == name]
            summary[name] = {
                "median_wall_s": round(median([x["wall_s"] for x in mine]), 3),
                "median_ratio": round(median([x["ratio"] for x in mine]), 3),
                "ratios": [round(x["ratio"], 3) for x in mine],
                "median_cpu_ratio": round(median([x["cpu_ratio"] for x in mine]), 3),
                # best over best: the least disturbed estimate when other jobs share the machine
                "min_wall_s": round(min(x["wall_s"] for x in mine), 3),
                "min_ratio": round(min(x["wall_s"] for x in mine) / best_base, 3),
                "store_mib": round(mine[0]["store_bytes"] / 2**20, 1) if "store_bytes" in mine[0] else None,
            }
        result: dict[str, Any] = {
            "machine": info, "args": vars(args), "examples": len(dm.train_set),
            "steps": runs[0]["steps"], "summary": summary, "runs": runs,
        }
        if not args.no_certify_timing:  # the full certificate's re-read, timed on its own
            res = fit_once(dm, args.epochs, "float32:nocert", workdir, "cert")
            t = time.perf_counter()
            cert = certify_store(os.path.join(workdir, "cert.h5"))
            result["certificate_s"] = round(time.perf_counter() - t, 3)
            result["certificate"] = {k: v.rel_err for k, v in cert.items()}
            remove_store(workdir, "cert")
        result["hook_timing"] = {}
        for v in [v.strip() for v in args.hook_timing.split(",") if v.strip()]:
            result["hook_timing"][v] = hook_timing(dm, args.epochs, workdir, v)
        result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'variant':>20} {'median s':>9} {'median ratio':>13} {'cpu ratio':>10} {'min s':>7} {'min/min':>8} "
          f"{'store MiB':>10}  ratios per round")
    for name, s in summary.items():
        store = f"{s['store_mib']:.0f}" if s["store_mib"] is not None else "-"
        print(f"{name:>20} {s['median_wall_s']:>9.2f} {s['median_ratio']:>13.3f} {s['median_cpu_ratio']:>10.3f} "
              f"{s['min_wall_s']:>7.2f} {s['min_ratio']:>8.3f} {store:>10}  {s['ratios']}")
    if "certificate_s" in result:
        print(f"full certificate (a re-read of the store at fit end, certify='full'): {result['certificate_s']:.2f} s, rel_err {result['certificate']}")
    for name, ht in result.get("hook_timing", {}).items():
        print(f"\ninstrumented {name} run: {ht['run']['wall_s']:.2f} s; writer thread CPU {ht.get('writer_thread_cpu_s')} s")
        for k, v in sorted(ht["timers"].items(), key=lambda kv: -kv[1]["total_s"]):
            print(f"  {k:<60} {v['total_s']:>8.3f} s  {v['calls']:>6} calls  {v['mean_ms']:>8.3f} ms/call")
    write_json(args.out, "overhead.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
