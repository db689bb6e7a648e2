"""DDP: each rank writes its own shard; together they rebuild the real model exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from helpers import MLP, dual_output, real_output, rel_err
from lightning_dualform import DualInference, StoreReader
from lightning_dualform.store.shards import open_store
from lightning_dualform.store import read_shard_index

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_run.py")


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """One two-process DDP run of the MLP with a convolution in front (SGD, a schedule, clipping)."""
    d = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(d / "ddp.h5"), str(d / "final.pt")], capture_output=True,
                          text=True, timeout=300, cwd=d, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def _conv_mlp():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from ddp_run import ConvMLP

    return ConvMLP()


def test_two_process_ddp_is_exact(sgd_run, tmp_path):
    shutil.copytree(sgd_run, tmp_path / "run")  # (this test edits the shards)
    store, weights = tmp_path / "run" / "ddp.h5", tmp_path / "run" / "final.pt"
    shards = read_shard_index(str(store))
    assert [os.path.basename(s) for s in shards] == ["ddp.rank0.h5", "ddp.rank1.h5"]
    model = _conv_mlp()
    model.load_state_dict(torch.load(weights, weights_only=True))
    indices = []
    for shard in shards:
        with StoreReader(shard) as s:
            assert s.attrs["world_size"] == 2 and s.n_steps == 12  # 96 examples / (2 ranks x 8) x 2 epochs
            indices.append(s.layer("net.0").read(0, s.layer("net.0").n_rows, ("index",))["index"])
            conv = s.layer("conv")  # an input's feature 0 is its index: the centre of its first location's key
            rows = conv.read(0, conv.n_rows, ("keys", "index"))
            np.testing.assert_array_equal(rows["keys"][::6, 1], rows["index"][::6])
            for name, m in model.named_modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d)):
                    assert s.layer(name).attrs["certificate_exact"], (shard, name)
    # the DistributedSampler gives each rank half of the examples in every epoch
    assert sorted(np.concatenate(indices).tolist()) == sorted(list(range(96)) * 2)
    g = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        x = torch.randn(6, m.in_features, generator=g)
        base = dual_output(shards[0], name, x, memory=False)
        dual = base + sum(dual_output(s, name, x, base=False) for s in shards)
        assert rel_err(dual, real_output(m, x)) <= 1e-5, name
        # one shard alone is not the model: the 1/world_size of gradient averaging is in the values
        assert rel_err(dual_output(shards[0], name, x), real_output(m, x)) > 1e-3
        # DualInference opens the index as one store
        with DualInference(str(store), device="cpu", accumulate=torch.float64) as di:
            res = di.attend(name, x, top_k=3, per_example=False)
            rows = di.attend(name, x, top_k=3, per_example=False, reuse_certificate=False)
        # every shard keeps the certificate's all-reduced sums over all shards' rows
        assert (res.dual_source, rows.dual_source) == ("certificate", "rows")
        for r in (res, rows):
            assert rel_err(r.dual.double(), real_output(m, x)) <= 1e-5
        with DualInference(shards[1], device="cpu", accumulate=torch.float64) as di:  # one shard alone
            assert di.attend(name, x, top_k=3, per_example=False).dual_source == "rows"
    with open_store(str(store)) as s:
        layer = s.layer("net.0")
        assert layer.n_rows == 2 * 96 and s.last_step == 12
        rows = layer.read(0, layer.n_rows, ("step", "index"))
        assert (np.diff(rows["step"]) >= 0).all()  # step-major across shards: at_step uses a prefix
        assert layer.rows_before(6) == 96
        blocks = np.concatenate([layer.read(a, a + 7, ("index",))["index"] for a in range(0, layer.n_rows, 7)])
        np.testing.assert_array_equal(blocks, rows["index"])
    # the certificate's sums are used only when every shard holds the same ones and the run is complete
    x = torch.randn(4, 12, generator=g)
    with h5py.File(shards[1], "r+") as f:
        f.attrs["status"] = "recording"  # e.g. rank 1 was resumed and killed
    with pytest.warns(UserWarning, match="incomplete store"):
        di = DualInference(str(store), device="cpu")
    with di:
        assert di.attend("net.0", x, top_k=1).dual_source == "rows"
    with h5py.File(shards[1], "r+") as f:
        f.attrs["status"] = "complete"
        del f["layers/net.0/memory_weight"]
    with DualInference(str(store), device="cpu") as di:
        assert di.attend("net.0", x, top_k=1).dual_source == "rows"
        assert di.attend("net.2", x.new_zeros(4, 8), top_k=1).dual_source == "certificate"
    # each rank records its own float32 rounding: the store's tolerance follows the loosest
    from lightning_dualform.store.bindings import write_bindings
    from lightning_dualform.store.certificate import store_tolerance

    with open_store(str(store)) as s:
        assert s.attrs["float32_products"] == "ieee" and store_tolerance(s) == 1e-4
    with h5py.File(shards[1], "r+") as f:  # as a rank that trained with TF32 would have written it (checksums too)
        f.attrs["float32_products"] = "tf32"
        for g in f["layers"].values():
            write_bindings(f, g)
    with open_store(str(store)) as s:
        assert s.attrs["float32_products"] == "tf32" and store_tolerance(s) == 1e-2
    os.remove(store)  # without the index (e.g. a copy of the rank files only) the rank files are found
    with open_store(str(store)) as s:
        assert s.layer("net.0").n_rows == 2 * 96


def _element_wise_answers_are_exact(store, weights) -> None:
    """An element-wise DDP store read through its index answers as the trained model does, from the replayed
    weights its full certificate kept and from the rows; proponents and opponents add up to the unit's output."""
    model = MLP()
    model.load_state_dict(torch.load(weights, weights_only=True))
    g = torch.Generator().manual_seed(1)
    with DualInference(str(store), device="cpu", accumulate=torch.float64) as di:
        for name in ("net.0", "net.2"):
            m = dict(model.named_modules())[name]
            x = torch.randn(6, m.in_features, generator=g)
            ref = real_output(m, x)
            for reuse in (True, False):
                res = di.attend(name, x, top_k=di.layer(name).n_rows, reuse_certificate=reuse)
                assert res.dual_source == ("certificate" if reuse else "rows")
                assert rel_err(res.dual.double(), ref) <= 1e-5, name
                total = res.proponents.score.double().sum(1) + res.opponents.score.double().sum(1) + res.unit_base
                target = ref.gather(1, res.units[:, None]).squeeze(1)
                assert float(((total - target).abs() / ref.norm(dim=1)).max()) <= 1e-5
        assert max(di.verify().values()) <= 1e-5


