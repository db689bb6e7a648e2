"""NaN and inf in what a store holds, told apart from a user's bad input.

A user's queries are checked before a pass (:func:`~lightning_dualform.attend.arguments.check_queries`); what
the store hands over is not, row by row, on the hot path. So the rows a check reads as a whole (the recorded
query rows of a query set, the stored keys :meth:`DualInference.verify` samples) are checked where they are read
(:func:`refuse_stored_nonfinite`), and a pass checks only its answer: every row it read is summed into ``dual``
or a mass, and a NaN or inf anywhere in its rows leaves one there. The check costs a few small tensors per call
(:func:`check_answer`); only when it fails are the rows scanned again, to name the damaged ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_dualform.errors import StoreError
from lightning_dualform.store.source import LayerSource

#: row numbers an error names at most
SHOWN = 5


def nonfinite_rows(a: np.ndarray | torch.Tensor) -> list[int]:
    """The rows (along the first dimension) of ``a`` that hold a NaN or inf, in order; ``[]`` when none (a
    0-d array counts as one row)."""
    if isinstance(a, torch.Tensor):
        if not (a.is_floating_point() or a.is_complex()):
            return []
        bad_t = ~torch.isfinite(a)
        if a.dim() == 0:
            return [0] if bool(bad_t) else []
        return bad_t.reshape(a.shape[0], -1).any(dim=1).nonzero().reshape(-1).tolist()
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return []
    bad = ~np.isfinite(a)
    if a.ndim == 0:
        return [0] if bool(bad) else []
    return np.flatnonzero(bad.reshape(a.shape[0], -1).any(axis=1)).tolist()


def shown(rows: list[int] | np.ndarray) -> str:
    """``[3, 17, 20, 21, 30, ... (12 in all)]``: the first few of a list of numbers."""
    rows = [int(r) for r in rows]
    more = f", ... ({len(rows)} in all)" if len(rows) > SHOWN else ""
    return "[" + ", ".join(map(str, rows[:SHOWN])) + more + "]"


def refuse_stored_nonfinite(path: str, where: str, rows: list[int] | np.ndarray, unit: str = "rows") -> None:
    """Raise :class:`~lightning_dualform.errors.StoreError` naming ``rows`` of ``where`` (``"layer 'net.0': stored
    training keys"``) as damaged; nothing when ``rows`` is empty. ``unit`` says what the numbers are."""
    if len(rows):
        raise StoreError(
            f"{path}: {where}: {unit} {shown(rows)} hold NaN or inf: the store is damaged (or the recorded training "
            "diverged, its loss gone NaN or inf). Nothing exact can be answered from them; restore the file from a "
            "copy, or record the run again."
        )


def scan_rows(layer: LayerSource, n_rows: int, block_rows: int) -> tuple[dict[str, list[int]], dict[str, float]]:
    """A second pass over the first ``n_rows`` stored rows of ``layer`` (for naming them, once an answer is known
    to be damaged): ``({column: rows holding NaN or inf}, {column: the largest finite magnitude})`` of the keys
    and the values."""
    bad: dict[str, list[int]] = {"keys": [], "values": []}
    peak = {"keys": 0.0, "values": 0.0}
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        blk = layer.read(start, stop, ("keys", "values"))
        for col in ("keys", "values"):
            a = torch.as_tensor(_host(blk[col]))
            bad[col] += [start + r for r in nonfinite_rows(a)]
            finite = a[torch.isfinite(a)]
            if finite.numel():
                peak[col] = max(peak[col], float(finite.abs().max()))
    return {c: r for c, r in bad.items() if r}, peak


def check_answer(layer: LayerSource, res: Any, *, path: str, queries: torch.Tensor, block_rows: int) -> None:
    """Refuse an answer that holds NaN or inf: its queries are finite (checked before the pass), so the store is
    damaged (a :class:`StoreError` naming the rows or the weights) or, where everything stored is finite and large
    enough, the products overflowed.

    What is checked is what the pass summed every row into: ``dual``, the unit outputs, the masses and the top
    scores, and ``primal`` (``n x (2 d_out + groups + k)`` numbers, whatever the layer's size).

    Raises:
        StoreError: stored key or value rows, or the stored final weights, hold NaN or inf; or they are finite and
            too small to overflow, so the layer's other stored numbers (initial weights, optimizer state, per-step
            tables) are damaged.
        ValueError: everything stored is finite, but large enough with these queries to overflow the products.
    """
    parts: list[torch.Tensor | None] = [res.dual, res.primal, res.unit_output]
    parts += [t for m in res.mass.values() for t in (m.signed, m.absolute)]
    parts += [getattr(getattr(res, name), "score", None)
              for name in ("top", "top_examples", "proponents", "opponents", "proponent_examples", "opponent_examples")]
    if all(bool(torch.isfinite(t).all()) for t in parts if t is not None):
        return
    bad, peak = scan_rows(layer, res.rows, block_rows)
    for col, rows in bad.items():
        what = "training keys" if col == "keys" else "training values (loss gradients)"
        refuse_stored_nonfinite(path, f"layer {layer.name!r}: stored {what}", rows)
    for name in ("weight_final", "bias_final"):
        final = getattr(layer, name, None)
        if res.primal is not None and final is not None and nonfinite_rows(np.asarray(final)):
            refuse_stored_nonfinite(path, f"layer {layer.name!r}: the stored final weights ({name})",
                                    nonfinite_rows(np.asarray(final)))
    # |k . q| <= d_in max|k| max|q|, and a sum over the rows adds at most n_rows such terms times max|v|: with room
    # for the per-step coefficients (1e6), can the products overflow the pass's dtype at all?
    big = float(queries.abs().max()) if queries.numel() else 0.0
    bound = max(res.rows, 1) * layer.d_in * big * peak["keys"] * max(peak["values"], 1.0)
    top = float(torch.finfo(res.dual.dtype).max)
    if bound * 1e6 < top:
        raise StoreError(
            f"{path}: layer {layer.name!r}: the answer holds NaN or inf, though the queries and the {res.rows} stored "
            "rows it read are finite and too small for their products to overflow: the layer's other stored numbers "
            "(initial weights, optimizer state, per-step tables) are damaged. Restore the file from a copy, or "
            "record the run again (`lightning-dualform verify` checks a store)."
        )
    raise ValueError(
        f"{path}: layer {layer.name!r}: the answer holds NaN or inf, though the queries and the {res.rows} stored rows "
        f"it read are finite: their products overflow {res.dual.dtype} (the largest query magnitude is {big:.3g}, the "
        f"largest key {peak['keys']:.3g}). Scale the queries down, or open the store with "
        "DualInference(..., accumulate=torch.float64)."
    )


def _host(a: Any) -> np.ndarray | torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else np.asarray(a)
