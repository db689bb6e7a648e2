"""One fused CPU pass over a block's ``(n, B)`` score matrix, compiled on first use; torch ops otherwise.

Folding a block into the running results with torch ops costs one full memory pass over the scores per
result (``topk`` three times, ``index_add_`` twice, ``abs``, the contribution product, the mass products),
and on a 2-core CPU these passes cost more than the matrix product that made the scores. This small C
function reads each query's row of scores once, while it is in cache, and updates everything at once:

- the running top-k by score, and by contribution (largest and smallest), with the rows' metadata,
  through a per-query threshold: a row costs one comparison unless it enters the top-k;
- the per-example sums of scores and of contributions (one table row per query stays in cache);
- the signed and absolute attention mass per group.

It is plain C (``_kernels/fused.c``), built at install time and loaded by :mod:`.._native`; ``ctypes`` releases the GIL.
Where it was not built, or with ``LIGHTNING_DUALFORM_KERNEL=0``, the callers fall back to the torch ops,
which give the same results.
"""

from __future__ import annotations

import ctypes

import torch

from lightning_dualform import _native

# The C source is _kernels/fused.c (the body, _kernels/fused_body.h, compiled for T = float and T = double).


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for t in ("float", "double"):
        fn = getattr(lib, f"fold_{t}")
        fn.restype = None
        fn.argtypes = [i64, i64, p, i64, ctypes.c_int, p, i64, i64, p, p, p, p, i64, i64, p, p, p, i64, i64, i64, p, p,
                       p, p, p, i64, p, p, p, p, p, p, p]


def kernel() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` when it was not built at install time or is switched off."""
    return _native.load("fused", _declare)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def fold(
    scores_t: torch.Tensor,
    meta: torch.Tensor,
    *,
    k: int,
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    example: torch.Tensor | None = None,
    example_tab: torch.Tensor | None = None,
    example_contrib_tab: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    mass: tuple[torch.Tensor, torch.Tensor] | None = None,
    units: torch.Tensor | None = None,
    coef_w: torch.Tensor | None = None,
    coef_b: torch.Tensor | None = None,
    pro: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    con: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    example_rows: torch.Tensor | None = None,
) -> None:
    """Fold one block with the compiled pass (CPU tensors, all floats in ``scores_t.dtype``, indices int64).

    Shapes: ``scores_t (B, n)`` (unit column stride), ``meta (B, M)``; top/pro/con ``((n, k), (n, k, M),
    (n,))`` contiguous; ``example (B,)``; tables ``(E, >= n)`` and mass tables ``(Gtot, >= n)`` with unit
    column stride (column slices of wider tables are fine); ``groups (B, G)`` rows of the mass tables;
    ``units (n,)``; ``coef_w``/``coef_b`` ``(B, d_out)``: ``c_w v`` and ``c_b v``, a row's contribution to
    unit ``u`` being ``score * coef_w[:, u] + coef_b[:, u]``; ``example_rows (E,)`` counts the rows per
    example (give it to one call per block).
    """
    lib = kernel()
    if lib is None:
        raise RuntimeError("the fused attention kernel is not available")
    b, n = scores_t.shape
    for t in (scores_t, example_tab, example_contrib_tab, *(mass or ())):
        if t is not None and t.stride(1) != 1:
            raise ValueError("fused.fold needs unit column stride")
    fn = lib.fold_float if scores_t.dtype == torch.float32 else lib.fold_double
    top = top or (None, None, None)
    pro = pro or (None, None, None)
    con = con or (None, None, None)
    ms, ma = mass or (None, None)
    table = example_tab if example_tab is not None else example_contrib_tab
    if example_rows is not None and table is None:
        raise ValueError("fused.fold counts example rows only along with a per-example table")
    fn(
        n, b, scores_t.data_ptr(), scores_t.stride(0), torch.get_num_threads(),
        meta.data_ptr(), meta.shape[1], k,
        *(_ptr(t) for t in top),
        _ptr(example), 0 if table is None else table.shape[0], 0 if table is None else table.stride(0),
        _ptr(example_tab), _ptr(example_contrib_tab),
        _ptr(groups), 0 if groups is None else groups.shape[1], 0 if ms is None else ms.shape[0],
        0 if ms is None else ms.stride(0), _ptr(ms), _ptr(ma),
        _ptr(units), _ptr(coef_w), _ptr(coef_b), 0 if coef_w is None else coef_w.shape[1],
        *(_ptr(t) for t in pro), *(_ptr(t) for t in con), _ptr(example_rows),
    )
