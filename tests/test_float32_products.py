"""Float32 products rounded on the user's request (TF32, bfloat16 inside float32 matmuls): training records
the rounding and its checks allow for it; our own answers never use it."""

from __future__ import annotations

import h5py
import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import TRAINER_KW, MLP, IndexedDataset, loader, real_output, rel_err
from lightning_dualform import DualFormCallback, DualInference
from lightning_dualform.store.certificate import FLOAT32_PRODUCTS_TOLERANCE, tolerance
from lightning_dualform.cli import main
from lightning_dualform._float32_products import float32_mode, full_float32_products


NEW_API = getattr(torch.backends.cuda.matmul, "fp32_precision", None) is not None  # torch >= 2.9
GENERIC_API = hasattr(torch.backends, "fp32_precision")  # the parent setting the backends inherit


def _reset() -> None:
    """Back to torch's defaults, the state every other test expects."""
    torch.set_float32_matmul_precision("highest")
    if NEW_API:  # (the line above sets the backends explicitly: let them inherit again)
        if GENERIC_API:
            torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"


@pytest.fixture(autouse=True)
def _defaults_after():
    yield
    _reset()
    assert torch.get_float32_matmul_precision() == "highest"


def _loosened_cpu_products() -> bool:
    """Whether 'medium' rounds float32 products on this CPU (oneDNN's bfloat16 path needs AMX)."""
    torch.set_float32_matmul_precision("medium")
    try:
        return _product_error() > 1e-5
    finally:
        _reset()


def _product_error() -> float:
    """Relative error of one float32 product of the size the tests below multiply, on this CPU now (through
    F.linear, what nn.Linear multiplies with)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 64, generator=g), torch.randn(256, 64, generator=g)
    ref = a.double() @ b.double().t()
    return float((torch.nn.functional.linear(a, b).double() - ref).norm() / ref.norm())


_real_linear = torch.nn.functional.linear


def _amx_like_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear as oneDNN multiplies on CPUs with AMX under set_float32_matmul_precision('medium'): float32
    operands rounded to bfloat16 (forward and, through the casts, backward), float32 sums."""
    if x.dtype == torch.float32 and _mkldnn_rounds_to_bf16():
        return _real_linear(x.bfloat16().float(), w.bfloat16().float(), b)
    return _real_linear(x, w, b)


def _mkldnn_rounds_to_bf16() -> bool:
    """What oneDNN reads: the mkldnn matmul setting (inheriting the generic one), or, before torch 2.9,
    the global matmul precision."""
    if not NEW_API:
        return torch.get_float32_matmul_precision() == "medium"
    value = torch.backends.mkldnn.matmul.fp32_precision
    if value == "none" and GENERIC_API:
        value = torch.backends.fp32_precision
    return value == "bf16"


_aten = torch.ops.aten
#: the products oneDNN runs as bf16 gemms under 'medium' on CPUs with AMX, and the positions of their two factors
_PRODUCTS = {
    _aten.mm.default: (0, 1), _aten.mm.out: (0, 1), _aten.bmm.default: (0, 1), _aten.bmm.out: (0, 1),
    _aten.mv.default: (0, 1), _aten.dot.default: (0, 1),
    _aten.addmm.default: (1, 2), _aten.addmm.out: (1, 2), _aten.addmm_.default: (1, 2),
    _aten.baddbmm.default: (1, 2), _aten.baddbmm.out: (1, 2), _aten.baddbmm_.default: (1, 2),
    _aten.addmv.default: (1, 2), _aten.addmv_.default: (1, 2),
}


class _AmxLikeProducts(TorchDispatchMode):
    """Every float32 matrix product on the CPU (``@``, ``torch.matmul``, ``mm``, ``addmm_``, ``bmm``, ``F.linear``
    ..., forward and backward) as oneDNN multiplies on CPUs with AMX while the process allows bfloat16 products:
    both factors rounded to bfloat16, float32 sums. Active in the thread that enters it (the one that trains and
    attends); ``F.linear`` is patched as well, for products in other threads."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        factors = _PRODUCTS.get(func)
        if factors is not None and _mkldnn_rounds_to_bf16():
            args = list(args)
            for i in factors:
                a = args[i]
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.device.type == "cpu":
                    args[i] = a.bfloat16().float()
        return func(*args, **(kwargs or {}))


@pytest.fixture(params=["this-cpu", "emulated"])
def bf16_products(request, monkeypatch):
    """Rounded float32 products: this CPU's own (AMX; skipped where it has none), or an emulation of them
    (every product op, not only F.linear: the attention pass multiplies with ``@`` and ``addmm_``), so that the
    tests below can fail on every machine."""
    if request.param == "emulated":
        monkeypatch.setattr(torch.nn.functional, "linear", _amx_like_linear)
        with _AmxLikeProducts():
            yield request.param
        return
    if not _loosened_cpu_products():
        pytest.skip("this CPU multiplies float32 in full precision even under 'medium' (the emulated case runs)")
    yield request.param


def test_the_emulation_rounds_the_products_an_attention_pass_makes(bf16_products):
    """The emulated case must round what the pass multiplies with, or the answers test below could not fail."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 64, generator=g), torch.randn(256, 64, generator=g)
    ref = a.double() @ b.double().t()

    def err(x: torch.Tensor) -> float:
        return float((x.double() - ref).norm() / ref.norm())

    products = {
        "@": lambda: a @ b.t(), "matmul out=": lambda: torch.matmul(a, b.t(), out=torch.empty(128, 256)),
        "addmm_": lambda: torch.zeros(128, 256).addmm_(a, b.t()), "F.linear": lambda: torch.nn.functional.linear(a, b),
    }
    torch.set_float32_matmul_precision("medium")
    for name, product in products.items():
        assert err(product()) > 1e-5, name  # rounded, as the user allowed
        with full_float32_products():
            assert err(product()) < 1e-6, name  # and not inside our guard


