"""``DualInference`` on stores written by a real ``Trainer.fit``: against the model, against dense references,
memory bounds, and every bad input."""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
import tracemalloc
import warnings

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dualform import DualFormCallback, DualInference, StoreError
from helpers import rel_err

from lightning_dualform.attend._fused import kernel as _fused_kernel


class MLP(L.LightningModule):
    def __init__(self, d_in: int = 12, hidden: int = 16, n_classes: int = 3, optimizer: str = "sgd") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))
        self.optimizer = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "rprop":  # no exact rule: recorded with exact=False, the residual kept
            return torch.optim.Rprop(self.parameters(), lr=1e-2)
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


class _Snapshots(L.Callback):
    """The model's weights after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.states: dict[int, dict] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.states[trainer.global_step] = copy.deepcopy(pl_module.state_dict())


def _fit(
    path: str,
    n: int = 200,
    d_in: int = 12,
    hidden: int = 16,
    epochs: int = 3,
    optimizer: str = "sgd",
    exact: bool = True,
    batch_size: int = 32,
    certify: bool | str = "full",
) -> tuple[MLP, torch.Tensor, torch.Tensor, _Snapshots]:
    torch.manual_seed(0)
    x = torch.randn(n, d_in)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    model = MLP(d_in, hidden, 3, optimizer)
    snaps = _Snapshots()
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[DualFormCallback(path, exact=exact, certify=certify), snaps], logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True))
    return model, x, y, snaps


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = str(tmp_path_factory.mktemp("store") / "mlp.h5")
    model, x, y, snaps = _fit(path)
    return {"path": path, "model": model, "x": x, "y": y, "snaps": snaps}


def _dense(di: DualInference, layer: str) -> dict[str, np.ndarray]:
    lay = di.layer(layer)
    return lay.read(0, lay.n_rows)


def _hidden(model: MLP, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.tanh(model.net[0](x))


# ------------------------------------------------------------------------------------------------------
# exactness against the real model
# ------------------------------------------------------------------------------------------------------
def test_dual_equals_the_model_layer_outputs(trained: dict) -> None:
    model, x = trained["model"], trained["x"][:20]
    with DualInference(trained["path"], device="cpu", accumulate=torch.float64, block_rows=64) as di:
        assert di.layers == ["net.0", "net.2"]
        ex = di.explain(model, (x, trained["y"][:20]), top_k=5)
    with torch.no_grad():
        real = {"net.0": model.net[0](x).double(), "net.2": model(x).double()}
    for name, ref in real.items():
        res = ex[name]
        rel = (res.dual - ref).norm(dim=1) / ref.norm(dim=1)
        assert float(rel.max()) <= 1e-5, name
        assert res.max_rel_err <= 1e-5
        torch.testing.assert_close(res.primal, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ex.prediction, model(x).argmax(1))
    assert torch.equal(ex["net.2"].units, ex.prediction)
    assert ex["net.0"].units is None  # contributions only for the output layer
    json.dumps(ex.to_dict())  # the CLI dumps it as it is


@pytest.mark.parametrize("at_step", [0, 1, 7, 13])
def test_at_step_equals_the_model_at_that_step(trained: dict, at_step: int) -> None:
    h = _hidden(trained["model"], trained["x"][:10])
    with DualInference(trained["path"], device="cpu", accumulate=torch.float64, block_rows=50) as di:
        res = di.attend("net.2", h, top_k=0 if at_step == 0 else 1, at_step=at_step, contribution_to="pred")
        lay = di.layer("net.2")
        n_rows = lay.rows_before(at_step)
        w0, b0 = torch.from_numpy(lay.weight_init).double(), torch.from_numpy(lay.bias_init).double()
    if at_step == 0:
        ref = h.double() @ w0.t() + b0  # the untrained layer
    else:
        snap = MLP()
        snap.load_state_dict(trained["snaps"].states[at_step])
        with torch.no_grad():
            ref = snap.net[2](h).double()
    assert res.rows == n_rows and res.at_step == at_step
    assert res.primal is None and res.rel_err is None  # no stored weights at an earlier step
    assert float(((res.dual - ref).norm(dim=1) / ref.norm(dim=1)).max()) <= 1e-5
    assert torch.equal(res.units, ref.argmax(1))


def test_verify_reports_tiny_errors(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu", accumulate=torch.float64) as di:
        errs = di.verify(n_samples=32)
        assert set(errs) == {"net.0", "net.2"} and max(errs.values()) <= 1e-5
        errs = di.verify({"net.0": trained["x"][:5]})
        assert list(errs) == ["net.0"] and errs["net.0"] <= 1e-5


# ------------------------------------------------------------------------------------------------------
# blocked pass against dense references over the stored rows
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_rows,reuse", [(1, True), (97, True), (97, False), (10_000, False)])
def test_attend_equals_dense_reference(trained: dict, block_rows: int, reuse: bool) -> None:
    q = _hidden(trained["model"], trained["x"][:6]).double()
    with DualInference(
        trained["path"], device="cpu", accumulate=torch.float64, block_rows=block_rows, query_chunk=4
    ) as di:
        res = di.attend("net.2", q, top_k=4, contribution_to=1, step_buckets=3, reuse_certificate=reuse)
        assert res.dual_source == ("certificate" if reuse else "rows")
        d = _dense(di, "net.2")
        coef = di.layer("net.2").coefficients()
        lay = di.layer("net.2")
        w0, b0 = torch.from_numpy(lay.weight_init).double(), torch.from_numpy(lay.bias_init).double()
    k, v = torch.from_numpy(d["keys"]).double(), torch.from_numpy(d["values"]).double()
    upd = torch.from_numpy(d["step"] - coef.first_step)
    c_w, c_b = torch.from_numpy(coef.c_w)[upd], torch.from_numpy(coef.c_b)[upd]
    scores = q @ k.t()
    weights = scores * c_w + c_b
    torch.testing.assert_close(res.dual, coef.a_w * q @ w0.t() + coef.a_b * b0 + weights @ v)

    ref = torch.topk(scores, 4, dim=1)
    torch.testing.assert_close(res.top.score, ref.values)
    assert torch.equal(res.top.row, ref.indices)
    for col in ("step", "epoch", "index", "position", "label"):
        assert torch.equal(res.top.__dict__[col], torch.from_numpy(d[col]).long()[ref.indices]), col

    contrib = weights * v[:, 1]
    pro = torch.topk(contrib, 4, dim=1)
    assert torch.equal(res.proponents.row, torch.where(pro.values > 0, pro.indices, -1))
    con = torch.topk(contrib, 4, dim=1, largest=False)
    assert torch.equal(res.opponents.row, torch.where(con.values < 0, con.indices, -1))

    index = torch.from_numpy(d["index"]).long()
    n_ex = int(index.max()) + 1
    per_ex = torch.zeros(6, n_ex, dtype=torch.float64).scatter_add(1, index.expand(6, -1), scores)
    ref_ex = torch.topk(per_ex, 4, dim=1)
    torch.testing.assert_close(res.top_examples.score, ref_ex.values)
    assert torch.equal(res.top_examples.index, ref_ex.indices)
    assert torch.equal(res.top_examples.rows, torch.bincount(index, minlength=n_ex)[ref_ex.indices])
    assert torch.equal(res.top_examples.label, trained["y"][ref_ex.indices])  # every presentation has its label
    per_ex_c = torch.zeros(6, n_ex, dtype=torch.float64).scatter_add(1, index.expand(6, -1), contrib)
    torch.testing.assert_close(
        res.proponent_examples.score.clamp_min(0), torch.topk(per_ex_c, 4, dim=1).values.clamp_min(0)
    )

    label = torch.from_numpy(d["label"]).long()
    m = res.mass["label"]
    assert m.keys.tolist() == [-1, 0, 1, 2]
    ref_m = torch.zeros(6, 4, dtype=torch.float64).scatter_add(1, (label + 1).expand(6, -1), scores)
    torch.testing.assert_close(m.signed, ref_m)
    for c in range(3):  # by label, not by column: class c is column c + 1
        on_c = (scores * (label == c)).sum(1)
        torch.testing.assert_close(m[c], on_c)
        torch.testing.assert_close(m.absolute_of(c), (scores.abs() * (label == c)).sum(1))
        assert m.column(c) == c + 1 and torch.equal(m.by_key()[c], m.signed_of(c))
    with pytest.raises(KeyError, match=r"\[-1, 0, 1, 2\]"):
        m[3]
    assert "keys [-1 (no label), 0, 1, 2]" in repr(m)
    epoch = torch.from_numpy(d["epoch"]).long()
    torch.testing.assert_close(
        res.mass["epoch"].absolute,
        torch.zeros(6, 3, dtype=torch.float64).scatter_add(1, epoch.expand(6, -1), scores.abs()),
    )
    assert res.mass["step"].edges[0] == coef.first_step and res.mass["step"].edges[-1] == coef.end_step
    torch.testing.assert_close(res.mass["step"].signed.sum(1), scores.sum(1))


@pytest.mark.parametrize("scan", ["exact", "bf16"])
def test_dual_from_the_certificate_and_from_the_rows_equal_the_model(trained: dict, scan: str) -> None:
    model, x = trained["model"], trained["x"][:12]
    with torch.no_grad():
        real = {"net.0": (x, model.net[0](x)), "net.2": (_hidden(model, x), model(x))}
    with DualInference(trained["path"], device="cpu", accumulate=torch.float64, block_rows=40) as di:
        for name, (q, ref) in real.items():
            stored = di.attend(name, q, top_k=3, scan=scan)
            rows = di.attend(name, q, top_k=3, scan=scan, reuse_certificate=False)
            assert (stored.dual_source, rows.dual_source) == ("certificate", "rows")
            assert stored.to_dict()["dual_source"] == "certificate"
            for res in (stored, rows):
                assert rel_err(res.dual, ref.double()) <= 1e-5, (name, res.dual_source)
            torch.testing.assert_close(stored.dual, rows.dual, rtol=1e-9, atol=1e-9)
            # everything but dual comes from the same pass over the rows: bit for bit
            assert torch.equal(stored.top.score, rows.top.score) and torch.equal(stored.top.row, rows.top.row)
            assert torch.equal(stored.top_examples.score, rows.top_examples.score)
            for kind in ("label", "epoch", "step"):
                assert torch.equal(stored.mass[kind].signed, rows.mass[kind].signed)
                assert torch.equal(stored.mass[kind].absolute, rows.mass[kind].absolute)


def test_memory_sums_are_used_only_for_the_rows_they_cover(trained: dict, tmp_path: str) -> None:
    path = str(tmp_path / "copy.h5")
    shutil.copy(trained["path"], path)
    q = _hidden(trained["model"], trained["x"][:4])
    with h5py.File(path, "r") as f:
        g = f["layers/net.2"]
        assert g["memory_weight"].shape == (3, 16) and g["memory_weight"].dtype == np.float64
        rows, end = int(g.attrs["memory_rows"]), int(g.attrs["memory_end_step"])
    with DualInference(path, device="cpu") as di:
        assert di.layer("net.2").n_rows == rows and di.last_step == end
        assert di.attend("net.2", q, top_k=1).dual_source == "certificate"
        assert di.attend("net.2", q, top_k=1, at_step=end).dual_source == "certificate"  # the same model
        assert di.attend("net.2", q, top_k=1, at_step=end - 1).dual_source == "rows"  # another model

    def edited(**attrs: object) -> str:
        with h5py.File(path, "r+") as f:
            for k, v in attrs.items():
                f["layers/net.2"].attrs[k] = v
        with DualInference(path, device="cpu") as di:
            source = di.attend("net.2", q, top_k=1).dual_source
        with h5py.File(path, "r+") as f:
            for k in attrs:
                f["layers/net.2"].attrs[k] = {"memory_rows": rows, "memory_end_step": end}.get(k, crc)
        return source

    with h5py.File(path, "r") as f:
        crc = int(f["layers/net.2"].attrs["memory_weight_final_crc32"])
    assert edited(memory_rows=rows - 1) == "rows"  # sums of other rows than the file holds
    assert edited(memory_end_step=end + 1) == "rows"
    # final weights the sums were not computed with (a writer that did not know them rewrote the store)
    assert edited(memory_weight_final_crc32=crc ^ 1) == "rows"
    assert edited() == "certificate"
    with pytest.raises(StoreError, match="'memory_rows' is .*12.5.*not an integer"):
        edited(memory_rows=12.5)


@pytest.mark.parametrize("bad", ["shape", "int", "nan", "group"])
def test_damaged_memory_sums_raise_store_error(trained: dict, tmp_path: str, bad: str) -> None:
    path = str(tmp_path / "copy.h5")
    shutil.copy(trained["path"], path)
    with h5py.File(path, "r+") as f:
        g = f["layers/net.2"]
        w = g["memory_weight"][()]
        del g["memory_weight"]
        if bad == "shape":
            g.create_dataset("memory_weight", data=w[:2], fletcher32=True)
        elif bad == "int":
            g.create_dataset("memory_weight", data=w.astype(np.int64), fletcher32=True)
        elif bad == "nan":
            w[1, 2] = np.nan
            g.create_dataset("memory_weight", data=w, fletcher32=True)
        else:
            g.create_group("memory_weight")
    with DualInference(path, device="cpu") as di:
        with pytest.raises(StoreError, match="memory_weight"):
            di.attend("net.2", _hidden(trained["model"], trained["x"][:2]), top_k=1)
        assert (
            di.attend(
                "net.2", _hidden(trained["model"], trained["x"][:2]), top_k=1, reuse_certificate=False
            ).dual_source
            == "rows"
        )


def test_bf16_scan_gives_exact_dual_and_exact_top_scores(trained: dict) -> None:
    q = _hidden(trained["model"], trained["x"][:8])
    with DualInference(trained["path"], device="cpu", block_rows=64) as di:
        exact = di.attend("net.2", q, top_k=5, per_example=False)
        fast = di.attend("net.2", q, top_k=5, per_example=False, scan="bf16")
    torch.testing.assert_close(fast.dual, exact.dual, rtol=1e-5, atol=1e-5)
    assert fast.max_rel_err <= 1e-5
    # re-scored candidates: where the rows agree, the scores agree to float32 round-off
    same = fast.top.row == exact.top.row
    assert float(same.float().mean()) >= 0.8
    torch.testing.assert_close(fast.top.score[same], exact.top.score[same], rtol=1e-5, atol=1e-5)


def test_inexact_store_adds_the_residual_and_reports_explained(tmp_path: str) -> None:
    path = str(tmp_path / "rprop.h5")
    model, x, _, _ = _fit(path, n=96, epochs=2, optimizer="rprop", exact=False)
    with DualInference(path, device="cpu", accumulate=torch.float64) as di:
        res = di.attend("net.0", x[:5], top_k=2)
    with torch.no_grad():
        ref = model.net[0](x[:5]).double()
    assert not res.exact_store
    assert res.explained is not None and res.explained.shape == (5,)
    assert bool(((res.explained >= 0) & (res.explained <= 1)).all())
    assert float(((res.dual - ref).norm(dim=1) / ref.norm(dim=1)).max()) <= 1e-5
    assert res.to_dict()["explained"] is not None


# ------------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc for RSS")
def test_peak_memory_is_bounded_by_the_block(tmp_path: str) -> None:
    path = str(tmp_path / "big.h5")
    d_in, hidden = 512, 256
    _fit(path, n=2000, d_in=d_in, hidden=hidden, epochs=3, batch_size=100)
    block = 128
    with DualInference(path, device="cpu", block_rows=block, query_chunk=64) as di:
        lay = di.layer("net.0")
        store_bytes = lay.n_rows * (lay.d_in + lay.d_out) * 4
        block_bytes = block * (lay.d_in + lay.d_out) * 4
        assert store_bytes >= 40 * block_bytes  # many blocks
        q = torch.randn(16, d_in)
        di.attend("net.0", q, top_k=5, per_example=False)  # warm up allocator and caches

        tracemalloc.start()
        peak_rss, base_rss, stop = [0], _rss(), threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak_rss[0] = max(peak_rss[0], _rss())
                time.sleep(0.001)

        t = threading.Thread(target=sample)
        t.start()
        try:
            res = di.attend("net.0", q, top_k=5, per_example=False)
        finally:
            stop.set()
            t.join()
            _, traced_peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    assert res.rows == lay.n_rows
    # numpy buffers from HDF5: a handful of blocks in flight, never the layer; plus two weight-sized
    # float64 matrices (the base weights and the certificate's memory sums)
    weight_bytes = 2 * lay.d_in * lay.d_out * 8
    assert traced_peak <= 8 * block_bytes + weight_bytes + (1 << 20), (traced_peak, block_bytes)
    # RSS: work buffers, thread stack and the HDF5 chunk cache on top of the blocks, far from the layer
    assert peak_rss[0] - base_rss <= store_bytes // 3, (peak_rss[0] - base_rss, store_bytes)


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------
def test_not_a_store(tmp_path: str) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        DualInference(str(text), device="cpu")
    foreign = str(tmp_path / "foreign.h5")
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a lightning-dualform store"):
        DualInference(foreign, device="cpu")
    with pytest.raises(StoreError, match="no such file"):
        DualInference(str(tmp_path / "missing.h5"), device="cpu")


def test_newer_format_version(trained: dict, tmp_path: str) -> None:
    newer = str(tmp_path / "newer.h5")
    shutil.copy(trained["path"], newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 999
    with pytest.raises(StoreError, match="newer"):
        DualInference(newer, device="cpu")


def test_bad_queries_and_arguments(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu") as di:
        with pytest.raises(KeyError, match=r"net\.0.*net\.2"):
            di.attend("net.1", torch.zeros(2, 16))
        with pytest.raises(ValueError, match=r"\(n, 16\)"):
            di.attend("net.2", torch.zeros(2, 12))
        with pytest.raises(ValueError, match=r"\(n, 12\)"):
            di.attend("net.0", torch.zeros(0, 12))
        bad = torch.zeros(3, 12)
        bad[1, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            di.attend("net.0", bad)
        bad[1, 2] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            di.attend("net.0", bad)
        n = di.layer("net.0").n_rows
        with pytest.raises(ValueError, match=f"holds {n} rows"):
            di.attend("net.0", torch.zeros(1, 12), top_k=n + 1)
        # the model before any step has seen no row: a later at_step, not "top_k <= 0"
        with pytest.raises(ValueError, match=r"holds no training rows up to step 0 \(the model before any optimizer "
                                             r"step.*Use at_step=1 or later.*or top_k=0"):
            di.attend("net.0", torch.zeros(1, 12), top_k=1, at_step=0)
        with pytest.raises(ValueError, match="top_k"):
            di.attend("net.0", torch.zeros(1, 12), top_k=-1)
        with pytest.raises(ValueError, match="at_step"):
            di.attend("net.0", torch.zeros(1, 12), at_step=10_000)
        with pytest.raises(ValueError, match="0..2"):
            di.attend("net.2", torch.zeros(2, 16), contribution_to=3)
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            di.attend("net.2", torch.zeros(2, 16), contribution_to=torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match="contribution_to"):
            di.attend("net.2", torch.zeros(2, 16), contribution_to="logit")
        with pytest.raises(ValueError, match="scan"):
            di.attend("net.2", torch.zeros(2, 16), scan="fp8")
        with pytest.raises(TypeError, match="numpy"):
            di.attend("net.2", [[0.0] * 16])
        with pytest.raises(KeyError, match="no module named"):
            di.explain(nn.Sequential(nn.Linear(12, 3)), torch.zeros(2, 12))


def test_queries_without_values_are_refused(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu") as di:
        with pytest.raises(ValueError, match="meta tensor: it has a shape but no values"):
            di.attend("net.0", torch.zeros(2, 12, device="meta"))
        with pytest.raises(ValueError, match=r"to_dense\(\)"):
            di.attend("net.0", torch.zeros(2, 12).to_sparse())


def test_the_step_buckets_limit_is_the_one_enforced(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu") as di:
        steps = di.last_step
        assert steps < 500  # more buckets than steps, under the fixed limit: accepted
        res = di.attend("net.0", torch.zeros(1, 12), top_k=0, step_buckets=500, per_example=False)
        assert res.mass["step"].signed.shape == (1, 500)
        with pytest.raises(ValueError, match=rf"at most 1024, or one per step beyond that \(the model after step "
                                             rf"{steps} has {steps} steps\); use step_buckets <= 1024"):
            di.attend("net.0", torch.zeros(1, 12), top_k=0, step_buckets=1025)


def test_rows_per_block_takes_a_layer_name_as_documented(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu", block_rows=None) as di:
        assert di.rows_per_block("net.0") == di.rows_per_block(di.layer("net.0")) >= 4096
        with pytest.raises(KeyError, match=r"net\.0.*net\.2"):
            di.rows_per_block("net.1")
        with pytest.raises(TypeError, match="takes a layer name"):
            di.rows_per_block(0)  # type: ignore[arg-type]


def test_the_store_path_must_be_a_path(trained: dict) -> None:
    with DualInference(os.fsencode(trained["path"]), device="cpu") as di:  # bytes: decoded
        assert di.layers == ["net.0", "net.2"] and di.path == trained["path"]
    for bad in (123, None, ["a.h5"]):
        with pytest.raises(TypeError, match=f"expected the path of a store.*got {type(bad).__name__}"):
            DualInference(bad, device="cpu")  # type: ignore[arg-type]


def test_verify_needs_a_positive_number_of_samples(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu") as di:
        for bad in (0, -1):
            with pytest.raises(ValueError, match=rf"verify\(n_samples=...\)` got {bad}; expected a positive integer"):
                di.verify(n_samples=bad)
        with pytest.raises(TypeError, match="n_samples"):
            di.verify(n_samples=2.5)  # type: ignore[arg-type]


def _damaged_copy(src: str, dst: str, edits: dict[str, tuple]) -> str:
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for name, at in edits.items():
            f[name][at] = np.nan
    return dst


def test_nan_in_stored_rows_is_called_damage_not_a_bad_query(trained: dict, tmp_path) -> None:
    """A NaN in a stored row is the store's damage: the pass's answer (its sums take every row it read) is refused
    with the layer, the column and the row, and verify's sampled rows are not blamed on the user's queries."""
    path = _damaged_copy(trained["path"], str(tmp_path / "nan.h5"),
                         {"layers/net.0/keys": (5, 3), "layers/net.2/values": (7, 1)})
    q = _hidden(trained["model"], trained["x"][:3])
    with DualInference(path, device="cpu") as di:
        with pytest.raises(StoreError, match=r"layer 'net.0': stored training keys: rows \[5\] hold NaN or inf: the "
                                             "store is damaged"):
            di.attend("net.0", trained["x"][:3], top_k=2)
        with pytest.raises(StoreError, match=r"layer 'net.2': stored training values .*: rows \[7\] hold NaN"):
            di.attend("net.2", q, top_k=0, mass=False, per_example=False, reuse_certificate=False)  # dual from rows
        with pytest.raises(StoreError, match=r"layer 'net.0': stored training keys \(sampled as verify's queries\): "
                                             r"rows \[5\]"):
            di.verify(n_samples=10_000)  # every row
        with pytest.raises(StoreError, match=r"layer 'net.0': stored training keys: rows \[5\]"):
            di.verify({"net.0": trained["x"][:2]})  # the user's queries: verify sums every row


def test_an_answer_that_overflows_float32_says_so(trained: dict) -> None:
    with DualInference(trained["path"], device="cpu") as di:
        with pytest.raises(ValueError, match="overflow torch.float32.*accumulate=torch.float64"):
            di.attend("net.0", torch.full((1, 12), 3e38), top_k=1)


def test_nan_in_recorded_query_rows_is_called_damage(tmp_path) -> None:
    from lightning_dualform.query_runs import attend_queries, attend_recorded

    v1 = os.path.join(os.path.dirname(__file__), "data", "store_v1_sgd.h5")
    path = str(tmp_path / "q.h5")
    shutil.copy(v1, path)
    with h5py.File(path, "r+") as f:
        g = f["queries/test/layers/net.2"]
        row = int(np.flatnonzero(g["example"][()] == 2)[0])
        g["keys"][row, 0] = np.nan
    with DualInference(path, device="cpu") as di:
        said = r"query set 'test', layer 'net.2' .*: the recorded query rows of query examples \[2\] hold NaN or inf"
        with pytest.raises(StoreError, match=said):
            attend_recorded(di, "test", layers=["net.2"], top_k=1)
        with pytest.raises(StoreError, match=said):
            attend_queries(di, split="test", layers=["net.2"], top_k=1)
        assert attend_queries(di, split="test", positions=[0, 1], layers=["net.2"], top_k=1).layers == ["net.2"]


def test_bad_constructor_arguments(trained: dict) -> None:
    for kwargs, match in (
        ({"block_rows": 0}, "block_rows"),
        ({"accumulate": torch.float16}, "accumulate"),
        ({"query_chunk": -1}, "query_chunk"),
        ({"device": "tpu"}, "device"),
        ({"device": "not a device"}, "not a device"),
    ):
        with pytest.raises(ValueError, match=match):
            DualInference(trained["path"], **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error raised without CUDA")
def test_missing_cuda_device(trained: dict) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        DualInference(trained["path"], device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(trained: dict) -> None:
    q = _hidden(trained["model"], trained["x"][:32])
    results = {}
    for device in ("cpu", "cuda"):
        with DualInference(trained["path"], device=device, block_rows=64, accumulate=torch.float64) as di:
            results[device] = di.attend("net.2", q, top_k=5, contribution_to="pred")
    cpu, gpu = results["cpu"], results["cuda"]
    assert gpu.dual.device.type == "cpu"  # results come back to the host
    torch.testing.assert_close(gpu.dual, cpu.dual)
    assert torch.equal(gpu.top.row, cpu.top.row)
    torch.testing.assert_close(gpu.top_examples.score, cpu.top_examples.score)
    assert gpu.max_rel_err <= 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("reuse", [True, False])
def test_cuda_bf16_scan_gives_the_exact_top_k(trained: dict, reuse: bool) -> None:
    """On CUDA the bf16 products go through cuBLAS: its reduced-precision reductions must be off during the
    scan (the rounding bound assumes float32 sums) and back to the user's setting after it."""
    q = _hidden(trained["model"], trained["x"][:48])
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_bf16_reduced_precision_reduction
    with DualInference(trained["path"], device="cpu", block_rows=64) as di:
        exact = di.attend("net.2", q, top_k=5, per_example=False, reuse_certificate=reuse)
    with DualInference(trained["path"], device="cuda", block_rows=64) as di:
        fast = di.attend("net.2", q, top_k=5, per_example=False, scan="bf16", reuse_certificate=reuse)
    assert matmul.allow_bf16_reduced_precision_reduction == before
    assert torch.equal(fast.top.row, exact.top.row)
    torch.testing.assert_close(fast.top.score, exact.top.score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.dual, exact.dual, rtol=1e-5, atol=1e-5)
    assert fast.dual_source == ("certificate" if reuse else "rows")


