"""Cold reads: a layer's keys and values from a store that is not in the page cache, through ``H5Dread``
(the reader's path before, ``store/_hdf5_nogil.py``) against the raw-chunk reader (``store/_raw_chunks.py``:
``os.preadv`` of whole chunks at the offsets of HDF5's chunk index, Fletcher-32 verified here, on 1 to 8
threads).

Before each cold read the store is dropped from the page cache (``fsync``, then
``posix_fadvise(POSIX_FADV_DONTNEED)``); that this works is checked twice: the kernel's ``Cached`` memory
falls by about the store's size, and each cold read is timed against a warm read of the same rows right
after it. Reads go block by block (the block size ``DualInference`` uses for the layer), into fresh arrays
as the reader allocates them; ``raw, reused buffer`` reads into one array allocated and touched once
(what page faults of fresh memory cost, which this VM makes expensive). The raw reader's own descriptor
has the kernel's read-ahead off (``POSIX_FADV_RANDOM``: the layers' chunks interleave in the file, so
reading ahead reads other layers' rows); HDF5's has it on. The parts of the raw reader are timed apart too
(warm): ``preadv`` alone, and the checksum alone over the chunks in memory.

``--attend`` also times a whole cold ``DualInference.attend`` of 1,000 queries per layer (``attend.py``'s
settings) with each reader (``LIGHTNING_DUALFORM_RAW_READ=0`` for H5Dread), interleaved.

Each of ``--repeat`` rounds runs every method once, in an order rotated by one per round; medians.

Run:  python benchmarks/cold_read.py [--store /tmp/dualform-bench/attend.h5] [--layers net.0 net.4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median, write_json  # noqa: E402


def page_cached_kib() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return -1


def drop(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--store",
        default="/tmp/dualform-bench/attend.h5",
        help="an uncompressed store (benchmarks/attend.py builds one)",
    )
    p.add_argument("--layers", nargs="*", default=["net.0", "net.4"])
    p.add_argument("--threads", nargs="*", type=int, default=[1, 2, 4, 8], help="raw reader thread counts")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--attend", action="store_true", help="also time a cold attend with each reader")
    p.add_argument(
        "--data",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "fashion_mnist_npm70k.npz"),
    )
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()

    from lightning_dualform import DualInference
    from lightning_dualform.store import _fletcher, _hdf5_nogil, _raw_chunks

    facts = machine()
    print(
        f"{facts['cpu']}, {facts['cores']} cores, load {facts['loadavg_at_start']}, hdf5 {facts['hdf5']}, commit "
        f"{facts['commit']}"
    )
    size = os.path.getsize(args.store)
    before = page_cached_kib()
    drop(args.store)
    after = page_cached_kib()
    print(
        f"store {args.store}: {size / 1e9:.2f} GB; page cache {before / 1e6:.2f} -> {after / 1e6:.2f} GB after "
        f"dropping it (fell by {(before - after) / 1e6:.2f} GB)"
    )
    results: dict = {"machine": facts, "store": args.store, "store_bytes": size,
                     "drop_check_cached_gb": [before / 1e6, after / 1e6], "layers": {}}
    with DualInference(args.store, device="cpu") as di:
        block_of = {n: di.rows_per_block(di.layer(n)) for n in args.layers}
    f = h5py.File(args.store, "r", swmr=True, locking=False)
    for name in args.layers:
        g = f["layers"][name]
        n_rows = int(g["committed_rows"][0])
        dsets = [g["keys"], g["values"]]
        readers = [_raw_chunks.ChunkReader.for_dataset(d) for d in dsets]
        assert all(r is not None for r in readers), "not an uncompressed store"
        block = block_of[name]
        nbytes = sum(n_rows * d.shape[1] * d.dtype.itemsize for d in dsets)
        reused = [np.ones((block, d.shape[1]), d.dtype) for d in dsets]

        def h5dread() -> None:
            for s in range(0, n_rows, block):
                for d in dsets:
                    _hdf5_nogil.read_rows(d, s, min(s + block, n_rows))

        def raw(threads: int, reuse: bool = False):
            def run() -> None:
                for s in range(0, n_rows, block):
                    e = min(s + block, n_rows)
                    for r, buf in zip(readers, reused):
                        got = r.read(s, e, threads=threads, out=buf[: e - s] if reuse else None)
                        assert got is not None, "a checksum disagreed"
            return run

        # correctness first: the raw reader returns HDF5's rows
        for d, r in zip(dsets, readers):
            s, e = 1, min(n_rows, block + 77)
            assert np.array_equal(r.read(s, e), d[s:e])
        methods = {"H5Dread": h5dread}
        for t in args.threads:
            methods[f"raw, {t} thread{'s' if t > 1 else ''}"] = raw(t)
        best = max(args.threads)
        methods[f"raw, {best} threads, reused buffer"] = raw(best, reuse=True)
        cold: dict[str, list[float]] = {m: [] for m in methods}
        warm: dict[str, list[float]] = {m: [] for m in methods}
        names = list(methods)
        for rnd in range(args.repeat):
            order = names[rnd % len(names):] + names[: rnd % len(names)]
            for m in order:
                drop(args.store)
                t = time.perf_counter()
                methods[m]()
                cold[m].append(time.perf_counter() - t)
                t = time.perf_counter()
                methods[m]()
                warm[m].append(time.perf_counter() - t)
        # the raw reader's parts, warm: preadv alone (no checksum), and the checksum alone over chunks in memory
        lib = _fletcher.library()
        r0 = readers[0]
        offs = r0._map(-(-n_rows // r0.chunk_rows))
        chunk = np.empty(r0.data_bytes, np.uint8)
        csum = bytearray(4)
        fd = os.open(args.store, os.O_RDONLY)
        t = time.perf_counter()
        for off in offs[: -(-n_rows // r0.chunk_rows)]:
            os.preadv(fd, [memoryview(chunk), csum], int(off))
        t_io = time.perf_counter() - t
        os.close(fd)
        t = time.perf_counter()
        for _ in offs[: -(-n_rows // r0.chunk_rows)]:
            ok = lib.fletcher32(chunk.ctypes.data, r0.data_bytes) == struct.unpack("<I", csum)[0]
        t_sum = time.perf_counter() - t
        key_bytes = len(offs[: -(-n_rows // r0.chunk_rows)]) * r0.data_bytes
        print(
            f"\n{name}: {n_rows:,} rows, keys+values {nbytes / 1e9:.2f} GB, blocks of {block:,} rows, chunks of "
            f"{r0.chunk_rows} rows"
        )
        print(f"  {'method':34s} {'cold s':>7s} {'cold GB/s':>9s} {'warm s':>7s} {'warm GB/s':>9s}")
        base = median(cold["H5Dread"])
        layer = {"rows": n_rows, "bytes": nbytes, "block_rows": block, "chunk_rows": r0.chunk_rows, "methods": {}}
        for m in names:
            c, w = median(cold[m]), median(warm[m])
            print(
                f"  {m:34s} {c:7.2f} {nbytes / c / 1e9:9.2f} {w:7.2f} {nbytes / w / 1e9:9.2f}   cold vs H5Dread "
                f"{base / c:.2f}x"
            )
            layer["methods"][m] = {"cold_s": cold[m], "warm_s": warm[m]}
        print(
            f"  parts (keys, warm, one thread): preadv of every chunk into one buffer {key_bytes / t_io / 1e9:.2f} "
            f"GB/s; Fletcher-32 of a chunk in cache {key_bytes / t_sum / 1e9:.2f} GB/s (last checksum ok: {ok})"
        )
        layer["parts"] = {"preadv_gbs": key_bytes / t_io / 1e9, "fletcher_gbs": key_bytes / t_sum / 1e9}
        results["layers"][name] = layer
    f.close()
    if args.attend:
        results["attend"] = cold_attend(args)
    write_json(args.out, "cold_read.json", results)


def cold_attend(args: argparse.Namespace) -> dict:
    """A whole attend from a cold store, with H5Dread and with the raw reader, interleaved rounds."""
    from attend import queries_for

    from lightning_dualform import DualInference

    qs = queries_for(args.store, args.data, 1000)
    out: dict = {}
    print("\ncold attend of 1,000 queries (top-10, per-example sums, mass; contributions at net.4)")
    for name in args.layers:
        times: dict[str, list[float]] = {"H5Dread": [], "raw": []}
        for rnd in range(args.repeat):
            for reader in (["H5Dread", "raw"] if rnd % 2 == 0 else ["raw", "H5Dread"]):
                os.environ["LIGHTNING_DUALFORM_RAW_READ"] = "0" if reader == "H5Dread" else "1"
                with DualInference(args.store, device="cpu") as di:
                    di.attend(name, qs[name][:2], top_k=10)  # the metadata pass, not timed
                    drop(args.store)
                    t = time.perf_counter()
                    di.attend(name, qs[name], top_k=10, contribution_to="pred" if name == "net.4" else None)
                    times[reader].append(time.perf_counter() - t)
        os.environ.pop("LIGHTNING_DUALFORM_RAW_READ", None)
        h, r = median(times["H5Dread"]), median(times["raw"])
        print(f"  {name}: H5Dread {h:.2f} s, raw {r:.2f} s ({h / r:.2f}x); rounds {times}")
        out[name] = times
    return out


if __name__ == "__main__":
    main()
