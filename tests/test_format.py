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
        assert s.meta.format_version == 1 and FORMAT_VERSION == 4
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
    cb = DualFormCallback(d / "adam.h5", certify="full")  # (the whole replay at the end: its weights kept)
    L.Trainer(max_epochs=2, callbacks=[cb], gradient_clip_val=0.5, accumulate_grad_batches=2, **TRAINER_KW).fit(
        model, loader(IndexedDataset(n=48), batch_size=8))
    return str(d / "adam.h5")


def test_version_2_layout_names_the_rule_and_keeps_the_state(adam_store):
    with h5py.File(adam_store, "r") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION and f.attrs["update_rule"] == "adam"
        g = f["layers/net.0"]
        assert tuple(g.attrs["weight_shape"]) == (8, 6)
        assert sorted(g["updates/weight"]) == sorted(
            ["lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay", "applied"]
        )
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


# ------------------------------------------------------------------------------------------------------
# docs/store-format.md lists everything the writer writes
# ------------------------------------------------------------------------------------------------------
def _doc_names() -> tuple[set[str], set[str], set[str]]:
    """Names ``docs/store-format.md`` gives in backticks (outside code blocks), as ``@entry`` (a state group's
    attributes), and in its code blocks (the ``h5ls`` listings) or tables (each rule's columns and state)."""
    import re

    text = open(os.path.join(HERE, "..", "docs", "store-format.md"), encoding="utf-8").read()
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    word = r"[A-Za-z_][A-Za-z0-9_]*"
    ticked = {w for span in re.findall(r"`([^`]+)`", prose) for w in re.findall(word, span)}
    at = set(re.findall(r"@(" + word + ")", text))
    listed = {w for b in blocks for w in re.findall(word, b)}
    listed |= {w for line in prose.splitlines() if line.startswith("|") for w in re.findall(word, line)}
    return ticked, at, listed


def _written(path: str) -> dict[str, set[str]]:
    """Every attribute name of a file by where it sits, and every dataset or group name."""
    out: dict[str, set[str]] = {"root": set(), "layer": set(), "state": set(), "queries": set(), "objects": set()}
    with h5py.File(path, "r", locking=False) as f:
        out["root"] |= set(f.attrs)

        def visit(name: str, obj) -> None:
            parts = name.split("/")
            if not (len(parts) == 2 and parts[0] in ("layers", "queries")) and parts[-2:-1] != ["layers"]:
                out["objects"].add(parts[-1])  # (not a layer's or a split's own name)
            where = ("layer" if parts[0] == "layers" and len(parts) == 2 else
                     "state" if parts[0] == "layers" and len(parts) == 4 and parts[2] == "state" else
                     "queries" if parts[0] == "queries" else "other")
            out.setdefault(where, set()).update(obj.attrs)

        f.visititems(visit)
    return out


def _recorded_stores(root: str) -> list[str]:
    """Stores of every kind the writer makes: linear, conv and embedding layers with SGD (the sketch certificate,
    raw inputs, a query set), Adam and NAdam and ASGD (state, the full certificate), an inexact run (the
    residual), a dropped layer, and a DDP index."""
    from lightning_dualform import DualFormRecorder
    from lightning_dualform.attend.certificate import certify_store
    from lightning_dualform.store import write_shard_index
    from lightning_dualform.store.query_writer import QueryWriter

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(7, 3, padding_idx=0)
            self.conv = torch.nn.Conv1d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 5, 2)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(self.emb(tokens).transpose(1, 2)).flatten(1))

    def run(name: str, make_opt, **kw) -> str:
        path = os.path.join(root, name)
        model = Net()
        opt = make_opt(model.parameters())
        g = torch.Generator().manual_seed(1)
        with DualFormRecorder(path, model, opt, **kw) as rec:
            for step in range(3):
                tokens = torch.randint(0, 7, (4, 5), generator=g)
                rec.batch(indices=torch.arange(4) + 4 * step, labels=torch.arange(4) % 2, inputs=tokens,
                          epoch=step // 2)
                torch.nn.functional.cross_entropy(model(tokens), torch.arange(4) % 2).backward()
                opt.step()
                opt.zero_grad()
        return path

    paths = [
        run("sgd.h5", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
        run("adam.h5", lambda p: torch.optim.Adam(p, lr=1e-2), certify="full"),
        run("nadam.h5", lambda p: torch.optim.NAdam(p, lr=1e-2)),
        run("asgd.h5", lambda p: torch.optim.ASGD(p, lr=1e-2), certify="full"),
        run("rprop.h5", lambda p: torch.optim.Rprop(p, lr=1e-2), exact=False),
    ]
    paths.append(run("sgd-full.h5", lambda p: torch.optim.SGD(p, lr=0.1), certify="full"))  # the memory's sums
    certify_store(paths[-1])  # (again: a certificate written over one)
    with StoreReader(paths[0]) as s:
        widths = {n: s.layer(n).d_in for n in s.layers}
    q = QueryWriter(paths[0], "test", widths)
    q.add_batch(np.arange(2), np.zeros(2), np.ones(2), np.zeros((2, 5)),
                {n: (np.zeros((2, d)), np.arange(2), np.zeros(2), np.zeros(2)) for n, d in widths.items()})
    q.close()
    write_shard_index(os.path.join(root, "index.h5"), paths[:2])
    return paths + [os.path.join(root, "index.h5")]


def test_the_format_page_lists_every_attribute_and_dataset_the_writer_writes(tmp_path):
    """A store written by this library holds no attribute, dataset or group that docs/store-format.md does not
    name: root and layer attributes in backticks, a state group's attributes as ``@entry``, objects in the
    h5ls listings or in backticks."""
    ticked, at, listed = _doc_names()
    found: dict[str, set[str]] = {}
    for path in _recorded_stores(str(tmp_path)):
        for where, names in _written(path).items():
            found.setdefault(where, set()).update(names)
    undocumented = {
        "root": found["root"] - ticked,
        "layer": found["layer"] - ticked,
        "state": found["state"] - at,
        "queries": found["queries"] - ticked,
        "objects": found["objects"] - listed - ticked,
    }
    assert not any(undocumented.values()), f"written but not in docs/store-format.md: {undocumented}"
    # (the test sees what it claims to: the stores hold the attributes of every part)
    assert {"recorded_by", "gradient_clip_algorithm"} <= found["root"] and {"shards"} <= found["root"]
    assert {"certificate_method", "certificate_probes", "rows_without_index", "kernel_size", "padding_idx",
            "memory_rows", "certificate_tables_crc32"} <= found["layer"]
    assert {"step", "mu_product", "eta"} <= found["state"] and {"n", "created"} <= found["queries"]
    assert {"weight_residual", "replay_weight", "memory_weight", "input_size", "exp_avg"} <= found["objects"]
