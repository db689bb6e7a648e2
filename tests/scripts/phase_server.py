"""Run deterministic recording scenarios in forked children, each killed at a chosen point of a chosen
phase, or starved of disk space at one (run as a subprocess by tests/test_reliability.py and
benchmarks/reliability.py).

usage: phase_server.py SCENARIOS.json RESULTS.json

The server imports torch, Lightning and the library once, then forks one child per scenario, so a
scenario costs a fit, not an interpreter start. A child trains the same seeded MLP as train_run.py
(80 examples, batches of 16: 5 optimizer steps per epoch, a checkpoint and a commit at every epoch end),
then optionally runs ``trainer.test`` and ``trainer.predict`` with query recording. Scenario keys:

    store, ckpt_dir     where the child writes
    epochs              max_epochs
    resume              checkpoint to resume from (optional)
    test, predict       run them after fit (bool)
    kill                {"at": "step", "n": S}         SIGKILL in on_before_optimizer_step of global step S
                        {"at": "flush", "n": K}        SIGKILL right after the K-th h5py File.flush (commits)
                        {"at": "ckpt", "n": K}         SIGKILL as the K-th checkpoint file is saved
                        {"at": "create", "n": 0 | 1}   SIGKILL before / right after the skeleton is renamed
                        {"at": "session", "phase": P, "n": K}
                                                       SIGKILL before the K-th event of a write session whose
                                                       phase starts with P (events: journal ready, each write,
                                                       truncate and journal record, commit, committed)
    fill                {"at": A, "n": N, "leave": B}  fill the store's disk leaving B bytes at point A:
                        "step" (batch start of step N), "epoch_end" (of epoch N), "ckpt" (N-th checkpoint),
                        "fit_end", "certificate", "test" / "predict" (start, or batch N if N > 0), "resume",
                        or "session" with "phase": P and "when": "open" (as a write session of phase P
                        begins) or "write" (at its first write, after it reserved its space)
    count               record how many events each kill kind has (no kill)

A child exits 0 (done), 1 (an exception: printed), or dies by a signal (a planned SIGKILL, or a crash).
The child appends every commit it begins and completes to ``<store>.commits`` (fsynced), so the parent
knows which committed state the store must open at.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import MLP, EpochSampler, IndexedDataset  # noqa: E402

import lightning_dualform.record.callback as callback_mod  # noqa: E402
from lightning_dualform import DualFormCallback  # noqa: E402
from lightning_dualform.store import _journal, writer as writer_mod  # noqa: E402
from lightning_dualform.store.writer import StoreWriter  # noqa: E402

STEPS_PER_EPOCH = 5


class Model(MLP):
    def test_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self(batch[0])


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Events:
    """Counts events per kind; kills the process at the chosen one (or records the counts)."""

    def __init__(self, spec: dict | None, count_path: str | None) -> None:
        self.spec = spec or {}
        self.counts: dict[str, int] = {}
        self.count_path = count_path

    def hit(self, kind: str) -> None:
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if self.count_path:
            with open(self.count_path, "w") as fh:
                json.dump(self.counts, fh)
        want = self.spec.get("at")
        key = want if want != "session" else f"session:{self.spec.get('phase')}"
        if key == kind and n == self.spec.get("n"):
            _die()


def _fill(directory: str, leave: int) -> None:
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    block = b"\0" * (1 << 16)
    try:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                os.write(fd, block[: max(4096, min(len(block), free - leave))])
            except OSError:
                break
    finally:
        os.close(fd)


def install(spec: dict, events: _Events) -> list[L.Callback]:
    """Monkeypatches and callbacks for the scenario's kill or fill point (in the child only)."""
    store = spec["store"]
    kill = spec.get("kill") or {}
    fill = spec.get("fill") or {}
    callbacks: list[L.Callback] = []
    log_path = store + ".commits"

    def log(line: str) -> None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    orig_commit = StoreWriter._commit

    def commit(self):  # noqa: ANN001
        target = int(self.file["update_step"].shape[0]) + len(self._pending_steps)
        log(f"begin {target}")
        out = orig_commit(self)
        log(f"done {out['steps']}")
        return out

    StoreWriter._commit = commit
    truncating: list[int] = []
    orig_truncate = writer_mod.truncate  # (store/truncate.py's, as StoreWriter.resume calls it)

    def truncate_store(f, path, rows, steps, *a):  # noqa: ANN001, ANN002 - a resume's truncation is a commit too
        log(f"begin {steps}")
        truncating.append(steps)
        return orig_truncate(f, path, rows, steps, *a)

    writer_mod.truncate = truncate_store

    import h5py

    orig_flush = h5py.File.flush

    def flush(self):  # noqa: ANN001
        orig_flush(self)
        events.hit("flush")

    h5py.File.flush = flush

    orig_save = torch.save

    def save(*a, **k):  # noqa: ANN002, ANN003
        events.hit("ckpt")
        if fill.get("at") == "ckpt" and events.counts["ckpt"] - 1 == fill.get("n", 0):
            _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))
        return orig_save(*a, **k)

    torch.save = save

    orig_replace = writer_mod.os.replace

    def replace(src, dst):  # noqa: ANN001
        if str(src).startswith(store + ".creating"):
            events.hit("create")
            orig_replace(src, dst)
            events.hit("create")
            return None
        return orig_replace(src, dst)

    writer_mod.os.replace = replace

    undo = _journal._UndoFile
    orig_init, orig_write, orig_trunc, orig_save_j, orig_jcommit = (
        undo.__init__,
        undo.write,
        undo.truncate,
        undo._save,
        undo.commit,
    )

    def tag(self) -> str:  # noqa: ANN001
        return f"session:{self.phase}"

    def hit(self) -> None:  # noqa: ANN001
        want = kill.get("phase")
        kind = tag(self)
        if want is not None and kind.startswith(f"session:{want}"):
            events.hit(f"session:{want}")
        else:
            events.hit(kind)

    filled = []

    def fill_session(phase: str, when: str) -> None:
        if (
            fill.get("at") == "session"
            and fill.get("when", "open") == when
            and phase.startswith(fill["phase"])
            and not filled
        ):
            filled.append(phase)
            _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

    def init(self, path, phase):  # noqa: ANN001
        fill_session(phase, "open")  # before the session reserves its space
        orig_init(self, path, phase)
        hit(self)

    def write(self, data):  # noqa: ANN001
        if self.failed is None:
            fill_session(self.phase, "write")  # after it did: its writes must still succeed
            hit(self)
        return orig_write(self, data)

    def truncate(self, size=None):  # noqa: ANN001
        if self.failed is None:
            hit(self)
        return orig_trunc(self, size)

    def save_j(self, a, b):  # noqa: ANN001
        hit(self)
        return orig_save_j(self, a, b)

    def jcommit(self):  # noqa: ANN001
        hit(self)
        orig_jcommit(self)
        if self.phase.startswith("resume") and truncating:
            log(f"done {truncating.pop()}")
        hit(self)

    undo.__init__, undo.write, undo.truncate, undo._save, undo.commit = init, write, truncate, save_j, jcommit

    if kill.get("at") == "step" or fill.get("at") == "step":
        class AtStep(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if fill.get("at") == "step" and trainer.global_step == fill.get("n"):
                    _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                if kill.get("at") == "step" and trainer.global_step == kill.get("n"):
                    _die()

        callbacks.append(AtStep())
    if fill.get("at") in ("epoch_end", "fit_end", "test", "predict"):
        class Filler(L.Callback):  # listed before DualFormCallback: runs first
            def on_train_epoch_end(self, trainer, pl_module):
                if fill["at"] == "epoch_end" and trainer.current_epoch == fill.get("n"):
                    _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

            def on_fit_end(self, trainer, pl_module):
                if fill["at"] == "fit_end":
                    _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

            def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
                if fill["at"] == "test" and batch_idx == fill.get("n", 0):
                    _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

            def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
                if fill["at"] == "predict" and batch_idx == fill.get("n", 0):
                    _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

            def on_test_start(self, trainer, pl_module):
                if fill["at"] == "test" and fill.get("n", 0) < 0:
                    _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))

        callbacks.append(Filler())
    if fill.get("at") == "certificate":
        orig_certify = callback_mod.certify_store  # (the callback hands it to the engine, which calls it at fit end)

        def certify(*a, **k):  # noqa: ANN002, ANN003
            _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))
            return orig_certify(*a, **k)

        callback_mod.certify_store = certify
    if fill.get("at") == "resume":
        orig_resume = StoreWriter.resume.__func__

        def resume(cls, *a, **k):  # noqa: ANN001, ANN002, ANN003
            _fill(os.path.dirname(os.path.abspath(store)), fill.get("leave", 0))
            return orig_resume(cls, *a, **k)

        StoreWriter.resume = classmethod(resume)
    return callbacks


