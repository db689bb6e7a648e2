"""What ``tests/test_answer_checks.py`` and ``benchmarks/reliability.py --parts answers`` share: small stores of
element-wise rules (AdamW, Adagrad, Adafactor on an MLP 6-8-3; AdamW on a convolution), edits of everything a
replay reads (the optimizer state and its attributes, the per-step tables, the layer attributes and a
convolution's geometry, the certificate's own attributes and checksums) made with h5py (so every HDF5 checksum
stays valid), and the classification of what the library then does with each.

An outcome is ``refused`` (``StoreError`` on open or on the first answer), ``correct`` (every answer's ``dual``
and unit outputs equal the trained model's output, computed by torch from the final weights the run handed the
store, within the store's tolerance), ``warned`` (an answer is off and a ``RuntimeWarning`` said so, and no answer
claimed to be within tolerance while off) or ``silent`` (an answer is off and nothing said so: the failure class
of issue 21). Anything else raised is ``other`` (a bug).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from typing import Any, Callable

import h5py
import numpy as np
import torch
from torch import nn

STEPS = 4
BATCH = 8
#: the stores: name -> (model maker, optimizer maker)
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-1),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
    "conv-adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}
KINDS = tuple(OPTIMIZERS)
#: the other element-wise rules, on the MLP (``tests/test_answer_checks.py`` checks each once)
MORE_OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
}


class ConvNet(nn.Module):
    """A convolution (zeros padding 1, stride 1: the output keeps the input's size) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind.startswith("conv"):
        return ConvNet()
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 2, 5, 5) if kind.startswith("conv") else (n, 6)
    return torch.randn(*shape, generator=g)


