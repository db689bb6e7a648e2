"""Start-up: what each command imports (one that needs no torch must not load it), the package's names imported on
first use, and the probe's child process (started cheaply, and still bounding what a hostile file costs).

Timings are in ``benchmarks/startup.py``; these tests check what can fail: which modules a process loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import lightning_dualform
from lightning_dualform.store import _probe

DATA = os.path.join(os.path.dirname(__file__), "data")
SRC = os.path.dirname(os.path.dirname(os.path.abspath(lightning_dualform.__file__)))
#: what a version string, a help text, a store's header or a path check must never load
HEAVY = ("torch", "lightning", "lightning_fabric", "pytorch_lightning", "matplotlib", "tqdm")


def _run(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter with this tree first on the path; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_COMMAND = """
    import contextlib, io, json, sys
    from lightning_dualform.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(sys.argv[1:])
    heavy = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
    print(json.dumps({"code": code, "heavy": heavy, "out": out.getvalue()}))
""" % (HEAVY,)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("startup") / "store.h5"
    shutil.copy(os.path.join(DATA, "store_v1_sgd.h5"), path)
    return str(path)


@pytest.mark.parametrize("argv, code", [
    (["--version"], 0),
    (["--help"], 0),
    (["info", "--help"], 0),
    (["attend", "--help"], 0),
    (["info", "STORE"], 0),
    (["info", "no/such/store.h5"], 2),
    (["attend", "no/such/store.h5"], 2),
    (["verify", "no/such/store.h5"], 2),
    (["view", "no/such/store.h5"], 2),
    (["info"], 2),
])
def test_commands_that_need_no_torch_do_not_load_it(store: str, argv: list[str], code: int) -> None:
    on_store = "STORE" in argv
    argv = [store if a == "STORE" else a for a in argv]
    got = _run(_COMMAND, *argv)
    assert got["code"] == code
    assert got["heavy"] == [], f"`lightning-dualform {' '.join(argv)}` imported {got['heavy']}"
    if argv == ["--version"]:
        assert got["out"].strip() == f"lightning-dualform {lightning_dualform.__version__}"
    if on_store:
        from lightning_dualform.cli.info import render_info, store_facts

        assert got["out"].strip() == render_info(store_facts(store)).strip()  # the same facts as in-process


def test_import_of_the_package_loads_nothing_heavy_and_every_public_name_resolves() -> None:
    got = _run("""
        import json, sys
        import lightning_dualform as m
        import lightning_dualform.store, lightning_dualform.attend, lightning_dualform.record, lightning_dualform.cli
        heavy = sorted({n.split('.')[0] for n in sys.modules} & set(%r))
        print(json.dumps({"heavy": heavy, "dir": dir(m)}))
    """ % (HEAVY,))
    assert got["heavy"] == []
    assert set(lightning_dualform.__all__) <= set(got["dir"])
    # each name is the object of the module that defines it (where the package's eager imports took it from)
    import importlib

    for package in ("lightning_dualform", *(f"lightning_dualform.{room}" for room in ("store", "attend", "record"))):
        pkg = importlib.import_module(package)
        assert set(pkg._WHERE) | {"__version__"} >= set(pkg.__all__), package
        for name in pkg.__all__:
            if name in pkg._WHERE:
                assert getattr(pkg, name) is getattr(importlib.import_module(pkg._WHERE[name]), name), (package, name)
    namespace: dict = {}
    exec("from lightning_dualform import *", namespace)
    assert set(lightning_dualform.__all__) <= set(namespace) | {"__version__"}
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        lightning_dualform.NoSuchName  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lightning_dualform import NoSuchName", {})


# ------------------------------------------------------------------------------------------------------
# the probe's child process
# ------------------------------------------------------------------------------------------------------
def _child(paths: list[str], env: dict[str, str]) -> tuple[list[str], str]:
    """Run the probe's child as the probe runs it (this file by path), with ``-X importtime`` and ``-v`` (which
    says each module's file)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-v", _probe.__file__, "--serve"],
                          input="".join(json.dumps(p) + "\n" for p in paths), capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(_probe.__file__), timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln != "."]
    return lines, proc.stderr


