"""The blocked functions of ``attention.py`` against dense one-liners over the whole memory."""

from __future__ import annotations

import threading

import pytest
import torch

from lightning_dualform.attend import _fused
from lightning_dualform.attend.kernels import (
    META_COLUMNS,
    AttentionAccumulator,
    Block,
    bf16_score_bound,
    block_scores,
    fold_memory,
    merge_topk,
    scatter_sum,
    step_bucket,
    step_bucket_edges,
)

N_ROWS, D_IN, D_OUT, N_Q, N_EX, K = 103, 9, 5, 7, 20, 6


@pytest.fixture(scope="module")
def memory() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    step = torch.sort(torch.randint(0, 30, (N_ROWS,), generator=g)).values
    index = torch.randint(-1, N_EX, (N_ROWS,), generator=g)  # some rows with unknown index
    return {
        "q": torch.randn(N_Q, D_IN, generator=g, dtype=torch.float64),
        "keys": torch.randn(N_ROWS, D_IN, generator=g, dtype=torch.float64),
        "values": torch.randn(N_ROWS, D_OUT, generator=g, dtype=torch.float64),
        "c_w": -0.1 * torch.rand(N_ROWS, generator=g, dtype=torch.float64),
        "c_b": -0.1 * torch.rand(N_ROWS, generator=g, dtype=torch.float64),
        "base": torch.randn(N_Q, D_OUT, generator=g, dtype=torch.float64),
        "units": torch.randint(0, D_OUT, (N_Q,), generator=g),
        "step": step,
        "epoch": step // 10,
        "index": index,
        "position": torch.zeros(N_ROWS, dtype=torch.int64),
        "label": torch.randint(-1, 3, (N_ROWS,), generator=g),
        "row": torch.arange(N_ROWS),
    }


# every way of folding a block: torch ops or the compiled single pass, dual as attention or as rebuilt weights
MODES = [
    pytest.param({"fused": False, "rebuild_weights": False}, id="torch"),
    pytest.param({"fused": False, "rebuild_weights": True}, id="torch-weights"),
    pytest.param({"fused": True, "rebuild_weights": False}, id="fused",
                 marks=pytest.mark.skipif(_fused.kernel() is None, reason="no C compiler for the fused kernel")),
    pytest.param({"fused": True, "rebuild_weights": True}, id="fused-weights",
                 marks=pytest.mark.skipif(_fused.kernel() is None, reason="no C compiler for the fused kernel")),
]


def _run(m: dict[str, torch.Tensor], block_rows: int, query_chunk: int = 3, **mode: bool) -> AttentionAccumulator:
    state = AttentionAccumulator(
        queries=m["q"], base=m["base"], top_k=K, units=m["units"], n_examples=N_EX, n_labels=4, n_epochs=3,
        n_step_buckets=4, query_chunk=query_chunk, **mode,
    )
    for s in range(0, N_ROWS, block_rows):
        sl = slice(s, s + block_rows)
        meta = {c: m[c][sl] for c in ("row", "step", "epoch", "index", "position", "label")}
        state.fold(
            Block(
                keys=m["keys"][sl], values=m["values"][sl], c_w=m["c_w"][sl], c_b=m["c_b"][sl], meta=meta,
                label_group=m["label"][sl] + 1, step_group=step_bucket(m["step"][sl], 0, 30, 4),
            )
        )
    return state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_rows", [1, 10, 32, N_ROWS, 1000])
