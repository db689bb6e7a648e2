"""``attend/blocks.py``: the prefetch thread moves every host array of a block (a dict, or a ``Block`` with its
metadata dict and a convolution's ``CompactKeys``) to the compute device, then runs ``finish``."""

from __future__ import annotations

import numpy as np
import torch

from lightning_dualform.attend.blocks import CompactKeys, Prefetcher, host_bytes, scaled
from lightning_dualform.attend.kernels import Block


def _block(start: int, stop: int) -> Block:
    n = stop - start
    rows = np.arange(start, stop, dtype=np.int64)
    keys = CompactKeys(np.full((1, 2, 3, 3), float(start), np.float32), skip=0, rows=n, dtype=torch.float64,
                       scale=np.full(n, 2.0))
    return Block(keys=keys, values=np.ones((n, 4), np.float32), c_w=np.ones(n, np.float32), c_b=np.zeros(n, np.float32),
                 meta={"row": rows, "step": rows // 2}, step_group=rows % 3, coef_w=None)


def test_every_array_of_a_block_reaches_the_device_and_finish_sees_tensors() -> None:
    seen = []

    def finish(blk: Block) -> Block:
        assert isinstance(blk.keys.maps, torch.Tensor) and isinstance(blk.keys.scale, torch.Tensor)
        seen.append(blk.keys.skip)
        blk.keys = torch.ones(blk.keys.rows, 18, dtype=blk.keys.dtype) * blk.keys.scale[:, None]  # a stand-in unfold
        return blk

    expected = sum(host_bytes(_block(s, min(s + 4, 10))) for s in range(0, 10, 4))
    pf = Prefetcher(_block, 10, 4, torch.device("cpu"), finish=finish)
    try:
        got = list(pf)
    finally:
        pf.close()
    assert [int(b.meta["row"][0]) for b in got] == [0, 4, 8] and seen == [0, 0, 0]
    for b in got:
        for v in (b.values, b.c_w, b.c_b, b.step_group, *b.meta.values()):
            assert isinstance(v, torch.Tensor)
        assert b.keys.dtype == torch.float64 and bool((b.keys == 2.0).all()) and b.coef_w is None
    assert pf.moved_bytes == expected > 0


def test_dict_blocks_move_as_before() -> None:
    def make(start: int, stop: int) -> dict:
        return {"keys": np.zeros((stop - start, 3), np.float32), "step": np.arange(start, stop), "skip": 0}

    pf = Prefetcher(make, 5, 2, torch.device("cpu"))
    try:
        got = list(pf)
    finally:
        pf.close()
    assert [b["keys"].shape[0] for b in got] == [2, 2, 1] and all(isinstance(b["step"], torch.Tensor) for b in got)
    assert all(b["skip"] == 0 for b in got)


def test_scaled_keys_agree_on_host_and_device() -> None:
    keys = np.arange(12, dtype=np.float32).reshape(4, 3)
    scale = np.array([1.0, -0.5, 2.0, 3.0])
    host = scaled(keys, scale)
    dev = scaled(torch.from_numpy(keys), torch.from_numpy(scale))
    assert np.array_equal(host, dev.numpy())
