"""Contract tests of the dependency internals behind ``lightning_dualform._compat``: each fails loudly when
the behaviour the library relies on changes (a new Lightning, torch or h5py)."""

from __future__ import annotations

import threading

import h5py
import lightning as L
import pytest
import torch
from helpers import TRAINER_KW, MLP, IndexedDataset, loader

from lightning_dualform import _compat
from lightning_dualform._unwrap import layer_name, named_modules, unwrap_model
from lightning_dualform.record.batches import IndexRecorder, unwrap_dataloader, wrap_dataloader


class _Observe(L.Callback):
    """Observes the training DataLoaders through ``_compat.observe_dataloaders`` and what the fit loop does."""

    def __init__(self) -> None:
        self.seen: list = []
        self.fifo_at_first_batch: list = []
        self.queue = None
        self.undo = None

    def setup(self, trainer, pl_module, stage):
        def observe(dl):
            self.seen.append(dl)
            self.queue = wrap_dataloader(dl).queue()

        self.undo = _compat.observe_dataloaders(trainer.strategy, observe)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            rec = trainer.train_dataloader.batch_sampler
            self.fifo_at_first_batch = list(self.queue) if isinstance(rec, IndexRecorder) else None

    def teardown(self, trainer, pl_module, stage):
        self.undo()
        for dl in self.seen:
            unwrap_dataloader(dl)


def test_lightning_passes_the_training_loader_through_process_dataloader_before_iterating():
    """The fit loop hands each training DataLoader to ``strategy.process_dataloader`` and iterates what it
    returns, after any sampler injection: a sampler wrapped there sees the first epoch's first batch."""
    cb = _Observe()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, callbacks=[cb], accelerator="cpu", **TRAINER_KW)
    dl = loader(IndexedDataset(n=48), 16, shuffle=False)
    trainer.fit(MLP(), dl)
    assert cb.seen, "Strategy.process_dataloader no longer sees the training DataLoader"
    assert cb.fifo_at_first_batch is not None, "the iterated loader is not the one process_dataloader returned"
    assert cb.fifo_at_first_batch[:1] == [list(range(16))], cb.fifo_at_first_batch
    assert "process_dataloader" not in vars(trainer.strategy)  # undone: the class's method shows again


def test_a_dataloader_refuses_a_new_sampler_and_the_bypass_is_iterated():
    dl = torch.utils.data.DataLoader(list(range(10)), batch_size=4)
    with pytest.raises(ValueError):  # DataLoader guards its samplers after __init__ (the reason for the bypass)
        dl.batch_sampler = None
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def __iter__(self):
            for b in self.inner:
                seen.append(b)
                yield b

        def __len__(self):
            return len(self.inner)

    original = dl.batch_sampler
    _compat.replace_sampler(dl, "batch_sampler", Spy(original))
    assert [b.tolist() for b in dl] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], "a new iterator no longer reads dl.batch_sampler"
    _compat.replace_sampler(dl, "batch_sampler", original)
    assert dl.batch_sampler is original


