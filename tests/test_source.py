"""``store.source.LayerSource``: the interface every layer reader offers and every pass reads through."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from helpers import small_sgd_store
from lightning_dualform import DualInference, StoreReader
from lightning_dualform.attend.cache import BlockCache, CachedLayer
from lightning_dualform.attend.passes import PassContext, ScalarPass
from lightning_dualform.attend.request import AttendRequest
from lightning_dualform.store.shards import ShardedLayerReader
from lightning_dualform.store.source import LayerSource

MEMBERS = sorted(set(LayerSource.__annotations__) | {n for n in vars(LayerSource) if not n.startswith("_")})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return small_sgd_store(str(tmp_path_factory.mktemp("source") / "s.h5"))


def test_every_layer_reader_is_a_layer_source(store) -> None:
    assert {"read", "read_maps", "rows_before", "coefficients", "geometry", "weight_final"} <= set(MEMBERS)
    with StoreReader(store) as s:
        lay = s.layer("net.2")
        readers = {"file": lay, "shards": ShardedLayerReader(s, [lay]), "cache": CachedLayer(lay, BlockCache(1 << 20))}
        for kind, reader in readers.items():
            assert isinstance(reader, LayerSource), kind
            missing = [m for m in MEMBERS if not hasattr(reader, m)]
            assert not missing, (kind, missing)
        assert readers["shards"].geometry is None  # shards serve unfolded rows only
    assert not isinstance(object(), LayerSource)


class _MemoryLayer:
    """A layer held in memory that offers exactly the members of LayerSource (no forwarding of anything else):
    a pass that read anything beyond the protocol would fail here."""

    def __init__(self, lay: typing.Any) -> None:
        self._lay = lay
        self._rows = lay.read(0, lay.n_rows)
        for name in (
            "name",
            "kind",
            "d_in",
            "d_out",
            "has_bias",
            "n_rows",
            "exact",
            "attrs",
            "certificate",
            "store",
            "geometry",
            "weight_init",
            "bias_init",
            "weight_final",
            "bias_final",
            "weight_residual",
            "bias_residual",
        ):
            setattr(self, name, getattr(lay, name))
        for name in ("read_maps", "rows_before", "end_step", "updates", "coefficients", "base_weights", "initial_state",
                     "to_view", "to_param", "stored_memory_sums"):
            setattr(self, name, getattr(lay, name))

    def read(self, start: int, stop: int, columns: tuple[str, ...] = ("keys", "values")) -> dict[str, np.ndarray]:
        stop = min(stop, self.n_rows)
        return {c: self._rows[c][start:stop].copy() for c in columns}


def test_a_pass_reads_only_through_the_protocol(store) -> None:
    """The scalar pass over a layer kept in memory answers as over the file, bit for bit."""
    q = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    req = AttendRequest(top_k=4, contribution_to="pred", step_buckets=3)
    with DualInference(store, device="cpu", block_rows=16) as di:
        want = di.attend("net.2", q, request=req)
        mem = _MemoryLayer(di.layer("net.2"))
        assert isinstance(mem, LayerSource)
        ctx = PassContext(store=di.store, device=torch.device("cpu"), accumulate=torch.float32, query_chunk=2048,
                          block_rows=16)
        answer = ScalarPass(ctx)
        got = answer.run(mem, q, answer.prepare(req, output_layer=True))
    for a, b in zip(_flat(got.to_dict()), _flat(want.to_dict())):
        assert a == b


def _flat(d: typing.Any) -> list:
    if isinstance(d, dict):
        return [x for k in sorted(d) for x in [k, *_flat(d[k])]]
    if isinstance(d, list):
        return [x for v in d for x in _flat(v)]
    return [d]
