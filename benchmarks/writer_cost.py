"""What the store writer costs per byte, against the floor: one copy of the rows.

The paper MLP's rows of one training step (batch 128, float32: keys of 784 + 800 + 800 and values of 800 + 800
+ 10 per example, 2.1 MB with the metadata) are written over and over, on one thread, by:

- ``memcpy``: ``np.copyto`` of the rows into a preallocated buffer (the floor: rows copied once);
- ``copy+checksum``: the same copy fused with the Fletcher-32 that HDF5's checksum filter stores (the
  library's C kernel, or numpy without it);
- ``pwrite``: ``os.pwrite`` of the rows' bytes into a file (a copy into the page cache);
- ``store``: :class:`StoreWriter.add_step` (copy + checksum into chunk buffers, ``H5Dwrite_chunk``, the
  metadata columns and the per-step tables), through the ctypes call that releases the GIL;
- ``store:h5py``: the same through h5py's public ``write_direct_chunk``, which holds the GIL.

Each reports the thread's CPU time per step (``time.thread_time``) and the wall time. A second part runs
the writer on a thread while the main thread times a loop of small torch ops (a stand-in for the training
thread's Python between kernels): the slowdown of that loop with each write path shows what holding the
GIL costs the training thread.

Usage::

    python benchmarks/writer_cost.py --steps 200 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, median, write_json  # noqa: E402

from lightning_dualform.optim import ParamUpdate  # noqa: E402
from lightning_dualform.store import LayerSpec, StepRows, StoreWriter, _fletcher, _hdf5_nogil  # noqa: E402

LAYERS = {"net.0": (784, 800), "net.2": (800, 800), "net.4": (800, 10)}
BATCH = 128


def step_rows(seed: int) -> dict[str, StepRows]:
    g = np.random.default_rng(seed)
    return {
        name: StepRows(keys=g.standard_normal((BATCH, d_in), dtype=np.float32),
                       values=g.standard_normal((BATCH, d_out), dtype=np.float32),
                       index=np.arange(BATCH), position=np.zeros(BATCH, np.int32), label=np.arange(BATCH) % 10,
                       step=0, epoch=0)
        for name, (d_in, d_out) in LAYERS.items()
    }


def row_bytes(rows: dict[str, StepRows]) -> int:
    return sum(r.keys.nbytes + r.values.nbytes + 32 * len(r.keys) for r in rows.values())


def timed(fn: Callable[[int], None], steps: int) -> dict[str, float]:
    fn(0)  # warm: buffers, first touch
    w0, c0 = time.perf_counter(), time.thread_time()
    for s in range(1, steps + 1):
        fn(s)
    return {"wall_ms": 1e3 * (time.perf_counter() - w0) / steps, "cpu_ms": 1e3 * (time.thread_time() - c0) / steps}


def variants(workdir: str, steps: int) -> dict[str, Callable[[], Callable[[int], None]]]:
    rows = step_rows(0)
    flat = [a for r in rows.values() for a in (r.keys, r.values)]
    nbytes = sum(a.nbytes for a in flat)

    def memcpy() -> Callable[[int], None]:
        buf = np.empty(nbytes, dtype=np.uint8)

        def run(_: int) -> None:
            i = 0
            for a in flat:
                np.copyto(buf[i : i + a.nbytes], a.view(np.uint8).reshape(-1))
                i += a.nbytes
        return run

    def copy_checksum() -> Callable[[int], None]:
        buf = np.empty(nbytes, dtype=np.uint8)

        def run(_: int) -> None:
            i = 0
            for a in flat:
                s = _fletcher.RunningFletcher32()
                s.copy(buf[i : i + a.nbytes].view(a.dtype).reshape(a.shape), a)
                s.finish(zero_bytes=0)
                i += a.nbytes
        return run

    def pwrite() -> Callable[[int], None]:
        path = os.path.join(workdir, "pwrite.bin")
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        views = [memoryview(a).cast("B") for a in flat]
        state = {"off": 0}

        def run(_: int) -> None:
            for v in views:
                os.pwrite(fd, v, state["off"])
                state["off"] += len(v)
        return run

    def store(public: bool) -> Callable[[], Callable[[int], None]]:
        def make() -> Callable[[int], None]:
            path = os.path.join(workdir, f"store{'-h5py' if public else ''}.h5")
            specs = [LayerSpec(name=n, kind="linear", d_in=d_in, d_out=d_out, has_bias=False,
                               weight_init=np.zeros((d_out, d_in), np.float32), bias_init=None)
                     for n, (d_in, d_out) in LAYERS.items()]
            writer = StoreWriter.create(path, specs, overwrite=True)
            upd = {n: (1.0, ParamUpdate(lr=0.1), None) for n in LAYERS}

            def run(s: int) -> None:
                for r in rows.values():
                    r.step, r.epoch = s, 0
                writer.add_step(s, 0, rows, upd)
            run.writer = writer  # type: ignore[attr-defined]
            return run
        return make

    return {"memcpy": memcpy, "copy+checksum": copy_checksum, "pwrite": pwrite, "store": store(False),
            "store:h5py": store(True)}


def with_path(name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` with the store's chunk writes through ctypes (default) or h5py's public call (``:h5py``)."""
    lib = _hdf5_nogil._lib
    if name.endswith(":h5py"):
        _hdf5_nogil._lib = None
    try:
        return fn()
    finally:
        _hdf5_nogil._lib = lib


