"""Walk an HDF5 file's whole structure in a child process, so that a damaged file cannot crash or hang us.

Some corruptions of HDF5 metadata make the C library loop forever or crash while it holds the GIL,
which no Python code in the same process can interrupt. :func:`probe` runs this file as a script in a
child process (by path, without importing the package, so it starts in a fraction of a second) and
reports a damaged file as a :class:`~lightning_dualform.errors.StoreError`. Data chunks themselves are
protected by their fletcher32 checksums.
"""

from __future__ import annotations

import os
import subprocess
import sys

_OK, _BROKEN = 0, 3
_probed: set[tuple[str, int, int]] = set()


def _walk(path: str) -> None:
    import h5py

    try:
        f = h5py.File(path, "r", swmr=True, locking=False)
    except OSError:
        f = h5py.File(path, "r", locking=False)
    with f:
        dict(f.attrs)

        def visit(name: str, obj: object) -> None:
            dict(obj.attrs)  # type: ignore[attr-defined]
            if isinstance(obj, h5py.Dataset):
                _ = obj.shape, obj.dtype
                if obj.chunks is not None and obj.size:
                    n = obj.id.get_num_chunks()
                    for i in range(n):  # the chunk index (a B-tree) is metadata too
                        obj.id.get_chunk_info(i)
                if obj.size and obj.size <= 1 << 16:
                    obj[()]

        f.visititems(visit)


def probe(path: str, timeout: float | None = None) -> str | None:
    """Walk ``path`` in a child process. Returns None when the walk succeeds, else what went wrong."""
    try:
        st = os.stat(path)
    except OSError as err:
        return str(err)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _probed:
        return None
    timeout = timeout if timeout is not None else float(os.environ.get("LIGHTNING_DUALFORM_PROBE_TIMEOUT", "60"))
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), path], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"reading its HDF5 structure did not finish within {timeout:g} s (damaged metadata)"
    if proc.returncode == _OK:
        _probed.add(key)
        return None
    if proc.returncode == _BROKEN:
        return (proc.stdout.strip().splitlines() or ["unreadable HDF5 structure"])[-1]
    return f"reading its HDF5 structure crashed the reader (exit {proc.returncode})"


if __name__ == "__main__":
    try:
        _walk(sys.argv[1])
    except Exception as err:  # report, never a traceback: the parent turns it into a StoreError
        print(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300])
        sys.exit(_BROKEN)
    sys.exit(_OK)