def test_h5py_lock_is_the_lock_h5py_holds_around_its_calls(tmp_path):
    """``store/_hdf5_nogil.py`` calls HDF5 through ctypes while holding h5py's lock: h5py must take that same
    lock for its own calls, so that another thread's h5py call waits."""
    lock = _compat.h5py_lock()
    assert lock is not None, "h5py._objects.phil is gone: the ctypes path of _hdf5_nogil.py is off (see _compat.py)"
    path = str(tmp_path / "x.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("d", data=[1, 2, 3])
    opened = threading.Event()

    def other() -> None:
        with h5py.File(path, "r") as f:
            f["d"][()]
        opened.set()

    with lock:
        t = threading.Thread(target=other)
        t.start()
        assert not opened.wait(0.3), "h5py opened a file while another thread held h5py's lock"
    t.join(10)
    assert opened.is_set()


def test_lightning_norm_clipping_hands_over_the_norm_it_clips_with():
    """The observing method clips exactly as the stock ``Precision.clip_grad_by_norm`` does, and hands over the
    total norm of the gradients before clipping; a plugin whose class clips its own way is left alone."""
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType

    from lightning_dualform.record.gradient_check import clip_coefficient

    def with_grads() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
        m(torch.randn(8, 5)).pow(2).sum().backward()
        return m, torch.optim.SGD(m.parameters(), lr=0.1)

    stock, opt_stock = with_grads()
    Precision().clip_gradients(opt_stock, 0.05, GradClipAlgorithmType.NORM)
    seen: list[tuple[float, float]] = []
    plugin = Precision()
    undo = _compat.observe_norm_clipping(plugin, lambda total, clip: seen.append((total, clip)))
    assert undo is not None
    observed, opt = with_grads()
    before = [p.grad.clone() for p in observed.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in before]))
    plugin.clip_gradients(opt, 0.05, GradClipAlgorithmType.NORM)
    for a, b, g in zip(stock.parameters(), observed.parameters(), before):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)  # bit for bit what the stock method does
        torch.testing.assert_close(b.grad, g * clip_coefficient(seen[0][0], 0.05), rtol=0, atol=0)
    assert len(seen) == 1 and seen[0][1] == 0.05
    torch.testing.assert_close(seen[0][0], norm)
    assert clip_coefficient(seen[0][0], 0.05) < 1.0  # (clipping was active)
    second: list[float] = []  # a second observer (two callbacks) shares the method; each undoes its own
    undo_second = _compat.observe_norm_clipping(plugin, lambda total, clip: second.append(float(total)))
    assert undo_second is not None
    plugin.clip_gradients(opt, 0.05, GradClipAlgorithmType.NORM)
    assert len(seen) == 2 and len(second) == 1
    undo()
    plugin.clip_gradients(opt, 0.05, GradClipAlgorithmType.NORM)
    assert len(seen) == 2 and len(second) == 2 and "clip_grad_by_norm" in vars(plugin)
    undo_second()
    assert "clip_grad_by_norm" not in vars(plugin)

    class OwnClipping(Precision):
        def clip_grad_by_norm(self, optimizer, clip_val):
            torch.nn.utils.clip_grad_norm_(self.main_params(optimizer), clip_val)

    own = OwnClipping()
    assert _compat.observe_norm_clipping(own, lambda total, clip: None) is None
    assert "clip_grad_by_norm" not in vars(own)


def test_compiled_original_is_the_module_a_compile_wrapper_holds():
    """The contract (``compiled_original``, for ``_unwrap``): ``torch.compile`` returns a wrapper whose
    ``_orig_mod`` is the module given, and which puts ``_orig_mod`` into the names of everything below it."""
    lin = torch.nn.Linear(2, 2)
    seq = torch.nn.Sequential(torch.compile(lin, backend="eager"))
    assert _compat.compiled_original(seq[0]) is lin and _compat.compiled_original(lin) is None
    assert "0._orig_mod" in dict(seq.named_modules()) and "0._orig_mod.weight" in dict(seq.named_parameters())
    assert named_modules(seq) == {"": seq, "0": lin}
    assert unwrap_model(torch.compile(seq, backend="eager")) is seq
    assert layer_name("net._orig_mod.0") == "net.0" and layer_name("_orig_mod.net._orig_mod.0") == "net.0"


def test_tensor_version_moves_with_every_in_place_edit_and_only_then():
    """The contract (``tensor_version``, for ``record/weight_watch.py``): in-place operations move ``_version``;
    reading the tensor or using it out of place does not."""
    w = torch.nn.Linear(3, 2).weight
    v = _compat.tensor_version(w)
    _ = (w * 2).sum(), w.detach().clone()
    assert _compat.tensor_version(w) == v
    with torch.no_grad():
        w.mul_(1.0)
    assert _compat.tensor_version(w) == v + 1
    with torch.no_grad():
        w[0].copy_(w[0])  # a view's edit is the base's
    assert _compat.tensor_version(w) == v + 2


def test_lightning_keeps_the_original_methods_of_a_module_it_compiles_in_its_compiler_ctx():
    """The contract (``lightning_compiled_methods``, for ``_unwrap.uncompiled``): ``trainer.fit(torch.compile(m))``
    makes ``m`` compiled methods on the instance (``from_compiled``) and keeps the originals in ``_compiler_ctx``."""
    from lightning.pytorch.utilities.compile import from_compiled

    from lightning_dualform._unwrap import uncompiled

    model = MLP()
    plain_forward = model.forward
    compiled = from_compiled(torch.compile(model, backend="eager"))
    assert compiled is model and model.forward != plain_forward
    originals = _compat.lightning_compiled_methods(model)
    assert originals["forward"] == plain_forward and set(originals) >= {"forward", "training_step"}
    patched = vars(model)["forward"]
    with uncompiled(model) as eager:
        assert eager is model and model.forward == plain_forward
    assert vars(model)["forward"] is patched  # (put back)
    assert _compat.lightning_compiled_methods(torch.nn.Linear(2, 2)) == {}
