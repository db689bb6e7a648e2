"""The blocked functions of ``attention.py`` against dense one-liners over the whole memory."""

from __future__ import annotations

import pytest
import torch

from lightning_dualform.attention import (
    AttentionAccumulator,
    Block,
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


def _run(m: dict[str, torch.Tensor], block_rows: int, query_chunk: int = 3) -> AttentionAccumulator:
    state = AttentionAccumulator(
        queries=m["q"], base=m["base"], top_k=K, units=m["units"], n_examples=N_EX, n_labels=4, n_epochs=3,
        n_step_buckets=4, query_chunk=query_chunk,
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


@pytest.mark.parametrize("block_rows", [1, 10, 32, N_ROWS, 1000])
def test_blocked_equals_dense(memory: dict[str, torch.Tensor], block_rows: int) -> None:
    m = memory
    scores = m["q"] @ m["keys"].t()
    weights = scores * m["c_w"] + m["c_b"]
    state = _run(m, block_rows)
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


def test_query_chunk_does_not_change_results(memory: dict[str, torch.Tensor]) -> None:
    a, b = _run(memory, 17, query_chunk=1), _run(memory, 17, query_chunk=100)
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
        queries=q32.bfloat16(), base=m["base"].float(), top_k=K, exact_queries=q32, with_dual=False, rescore=4,
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
