"""A convolution stored as maps all the way to the compute device: passes read compact blocks (the maps) and
unfold them there, the block cache keeps the maps, and the memory sum ``sum c v k^T`` is the convolution's
weight gradient of its maps. Every answer equals the host-unfold path (``LayerReader.read``'s numpy unfolding,
kept as the reference: ``maps_geometry`` patched to say "no maps")."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_dualform import DualInference, StoreReader
from lightning_dualform.attend import blocks as blocks_mod
from lightning_dualform.attend.passes.outputs import primal_output, rebuilt_output
from lightning_dualform.attend.cache import BlockCache
from lightning_dualform.attend.kernels import fold_memory, fold_memory_maps
from lightning_dualform.attend.memory import memory_sums
from lightning_dualform.layers import conv_maps, keys_of
from test_conv_layout import GEOMETRIES, Zoo, _conv_layers, _fit

BLOCK = 97  # virtual rows per block: blocks start and end inside maps


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv_attend")
    out = {}
    for opt, epochs in (("sgd", 2), ("adamw", 1)):
        model = Zoo(opt)
        cb, _ = _fit(d / f"{opt}.h5", model, epochs=epochs)
        out[opt] = (cb.store_path, model)
    return out


@pytest.fixture(autouse=True)
def compact_on_cpu(monkeypatch):
    """The compact path under test on this CPU too (by default a CPU pass without a cache reads unfolded rows,
    which is faster there: ``blocks.COMPACT_ON_CPU``)."""
    monkeypatch.setattr(blocks_mod, "COMPACT_ON_CPU", True)


def _host_unfold(monkeypatch) -> None:
    """The reference: every pass reads unfolded rows (numpy, on the host), as before compact blocks."""
    monkeypatch.setattr(blocks_mod, "maps_geometry", lambda layer: None)


def _close(a, b, where: str = "") -> None:
    """Two ``to_dict()`` trees equal: integers (rows, indices, labels) exactly, floats to float32 precision."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k in ("rel_err", "max_rel_err"):  # rounding noise (~1e-7) of two exact answers: both small, not equal
                assert a[k] is None or max(np.ravel(a[k])) <= 1e-5, (where, k, a[k])
                continue
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        # float32 sums in another order (a rebuilt dual's weight gradient): within float32 rounding of the largest
        ref = np.asarray(b, dtype=float)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        np.testing.assert_allclose(np.asarray(a, dtype=float), ref, rtol=1e-6, atol=1e-6 * scale + 1e-12, err_msg=where)
    else:
        assert a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)), (where, a, b)


def _queries(model, name: str, n: int = 3) -> torch.Tensor:
    x = torch.randn(n, 2, 7, 6, generator=torch.Generator().manual_seed(7))
    m = dict(model.named_modules())[name]
    return keys_of(m, x.reshape(n, 2, 42) if name == "c1d" else x)[0]


CASES = [
    dict(top_k=3, contribution_to="pred"),
    dict(top_k=2, at_step=2, contribution_to=1),
    dict(top_k=2, score="unit"),
    dict(top_k=2, scan="bf16", per_example=False),
    dict(top_k=0, reuse_certificate=False, mass=False, per_example=False),
]
LAYERS = ["convs.2d-zeros-stride", "convs.2d-reflect-dilation", "convs.2d-replicate", "c1d"]


def _answers(path: str, model, opt: str, cache: str) -> tuple[dict, dict]:
    """Every case's answers on each conv layer, and the device bytes of the last pass and of the cache."""
    out, facts = {}, {}
    with DualInference(path, device="cpu", block_rows=BLOCK, cache=None if cache == "none" else 1 << 26) as di:
        if cache == "tensors":  # float columns kept as tensors: the code path of a CUDA device cache
            di._cache = BlockCache(1 << 26, "cpu", tensors=True)
        # every padding mode, Conv1d and Conv2d, stride and dilation; a cache: two of them
        names = LAYERS if cache == "none" else ["convs.2d-reflect-dilation", "c1d"]
        for name in names:
            q = _queries(model, name)
            cases = CASES[:4] if opt == "sgd" else [dict(top_k=3), dict(top_k=2, score="raw", contribution_to=0)]
            for i, kw in enumerate(cases):
                for _ in range(2 if cache != "none" else 1):  # a cached pass reads what the first kept
                    out[(name, i)] = di.attend(name, q, **kw).to_dict()
            di.attend(name, q, top_k=1, reuse_certificate=False)
            facts[name] = di._last_pass_bytes
        x = torch.randn(2, 2, 7, 6, generator=torch.Generator().manual_seed(3))
        out["explain"] = di.explain(model, x, top_k=2, layers=["convs.2d-reflect-dilation", "head"],
                                    method=None).to_dict()  # (the attention's unfolding is what is compared)
        if di._cache is not None:
            facts["cache"] = di.cache_info().bytes
    return out, facts


