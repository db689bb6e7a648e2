"""Store formats: a version-1 store (written by the code of 59505dc) reads as before; version 2 is precise
enough to rebuild a layer with h5py and numpy alone (``docs/rebuild_layer.py``)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset, dual_output, loader, rel_err
from lightning_dualform import DualFormCallback, DualInference, StoreReader
from lightning_dualform.attend.replay import LayerReplay
from lightning_dualform.cli import main as cli
from lightning_dualform.store.format import FORMAT_VERSION

HERE = os.path.dirname(__file__)
V1 = os.path.join(HERE, "data", "store_v1_sgd.h5")


def _reference_script():
    spec = importlib.util.spec_from_file_location("rebuild_layer", os.path.join(HERE, "..", "docs", "rebuild_layer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_version_1_store_reads_as_an_sgd_store(tmp_path):
    path = str(tmp_path / "v1.h5")
    shutil.copy(V1, path)  # (a reader never writes, but keep the fixture untouched anyway)
    with StoreReader(path) as s:
        assert s.meta.format_version == 1 and FORMAT_VERSION == 3
        assert s.update_rule == "sgd" and s.form == "scalar" and s.complete
        assert "update_rule" not in s.attrs
        lay = s.layer("net.0")
        assert lay.weight_shape == (lay.d_out, lay.d_in)
        assert set(lay.updates()["weight"]) == {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize",
                                                 "fresh_buffer", "applied"}
        wf = {n: (s.layer(n).weight_final, s.layer(n).bias_final) for n in s.layers}
        queries = s.queries("test").layer_rows("net.0")["keys"]
    with DualInference(path, device="cpu", accumulate=torch.float64) as di:
        assert max(di.verify().values()) <= 1e-5
        res = di.attend("net.0", queries, top_k=3)
        assert res.score == "raw" and res.units is None and res.dual_source == "certificate"
        assert res.max_rel_err <= 1e-5
        # the same numbers as the raw file gives through the format-1 recipe
        assert rel_err(res.dual.double(), dual_output(path, "net.0", torch.from_numpy(queries))) <= 1e-9
    w, b = _reference_script().rebuild(path, "net.2")
    assert rel_err(torch.from_numpy(w), torch.from_numpy(wf["net.2"][0]).double()) <= 1e-5
    assert rel_err(torch.from_numpy(b), torch.from_numpy(wf["net.2"][1]).double()) <= 1e-5
    assert cli(["verify", path]) == 0


@pytest.fixture(scope="module")
def adam_store(tmp_path_factory):
    """Adam with amsgrad, L2 decay and a maximize group; clipping, accumulation and a schedule."""
    d = tmp_path_factory.mktemp("adam")
    L.seed_everything(0, verbose=False)

    def opt(m):
        return torch.optim.Adam([{"params": m.net[0].parameters(), "amsgrad": True, "weight_decay": 0.05},
                                 {"params": m.net[2].parameters(), "maximize": True}], lr=2e-2)

    model = MLP(opt_factory=opt, sched_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.7))
    cb = DualFormCallback(d / "adam.h5")
    L.Trainer(max_epochs=2, callbacks=[cb], gradient_clip_val=0.5, accumulate_grad_batches=2, **TRAINER_KW).fit(
        model, loader(IndexedDataset(n=48), batch_size=8))
    return str(d / "adam.h5")


def test_version_2_layout_names_the_rule_and_keeps_the_state(adam_store):
    with h5py.File(adam_store, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and f.attrs["update_rule"] == "adam"
        g = f["layers/net.0"]
        assert tuple(g.attrs["weight_shape"]) == (8, 6)
        assert sorted(g["updates/weight"]) == sorted(["lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
                                                       "decoupled_weight_decay", "applied"])
        assert sorted(g["state/weight"]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
        assert g["state/weight"].attrs["step"] == 0.0 and not g["state/weight/exp_avg_sq"][()].any()
        assert g["replay_weight"].shape == (8, 6) and "memory_weight" not in g


def test_reference_script_rebuilds_an_adam_layer_with_h5py_and_numpy(adam_store):
    ref = _reference_script()
    with StoreReader(adam_store) as s:
        for name in s.layers:
            lay = s.layer(name)
            w, b = ref.rebuild(adam_store, name)
            assert rel_err(torch.from_numpy(w), torch.from_numpy(lay.weight_final).double()) <= 1e-5
            assert rel_err(torch.from_numpy(b), torch.from_numpy(lay.bias_final).double()) <= 1e-5
            mid = s.first_step + s.n_steps // 2
            w_mid, b_mid = ref.rebuild(adam_store, name, mid)
            w_lib, b_lib = LayerReplay(lay, mid).weights()
            np.testing.assert_allclose(w_mid, w_lib, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(b_mid, b_lib, rtol=1e-10, atol=1e-13)
