"""The blocks of a pass (``attend/blocks.py``): the prefetcher yields every block once, in order, holds a bounded
number of blocks whatever the layer's size, passes errors on and stops when the pass does; and the memory of an
uncached pass, measured as a process's resident memory, does not grow with the layer's rows. It moves every host
array of a block (a dict, or a ``Block`` with its metadata dict and a convolution's ``CompactKeys``) to the compute
device, then runs ``finish``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref

import lightning as L
import numpy as np
import pytest
import torch
from helpers import MLP, TRAINER_KW, loader

from lightning_dualform import DualFormCallback
from lightning_dualform.attend.blocks import CompactKeys, Prefetcher, host_bytes, scaled, share_of
from lightning_dualform.attend.kernels import Block


class _Source:
    """Blocks whose arrays are watched: how many are alive whenever a new one is made."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.live = 0
        self.most = 0
        self.made = 0
        self.fail_at = fail_at
        self._lock = threading.Lock()

    def _freed(self) -> None:
        with self._lock:
            self.live -= 1

    def make(self, start: int, stop: int) -> dict:
        if self.fail_at is not None and start >= self.fail_at:
            raise OSError(f"read of rows {start}:{stop} failed")
        with self._lock:
            self.made += 1
            self.live += 1
            self.most = max(self.most, self.live)
        pad = np.ones(1000)
        weakref.finalize(pad, self._freed)
        return {"rows": np.arange(start, stop), "pad": pad}


@pytest.mark.parametrize("depth", [1, 3])
def test_every_block_once_in_order_with_at_most_depth_plus_one_held(depth: int) -> None:
    src = _Source()
    pf = Prefetcher(src.make, 1000, 37, torch.device("cpu"), depth=depth)
    got = []
    try:
        for blk in pf:
            time.sleep(0.003)  # a consumer slower than the reads: they would pile up without a bound
            got.append(blk["rows"].numpy().copy())
    finally:
        pf.close()
    assert np.array_equal(np.concatenate(got), np.arange(1000))  # the reference: every row once, in order
    # the blocks read ahead, the consumer's, and the one the consumer's loop variable still names while it asks for
    # the next (freed as soon as the loop takes the next)
    assert src.most <= depth + 2, src.most


def test_shares_of_the_ranks_cover_every_block_once() -> None:
    bounds = [(s, min(s + 10, 95)) for s in range(0, 95, 10)]
    for world in (1, 2, 3, 4, 12):
        parts = [share_of(bounds, r, world) for r in range(world)]
        assert [b for p in parts for b in p] == bounds
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_read_error_reaches_the_consumer_and_an_early_stop_ends_the_thread() -> None:
    src = _Source(fail_at=300)
    pf = Prefetcher(src.make, 1000, 100, torch.device("cpu"))
    seen = []
    with pytest.raises(OSError, match="rows 300:400"):
        for blk in pf:
            seen.append(int(blk["rows"][0]))
    pf.close()
    assert seen == [0, 100, 200]
    src = _Source()
    pf = Prefetcher(src.make, 10_000, 10, torch.device("cpu"), depth=2)
    for _ in pf:
        break
    pf.close()  # returns: the reader waits for a slot no more
    assert not pf._thread.is_alive() and src.made <= 4


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least one block ahead"):
        Prefetcher(lambda a, b: {}, 10, 5, torch.device("cpu"), depth=0)


# ------------------------------------------------------------------------------------------------------
# the memory of an uncached pass, in a process of its own
# ------------------------------------------------------------------------------------------------------
D = 1024  # a wide layer: 8 KiB of keys and values per row
BLOCK = 128  # rows per block: 1 MiB of keys and values
STEP_ROWS = 256

_PASS = r"""
import json, sys, threading, time, warnings
import torch
from lightning_dualform import DualInference

store, read_ahead, block, at_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if read_ahead:
    blocks.READ_AHEAD = read_ahead  # the control: reads that may run far ahead
inner = blocks.Prefetcher.__iter__


def slow(self):  # a consumer slower than the reads (a busy compute device): read-ahead piles up if unbounded
    for blk in inner(self):
        yield blk
        time.sleep(0.01)


blocks.Prefetcher.__iter__ = slow
warnings.simplefilter("ignore")
q = torch.randn(16, %d, generator=torch.Generator().manual_seed(0))


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


with DualInference(store, cache=None, block_rows=block) as di:
    di.attend("net.0", q, top_k=3, per_example=False, mass=False, at_step=1)  # warm-up: pools, work buffers
    base, top, done = rss(), [0], threading.Event()

    def watch() -> None:  # the pass's peak (the process's ru_maxrss may date from before it)
        while not done.is_set():
            top[0] = max(top[0], rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    di.attend("net.0", q, top_k=3, per_example=False, mass=False, at_step=at_step)
    done.set()
    watcher.join()
print(json.dumps(max(top[0], rss()) - base))
""" % D


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory) -> str:
    """A store whose first layer holds 8,192 rows of 1024 + 1024 float32 numbers (64 MiB), 32 steps of 256."""
    path = str(tmp_path_factory.mktemp("blocks") / "wide.h5")
    g = torch.Generator().manual_seed(0)
    n = 16 * STEP_ROWS
    data = torch.utils.data.TensorDataset(torch.randn(n, D, generator=g), torch.randint(0, 3, (n,), generator=g))
    torch.manual_seed(0)
    model = MLP(d=D, hidden=D, classes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_epochs=2, callbacks=[DualFormCallback(path)], **TRAINER_KW)
        trainer.fit(model, loader(data, batch_size=STEP_ROWS))
    return path


def _growth(store: str, read_ahead: int, at_step: int) -> int:
    """Peak resident memory a pass over the rows of steps ``0..at_step-1`` adds, in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_PASS), store, str(read_ahead), str(BLOCK),
                           str(at_step)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_an_uncached_pass_holds_a_few_blocks_whatever_the_layers_rows(wide_store) -> None:
    """The resident memory a pass adds over a layer of 4x the rows stays within a constant of the 1x pass's, with a
    consumer slower than the reads; the control (reads allowed to run ahead without bound, the same slow consumer)
    shows that the measure catches a pass that keeps its reads."""
    # 1,536 and 6,144 rows (12 and 48 MiB of keys and values); both before the end, so that both passes are of one
    # kind (at the end a pass takes the memory's sums from the certificate)
    one, four = 6, 24
    grown_bytes = (four - one) * STEP_ROWS * 2 * D * 4  # 36 MiB more rows
    small, large = _growth(wide_store, 0, one), _growth(wide_store, 0, four)
    unbounded = _growth(wide_store, 10_000, four)
    assert unbounded - large > grown_bytes / 2, (small, large, unbounded)  # measured ~60 MiB more
    assert large - small < grown_bytes / 4, (small, large)  # READ_AHEAD + 1 blocks of 1.5 MiB each, not the layer


# ------------------------------------------------------------------------------------------------------
# what a block holds
# ------------------------------------------------------------------------------------------------------
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
