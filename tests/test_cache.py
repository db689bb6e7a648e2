"""``DualInference(cache=...)``: the same answers bit for bit, no reads on a repeated pass, eviction within
the budget, and no stale answers from a store changed on disk (a real resume, a rewrite in place)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset
from lightning_dualform import DualFormCallback, DualInference
from lightning_dualform.attend.cache import BlockCache, StoreStamp, resolve_budget
from lightning_dualform.store import _raw_chunks

BLOCK = 32  # rows per block: the stores below hold 288 rows per layer, 9 blocks


def _fit(path, epochs: int = 3, seed: int = 0, ckpt_dir=None, ckpt_path=None, data_seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(opt_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    callbacks = [DualFormCallback(path)]
    kw = dict(TRAINER_KW)
    if ckpt_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, filename="{epoch}"))
        kw["enable_checkpointing"] = True
    g = torch.Generator().manual_seed(data_seed)
    dl = torch.utils.data.DataLoader(IndexedDataset(), batch_size=16, shuffle=True, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_epochs=epochs, callbacks=callbacks, **kw).fit(model, dl, ckpt_path=ckpt_path)
    return model


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cache") / "s.h5")
    _fit(path)
    return path


def _queries(n: int = 5, d: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _same(a, b) -> None:
    """Every number of two answers equal, bit for bit (JSON of the float values is exact)."""
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())


class _Reads:
    """Counts every read of stored data: h5py dataset reads, and the bulk reads of keys and values (raw chunks
    or H5Dread, both behind ``_raw_chunks.read_rows``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = self.bulk = 0
        original_getitem, original_rows = h5py.Dataset.__getitem__, _raw_chunks.read_rows

        def getitem(ds, *args, **kw):
            self.n += 1
            return original_getitem(ds, *args, **kw)

        def read_rows(*args, **kw):  # keys and values
            self.n += 1
            self.bulk += 1
            return original_rows(*args, **kw)

        monkeypatch.setattr(h5py.Dataset, "__getitem__", getitem)
        monkeypatch.setattr(_raw_chunks, "read_rows", read_rows)


CASES = [
    dict(layer="net.0", top_k=4),
    dict(layer="net.2", top_k=3, contribution_to="pred", step_buckets=4),
    dict(layer="net.2", top_k=3, contribution_to=1, at_step=7),  # a prefix: its last block is a shorter one
    dict(layer="net.0", top_k=2, at_step=12, contribution_to="pred"),  # the prediction needs a pass first
    dict(layer="net.0", top_k=4, scan="bf16"),  # dual rebuilt in a second pass
    dict(layer="net.2", top_k=4, reuse_certificate=False, per_example=False, mass=False),
]


@pytest.mark.parametrize("tensors", [False, True], ids=["host", "tensors"])
def test_cached_answers_equal_uncached_bit_for_bit(store: str, tensors: bool) -> None:
    # tensors=True keeps keys and values as torch tensors, the code path of a CUDA device cache
    with (
        DualInference(store, device="cpu", block_rows=BLOCK) as plain,
        DualInference(store, device="cpu", block_rows=BLOCK, cache=1 << 24) as cached,
    ):
        if tensors:
            cached._cache = BlockCache(1 << 24, "cpu", tensors=True)
        for case in CASES:
            kw = dict(case)
            layer = kw.pop("layer")
            q = _queries(d=plain.layer(layer).d_in)
            ref = plain.attend(layer, q, **kw)
            for _ in range(2):  # filling the cache, then from it
                _same(cached.attend(layer, q, **kw), ref)
        info = cached.cache_info()
        assert info.hits > 0 and info.misses > 0 and info.evictions == 0
        assert set(info.layers) == {"net.0", "net.2"} and info.layers["net.0"].rows == cached.layer("net.0").n_rows
        # explain, verify and the analyses go through the same reads; read() hands out numpy arrays
        assert isinstance(cached.layer("net.0").read(0, BLOCK)["keys"], np.ndarray)
        assert isinstance(cached.layer("net.0").read_kept(0, BLOCK)["keys"], torch.Tensor if tensors else np.ndarray)
        from lightning_dualform.analysis import score_curves

        curves_plain, curves_cached = (
            score_curves(plain, "net.0", _queries(2)),
            score_curves(cached, "net.0", _queries(2)),
        )
        assert all(np.array_equal(a[k], b[k]) for a, b in zip(curves_plain, curves_cached) for k in a)
        from lightning_dualform.cli.influence import load_final_weights

        model = MLP()
        load_final_weights(model, plain.store)  # (explain refuses a model that is not the trained one)
        ex_plain, ex_cached = plain.explain(model, _queries(4), top_k=3), cached.explain(model, _queries(4), top_k=3)
        assert json.dumps(ex_plain.to_dict()) == json.dumps(ex_cached.to_dict())
        assert plain.verify(n_samples=8) == cached.verify(n_samples=8)


def test_a_repeated_pass_reads_nothing_from_disk(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = _Reads(monkeypatch)
    q = _queries(d=8)
    with DualInference(store, device="cpu", block_rows=BLOCK, cache="auto") as di:
        first = di.attend("net.2", q, top_k=3, contribution_to="pred")
        assert reads.n > 9  # the cold pass read the blocks (and the weights, tables and sums)
        before, hits = reads.n, di.cache_info().hits
        again = di.attend("net.2", q, top_k=3, contribution_to="pred")
        assert reads.n == before, "a repeated pass over a cached layer read the file"
        assert di.cache_info().hits == hits + 9  # every block from the cache
        # an earlier step of the same layer: its rows are a prefix of the kept blocks (only that step's
        # coefficients and base weights are read, once)
        bulk = reads.bulk
        di.attend("net.2", q, top_k=3, at_step=10)
        assert reads.bulk == bulk
        before = reads.n
        di.attend("net.2", q, top_k=3, at_step=10)
        assert reads.n == before
    _same(first, again)
    with DualInference(store, device="cpu", block_rows=BLOCK) as plain:  # without a cache every pass reads
        plain.attend("net.2", q, top_k=3, contribution_to="pred")
        before = reads.n
        plain.attend("net.2", q, top_k=3, contribution_to="pred")
        assert reads.n >= before + 9


def test_eviction_keeps_the_cache_within_a_small_budget(store: str) -> None:
    q = _queries(d=6)
    with DualInference(store, device="cpu", block_rows=BLOCK) as di:
        block_bytes = sum(v.nbytes for v in di.layer("net.0").read(0, BLOCK).values())
        ref = di.attend("net.0", q, top_k=4, contribution_to="pred")
    budget = int(2.5 * block_bytes)
    with DualInference(store, device="cpu", block_rows=BLOCK, cache=budget) as di:
        for _ in range(2):
            _same(di.attend("net.0", q, top_k=4, contribution_to="pred"), ref)
            info = di.cache_info()
            assert info.bytes <= budget and info.layers["net.0"].blocks == 2
        assert info.evictions >= 2 * 9 - 2 - 1  # a scan longer than the cache evicts as it goes (LRU)
        assert "net.0" in repr(di) and "evictions" in repr(di)


def test_facts_of_many_steps_stay_bounded(store: str) -> None:
    """A slider over at_step asks for a new step each time: the base weights of only a few are kept."""
    q = _queries(d=6)
    with (
        DualInference(store, device="cpu", block_rows=BLOCK, cache=1 << 24) as di,
        DualInference(store, device="cpu", block_rows=BLOCK) as plain,
    ):
        for step in range(1, di.last_step + 1):
            _same(di.attend("net.0", q, top_k=2, at_step=step), plain.attend("net.0", q, top_k=2, at_step=step))
        kinds = [k[0] for k in di.layer("net.0")._facts]
        assert kinds.count("base_weights") == 2 and kinds.count("coefficients") <= 32


def test_lru_order_and_blocks_larger_than_the_budget() -> None:
    def rows(n: int) -> dict:
        return {"keys": np.zeros((n, 4), np.float32), "step": np.arange(n)}

    size = rows(10)["keys"].nbytes + rows(10)["step"].nbytes
    cache = BlockCache(3 * size)
    for start in (0, 10, 20):
        cache.put("a", start, start + 10, rows(10))
    assert cache.get("a", 0, 10, ("keys",)) is not None  # 0 is now the most recently used
    cache.put("a", 30, 40, rows(10))  # evicts 10, the least recently used
    assert cache.get("a", 10, 20, ("keys",)) is None
    assert all(cache.get("a", s, s + 10, ("keys", "step")) is not None for s in (0, 20, 30))
    assert cache.get("a", 0, 10, ("keys", "values")) is None  # columns it does not hold
    assert cache.get("b", 0, 10, ("keys",)) is None  # another layer
    part = cache.get("a", 20, 25, ("step",))  # a prefix of a kept block: a view
    assert part["step"].tolist() == [0, 1, 2, 3, 4]
    assert cache.get("a", 20, 41, ("step",)) is None  # longer than any kept block
    cache.put("a", 50, 90, rows(40))  # larger than the budget: handed back, not kept
    assert cache.get("a", 50, 90, ("keys",)) is None and cache.bytes <= cache.budget
    info = cache.info()
    assert info.layers["a"].blocks == 3 and info.evictions == 1


def test_a_resumed_store_is_read_again_not_served_from_the_cache(tmp_path, caplog) -> None:
    """A resume from the epoch-1 checkpoint with another data order rewrites the rows of epoch 2 and
    leaves every counter as it was: only the file's stamp tells the cache that its blocks are stale."""
    path, ckpt = str(tmp_path / "s.h5"), tmp_path / "ckpt"
    _fit(path, epochs=2, ckpt_dir=ckpt)
    q = _queries(d=6)
    di = DualInference(path, device="cpu", block_rows=BLOCK, cache=1 << 24)
    old = di.attend("net.0", q, top_k=5, contribution_to="pred")
    rows, steps = di.layer("net.0").n_rows, di.last_step
    # the resume runs in another process, as it would (HDF5 opens a file once per process)
    script = (f"import sys; sys.path[:0] = [{os.path.dirname(__file__)!r}]; from test_cache import _fit; "
              f"_fit({path!r}, epochs=2, ckpt_path={str(ckpt / 'epoch=0.ckpt')!r}, data_seed=1)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with caplog.at_level(logging.WARNING, logger="lightning_dualform"):
        new = di.attend("net.0", q, top_k=5, contribution_to="pred")
    with DualInference(path, device="cpu", block_rows=BLOCK) as fresh:
        _same(new, fresh.attend("net.0", q, top_k=5, contribution_to="pred"))
    assert "changed on disk" in caplog.text
    assert di.layer("net.0").n_rows == rows and di.last_step == steps  # the counters did not change ...
    assert not torch.equal(new.top.index, old.top.index) or not torch.equal(new.dual, old.dual)  # ... the rows did
    assert not di.refresh()  # nothing changed since
    di.close()


def test_a_store_rewritten_in_place_with_its_old_size_and_time_is_detected(tmp_path) -> None:
    a, b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
    _fit(a, epochs=1, seed=0)
    _fit(b, epochs=1, seed=1)
    assert os.path.getsize(a) == os.path.getsize(b)  # the same layout: only the numbers differ
    q = _queries(d=6)
    di = DualInference(a, device="cpu", cache="auto")
    di.attend("net.0", q, top_k=3)
    st = os.stat(a)
    shutil.copyfile(b, a)  # same inode, same size
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    assert os.stat(a).st_ino == st.st_ino and os.stat(a).st_mtime_ns == st.st_mtime_ns
    assert di.refresh()  # the change time gives it away
    with DualInference(b, device="cpu") as other:
        _same(di.attend("net.0", q, top_k=3), other.attend("net.0", q, top_k=3))
    di.close()


def test_stamps_of_a_store_and_of_a_missing_file(store: str, tmp_path) -> None:
    with DualInference(store, device="cpu") as di:
        assert StoreStamp.of(di.store) == StoreStamp.of(di.store)
        assert di.cache_info() is None and not di.refresh() and "cache=" not in repr(di)
    gone = tmp_path / "gone.h5"
    shutil.copyfile(store, gone)
    with DualInference(str(gone), device="cpu", cache=1 << 20) as di:
        stamp = StoreStamp.of(di.store)
        os.remove(gone)
        assert StoreStamp.of(di.store) != stamp


@pytest.mark.parametrize("bad", [0, -5, 1.5, "lots", True])
def test_bad_cache_arguments(store: str, bad) -> None:
    with pytest.raises(ValueError, match=r"cache=.*expected a budget in bytes"):
        DualInference(store, device="cpu", cache=bad)


def test_auto_budget_is_half_of_the_available_memory() -> None:
    from lightning_dualform.attend import cache as cache_mod

    assert resolve_budget(None, torch.device("cpu")) is None
    assert resolve_budget(123, torch.device("cpu")) == 123
    assert resolve_budget("auto", torch.device("cpu")) == pytest.approx(cache_mod._available_host_bytes() / 2, rel=0.2)


@pytest.mark.cuda
def test_device_cache_keeps_keys_and_values_on_the_gpu(store: str) -> None:
    q = _queries(d=6)
    with (
        DualInference(store, device="cuda", block_rows=BLOCK) as plain,
        DualInference(store, device="cuda", block_rows=BLOCK, cache="auto") as cached,
    ):
        ref = plain.attend("net.0", q, top_k=4, contribution_to="pred")
        for _ in range(2):
            res = cached.attend("net.0", q, top_k=4, contribution_to="pred")
            torch.testing.assert_close(res.dual, ref.dual)
            assert torch.equal(res.top.row, ref.top.row)
        kept = cached.layer("net.0").read_kept(0, BLOCK)
        assert kept["keys"].is_cuda and kept["values"].is_cuda and isinstance(kept["step"], np.ndarray)
        assert cached.cache_info().device.startswith("cuda")