# ------------------------------------------------------------------------------------------------------
# one query batch split over processes
# ------------------------------------------------------------------------------------------------------
def _essentials(res) -> dict[str, torch.Tensor]:
    out = {"dual": res.dual, "rel_err": res.rel_err}
    for name in ("top", "proponents", "opponents"):
        part = getattr(res, name)
        out[f"{name}.score"], out[f"{name}.row"], out[f"{name}.index"] = part.score, part.row, part.index
    for name in ("top_examples", "proponent_examples", "opponent_examples"):
        part = getattr(res, name)
        out[f"{name}.score"], out[f"{name}.index"], out[f"{name}.rows"] = part.score, part.index, part.rows
    for name, m in res.mass.items():
        out[f"mass.{name}.signed"], out[f"mass.{name}.absolute"] = m.signed, m.absolute
    return out


_DIST_KW = dict(top_k=4, contribution_to="pred", step_buckets=3)


def _distributed_worker(rank: int, world: int, path: str, init_file: str, out_dir: str, q: torch.Tensor) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        with DualInference(path, device="cpu", accumulate=torch.float64, block_rows=37, distributed=True) as di:
            for reuse in (True, False):
                res = di.attend("net.2", q, **_DIST_KW, reuse_certificate=reuse)
                assert res.dual_source == ("certificate" if reuse else "rows")
                torch.save(_essentials(res), os.path.join(out_dir, f"rank{rank}-{reuse}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_split_equals_one_process(trained: dict, tmp_path) -> None:
    """2 gloo processes each take half of the blocks; both return the single-process result, with the dual
    from the certificate's replayed weights and from the rows."""
    import torch.multiprocessing as mp

    q = _hidden(trained["model"], trained["x"][:9]).double()
    refs = {}
    with DualInference(trained["path"], device="cpu", accumulate=torch.float64, block_rows=37) as di:
        for reuse in (True, False):
            refs[reuse] = _essentials(di.attend("net.2", q, **_DIST_KW, reuse_certificate=reuse))
        assert di.layer("net.2").n_rows > 2 * 37  # several blocks per rank
    mp.spawn(_distributed_worker, args=(2, trained["path"], str(tmp_path / "init"), str(tmp_path), q), nprocs=2,
             join=True)
    for reuse, ref in refs.items():
        got = [torch.load(tmp_path / f"rank{r}-{reuse}.pt", weights_only=True) for r in range(2)]
        for key, want in ref.items():
            assert torch.equal(got[0][key], got[1][key]), key  # every rank holds the same result
            if want.is_floating_point():
                torch.testing.assert_close(got[0][key], want, rtol=1e-10, atol=1e-12, msg=key)
            else:
                assert torch.equal(got[0][key], want), key


def test_distributed_needs_a_process_group(trained: dict) -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        DualInference(trained["path"], device="cpu", distributed=True)


@pytest.mark.parametrize("largest", [True, False])
def test_top_examples_threshold_pass_equals_topk(largest: bool) -> None:
    from lightning_dualform.attend import _fused
    from lightning_dualform.attend.passes.assemble import fused_topk_rows

    if _fused.kernel() is None:
        pytest.skip("no C compiler for the fused kernel")
    g = torch.Generator().manual_seed(3)
    table_t = torch.randn(50, 7, generator=g, dtype=torch.float64)  # (examples, queries), as the fused pass keeps it
    present = torch.rand(50, generator=g) > 0.3
    score, index = fused_topk_rows(table_t, present, 5, largest)
    fill = float("-inf") if largest else float("inf")
    ref = torch.topk(table_t.t().masked_fill(~present, fill), 5, dim=1, largest=largest)
    assert torch.equal(score, ref.values) and torch.equal(index, ref.indices)


@pytest.mark.skipif(_fused_kernel() is None, reason="no C compiler for the fused kernel")
def test_answers_do_not_depend_on_the_compiled_kernel(tmp_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same store and queries give the same rows, examples, sums and order with and without the compiled
    pass, also where many scores are exactly equal (a data set of repeated examples)."""
    torch.manual_seed(0)
    base = torch.randn(4, 12)
    x = base.repeat(16, 1)  # 64 examples, 4 distinct: every score has 16 equals per epoch
    y = torch.arange(4).repeat(16) % 3
    path = str(tmp_path / "ties.h5")
    model = MLP()
    trainer = L.Trainer(max_epochs=2, callbacks=[DualFormCallback(path)], logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    q = base[:3]

    def answers() -> dict:
        with DualInference(path, device="cpu") as di:
            return di.attend("net.0", q, top_k=20, contribution_to=1).to_dict()

    compiled = answers()
    from lightning_dualform.attend import _fused

    monkeypatch.setattr(_fused, "kernel", lambda: None)
    fallback = answers()
    for key in ("top", "top_examples", "proponents", "opponents", "proponent_examples", "opponent_examples"):
        for col, got in fallback[key].items():
            want = compiled[key][col]
            if col == "score":
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=key)
            else:
                assert got == want, (key, col)
    np.testing.assert_allclose(fallback["dual"], compiled["dual"], rtol=1e-5, atol=1e-6)
    for name in compiled["mass"]:
        np.testing.assert_allclose(
            fallback["mass"][name]["signed"], compiled["mass"][name]["signed"], rtol=1e-5, atol=1e-5
        )


def test_explain_takes_a_fabric_wrapped_model(tmp_path) -> None:
    """The recorder takes Fabric's wrapper (its layers are the user's module names); explain takes it too, and
    answers as for the bare model: the last layer's dual is the model's real output."""
    from lightning.fabric import Fabric

    from lightning_dualform import DualFormRecorder

    torch.manual_seed(0)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    fmodel, fopt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    path = str(tmp_path / "fabric.h5")
    with DualFormRecorder(path, fmodel, fopt) as rec:
        for i in range(0, 64, 16):
            rec.batch(indices=torch.arange(i, i + 16), labels=y[i:i + 16])
            fabric.backward(nn.functional.cross_entropy(fmodel(x[i:i + 16]), y[i:i + 16]))
            fopt.step()
            fopt.zero_grad()
    q = torch.randn(5, 6)
    with DualInference(path, device="cpu", accumulate=torch.float64) as di:
        assert di.layers == ["0", "2"]
        wrapped = di.explain(fmodel, q, top_k=3)
        bare = di.explain(model, q, top_k=3)
    with torch.no_grad():
        out = model(q)
    assert rel_err(wrapped["2"].dual, out.double()) <= 1e-5
    assert torch.equal(wrapped.prediction, out.argmax(1)) and torch.equal(wrapped["2"].units, out.argmax(1))
    assert json.dumps(wrapped.to_dict()) == json.dumps(bare.to_dict())


def _recorded_mlp(path: str, lr: float, after_step=None):
    """A 6-8-3 MLP trained 4 SGD steps with a recorder (``after_step(step, model)`` after each step)."""
    from lightning_dualform import DualFormRecorder

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    with DualFormRecorder(path, model, opt) as rec:
        for i in range(0, 64, 16):
            rec.batch(indices=torch.arange(i, i + 16), labels=y[i:i + 16])
            nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
            opt.step()
            opt.zero_grad()
            if after_step is not None:
                after_step(i // 16 + 1, model)
    return model, rec


def test_explain_refuses_a_model_that_is_not_the_trained_one(tmp_path) -> None:
    """Another model's layer inputs attended over this store's memory are no answer about either model (and the
    certificate would still say exact): refused, naming the layer; a model of an earlier step is taken with
    ``at_step`` (its own step: the attention is then that model's)."""
    import copy

    kept = {}
    path = str(tmp_path / "s.h5")
    model, _ = _recorded_mlp(path, 0.1, lambda step, m: kept.setdefault(step, copy.deepcopy(m)))
    at_two = kept[2]  # the model after 2 steps
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].bias.add_(0.5)
    q = torch.randn(5, 6)
    with DualInference(path, device="cpu", accumulate=torch.float64) as di:
        with pytest.raises(ValueError, match=r"model's 2\.bias differs from the store's final weights \(relative "
                                             r"error .*\), so it is not the model this store recorded"):
            di.explain(other, q)
        with pytest.raises(ValueError, match=r"model's 0\.(weight|bias) differs"):
            di.explain(at_two, q)
        half = copy.deepcopy(model).to(torch.bfloat16)  # the trained model in bfloat16: its own rounding allowed
        assert di.explain(half, q.to(torch.bfloat16), method=None)["2"].dual.shape == (5, 3)
        upstream = copy.deepcopy(model)
        with torch.no_grad():
            upstream[0].weight.mul_(2.0)
        with pytest.raises(ValueError, match=r"model's 0\.weight differs"):  # (not attended, but it makes the inputs)
            di.explain(upstream, q, layers=["2"])
        early = di.explain(at_two, q, at_step=2, method=None)
        with torch.no_grad():
            assert rel_err(early["2"].dual, at_two(q).double()) <= 1e-5
        assert di.explain(model, q).influence is not None


def test_explain_raises_for_targets_it_was_given_and_influence_for_an_unbatched_query(tmp_path) -> None:
    from helpers import MLP, IndexedDataset, small_sgd_store

    from lightning_dualform.attend.results import Explanation

    path = small_sgd_store(str(tmp_path / "s.h5"))
    model = MLP()  # given the store's final weights below
    with DualInference(path, device="cpu") as di:
        final = {n: torch.as_tensor(di.store.layer(n).to_param(di.store.layer(n).weight_final)) for n in di.layers}
        with torch.no_grad():
            for n in di.layers:
                dict(model.named_modules())[n].weight.copy_(final[n])
                dict(model.named_modules())[n].bias.copy_(torch.as_tensor(di.store.layer(n).bias_final))
        x = IndexedDataset(n=64).x[:5]
        with pytest.raises(ValueError, match=r"targets must be classes in 0\.\.2; got 9\.\.9"):
            di.explain(model, x, targets=torch.full((5,), 9))  # (they were only warned about, influence None)
        assert isinstance(di.explain(model, x, targets=torch.zeros(5, dtype=torch.long)), Explanation)
        with pytest.raises(ValueError, match=r"inputs of shape \(6,\) has shape \(3,\), not \(6, classes\): the "
                                             r"inputs' first dimension is the queries.*x\[None\]"):
            di.influence(model, x[0])  # (it said "1 classes for 6 inputs", of targets the caller never gave)
        assert di.influence(model, x[0][None]).scores.shape == (1, 64)


def test_an_answer_beyond_the_tolerance_of_a_store_certified_inexact_does_not_blame_the_file(tmp_path) -> None:
    """Weights clamped after each step (by the training, not the file) make the store's own certificate INEXACT;
    the answer's warning says that, where it said the file was damaged or rewritten."""
    import warnings

    def clamp(step: int, m: nn.Module) -> None:
        with torch.no_grad():
            m[0].weight.clamp_(-0.1, 0.1)  # a constraint after each step

    path = str(tmp_path / "s.h5")
    model, rec = _recorded_mlp(path, 0.5, clamp)
    assert not rec.certificate["0"]["exact"]
    with DualInference(path, device="cpu") as di, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        di.attend("0", torch.randn(4, 6), top_k=2)
    told = [str(w.message) for w in caught if "stored final weights" in str(w.message)]
    assert told and "The store's certificate says the same" in told[0] and "damaged" not in told[0]
