"""Never lose or falsify the memory: resume, SIGKILL, exceptions, a failing disk, concurrent readers."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset, dual_output, real_output, rel_err, store_contents
from lightning_dualform import DualFormCallback, DualInference, StoreReader, WriterError

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_run.py")


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc


def _assert_same_store(a: str, b: str) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        if isinstance(ca[k], np.ndarray):
            np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
        else:
            assert ca[k] == cb[k], k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run (``full/``), and a second run to epoch 3 whose store is then continued from its
    epoch-1 checkpoint (``part/``: the rows of epochs 2 and 3 truncated and written again), one process."""
    d = tmp_path_factory.mktemp("runs")
    _run(d / "full" / "run.h5", d / "full" / "ckpt", 3, "--then", d / "part" / "run.h5", d / "part" / "ckpt", 3,
         "--then", d / "part" / "run.h5", d / "part" / "ckpt2", 3, "--resume", d / "part" / "ckpt" / "epoch=0-*.ckpt")
    return d / "full"


def test_resume_equals_uninterrupted(uninterrupted):
    part = uninterrupted.parent / "part"
    _assert_same_store(uninterrupted / "run.h5", part / "run.h5")
    with StoreReader(part / "run.h5") as s:
        assert s.complete and s.layer("net.0").attrs["certificate_exact"]


