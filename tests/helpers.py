"""Shared test helpers: small models and the dual-form output computed from the raw HDF5 file."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import torch
from torch import nn

from lightning_dualform.optim import PARAM_COLUMNS, coefficients_with_buffer, plain_sgd_coefficients

TRAINER_KW = dict(logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)


class IndexedDataset(torch.utils.data.Dataset):
    """Inputs encode their own index in feature 0, so a stored key names the example it came from."""

    def __init__(self, n: int = 96, d: int = 6, classes: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, generator=g)
        self.x[:, 0] = torch.arange(n, dtype=torch.float32)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class MLP(L.LightningModule):
    """A small classifier whose optimizer is set by a factory, so each test picks its update rule."""

    def __init__(
        self, d: int = 6, hidden: int = 8, classes: int = 3, opt_factory=None, sched_factory=None, bias: bool = True
    ):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, classes, bias=bias))
        self.opt_factory = opt_factory or (lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
        self.sched_factory = sched_factory

    def forward(self, x):
        return self.net(x / 10.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = self.opt_factory(self)
        if self.sched_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched_factory(opt), "interval": "step"}}


def loader(ds, batch_size: int = 16, shuffle: bool = True, **kw):
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, **kw)


def small_sgd_store(path: str) -> str:
    """A finished store of ``MLP()`` trained 2 epochs on 64 examples in batches of 16 (seed 0): the small SGD store
    of the tests that need any store at all."""
    from lightning_dualform import DualFormCallback

    torch.manual_seed(0)
    L.Trainer(max_epochs=2, callbacks=[DualFormCallback(path)], accelerator="cpu", **TRAINER_KW).fit(
        MLP(), loader(IndexedDataset(n=64), 16))
    return path


def dual_output(
    path: str, layer: str, x: torch.Tensor, end: int | None = None, base: bool = True, memory: bool = True
) -> torch.Tensor:
    """``a W_0 x + a_b b_0 + sum_rows (c_w k.x + c_b) v`` from the raw file, in float64.

    Only h5py and the coefficient recurrence (tested on its own against torch.optim.SGD) are used.
    ``base``/``memory`` select the two parts (a DDP run's shards share the base and split the memory).
    """
    with h5py.File(path, "r", swmr=True, locking=False) as f:  # swmr: also a store whose writer was killed
        g = f["layers"][layer]
        n_steps = int(f["committed_steps"][0])
        first = int(f["update_step"][0])
        u = g["updates"]
        scale = u["grad_scale"][:n_steps]
        n_used = n_steps if end is None else end - first
        rule = f.attrs.get("update_rule", "sgd")
        if isinstance(rule, bytes):
            rule = rule.decode()
        assert rule in ("sgd", "plain"), (
            f"dual_output rebuilds SGD and plain stores, not {rule!r} (compare with the model)"
        )

        def coefs(table):
            if rule == "plain" or not f.attrs["optimizer_exact"]:
                a, c = plain_sgd_coefficients(table["lr"][:n_steps], scale, table["applied"][:n_steps], n_used)
                return a, 0.0, c
            return coefficients_with_buffer({c: table[c][:n_steps] for c in PARAM_COLUMNS}, scale, n_used)

        a_w, b_w, c_w = coefs(u["weight"])
        n_rows = int(g["committed_rows"][0])
        if g.attrs.get("layout", "rows") == "maps":  # a convolution's input maps (format 3): unfold them here
            k, steps = _unfolded_maps(g, n_rows, f.attrs["row_dtype"])
            keep = steps < first + n_used
            k = k[torch.from_numpy(keep)]
        else:
            steps = g["step"][:n_rows]
            keep = steps < first + n_used
            raw_keys = g["keys"][: len(steps)][keep]
            if g.attrs["kind"] == "embedding":  # token ids -> the one-hot keys
                k = torch.nn.functional.one_hot(torch.from_numpy(raw_keys[:, 0]), int(g.attrs["d_in"])).double()
            else:
                k = torch.from_numpy(_floats(raw_keys, f.attrs["row_dtype"])).double()
        v = torch.from_numpy(_floats(g["values"][: len(steps)][keep], f.attrs["row_dtype"])).double()
        s = torch.from_numpy(steps[keep] - first)
        x = x.double().reshape(-1, k.shape[1])
        if not memory:
            k, v, s = k[:0], v[:0], s[:0]
        out = a_w * x @ torch.from_numpy(g["weight_init"][()]).double().t()
        if "weight_buffer_init" in g:  # the store began at a checkpoint whose optimizer had momentum buffers
            out += b_w * x @ torch.from_numpy(g["weight_buffer_init"][()]).double().t()
        if not base:
            out = torch.zeros_like(out)
        out += ((x @ k.t()) * torch.from_numpy(c_w)[s]) @ v
        if "bias" in u:
            a_b, b_b, c_b = coefs(u["bias"])
            if base:
                out += a_b * torch.from_numpy(g["bias_init"][()]).double()
                if "bias_buffer_init" in g:
                    out += b_b * torch.from_numpy(g["bias_buffer_init"][()]).double()
            out += (torch.from_numpy(c_b)[s][:, None] * v).sum(0)
        return out


def _unfolded_maps(g: h5py.Group, n_rows: int, row_dtype: str) -> tuple[torch.Tensor, np.ndarray]:
    """Key rows (float64) and the step of each of a format-3 convolution's virtual rows, from the raw datasets
    with torch's own padding and unfolding (the library unfolds with numpy)."""
    import json

    size = [int(v) for v in g["input_size"][()]]
    c = int(g.attrs["in_channels"])
    ks, st, dil, pad = (json.loads(g.attrs[a]) for a in ("kernel_size", "stride", "dilation", "padding"))
    mode = g.attrs["padding_mode"]
    maps_px = torch.from_numpy(_floats(g["keys"][()], row_dtype)).double()
    e = maps_px.shape[0] // int(np.prod(size))
    x = maps_px.reshape(e, *size, c).movedim(-1, 1)
    if any(pad):
        x = torch.nn.functional.pad(x, pad, mode="constant" if mode == "zeros" else mode)
    if len(size) == 1:
        x, ks, st, dil = x.unsqueeze(-2), [1, *ks], [1, *st], [1, *dil]
    patches = torch.nn.functional.unfold(x, ks, dilation=dil, stride=st)  # (E, d_in, L)
    loc = patches.shape[2]
    keys = patches.transpose(1, 2).reshape(-1, patches.shape[1])[:n_rows]
    steps = np.repeat(g["step"][: n_rows // loc], loc)
    return keys, steps


def _floats(raw: np.ndarray, row_dtype: str) -> np.ndarray:
    if row_dtype == "bfloat16":  # stored as the upper 16 bits of a float32
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def real_output(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in float64 on the CPU (where a GPU is present, Trainers of the tests train there)."""
    x = x.double().cpu().reshape(-1, module.in_features)
    out = x @ module.weight.detach().double().cpu().t()
    if module.bias is not None:
        out += module.bias.detach().double().cpu()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_exact(path: str, model: nn.Module, x_by_layer: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    modules = dict(model.named_modules())
    for name, x in x_by_layer.items():
        err = rel_err(dual_output(path, name, x), real_output(modules[name], x))
        assert err <= tol, f"{name}: dual form differs from the real layer output by {err:.3e}"


class EpochSampler(torch.utils.data.Sampler):
    """A shuffle that depends only on the epoch (like DistributedSampler), so resumed runs see the same batches."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def store_contents(path: str) -> dict[str, np.ndarray]:
    """Every dataset (committed part) and layer attribute of a store, for bit-for-bit comparisons."""
    out: dict[str, object] = {}
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        steps = int(f["committed_steps"][0])

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if name.startswith("layers/") and obj.ndim >= 1 and obj.maxshape[0] is None:
                    layer = name.split("/")[1]
                    n = steps if "/updates/" in name else int(f["layers"][layer]["committed_rows"][0])
                    data = data[:n]
                elif name in ("update_step", "update_epoch"):
                    data = data[:steps]
                elif name.startswith("inputs/") and obj.maxshape[0] is None:
                    data = data[: int(f["inputs"]["committed"][0])]
                out[name] = data
            for k, v in obj.attrs.items():
                if k not in ("created",):
                    out[f"{name}@{k}"] = v

        f.visititems(visit)
    return out