def test_the_probe_child_loads_h5py_not_torch_and_its_own_tree_whatever_the_path(store: str, tmp_path) -> None:
    bad = tmp_path / "not_hdf5.h5"
    bad.write_bytes(b"not an HDF5 file" * 64)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the parent's path does not reach it
    lines, imports = _child([store, str(bad)], env)
    assert lines[0] == "READY" and lines[1] == "OK" and lines[2].startswith("BROKEN "), lines
    loaded = {ln.rsplit("|", 1)[-1].strip() for ln in imports.splitlines() if ln.startswith("import time:")}
    assert "h5py" in loaded and "lightning_dualform.store._h5open" in loaded
    # from the tree of the parent's _probe.py, whatever the child's sys.path holds (the machine's own install, here)
    here = os.path.dirname(_probe.__file__)
    assert any(ln.startswith("# ") and here in ln and "_h5open" in ln for ln in imports.splitlines())
    assert not {m.split(".")[0] for m in loaded} & set(HEAVY), sorted(m for m in loaded if m.split(".")[0] in HEAVY)


def test_a_started_child_serves_the_first_probe(store: str) -> None:
    _probe._stop_worker()
    _probe.start()
    pid = _probe._worker.proc.pid
    _probe._probed.clear()
    assert _probe.probe(store) is None
    assert _probe._worker is not None and _probe._worker.proc.pid == pid  # no second child started


def test_a_hung_walk_is_ended_within_its_bound_and_the_next_child_works(store: str, tmp_path) -> None:
    """A FIFO blocks any read for ever: the child makes no progress, is ended after the stall timeout and
    replaced; the new child (started as cheaply) walks the next file."""
    fifo = tmp_path / "stuck.h5"
    os.mkfifo(fifo)
    _probe.start()
    first = _probe._worker.proc.pid
    t0 = time.monotonic()
    reason = _probe.probe(str(fifo), timeout=1.0)
    took = time.monotonic() - t0
    assert "no progress for 1 s" in reason
    assert took < 1.0 + 60.0  # the stall bound plus slack for a loaded machine: never the start-up wait of 120 s
    assert _probe._worker is None  # the hung child was ended
    _probe._probed.clear()
    assert _probe.probe(store) is None and _probe._worker.proc.pid != first


def test_a_child_killed_mid_walk_is_reported_as_a_crash(tmp_path) -> None:
    fifo = tmp_path / "stuck.h5"
    os.mkfifo(fifo)
    _probe.start()
    worker = _probe._worker
    assert worker.ready or worker._wait_ready()  # killed during the walk, not during its start
    pid = worker.proc.pid
    threading.Timer(0.5, lambda: os.kill(pid, signal.SIGKILL)).start()
    reason = _probe.probe(str(fifo), timeout=30.0)
    assert "crashed the reader" in reason and str(-signal.SIGKILL) in reason


# ------------------------------------------------------------------------------------------------------
# the viewer: the address first, the store after it
# ------------------------------------------------------------------------------------------------------
def test_view_prints_its_address_first_and_answers_once_the_store_is_open(store: str) -> None:
    import http.client

    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_dualform", "view", store, "--port", "0", "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving {store} at http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/api/info")  # sent at once: it waits for the open, then is answered
        reply = conn.getresponse()
        info = json.loads(reply.read())
        assert reply.status == 200 and [la["name"] for la in info["layers"]] == ["net.0", "net.2"], info
        conn.close()
        notes = []
        while not (notes and notes[-1].startswith(("cache warm in ", "warming stopped"))):
            note = proc.stderr.readline()
            assert note, (notes, proc.poll())  # the viewer ended before it said the cache was warm
            notes.append(note.rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert notes[0] == f"opening {store} ..." and notes[1].startswith("open in "), notes
    assert notes[2].startswith("warming the cache: 2 layer(s), 192 rows") and notes[-1].startswith("cache warm in "), (
        notes
    )
    assert "stopped" in out


def test_view_of_a_damaged_store_says_so_after_the_address(tmp_path, capsys) -> None:
    from lightning_dualform.cli import main

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(4096))  # a signature, then nothing HDF5 can read
    assert main(["view", str(bad), "--port", "0", "--no-browser"]) == 2
    got = capsys.readouterr()
    assert got.out.startswith(f"serving {bad} at http://127.0.0.1:")
    assert got.err.strip().splitlines()[-1].startswith("lightning-dualform: error: ")
    assert str(bad) in got.err.strip().splitlines()[-1]
