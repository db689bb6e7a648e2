"""A convolution's bytes on disk against what it saw: its input maps plus its output gradients.

Records a few optimizer steps of (a) one ``Conv2d(8, 16, 3, padding=1)`` on 16x16 maps and (b) a ResNet-18
for 32x32 inputs (``real_models.resnet18``), float32 rows, no compression, and reports per conv layer the
storage size of its datasets (keys, values, per-row metadata; ``h5py``'s ``get_storage_size``, so chunk
allocation counts) over ``E * (C_in * P + C_out * L) * 4`` bytes (``E`` maps of ``P`` input pixels and ``L``
output locations). The unfolded layout of format 2 (one key row of ``C_in * prod(kernel)`` values and 32
bytes of metadata per output location) is given by its formula beside it. Sizes only: no timing.

Usage::

    python benchmarks/conv_bytes.py --steps 3 --batch-size 32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import h5py  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from common import machine, write_json  # noqa: E402
from torch import nn  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402

META_BYTES = 32  # step, epoch, index, position, label


class OneConv(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.relu(self.conv(x)).mean((2, 3))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def record(task: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, path: str) -> None:
    cb = DualFormCallback(path, overwrite=True, store_inputs=False)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(task, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch))


def conv_layers(path: str) -> dict[str, dict[str, Any]]:
    out = {}
    with h5py.File(path, "r") as f:
        for name, g in f["layers"].items():
            if g.attrs.get("layout") != "maps":
                continue
            e = g["step"].shape[0]
            size = [int(v) for v in g["input_size"][()]]
            c_in, c_out = g["keys"].shape[1], g["values"].shape[1]
            pixels, locations = math.prod(size), g["values"].shape[0] // e
            seen = e * (c_in * pixels + c_out * locations) * 4
            disk = sum(
                ds.id.get_storage_size()
                for ds in g.values()
                if isinstance(ds, h5py.Dataset)
                and ds.name.rsplit("/", 1)[1] in ("keys", "values", "step", "epoch", "index", "position", "label")
            )
            d_in = int(g.attrs["d_in"])
            unfolded = e * locations * ((d_in + c_out) * 4 + META_BYTES)
            out[name] = {
                "maps": e,
                "input_size": size,
                "c_in": c_in,
                "c_out": c_out,
                "d_in": d_in,
                "seen_bytes": seen,
                "disk_bytes": disk,
                "ratio": disk / seen,
                "unfolded_ratio": unfolded / seen,
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps recorded")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results", help="directory for conv_bytes.json")
    args = ap.parse_args()
    from real_models import model

    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    result: dict[str, Any] = {"machine": machine(), "args": vars(args), "cases": {}}
    with tempfile.TemporaryDirectory() as d:
        cases = {
            "conv2d_8_16_3x3_16x16": (OneConv(), torch.randn(n, 8, 16, 16, generator=g)),
            "resnet18_32x32": (model("resnet18")[0], torch.randn(n, 3, 32, 32, generator=g)),
        }
        for case, (task, x) in cases.items():
            path = os.path.join(d, f"{case}.h5")
            record(task, x, torch.randint(0, 10, (n,), generator=g), args.steps, args.batch_size, path)
            layers = conv_layers(path)
            seen = sum(v["seen_bytes"] for v in layers.values())
            disk = sum(v["disk_bytes"] for v in layers.values())
            unfolded = sum(v["unfolded_ratio"] * v["seen_bytes"] for v in layers.values())
            result["cases"][case] = {
                "layers": layers,
                "ratio": disk / seen,
                "unfolded_ratio": unfolded / seen,
                "disk_bytes_per_step": disk / args.steps,
                "unfolded_bytes_per_step": unfolded / args.steps,
            }
            worst = max(layers.items(), key=lambda kv: kv[1]["ratio"])
            print(
                f"{case}: conv layers' bytes on disk {disk / args.steps / 2**20:.2f} MiB/step = {disk / seen:.2f}x "
                f"their input maps + output gradients (worst layer {worst[0]}: {worst[1]['ratio']:.2f}x); unfolded "
                f"rows would be {unfolded / args.steps / 2**20:.2f} MiB/step = {unfolded / seen:.2f}x"
            )
    write_json(args.out, "conv_bytes.json", result)


if __name__ == "__main__":
    main()