def test_two_process_ddp_adamw_row_replay_sums_every_ranks_rows(tmp_path):
    """AdamW's certificate made as training goes under DDP: each rank replays its weights' rows from every rank's
    rows (all-reduced each step), so both shards hold the same certificate, and it is the whole replay's (the
    layers are narrow enough that every row is replayed) read back through the shards' index."""
    from lightning_dualform.attend.certificate import certify_store

    store, weights = tmp_path / "ddp.h5", tmp_path / "final.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(store), str(weights), "adamw-rows"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = read_shard_index(str(store))
    certs = []
    for shard in shards:
        with StoreReader(shard) as s:
            assert {s.layer(n).attrs["certificate_method"] for n in s.layers} == {"rows"}
            assert all(s.layer(n).attrs["certificate_exact"] for n in s.layers)
            certs.append({n: float(s.layer(n).attrs["certificate_rel_err"]) for n in s.layers})
    assert certs[0] == certs[1]
    full = certify_store(str(store))  # the whole replay through the index, every rank's rows at each step
    for name, cert in full.items():
        np.testing.assert_allclose(certs[0][name], cert.rel_err, rtol=1e-6)
    # the shards read as one store answer exactly, from the replayed weights the full certificate kept or the rows
    _element_wise_answers_are_exact(store, weights)


