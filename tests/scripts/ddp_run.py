"""Two-process CPU DDP training with DualFormCallback (run as a subprocess: the ddp launcher re-runs it).

usage: ddp_run.py STORE OUT_WEIGHTS [sgd|adamw|adamw-rows]

sgd trains the MLP with a convolution in front (ConvMLP); the adamw modes the MLP.
"""

import os
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import MLP, IndexedDataset  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402


class ConvMLP(MLP):
    """The MLP with a circular Conv1d in front (its 6 inputs read as 1 channel)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.conv = torch.nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular")
        self.net[0] = torch.nn.Linear(12, self.net[0].out_features)

    def forward(self, x):
        return self.net(torch.tanh(self.conv(x[:, None, :])).reshape(x.shape[0], -1))


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    mode = sys.argv[3] if len(sys.argv) > 3 else "sgd"
    if mode in ("adamw", "adamw-rows"):
        opt = lambda m: torch.optim.AdamW(m.parameters(), lr=2e-2, weight_decay=0.1)  # noqa: E731
    else:
        opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)  # noqa: E731
    schedule = lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.8)  # noqa: E731
    # sgd: linear layers and a convolution stored as maps, read across shards
    model = (ConvMLP if mode == "sgd" else MLP)(opt_factory=opt, sched_factory=schedule)
    # (a recorder's DDP test covers the sketch certificate; adamw-rows: AdamW's row replay as training goes)
    cb = DualFormCallback(store, certify=True if mode == "adamw-rows" else "full")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        gradient_clip_val=0.3)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=96), batch_size=8, shuffle=True))
    if trainer.global_rank == 0:
        torch.save(model.state_dict(), out)
        print("CERT", {k: v["rel_err"] for k, v in cb.certificate.items()})


if __name__ == "__main__":
    main()