def interference(workdir: str, steps: int, name: str, make: Callable[[], Callable[[int], None]] | None) -> float:
    """Per-iteration time (µs) of a main-thread loop of small torch ops while ``make``'s writer runs on a thread."""
    x = torch.randn(64, 64)
    stop = threading.Event()
    run = make() if make is not None else None

    def writer() -> None:
        s = 0
        while not stop.is_set():
            s += 1
            run(s)

    t = threading.Thread(target=writer, daemon=True) if run is not None else None
    if t is not None:
        t.start()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        for _ in range(100):
            x = torch.tanh(x @ x * 1e-3)
        n += 100
    elapsed = time.perf_counter() - t0
    stop.set()
    if t is not None:
        t.join()
        if hasattr(run, "writer"):
            run.writer.close()
    return 1e6 * elapsed / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _hdf5_nogil.library()
    workdir = args.workdir or tempfile.mkdtemp(prefix="dualform-writer-")
    nbytes = row_bytes(step_rows(0))
    print(
        f"{nbytes / 1e6:.2f} MB of rows per step, {args.steps} steps, ctypes path: {_hdf5_nogil.library() is not None}"
    )
    results: dict[str, list[dict[str, float]]] = {}
    for r in range(args.repeats):
        for name, make in variants(workdir, args.steps).items():
            res = with_path(name, lambda: timed(make(), args.steps))
            results.setdefault(name, []).append(res)
            print(f"  round {r} {name:>14}: cpu {res['cpu_ms']:.3f} ms/step, wall {res['wall_ms']:.3f} ms/step")
        for f in os.listdir(workdir):
            os.remove(os.path.join(workdir, f))
    table = {}
    for name, rs in results.items():
        cpu = median([x["cpu_ms"] for x in rs])
        wall = median([x["wall_ms"] for x in rs])
        table[name] = {"cpu_ms": cpu, "wall_ms": wall, "GB_per_s_cpu": nbytes / cpu / 1e6, "rounds": rs}
    floor = table["memcpy"]["cpu_ms"]
    print(f"\n{'path':>14} {'cpu ms/step':>12} {'x memcpy':>9} {'GB/s (cpu)':>11}")
    for name, t in table.items():
        print(f"{name:>14} {t['cpu_ms']:12.3f} {t['cpu_ms'] / floor:9.2f} {t['GB_per_s_cpu']:11.2f}")
    loops: dict[str, list[float]] = {}
    makers = variants(workdir, args.steps)
    for r in range(args.repeats):
        for name in ("none", "store", "store:h5py"):
            us = with_path(
                name, lambda: interference(workdir, args.steps, name, None if name == "none" else makers[name])
            )
            loops.setdefault(name, []).append(us)
        for f in os.listdir(workdir):
            os.remove(os.path.join(workdir, f))
    print("\nmain-thread loop of small torch ops while the writer runs on a thread (µs per iteration):")
    for name, v in loops.items():
        print(
            f"{name:>14} {median(v):8.2f}  (x{median(v) / median(loops['none']):.2f})  rounds "
            f"{[round(x, 2) for x in v]}"
        )
    write_json(args.out, "writer_cost", {"machine": machine(), "args": vars(args), "bytes_per_step": nbytes,
                                          "paths": table, "interference_us": loops})


if __name__ == "__main__":
    main()
