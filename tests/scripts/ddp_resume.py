"""Two-process CPU DDP training with DualFormCallback, checkpointed each epoch, then resumed (run as a subprocess).

usage: ddp_resume.py STORE CKPT_DIR EPOCHS [RESUME_CKPT]

Trains the MLP (SGD with momentum, a schedule) to EPOCHS epochs, from RESUME_CKPT when given; prints each
layer's certificate on rank 0.
"""

import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import MLP, IndexedDataset  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402


def main() -> None:
    store, ckpt_dir, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9),
                sched_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.8))
    cb = DualFormCallback(store)
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb, ckpt],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(IndexedDataset(n=96), batch_size=8, shuffle=True),
                ckpt_path=resume)
    if trainer.global_rank == 0:
        print("CERT", {k: (v["exact"], v["rel_err"]) for k, v in cb.certificate.items()})


if __name__ == "__main__":
    main()