def test_blocked_equals_dense(memory: dict[str, torch.Tensor], block_rows: int, mode: dict) -> None:
    m = memory
    scores = m["q"] @ m["keys"].t()
    weights = scores * m["c_w"] + m["c_b"]
    state = _run(m, block_rows, **mode)
    assert state.rows_seen == N_ROWS
    torch.testing.assert_close(state.dual, m["base"] + weights @ m["values"], rtol=1e-12, atol=1e-12)

    ref_top = torch.topk(scores, K, dim=1)
    top, meta = state.top_rows()
    torch.testing.assert_close(top, ref_top.values)
    assert torch.equal(meta["row"], ref_top.indices)
    assert torch.equal(meta["step"], m["step"][ref_top.indices])
    assert torch.equal(meta["label"], m["label"][ref_top.indices])

    contrib = weights * m["values"][:, m["units"]].t()
    pro, pro_meta = state.proponents()
    con, con_meta = state.opponents()
    torch.testing.assert_close(pro, torch.topk(contrib, K, dim=1).values)
    assert torch.equal(pro_meta["row"], torch.topk(contrib, K, dim=1).indices)
    torch.testing.assert_close(con, torch.topk(contrib, K, dim=1, largest=False).values)
    assert torch.equal(con_meta["row"], torch.topk(contrib, K, dim=1, largest=False).indices)

    ok = m["index"] >= 0
    ref_ex = torch.zeros(N_Q, N_EX, dtype=torch.float64).scatter_add(1, m["index"][ok].expand(N_Q, -1), scores[:, ok])
    torch.testing.assert_close(state.example_score, ref_ex, rtol=1e-12, atol=1e-12)
    ref_exc = torch.zeros(N_Q, N_EX, dtype=torch.float64).scatter_add(1, m["index"][ok].expand(N_Q, -1), contrib[:, ok])
    torch.testing.assert_close(state.example_contrib, ref_exc, rtol=1e-12, atol=1e-12)
    assert torch.equal(state.example_rows, torch.bincount(m["index"][ok], minlength=N_EX))

    for name, group, width in (
        ("label", m["label"] + 1, 4),
        ("epoch", m["epoch"], 3),
        ("step", step_bucket(m["step"], 0, 30, 4), 4),
    ):
        signed, absolute = state.mass[name]
        ref_s = torch.zeros(N_Q, width, dtype=torch.float64).scatter_add(1, group.expand(N_Q, -1), scores)
        ref_a = torch.zeros(N_Q, width, dtype=torch.float64).scatter_add(1, group.expand(N_Q, -1), scores.abs())
        torch.testing.assert_close(signed, ref_s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(absolute, ref_a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_query_chunk_does_not_change_results(memory: dict[str, torch.Tensor], mode: dict) -> None:
    a, b = _run(memory, 17, query_chunk=1, **mode), _run(memory, 17, query_chunk=100, **mode)
    torch.testing.assert_close(a.dual, b.dual)
    assert torch.equal(a.top_rows()[1]["row"], b.top_rows()[1]["row"])
    torch.testing.assert_close(a.example_score, b.example_score)


@pytest.mark.parametrize("largest", [True, False])
def test_merge_topk_equals_torch_topk(largest: bool) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 50, generator=g)
    rows = torch.arange(50)
    best, meta = None, None
    for s in range(0, 50, 7):
        best, meta = merge_topk(best, meta, scores[:, s : s + 7], {"row": rows[s : s + 7]}, 5, largest=largest)
    ref = torch.topk(scores, 5, dim=1, largest=largest)
    assert torch.equal(best, ref.values)
    assert torch.equal(meta["row"], ref.indices)


def test_merge_topk_with_fewer_rows_than_k() -> None:
    best, meta = merge_topk(None, None, torch.tensor([[3.0, 1.0]]), {"row": torch.tensor([0, 1])}, 5)
    assert best.tolist() == [[3.0, 1.0]] and meta["row"].tolist() == [[0, 1]]


def test_scatter_sum_equals_scatter_add_and_skips_unknown() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g)
    group = torch.randint(-1, 6, (40,), generator=g)
    acc = scatter_sum(torch.zeros(3, 6), group, x)
    ok = group >= 0
    ref = torch.zeros(3, 6).scatter_add(1, group[ok].expand(3, -1), x[:, ok])
    torch.testing.assert_close(acc, ref)


@pytest.mark.parametrize("first,end,n", [(0, 30, 4), (5, 6, 3), (10, 107, 10), (0, 3, 10)])
def test_step_buckets_cover_the_range(first: int, end: int, n: int) -> None:
    steps = torch.arange(first, end)
    b = step_bucket(steps, first, end, n)
    edges = step_bucket_edges(first, end, n)
    assert int(b.min()) >= 0 and int(b.max()) <= n - 1
    assert torch.all(b[1:] >= b[:-1])
    for s, bucket in zip(steps.tolist(), b.tolist()):
        assert edges[bucket] <= s < max(edges[bucket + 1], s + 1)


