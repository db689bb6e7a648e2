"""A deterministic training run for durability tests (run as a subprocess).

usage: train_run.py STORE CKPT_DIR EPOCHS [--kill-at-step N] [--resume CKPT] [--optimizer sgd|adamw] [--then RUN...]

Runs joined by ``--then`` follow one another in this process (torch is imported once); a ``--resume`` pattern
with ``*`` is the first checkpoint it matches when its run starts.
"""

import argparse
import glob
import os
import signal
import sys

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import MLP, IndexedDataset, EpochSampler  # noqa: E402

from lightning_dualform import DualFormCallback  # noqa: E402


class KillAt(L.Callback):
    """SIGKILL this process in the middle of a training step: no cleanup of any kind runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    argv, runs = sys.argv[1:], [[]]
    for a in argv:
        if a == "--then":
            runs.append([])
        else:
            runs[-1].append(a)
    for run in runs:
        train(run)


def train(argv: list) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("ckpt_dir")
    p.add_argument("epochs", type=int)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--resume")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    args = p.parse_args(argv)
    if args.resume and "*" in args.resume:
        args.resume = sorted(glob.glob(args.resume))[0]
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    ds = IndexedDataset(n=80)
    if args.optimizer == "adamw":
        model = MLP(opt_factory=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True),
                    sched_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.8))
    else:
        model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    callbacks = [
        DualFormCallback(args.store, commit_seconds=1e9),
        L.pytorch.callbacks.ModelCheckpoint(dirpath=args.ckpt_dir, save_top_k=-1, filename="{epoch}-{step}"),
    ]
    if args.kill_at_step is not None:
        callbacks.append(KillAt(args.kill_at_step))
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=EpochSampler(len(ds)))
    trainer.fit(model, loader, ckpt_path=args.resume)
    torch.save({k: v for k, v in model.state_dict().items()}, os.path.join(args.ckpt_dir, "final_weights.pt"))


if __name__ == "__main__":
    main()
