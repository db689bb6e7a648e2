"""Recording real architectures: a ResNet-18 for 32x32 inputs and a small GPT built from nn.Linear and nn.Embedding.

For each model, one run trains ``--steps`` optimizer steps without the callback and one with it (defaults:
float32 rows, no compression, the certificate included), side by side, repeated ``--repeats`` times in
alternating order. Reported: the ratio of fit times, the bytes the store holds per training example (and
per step), how they split between keys and values, and the store's write throughput against the disk's own
sequential write speed measured in the same run (1 MiB writes of zeros, then ``fdatasync``, as ``dd conv=fdatasync``).

The ResNet-18 is torchvision's (``resnet18(num_classes=10)`` with a 3x3 stem and no max-pool, the usual
CIFAR form) when torchvision is installed, else the same architecture defined here. Inputs are synthetic
(no downloads here): 32x32 RGB images and random character sequences; the timings do not depend on the
pixels.

Usage::

    python benchmarks/real_models.py                          # both models, 20 steps each, 2 repeats
    python benchmarks/real_models.py --models gpt --steps 50 --accelerator gpu
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import machine, median, write_json  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402


# ------------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18(classes: int = 10) -> tuple[nn.Module, str]:
    """ResNet-18 for 32x32 inputs: torchvision's when installed, else the same layers defined here."""
    try:
        import torchvision

        net = torchvision.models.resnet18(num_classes=classes)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        return net, f"torchvision {torchvision.__version__}"
    except ImportError:
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        c = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(c, c_out, stride), _Block(c_out, c_out, 1)]
            c = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
        return nn.Sequential(*layers), "defined in benchmarks/real_models.py"


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.out(att.transpose(1, 2).reshape(b, t, d))


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A small decoder-only transformer from nn.Embedding and nn.Linear only (every weight is recorded)."""

    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 4, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(_GPTBlock(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(pos))))


class Task(pl.LightningModule):
    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def data(kind: str, n: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    if kind == "resnet18":
        return torch.utils.data.TensorDataset(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    tokens = torch.randint(0, 256, (n, 65), generator=g)
    return torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])


def model(kind: str) -> tuple[Task, str]:
    torch.manual_seed(0)
    if kind == "resnet18":
        net, source = resnet18()
        return Task(net, kind), source
    return Task(GPT(), kind), "defined in benchmarks/real_models.py"


# ------------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------------
def disk_write_speed(directory: str, mb: int = 512) -> float:
    """Sequential write speed of ``directory``'s disk in bytes/s: ``mb`` MiB of zeros written in 1 MiB pieces,
    then ``fdatasync`` (what ``dd bs=1M conv=fdatasync`` measures, without reading a device); the file is deleted."""
    path = os.path.join(directory, "write_speed.bin")
    block = bytes(2**20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for _ in range(mb):
            os.write(fd, block)
        os.fdatasync(fd)
        return mb * 2**20 / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.remove(path)


def fit(kind: str, steps: int, batch: int, accelerator: str, store: str | None) -> dict[str, Any]:
    task, _ = model(kind)
    cbs = [DualFormCallback(store)] if store else []
    trainer = pl.Trainer(
        max_steps=steps, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=cbs,
    )
    dl = torch.utils.data.DataLoader(data(kind, steps * batch), batch_size=batch, shuffle=True)
    t0 = time.perf_counter()
    trainer.fit(task, dl)
    if accelerator == "gpu":
        torch.cuda.synchronize()
    out: dict[str, Any] = {"seconds": time.perf_counter() - t0}
    if store:
        out["certificate"] = {n: c["rel_err"] for n, c in cbs[0].certificate.items()}
        out["exact"] = all(c["exact"] for c in cbs[0].certificate.values())
        out.update(store_bytes(store))
    return out


def store_bytes(path: str) -> dict[str, Any]:
    """Bytes of keys, values and per-row metadata in a store (the datasets' storage sizes)."""
    sizes = {"keys": 0, "values": 0, "metadata": 0}
    with h5py.File(path, "r") as f:
        for g in f["layers"].values():
            for name, ds in g.items():
                if not isinstance(ds, h5py.Dataset):
                    continue
                key = name if name in ("keys", "values") else ("metadata" if ds.ndim == 1 and ds.maxshape[0] is None else None)
                if key:
                    sizes[key] += ds.id.get_storage_size()
    return {"bytes": os.path.getsize(path), **{f"{k}_bytes": v for k, v in sizes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default="resnet18,gpt", help="comma list of resnet18, gpt")
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per fit")
    ap.add_argument("--batch-size", type=int, default=32, help="examples per step")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (baseline, recorded)")
    ap.add_argument("--accelerator", default="cpu", help="cpu or gpu")
    ap.add_argument("--workdir", default=None, help="where stores are written (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for real_models.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="dualform-real-", dir=args.workdir)
    result: dict[str, Any] = {"machine": machine(), "args": vars(args), "disk_write_bytes_per_s": disk_write_speed(work), "models": {}}
    print(f"disk: {result['disk_write_bytes_per_s'] / 1e6:.0f} MB/s sequential write (dd, fdatasync)")
    try:
        for kind in args.models.split(","):
            _, source = model(kind)
            base, rec, runs = [], [], []
            fit(kind, 2, args.batch_size, args.accelerator, None)  # warm-up: imports, allocator, kernels
            for r in range(args.repeats):
                store = os.path.join(work, f"{kind}.h5")
                order = (False, True) if r % 2 == 0 else (True, False)
                for recorded in order:
                    if recorded:
                        run = fit(kind, args.steps, args.batch_size, args.accelerator, store)
                        rec.append(run["seconds"])
                        runs.append(run)
                        os.remove(store)
                    else:
                        base.append(fit(kind, args.steps, args.batch_size, args.accelerator, None)["seconds"])
            last = runs[-1]
            examples = args.steps * args.batch_size
            ratio = median([b2 / b1 for b1, b2 in zip(base, rec)])
            throughput = last["bytes"] / median(rec)
            summary = {
                "source": source, "baseline_s": base, "recorded_s": rec, "ratio": ratio,
                "bytes_per_example": last["bytes"] / examples, "bytes_per_step": last["bytes"] / args.steps,
                "keys_over_values": last["keys_bytes"] / max(1, last["values_bytes"]),
                "metadata_share": last["metadata_bytes"] / max(1, last["bytes"]),
                "write_bytes_per_s": throughput,
                "write_over_disk": throughput / result["disk_write_bytes_per_s"],
                "certificate_max": max(last["certificate"].values()), "exact": last["exact"],
            }
            result["models"][kind] = summary
            print(f"{kind} ({source}): ratio {ratio:.2f}; {summary['bytes_per_example'] / 2**20:.2f} MiB per example, "
                  f"{summary['bytes_per_step'] / 2**20:.1f} MiB per step (keys {summary['keys_over_values']:.1f}x values, "
                  f"metadata {100 * summary['metadata_share']:.1f}%); writes at {throughput / 1e6:.0f} MB/s = "
                  f"{100 * summary['write_over_disk']:.0f}% of the disk; certificate {summary['certificate_max']:.1e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, "real_models.json", result)


if __name__ == "__main__":
    main()