@pytest.mark.slow  # (the row replay's DDP test above covers the element-wise DDP store in the default run)
def test_two_process_ddp_adamw_is_exact(tmp_path):
    """AdamW's replay needs the all-reduced gradient of every step: rank 0 certifies through the shards' index
    and writes the certificate into every shard; the shards read as one store answer exactly."""
    store, weights = tmp_path / "ddp.h5", tmp_path / "final.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(store), str(weights), "adamw"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = read_shard_index(str(store))
    model = MLP()
    model.load_state_dict(torch.load(weights, weights_only=True))
    certs = []
    for shard in shards:
        with StoreReader(shard) as s:
            assert s.update_rule == "adam" and s.form == "element-wise"
            certs.append({n: s.layer(n).attrs["certificate_rel_err"] for n in s.layers})
            assert all(s.layer(n).attrs["certificate_exact"] for n in s.layers)
    assert certs[0] == certs[1]  # one certificate, of all ranks' rows, in every shard
    _element_wise_answers_are_exact(store, weights)
    # one shard alone replays half the gradient: not the model
    with DualInference(shards[0], device="cpu", accumulate=torch.float64) as di:
        x = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
        res = di.attend("net.0", x, top_k=1, reuse_certificate=False)
        assert rel_err(res.dual.double(), real_output(model.net[0], x)) > 1e-4


def test_two_process_ddp_conv_maps_are_exact(sgd_run):
    """A convolution stored as maps under DDP: each shard holds its rank's maps, the index reads them as one store
    (virtual rows step-major across shards), and the dual form is the real layer."""
    from lightning_dualform.layers import keys_of

    store, weights = sgd_run / "ddp.h5", sgd_run / "final.pt"
    model = _conv_mlp()
    model.load_state_dict(torch.load(weights, weights_only=True))
    shards = read_shard_index(str(store))
    for shard in shards:
        with StoreReader(shard) as s:
            assert s.layer("conv").layout == "maps" and s.layer("conv").attrs["certificate_exact"]
    x = torch.randn(4, 1, 6, generator=torch.Generator().manual_seed(2))
    keys, _ = keys_of(model.conv, x)
    out = model.conv(x).detach().double()
    real = out.transpose(1, 2).reshape(-1, 2)
    with open_store(str(store)) as s:
        lay = s.layer("conv")
        assert lay.n_rows == 2 * 96 * 6 and s.last_step == 12
        rows = lay.read(0, lay.n_rows, ("step", "index", "position"))
        assert (np.diff(rows["step"]) >= 0).all()
        assert lay.rows_before(6) == 96 * 6
        assert sorted(rows["index"][::6].tolist()) == sorted(list(range(96)) * 2)
    with DualInference(str(store), device="cpu", accumulate=torch.float64) as di:
        for reuse in (True, False):
            res = di.attend("conv", keys, top_k=3, reuse_certificate=reuse)
            assert rel_err(res.dual.double(), real) <= 1e-5
        mid = di.attend("conv", keys, top_k=3, at_step=6)
        assert rel_err(mid.dual.double(), real) > 1e-4  # (an earlier model: the step matters)


RESUME_SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_resume.py")


