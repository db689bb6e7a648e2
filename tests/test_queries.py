"""Query recording during trainer.test/validate/predict, and raw training inputs stored once per example."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset
from lightning_dualform import DualFormCallback, StoreReader


class Classifier(MLP):
    def test_step(self, batch, batch_idx):
        x, y = batch
        return self(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0]).argmax(1)


def _layer_inputs(model, x):
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    return seen, out


@pytest.fixture
def trained(tmp_path):
    train, test = IndexedDataset(n=64, seed=0), IndexedDataset(n=20, seed=1)
    model = Classifier()
    cb = DualFormCallback(tmp_path / "q.h5", record_queries=("test", "validate", "predict"))
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=16, shuffle=True))
    return trainer, model, cb, train, test


def test_recorded_test_queries_equal_a_separate_forward(trained):
    trainer, model, cb, train, test = trained
    g = torch.Generator().manual_seed(3)
    trainer.test(model, torch.utils.data.DataLoader(test, batch_size=8, shuffle=True, generator=g))
    inputs, logits = _layer_inputs(model, test.x)
    with StoreReader(cb.store_path) as s:
        assert s.query_splits == ["test"]
        q = s.queries("test")
        assert q.n == 20 and sorted(q.index.tolist()) == list(range(20))
        assert q.index.tolist() != list(range(20))  # shuffled: indices come from the sampler
        np.testing.assert_array_equal(q.label, test.y[q.index].numpy())
        np.testing.assert_array_equal(q.prediction, logits.argmax(1)[q.index].numpy())
        np.testing.assert_array_equal(q.inputs, test.x[q.index].numpy())
        for name in ("net.0", "net.2"):
            rows = q.layer_rows(name)
            np.testing.assert_array_equal(rows["example"], np.arange(20))
            np.testing.assert_array_equal(rows["label"], test.y[q.index].numpy())
            np.testing.assert_allclose(rows["keys"], inputs[name][q.index].numpy(), rtol=0, atol=1e-6)


def test_validate_and_predict_are_separate_splits(trained):
    trainer, model, cb, train, test = trained
    dl = torch.utils.data.DataLoader(test, batch_size=8)
    trainer.validate(model, dl)
    preds = torch.cat(trainer.predict(model, dl))
    with StoreReader(cb.store_path) as s:
        assert s.query_splits == ["predict", "validate"]
        np.testing.assert_array_equal(s.queries("predict").prediction, preds.numpy())
        assert s.queries("validate").n == 20
        with pytest.raises(KeyError, match="no query set 'test'.*predict"):
            s.queries("test")


def test_training_inputs_are_stored_once_per_example(trained):
    trainer, model, cb, train, test = trained
    with h5py.File(cb.store_path, "r") as f:
        assert f["inputs"]["index"].shape == (64,)  # 3 epochs, each example once
        assert f.attrs["epochs"] == 3 and f.attrs["final_step"] == 12
    with StoreReader(cb.store_path) as s:
        assert s.n_inputs == 64
        idx = np.array([5, 0, 63, 17])
        np.testing.assert_array_equal(s.train_inputs(idx), train.x[idx].numpy())
        assert np.isnan(s.train_inputs(np.array([1000]))).all()


def test_query_recording_needs_a_store(tmp_path):
    cb = DualFormCallback(tmp_path / "none.h5", record_queries=("test",))
    trainer = L.Trainer(callbacks=[cb], **TRAINER_KW)
    with pytest.raises(FileNotFoundError, match="run trainer.fit with this callback first"):
        trainer.test(Classifier(), torch.utils.data.DataLoader(IndexedDataset(n=8), batch_size=4))


def test_bad_record_queries_argument():
    with pytest.raises(ValueError, match="record_queries"):
        DualFormCallback("x.h5", record_queries="test")
    with pytest.raises(ValueError, match="record_queries"):
        DualFormCallback("x.h5", record_queries=("train",))


def test_the_query_count_is_said_after_the_stage_s_progress_bar_closes(trained, monkeypatch):
    """fit then test in one script, progress bars on: the line that says how many queries were recorded comes
    after the test bar is done, as a line of its own (said inside the bar, it was lost in its last redraw)."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    from lightning_dualform.record import callback as callback_mod

    trainer, model, cb, train, test = trained
    events: list[str] = []
    close = TQDMProgressBar.on_test_end
    monkeypatch.setattr(TQDMProgressBar, "on_test_end", lambda self, *a: (events.append("bar closed"), close(self, *a)))
    monkeypatch.setattr(callback_mod, "rank_zero_info", events.append)
    tester = L.Trainer(callbacks=[cb], enable_progress_bar=True, logger=False, enable_checkpointing=False,
                       enable_model_summary=False)
    tester.test(model, torch.utils.data.DataLoader(test, batch_size=8), verbose=False)
    said = [e for e in events if e.startswith("DualFormCallback: recorded ")]
    assert len(said) == 1 and said[0].startswith(f"DualFormCallback: recorded 20 test queries into {cb.store_path} in ")
    assert events.index("bar closed") < events.index(said[0]), events


