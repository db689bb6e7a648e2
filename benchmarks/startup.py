"""Start-up of the command line and of the first ``DualInference`` open: wall time and CPU time (of the process and
of its children: the probe's checking process), each in a fresh interpreter, median of ``--repeat`` runs.

Measured, against the targets of issue 25 (a quiet 2-core machine):

- ``lightning-dualform --version`` and ``--help``: within 0.3 s;
- ``info`` on the demo store: within 1.5 s;
- ``info`` of a path that does not exist (rejected): within 0.5 s;
- the first ``DualInference`` open in a process: within 1 s more than the second (the import of the package and
  torch before it is reported apart);
- ``view``: the address printed within 3 s, then the store open and the cache warm (reported as they come).

``--src`` compares trees side by side (each a ``src`` folder put first on ``PYTHONPATH``), interleaved in every
round, e.g. the branch before the change against after it. The machine's load average is printed with each
figure: wall times on a shared machine are inflated, CPU times much less.

Run:  python benchmarks/startup.py --store demo/mnist.h5 [--src /path/to/old/src src] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: one process: opens the store twice with DualInference, prints the times as JSON (argv: store)
_OPENS = r"""
import json, resource, sys, time, warnings

def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

warnings.simplefilter("ignore")
t, c = time.perf_counter(), cpu()
from lightning_dualform import DualInference
import torch  # (DualInference imports it)
out = {"import": [time.perf_counter() - t, cpu() - c]}
for name in ("first", "second"):
    t, c = time.perf_counter(), cpu()
    with DualInference(sys.argv[1]) as di:
        pass
    out[name] = [time.perf_counter() - t, cpu() - c]
# the probe's checking process served the first open (the second found the file checked): its CPU counts once it
# has exited, so end it now and add its CPU to the first open's
c = cpu()
try:
    from lightning_dualform.store import _probe
    _probe._stop_worker()
except Exception:
    pass
out["first"][1] += cpu() - c
print(json.dumps(out))
"""


def _env(src: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_command(src: str, argv: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds (the process and every child it waited for) and the exit code of one command."""
    c0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lightning_dualform", *argv], env=_env(src), capture_output=True)
    return time.perf_counter() - t0, _children_cpu() - c0, proc.returncode


def run_opens(src: str, store: str) -> dict[str, list[float]]:
    proc = subprocess.run([sys.executable, "-c", _OPENS, store], env=_env(src), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_view(src: str, store: str, wait: float = 300.0) -> dict[str, float]:
    """Seconds until ``view`` printed its address, said the store was open, and said the cache was warm (a viewer
    that opens the store before printing its address and says nothing after it: the address only)."""
    import queue
    import signal
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lightning_dualform", "view", store, "--port", "0", "--no-browser"],
                            env=_env(src), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout or ()], daemon=True)
    reader.start()
    got: dict[str, float] = {}
    try:
        while "warm" not in got:
            try:
                line = lines.get(timeout=wait if "address" not in got else 60.0)
            except queue.Empty:
                break
            now = time.perf_counter() - t0
            if line.startswith("serving ") and "address" not in got:
                got["address"] = now
            elif line.startswith("open in "):
                got["open"] = now
            elif line.startswith("cache warm in "):
                got["warm"] = now
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)  # the reader owns the pipe: it ends at the viewer's last line
    return got


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="the demo store (lightning-dualform demo --out demo/)")
    p.add_argument("--src", nargs="+", default=[os.path.join(REPO, "src")], help="src folders to compare")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-view", action="store_true", help="skip the viewer's start-up")
    p.add_argument("--json", default=None, help="also write every figure here")
    args = p.parse_args()
    missing = os.path.join(os.path.dirname(os.path.abspath(args.store)), "no-such-store.h5")
    commands = {"--version": ["--version"], "--help": ["--help"], "info": ["info", args.store],
                "bad path": ["info", missing]}
    rows: dict[tuple[str, str], list] = {}
    loads = []
    for _ in range(args.repeat):
        for src in args.src:  # interleaved: each round measures every tree
            loads.append(os.getloadavg()[0])
            for name, argv in commands.items():
                wall, cpu, code = run_command(src, argv)
                rows.setdefault((src, name), []).append((wall, cpu))
            opens = run_opens(src, args.store)
            for k in ("import", "first", "second"):
                rows.setdefault((src, f"open: {k}"), []).append(tuple(opens[k]))
            if not args.no_view:
                v = run_view(src, args.store)
                for k in ("address", "open", "warm"):
                    rows.setdefault((src, f"view: {k}"), []).append((v.get(k, float("nan")), float("nan")))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.repeat} rounds  load average "
          f"{min(loads):.2f}..{max(loads):.2f}  {os.cpu_count()} cores  store {args.store} "
          f"({os.path.getsize(args.store) / 1e6:.0f} MB)")
    head = "".join(f"{'wall s':>9s}{'CPU s':>8s}  " for _ in args.src)
    print(f"{'what':18s} {head}  trees: {', '.join(args.src)}")
    names = list(dict.fromkeys(n for _, n in rows))
    for name in names:
        cells = []
        for src in args.src:
            got = rows.get((src, name), [])
            cells.append(f"{_median([w for w, _ in got]):9.2f}{_median([c for _, c in got]):8.2f}  ")
        print(f"{name:18s} " + "".join(cells))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"loads": loads, "rows": {f"{s} | {n}": v for (s, n), v in rows.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