def test_a_two_process_ddp_run_resumes_each_rank_into_its_own_shard(tmp_path):
    """Lightning saves rank 0's callback state only; it carries every rank's counts, so each rank continues its own
    shard (rank 1 was refused: its shard 'already exists'). Resumed from an older checkpoint: the steps after it go."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(*args):
        proc = subprocess.run([sys.executable, RESUME_SCRIPT, str(tmp_path / "run.h5"), str(tmp_path / "ck"), *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    run("2")  # 2 epochs of 6 steps per rank, a checkpoint after each
    first = sorted((tmp_path / "ck").glob("epoch=0*.ckpt"))[0]
    state = next(v for k, v in torch.load(first, weights_only=False)["callbacks"].items() if "DualFormCallback" in k)
    assert [os.path.basename(r["store_path"]) for r in state["ranks"]] == ["run.rank0.h5", "run.rank1.h5"]
    out = run("3", str(first))  # from step 6 (rolls back 6) to 3 epochs
    assert "CERT" in out and "False" not in out.split("CERT", 1)[1], out
    indices = []
    for shard in read_shard_index(str(tmp_path / "run.h5")):
        with StoreReader(shard) as s:
            assert s.n_steps == 18 and s.complete and np.array_equal(s.update_steps, np.arange(18))
            lay = s.layer("net.0")
            assert lay.certificate is not None and lay.certificate.exact
            indices.append(lay.read(0, lay.n_rows, ("index", "epoch")))
    for epoch in range(3):  # each epoch once: the rolled-back epoch's rows are gone, not doubled
        got = np.concatenate([r["index"][r["epoch"] == epoch] for r in indices])
        assert sorted(got.tolist()) == list(range(96)), epoch


class _Share:
    """One rank's share of a query split, as a shard's ``QuerySet`` has it (what the merge reads)."""

    def __init__(self, index, n_rows_each=2):
        self.split, self.layers, self.after_step, self.stale = "test", ["net.0"], 6, None
        self.index = np.asarray(index)
        self.label = self.index % 3
        self.prediction = self.index % 2
        self.n = len(self.index)
        self.has_inputs = True
        self.inputs = self.index[:, None].astype(np.float32) * np.ones((1, 4), np.float32)
        self._rows = n_rows_each

    def layer_rows(self, layer, examples=None):
        ex = np.repeat(np.arange(self.n), self._rows)
        return {"keys": self.index[ex][:, None].astype(np.float32), "example": ex}


def test_a_ddp_query_split_holds_each_example_once_where_the_sampler_padded_a_share():
    """21 test examples over 2 ranks: a DistributedSampler gives rank 1 example 0 again to even the shares; the
    merged split leaves the repeat out (it counted 22 queries), keeping its rows' query numbers consistent."""
    from lightning_dualform.store.shards import _MergedQuerySet

    merged = _MergedQuerySet([_Share(np.arange(0, 21, 2)), _Share(np.r_[np.arange(1, 21, 2), 0])])
    assert merged.n == 21 and sorted(merged.index.tolist()) == list(range(21))
    np.testing.assert_array_equal(merged.label, merged.index % 3)
    np.testing.assert_array_equal(merged.inputs[:, 0], merged.index)
    rows = merged.layer_rows("net.0")
    assert len(rows["example"]) == 42 and rows["example"].max() == 20
    np.testing.assert_array_equal(rows["keys"][:, 0], merged.index[rows["example"]])  # each row's own query
    some = merged.layer_rows("net.0", examples=np.array([11, 20]))
    np.testing.assert_array_equal(some["keys"][:, 0], merged.index[[11, 11, 20, 20]])


def test_the_certificate_of_a_callback_that_ran_no_fit_here_says_where_to_read_it(tmp_path):
    from lightning_dualform import DualFormCallback

    with pytest.warns(UserWarning, match=r"no fit ran in this process \(under strategy='ddp_spawn'"):
        assert DualFormCallback(tmp_path / "s.h5").certificate == {}


def test_a_checkpoint_of_another_number_of_processes_is_refused_saying_what_to_do(tmp_path):
    from types import SimpleNamespace

    from lightning_dualform import DualFormCallback

    two = {"rows": {"a": 1}, "steps": 1, "ranks": [{"rows": {"a": 1}, "steps": 1, "store_path": "r.rank0.h5"},
                                                      {"rows": {"a": 2}, "steps": 1, "store_path": "r.rank1.h5"}]}
    old_ddp = {"rows": {"a": 1}, "steps": 1, "store_path": "r.rank0.h5"}  # rank 0's counts only
    single = {"rows": {"a": 1}, "steps": 1, "store_path": "r.h5"}
    for state, world, told in ((two, 1, "saved by a run of 2 processes and this one has 1; .* resume it with 2 "
                                        "processes"),
                               (two, 3, "saved by a run of 2 processes and this one has 3"),
                               (old_ddp, 2, "rank 0's of a DDP run saved before checkpoints carried every rank's; "
                                            ".* record the resumed run into another path"),
                               (single, 2, "a single-process run's; .* resume it with one process")):
        cb = DualFormCallback(tmp_path / "r.h5")
        cb.load_state_dict(dict(state))
        with pytest.raises(ValueError, match=told):
            cb._own_rank_state(SimpleNamespace(world_size=world, global_rank=0))
        fresh = DualFormCallback(tmp_path / "r.h5", overwrite=True)  # as the message offers: a new store
        fresh.load_state_dict(dict(state))
        fresh._own_rank_state(SimpleNamespace(world_size=world, global_rank=0))
        assert fresh._resume is None
    cb = DualFormCallback(tmp_path / "r.h5")
    cb.load_state_dict(dict(two))
    cb._own_rank_state(SimpleNamespace(world_size=2, global_rank=1))
    assert cb._resume["rows"] == {"a": 2}  # rank 1 continues its own shard's counts