def test_bf16_scan_rescoring_keeps_exact_scores(memory: dict[str, torch.Tensor]) -> None:
    m = memory
    q32, k32 = m["q"].float(), m["keys"].float()
    state = AttentionAccumulator(
        queries=q32.bfloat16(), base=m["base"].float(), top_k=K, exact_queries=q32, with_dual=False,
    )
    for s in range(0, N_ROWS, 25):
        sl = slice(s, s + 25)
        meta = {c: m[c][sl] for c in ("row", "step", "epoch", "index", "position", "label")}
        state.fold(Block(keys=k32[sl].bfloat16(), values=m["values"][sl].float(), c_w=m["c_w"][sl].float(),
                         c_b=m["c_b"][sl].float(), meta=meta, exact_keys=k32[sl]))
    top, meta = state.top_rows()
    exact = q32 @ k32.t()
    # the kept scores are exact float32 scores of the kept rows, and (here) the same rows as the exact top-k
    torch.testing.assert_close(top, exact.gather(1, meta["row"]))
    assert torch.equal(meta["row"], torch.topk(exact, K, dim=1).indices)
    torch.testing.assert_close(state.dual, m["base"].float())  # with_dual=False leaves the base alone


def test_bf16_score_bound_holds() -> None:
    """The rounding bound the bf16 scan relies on, against float64 scores, on keys of very different sizes."""
    g = torch.Generator().manual_seed(3)
    for d in (7, 784, 4096):
        q = torch.randn(64, d, generator=g) * torch.rand(64, 1, generator=g) * 10
        k = torch.randn(500, d, generator=g) * torch.rand(500, 1, generator=g).pow(4) * 100
        scan = block_scores(q.bfloat16(), k.bfloat16()).double()
        err = (scan - q.double() @ k.double().t()).abs().amax(dim=1)
        bound = bf16_score_bound(q, k).double()
        assert bool((err <= bound).all()), float((err / bound).max())
        assert float((err / bound).max()) > 1e-3  # and not vacuous


@pytest.mark.parametrize(
    "kw", [{"with_dual": False}, {"rebuild_weights": True}, {}], ids=["no-dual", "weights", "dual"]
)
def test_torch_ops_top_k_alone(memory: dict[str, torch.Tensor], kw: dict) -> None:
    """Top-k with nothing else asked (no mass, no per-example sums, no units) on the torch-op path."""
    m = memory
    q, k32 = m["q"].float(), m["keys"].float()
    state = AttentionAccumulator(queries=q, base=m["base"].float(), top_k=K, fused=False, **kw)
    for s in range(0, N_ROWS, 25):
        sl = slice(s, s + 25)
        state.fold(
            Block(
                keys=k32[sl],
                values=m["values"][sl].float(),
                c_w=m["c_w"][sl].float(),
                c_b=m["c_b"][sl].float(),
                meta={c: m[c][sl] for c in META_COLUMNS},
            )
        )
    top, meta = state.top_rows()
    ref = torch.topk(q @ k32.t(), K, dim=1)
    assert torch.equal(meta["row"], ref.indices)
    torch.testing.assert_close(top, ref.values)


@pytest.mark.parametrize("case", ["zero-queries", "outlier-key", "tiny-block"])
def test_bf16_scan_top_k_in_degenerate_blocks(case: str) -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(120, 16, generator=g)
    q = torch.randn(4, 16, generator=g)
    k, block = 5, 40
    if case == "zero-queries":
        q[1:3] = 0  # every score ties at 0: every row is a candidate
    elif case == "outlier-key":
        keys[7] *= 1000  # one huge key widens the block's bound
    else:
        block = 1
    state = AttentionAccumulator(
        queries=q.bfloat16(), base=torch.zeros(4, 2), top_k=k, exact_queries=q, with_dual=False
    )
    for s in range(0, len(keys), block):
        sl = slice(s, s + block)
        n = keys[sl].shape[0]
        state.fold(Block(keys=keys[sl].bfloat16(), values=torch.zeros(n, 2), c_w=torch.ones(n), c_b=torch.zeros(n),
                         meta={c: torch.arange(len(keys))[sl] for c in META_COLUMNS}, exact_keys=keys[sl]))
    top, found = state.top_rows()
    exact = q @ keys.t()
    torch.testing.assert_close(top, torch.topk(exact, k, dim=1).values, rtol=1e-6, atol=1e-6)
    assert bool((found["row"] >= 0).all())
    torch.testing.assert_close(exact.gather(1, found["row"]), top, rtol=1e-6, atol=1e-6)


