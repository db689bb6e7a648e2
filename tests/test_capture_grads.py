"""What counts as a layer's gradient: the output gradients of backward passes that reach its parameters' .grad.

A backward that accumulates no .grad (``torch.autograd.grad``, say an input saliency logged beside the loss) adds no
values; a parameter frozen for some steps gets no rows for them; an input from outside autograd (a learned
parameter fed straight in, a buffer reused between micro-batches) is stored as the layer saw it, not as the optimizer
step left it. Each run is exact, checked against its real trained weights, and fails without its fix.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from helpers import TRAINER_KW, IndexedDataset
from lightning_dualform import DualFormCallback, StoreReader


def _fit(tmp_path, model, steps=6, batch=8, **cb):
    cb = DualFormCallback(tmp_path / "s.h5", **cb)
    trainer = L.Trainer(max_steps=steps, callbacks=[cb], **TRAINER_KW)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=steps * batch), batch_size=batch))
    return cb


def _exact(cb):
    bad = {n: c for n, c in cb.certificate.items() if not (c["exact"] and c["rel_err"] < 1e-5)}
    assert not bad, bad


class _Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x / 10.0), y)


def test_a_backward_that_fills_no_grad_adds_no_values(tmp_path):
    class Saliency(_Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            x = (x / 10.0).requires_grad_(True)
            loss = nn.functional.cross_entropy(self.net(x), y)
            (sal,) = torch.autograd.grad(loss, x, retain_graph=True)  # logged only: no .grad changes
            self.log("saliency", sal.abs().mean())
            return loss

    _exact(_fit(tmp_path, Saliency()))


@pytest.mark.parametrize("bias_too", [True, False], ids=["layer frozen", "weight frozen, bias trained"])
def test_steps_a_parameter_sits_out_leave_the_certificate_exact(tmp_path, bias_too):
    class Freezing(_Net):
        def on_train_batch_start(self, batch, batch_idx):
            frozen = 2 <= self.trainer.global_step < 4
            self.net[2].weight.requires_grad_(not frozen)
            self.net[2].bias.requires_grad_(not (frozen and bias_too))

    cb = _fit(tmp_path, Freezing())
    _exact(cb)
    with StoreReader(cb.store_path) as s:  # the steps it sat out whole hold none of its rows
        assert s.layer("net.2").n_rows == (6 - 2 if bias_too else 6) * 8


def test_an_input_from_outside_autograd_is_stored_as_the_layer_saw_it(tmp_path):
    class LearnedQueries(_Net):
        def __init__(self):
            super().__init__()
            self.queries = nn.Parameter(torch.randn(4, 6))  # fed straight into a layer: the step changes it in place
            self.read = nn.Linear(6, 8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            h = self.net(x / 10.0) + self.read(self.queries).mean(0)[:3]
            return nn.functional.cross_entropy(h, y)

    _exact(_fit(tmp_path, LearnedQueries()))
