"""``AttendRequest``: every knob of an attend pass, one default each, checked once, and every caller builds it."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from helpers import small_sgd_store
from lightning_dualform import AttendRequest, DualInference
from lightning_dualform.analysis import attend_queries, attend_recorded
from lightning_dualform.attend.request import FIELDS
from lightning_dualform.cli.attend import attend_run
from lightning_dualform.cli.usage import TERMINAL_TOP_K
from lightning_dualform.cli.main import build_parser


def test_no_caller_declares_another_default() -> None:
    """Every public entry point that takes a knob defaults it to the request's (attend_run: None, i.e. the
    request's; its top_k is the terminal's, said so), and the command line's flags do too."""
    defaults = AttendRequest()
    for fn in (DualInference.attend, DualInference.explain, attend_queries, attend_recorded):
        params = inspect.signature(fn).parameters
        for name in FIELDS:
            if name in params:
                assert params[name].default == getattr(defaults, name), (fn.__qualname__, name)
    params = inspect.signature(attend_run).parameters
    assert params["top_k"].default == TERMINAL_TOP_K
    assert all(params[n].default is None for n in ("contribution_to", "at_step", "step_buckets", "score"))
    args = build_parser().parse_args(["attend", "store.h5"])
    assert (args.top_k, args.step_buckets, args.score, args.contribution_to, args.at_step) == (
        TERMINAL_TOP_K, defaults.step_buckets, defaults.score, defaults.contribution_to, defaults.at_step)


@pytest.mark.parametrize("knobs,err", [
    ({"top_k": -1}, ValueError), ({"top_k": 2.0}, TypeError), ({"top_k": True}, TypeError),
    ({"at_step": "3"}, TypeError), ({"step_buckets": 0}, ValueError), ({"scan": "fp8"}, ValueError),
    ({"score": "best"}, ValueError), ({"contribution_to": "logit"}, ValueError), ({"contribution_to": 1.0}, TypeError),
    ({"contribution_to": True}, TypeError), ({"contribution_to": -1}, ValueError),
    ({"contribution_to": torch.zeros(2, 2, dtype=torch.long)}, ValueError),
    ({"contribution_to": torch.zeros(3)}, ValueError), ({"per_example": 1}, TypeError), ({"mass": "yes"}, TypeError),
])
def test_bad_knobs_are_refused_where_the_request_is_made(knobs, err) -> None:
    with pytest.raises(err, match=next(iter(knobs))):
        AttendRequest(**knobs)
    with pytest.raises(err, match=r"`attend\(" + next(iter(knobs))):
        AttendRequest.checked("attend", **knobs)
    with pytest.raises(TypeError, match="knobs of a pass"):
        AttendRequest.checked("attend", topk=3)


def test_a_request_normalises_and_resolves() -> None:
    req = AttendRequest(top_k=np.int64(3), at_step=np.int32(5), contribution_to=[2, 0], per_example=np.bool_(False))
    assert (type(req.top_k), type(req.at_step), req.per_example) == (int, int, False)
    assert req.contribution_to.dtype == torch.int64 and req.contribution_to.tolist() == [2, 0]
    auto = AttendRequest()
    assert auto.resolved(element_wise=False, output_layer=True).contribution_to == "pred"
    assert auto.resolved(element_wise=False, output_layer=False).contribution_to is None
    assert auto.resolved(element_wise=True, output_layer=False).contribution_to == "pred"
    assert auto.resolved(element_wise=True, output_layer=False).score == "unit"
    assert auto.resolved(element_wise=False, output_layer=True).score == "raw"
    assert AttendRequest(contribution_to=4).resolved(element_wise=False, output_layer=False).contribution_to == 4
    with pytest.raises(ValueError, match="step_buckets"):
        auto.replace(step_buckets=0)
    assert auto.replace(top_k=3).top_k == 3 and auto.top_k == 10
    assert req.to_dict()["contribution_to"] == [2, 0]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return small_sgd_store(str(tmp_path_factory.mktemp("request") / "s.h5"))


def test_a_prepared_request_answers_as_the_keywords(store) -> None:
    q = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    req = AttendRequest(top_k=3, step_buckets=4, contribution_to=1, at_step=6)
    with DualInference(store, device="cpu") as di:
        by_keywords = di.attend("net.2", q, top_k=3, step_buckets=4, contribution_to=1, at_step=6).to_dict()
        by_request = di.attend("net.2", q, request=req).to_dict()
        assert by_request == by_keywords
        with pytest.raises(TypeError, match="not both"):
            di.attend("net.2", q, top_k=4, request=req)
        with pytest.raises(TypeError, match="AttendRequest"):
            di.attend("net.2", q, request={"top_k": 3})
        # the output layer's "auto" is its predicted unit; a hidden layer of an SGD store has none
        assert torch.equal(di.attend("net.2", q).units, di.attend("net.2", q, contribution_to="pred").units)
        assert di.attend("net.0", torch.randn(2, 6)).units is None
