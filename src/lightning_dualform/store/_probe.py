"""Walk an HDF5 file's whole structure in a child process, so that a damaged file cannot crash or hang us.

Some corruptions of HDF5 metadata make the C library loop forever or crash while it holds the GIL
(measured: one changed byte made ``info`` spin at 100% CPU, deaf to SIGINT), which no Python code in the
same process can interrupt. :func:`probe` runs this file as a script in a child process (by path,
without importing the package, so it starts in a fraction of a second) before the library opens a file
itself, and reports a damaged file as a reason string that readers raise as
:class:`~lightning_dualform.errors.StoreError`.

The child prints a line as it visits each object (and every 1,024 chunks), and the parent ends it when
no line has come for :func:`stall_timeout` seconds: a big healthy store takes as long as it needs, a
loop inside HDF5 is caught in seconds. The walk also checks what a loop could otherwise make endless:
a dataset's chunk index may not list more chunks than the file has room for, nor chunks past its end.
Data chunks themselves are protected by their fletcher32 checksums.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

_OK, _BROKEN = 0, 3
_probed: set[tuple] = set()
#: seconds without progress after which a walk counts as hung
DEFAULT_STALL_S = 5.0


def stall_timeout() -> float:
    try:
        return float(os.environ.get("LIGHTNING_DUALFORM_PROBE_TIMEOUT", DEFAULT_STALL_S))
    except ValueError:
        return DEFAULT_STALL_S


def _walk(path: str) -> None:  # runs in the child
    import h5py

    import _h5open  # type: ignore[import-not-found]  # beside this file: the child's sys.path[0]

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

                    def check(info: object) -> None:
                        nonlocal seen, size
                        end = info.byte_offset + info.size  # type: ignore[attr-defined]
                        if info.byte_offset is not None and end > size:
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
                    obj[()]
            tick()

        f.visititems(visit)


def probe(path: str, timeout: float | None = None) -> str | None:
    """Walk ``path`` in a child process. Returns None when the walk succeeds, else what went wrong.

    Args:
        timeout: seconds without progress before the walk counts as hung (default :func:`stall_timeout`).
    """
    try:
        st = os.stat(path)
    except OSError as err:
        return str(err)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _probed:
        return None
    stall = timeout if timeout is not None else stall_timeout()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), path],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
    )
    lines: list[bytes] = []
    last = time.monotonic()
    buf = b""
    try:
        fd = proc.stdout.fileno()  # type: ignore[union-attr]
        while True:
            ready, _, _ = select.select([fd], [], [], 0.25)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                last = time.monotonic()
                *done, buf = buf.split(b"\n")
                lines.extend(x for x in done if x and x != b".")
            elif time.monotonic() - last > stall:
                proc.kill()
                proc.wait()
                return f"reading its HDF5 structure made no progress for {stall:g} s (damaged metadata)"
        code = proc.wait(timeout=stall)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "reading its HDF5 structure did not finish (damaged metadata)"
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
    if code == _OK:
        _probed.add(key)
        return None
    if code == _BROKEN:
        text = [x.decode(errors="replace") for x in lines]
        return (text or ["unreadable HDF5 structure"])[-1]
    return f"reading its HDF5 structure crashed the reader (exit {code})"


if __name__ == "__main__":
    try:
        _walk(sys.argv[1])
    except Exception as err:  # report, never a traceback: the parent turns it into a StoreError
        msg = str(err).strip().splitlines()
        print(f"{type(err).__name__}: {msg[0] if msg else ''}"[:300], flush=True)
        sys.exit(_BROKEN)
    sys.exit(_OK)