def test_modes_are_what_products_on_the_device_do(bf16_products):
    assert float32_mode("cpu") == "ieee" and float32_mode("cpu", conv=True) == "ieee"
    torch.set_float32_matmul_precision("high")  # TF32 does not exist on CPUs: allowed, never used
    assert float32_mode("cpu") == "ieee"
    torch.set_float32_matmul_precision("medium")  # bfloat16 inside oneDNN's matmuls, where AMX has it
    assert float32_mode("cpu") == ("bf16" if _product_error() > 1e-5 else "ieee")
    assert float32_mode("mps") == "ieee"


def test_full_float32_products_restores_the_users_settings():
    torch.set_float32_matmul_precision("medium")
    loose = _product_error()
    with full_float32_products():
        assert _product_error() < 1e-6
        with full_float32_products():  # nested: the inner exit leaves the outer's settings alone
            pass
        assert _product_error() < 1e-6
    assert _product_error() == loose and torch.get_float32_matmul_precision() == "medium"
    with pytest.raises(RuntimeError, match="boom"):
        with full_float32_products():
            raise RuntimeError("boom")
    assert _product_error() == loose and torch.get_float32_matmul_precision() == "medium"
    torch.set_float32_matmul_precision("high")
    with full_float32_products():
        assert float32_mode("cpu") == "ieee" and _product_error() < 1e-6
    assert torch.get_float32_matmul_precision() == "high"


def test_one_thread_leaving_does_not_loosen_products_in_another(bf16_products):
    """The settings are process-wide: the last context to leave restores them, not the first."""
    import threading

    torch.set_float32_matmul_precision("medium")
    loose = _product_error()
    b_in, a_out, errors = threading.Event(), threading.Event(), []

    def b() -> None:
        with full_float32_products():
            b_in.set()
            a_out.wait(10)
            errors.append(_product_error())

    t = threading.Thread(target=b)
    with full_float32_products():
        t.start()
        assert b_in.wait(10)
    a_out.set()
    t.join(10)
    assert errors and errors[0] < 1e-6
    assert _product_error() == loose


@pytest.mark.skipif(not (NEW_API and GENERIC_API), reason="this torch has no inherited fp32_precision")
def test_restoring_keeps_a_setting_inherited_from_the_parent_backend():
    torch.backends.fp32_precision = "bf16"  # the generic setting, which the matmul backends inherit
    with full_float32_products():
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    torch.backends.fp32_precision = "ieee"  # the user changes the parent: the child follows again
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert _product_error() < 1e-6


def _fit(tmp_path, name: str) -> tuple[MLP, DualFormCallback]:
    torch.manual_seed(0)
    # products large enough for oneDNN to round them to bfloat16 under "medium" on CPUs with AMX
    model = MLP(
        d=64, hidden=128, classes=4, opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    )
    cb = DualFormCallback(tmp_path / name)
    # on the CPU, also where a GPU is present: these tests are about oneDNN's bfloat16 products
    L.Trainer(max_epochs=2, callbacks=[cb], accelerator="cpu", **TRAINER_KW).fit(
        model, loader(IndexedDataset(n=256, d=64, classes=4), 64)
    )
    return model, cb


def test_training_with_bf16_products_is_recorded_with_its_tolerance(tmp_path, capsys, bf16_products):
    torch.set_float32_matmul_precision("medium")
    with pytest.warns(UserWarning, match="rounded to bf16.*tolerance is 5e-02.*'highest'"):
        model, cb = _fit(tmp_path, "medium.h5")
    with h5py.File(cb.store_path, "r") as f:
        assert f.attrs["float32_products"] == "bf16"
    tol = tolerance("float32", "32-true", "bf16")
    assert tol == FLOAT32_PRODUCTS_TOLERANCE["bf16"]
    assert not cb.inexact_layers, cb.inexact_layers  # the gradient check allows for the rounding
    for name, cert in cb.certificate.items():
        assert cert["exact"] and cert["tolerance"] == tol and cert["rel_err"] <= tol, (name, cert)
    # the command line says so, and verifies against the same tolerance
    assert main(["info", str(cb.store_path)]) == 0
    assert "precision 32-true (float32 products in bf16)" in capsys.readouterr().out
    assert main(["verify", str(cb.store_path), "--samples", "16"]) == 0
    assert "tolerance 5e-02" in capsys.readouterr().out


