"""Checking a store against itself through the inference pass: ``DualInference.verify`` (the dual summed
from the rows against the stored final weights) and ``stored_sums_error`` (the certificate's kept sums)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from lightning_dualform._args import as_int
from lightning_dualform.attend.finite import nonfinite_rows, refuse_stored_nonfinite
from lightning_dualform.attend.passes.assemble import norm_rows
from lightning_dualform.errors import StoreError

if TYPE_CHECKING:
    from lightning_dualform.attend.inference import DualInference


def stored_sums_error(di: "DualInference", layer: str) -> float | None:
    """Relative error of the final weights rebuilt from the certificate's stored memory sums (what
    :meth:`attend` uses by default for ``dual`` at the end of a complete store) against the stored final
    weights; None when the store keeps no such sums for the layer. For a store of an element-wise rule:
    the error of the replayed weights the certificate kept."""
    from lightning_dualform.attend.certificate import replay_weights_error, sums_rebuild_error

    lay = di.layer(layer)
    if di.store.form == "element-wise":
        _, end = lay.end_step()
        stored = lay.stored_memory_sums(end, lay.rows_before(end))
        return None if stored is None else replay_weights_error(lay, stored)
    coef = lay.coefficients()
    stored = lay.stored_memory_sums(coef.end_step, lay.rows_before(coef.end_step))
    return None if stored is None else sums_rebuild_error(lay, coef, stored)


def verify(di: "DualInference", queries: dict[str, torch.Tensor] | None = None, *, n_samples: int = 256, seed: int = 0) -> dict[str, float]:
    """Max relative error ``||dual - primal|| / ||primal||`` per layer, ``dual`` summed from the rows. For a store
    of an element-wise rule also the error of what ``attend`` ranks by: the predicted unit's output rebuilt
    from every row's contribution (``unit_output``), relative to ``||primal||``.

    Args:
        queries: ``{layer: (n, d_in)}``; default: ``n_samples`` stored keys of each layer, drawn at random.
        n_samples: a positive integer.

    Raises:
        StoreError: the store has no final weights to compare with (an unfinished run), or its rows hold NaN or inf.
        ValueError: ``n_samples`` is not a positive integer.
        KeyError: an unknown layer in ``queries``.
    """
    n_samples = as_int(n_samples, "DualInference.verify(n_samples=...)", lo=1, allowed="a positive integer")
    gen = np.random.default_rng(seed)
    names = list(queries) if queries is not None else di.layers
    out: dict[str, float] = {}
    for name in names:
        lay = di.layer(name)
        if lay.weight_final is None:
            raise StoreError(f"{di.path}: layer {name!r} has no final weights (the run did not finish); nothing to verify against.")
        if queries is not None:
            q = queries[name]
        else:
            if lay.n_rows == 0:
                continue
            picks = np.sort(gen.choice(lay.n_rows, size=min(n_samples, lay.n_rows), replace=False))
            q = torch.from_numpy(np.concatenate([lay.read(int(i), int(i) + 1, ("keys",))["keys"] for i in picks]))
            # the store's own rows as queries: a NaN there is the store's, not a bad query
            refuse_stored_nonfinite(di.path, f"layer {name!r}: stored training keys (sampled as verify's queries)",
                                    picks[nonfinite_rows(q)])
        if di.store.form == "element-wise":
            # what attend ranks by: every row's contribution to the predicted unit, from the replay's Q_s
            res = di.attend(name, q, top_k=0, per_example=False, mass=False, reuse_certificate=False,
                              contribution_to="pred", score="unit")
            target = res.primal.double().gather(1, res.units[:, None]).squeeze(1)
            unit_err = (res.unit_output - target).abs() / norm_rows(res.primal.double()).clamp_min(1e-300)
            out[name] = max(float(res.max_rel_err), float(unit_err.max()))
        else:
            res = di.attend(name, q, top_k=0, contribution_to=None, per_example=False, mass=False,
                            reuse_certificate=False)
            out[name] = float(res.max_rel_err)
    return out