def test_adamw_resume_equals_uninterrupted(tmp_path):
    """AdamW (amsgrad, a schedule, clipping): a store continued from a checkpoint is the uninterrupted one, bit for
    bit (its optimizer state before the first step, its tables and rows), and so is the model."""
    full, part = tmp_path / "full", tmp_path / "part"
    _run(full / "run.h5", full / "ckpt", 3, "--optimizer", "adamw", "--then", part / "run.h5", part / "ckpt", 2,
         "--optimizer", "adamw", "--then", part / "run.h5", part / "ckpt2", 3, "--resume",
         part / "ckpt" / "epoch=0-*.ckpt", "--optimizer", "adamw")
    # both certified by the replay of a few rows as training went; the resumed run continues the one its
    # checkpoint saved (record/row_replay.py), so even the certificate is the same, bit for bit
    _assert_same_store(full / "run.h5", part / "run.h5")
    a = torch.load(full / "ckpt" / "final_weights.pt", weights_only=True)
    b = torch.load(part / "ckpt2" / "final_weights.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for path, method in ((full / "run.h5", "rows"), (part / "run.h5", "rows")):
        with StoreReader(path) as s:
            assert s.update_rule == "adam" and s.complete
            assert all(s.layer(n).attrs["certificate_exact"] for n in s.layers)
            assert {s.layer(n).attrs["certificate_method"] for n in s.layers} == {method}
    model = MLP()
    model.load_state_dict(b)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    with DualInference(str(part / "run.h5"), device="cpu", accumulate=torch.float64) as di:
        assert rel_err(di.attend("net.0", x, top_k=1).dual.double(), real_output(model.net[0], x)) <= 1e-5


def test_sigkill_leaves_a_verifiable_store_and_resume_completes_it(uninterrupted, tmp_path):
    store = tmp_path / "run.h5"
    proc = _run(store, tmp_path / "ckpt", 3, "--kill-at-step", 13, check=False)
    assert proc.returncode == -9
    with StoreReader(store) as s:
        assert not s.complete and s.status == "recording"
        # the last durable point is the end of epoch 1 (5 steps of 16 examples per epoch)
        assert s.last_step == 10
        assert s.layer("net.0").n_rows == 160
    ckpt = glob.glob(str(tmp_path / "ckpt" / "epoch=1-step=10.ckpt"))[0]
    model = MLP.load_from_checkpoint(ckpt, opt_factory=None)
    g = torch.Generator().manual_seed(5)
    for name in ("net.0", "net.2"):
        x = torch.randn(6, dict(model.named_modules())[name].in_features, generator=g)
        assert rel_err(dual_output(str(store), name, x), real_output(dict(model.named_modules())[name], x)) <= 1e-5
    with pytest.warns(UserWarning, match="incomplete store.*after step 10"):
        di = DualInference(str(store), device="cpu", accumulate=torch.float64)
    with di:
        x = torch.randn(4, 8, generator=g)
        res = di.attend("net.2", x, top_k=3)
        assert res.primal is None and di.last_step == 10
        assert rel_err(res.dual.double(), real_output(model.net[2], x)) <= 1e-5
    _run(store, tmp_path / "ckpt2", 3, "--resume", ckpt)
    _assert_same_store(uninterrupted / "run.h5", store)


class Boom(MLP):
    boom_at = 4  # the global step whose training_step raises

    def training_step(self, batch, batch_idx):
        if self.global_step == self.boom_at:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_exception_in_training_commits_and_closes(tmp_path):
    model = Boom(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    cb = DualFormCallback(tmp_path / "x.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    with StoreReader(cb.store_path) as s:
        assert s.last_step == 4 and s.layer("net.0").n_rows == 64
    x = torch.randn(5, 6)
    assert rel_err(dual_output(cb.store_path, "net.0", x), real_output(model.net[0], x)) <= 1e-5


class BoomLater(Boom):
    boom_at = 8


def test_a_resumed_store_drops_the_certificate_sums_before_its_rows_change(tmp_path):
    """attend takes dual's memory part from the certificate's sums: a resume that rewrites rows and then
    crashes must not leave sums of the old rows behind."""
    opt = {"opt_factory": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)}
    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", filename="e1")
    L.Trainer(max_epochs=1, callbacks=[DualFormCallback(tmp_path / "s.h5", certify="full"), ckpt],
              **{**TRAINER_KW, "enable_checkpointing": True}).fit(MLP(**opt), dl)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert "memory_weight" in f["layers/net.0"] and "memory_rows" in f["layers/net.0"].attrs
    model = BoomLater(**opt)
    with pytest.raises(RuntimeError, match="boom"):
        L.Trainer(max_epochs=2, callbacks=[DualFormCallback(tmp_path / "s.h5")], **TRAINER_KW).fit(
            model, dl, ckpt_path=tmp_path / "c" / "e1.ckpt")
    with h5py.File(tmp_path / "s.h5", "r", swmr=True, locking=False) as f:
        g = f["layers/net.0"]
        assert "memory_weight" not in g and not any(k.startswith("memory_") for k in g.attrs)
    x = torch.randn(5, 6)
    with pytest.warns(UserWarning, match="incomplete store"):
        di = DualInference(str(tmp_path / "s.h5"), device="cpu", accumulate=torch.float64)
    with di:
        res = di.attend("net.0", x, top_k=2)
    assert res.dual_source == "rows" and di.last_step == 8
    assert rel_err(res.dual, real_output(model.net[0], x)) <= 1e-5


def test_writer_failure_stops_training_with_the_cause(tmp_path, monkeypatch):
    from lightning_dualform import store as store_mod

    calls = {"n": 0}
    original = store_mod.StoreWriter.add_step

    def failing(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kw)

    monkeypatch.setattr(store_mod.StoreWriter, "add_step", failing)
    cb = DualFormCallback(tmp_path / "full.h5")
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], **TRAINER_KW)
    with pytest.raises(WriterError, match=r"full\.h5.*No space left on device"):
        trainer.fit(MLP(), torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    assert trainer.global_step < 3 * 6  # training stopped instead of running on without a memory


def test_mismatched_settings_on_resume_show_both_values(tmp_path):
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", filename="last")
    trainer = L.Trainer(
        max_epochs=1,
        callbacks=[DualFormCallback(tmp_path / "s.h5"), ckpt_cb],
        **{**TRAINER_KW, "enable_checkpointing": True},
    )
    model = MLP()
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    trainer = L.Trainer(max_epochs=2, callbacks=[DualFormCallback(tmp_path / "s.h5", dtype="float16")], **TRAINER_KW)
    with pytest.raises(ValueError, match=r"row_dtype: store has 'float32', this run has 'float16'"):
        trainer.fit(
            model, torch.utils.data.DataLoader(IndexedDataset(), batch_size=16), ckpt_path=tmp_path / "c" / "last.ckpt"
        )
    with StoreReader(tmp_path / "s.h5") as s:  # the refused resume did not touch the store
        assert s.complete and s.layer("net.0").n_rows == 96


class ReadWhileTraining(L.Callback):
    """Opens the store from another handle during training, as `lightning-dualform info` would."""

    def __init__(self) -> None:
        self.errors: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module):
        path = trainer.callbacks[0].store_path
        with StoreReader(path) as s:
            assert s.status == "recording" and s.last_step == trainer.global_step
            x = torch.randn(4, 6, dtype=torch.float64)
            self.errors.append(rel_err(dual_output(path, "net.0", x), real_output(pl_module.net[0], x)))