def test_training_in_ieee_float32_records_ieee(tmp_path):
    _, cb = _fit(tmp_path, "highest.h5")
    with h5py.File(cb.store_path, "r") as f:
        assert f.attrs["float32_products"] == "ieee"
    for cert in cb.certificate.values():
        assert cert["exact"] and cert["tolerance"] == 1e-4 and cert["rel_err"] <= 1e-5


def test_answers_are_full_float32_whatever_the_user_set(tmp_path, bf16_products):
    model, cb = _fit(tmp_path, "store.h5")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    ref = real_output(model.net[0], x)
    with DualInference(cb.store_path, device="cpu", accumulate=torch.float32, block_rows=512) as di:
        exact = di.attend("net.0", x, top_k=5)
        torch.set_float32_matmul_precision("medium")
        assert _product_error() > 1e-5  # the products the user allowed do round
        loose = di.attend("net.0", x, top_k=5)
        assert torch.get_float32_matmul_precision() == "medium"  # the user's setting, left as it was
    assert rel_err(exact.dual.double(), ref) <= 1e-5
    assert rel_err(loose.dual.double(), ref) <= 1e-5  # (about 2e-3 if the pass used the user's setting)
    torch.testing.assert_close(loose.top.score, exact.top.score)
    assert torch.equal(loose.top.row, exact.top.row)
    assert loose.max_rel_err <= 1e-5


class _CrashAt(MLP):
    """Raises in the training step after ``at`` optimizer steps."""

    def __init__(self, at: int, **kw) -> None:
        super().__init__(**kw)
        self.at = at

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step >= self.at:
            raise RuntimeError("crash")
        return super().training_step(batch, batch_idx)


def test_a_resumed_store_keeps_the_loosest_rounding_of_its_runs(tmp_path, bf16_products):
    """Rows recorded under bf16 products stay so after a resume in IEEE float32, and the resume writes the
    store's mode before its first row: a resumed run that crashes keeps it too."""
    dl = loader(IndexedDataset(n=256, d=64, classes=4), 64, shuffle=False)
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)  # noqa: E731
    kw = dict(accelerator="cpu", default_root_dir=tmp_path, **{**TRAINER_KW, "enable_checkpointing": True})
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c", filename="e1")
    L.Trainer(max_epochs=1, callbacks=[DualFormCallback(tmp_path / "s.h5"), ckpt], **kw).fit(
        MLP(d=64, hidden=128, classes=4, opt_factory=opt), dl)
    torch.set_float32_matmul_precision("medium")
    with pytest.raises(RuntimeError, match="crash"), pytest.warns(UserWarning, match="rounded to bf16"):
        L.Trainer(max_epochs=2, callbacks=[DualFormCallback(tmp_path / "s.h5")], **kw).fit(
            _CrashAt(6, d=64, hidden=128, classes=4, opt_factory=opt), dl, ckpt_path=tmp_path / "c" / "e1.ckpt")
    with h5py.File(tmp_path / "s.h5", "r", swmr=True, locking=False) as f:
        assert f.attrs["float32_products"] == "bf16" and f.attrs["status"] == "recording"
    _reset()
    cb = DualFormCallback(tmp_path / "s.h5")
    L.Trainer(max_epochs=2, callbacks=[cb], **kw).fit(
        MLP(d=64, hidden=128, classes=4, opt_factory=opt), dl, ckpt_path=tmp_path / "c" / "e1.ckpt")
    with h5py.File(cb.store_path, "r") as f:
        assert f.attrs["float32_products"] == "bf16" and f.attrs["status"] == "complete"
    assert all(c["exact"] and c["tolerance"] == FLOAT32_PRODUCTS_TOLERANCE["bf16"] for c in cb.certificate.values())


def test_float64_and_cpu_tf32_settings_record_ieee(tmp_path, recwarn):
    """64-true multiplies in float64, and CPUs have no TF32: neither is rounded, whatever the settings say."""
    torch.set_float32_matmul_precision("medium")
    model = MLP(d=64, hidden=128, classes=4).double()
    cb = DualFormCallback(tmp_path / "f64.h5")
    L.Trainer(max_epochs=1, callbacks=[cb], accelerator="cpu", precision="64-true", **TRAINER_KW).fit(
        model, loader(IndexedDataset(n=128, d=64, classes=4), 64))
    torch.set_float32_matmul_precision("high")
    _, cb32 = _fit(tmp_path, "high.h5")
    for store in (cb.store_path, cb32.store_path):
        with h5py.File(store, "r") as f:
            assert f.attrs["float32_products"] == "ieee"
    assert cb.certificate["net.0"]["tolerance"] == 1e-4 and cb32.certificate["net.0"]["tolerance"] == 1e-4
    assert not [w for w in recwarn if "float32 products" in str(w.message)]
