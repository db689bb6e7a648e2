"""DualFormRecorder: plain PyTorch and Fabric loops rebuild their real layers, at the end and at earlier steps."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from helpers import IndexedDataset, dual_output, real_output, rel_err, store_contents
from torch import nn

from lightning_dualform import DualFormRecorder, DualInference, InexactError, StoreReader


def make_model(seed: int = 0, d: int = 6, hidden: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def make_opt(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))  # changes every step
    return opt, sched


def batches(ds: IndexedDataset, steps: int, micro: int = 2, bs: int = 8, seed: int = 0):
    """``steps`` optimizer steps of ``micro`` micro-batches each: (indices, x, y)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        out = []
        for _ in range(micro):
            idx = torch.randperm(len(ds), generator=g)[:bs]
            out.append((idx, ds.x[idx], ds.y[idx]))
        yield out


def train(model, opt, sched, data, rec=None, clip: float | None = 0.05, snapshots: dict | None = None, start: int = 0):
    for step, micro in enumerate(data, start=start):
        for idx, x, y in micro:
            if rec is not None:
                rec.batch(indices=idx, labels=y, inputs=x, epoch=step // 3)
            loss = nn.functional.cross_entropy(model(x / 10.0), y) / len(micro)
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # active: the factor is well below 1
        opt.step()
        opt.zero_grad()
        sched.step()
        if snapshots is not None:
            snapshots[step + 1] = copy.deepcopy(model)


def test_plain_loop_rebuilds_the_layers_exactly_at_the_end_and_earlier(tmp_path):
    ds = IndexedDataset(n=64)
    model = make_model()
    opt, sched = make_opt(model)
    path = str(tmp_path / "plain.h5")
    snaps: dict[int, nn.Module] = {}
    with DualFormRecorder(path, model, opt) as rec:
        train(model, opt, sched, batches(ds, 8), rec, snapshots=snaps)
    assert rec.steps == 8
    assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
    assert max(c["rel_err"] for c in rec.certificate.values()) < 1e-5
    x = torch.randn(20, 6)
    with DualInference(path, device="cpu") as di:
        for name, at in (("0", None), ("0", 3), ("2", 5)):
            ref_model = model if at is None else snaps[at]
            module = dict(ref_model.named_modules())[name]
            q = x if name == "0" else torch.tanh(x @ model[0].weight.detach().t())
            res = di.attend(name, q, top_k=3, at_step=at)
            assert rel_err(res.dual.double(), real_output(module, q)) < 1e-5, (name, at)
            # the store's own arithmetic, read with h5py alone, agrees
            assert rel_err(dual_output(path, name, q, end=at), real_output(module, q)) < 1e-5
    with h5py.File(path, "r") as f:
        g = f["layers"]["0"]
        n = int(g["committed_rows"][0])
        assert n == 8 * 2 * 8  # every micro-batch's rows
        idx = g["index"][:n]
        keys = g["keys"][:n]
        np.testing.assert_array_equal(idx, np.round(keys[:, 0] * 10).astype(np.int64))  # feature 0 encodes the index
        np.testing.assert_array_equal(g["label"][:n], ds.y[idx].numpy())
        assert sorted(set(g["epoch"][:n].tolist())) == [0, 1, 2]
        scale = g["updates"]["grad_scale"][:8]
        assert (scale < 0.999).all()  # clipping was active and measured
        assert f.attrs["recorded_by"] == "DualFormRecorder"


def test_a_process_whose_default_dtype_is_float64_records_exactly(tmp_path):
    # the certificate's probes and the check's zeros were made in the default dtype: float64 probes met float32 rows
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ds = IndexedDataset(n=32)
        ds.x = ds.x.double()
        model = make_model()  # float64, as the default makes it
        opt, sched = make_opt(model)
        with DualFormRecorder(tmp_path / "f64.h5", model, opt) as rec:
            train(model, opt, sched, batches(ds, 4), rec)
        assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
        x = torch.randn(5, 6)
        with DualInference(tmp_path / "f64.h5", device="cpu") as di:
            assert rel_err(di.attend("0", x, top_k=2).dual.double(), real_output(model[0], x)) < 1e-5
    finally:
        torch.set_default_dtype(default)


def test_measured_factor_matches_clip_grad_norm(tmp_path):
    """The recorder measures the clip factor; torch.nn.utils.clip_grad_norm_ computed it another way."""
    ds = IndexedDataset(n=64)
    model = make_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    factors = []
    with DualFormRecorder(str(tmp_path / "c.h5"), model, opt, certify=False):
        for micro in batches(ds, 5, micro=1):
            idx, x, y = micro[0]
            nn.functional.cross_entropy(model(x / 10.0), y).backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.02)
            factors.append(min(1.0, 0.02 / (float(total) + 1e-6)))
            opt.step()
            opt.zero_grad()
    with h5py.File(tmp_path / "c.h5", "r") as f:
        for name in ("0", "2"):
            got = f["layers"][name]["updates"]["grad_scale"][:5]
            np.testing.assert_allclose(got, factors, rtol=1e-5)


