"""A model trained under ``torch.compile`` (whole or in part) records its layers under the names they have without
it, and the attribution answers for it, compiled or not, as for the same model uncompiled."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from helpers import MLP, TRAINER_KW, IndexedDataset, loader

from lightning_dualform import DualFormCallback, DualFormRecorder, DualInference, _compat


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(module, backend="eager")  # dynamo's wrapper and tracing, without a C++ build


class InnerCompiled(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = compiled(self.net)


def test_a_compiled_submodule_is_recorded_and_explained_under_its_own_names(tmp_path):
    torch.manual_seed(0)
    model, ds = InnerCompiled(), IndexedDataset(n=48)
    cb = DualFormCallback(tmp_path / "c.h5", layers=["net._orig_mod.0", "net.2"])  # either spelling selects
    L.Trainer(max_epochs=2, callbacks=[cb], **TRAINER_KW).fit(model, loader(ds, 16))
    assert list(cb.certificate) == ["net.0", "net.2"] and all(c["exact"] for c in cb.certificate.values())
    x = ds.x[:5]
    with DualInference(cb.store_path, device="cpu") as di:
        assert di.layers == ["net.0", "net.2"]
        by_compiled = di.influence(model, x)
        res = di.explain(model, x)
        plain = MLP()
        plain.net = model.net._orig_mod  # the same trained layers, no compile wrapper
        by_plain = di.influence(plain, x)
        by_outer = di.influence(compiled(plain), x)
    assert _compat.compiled_original(model.net) is plain.net  # (explain and influence put the wrapper back)
    np.testing.assert_allclose(by_compiled.scores, by_plain.scores, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(by_outer.scores, by_plain.scores, rtol=1e-6, atol=1e-9)
    real = model.net._orig_mod[0](x / 10.0)
    torch.testing.assert_close(torch.as_tensor(res["net.0"].dual).float(), real.detach(), rtol=1e-4, atol=1e-5)


def test_the_recorder_takes_a_compiled_model(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fast = compiled(net)
    ds = IndexedDataset(n=32)
    with DualFormRecorder(tmp_path / "r.h5", fast, opt) as rec:
        for i in range(0, 32, 8):
            rec.batch(indices=torch.arange(i, i + 8))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fast(ds.x[i:i + 8] / 10), ds.y[i:i + 8]).backward()
            opt.step()
    assert sorted(rec.certificate) == ["0", "2"] and all(c["exact"] for c in rec.certificate.values())


class CompiledWithStages(InnerCompiled):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("v", torch.nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("t", torch.nn.functional.cross_entropy(self(x), y))


def test_the_queries_of_a_compiled_model_are_recorded_after_its_eval_graph_exists(tmp_path):
    from lightning_dualform.store.reader import StoreReader

    torch.manual_seed(0)
    ds = IndexedDataset(n=48)
    cb = DualFormCallback(tmp_path / "q.h5", record_queries=("test",))
    trainer = L.Trainer(max_epochs=1, callbacks=[cb], **TRAINER_KW)
    model = CompiledWithStages()
    trainer.fit(model, loader(ds, 16), loader(ds, 16, shuffle=False))  # validation compiles the eval forward first
    trainer.test(model, loader(ds, 16, shuffle=False))
    with StoreReader(cb.store_path) as store:
        rows = store.queries("test").layer_rows("net.0")
    np.testing.assert_allclose(rows["keys"], ds.x.numpy() / 10.0, rtol=1e-6)  # every test input, in order
