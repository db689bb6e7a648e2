"""How tests/data/store_v1_sgd.h5 was written: with the format-version-1 code of commit 59505dc
(`PYTHONPATH=src python tests/data/make_store_v1_sgd.py tests/data/store_v1_sgd.h5` from the repository root
at that commit). Kept for the record; running it with later code writes a store of the later format."""
import sys
sys.path.insert(0, "tests")
import lightning as L
import torch
from helpers import MLP, IndexedDataset, loader, TRAINER_KW
from lightning_dualform import DualFormCallback
L.seed_everything(0, verbose=False)
torch.set_num_threads(1)
class M(MLP):
    def test_step(self, batch, batch_idx):
        return self(batch[0])
model = M(hidden=5, opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=0.01),
            sched_factory=lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5))
out = sys.argv[1]
cb = DualFormCallback(out, record_queries=("test",), overwrite=True, compression="gzip", chunk_rows=16)
tr = L.Trainer(max_steps=6, callbacks=[cb], gradient_clip_val=0.5, accumulate_grad_batches=2, accelerator="cpu", **TRAINER_KW)
ds = IndexedDataset(n=48)
tr.fit(model, loader(ds, batch_size=8))
tr.test(model, loader(IndexedDataset(n=4, seed=1), batch_size=4, shuffle=False), verbose=False)
print(cb.certificate)
