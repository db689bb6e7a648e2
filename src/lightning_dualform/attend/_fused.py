"""One fused CPU pass over a block's ``(n, B)`` score matrix, compiled on first use; torch ops otherwise.

Folding a block into the running results with torch ops costs one full memory pass over the scores per
result (``topk`` three times, ``index_add_`` twice, ``abs``, the contribution product, the mass products),
and on a 2-core CPU these passes cost more than the matrix product that made the scores. This small C
function reads each query's row of scores once, while it is in cache, and updates everything at once:

- the running top-k by score, and by contribution (largest and smallest), with the rows' metadata,
  through a per-query threshold: a row costs one comparison unless it enters the top-k;
- the per-example sums of scores and of contributions (one table row per query stays in cache);
- the signed and absolute attention mass per group.

It is plain C, built and cached by :mod:`._native` and called through ``ctypes``, which releases the GIL.
Without a compiler, or with ``LIGHTNING_DUALFORM_KERNEL=0``, the callers fall back to the torch ops,
which give the same results.
"""

from __future__ import annotations

import ctypes

import torch

from lightning_dualform import _native

_HEADER = "#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n#include <math.h>\n#include <omp.h>\n"

# Compiled twice, with T = float and T = double. The scores come transposed, (B, n): one memory row at a
# time, every query's score of it is contiguous, so the per-example and per-group sums are vector adds of
# contiguous rows, and the top-k tests are vector comparisons against per-query thresholds.
_BODY = r"""
static inline void FN(ins)(T* v, int64_t* m, int64_t* cnt, int64_t k, int64_t M, T x, const int64_t* meta) {
    int64_t c = *cnt, p;
    if (c == k) { p = k - 1; } else { p = c; *cnt = c + 1; }
    while (p > 0 && x > v[p - 1]) {
        v[p] = v[p - 1];
        memcpy(m + p * M, m + (p - 1) * M, (size_t)M * sizeof(int64_t));
        p--;
    }
    v[p] = x;
    memcpy(m + p * M, meta, (size_t)M * sizeof(int64_t));
}

/* threshold of a running top-k: -inf until it holds k entries */
static inline T FN(thr)(const T* v, int64_t c, int64_t k) { return c < k ? (T)-INFINITY : v[k - 1]; }

/* One block. ST: (B, n) scores, row stride lds. meta: (B, M). Top-k: (n, k) values best first, (n, k, M)
   metadata, (n,) counts; opponents are kept negated. Tables: (E, ldt) per-example sums, (Gtot, ldm) mass;
   only columns 0..n-1 are touched. A, C: (B, U) contribution coefficients (c_w v, c_b v). Optional results
   are skipped when their pointer is NULL. Threads split the queries (columns). */
void FN(fold)(int64_t n, int64_t B, const T* ST, int64_t lds, int nthreads,
              const int64_t* meta, int64_t M, int64_t k,
              T* top_v, int64_t* top_m, int64_t* top_c,
              const int64_t* ex, int64_t E, int64_t ldt, T* ex_tab, T* exc_tab,
              const int64_t* grp, int64_t G, int64_t Gtot, int64_t ldm, T* m_signed, T* m_abs,
              const int64_t* units, const T* A, const T* C, int64_t U,
              T* pro_v, int64_t* pro_m, int64_t* pro_c, T* con_v, int64_t* con_m, int64_t* con_c, int64_t* ex_rows) {
    if (ex_rows && ex)
        for (int64_t r = 0; r < B; r++) if (ex[r] >= 0 && ex[r] < E) ex_rows[ex[r]]++;
    #pragma omp parallel num_threads(nthreads)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t per = ((n + nt - 1) / nt + 15) / 16 * 16;
        int64_t i0 = id * per, i1 = i0 + per < n ? i0 + per : n;
        int64_t w = i1 - i0;
        if (w > 0) {
            T* thr = (T*)malloc(sizeof(T) * (size_t)(4 * w));
            T *hi = thr + w, *lo = thr + 2 * w, *cr = thr + 3 * w;
            for (int64_t i = i0; i < i1; i++) {
                if (top_v) thr[i - i0] = FN(thr)(top_v + i * k, top_c[i], k);
                if (pro_v) { hi[i - i0] = FN(thr)(pro_v + i * k, pro_c[i], k); lo[i - i0] = -FN(thr)(con_v + i * k, con_c[i], k); }
            }
            for (int64_t r = 0; r < B; r++) {
                const T* s = ST + r * lds;
                const int64_t* mr = meta + r * M;
                if (top_v) {
                    for (int64_t i = i0; i < i1; i += 16) {
                        int64_t j1 = i + 16 < i1 ? i + 16 : i1;
                        int hit = 0;
                        for (int64_t j = i; j < j1; j++) hit |= s[j] > thr[j - i0];
                        if (!hit) continue;
                        for (int64_t j = i; j < j1; j++) {
                            if (s[j] > thr[j - i0]) {
                                FN(ins)(top_v + j * k, top_m + j * k * M, top_c + j, k, M, s[j], mr);
                                thr[j - i0] = FN(thr)(top_v + j * k, top_c[j], k);
                            }
                        }
                    }
                }
                int64_t e = ex ? ex[r] : -1;
                int ok = e >= 0 && e < E;
                if (ex_tab && ok) {
                    T* row = ex_tab + e * ldt;
                    for (int64_t i = i0; i < i1; i++) row[i] += s[i];
                }
                if (m_signed) {
                    for (int64_t g = 0; g < G; g++) {
                        int64_t c = grp[r * G + g];
                        if (c < 0 || c >= Gtot) continue;
                        T* ms = m_signed + c * ldm; T* ma = m_abs + c * ldm;
                        for (int64_t i = i0; i < i1; i++) { ms[i] += s[i]; ma[i] += fabs(s[i]); }
                    }
                }
                if (units) {
                    const T* a = A + r * U; const T* b = C + r * U;
                    for (int64_t i = i0; i < i1; i++) cr[i - i0] = s[i] * a[units[i]] + b[units[i]];
                    if (exc_tab && ok) {
                        T* row = exc_tab + e * ldt;
                        for (int64_t i = i0; i < i1; i++) row[i] += cr[i - i0];
                    }
                    if (pro_v) {
                        for (int64_t i = i0; i < i1; i += 16) {
                            int64_t j1 = i + 16 < i1 ? i + 16 : i1;
                            int hit = 0;
                            for (int64_t j = i; j < j1; j++) hit |= (cr[j - i0] > hi[j - i0]) | (cr[j - i0] < lo[j - i0]);
                            if (!hit) continue;
                            for (int64_t j = i; j < j1; j++) {
                                T c = cr[j - i0];
                                if (c > hi[j - i0]) {
                                    FN(ins)(pro_v + j * k, pro_m + j * k * M, pro_c + j, k, M, c, mr);
                                    hi[j - i0] = FN(thr)(pro_v + j * k, pro_c[j], k);
                                }
                                if (c < lo[j - i0]) {
                                    FN(ins)(con_v + j * k, con_m + j * k * M, con_c + j, k, M, -c, mr);
                                    lo[j - i0] = -FN(thr)(con_v + j * k, con_c[j], k);
                                }
                            }
                        }
                    }
                }
            }
            free(thr);
        }
    }
}
"""

def _source() -> str:
    parts = [_HEADER]
    for t in ("float", "double"):
        parts.append(f"#define T {t}\n#define FN(name) name##_{t}\n{_BODY}\n#undef T\n#undef FN\n")
    return "".join(parts)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for t in ("float", "double"):
        fn = getattr(lib, f"fold_{t}")
        fn.restype = None
        fn.argtypes = [i64, i64, p, i64, ctypes.c_int, p, i64, i64, p, p, p, p, i64, i64, p, p, p, i64, i64, i64, p, p,
                       p, p, p, i64, p, p, p, p, p, p, p]


def kernel() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` when disabled or no compiler works (built once per process)."""
    return _native.load("fused", _source(), _declare, openmp=True)


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
