"""Walk an HDF5 file's whole structure in a child process, so that a damaged file cannot crash or hang us.

Some corruptions of HDF5 metadata make the C library loop forever or crash while it holds the GIL
(measured: one changed byte made ``info`` spin at 100% CPU, deaf to SIGINT), which no Python code in the
same process can interrupt. :func:`probe` runs this file as a script in a child process before the library
opens a file itself, and reports a damaged file as a reason string that readers raise as
:class:`~lightning_dualform.errors.StoreError`. The child imports h5py, numpy and three small modules of the
package (whose ``__init__`` files import nothing on their own), never torch: it starts in about 0.2 s of CPU
where it took 5-7 s when it loaded the whole package; :func:`start` begins it early, so that its start
overlaps the caller's own imports.

The child stays up for the next file (starting Python and h5py costs far more than a walk) and is
replaced after any file it finds damaged. It prints a line as it visits each object (and every 1,024
chunks), and the parent ends it when no line has come while the child had :func:`stall_timeout` seconds to make
one (CPU time, or time blocked in a read; :class:`_Progress`): a big healthy store takes as long as it needs, a
loop inside HDF5 (which spins at 100% CPU) or a read that never returns is caught in seconds, and a child that a
loaded machine keeps waiting for a core is not mistaken for a hung one (seen at load 26: a plain wall-clock limit
of 5 s called healthy stores damaged). The walk also checks what a loop could otherwise make endless:
a dataset's chunk index may not list more chunks than the file has room for, nor chunks past its end.
Data chunks themselves are protected by their fletcher32 checksums.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Protocol

_probed: set[tuple] = set()
#: seconds without progress after which a walk counts as hung
DEFAULT_STALL_S = 5.0
#: seconds the checking process may take to start (Python and h5py, on a busy machine)
STARTUP_S = 120.0
#: wall seconds without progress after which a walk counts as hung, however little time it had
STALL_WALL_S = 120.0


def stall_timeout() -> float:
    try:
        return float(os.environ.get("LIGHTNING_DUALFORM_PROBE_TIMEOUT", DEFAULT_STALL_S))
    except ValueError:
        return DEFAULT_STALL_S


class _ChunkInfo(Protocol):
    """What the walk reads of h5py's ``StoreInfo`` (one chunk of a dataset)."""

    byte_offset: int | None  # None: not allocated
    size: int


def _walk(path: str) -> None:  # runs in the child
    import h5py

    from lightning_dualform.store import _h5open

    def tick() -> None:
        sys.stdout.write(".\n")
        sys.stdout.flush()

    size = os.path.getsize(path)
    with _h5open.open_any(path) as f:
        dict(f.attrs)
        tick()

        def visit(name: str, obj: object) -> None:
            nonlocal size
            dict(obj.attrs)  # type: ignore[attr-defined]
            if isinstance(obj, h5py.Dataset):
                _ = obj.shape, obj.dtype
                if obj.chunks is not None and obj.size:
                    n = obj.id.get_num_chunks()
                    if n > size // 8 + 1:
                        raise ValueError(f"dataset {name!r} lists {n} chunks in a file of {size} bytes")
                    seen = 0

                    def check(info: _ChunkInfo) -> None:
                        nonlocal seen, size
                        # (an unallocated chunk has no offset; h5py lists only allocated ones)
                        end = info.byte_offset + info.size if info.byte_offset is not None else 0
                        if end > size:
                            size = os.path.getsize(path)  # a file being written grows
                            if end > size:
                                raise ValueError(f"dataset {name!r} has a chunk past the end of the file")
                        seen += 1
                        if seen % 1024 == 0:
                            tick()
                        if seen > n:
                            raise ValueError(f"dataset {name!r}: its chunk index does not end")

                    if hasattr(obj.id, "chunk_iter"):  # one pass over the index (get_chunk_info(i) walks it each time)
                        obj.id.chunk_iter(check)
                    else:  # pragma: no cover - older h5py
                        for i in range(n):
                            check(obj.id.get_chunk_info(i))
                if obj.size and obj.size <= 1 << 16:
                    try:
                        obj[()]
                    except OSError as err:  # (which dataset: HDF5's message does not say)
                        raise OSError(f"dataset {name!r}: {err}") from err
            tick()

        f.visititems(visit)


