"""``AttendRequest``: every knob of an ``attend`` pass, with its one default, checked once.

The twin of :class:`~lightning_dualform.record.options.RecordOptions`. ``DualInference.attend`` and ``explain``
(:mod:`lightning_dualform.attend.inference`), :func:`~lightning_dualform.analysis.attend_queries`,
:func:`~lightning_dualform.analysis.attend_recorded`, the CLI's ``attend`` and the viewer all build one, so a knob
means the same and defaults to the same everywhere. A caller that wants another value passes it, and says why
(the CLI's ``--top-k`` is shorter, to fit a terminal).

What a knob's ``"auto"`` becomes depends on the store and the layer; :meth:`AttendRequest.resolved` makes it
concrete, and the pass that answers refuses what it cannot do (``scan="bf16"`` on an element-wise rule's store).

The module imports neither numpy nor torch until a request is made: the command line's parser shows these
defaults without loading them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union, get_args

if TYPE_CHECKING:
    import numpy as np
    import torch

Scan = Literal["exact", "bf16"]
Score = Literal["auto", "raw", "unit"]
#: ``contribution_to``: ``"auto"``, ``"pred"``, ``None``, an output unit, or one unit per query ``(n,)``
Contribution = Union[Literal["auto", "pred"], None, int, "torch.Tensor", "np.ndarray"]
SCANS: tuple[str, ...] = get_args(Scan)
#: ``score=``: what ``top``, ``top_examples`` and ``mass`` rank and sum. ``"raw"``: the paper's similarity
#: ``k . q``; ``"unit"``: the attention weight of the row for the query's output unit ``u``,
#: ``-(Q_s[u, :] (.) k) . q`` (``-c_s (k . q)`` for SGD's scalar ``Q_s = c_s``); ``"auto"``: ``"unit"`` for a store
#: of an element-wise rule (Adam, AdamW, ...), ``"raw"`` otherwise.
SCORES: tuple[str, ...] = get_args(Score)
#: step buckets allowed beyond one per step (the mass tables are ``n x step_buckets``)
MAX_STEP_BUCKETS = 1024
_CONTRIBUTION = "None, 'auto', 'pred', an int unit or a (n,) integer tensor of units"


@dataclass(frozen=True, eq=False)
class AttendRequest:
    """What one ``attend`` pass computes. Build it with keywords; every field is checked when it is made.

    Attributes:
        top_k: rows (and examples) kept per query; 0 for none.
        at_step: rebuild the model as it was after this many optimizer steps (``None``: the end).
        contribution_to: rank proponents and opponents by their contribution to an output unit: ``"pred"`` (the
            argmax of the layer's output, e.g. a classifier's predicted logit), an ``int`` unit for every query,
            or a ``(n,)`` integer tensor of units; ``None`` skips them (with ``score="unit"``, which needs a unit:
            ``"pred"`` on a scalar rule's store, a ``ValueError`` on an element-wise one). ``"auto"`` (default):
            ``"pred"`` at the output layer (the store's last tracked layer, whose output is normally the model's; in
            :meth:`~lightning_dualform.attend.inference.DualInference.explain`, the model's own prediction) and at
            every layer of an element-wise rule's store (a row's attention weight there depends on the unit);
            ``None`` at a hidden layer of a scalar rule's store (the argmax of hidden units explains little:
            name the unit you want, ``docs/inference.md``).
        per_example: also sum scores (and contributions) per training example: ``n x n_examples`` numbers
            (twice with contributions).
        mass: the attention mass per label, epoch and step bucket.
        step_buckets: equal-width step buckets of the mass (default 20: the viewer's and the plots' spotlights).
        scan: ``"exact"``, or ``"bf16"``: scores in bfloat16 for ranking, every row near the running k-th best
            re-scored exactly, so ``top`` is the exact top-k (``docs/inference.md``); scalar rules only.
        reuse_certificate: at the end of a finished store, take ``dual``'s memory part from the sums (or the
            replayed weights) the certificate kept for exactly these rows instead of summing the rows again (an
            element-wise layer whose certificate kept none is replayed once per session); False: every time.
        score: what ``top``, ``top_examples`` and ``mass`` rank: ``"raw"`` (``k . q``), ``"unit"`` (each row's
            attention weight for the query's unit, ``-(Q_s[u, :] (.) k) . q``; needs a unit), or ``"auto"``
            (``"unit"`` on an element-wise rule's store, ``"raw"`` otherwise).

    Raises:
        TypeError: an integer knob given as a bool, float or string; a flag that is not a bool.
        ValueError: a value out of range or not among the allowed ones.

    Example::

        req = AttendRequest(top_k=5, contribution_to="pred", step_buckets=10)
        res = di.attend("net.4", queries, request=req)
        res2 = di.attend("net.4", queries, request=req.replace(at_step=100))
    """

    top_k: int = 10
    at_step: int | None = None
    contribution_to: Contribution = "auto"
    per_example: bool = True
    mass: bool = True
    step_buckets: int = 20
    scan: Scan = "exact"
    reuse_certificate: bool = True
    score: Score = "auto"

    def __post_init__(self) -> None:
        knobs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in _checked("AttendRequest", **knobs).items():
            object.__setattr__(self, name, value)  # normalised (numpy integers to int, units to an int64 tensor)

    @classmethod
    def checked(cls, owner: str, **knobs: Any) -> "AttendRequest":
        """Build a request from ``knobs``, refusing a bad value with a message that quotes ``owner(knob=...)``
        (``owner``: how the user called, e.g. ``"attend"``)."""
        unknown = sorted(set(knobs) - set(FIELDS))
        if unknown:
            raise TypeError(
                f"`{owner}()` got an unexpected argument {unknown[0]!r}; the knobs of a pass are {', '.join(FIELDS)}.")
        return cls(**_checked(owner, **knobs))

    def replace(self, **changes: Any) -> "AttendRequest":
        """A copy with ``changes`` (checked as the constructor checks them)."""
        return dataclasses.replace(self, **changes)

    def resolved(self, *, element_wise: bool, output_layer: bool) -> "AttendRequest":
        """The request with its ``"auto"`` knobs made concrete for one layer.

        Args:
            element_wise: the store's rule is element-wise (``StoreReader.form == "element-wise"``).
            output_layer: the layer is the store's last tracked layer (its output is normally the model's).
        """
        score = self.score if self.score != "auto" else ("unit" if element_wise else "raw")
        contribution = self.contribution_to
        if isinstance(contribution, str) and contribution == "auto":
            contribution = "pred" if (element_wise or output_layer) else None
        return self.replace(score=score, contribution_to=contribution)

    def to_dict(self) -> dict[str, Any]:
        """The knobs as plain values (a tensor of units as a list), for JSON."""
        out = {f: getattr(self, f) for f in FIELDS}
        if hasattr(out["contribution_to"], "tolist"):  # a tensor of units
            out["contribution_to"] = out["contribution_to"].tolist()
        return out


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(AttendRequest))


def request_from(owner: str, request: AttendRequest | None, knobs: dict[str, Any]) -> AttendRequest:
    """The request of a call that takes the knobs as keywords (``knobs``) or a prepared ``request``; with a
    request the keywords must keep their defaults: a knob given both ways is refused, not silently overridden.

    Raises:
        TypeError: ``request`` is not an :class:`AttendRequest`, or a knob was given both ways.
    """
    if request is None:
        return AttendRequest.checked(owner, **knobs)
    if not isinstance(request, AttendRequest):
        raise TypeError(f"`{owner}(request={request!r})` must be an AttendRequest (or leave it out and pass keywords).")
    given = [k for k, v in knobs.items() if not _is_default(k, v)]
    if given:
        raise TypeError(
            f"`{owner}(request=..., {given[0]}=...)`: give the knobs in the request or as keywords, not both; "
            f"use request.replace({given[0]}=...)."
        )
    return request


def _is_default(name: str, value: Any) -> bool:
    default = getattr(AttendRequest, name, _MISSING)
    return type(value) is type(default) and value == default  # (a tensor's type is never a default's)


_MISSING = object()


def _checked(owner: str, **knobs: Any) -> dict[str, Any]:
    """The knobs checked and normalised (numpy integers to ``int``); errors quote ``owner(knob=...)``."""
    import numpy as np

    from lightning_dualform._args import as_int

    out = dict(knobs)
    if "top_k" in out:
        out["top_k"] = as_int(out["top_k"], f"{owner}(top_k=...)", lo=0, allowed="a non-negative integer")
    if out.get("at_step") is not None:
        out["at_step"] = as_int(out["at_step"], f"{owner}(at_step=...)", allowed="None or an integer optimizer step")
    if "step_buckets" in out:
        out["step_buckets"] = as_int(out["step_buckets"], f"{owner}(step_buckets=...)", lo=1,
                                     allowed="a positive integer")
    for flag in ("per_example", "mass", "reuse_certificate"):
        if flag in out:
            if not isinstance(out[flag], (bool, np.bool_)):
                raise TypeError(f"`{owner}({flag}={out[flag]!r})` must be True or False.")
            out[flag] = bool(out[flag])
    if "scan" in out and out["scan"] not in SCANS:
        raise ValueError(f"`{owner}(scan={out['scan']!r})` is not supported. Expected one of {SCANS}.")
    if "score" in out and out["score"] not in SCORES:
        raise ValueError(f"`{owner}(score={out['score']!r})` is not supported. Expected one of {SCORES}.")
    if "contribution_to" in out:
        out["contribution_to"] = _contribution(out["contribution_to"], owner)
    return out


def _contribution(value: Any, owner: str) -> Any:
    """``contribution_to`` checked as far as it can be without the queries and the layer (their number and the
    layer's width are checked by the pass): a name, a unit, or a 1-d integer tensor."""
    import numpy as np
    import torch

    from lightning_dualform._args import as_int

    call = f"{owner}(contribution_to=...)"
    if value is None:
        return None
    if isinstance(value, str):
        if value not in ("auto", "pred"):
            raise ValueError(f"`{owner}(contribution_to={value!r})`: expected {_CONTRIBUTION}.")
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{call}` must not be a bool; expected {_CONTRIBUTION}.")
    if isinstance(value, (float, np.floating)):
        raise TypeError(f"`{owner}(contribution_to={value!r})`: a unit number must be an integer, not a float.")
    if isinstance(value, (int, np.integer)) or (
        isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()
    ):
        unit = as_int(value, call, allowed=_CONTRIBUTION)
        if unit < 0:
            raise ValueError(f"`{call}`: output units are numbered from 0; got {unit}.")
        return unit
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        units = torch.as_tensor(value)
        if units.is_floating_point() or units.is_complex() or units.dtype == torch.bool or units.dim() != 1:
            raise ValueError(
                f"`{call}` as a tensor must be a 1-d integer tensor, one unit per query; got {tuple(units.shape)} "
                f"{units.dtype}."
            )
        return units.to(torch.int64).clone()  # the request's own copy: a frozen request of a user's tensor
    raise TypeError(f"`{owner}(contribution_to={value!r})`: expected {_CONTRIBUTION}.")