def test_bf16_scan_finds_the_exact_top_k_among_near_ties() -> None:
    """Rows that bf16 cannot tell apart: a fixed number of candidates per block would pick arbitrary ones;
    re-scoring every row within the rounding bound keeps exactly the true top-k."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 64, generator=g) + 0.5
    keys = base + 1e-4 * torch.randn(300, 64, generator=g)  # identical in bfloat16, distinct in float32
    q = torch.rand(5, 64, generator=g) + 0.5
    n, k = keys.shape[0], 3
    meta = {c: torch.arange(n) for c in META_COLUMNS}
    state = AttentionAccumulator(
        queries=q.bfloat16(), base=torch.zeros(5, 2), top_k=k, exact_queries=q, with_dual=False
    )
    for s in range(0, n, 100):
        sl = slice(s, s + 100)
        state.fold(
            Block(
                keys=keys[sl].bfloat16(),
                values=torch.zeros(100, 2),
                c_w=torch.ones(100),
                c_b=torch.zeros(100),
                meta={c: v[sl] for c, v in meta.items()},
                exact_keys=keys[sl],
            )
        )
    top, found = state.top_rows()
    exact = q @ keys.t()
    ref = torch.topk(exact, k, dim=1)
    assert torch.equal(found["row"], ref.indices)
    torch.testing.assert_close(top, ref.values, rtol=1e-6, atol=1e-6)
    scan = block_scores(q.bfloat16(), keys.bfloat16())
    assert int((scan == scan.amax(dim=1, keepdim=True)).sum(dim=1).min()) > 4 * k  # the ties are real


@pytest.mark.skipif(_fused.kernel() is None, reason="no C compiler for the fused kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_torch_ops(memory: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The compiled pass and the torch ops agree on every result, in both accumulation dtypes."""
    m = {k: v.to(dtype) if v.is_floating_point() else v for k, v in memory.items()}
    a, b = _run(m, 16, fused=False), _run(m, 16, fused=True)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(a.dual, b.dual, **tol)
    for get in ("top_rows", "proponents", "opponents"):
        (va, ma), (vb, mb) = getattr(a, get)(), getattr(b, get)()
        torch.testing.assert_close(va, vb, **tol)
        for col in ma:
            assert torch.equal(ma[col], mb[col]), (get, col)
    torch.testing.assert_close(a.example_score, b.example_score, **tol)
    torch.testing.assert_close(a.example_contrib, b.example_contrib, **tol)
    for name in a.mass:
        torch.testing.assert_close(a.mass[name][0], b.mass[name][0], **tol)
        torch.testing.assert_close(a.mass[name][1], b.mass[name][1], **tol)


@pytest.mark.skipif(_fused.kernel() is None, reason="no C compiler for the fused kernel")
def test_fused_top_k_with_fewer_rows_than_k(memory: dict[str, torch.Tensor]) -> None:
    m = memory
    state = AttentionAccumulator(queries=m["q"], base=m["base"], top_k=K, units=m["units"], fused=True)
    meta = {c: m[c][:3] for c in ("row", "step", "epoch", "index", "position", "label")}
    state.fold(Block(keys=m["keys"][:3], values=m["values"][:3], c_w=m["c_w"][:3], c_b=m["c_b"][:3], meta=meta))
    top, meta = state.top_rows()
    ref = torch.topk(m["q"] @ m["keys"][:3].t(), 3, dim=1)
    assert top.shape == (N_Q, 3) and torch.equal(meta["row"], ref.indices)


