"""Mixed precision: keys are what the rounded matmul used, values carry the loss scale, skipped steps leave no rows."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from helpers import TRAINER_KW, MLP, IndexedDataset, dual_output, loader, real_output, rel_err
from lightning_dualform import DualFormCallback, StoreReader
from lightning_dualform.store.certificate import PRECISION_TOLERANCE


# seeds 4, 7, 10 and 18 made the earlier gradient check call net.2 INEXACT (its error was relative to
# |W.grad @ r|, which cancels; it is now relative to |W.grad| |r|, the bound for elementwise rounding)
@pytest.mark.parametrize("seed", [0, 4, 7, 10, 18])
def test_bf16_mixed_within_documented_tolerance(tmp_path, seed):
    torch.manual_seed(seed)
    model = MLP(hidden=32, opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    cb = DualFormCallback(tmp_path / "bf16.h5")
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], precision="bf16-mixed", **TRAINER_KW)
    trainer.fit(model, loader(IndexedDataset(n=128)))
    tol = PRECISION_TOLERANCE["bf16-mixed"]
    assert not cb.inexact_layers, cb.inexact_layers
    for name, cert in cb.certificate.items():
        assert cert["exact"] and cert["rel_err"] <= tol and cert["tolerance"] == tol
        module = dict(model.named_modules())[name]
        x = torch.randn(8, module.in_features)
        assert rel_err(dual_output(cb.store_path, name, x), real_output(module, x)) <= tol
    with StoreReader(cb.store_path) as s:
        keys = s.layer("net.2").read(0, 64, ("keys",))["keys"]
    # keys are the bfloat16 copies the matmul used, held exactly in float32
    np.testing.assert_array_equal(keys, torch.from_numpy(keys).to(torch.bfloat16).float().numpy())


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_16_mixed_with_loss_scaler_on_gpu(tmp_path, optimizer):
    from lightning.pytorch.plugins import MixedPrecision

    # an absurd initial scale makes the first steps overflow, so the scaler skips them (AdamW's state too)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    opt = {"sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
           "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)}[optimizer]
    model = MLP(hidden=32, opt_factory=opt)
    cb = DualFormCallback(tmp_path / "fp16.h5")
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], accelerator="gpu", devices=1,
                        plugins=[MixedPrecision("16-mixed", "cuda", scaler=scaler)], **TRAINER_KW)
    trainer.fit(model, loader(IndexedDataset(n=128)))
    model = model.cpu()
    with StoreReader(cb.store_path) as s:
        layer = s.layer("net.0")
        applied = layer.updates()["weight"]["applied"]
        assert not applied.all() and applied.any()  # some steps were skipped
        steps_with_rows = set(layer.read(0, layer.n_rows, ("step",))["step"].tolist())
        assert steps_with_rows == {int(s.first_step + i) for i in np.flatnonzero(applied)}
    from lightning_dualform import DualInference

    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        for name, cert in cb.certificate.items():
            assert cert["exact"], cert
            module = dict(model.named_modules())[name]
            x = torch.randn(8, module.in_features)
            dual = (
                dual_output(cb.store_path, name, x) if optimizer == "sgd" else di.attend(name, x, top_k=1).dual.double()
            )
            assert rel_err(dual, real_output(module, x)) <= PRECISION_TOLERANCE["16-mixed"]


@pytest.mark.cuda
def test_float32_fit_on_gpu_is_exact(tmp_path):
    """Rows leave the GPU through pinned buffers and a CUDA event; the store must be as exact as on CPU."""
    model = MLP(hidden=32, opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    cb = DualFormCallback(tmp_path / "gpu.h5")
    trainer = L.Trainer(max_epochs=2, callbacks=[cb], accelerator="gpu", devices=1, gradient_clip_val=0.5, **TRAINER_KW)
    trainer.fit(model, loader(IndexedDataset(n=128)))
    model = model.cpu()
    assert all(c["exact"] for c in cb.certificate.values()), cb.certificate
    for name in ("net.0", "net.2"):
        module = dict(model.named_modules())[name]
        x = torch.randn(8, module.in_features)
        assert rel_err(dual_output(cb.store_path, name, x), real_output(module, x)) <= 1e-5
    from lightning_dualform import DualInference

    with DualInference(cb.store_path, device="cuda", accumulate=torch.float64) as di:
        x = torch.randn(8, 6)
        assert rel_err(di.attend("net.0", x, top_k=3).dual.double(), real_output(model.net[0], x)) <= 1e-5


@pytest.mark.cuda
def test_tf32_fit_on_gpu_is_recorded_and_answered_in_full_float32(tmp_path):
    """set_float32_matmul_precision("high") (which Lightning suggests on GPUs with tensor cores): each step's
    gradient is a TF32 product; the store says so, its checks allow for it, and attend still multiplies in
    full float32."""
    from lightning_dualform import DualInference
    from lightning_dualform.store.certificate import FLOAT32_PRODUCTS_TOLERANCE

    torch.manual_seed(0)
    model = MLP(
        d=64, hidden=256, classes=4, opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    )
    cb = DualFormCallback(tmp_path / "tf32.h5")
    torch.set_float32_matmul_precision("high")
    try:
        trainer = L.Trainer(max_epochs=2, callbacks=[cb], accelerator="gpu", devices=1, **TRAINER_KW)
        with pytest.warns(UserWarning, match="rounded to tf32"):
            trainer.fit(model, loader(IndexedDataset(n=512, d=64, classes=4), 128))
        with StoreReader(cb.store_path) as s:
            assert s.attrs["float32_products"] == "tf32"
        tol = FLOAT32_PRODUCTS_TOLERANCE["tf32"]
        assert not cb.inexact_layers, cb.inexact_layers
        for cert in cb.certificate.values():
            assert cert["exact"] and cert["tolerance"] == tol, cb.certificate
        x = torch.randn(32, 64)
        with DualInference(cb.store_path, device="cuda", accumulate=torch.float32) as di:
            res = di.attend("net.0", x, top_k=3)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")
    # the pass against the same sum computed in float64 from the raw file: float32 round-off, not TF32's
    assert rel_err(res.dual.double(), dual_output(cb.store_path, "net.0", x)) <= 1e-5
    assert rel_err(res.dual.double(), real_output(model.cpu().net[0], x)) <= tol


@pytest.mark.cuda
def test_conv_fit_on_gpu_with_cudnn_defaults(tmp_path):
    from test_capture import ConvNet

    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 2, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
    model = ConvNet()
    cb = DualFormCallback(tmp_path / "conv.h5")
    L.Trainer(max_epochs=2, callbacks=[cb], accelerator="gpu", devices=1, **TRAINER_KW).fit(
        model, torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True))
    # cuDNN's default allows TF32; it rounds where the GPU has TF32 (Ampere and later)
    g = torch.Generator().manual_seed(1)
    a, w = torch.randn(8, 32, 16, 16, generator=g), torch.randn(64, 32, 3, 3, generator=g)
    ref = nn.functional.conv2d(a.double(), w.double())
    err = (nn.functional.conv2d(a.cuda(), w.cuda()).cpu().double() - ref).norm() / ref.norm()
    expected = "tf32" if torch.backends.cudnn.allow_tf32 and float(err) > 1e-5 else "ieee"
    with StoreReader(cb.store_path) as s:
        assert s.attrs["float32_products"] == expected
    assert not cb.inexact_layers and all(c["exact"] for c in cb.certificate.values()), cb.certificate


def test_bf16_mixed_adamw_within_documented_tolerance(tmp_path):
    """The replay of AdamW sees each step's gradient as the rows give it, while training used the bf16 GEMM's
    rounded one (second moments included): the store is exact to the same documented tolerance."""
    torch.manual_seed(0)
    model = MLP(hidden=32, opt_factory=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1))
    cb = DualFormCallback(tmp_path / "bf16.h5")
    trainer = L.Trainer(max_epochs=3, callbacks=[cb], precision="bf16-mixed", **TRAINER_KW)
    trainer.fit(model, loader(IndexedDataset(n=128)))
    tol = PRECISION_TOLERANCE["bf16-mixed"]
    assert not cb.inexact_layers, cb.inexact_layers
    from lightning_dualform import DualInference

    with DualInference(cb.store_path, device="cpu", accumulate=torch.float64) as di:
        for name, cert in cb.certificate.items():
            assert cert["exact"] and cert["rel_err"] <= tol and cert["tolerance"] == tol
            module = dict(model.named_modules())[name]
            x = torch.randn(8, module.in_features)
            assert rel_err(di.attend(name, x, top_k=1).dual.double(), real_output(module, x)) <= tol
