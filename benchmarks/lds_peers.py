"""The peers of ``benchmarks/lds.py``, each behind one function that returns ``(name, table, extra training
seconds)`` with ``table`` ``(n_test, n_train)`` signed like ours (positive: the example raises the query's margin).

They import only where installed (a venv of your own: ``pip install captum kronfluence dattri``); none is a
dependency of the project. Each uses the same margin as the benchmark's measurement where its API allows.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y.reshape(-1, 1)).squeeze(1)
    others = logits.scatter(1, y.reshape(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def captum_tracincp(*, base, ckpts, xtr, ytr, xte, yte, args, work, make_model, t_ckpt, lr, **_: Any):
    """captum's ``TracInCP`` over the per-epoch checkpoints (every layer's parameters), test function ``-margin``."""
    from captum.influence import TracInCP

    paths = []
    for e, sd in enumerate(ckpts):
        path = os.path.join(work, f"ckpt{e}.pt")
        torch.save(sd, path)
        paths.append(path)

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, weights_only=True))
        return lr

    model = make_model(0)
    ds = torch.utils.data.TensorDataset(xtr, ytr)
    tracin = TracInCP(model, ds, paths, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="none"),
                      batch_size=64, test_loss_fn=lambda out, y: -_margin(out, y), sample_wise_grads_per_batch=False)
    scores = tracin.influence((xte, yte), show_progress=False)
    return "captum TracInCP (per-epoch checkpoints)", scores.detach().double().numpy(), t_ckpt


def kronfluence_ekfac(*, base, xtr, ytr, xte, yte, work, **_: Any):
    """kronfluence's EK-FAC influence of the final model, measurement ``-margin`` (its convention: positive helps)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classify(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if not sample:
                return F.cross_entropy(logits, y, reduction="sum")
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, sampled, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -_margin(model(x), y).sum()

    model = prepare_model(base, Classify())
    analyzer = Analyzer("lds", model, Classify(), cpu=True, disable_tqdm=True, output_dir=os.path.join(work, "kron"))
    train = torch.utils.data.TensorDataset(xtr, ytr)
    test = torch.utils.data.TensorDataset(xte, yte)
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac"),
                             overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("s", "ekfac", test, train, per_device_query_batch_size=len(test),
                                     per_device_train_batch_size=256, score_args=ScoreArguments(),
                                     overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("s")["all_modules"]
    return "kronfluence EK-FAC", scores.double().numpy(), 0.0


def dattri_trak(*, base, xtr, ytr, xte, yte, **_: Any):
    """dattri's TRAK on the final model (one model, projection 512), output function the margin."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = base

    def loss_func(params, data):
        x, y = data
        return F.cross_entropy(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    def target_func(params, data):
        x, y = data
        return _margin(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0)).squeeze(0)

    def correct_prob(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.softmax(logits, -1)[0, y]

    task = AttributionTask(loss_func=target_func, model=model, checkpoints=model.state_dict())
    attributor = TRAKAttributor(task=task, correct_probability_func=correct_prob, device="cpu",
                                projector_kwargs={"proj_dim": 512, "device": "cpu"})
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xtr, ytr), batch_size=64)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xte, yte), batch_size=64)
    attributor.cache(train)
    scores = attributor.attribute(test)  # (n_train, n_test)
    s = scores.detach().double().numpy()
    return "dattri TRAK (1 model, proj 512)", (s.T if s.shape[0] == len(xtr) else s), 0.0