def resolve(kill: dict | None) -> dict | None:
    """A kill given as ``"frac"`` of the events a counting run saw (``"counts"``: its count file) -> ``"n"``."""
    if not kill or "frac" not in kill:
        return kill
    counts = json.load(open(kill["counts"]))
    key = kill["at"] if kill["at"] != "session" else f"session:{kill['phase']}"
    total = sum(v for k, v in counts.items() if k == key or (kill["at"] == "session" and k.startswith(key)))
    return {**kill, "n": min(max(total - 1, 0), int(kill["frac"] * total))}


def run(spec: dict) -> None:
    """One scenario (in the forked child)."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    spec = {**spec, "kill": resolve(spec.get("kill"))}
    events = _Events(spec.get("kill"), spec.get("count"))
    extra = install(spec, events)
    ds = IndexedDataset(n=80)
    model = Model(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    cb = DualFormCallback(spec["store"], commit_seconds=1e9, record_queries=("test", "predict"), certify="full",
                          overwrite=bool(spec.get("overwrite")))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=spec["ckpt_dir"], save_top_k=-1, filename="{epoch}-{step}")
    if spec.get("batch_sleep"):  # a run long enough for a reader to open it many times, however loaded the machine
        class Sleep(L.Callback):
            def on_train_batch_end(self, *args: object) -> None:
                time.sleep(float(spec["batch_sleep"]))

        extra = [*extra, Sleep()]
    trainer = L.Trainer(
        max_epochs=spec["epochs"],
        callbacks=[*spec.get("_extra", []), *extra, cb, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=EpochSampler(len(ds)))
    trainer.fit(model, loader, ckpt_path=spec.get("resume"))
    queries = torch.utils.data.DataLoader(IndexedDataset(n=16, seed=1), batch_size=8)
    if spec.get("test"):
        trainer.test(model, queries, verbose=False)
    if spec.get("predict"):
        trainer.predict(model, queries)


def _child(spec: dict, barrier: str | None = None) -> int:
    """Fork a child that runs ``spec`` (writing its exception's type to ``<ckpt_dir>/error``)."""
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        if barrier is not None:  # two trainings reach their first batch together
            class Barrier(L.Callback):
                def on_train_start(self, trainer, pl_module):
                    open(os.path.join(spec["ckpt_dir"], "ready"), "w").close()
                    deadline = time.monotonic() + 30
                    while not all(os.path.exists(os.path.join(d, "ready")) for d in json.loads(barrier)):
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.005)

            spec = {**spec, "_extra": [Barrier()]}
        run(spec)
    except BaseException as err:  # an exception is an outcome, not a crash
        traceback.print_exc()
        with open(os.path.join(spec.get("log_dir") or spec["ckpt_dir"], "error"), "w") as fh:
            fh.write(f"{type(err).__name__}: {err}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid: int, deadline: float) -> dict:
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return {"signal": os.WTERMSIG(status)}
            return {"exit": os.WEXITSTATUS(status)}
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return {"hung": True}


def _reader(store: str, writer_pid: int, out: str) -> int:
    """Fork a child that opens and reads ``store`` again and again while ``writer_pid`` lives; it writes what
    each read gave (a committed state, "busy", or an error) to ``out``."""
    pid = os.fork()
    if pid:
        return pid
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import reliability

    from lightning_dualform.errors import StoreBusyError, StoreError

    seen: list[dict] = []
    snaps: list[dict] = []

    def alive() -> bool:
        try:
            return os.waitpid(writer_pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:  # not our child: ask the kernel
            try:
                os.kill(writer_pid, 0)
                return (
                    os.path.exists(f"/proc/{writer_pid}") and open(f"/proc/{writer_pid}/stat").read().split()[2] != "Z"
                )
            except OSError:
                return False

    while alive():
        if not os.path.exists(store):
            time.sleep(0.005)
            continue
        try:
            snap = reliability.snapshot(store)
            seen.append({"outcome": "ok", "state": f"{snap['status']} {snap['n_steps']}"})
            snaps.append(snap)
        except StoreBusyError as err:
            seen.append({"outcome": "busy", "detail": str(err)[:200]})
        except StoreError as err:
            seen.append({"outcome": "damaged", "detail": str(err)[:300]})
        except Exception as err:  # noqa: BLE001
            seen.append({"outcome": "other", "detail": f"{type(err).__name__}: {str(err)[:200]}"})
    # every state a reader saw must be a committed state of the finished store
    ref = reliability.snapshot(store)
    for entry, snap in zip([e for e in seen if e["outcome"] == "ok"], snaps):
        entry["problems"] = reliability.compare(snap, ref)
    with open(out, "w") as fh:
        json.dump(seen, fh)
    os._exit(0)


def main() -> int:
    scenarios = json.load(open(sys.argv[1]))
    results = []
    torch.set_num_threads(1)
    for spec in scenarios:
        os.makedirs(spec["ckpt_dir"], exist_ok=True)
        t0 = time.monotonic()
        deadline = t0 + float(spec.get("timeout", 300))
        if spec.get("pair"):  # two trainings on one path at once
            other = {**spec, "ckpt_dir": spec["ckpt_dir"] + "-2"}
            os.makedirs(other["ckpt_dir"], exist_ok=True)
            barrier = json.dumps([spec["ckpt_dir"], other["ckpt_dir"]])
            pids = [_child(spec, barrier), _child(other, barrier)]
            outs = [_wait(p, deadline) for p in pids]
            errors = []
            for d in (spec.get("log_dir") or spec["ckpt_dir"], other["ckpt_dir"]):
                path = os.path.join(d, "error")
                errors.append(open(path).read() if os.path.exists(path) else None)
            outcome = {"pair": outs, "errors": errors}
        elif spec.get("reader"):  # a reader opening the store again and again while it is written
            pid = _child(spec)
            rpid = _reader(spec["store"], pid, os.path.join(spec["ckpt_dir"], "reads.json"))
            outcome = _wait(pid, deadline)
            outcome["reader"] = _wait(rpid, deadline + 60)
            path = os.path.join(spec["ckpt_dir"], "reads.json")
            outcome["reads"] = json.load(open(path)) if os.path.exists(path) else None
        else:
            outcome = _wait(_child(spec), deadline)
        err_path = os.path.join(spec.get("log_dir") or spec["ckpt_dir"], "error")
        if os.path.exists(err_path):
            outcome["error"] = open(err_path).read()[:500]
        if spec.get("fill"):  # the disk is full only for the phase under test: free it for the readers
            filler = os.path.join(os.path.dirname(os.path.abspath(spec["store"])), "filler")
            if os.path.exists(filler):
                os.remove(filler)
        results.append({"name": spec.get("name"), "seconds": time.monotonic() - t0, **outcome})
        with open(sys.argv[2], "w") as fh:
            json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
