"""The exactness certificate: rebuild each layer's weights from the store and compare with the real ones.

``W_rebuilt = a W_0 + sum_rows c_step(row) v_row k_row^T`` (float64, streamed in blocks). The relative
Frobenius error against the stored final weights is the certificate; it is written into the store.
For an inexact run (``exact=False``) the residual ``W_final - W_rebuilt`` is stored too, so that answers
can add it back and say how much of the output the memory explains.
"""

from __future__ import annotations

import h5py
import numpy as np
import torch

from lightning_dualform.store import LayerReader, StoreReader

#: Relative error up to which a float32 store counts as exact (float32 round-off over many steps).
EXACT_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def rebuild_weights(
    layer: LayerReader, at_step: int | None = None, *, block_rows: int = 16384, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's weight ``(d_out, d_in)`` and bias ``(d_out,)`` rebuilt from its initial values and memory."""
    coef = layer.coefficients(at_step)
    n = layer.rows_before(coef.end_step)
    w0, b0 = layer.base_weights(coef=coef, with_residual=False)
    w = torch.from_numpy(w0).to(dtype)
    b = torch.from_numpy(b0).to(dtype) if b0 is not None else None
    c_w = torch.from_numpy(coef.c_w).to(dtype)
    c_b = torch.from_numpy(coef.c_b).to(dtype)
    for start in range(0, n, block_rows):
        blk = layer.read(start, min(start + block_rows, n), ("keys", "values", "step"))
        upd = torch.from_numpy(blk["step"] - coef.first_step)
        k = torch.from_numpy(blk["keys"]).to(dtype)
        v = torch.from_numpy(blk["values"]).to(dtype)
        w += (v * c_w[upd, None]).t() @ k
        if b is not None:
            b += (v * c_b[upd, None]).sum(0)
    return w, b


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    denom = float(torch.linalg.norm(ref))
    return float(torch.linalg.norm(err)) / denom if denom > 0 else float(torch.linalg.norm(err))


def certify_store(path: str) -> dict[str, dict[str, float]]:
    """Compute, store and return each layer's certificate.

    Returns:
        ``{layer: {"rel_err", "rel_err_weight", "rel_err_bias", "explained", "exact"}}``; ``explained`` is
        ``1 - ||residual|| / ||W_final||`` (1.0 for an exact store).
    """
    results: dict[str, dict[str, float]] = {}
    residuals: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    with StoreReader(path) as store:
        tol = EXACT_TOLERANCE[store.row_dtype]
        for name in store.layers:
            layer = store.layer(name)
            if layer.weight_final is None:
                continue
            w, b = rebuild_weights(layer)
            wf = torch.from_numpy(layer.weight_final).double()
            rw = wf - w
            err_w = _rel(rw, wf)
            err_b = 0.0
            rb = None
            if b is not None:
                bf = torch.from_numpy(layer.bias_final).double()
                rb = bf - b
                err_b = _rel(rb, bf)
            err = max(err_w, err_b)
            results[name] = {
                "rel_err": err,
                "rel_err_weight": err_w,
                "rel_err_bias": err_b,
                "explained": max(0.0, 1.0 - err),
                "exact": bool(err <= tol and layer.exact and store.optimizer_exact),
            }
            if not store.optimizer_exact:
                residuals[name] = (rw.float().numpy(), rb.float().numpy() if rb is not None else None)
    with h5py.File(path, "r+") as f:
        for name, cert in results.items():
            g = f["layers"][name]
            for k, v in cert.items():
                g.attrs[f"certificate_{k}"] = v
            if name in residuals:
                rw, rb = residuals[name]
                for dname, data in (("weight_residual", rw), ("bias_residual", rb)):
                    if data is None:
                        continue
                    if dname in g:
                        del g[dname]
                    g.create_dataset(dname, data=data)
    return results
