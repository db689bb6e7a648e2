"""How tests/data/store_v2_conv.h5 was written: with the format-version-2 code of commit 136ab34 (convolution
keys stored unfolded, one row per example and output location), from the repository root at that commit:
`PYTHONPATH=src python tests/data/make_store_v2_conv.py tests/data/store_v2_conv.h5`. Kept for the record;
running it with later code writes a store of the later format."""
import sys

import lightning as L
import torch
from torch import nn

sys.path.insert(0, "tests")
from helpers import TRAINER_KW  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular")
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):  # (B, 2, 6, 6)
        b = x.shape[0]
        h = torch.tanh(self.c1(x.reshape(b, 2, 36)))
        h = torch.tanh(self.c2(h.reshape(b, 3, 6, 6)))
        return self.head(h.reshape(b, -1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
    cb = DualFormCallback(sys.argv[1], overwrite=True, chunk_rows=64, compression="gzip")
    L.Trainer(max_steps=4, callbacks=[cb], accelerator="cpu", **TRAINER_KW).fit(
        Net(), torch.utils.data.DataLoader(ds, batch_size=8))
    print(cb.certificate)
