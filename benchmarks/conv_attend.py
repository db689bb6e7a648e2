"""Attending over a convolution stored as maps: host unfolding against unfolding on the compute device.

Records a few optimizer steps of a ResNet-18 for 32x32 inputs (``real_models.resnet18``, float32 rows), then
on its largest stride-1 conv layer (the most virtual rows times key width) measures, side by side in one run
(the variants alternate, ``--repeats`` times each; the best time is reported):

- one ``attend`` pass (``--queries`` stored keys as queries, top-k, per-example sums and masses): wall time and
  the bytes of host arrays handed to the compute device per pass, reading unfolded rows (``LayerReader.read``,
  numpy unfolding on the host: the path before compact blocks) against compact blocks unfolded where they are
  multiplied;
- the bytes a block cache holds for that layer after one pass, both ways;
- the full certificate's memory sum ``sum c v k^T`` (float64): unfolded keys (``addmm``) against the
  convolution's weight gradient of the maps, with their relative difference.

The host path is the library's own, selected by making ``maps_geometry`` say "no maps". CPU here; on a GPU
(``--device cuda``) the same code.

Usage::

    python benchmarks/conv_attend.py --steps 3 --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine, write_json  # noqa: E402

from lightning_dualform import DualInference, StoreReader  # noqa: E402
from lightning_dualform.attend import inference as inference_mod  # noqa: E402
from lightning_dualform.attend import memory as memory_mod  # noqa: E402
from lightning_dualform.attend.memory import memory_sums  # noqa: E402


@contextlib.contextmanager
def host_unfold() -> Iterator[None]:
    """Passes and sums read unfolded rows (the reader's numpy unfolding), as before compact blocks."""
    saved = inference_mod.maps_geometry, memory_mod.maps_geometry
    inference_mod.maps_geometry = memory_mod.maps_geometry = lambda layer: None
    try:
        yield
    finally:
        inference_mod.maps_geometry, memory_mod.maps_geometry = saved


def variant(name: str) -> contextlib.AbstractContextManager:
    return host_unfold() if name == "host" else contextlib.nullcontext()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps recorded")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results", help="directory for conv_attend.json")
    args = ap.parse_args()
    from conv_bytes import record
    from real_models import model

    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    result: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "resnet18.h5")
        record(model("resnet18")[0], torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
               args.steps, args.batch_size, path)
        with StoreReader(path) as s:
            convs = [
                s.layer(k) for k in s.layers if s.layer(k).geometry is not None and max(s.layer(k).geometry.stride) == 1
            ]
            lay = max(convs, key=lambda lay: lay.n_rows * lay.d_in)
            name, geom = lay.name, lay.geometry
            picks = np.sort(np.random.default_rng(0).choice(lay.n_rows, args.queries, replace=False))
            q = torch.from_numpy(np.concatenate([lay.read(int(i), int(i) + 1, ("keys",))["keys"] for i in picks]))
            layer = {"name": name, "rows": lay.n_rows, "d_in": lay.d_in, "d_out": lay.d_out,
                     "kernel": list(geom.kernel_size), "input_size": list(geom.input_size),
                     "unfolded_keys_bytes": lay.n_rows * lay.d_in * 4}
        result["layer"] = layer
        print(f"layer {name}: {layer['rows']:,} virtual rows x d_in {layer['d_in']} (kernel {layer['kernel']}, maps "
              f"{layer['input_size']}); unfolded keys {layer['unfolded_keys_bytes'] / 2**20:.1f} MiB")
        times: dict[str, list[float]] = {"host": [], "device": []}
        moved: dict[str, int] = {}
        answers: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for v in ("host", "device"):
                with variant(v), DualInference(path, device=args.device) as di:
                    t0 = time.perf_counter()
                    res = di.attend(name, q, top_k=10)
                    times[v].append(time.perf_counter() - t0)
                    moved[v] = di._last_pass_bytes
                    answers[v] = res.dual
        cache_bytes = {}
        for v in ("host", "device"):
            with variant(v), DualInference(path, device=args.device, cache=4 << 30) as di:
                di.attend(name, q, top_k=10)
                cache_bytes[v] = di.cache_info().bytes
        result["attend"] = {
            v: {
                "seconds": min(times[v]),
                "all_seconds": times[v],
                "bytes_to_device": moved[v],
                "cache_bytes": cache_bytes[v],
            }
            for v in ("host", "device")
        }
        result["attend"]["dual_max_abs_diff"] = float((answers["host"] - answers["device"]).abs().max())
        for v in ("host", "device"):
            r = result["attend"][v]
            print(f"attend ({v} unfold): {r['seconds']:.2f} s per pass, {r['bytes_to_device'] / 2**20:.1f} MiB to the "
                  f"device, a cache holds {r['cache_bytes'] / 2**20:.1f} MiB")
        cert_times: dict[str, list[float]] = {"host": [], "device": []}
        sums: dict[str, torch.Tensor] = {}
        with StoreReader(path) as s:
            lay = s.layer(name)
            coef = lay.coefficients()
            for _ in range(args.repeats):
                for v in ("host", "device"):
                    with variant(v):
                        t0 = time.perf_counter()
                        sums[v] = memory_sums(lay, coef)[0]
                        cert_times[v].append(time.perf_counter() - t0)
        rel = float((sums["host"] - sums["device"]).norm() / sums["host"].norm())
        result["memory_sum"] = {
            "unfolded_seconds": min(cert_times["host"]),
            "weight_gradient_seconds": min(cert_times["device"]),
            "all_seconds": cert_times,
            "rel_diff": rel,
        }
        print(f"certificate's memory sum (float64): unfolded {min(cert_times['host']):.2f} s, conv weight gradient "
              f"{min(cert_times['device']):.2f} s; relative difference {rel:.1e}")
    write_json(args.out, "conv_attend.json", result)


if __name__ == "__main__":
    main()