def test_without_batch_calls_indices_are_unknown(tmp_path):
    ds = IndexedDataset(n=32)
    model = make_model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    path = str(tmp_path / "noidx.h5")
    with DualFormRecorder(path, model, opt) as rec:
        for micro in batches(ds, 3, micro=1):
            _, x, y = micro[0]
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert all(c["exact"] for c in rec.certificate.values())
    with StoreReader(path) as s:
        blk = s.layer("0").read(0, 10, ("index", "label"))
        assert (blk["index"] == -1).all() and (blk["label"] == -1).all()


def test_fabric_loop_with_fabric_clipping_is_exact(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    ds = IndexedDataset(n=64)
    model = make_model(3)
    opt, sched = make_opt(model)
    fmodel, fopt = fabric.setup(model, opt)
    path = str(tmp_path / "fabric.h5")
    snaps = {}
    with DualFormRecorder(path, fmodel, fopt) as rec:
        for step, micro in enumerate(batches(ds, 6)):
            for idx, x, y in micro:
                rec.batch(indices=idx, labels=y)
                fabric.backward(nn.functional.cross_entropy(fmodel(x / 10.0), y) / 2)
            fabric.clip_gradients(fmodel, fopt, max_norm=0.05)
            fopt.step()
            fopt.zero_grad()
            sched.step()
            snaps[step + 1] = copy.deepcopy(model)
    assert set(rec.certificate) == {"0", "2"}  # the user's names, not the wrapper's
    assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
    x = torch.randn(10, 6)
    with DualInference(path, device="cpu") as di:
        for at in (None, 2):
            res = di.attend("0", x, top_k=2, at_step=at)
            ref = model if at is None else snaps[at]
            assert rel_err(res.dual.double(), real_output(ref[0], x)) < 1e-5


def test_a_resumed_recorder_equals_an_uninterrupted_one(tmp_path):
    ds = IndexedDataset(n=64)
    data = list(batches(ds, 8))

    def fresh():
        model = make_model(4)
        opt, sched = make_opt(model)
        return model, opt, sched

    # uninterrupted
    model, opt, sched = fresh()
    full = str(tmp_path / "full.h5")
    with DualFormRecorder(full, model, opt) as rec:
        train(model, opt, sched, data, rec)
    final_full = copy.deepcopy(model)

    # crashed after step 6, with a checkpoint at step 4
    model, opt, sched = fresh()
    part = str(tmp_path / "part.h5")
    rec = DualFormRecorder(part, model, opt)
    rec.start()
    train(model, opt, sched, data[:4], rec)
    ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "sched": sched.state_dict(), "rec": rec.state_dict()}
    train(model, opt, sched, data[4:6], rec, start=4)
    rec.close()  # the process "dies" here; its store opens at step 6
    with StoreReader(part) as s:
        assert s.last_step == 6 and not s.complete

    model, opt, sched = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    rec = DualFormRecorder(part, model, opt)
    rec.load_state_dict(ckpt["rec"])
    with rec:
        train(model, opt, sched, data[4:], rec, start=4)
    assert rec.steps == 8
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, final_full.state_dict()[name], rtol=0, atol=0)
    a, b = store_contents(full), store_contents(part)
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(("@certificate_rel_err", "@certificate_rel_err_weight", "@certificate_rel_err_bias",
                         "@certificate_explained")) or "memory_" in key:
            continue
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    assert all(c["exact"] for c in rec.certificate.values())