def build_store(kind: str, path: str) -> dict[str, Any]:
    """Train ``kind``'s model for :data:`STEPS` steps into a store at ``path`` (full certificate) and return
    the trained model's layers' real outputs for fixed queries: ``{"path", "queries": {layer: (n, d_in)},
    "real": {layer: (n, d_out)}}`` (the layers' torch forward, float64, with the weights training ended with)."""
    from lightning_dualform import DualFormRecorder

    model = _model(kind)
    opt = {**OPTIMIZERS, **MORE_OPTIMIZERS}[kind](model.parameters())
    x = _inputs(kind, STEPS * BATCH, 1)
    y = torch.arange(STEPS * BATCH) % 3
    with DualFormRecorder(path, model, opt, certify="full") as rec:
        for s in range(STEPS):
            sl = slice(s * BATCH, (s + 1) * BATCH)
            rec.batch(indices=torch.arange(sl.start, sl.stop), labels=y[sl])
            nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
            opt.step()
            opt.zero_grad()
    queries, real = {}, {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for name, m in layers.items():
        if isinstance(m, nn.Conv2d):  # the layer's key rows: unfolded input patches of fresh maps
            maps = _inputs(kind, 2, 7).double()
            cols = nn.functional.unfold(nn.functional.pad(maps, (1, 1, 1, 1)), 3)  # (n, C*9, L)
            q = cols.transpose(1, 2).reshape(-1, cols.shape[1])[:6]
            w = m.weight.detach().double().reshape(m.out_channels, -1)
            out = nn.functional.conv2d(maps, m.weight.detach().double(), m.bias.detach().double(), padding=1)
            out = out.flatten(2).transpose(1, 2).reshape(-1, m.out_channels)[:6]  # the real layer, per location
            assert torch.allclose(out, q @ w.t() + m.bias.detach().double())
        else:
            q = torch.randn(6, m.in_features, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
            with torch.no_grad():
                out = nn.functional.linear(q, m.weight.double(), m.bias.double())
        queries[name], real[name] = q, out
    return {"path": path, "queries": queries, "real": real, "kind": kind}


# ------------------------------------------------------------------------------------------------------
# mutations: each edits one thing with h5py and returns what it did
# ------------------------------------------------------------------------------------------------------
def _datasets(g: h5py.Group) -> list[str]:
    out: list[str] = []
    g.visititems(lambda n, o: out.append(n) if isinstance(o, h5py.Dataset) else None)
    return sorted(out)


def _layers(f: h5py.File) -> list[str]:
    return sorted(f["layers"])


def _rewrite(ds: h5py.Dataset, data: np.ndarray) -> None:
    ds[...] = data.astype(ds.dtype)


def mut_state_values(f: h5py.File, rng: random.Random) -> str:
    """An entry of the optimizer state before the first step: filled, scaled, one element or negated."""
    layer = rng.choice(_layers(f))
    sg = f["layers"][layer].get("state")
    names = _datasets(sg)
    name = rng.choice(names)
    ds = sg[name]
    data = np.asarray(ds[()], dtype=np.float64)
    how = rng.choice(["-1", "1e30", "scale", "one", "negate", "zero"])
    if how == "-1":
        data[...] = -1.0
    elif how == "1e30":
        data[...] = 1e30
    elif how == "scale":
        data = data * rng.choice([0.5, 2.0, 10.0]) + 1e-3
    elif how == "one":
        data.reshape(-1)[rng.randrange(data.size)] += rng.choice([1.0, -1.0, 0.1])
    elif how == "negate":
        data = -data - 1e-3
    else:
        data[...] = 0.0 if np.any(data) else 1.0
    _rewrite(ds, data)
    return f"{layer}/state/{name} {how}"


def mut_state_attr(f: h5py.File, rng: random.Random) -> str:
    """A scalar of the optimizer state (the step count, ...)."""
    layer = rng.choice(_layers(f))
    sg = f["layers"][layer]["state"]
    groups = [sg[p] for p in sg if len(sg[p].attrs)]
    if not groups:
        return mut_state_values(f, rng)
    pg = rng.choice(groups)
    key = rng.choice(sorted(pg.attrs))
    value = rng.choice([3.0, 1e6, 0.0, 1.0, 2.0, float(pg.attrs[key]) + 1])
    pg.attrs[key] = np.float64(value)
    return f"{layer}/{pg.name.split('/')[-1]}@{key} = {value}"


def mut_table(f: h5py.File, rng: random.Random) -> str:
    """A per-step table entry (the learning rate, a beta, eps, weight decay, ...), or the gradient scale."""
    layer = rng.choice(_layers(f))
    ug = f["layers"][layer]["updates"]
    if rng.random() < 0.15:
        ds, name = ug["grad_scale"], "grad_scale"
    else:
        p = rng.choice([k for k in ug if isinstance(ug[k], h5py.Group)])
        cols = [c for c in ug[p] if ug[p][c].dtype.kind == "f"]
        name = f"{p}/{rng.choice(cols)}"
        ds = ug[name]
    data = np.asarray(ds[()], dtype=np.float64)
    i = rng.randrange(len(data))
    data[i] = data[i] * rng.choice([0.5, 1.01, 2.0]) + rng.choice([0.0, 1e-3])
    _rewrite(ds, data)
    return f"{layer}/updates/{name}[{i}]"


def mut_layer_attr(f: h5py.File, rng: random.Random) -> str:
    """A layer attribute the rebuild or the unfold reads: a convolution's padding mode, padding, stride and
    dilation; any layer's parameter dtype, order, exactness."""
    layer = rng.choice(_layers(f))
    g = f["layers"][layer]
    if "padding_mode" in g.attrs and rng.random() < 0.7:
        key = rng.choice(["padding_mode", "padding", "stride", "dilation"])
        if key == "padding_mode":
            value: Any = rng.choice(["reflect", "replicate", "circular"])
        else:  # JSON lists of ints
            cur = json.loads(g.attrs[key])
            i = rng.randrange(len(cur))
            new = list(cur)
            new[i] = max(0 if key == "padding" else 1, new[i] + rng.choice([1, -1]))
            if key == "padding" and rng.random() < 0.5:  # one side's padding moved to the other: same output size
                j = i ^ 1
                new = list(cur)
                new[i], new[j] = cur[i] + 1, max(0, cur[j] - 1)
            value = json.dumps(new)
        g.attrs[key] = value
        return f"{layer}@{key} = {value!r}"
    key = rng.choice([k for k in ("param_dtype", "order", "has_bias", "kind") if k in g.attrs])
    value = {"param_dtype": "float64", "order": int(g.attrs["order"]) + 1, "has_bias": False, "kind": "linear"}[key]
    g.attrs[key] = value
    return f"{layer}@{key} = {value!r}"


def mut_initial(f: h5py.File, rng: random.Random) -> str:
    """The initial weight or bias a replay starts from."""
    layer = rng.choice(_layers(f))
    g = f["layers"][layer]
    name = rng.choice([n for n in ("weight_init", "bias_init") if n in g])
    data = np.asarray(g[name][()], dtype=np.float64)
    data.reshape(-1)[rng.randrange(data.size)] += rng.choice([0.5, -0.5])
    _rewrite(g[name], data)
    return f"{layer}/{name}"


def mut_certificate(f: h5py.File, rng: random.Random) -> str:
    """The certificate's own attributes: a checksum deleted or changed, the verdict edited, or the format
    version lowered with every checksum deleted (an older store, as far as the reader can tell)."""
    layer = rng.choice(_layers(f))
    g = f["layers"][layer]
    crcs = [k for k in g.attrs if k.startswith("certificate_") and k.endswith("crc32")]
    how = rng.choice(["delete", "delete", "change", "verdict", "downgrade", "downgrade"])
    if how == "delete":
        key = rng.choice(crcs)
        del g.attrs[key]
        return f"{layer}: deleted {key}"
    if how == "change":
        key = rng.choice(crcs)
        g.attrs[key] = np.int64((int(g.attrs[key]) + 1) % 2**32)
        return f"{layer}: changed {key}"
    if how == "verdict":
        g.attrs["certificate_rel_err"] = 0.0
        g.attrs["certificate_exact"] = True
        return f"{layer}: verdict set to exact"
    f.attrs["format_version"] = 3
    for name in _layers(f):
        for key in [k for k in f["layers"][name].attrs if k.startswith("certificate_") and k.endswith("crc32")]:
            del f["layers"][name].attrs[key]
    return "format_version 3, every checksum deleted"


def downgraded(f: h5py.File) -> None:
    """Make a store read as one of format 3 without checksums (what an older writer left)."""
    f.attrs["format_version"] = 3
    for name in _layers(f):
        for key in [k for k in f["layers"][name].attrs if k.startswith("certificate_") and k.endswith("crc32")]:
            del f["layers"][name].attrs[key]


MUTATORS: dict[str, Callable[[h5py.File, random.Random], str]] = {
    "state": mut_state_values,
    "state-attr": mut_state_attr,
    "table": mut_table,
    "layer-attr": mut_layer_attr,
    "initial": mut_initial,
    "certificate": mut_certificate,
}


def mutate(valid: str, target: str, seed: int, *, old_format: bool = False) -> tuple[str, str]:
    """A copy of ``valid`` at ``target`` with mutation ``seed`` applied (the kind cycles over :data:`MUTATORS`);
    ``old_format``: the copy also reads as a format-3 store without checksums, so that only the answer checks
    stand between the edit and the user. Returns ``(kind, what was done)``."""
    shutil.copyfile(valid, target)
    rng = random.Random(seed)
    kind = list(MUTATORS)[seed % len(MUTATORS)]
    with h5py.File(target, "r+") as f:
        what = MUTATORS[kind](f, rng)
        if old_format:
            downgraded(f)
            what += " (format 3, no checksums)"
    return kind, what


# ------------------------------------------------------------------------------------------------------
# what the library answers, against the real model
# ------------------------------------------------------------------------------------------------------
#: the requests every layer is asked: each score, with and without unit outputs, the certificate reused or not
REQUESTS = (
    {"score": "unit", "contribution_to": "pred"},
    {"score": "raw", "contribution_to": "pred"},
    {"score": "raw", "contribution_to": None},
    {"score": "unit", "contribution_to": "pred", "reuse_certificate": False},
    {"score": "raw", "contribution_to": None, "reuse_certificate": False},
)


#: what a library warning says of a store whose answer is not the model's (a numpy warning says none of it)
SAYS_WRONG = ("differs from the stored final weights", "damaged", "does not rebuild")


def classify(path: str, ref: dict[str, Any]) -> dict[str, Any]:
    """One store's outcome (module docstring) over every layer and every request of :data:`REQUESTS`."""
    from lightning_dualform import DualInference, StoreError
    from lightning_dualform.store.certificate import store_tolerance

    off: list[str] = []
    claims: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with DualInference(path, device="cpu", accumulate=torch.float64) as di:
                tol = store_tolerance(di.store)
                for name in di.layers:
                    q, real = ref["queries"][name], ref["real"][name]
                    for req in REQUESTS:
                        res = di.attend(name, q, top_k=2, **req)
                        bad = _off(res, real, tol)
                        if bad:
                            off.append(f"{name} {req}: {bad}")
                            if res.within_tolerance:
                                claims.append(f"{name} {req}: within_tolerance=True but {bad}")
        except StoreError as err:
            return {"outcome": "refused", "detail": str(err)[:300]}
        except Exception as err:  # noqa: BLE001 - the finding
            return {"outcome": "other", "detail": f"{type(err).__name__}: {str(err)[:300]}"}
    said = [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and any(word in str(w.message) for word in SAYS_WRONG)]
    if not off:
        return {"outcome": "correct"}
    if said and not claims:
        return {"outcome": "warned", "detail": off[0][:300], "said": said[0]}
    return {"outcome": "silent", "detail": "; ".join(claims or off)[:300]}


def _off(res: Any, real: torch.Tensor, tol: float) -> str:
    """How an answer's rebuilt outputs differ from the real model's beyond ``tol`` ("" when they do not)."""
    from lightning_dualform.attend.results import overall_rel_err

    parts = []
    err = overall_rel_err(res.dual, real)
    if not err <= tol:
        parts.append(f"dual {err:.1e}")
    if res.unit_output is not None:
        want = real.gather(1, res.units.long()[:, None]).squeeze(1)
        e = float(torch.linalg.norm(res.unit_output.double() - want)) / float(torch.linalg.norm(real))
        if not e <= tol:
            parts.append(f"unit outputs {e:.1e}")
    return ", ".join(parts)


def build_all(root: str) -> dict[str, dict[str, Any]]:
    """:func:`build_store` of every kind under ``root``."""
    os.makedirs(root, exist_ok=True)
    return {k: build_store(k, os.path.join(root, f"{k}.h5")) for k in KINDS}