@pytest.mark.parametrize("opt,cache", [("sgd", "none"), ("sgd", "host"), ("sgd", "tensors"), ("adamw", "none")])
def test_device_unfold_answers_equal_host_unfold(stores, monkeypatch, opt, cache):
    path, model = stores[opt]
    got, moved = _answers(path, model, opt, cache)
    with monkeypatch.context() as m:
        _host_unfold(m)
        ref, moved_ref = _answers(path, model, opt, cache)
    _close(got, ref)
    if opt == "sgd" and cache != "tensors":  # (a device cache hands the float columns over itself, as tensors)
        # the pass really read maps: fewer bytes to the device, by at least a third of the keys'
        with StoreReader(path) as s:  # (with stride, this test's tiny blocks read about as many map values as keys)
            for name in moved:
                if name == "cache":
                    continue
                lay = s.layer(name)
                if max(lay.geometry.stride) > 1:
                    continue
                keys_bytes = lay.n_rows * lay.d_in * 4
                assert moved_ref[name] - moved[name] >= keys_bytes / 3, (name, moved[name], moved_ref[name], keys_bytes)
    if opt == "sgd" and cache != "none":  # the cache keeps the maps, not the unfolded keys
        assert moved["cache"] < moved_ref["cache"], (moved["cache"], moved_ref["cache"])


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("skip,cut", [(0, 0), (3, 2)])
def test_memory_sum_by_conv_weight_gradient_equals_unfolded(name, skip, cut):
    """Every padding mode, stride, dilation, Conv1d/Conv2d; a block starting and ending inside maps."""
    torch.manual_seed(0)
    make, shape = GEOMETRIES[name]
    layer, x = make().double(), torch.randn(*shape, dtype=torch.float64)
    maps, geom = conv_maps(layer, x)
    keys, _ = keys_of(layer, x)
    n = maps.shape[0] * geom.locations - skip - cut
    cv = torch.randn(n, 3, dtype=torch.float64)
    share = torch.randn(3, dtype=torch.float64)
    ref_w, ref_b = torch.randn(3, geom.d_in, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    w, b = ref_w.clone(), ref_b.clone()
    fold_memory(ref_w, ref_b, keys[skip: skip + n], cv, share)
    fold_memory_maps(w, b, geom, maps, skip, cv, share)
    assert float((w - ref_w).norm() / ref_w.norm()) <= 1e-12
    torch.testing.assert_close(b, ref_b, rtol=0, atol=0)


def test_store_memory_sums_by_conv_weight_gradient_equal_unfolded(stores, monkeypatch):
    path, model = stores["sgd"]
    with StoreReader(path) as s:
        for name in _conv_layers(model):
            lay = s.layer(name)
            coef = lay.coefficients()
            for block_rows in (BLOCK, 16384):  # (blocks_of rounds to whole maps)
                w, b = memory_sums(lay, coef, block_rows=block_rows)
                with monkeypatch.context() as m:
                    _host_unfold(m)
                    ref_w, ref_b = memory_sums(lay, coef, block_rows=block_rows)
                assert float((w - ref_w).norm() / ref_w.norm()) <= 1e-12, name
                if b is not None:
                    assert float((b - ref_b).norm() / ref_b.norm()) <= 1e-12, name
            # and through the prefetcher's compact blocks (a rebuilt dual)
            with DualInference(path, device="cpu", block_rows=BLOCK, accumulate=torch.float64) as di:
                q, lay, cpu = _queries(model, name), di.layer(name), torch.device("cpu")
                dual = rebuilt_output(lay, q, coef, dtype=torch.float64, device=cpu, block_rows=BLOCK)
                torch.testing.assert_close(dual, primal_output(lay, q, torch.float64, cpu), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cache", [None, 1 << 26])
def test_cuda_device_unfold_equals_cpu_host_unfold(stores, monkeypatch, cache):
    path, model = stores["sgd"]
    with DualInference(path, device="cuda", block_rows=BLOCK, accumulate=torch.float64, cache=cache) as di:
        got = {
            name: [di.attend(name, _queries(model, name), **kw).to_dict() for kw in CASES[:3]]
            for name in _conv_layers(model)
        }
        if cache:
            got["again"] = di.attend("c1d", _queries(model, "c1d"), **CASES[0]).to_dict()
    _host_unfold(monkeypatch)
    with DualInference(path, device="cpu", block_rows=BLOCK, accumulate=torch.float64) as di:
        ref = {
            name: [di.attend(name, _queries(model, name), **kw).to_dict() for kw in CASES[:3]]
            for name in _conv_layers(model)
        }
        if cache:
            ref["again"] = ref["c1d"][0]
    _close(got, ref)


def test_a_cpu_pass_without_a_cache_reads_unfolded_rows_and_with_one_reads_maps(stores, monkeypatch):
    """The default on the CPU: no cache, the reader thread's numpy unfold (no transfer to save); with a cache, the
    cache keeps maps. Both give the same answers (the test above)."""
    monkeypatch.setattr(blocks_mod, "COMPACT_ON_CPU", False)
    path, model = stores["sgd"]
    name = next(iter(_conv_layers(model)))
    with DualInference(path, device="cpu") as di:
        assert blocks_mod.compact_geometry(di.layer(name), "cpu") is None
        assert blocks_mod.compact_geometry(di.layer(name), "cuda") is not None
    with DualInference(path, device="cpu", cache="auto") as di:
        assert blocks_mod.compact_geometry(di.layer(name), "cpu") is not None