class _Worker:
    """A child process that walks files on request (one per process that probes; replaced after a hang,
    a crash, or a damaged file that left HDF5 holding open objects, so that no walk runs in a library state
    a damaged file left behind)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )
        self._buf = b""
        self.ready = False

    def _wait_ready(self) -> bool:
        """Wait for the child's first line, after its imports (starting Python and h5py on a busy machine can
        take seconds: that is not the walk making no progress)."""
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                self.ready = line == b"READY"
                return self.ready
            ready, _, _ = select.select([fd], [], [], 0.25)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return False
                self._buf += chunk
        return False

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def walk(self, path: str, stall: float) -> tuple[str, str]:
        """``("ok", "")``, ``("broken", reason)``, ``("hung", "")`` or ``("crashed", exit code)``."""
        if not self.ready and not self._wait_ready():
            return "crashed", f"{self.proc.poll()}; the checking process did not start within {STARTUP_S:g} s"
        try:
            self.proc.stdin.write((json.dumps(path) + "\n").encode())  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
        except OSError:
            return "crashed", str(self.proc.poll())
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        progress = _Progress(self.proc.pid, stall)
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line == b".":
                    continue
                text = line.decode(errors="replace")
                if text == "OK":
                    return "ok", ""
                if text.startswith("BROKEN "):
                    return "broken", text[len("BROKEN "):]
                if text.startswith("DIRTY "):
                    return "dirty", text[len("DIRTY "):]
            ready, _, _ = select.select([fd], [], [], 0.25)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    return "crashed", str(code)
                self._buf += chunk
                progress.reset()
            elif progress.hung():
                return "hung", ""

    def close(self) -> None:
        if self.pid != os.getpid():
            return  # a forked copy: the parent's worker is not ours to stop
        try:
            self.proc.kill()
            self.proc.wait()
        except OSError:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()  # type: ignore[union-attr]
            except (OSError, AttributeError):
                pass


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """A process's scheduler state (``R`` runnable, ``S``/``D`` waiting ...) and the CPU seconds it has used,
    from ``/proc`` (None where there is none)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class _Progress:
    """Whether a walk that prints nothing is hung, in time the child had: it spent ``stall`` seconds of CPU since
    its last line (a loop inside HDF5 spins), or waited ``stall`` seconds for something other than the CPU (a
    read that blocks), or :data:`STALL_WALL_S` seconds passed. Time a loaded machine kept it waiting for a core
    does not count. Where ``/proc`` is missing, ``stall`` seconds of wall time."""

    def __init__(self, pid: int, stall: float) -> None:
        self.pid, self.stall = pid, stall
        self.reset()

    def reset(self) -> None:
        self.start = self.seen = time.monotonic()
        stat = _proc_stat(self.pid)
        self.cpu = stat[1] if stat else None
        self.blocked = 0.0

    def hung(self) -> bool:
        now = time.monotonic()
        wall, dt, self.seen = now - self.start, now - self.seen, now
        if wall > max(STALL_WALL_S, self.stall):
            return True
        stat = _proc_stat(self.pid)
        if stat is None or self.cpu is None:
            return wall > self.stall
        state, cpu = stat
        if state not in ("R", "Z", "X"):  # asleep or in I/O: waiting for something other than a core
            self.blocked += dt
        return cpu - self.cpu > self.stall or self.blocked > self.stall


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _stop_worker() -> None:
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


atexit.register(_stop_worker)


def start() -> None:
    """Start the checking process now, if it is not up, without waiting for it: a command that will open a store
    calls this first, so that the child's start-up (Python and h5py) overlaps the command's own imports."""
    global _worker
    with _worker_lock:
        if _worker is None or not _worker.alive():
            _worker = _Worker()


def probe(path: str, timeout: float | None = None) -> str | None:
    """Walk ``path`` in a child process. Returns None when the walk succeeds, else what went wrong.

    Args:
        timeout: seconds without progress before the walk counts as hung (default :func:`stall_timeout`).
    """
    global _worker
    try:
        st = os.stat(path)
    except OSError as err:
        return str(err)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _probed:
        return None
    stall = timeout if timeout is not None else stall_timeout()
    with _worker_lock:
        if _worker is None or not _worker.alive():
            _worker = _Worker()
        status, detail = _worker.walk(os.path.abspath(path), stall)
        if status not in ("ok", "broken"):  # hung, crashed, or left HDF5 holding a damaged file: a new child
            _worker.close()
            _worker = None
    if status == "ok":
        _probed.add(key)
        return None
    if status in ("broken", "dirty"):
        return detail or "unreadable HDF5 structure"
    if status == "hung":
        return f"reading its HDF5 structure made no progress for {stall:g} s (damaged metadata)"
    return f"reading its HDF5 structure crashed the reader (exit {detail})"


def _open_ids() -> int:
    """HDF5 files, groups, datasets and attributes still open in this process (h5py keeps datatypes of
    its own open: they belong to no file)."""
    import h5py

    h5f = h5py.h5f
    return int(h5f.get_obj_count(h5f.OBJ_ALL, h5f.OBJ_FILE | h5f.OBJ_GROUP | h5f.OBJ_DATASET | h5f.OBJ_ATTR))


def _serve() -> None:  # runs in the child
    import gc

    import h5py  # noqa: F401  (the slow part of starting: before the parent times any walk)

    from lightning_dualform.store import _h5open  # noqa: F401

    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for line in sys.stdin:
        report = "OK"
        try:
            path = json.loads(line)
            _walk(path)
        except Exception as err:  # report, never a traceback: the parent turns it into a StoreError
            msg = str(err).strip().splitlines()
            report = f"BROKEN {type(err).__name__}: {msg[0] if msg else ''}"[:300].replace("\n", " ")
            del err
        gc.collect()
        if report != "OK" and _open_ids():  # the damaged file left HDF5 holding state: start afresh
            report = "DIRTY " + report[len("BROKEN "):]
        sys.stdout.write(report + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    # Run by path: Python put this file's folder first on sys.path; drop it (its module names, such as `format`,
    # would shadow others). Load the package from the tree this file is in, whatever sys.path holds, so that the
    # child runs the parent's code; its __init__s import nothing heavy, so the child loads h5py, numpy and a few
    # small modules of ours, never torch (tests/test_startup.py).
    import importlib.util

    del sys.path[0]
    _package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.util.spec_from_file_location(
        "lightning_dualform", os.path.join(_package, "__init__.py"), submodule_search_locations=[_package]
    )
    sys.modules["lightning_dualform"] = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
    _spec.loader.exec_module(sys.modules["lightning_dualform"])  # type: ignore[union-attr]
    from lightning_dualform.store._probe import _serve as _serve_from_package

    _serve_from_package()
