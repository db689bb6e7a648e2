"""Pure functions: the first-order influence of memory rows on queries, given the queries' gradient factors.

A row ``r`` (key ``k``, value ``v``) enters the final weight as ``Q (.) v k^T`` (``Q`` the coefficient of its
step's raw gradient in the final weights: a scalar ``c_s`` for SGD, a matrix ``Q_s`` for element-wise rules;
``docs/dual-form.md``), and the bias as ``Qb (.) v``. Up-weighting the row by ``eps`` therefore moves ``f`` by
``eps`` times

    score[q, r] = <df_q/dW, Q (.) v k^T> + <df_q/db, Qb (.) v>
                = sum_{o, i} D_q[o, i] Q[o, i] v[o] k[i] + sum_o gb_q[o] Qb[o] v[o]

with ``D_q = sum_p g_qp x_qp^T``. For a scalar ``Q = c`` and one position this is ``c (x . k)(g . v)``: two
products. Every function returns ``(n, B)`` in the factors' dtype; tests compare them with the dense einsum.
:func:`dense_scores` scores rows against dense per-query matrices instead of factors (the metagradient's
cotangents ``Lambda_s``, which are no longer outer products).
"""

from __future__ import annotations

import torch

from lightning_dualform.attribute.model import QueryFactors

#: bytes of intermediate products one call may hold (queries are cut into chunks to stay within it)
WORK_BYTES = 128 * 2**20


def _chunks(n: int, per_query: int, itemsize: int) -> list[slice]:
    size = max(1, WORK_BYTES // max(per_query * itemsize, 1))
    return [slice(a, min(a + size, n)) for a in range(0, n, size)]


def scalar_scores(fac: QueryFactors, keys: torch.Tensor, values: torch.Tensor, c_w: torch.Tensor,
                  c_b: torch.Tensor | None) -> torch.Tensor:
    """Scores of rows ``keys (B, d_in)``, ``values (B, d_out)`` whose steps have scalar coefficients ``c_w (B,)``
    (weight) and ``c_b (B,)`` (bias; ``None`` without a bias)."""
    x, g = fac.x, fac.g
    n, P, d_in = x.shape
    d_out = g.shape[2]
    B = keys.shape[0]
    gv = None
    if P == 1:
        gv = g[:, 0] @ values.t()
        out = (x[:, 0] @ keys.t()) * gv * c_w
    elif P * (d_in + d_out) <= d_in * d_out:
        out = torch.empty(n, B, dtype=x.dtype)
        for sl in _chunks(n, P * B, x.element_size()):
            xk = torch.einsum("npi,bi->npb", x[sl], keys)
            gvp = torch.einsum("npo,bo->npb", g[sl], values)
            out[sl] = (xk * gvp).sum(1)
        out *= c_w
    else:
        out = torch.empty(n, B, dtype=x.dtype)
        for sl in _chunks(n, d_out * max(d_in, B), x.element_size()):
            d = torch.einsum("npo,npi->noi", g[sl], x[sl])  # df/dW of the chunk's queries
            t = torch.einsum("noi,bi->nob", d, keys)
            out[sl] = torch.einsum("nob,bo->nb", t, values)
        out *= c_w
    if c_b is not None:
        gb = g.sum(1)
        out += (gb @ values.t()) * c_b
    return out


def elementwise_scores(fac: QueryFactors, keys: torch.Tensor, values: torch.Tensor, q_w: torch.Tensor | float,
                       q_b: torch.Tensor | float | None) -> torch.Tensor:
    """Scores of the rows of one step whose weight coefficient is the matrix ``q_w (d_out, d_in)`` (or a float)
    and bias coefficient ``q_b (d_out,)`` (or a float, or ``None`` without a bias)."""
    n = fac.x.shape[0]
    B = keys.shape[0]
    dt = fac.x.dtype
    if not isinstance(q_w, torch.Tensor) or q_w.dim() == 0:
        c = torch.full((B,), float(q_w), dtype=dt)
        out = scalar_scores(fac, keys, values, c, None)
    else:
        # per query, D_q (.) Q (d_out, d_in) against the block's rows: (n d_out, d_in) x (d_in, B). Nothing of
        # size B x d_out x d_in is made (a step of the paper MLP's first layer would be 640 MB of float64).
        x, g = fac.x, fac.g
        d_out, d_in = q_w.shape
        out = torch.empty(n, B, dtype=dt)
        for sl in _chunks(n, d_out * max(d_in, B), x.element_size()):
            lam = torch.einsum("npo,npi->noi", g[sl], x[sl]).mul_(q_w)
            out[sl] = dense_scores(lam, None, keys, values)
    if q_b is not None:
        gb = fac.g.sum(1)
        qb = q_b if isinstance(q_b, torch.Tensor) else torch.full((values.shape[1],), float(q_b), dtype=dt)
        out += (gb * qb) @ values.t()
    return out


def dense_scores(lam_w: torch.Tensor, lam_b: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor
                 ) -> torch.Tensor:
    """``score[q, r] = v_r^T Lam_q k_r + lam_b_q . v_r`` for dense ``lam_w (n, d_out, d_in)``, ``lam_b (n, d_out)``
    (or ``None``) and rows ``keys (B, d_in)``, ``values (B, d_out)``: one product ``(n d_out, d_in) x (d_in, B)``."""
    n, d_out, d_in = lam_w.shape
    t = (lam_w.reshape(-1, d_in) @ keys.t()).reshape(n, d_out, -1)  # (n, d_out, B)
    out = (t * values.t()[None]).sum(1)
    if lam_b is not None:
        out = out + lam_b @ values.t()
    return out
