"""``lightning-dualform info STORE``: what a store holds (layers, rows, steps, optimizer, dtype, size,
certificate, query sets), as text and as JSON (:func:`store_facts`)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from lightning_dualform.cli.inputs import check_store_path
from lightning_dualform.cli.output import JSON_SUFFIXES, Inputs, Output, format_number, human_bytes, json_text, table
from lightning_dualform.errors import StoreError


def store_facts(path: str) -> dict[str, Any]:
    """What ``info`` shows, as plain data (also its ``--json``)."""
    from lightning_dualform.store.shards import read_shard_index

    shards = read_shard_index(path)
    if shards is not None:  # a DDP run's index file: describe each rank's store (never an index again)
        missing = [sh for sh in shards if not os.path.exists(sh)]
        if missing:
            raise StoreError(f"{path}: the DDP index names shard files that are missing: {missing}.")
        return {"path": path, "shards": [_store_facts(sh) for sh in shards], "queries": _merged_queries(path)}
    return _store_facts(path)


def _merged_queries(path: str) -> list[dict[str, Any]]:
    """A DDP run's query sets as one (each rank recorded its share; the sampler's repeats left out)."""
    from lightning_dualform.store.shards import open_store

    out = []
    with open_store(path) as store:
        for split in store.query_splits:
            qs = store.queries(split, stale_ok=True)
            out.append({"split": split, "n": qs.n, "accuracy": _accuracy(qs.label, qs.prediction),
                         "stale": qs.stale})
    return out


def _accuracy(label: np.ndarray, prediction: np.ndarray) -> float | None:
    known = (label >= 0) & (prediction >= 0)
    return float((label[known] == prediction[known]).mean()) if known.any() else None


def _store_facts(path: str) -> dict[str, Any]:
    # the store's own modules only: `info` loads neither torch nor the passes (tests/test_startup.py)
    from lightning_dualform.store.certificate import missing_certificate
    from lightning_dualform.store.reader import StoreReader

    with StoreReader(path) as s:
        layers = []
        for name in s.layers:
            lay = s.layer(name)
            cert = lay.certificate.as_dict() if lay.certificate is not None else {}
            layers.append({
                "name": name, "kind": lay.kind, "d_in": lay.d_in, "d_out": lay.d_out, "bias": lay.has_bias,
                "rows": lay.n_rows, "exact": lay.exact, "inexact_reason": lay.inexact_reason, "certificate": cert,
                "rows_without_index": lay.rows_without_index,
            })
        queries = []
        for split in s.query_splits:
            qs = s.queries(split, stale_ok=True)
            queries.append(
                {"split": split, "n": qs.n, "layers": qs.layers, "inputs": qs.inputs is not None,
                 "accuracy": _accuracy(qs.label, qs.prediction),
                 "after_step": qs.after_step, "stale": qs.stale}
            )
        epochs = sorted(set(np.asarray(s.update_epochs).tolist()))
        m = s.meta
        return {
            "path": path,
            "size_bytes": os.path.getsize(path),
            "status": s.status,
            "format_version": m.format_version,
            "library_version": m.library_version or None,
            "created": m.created or None,
            "recorded_by": m.recorded_by,
            "model_class": m.model_class or None,
            "steps": {"first": s.first_step, "last": s.last_step, "recorded": s.n_steps},
            "epochs": len(epochs),  # counted from the step table (the `epochs` attribute counts one more after fit)
            "optimizer": s.optimizer,
            "optimizer_exact": s.optimizer_exact,
            "update_rule": s.update_rule,
            "form": s.form,
            "gradient_clip_val": m.gradient_clip_val,
            "gradient_clip_algorithm": m.gradient_clip_algorithm,
            "accumulate_grad_batches": m.accumulate_grad_batches,
            "precision": m.precision,
            "float32_products": m.float32_products,
            "world_size": m.world_size,
            "row_dtype": s.row_dtype,
            "compression": m.compression,
            "train_inputs": s.train_inputs(np.array([-1])) is not None,
            "layers": layers,
            "queries": queries,
            "certificate_missing": missing_certificate(s),
            "repairs": list(s.repairs),
        }


#: what a rule's form means for the memory, as ``info`` says it
_FORMS = {
    "scalar": "exact: per-step scalar coefficients, attention over k . q",
    "element-wise": "exact: element-wise steps, replayed from the stored optimizer state; each pattern's attention "
                    "weight depends on the output unit (attend --score unit)",
    "plain": "NOT exact: recorded with exact=False, the memory's residual is stored",
}


def _rule_line(f: dict[str, Any]) -> str:
    form = f.get("form", "scalar")
    return f"{f.get('update_rule', 'sgd')} ({_FORMS.get(form, form)})"


def _optimizer_line(opt: dict[str, Any]) -> str:
    name = opt.get("name") or "?"
    groups = opt.get("param_groups") or []
    keys = ("lr", "betas", "eps", "momentum", "dampening", "alpha", "rho", "lr_decay", "weight_decay", "nesterov",
            "amsgrad", "centered", "decoupled_weight_decay", "maximize")
    parts = []
    for i, g in enumerate(groups):
        items = " ".join(f"{k}={format_number(g[k])}" for k in keys if k in g)
        parts.append(items if len(groups) == 1 else f"group {i}: {items}")
    return name + ("  " + "; ".join(parts) if parts else "")


def render_info(f: dict[str, Any]) -> str:
    """The text ``info`` prints for :func:`store_facts`' answer (each shard's, for a DDP index)."""
    if "shards" in f:
        head = f"{f['path']}: DDP shard index of {len(f['shards'])} rank stores"
        whole = [f"the run's {q['split']} queries (every rank's, each example once): {q['n']}, accuracy "
                 + ("-" if q["accuracy"] is None else f"{100 * q['accuracy']:.1f}%")
                 + (" (STALE)" if q["stale"] else "") for q in f.get("queries", [])]
        return "\n\n".join([head] + [render_info(s) for s in f["shards"]] + (["\n".join(whole)] if whole else []))
    st = f["steps"]
    clip = f.get("gradient_clip_val") or 0
    out = [
        f"{f['path']}  ({human_bytes(f['size_bytes'])}, {f['status']}, format {f['format_version']}, "
        f"written by lightning-dualform {f['library_version']} on {f['created']})",
        f"model      {f['model_class']} (recorded by {f.get('recorded_by') or 'DualFormCallback'})",
        f"training   {st['recorded']} optimizer steps (the models after {st['first']}..{st['last']} of them), "
        f"{f['epochs']} epoch(s), "
        f"precision {f['precision']}"
        + (f" (float32 products in {f['float32_products']})" if f.get("float32_products", "ieee") != "ieee" else "")
        + f", world size {f['world_size']}",
        f"optimizer  {_optimizer_line(f['optimizer'])}"
        + (f"; gradient clipping {clip:g} ({f['gradient_clip_algorithm']})" if clip else "")
        + (
            "; each step's gradient factor (clipping, loss scale, DDP) measured"
            if f.get("gradient_clip_algorithm") == "measured"
            else ""
        )
        + ("" if f["optimizer_exact"] else "  [recorded with exact=False: the memory is approximate]"),
        f"rule       {_rule_line(f)}",
        f"rows       {f['row_dtype']}, compression {f['compression']}, raw training inputs "
        + ("stored" if f["train_inputs"] else "not stored"),
        "",
        "layers",
    ]
    rows = []
    for lay in f["layers"]:
        c = lay["certificate"]
        if "rel_err" in c:
            verdict = "exact" if c.get("exact") else "INEXACT"
            cert = f"{c['rel_err']:.2e} ({verdict}, tol {c.get('tolerance', float('nan')):.0e})"
        elif f["status"] == "complete":
            cert = "MISSING (write it: lightning-dualform verify --write-certificate)"
        else:
            cert = "none yet (the run is unfinished)"
        rows.append([lay["name"], lay["kind"], f"{lay['d_in']} -> {lay['d_out']}", "yes" if lay["bias"] else "no",
                     lay["rows"], cert])
    out.append(table(["layer", "kind", "shape", "bias", "rows", "certificate (rel. err. of rebuilt weights)"], rows))
    unknown = {lay["name"]: lay["rows_without_index"] for lay in f["layers"] if lay.get("rows_without_index")}
    if unknown:
        out.append("  rows without a dataset index (stored as -1): "
                   + ", ".join(f"{n} {k}" + (" (all)" if k == lay_rows else "")
                               for n, k, lay_rows in ((n, k, next(x["rows"] for x in f["layers"] if x["name"] == n))
                                                      for n, k in unknown.items()))
                   + ". Give them with DualFormRecorder.batch(indices=...) or the callback's index_key.")
    out.append("")
    if f["queries"]:
        out.append("query sets")
        out.append(table(
            ["split", "queries", "accuracy", "raw inputs", "model", "layers"],
            [[q["split"], q["n"], "-" if q["accuracy"] is None else f"{100 * q['accuracy']:.1f}%",
              "yes" if q["inputs"] else "no",
              ("STALE" if q["stale"] else "-" if q["after_step"] is None else f"after {q['after_step']} steps"),
              ", ".join(q["layers"])] for q in f["queries"]],
        ))
        for q in f["queries"]:
            if q["stale"]:
                stage = q["split"] if q["split"] in ("test", "validate") else "predict"
                out.append(f"  the {q['split']!r} queries are STALE: {q['stale']}. Their accuracy and layer inputs are "
                           f"that model's; record them again (trainer.{stage}(...) with record_queries).")
    else:
        out.append("query sets: none (record with DualFormCallback(record_queries=('test',)) and trainer.test)")
    return "\n".join(out)


def cmd_info(args: argparse.Namespace) -> int:
    """``lightning-dualform info``: print :func:`render_info` of :func:`store_facts`; ``--json`` writes the facts."""
    check_store_path(args.store)
    out = Output(args.json, "--json", JSON_SUFFIXES, keep=Inputs(args.store))
    try:
        facts = store_facts(args.store)
        print(render_info(facts))
        out.write_text(json_text(facts))
    finally:
        out.discard()
    return 0