def test_a_state_of_another_store_is_refused(tmp_path):
    model = make_model()
    opt, _ = make_opt(model)
    rec = DualFormRecorder(str(tmp_path / "a.h5"), model, opt)
    with pytest.raises(ValueError, match="continues"):
        rec.load_state_dict({"steps": 3, "rows": {"0": 1}, "store_path_resolved": str(tmp_path / "b.h5")})


def test_a_skipped_loss_scaler_step_drops_its_rows(tmp_path):
    """GradScaler skips a step with inf gradients: no optimizer hook fires, zero_grad() discards the rows."""
    ds = IndexedDataset(n=64)
    model = make_model(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    path = str(tmp_path / "amp.h5")
    applied = 0
    with DualFormRecorder(path, model, opt) as rec:
        for step, micro in enumerate(batches(ds, 6, micro=1)):
            idx, x, y = micro[0]
            rec.batch(indices=idx, labels=y)
            loss = nn.functional.cross_entropy(model(x / 10.0), y)
            if step == 2:
                loss = loss * float("inf")  # this step's gradients overflow
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            applied = rec.steps
    assert applied == 5  # the overflowing step was never taken
    assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
    with h5py.File(path, "r") as f:
        scale = f["layers"]["0"]["updates"]["grad_scale"][:5]
        # the rows carry the loss scale; the measured factor removes it exactly (a power of two)
        assert all(float(np.log2(1 / s)).is_integer() for s in scale), scale


def test_a_gradient_changed_element_wise_is_reported_inexact(tmp_path):
    ds = IndexedDataset(n=64)
    model = make_model(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="INEXACT"):
        with DualFormRecorder(str(tmp_path / "v.h5"), model, opt) as rec:
            for micro in batches(ds, 3, micro=1):
                _, x, y = micro[0]
                nn.functional.cross_entropy(model(x / 10.0), y).backward()
                torch.nn.utils.clip_grad_value_(model.parameters(), 1e-4)  # not a uniform scaling
                opt.step()
                opt.zero_grad()
    assert rec.inexact_layers
    assert not all(c["exact"] for c in rec.certificate.values())


def test_optimizers_other_than_sgd_are_refused_by_name(tmp_path):
    model = make_model()
    opt = torch.optim.Rprop(model.parameters())
    with pytest.raises(InexactError, match="Rprop"):
        with DualFormRecorder(str(tmp_path / "r.h5"), model, opt):
            pass


@pytest.mark.parametrize("bad, match", [
    (dict(dtype="float8"), "dtype"), (dict(chunk_rows=True), "chunk_rows"), (dict(chunk_rows=10**8), "chunk_rows"),
    (dict(commit_seconds="soon"), "commit_seconds"), (dict(commit_seconds=float("nan")), "commit_seconds"),
    (dict(commit_seconds=-1), "commit_seconds"), (dict(expected_steps=0), "expected_steps"),
])
def test_bad_options_are_refused_where_given(tmp_path, bad, match):
    model = make_model()
    opt, _ = make_opt(model)
    with pytest.raises(ValueError, match=match):
        DualFormRecorder(str(tmp_path / "o.h5"), model, opt, **bad)


def test_an_existing_store_is_not_overwritten(tmp_path):
    path = tmp_path / "e.h5"
    with h5py.File(path, "w") as f:  # (any HDF5 file: a file that is not HDF5 is refused even with overwrite=True)
        f.attrs["mine"] = 1
    before = path.read_bytes()
    model = make_model()
    opt, _ = make_opt(model)
    with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
        with DualFormRecorder(str(path), model, opt):
            pass
    assert path.read_bytes() == before


def test_ddp_recorder_loop_is_exact(tmp_path):
    """Two gloo processes, a DistributedDataParallel model, clipping by hand: shards that read as one exact store."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "recorder_ddp.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    x = torch.randn(12, 6)
    with DualInference(str(tmp_path / "ddp.h5"), device="cpu") as di:
        res = di.attend("0", x, top_k=2)
        ref = x.double() @ final["0.weight"].double().t() + final["0.bias"].double()
        assert rel_err(res.dual.double(), ref) < 1e-5
        assert float(res.rel_err.max()) < 1e-5


# ------------------------------------------------------------------------------------------------------
# the certificate as training goes
# ------------------------------------------------------------------------------------------------------
def _small_run(tmp_path, name: str, **kw):
    ds = IndexedDataset(n=64)
    model = make_model(7)
    opt, sched = make_opt(model)
    with DualFormRecorder(str(tmp_path / name), model, opt, **kw) as rec:
        train(model, opt, sched, batches(ds, 6), rec)
    return rec


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_the_sketch_certificate_agrees_with_a_full_reread(tmp_path, dtype):
    """The projections carried through training give what reading the whole store gives, without the read."""
    from lightning_dualform.attend.certificate import certify_store

    rec = _small_run(tmp_path, "s.h5", dtype=dtype)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["layers"]["0"].attrs["certificate_method"] == "sketch"
        assert "memory_weight" not in f["layers"]["0"]  # no second pass: no sums either
    full = certify_store(str(tmp_path / "s.h5"))
    for name, cert in rec.certificate.items():
        assert cert["method"] == "sketch" and cert["exact"] == full[name].exact is True, (cert, full[name])
        assert cert["tolerance"] == full[name].tolerance
        # an estimate of the same error: the same order of magnitude
        assert cert["rel_err"] <= max(10 * full[name].rel_err, 1e-6), (name, cert["rel_err"], full[name].rel_err)


def test_a_frozen_weight_with_a_trained_bias_keeps_every_micro_batch(tmp_path):
    """A layer whose weight is frozen (its .grad stays None) while its bias trains, under gradient accumulation:
    the earlier micro-batches' rows count (they were dropped as if zero_grad() had thrown them away, and the
    layer was certified INEXACT with a wrong reason)."""
    from lightning_dualform.attend.certificate import certify_store

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model[2].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with DualFormRecorder(str(tmp_path / "f.h5"), model, opt) as rec:
        for _ in range(4):
            for _ in range(2):  # two micro-batches a step
                x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
    assert all(c.exact for c in certify_store(str(tmp_path / "f.h5")).values())


@pytest.mark.parametrize("n, d_in, d_out", [(1, 1, 1), (5, 3, 10), (7, 784, 801), (130, 64, 9)])
def test_the_writers_projection_kernel_is_the_dense_product(n, d_in, d_out):
    """``V^T (K Z)`` and ``sum v`` of the compiled kernel the writer's thread runs (rows in blocks of four and a
    tail; odd widths), and an embedding's token ids, against float64 dense products."""
    from lightning_dualform.record import sketch

    if sketch._kernel() is None:
        pytest.skip("the compiled kernels are not installed (or LIGHTNING_DUALFORM_KERNEL=0)")
    g = np.random.default_rng(n + d_in)
    keys, values = g.standard_normal((n, d_in), dtype=np.float32), g.standard_normal((n, d_out), dtype=np.float32)
    z = g.standard_normal((d_in, sketch.PROBES), dtype=np.float32)
    gz, gb = sketch.project_host_rows(keys, values, z)
    ref = values.astype(np.float64).T @ (keys.astype(np.float64) @ z.astype(np.float64))
    assert np.linalg.norm(gz - ref) <= 1e-6 * np.linalg.norm(ref)
    np.testing.assert_allclose(gb, values.astype(np.float64).sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(sketch.project_host_rows(keys, values, np.asfortranarray(z))[0], gz)  # any layout
    tokens = g.integers(0, d_in, (n, 1))
    gz, gb = sketch.project_host_rows(tokens, values, z)
    ref = values.astype(np.float64).T @ z[tokens[:, 0]].astype(np.float64)
    assert np.linalg.norm(gz - ref) <= 1e-6 * np.linalg.norm(ref)


@pytest.mark.parametrize("where", ["writer", "training-thread", "no-kernel"])
def test_the_certificate_made_on_the_writers_thread_is_the_training_threads(tmp_path, monkeypatch, where):
    """Small layers' projections run on the writer's thread from the rows it is handed; larger ones, and all of
    them without the compiled kernel, on the training thread. Both carry the same projections to the same
    certificate (float32 products there, float64 sums here)."""
    from lightning_dualform.record import sketch

    if where != "no-kernel" and sketch._kernel() is None:
        pytest.skip("the compiled kernels are not installed (or LIGHTNING_DUALFORM_KERNEL=0)")
    if where == "training-thread":
        monkeypatch.setattr(sketch, "WRITER_NUMBERS", 0)
    elif where == "no-kernel":
        monkeypatch.setattr(sketch, "_kernel", lambda: None)
    rec = _small_run(tmp_path, "w.h5")
    state = rec._engine.sketch
    placed = state._on_writer
    assert set(placed.values()) == ({True} if where == "writer" else {False} if where == "training-thread" else set())
    assert all(c["exact"] and c["method"] == "sketch" for c in rec.certificate.values()), rec.certificate
    monkeypatch.undo()
    ref = _small_run(tmp_path, "ref.h5")  # (the default: the writer's thread where the kernel is installed)
    for name, s in state.layers.items():
        other = ref._engine.sketch.layers[name]
        assert float((s.p - other.p).norm() / other.p.norm()) < 1e-6, name
        assert float((s.buf - other.buf).norm() / other.buf.norm()) < 1e-5, name
        assert s.steps == other.steps > 0


@pytest.mark.parametrize("damage", ["row", "coefficient"])
def test_the_sketch_certificate_catches_a_wrong_row_or_coefficient(tmp_path, monkeypatch, caplog, damage):
    from lightning_dualform.record import rows as rows_mod
    from lightning_dualform.record.step_rows import StepRowReader

    if damage == "row":  # one stored value changed on its way to the writer
        original = rows_mod.gather_rows

        def gather(parts, dtype):
            k, v, *rest = original(parts, dtype)
            v = v.clone()
            v[0, 0] += 0.5
            return (k, v, *rest)

        monkeypatch.setattr(rows_mod, "gather_rows", gather)
    else:  # the recorded learning rate of every step 1% off
        original = StepRowReader.group_columns  # (read again after each step: what is stored)

        def update(self, p, group):
            up = original(self, p, group)
            up["lr"] *= 1.01
            return up

        monkeypatch.setattr(StepRowReader, "group_columns", update)
    with caplog.at_level("INFO"):
        rec = _small_run(tmp_path, "d.h5")
    assert not all(c["exact"] for c in rec.certificate.values()), rec.certificate
    assert max(c["rel_err"] for c in rec.certificate.values()) > 1e-4
    # the line says so plainly (it read "rebuilt weights match the trained ones ... (INEXACT; ...)")
    assert re.search(r"rebuilt weights differ from the trained ones by relative error \S+ \(INEXACT: beyond",
                     caplog.text)


def test_a_layer_another_optimizer_trains_is_left_out_with_why(tmp_path, caplog):
    """Two optimizers, the recorder given one: the other's layer is not tracked (its rows could not say how its
    weights changed: it was certified INEXACT, and verify called the store damaged), and the first is exact."""
    model = make_model(3)
    first = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    second = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    ds = IndexedDataset(n=32)
    with caplog.at_level("INFO"), DualFormRecorder(str(tmp_path / "two.h5"), model, first) as rec:
        for i in range(4):
            x, y = ds.x[8 * i: 8 * i + 8], ds.y[8 * i: 8 * i + 8]
            rec.batch(indices=torch.arange(8 * i, 8 * i + 8))
            first.zero_grad()
            second.zero_grad()
            nn.functional.cross_entropy(model(x / 10.0), y).backward()
            first.step()
            second.step()
    assert list(rec.certificate) == ["0"] and rec.certificate["0"]["exact"], rec.certificate
    assert "2 is skipped: its weight is in none of the param groups of the SGD" in caplog.text
    with pytest.raises(ValueError, match="no layer to track.*optimizer's param groups"):
        other = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
        DualFormRecorder(str(tmp_path / "none.h5"), model, other).start()
