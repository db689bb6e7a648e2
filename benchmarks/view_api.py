"""Answer time of the viewer's JSON API (``lightning-dualform view``) on the demo store.

Starts the viewer's server in this process (``ViewServer`` on 127.0.0.1, as ``lightning-dualform view``
does), lets it read every layer into its cache, then times ``--requests`` HTTP requests
``GET /api/attend?split=test&index=I&layer=L&top_k=5`` over different test digits ``I`` (one new query per
request, as a user clicking through), for ``net.4``, ``net.0`` and all layers at once, and the same with a
viewer without a cache (every answer reads the layer from the file, which stays in the page cache). Each
time is the whole round trip: request, attend, JSON, response.

Run:  python benchmarks/view_api.py [--store demo/mnist.h5] [--requests 50]
(the store is made with `lightning-dualform demo --out DIR --no-plot` when missing)
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="/tmp/dualform-bench/demo/mnist.h5")
    p.add_argument("--requests", type=int, default=50, help="requests per variant")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args()
    if not os.path.exists(args.store):
        out = os.path.dirname(os.path.abspath(args.store))
        subprocess.run(
            [sys.executable, "-m", "lightning_dualform", "demo", "--out", out, "--no-plot", "--quiet"], check=True
        )

    from lightning_dualform import DualInference
    from lightning_dualform.cli.view import ViewApp, ViewServer

    facts = machine()
    print(
        f"{facts['cpu']}, {facts['cores']} cores, torch threads {facts['torch_threads']}, load "
        f"{facts['loadavg_at_start']}, commit {facts['commit']}, {facts['date']}"
    )
    results: dict = {"machine": facts, "store": args.store, "variants": {}}
    for cache in ("auto", None):
        di = DualInference(args.store, device="cpu", cache=cache)
        app = ViewApp(args.store, di)
        srv = ViewServer(app, port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        if cache is not None:
            app.warm()
        qs = di.store.queries("test").index
        port = srv.server_address[1]

        def get(path: str) -> float:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            t = time.perf_counter()
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t
            conn.close()
            assert resp.status == 200, body[:300]
            return dt

        for layer in ("net.4", "net.0", None):
            picks = qs[np.random.default_rng(0).permutation(len(qs))[: args.requests + 1]]
            lay = f"&layer={layer}" if layer else ""
            get(f"/api/attend?split=test&index={picks[-1]}{lay}&top_k=5")  # first-call costs (stats, imports)
            times = [get(f"/api/attend?split=test&index={i}{lay}&top_k=5") for i in picks[:-1]]
            name = f"{layer or 'all layers'}, {'cache' if cache else 'no cache'}"
            ms = 1e3 * np.array(times)
            print(
                f"{name:28s} median {np.median(ms):7.1f} ms   p90 {np.percentile(ms, 90):7.1f} ms   min "
                f"{ms.min():6.1f} ms   max {ms.max():7.1f} ms"
            )
            results["variants"][name] = {"ms": ms.tolist(), "median_ms": float(np.median(ms))}
        if cache is not None:
            print("  cache:", di.cache_info())
        srv.shutdown()
        srv.server_close()
        di.close()
    write_json(args.out, "view_api.json", results)


if __name__ == "__main__":
    main()