def test_reading_while_training_sees_complete_steps(tmp_path):
    probe = ReadWhileTraining()
    trainer = L.Trainer(max_epochs=2, callbacks=[DualFormCallback(tmp_path / "live.h5"), probe], **TRAINER_KW)
    trainer.fit(MLP(), torch.utils.data.DataLoader(IndexedDataset(), batch_size=16))
    assert len(probe.errors) == 2 and max(probe.errors) <= 1e-5


def test_store_started_from_a_checkpoint_with_momentum_is_exact(tmp_path):
    """A run without the callback, continued with it: the store starts at the checkpoint's step and
    keeps the momentum buffers that existed then."""
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", filename="last")
    trainer = L.Trainer(max_epochs=1, callbacks=[ckpt_cb], **{**TRAINER_KW, "enable_checkpointing": True})
    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    trainer.fit(model, dl)
    cb = DualFormCallback(tmp_path / "late.h5")
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, dl, ckpt_path=tmp_path / "c" / "last.ckpt")
    with StoreReader(cb.store_path) as s:
        assert s.first_step == 6 and s.last_step == 18
    x = torch.randn(5, 6)
    assert cb.certificate["net.0"]["exact"], cb.certificate
    for name in ("net.0", "net.2"):
        x = torch.randn(5, dict(model.named_modules())[name].in_features)
        assert rel_err(dual_output(cb.store_path, name, x), real_output(dict(model.named_modules())[name], x)) <= 1e-5
    with h5py.File(cb.store_path, "r") as f:
        assert "weight_buffer_init" in f["layers"]["net.0"]
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        for name in ("net.0", "net.2"):
            m = dict(model.named_modules())[name]
            x = torch.randn(5, m.in_features)
            assert rel_err(di.attend(name, x, top_k=2).dual.double(), real_output(m, x)) <= 1e-5


def test_resume_with_a_schedule_stays_exact(tmp_path):
    """Restoring a checkpoint replaces the optimizer's param-group dicts; the schedule goes on in the new ones."""
    def make():
        return MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
                   sched_factory=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7))

    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", filename="last")
    trainer = L.Trainer(max_epochs=1, callbacks=[DualFormCallback(tmp_path / "s.h5"), ckpt_cb],
                        **{**TRAINER_KW, "enable_checkpointing": True})
    trainer.fit(make(), dl)
    model = make()
    cb = DualFormCallback(tmp_path / "s.h5")
    L.Trainer(max_epochs=3, callbacks=[cb], **TRAINER_KW).fit(model, dl, ckpt_path=tmp_path / "c" / "last.ckpt")
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    with StoreReader(cb.store_path) as s:
        lrs = s.layer("net.0").updates()["weight"]["lr"]
    assert lrs[-1] < lrs[6] < lrs[0]  # the schedule went on after the resume
    for name in ("net.0", "net.2"):
        m = dict(model.named_modules())[name]
        x = torch.randn(5, m.in_features)
        assert rel_err(dual_output(cb.store_path, name, x), real_output(m, x)) <= 1e-5


@pytest.mark.parametrize("during_fit", [True, False], ids=["checkpoints-during-fit", "no-checkpoint-during-fit"])
def test_checkpoint_saved_after_fit_resumes_without_losing_steps(tmp_path, during_fit):
    """trainer.save_checkpoint after fit must hold the finished store's counts (epoch-end commits are
    asynchronous; the counts must still be the last ones)."""
    model_kw = {"opt_factory": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)}
    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    cbs = [DualFormCallback(tmp_path / "s.h5")]
    kw = dict(TRAINER_KW)
    if during_fit:
        cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", every_n_epochs=2))
        kw["enable_checkpointing"] = True
    trainer = L.Trainer(max_epochs=3, callbacks=cbs, **kw)
    trainer.fit(MLP(**model_kw), dl)
    trainer.save_checkpoint(tmp_path / "final.ckpt")
    steps_after_fit = trainer.global_step
    model = MLP(**model_kw)
    cb = DualFormCallback(tmp_path / "s.h5")
    L.Trainer(max_epochs=4, callbacks=[cb], **TRAINER_KW).fit(model, dl, ckpt_path=tmp_path / "final.ckpt")
    with StoreReader(cb.store_path) as s:
        assert s.n_steps == 4 * steps_after_fit // 3  # nothing of the first fit was cut away
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate


def test_a_checkpoint_that_does_not_describe_the_store_truncates_nothing(tmp_path):
    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", filename="e1")
    L.Trainer(max_epochs=1, callbacks=[DualFormCallback(tmp_path / "s.h5"), ckpt],
              **{**TRAINER_KW, "enable_checkpointing": True}).fit(MLP(), dl)
    # the file is then re-recorded from that checkpoint (overwrite=True): its steps now start at step 6
    L.Trainer(max_epochs=3, callbacks=[DualFormCallback(tmp_path / "s.h5", overwrite=True)], **TRAINER_KW).fit(
        MLP(), dl, ckpt_path=tmp_path / "c" / "e1.ckpt")
    before = store_contents(str(tmp_path / "s.h5"))
    # resuming from the first checkpoint again: its counts (6 steps ending at step 5) describe the old store
    with pytest.raises(Exception, match="does not describe this store"):
        L.Trainer(max_epochs=3, callbacks=[DualFormCallback(tmp_path / "s.h5")], **TRAINER_KW).fit(
            MLP(), dl, ckpt_path=tmp_path / "c" / "e1.ckpt")
    after = store_contents(str(tmp_path / "s.h5"))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_a_store_moved_with_its_folder_resumes_and_another_store_there_is_refused(tmp_path, monkeypatch):
    """A checkpoint names its store by absolute path; a folder moved or copied (or a resume started from another
    directory) holds the same store elsewhere: it is recognised by the time it was created and continued. Another
    store at that path is refused, saying which store the checkpoint recorded into (it said: resume with
    ckpt_path, the call that had just failed)."""
    import shutil

    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath="c", filename="e1")
    L.Trainer(max_epochs=1, callbacks=[DualFormCallback("s.h5"), ckpt],
              **{**TRAINER_KW, "enable_checkpointing": True}).fit(MLP(), dl)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path / "b")
    cb = DualFormCallback("s.h5")
    L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(MLP(), dl, ckpt_path="c/e1.ckpt")
    with StoreReader(cb.store_path) as s:
        assert s.n_steps == 12 and s.first_step == 0 and s.complete  # the checkpoint's 6 steps kept, 6 more
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    (tmp_path / "d").mkdir()  # a store of another run (created later) at the same relative path
    monkeypatch.chdir(tmp_path / "d")
    import time

    time.sleep(1.1)  # (stores are told apart by their creation time, to the second)
    L.Trainer(max_epochs=1, callbacks=[DualFormCallback("s.h5")], **TRAINER_KW).fit(MLP(), dl)
    with pytest.raises(FileExistsError, match=r"The checkpoint being resumed recorded into .*a/s\.h5, and this file "
                                              r"is not that store"):
        L.Trainer(max_epochs=2, callbacks=[DualFormCallback("s.h5")], **TRAINER_KW).fit(
            MLP(), dl, ckpt_path=str(tmp_path / "a" / "c" / "e1.ckpt"))
    # the store moved and named another way (Lightning files the callback's state under the path as given)
    shutil.copytree(tmp_path / "a", tmp_path / "e")
    os.rename(tmp_path / "e" / "s.h5", tmp_path / "e" / "moved.h5")
    cb = DualFormCallback(tmp_path / "e" / "moved.h5")
    L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(MLP(), dl, ckpt_path=tmp_path / "e" / "c" / "e1.ckpt")
    with StoreReader(cb.store_path) as s:
        assert s.n_steps == 12 and s.first_step == 0 and s.complete
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate


def test_a_second_fit_of_the_same_callback_is_told_what_to_do(tmp_path):
    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16)
    cb = DualFormCallback(tmp_path / "s.h5")
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW)
    trainer.fit(MLP(), dl)
    trainer.fit_loop.max_epochs = 2
    with pytest.raises(FileExistsError, match="This callback recorded it in an earlier trainer.fit: a second fit "
                                              "records into another path"):
        trainer.fit(MLP(), dl)