def test_a_failed_stage_keeps_the_query_sets_the_store_had(trained):
    """An exception in trainer.test leaves the store as it was before the stage began: no partial split."""
    trainer, model, cb, train, test = trained
    trainer.test(model, torch.utils.data.DataLoader(test, batch_size=8))
    with StoreReader(cb.store_path) as s:
        before = s.queries("test").index.copy()

    class Failing(Classifier):
        def test_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("the second batch fails")
            return super().test_step(batch, batch_idx)

    failing = Failing()
    failing.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="second batch"):
        L.Trainer(callbacks=[cb], **TRAINER_KW).test(failing,
                                                     torch.utils.data.DataLoader(test, batch_size=4, shuffle=True))
    with StoreReader(cb.store_path) as s:
        np.testing.assert_array_equal(s.queries("test").index, before)  # the old split, whole


def test_a_resume_makes_the_query_sets_of_the_earlier_model_stale(tmp_path):
    """Query sets hold the layer inputs and predictions of the model that recorded them: a resume that trains on
    (or rolls back and retrains to the same step) makes them another model's, refused until recorded again."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dualform.cli.main import main as cli
    from lightning_dualform.errors import StaleQueriesError

    train, test = IndexedDataset(n=48, seed=0), IndexedDataset(n=12, seed=1)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    kw = {**TRAINER_KW, "enable_checkpointing": True}

    def fit(epochs, ckpt=None):
        model = Classifier()
        cb = DualFormCallback(tmp_path / "q.h5", record_queries=("test",))
        trainer = L.Trainer(max_epochs=epochs, callbacks=[cb, ckpts], **kw)
        trainer.fit(model, loader, ckpt_path=ckpt)
        return trainer, model, cb

    trainer, model, cb = fit(2)  # 6 steps
    trainer.test(model, torch.utils.data.DataLoader(test, batch_size=4))
    with StoreReader(cb.store_path) as s:
        assert s.queries("test").after_step == 6 and s.queries("test").stale is None
    first = sorted((tmp_path / "ck").glob("epoch=0*.ckpt"))[0]  # after 3 steps: the resume rolls back 3
    fit(2, str(first))  # and trains back to 6 steps: another model at the same step count
    with StoreReader(cb.store_path) as s:
        with pytest.raises(StaleQueriesError, match=r"'test' queries are not this store's model's: they were recorded "
                                                     r"with a model whose last steps a resume rolled back"):
            s.queries("test")
        assert s.queries("test", stale_ok=True).stale is not None
    assert cli(["verify", str(cb.store_path)]) == 0  # (the set is no evidence about this store's model)
    assert cli(["attend", str(cb.store_path), "--split", "test"]) != 0
    trainer, model, cb = fit(3, str(sorted((tmp_path / "ck").glob("epoch=1*.ckpt"))[-1]))  # trains on: 9 steps
    trainer.test(model, torch.utils.data.DataLoader(test, batch_size=4))  # recorded again: current
    with StoreReader(cb.store_path) as s:
        assert s.queries("test").after_step == 9 and s.queries("test").stale is None
    fit(4, str(sorted((tmp_path / "ck").glob("epoch=2*.ckpt"))[-1]))  # trains on from the last: 12 steps
    with StoreReader(cb.store_path) as s:
        with pytest.raises(StaleQueriesError, match=r"recorded with the model after 9 optimizer steps, and the store "
                                                     r"now rebuilds the model after 12"):
            s.queries("test")


def test_queries_through_another_checkpoints_model_are_marked_as_another_models(tmp_path):
    """``trainer.test(ckpt_path=...)`` with an earlier checkpoint runs the queries through that model: recorded, with
    a warning, and refused by readers as stale (they were stamped as the store's last model's)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_dualform.errors import StaleQueriesError

    train, test = IndexedDataset(n=48, seed=0), IndexedDataset(n=12, seed=1)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    cb = DualFormCallback(tmp_path / "q.h5", record_queries=("test",))
    trainer = L.Trainer(max_epochs=2, callbacks=[cb, ckpts], **{**TRAINER_KW, "enable_checkpointing": True})
    model = Classifier()
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=16, shuffle=True))
    first = sorted((tmp_path / "ck").glob("epoch=0*.ckpt"))[0]
    with pytest.warns(UserWarning, match=r"the test queries go through a model whose net\.\d\.(weight|bias) differs "
                                         r"from the store's final weights"):
        trainer.test(model, torch.utils.data.DataLoader(test, batch_size=4), ckpt_path=str(first))
    with StoreReader(cb.store_path) as s:
        with pytest.raises(StaleQueriesError, match="recorded with a model whose weights are not the store's final"):
            s.queries("test")
    trainer.test(model, torch.utils.data.DataLoader(test, batch_size=4), ckpt_path=str(
        sorted((tmp_path / "ck").glob("epoch=1*.ckpt"))[0]))  # the last checkpoint: the store's model
    with StoreReader(cb.store_path) as s:
        assert s.queries("test").stale is None
