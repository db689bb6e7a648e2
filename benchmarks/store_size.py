"""Store size, write throughput and exactness for every row dtype and compression.

1. Fit the MNIST MLP (784-800-800-10, batch 128, SGD lr 3e-3 momentum 0.9, clip 1.0) on 8,192 embedded
   MNIST digits for 2 epochs with ``DualFormCallback`` once per row dtype: the certificate (relative
   error of the rebuilt weights) of each dtype. Compression is lossless, so it cannot change it; one
   compressed fit per dtype (``--check-compressions``) confirms that and that its sizes match step 2.
2. Write the float32 store's rows again in every dtype x compression, exactly as the store lays them
   out (same disk dtype, filters, chunk shapes, appends of 4,096 rows), timing the encode+append, and
   read them back to check the round trip is bit-exact. Sizes come from ``get_storage_size`` per
   dataset, divided by the rows (a whole number of chunks, so no partly filled chunk inflates them).
   The per-row metadata columns (step, epoch, index, position, label) are tiled to one full
   65,536-row chunk for the same reason.
3. Compare each write rate with the rate at which training produces rows (a fit without the callback).

Usage::

    python benchmarks/store_size.py                     # about 2-4 minutes on a 2-core CPU
    python benchmarks/store_size.py --examples 2048 --dtypes float32 --compressions none,lzf --repeats 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
from common import MLP, machine, median, trainer, write_json  # noqa: E402

from lightning_dualform import DualFormCallback, StoreReader  # noqa: E402
from lightning_dualform.datasets import ImageDataModule  # noqa: E402
from lightning_dualform.store._chunks import ChunkAppender  # noqa: E402
from lightning_dualform.store.filters import compression_kwargs, encode_rows  # noqa: E402
from lightning_dualform.store.format import chunk_rows_for  # noqa: E402

COMPRESSIONS = "none,lzf,gzip,lz4,zstd,blosc-lz4,blosc-zstd"
DTYPES = "float32,float16,bfloat16"
BLOCK = 4096  # rows per append, as StoreWriter buffers them
META_CHUNK = 1 << 16  # the store's chunk length of the per-row columns
META = {"step": np.int64, "epoch": np.int32, "index": np.int64, "position": np.int32, "label": np.int64}


def _comp(c: str) -> str | None:
    return None if c == "none" else c


def storage(path: str) -> dict[str, dict[str, int]]:
    """Bytes on disk of every row dataset, per layer."""
    with h5py.File(path, "r") as f:
        return {
            name: {col: g[col].id.get_storage_size() for col in ("keys", "values", *META)}
            for name, g in f["layers"].items()
        }


def record(dm: ImageDataModule, epochs: int, dtype: str, comp: str, path: str) -> dict[str, Any]:
    """One seeded fit with the callback: its certificate and the storage of its row datasets."""
    cb = DualFormCallback(path, dtype=dtype, compression=_comp(comp), overwrite=True, certify=True)
    t0 = time.perf_counter()
    trainer(epochs, [cb]).fit(MLP(), datamodule=dm)
    return {
        "dtype": dtype, "compression": comp, "fit_s": time.perf_counter() - t0, "file_bytes": os.path.getsize(path),
        "storage": storage(path), "certificate": {k: v["rel_err"] for k, v in cb.certificate.items()},
        "exact": {k: bool(v["exact"]) for k, v in cb.certificate.items()},
    }


def rewrite(
    rows: dict[str, dict[str, np.ndarray]], dtype: str, comp: str, path: str, chunk_rows: int | None
) -> tuple[float, dict]:
    """Encode and append keys/values in blocks of BLOCK rows (timed) and the metadata (untimed).

    Returns the seconds and, per layer, ``{column: bytes on disk}``. Checks the round trip is bit-exact.
    """
    kw = compression_kwargs(_comp(comp))
    disk = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    with h5py.File(path, "w", libver="latest") as f:
        dsets = {}
        for name, r in rows.items():
            # the callback's chunking: one row count per layer for keys and values
            rows_per_chunk = chunk_rows_for(
                r["keys"].shape[1] * disk.itemsize, r["values"].shape[1] * disk.itemsize, chunk_rows
            )
            for col in ("keys", "values"):
                w = r[col].shape[1]
                dsets[name, col] = f.create_dataset(
                    f"{name}/{col}", shape=(0, w), maxshape=(None, w), dtype=disk, chunks=(rows_per_chunk, w),
                    fletcher32=True, **kw
                )
        # uncompressed stores are written as the callback writes them: whole chunks, checksummed here
        appenders = {key: ChunkAppender(ds) for key, ds in dsets.items() if ChunkAppender.usable(ds)}
        n = len(next(iter(rows.values()))["keys"])
        t0 = time.perf_counter()
        for start in range(0, n, BLOCK):
            for name, r in rows.items():
                for col in ("keys", "values"):
                    ds = dsets[name, col]
                    blk = encode_rows(r[col][start:start + BLOCK], dtype)
                    if (name, col) in appenders:
                        appenders[name, col].append(blk)
                        continue
                    m = ds.shape[0]
                    ds.resize(m + len(blk), axis=0)
                    ds[m:] = blk
        for app in appenders.values():
            app.flush()
        f.flush()
        seconds = time.perf_counter() - t0
        for name, r in rows.items():
            for col, dt in META.items():
                f.create_dataset(
                    f"{name}/{col}",
                    data=r[col].astype(dt),
                    maxshape=(None,),
                    chunks=(META_CHUNK,),
                    fletcher32=True,
                    **kw,
                )
        f.flush()
        sizes = {
            name: {col: f[f"{name}/{col}"].id.get_storage_size() for col in ("keys", "values", *META)} for name in rows
        }
        for name, r in rows.items():  # lossless: what comes back is exactly what was encoded
            for col in ("keys", "values"):
                if not np.array_equal(f[f"{name}/{col}"][:], encode_rows(r[col], dtype)):
                    raise AssertionError(f"{dtype}/{comp}: {name} {col} did not round-trip exactly")
    return seconds, sizes


def per_row(sizes: dict[str, dict[str, int]], rows: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, cols in sizes.items():
        n_kv, n_meta = len(rows[name]["keys"]), len(rows[name]["step"])
        out[name] = {
            "keys": cols["keys"] / n_kv, "values": cols["values"] / n_kv,
            "meta": sum(cols[c] for c in META) / n_meta,
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--examples", type=int, default=8192, help="training digits (of the embedded 10,000)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per fit")
    ap.add_argument("--dtypes", default=DTYPES, help="comma list of row dtypes")
    ap.add_argument(
        "--compressions",
        default=COMPRESSIONS,
        help="comma list (none, lzf, gzip, gzip-N, lz4, zstd, blosc-lz4, blosc-zstd)",
    )
    ap.add_argument(
        "--check-compressions", default="blosc-zstd", help="compressions also fitted with the callback, per dtype"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed writes per format (median)")
    ap.add_argument(
        "--chunk-rows", type=int, default=None, help="rows per HDF5 chunk (default: the callback's automatic ~512 KiB)"
    )
    ap.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for store_size.json")
    args = ap.parse_args(argv)

    dtypes = [d for d in args.dtypes.split(",") if d]
    comps = [c for c in args.compressions.split(",") if c]
    checks = [c for c in args.check_compressions.split(",") if c]
    for c in comps + checks:
        compression_kwargs(_comp(c))  # fail early on a name this install cannot write
    if not 1 <= args.examples <= 9000:
        raise SystemExit("--examples must be between 1 and 9000 (the rest of the 10,000 digits is held out)")
    info = machine()
    dm = ImageDataModule("mnist", batch_size=128, test_fraction=0.1, seed=0, limit=round(args.examples / 0.9))
    dm.setup()
    workdir = args.workdir or tempfile.mkdtemp(prefix="dualform-size-")
    os.makedirs(workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(dm.train_set)} MNIST digits x {args.epochs} epoch(s); stores in {workdir}", flush=True)
    fits: list[dict[str, Any]] = []
    formats: list[dict[str, Any]] = []
    try:
        trainer(1).fit(MLP(), datamodule=dm)  # warm-up
        t0 = time.perf_counter()
        trainer(args.epochs).fit(MLP(), datamodule=dm)
        train_rows_per_s = len(dm.train_set) * args.epochs / (time.perf_counter() - t0)

        ref = os.path.join(workdir, "ref.h5")
        fits.append(record(dm, args.epochs, "float32", "none", ref))
        with StoreReader(ref) as s:
            rows = {}
            for name in s.layers:
                layer = s.layer(name)
                r = layer.read(0, layer.n_rows, ("keys", "values", *META))
                reps = -(-META_CHUNK // layer.n_rows)
                span = int(r["step"].max()) + 1
                meta = {c: np.tile(r[c], reps)[:META_CHUNK] for c in META}
                meta["step"] = (np.tile(r["step"], reps) + np.repeat(np.arange(reps) * span, layer.n_rows))[:META_CHUNK]
                rows[name] = {"keys": r["keys"], "values": r["values"], **meta}
        zeros = {n: {c: float(np.mean(r[c] == 0)) for c in ("keys", "values")} for n, r in rows.items()}
        n_rows = len(next(iter(rows.values()))["keys"])
        row_bytes_f32 = sum(r["keys"].shape[1] + r["values"].shape[1] for r in rows.values()) * 4
        print(f"{n_rows} rows per layer; exact zeros {zeros}", flush=True)
        for dtype in dtypes:
            for comp in ["none", *checks] if dtype != "float32" else checks:
                if comp in comps or comp == "none":
                    p = os.path.join(workdir, f"{dtype}-{comp}.h5")
                    fits.append(record(dm, args.epochs, dtype, comp, p))
                    os.remove(p)
                    print(f"  fit {dtype}/{comp}: max rel_err {max(fits[-1]['certificate'].values()):.2e}", flush=True)
            for comp in comps:
                p = os.path.join(workdir, "rewrite.h5")
                times, sizes = [], {}
                for _ in range(args.repeats):
                    sec, sizes = rewrite(rows, dtype, comp, p, args.chunk_rows)
                    times.append(sec)
                    os.remove(p)
                fmt = {
                    "dtype": dtype, "compression": comp, "write_s": median(times),
                    "write_rows_per_s": n_rows / median(times), "bytes_per_row": per_row(sizes, rows), "storage": sizes,
                }
                fmt["write_MBps_f32"] = fmt["write_rows_per_s"] * row_bytes_f32 / 1e6
                fit = next((x for x in fits if (x["dtype"], x["compression"]) == (dtype, comp)), None)
                if fit is not None:  # the callback's own store holds the same bytes for keys and values
                    fmt["matches_callback_store"] = all(
                        fit["storage"][n][c] == sizes[n][c] for n in sizes for c in ("keys", "values")
                    )
                formats.append(fmt)
                l0 = fmt["bytes_per_row"]["net.0"]
                print(f"  {dtype:>8} {comp:>10}: layer-0 keys {l0['keys']:7.1f} B/row, "
                      f"write {fmt['write_rows_per_s']:8.0f} rows/s", flush=True)
        os.remove(ref)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    cert = {}
    for x in fits:
        cert.setdefault(x["dtype"], {})[x["compression"]] = x["certificate"]
    out = {
        "machine": info,
        "args": vars(args),
        "rows_per_layer": n_rows,
        "train_rows_per_s": train_rows_per_s,
        "zero_fraction": zeros,
        "row_bytes_float32": row_bytes_f32,
        "certificates": cert,
        "fits": fits,
        "formats": formats,
    }
    print(
        f"\ntraining produces {train_rows_per_s:.0f} rows/s per layer ({train_rows_per_s * row_bytes_f32 / 1e6:.0f} "
        "MB/s of float32 rows)"
    )
    print("exact zeros:", {n: {k: round(v, 3) for k, v in z.items()} for n, z in zeros.items()})
    print("certificates (max rel_err over layers):",
          {d: {c: f"{max(v.values()):.2e}" for c, v in cs.items()} for d, cs in cert.items()})
    base = (
        next(f for f in formats if (f["dtype"], f["compression"]) == ("float32", "none"))
        if "float32" in dtypes and "none" in comps
        else None
    )
    print(f"\n{'dtype':>8} {'comp':>10} | {'L0 keys':>8} {'L0 vals':>8} {'L1 keys':>8} {'L1 vals':>8} {'L2 keys':>8} "
          f"{'L2 vals':>8} {'meta':>6} | {'B/example':>9} {'vs f32':>6} | {'write rows/s':>12} {'x train':>7}")
    for f in formats:
        b = f["bytes_per_row"]
        per_ex = sum(x["keys"] + x["values"] + x["meta"] for x in b.values())
        f["bytes_per_example"] = per_ex
        rel = per_ex / base["bytes_per_example"] if base and "bytes_per_example" in base else float("nan")
        cells = " ".join(f"{x[c]:8.1f}" for x in b.values() for c in ("keys", "values"))
        meta = sum(x["meta"] for x in b.values())
        print(f"{f['dtype']:>8} {f['compression']:>10} | {cells} {meta:6.1f} | {per_ex:9.0f} {rel:6.2f} | "
              f"{f['write_rows_per_s']:12.0f} {f['write_rows_per_s'] / train_rows_per_s:7.2f}")
    write_json(args.out, "store_size.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
