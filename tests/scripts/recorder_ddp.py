"""A 2-process DDP training loop recorded with DualFormRecorder (run as a subprocess by the tests).

usage: recorder_ddp.py OUT_DIR
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import IndexedDataset  # noqa: E402

from lightning_dualform import DualFormRecorder  # noqa: E402


def run(rank: int, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.9)
    ds = IndexedDataset(n=64)
    g = torch.Generator().manual_seed(1)
    with DualFormRecorder(os.path.join(out, "ddp.h5"), ddp, opt) as rec:
        for step in range(6):
            perm = torch.randperm(64, generator=g)
            idx = perm[rank * 8:(rank + 1) * 8]  # each rank its own examples
            rec.batch(indices=idx, labels=ds.y[idx])
            nn.functional.cross_entropy(ddp(ds.x[idx] / 10.0), ds.y[idx]).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.05)
            opt.step()
            opt.zero_grad()
    assert all(c["exact"] for c in rec.certificate.values()), rec.certificate
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out, "final.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    # fork: the workers inherit this process's imports (spawn would import torch and Lightning twice more)
    mp.start_processes(run, args=(sys.argv[1], free), nprocs=2, join=True, start_method="fork")