class _Threads:
    """Collectives between threads of one process, to test :meth:`AttentionAccumulator.reduce` without
    ``torch.distributed``: every participant calls the same collectives in the same order."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def ops(self, rank: int):
        def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            out = [s.clone() for s in self.slots]
            self.barrier.wait()
            return out

        def all_reduce(t: torch.Tensor) -> None:
            t.copy_(sum(all_gather(t)))

        return all_reduce, all_gather


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world,block_rows", [(2, 10), (3, 32), (4, 50)])  # (4, 50): a participant with no block
def test_reduce_of_shares_equals_one_pass(
    memory: dict[str, torch.Tensor], mode: dict, world: int, block_rows: int
) -> None:
    m = memory
    whole = _run(m, block_rows, **mode)
    blocks = [slice(s, s + block_rows) for s in range(0, N_ROWS, block_rows)]
    per = -(-len(blocks) // world)
    parts = []
    for rank in range(world):
        state = AttentionAccumulator(
            queries=m["q"], base=m["base"] if rank == 0 else torch.zeros_like(m["base"]), top_k=K, units=m["units"],
            n_examples=N_EX, n_labels=4, n_epochs=3, n_step_buckets=4, query_chunk=3, **mode,
        )
        for sl in blocks[rank * per : (rank + 1) * per]:
            meta = {c: m[c][sl] for c in ("row", "step", "epoch", "index", "position", "label")}
            state.fold(Block(keys=m["keys"][sl], values=m["values"][sl], c_w=m["c_w"][sl], c_b=m["c_b"][sl], meta=meta,
                             label_group=m["label"][sl] + 1, step_group=step_bucket(m["step"][sl], 0, 30, 4)))
        parts.append(state)
    group = _Threads(world)
    threads = [threading.Thread(target=p.reduce, args=group.ops(r)) for r, p in enumerate(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in parts:  # every participant holds the whole result
        assert p.rows_seen == N_ROWS
        torch.testing.assert_close(p.dual, whole.dual, rtol=1e-12, atol=1e-12)
        for get in ("top_rows", "proponents", "opponents"):
            (va, ma), (vb, mb) = getattr(p, get)(), getattr(whole, get)()
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12)
            for col in ma:
                assert torch.equal(ma[col], mb[col]), (get, col)
        torch.testing.assert_close(p.example_score, whole.example_score, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p.example_contrib, whole.example_contrib, rtol=1e-12, atol=1e-12)
        assert torch.equal(p.example_rows, whole.example_rows)
        for name in whole.mass:
            torch.testing.assert_close(p.mass[name][0], whole.mass[name][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(p.mass[name][1], whole.mass[name][1], rtol=1e-12, atol=1e-12)


def test_fold_memory_equals_the_dense_sum(memory: dict[str, torch.Tensor]) -> None:
    """The one kernel of ``sum_rows c_w v k^T`` (and of the bias), block by block, against the dense product."""
    m = memory
    w = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    b = torch.zeros(D_OUT, dtype=torch.float64)
    for s in range(0, N_ROWS, 7):
        sl = slice(s, s + 7)
        fold_memory(w, b, m["keys"][sl], m["values"][sl] * m["c_w"][sl, None], m["c_b"][sl] @ m["values"][sl])
    torch.testing.assert_close(w, (m["values"] * m["c_w"][:, None]).t() @ m["keys"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b, m["c_b"] @ m["values"], rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(_fused.kernel() is None, reason="no C compiler for the fused kernel")
def test_fused_and_torch_ops_break_ties_alike(memory: dict[str, torch.Tensor]) -> None:
    """Whether a compiler is present must not change an answer: with many exactly equal scores (repeated
    keys and values), the compiled pass and the torch ops keep the same rows in the same order."""
    m = dict(memory)
    reps = N_ROWS // 8
    m["keys"] = m["keys"][:8].repeat(reps + 1, 1)[:N_ROWS].contiguous()
    m["values"] = m["values"][:8].repeat(reps + 1, 1)[:N_ROWS].contiguous()
    m["c_w"] = torch.full((N_ROWS,), -0.05, dtype=torch.float64)
    m["c_b"] = torch.full((N_ROWS,), -0.01, dtype=torch.float64)
    for block_rows in (16, N_ROWS):
        a, b = _run(m, block_rows, fused=False), _run(m, block_rows, fused=True)
        for get in ("top_rows", "proponents", "opponents"):
            (va, ma), (vb, mb) = getattr(a, get)(), getattr(b, get)()
            torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12)
            assert torch.equal(ma["row"], mb["row"]), (get, block_rows, ma["row"][0], mb["row"][0])


def test_compiled_kernels_are_the_installed_libraries_and_can_be_switched_off(monkeypatch):
    """The kernels come from the package's own _kernels/ folder (built by setup.py at install time), never
    from a compiler at run time; LIGHTNING_DUALFORM_KERNEL=0 turns them off."""
    import os

    from lightning_dualform import _native

    lib = _fused.kernel()
    if lib is None:  # not built at install time, or switched off for this run: the torch ops answer
        assert _native.path("fused") is None or not _native.enabled()
    else:
        assert os.path.dirname(lib._name) == os.path.dirname(os.path.abspath(_native.__file__)) + os.sep + "_kernels"
    monkeypatch.setenv("LIGHTNING_DUALFORM_KERNEL", "0")
    monkeypatch.setattr(_native, "_loaded", {})
    assert _native.load("fused", lambda lib: None) is None
