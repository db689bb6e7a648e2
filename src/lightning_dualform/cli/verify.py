"""``lightning-dualform verify STORE``: rebuild each layer's outputs from the memory and compare them with
the trained weights (:func:`verify_store`); exit 1 when a layer is beyond its tolerance."""

from __future__ import annotations

import argparse
from typing import Any

from lightning_dualform.cli.inputs import PROG, UsageError, check_store_path, positive
from lightning_dualform.cli.output import JSON_SUFFIXES, Inputs, Output, json_text, note, progress, table


def verify_store(path: str, *, samples: int = 256, device: str = "cpu", block_rows: int | None = None, progress: bool = False,
                 write_certificate: bool = False) -> dict[str, Any]:
    """Per layer: the stored certificate, the dual-vs-weights error on sampled training keys and on the
    recorded queries, and the error of the final weights rebuilt from the certificate's stored sums (what
    ``attend`` uses by default), against :func:`lightning_dualform.store.certificate.tolerance`. Outputs are
    accumulated in float64, so the check measures the store and not its own round-off.

    Args:
        write_certificate: write the certificate first where it is missing (a process was killed while writing
            it, or the run used ``certify=False``). A layer's certificate made when its run finished is kept: it is
            the record that the rows rebuilt the weights then, and one made now from rows changed since would erase
            that evidence.
    """
    import torch

    from lightning_dualform.attend.certificate import certify_store
    from lightning_dualform.attend.inference import DualInference
    from lightning_dualform.store.certificate import missing_certificate, store_tolerance
    from lightning_dualform.store.shards import read_shard_index

    wrote: list[str] = []
    if write_certificate:
        if read_shard_index(path) is not None:
            raise UsageError(f"--write-certificate {path}: a DDP run's certificate sums over all shards; write it with "
                             "the run (certify=True), or certify each shard's store separately.")
        from lightning_dualform.store.reader import StoreReader

        with StoreReader(path) as store:
            if not store.complete:
                raise UsageError(f"--write-certificate {path}: the store is not complete (status {store.status!r}); a "
                                 "certificate needs the final weights of a finished run.")
            absent = missing_certificate(store)
        if absent:
            wrote = sorted(certify_store(path, probe=False, only=absent))
    with DualInference(path, device=device, block_rows=block_rows, accumulate=torch.float64, progress=progress) as di:
        s = di.store
        tol = store_tolerance(s)
        sampled = di.verify(n_samples=samples)
        recorded: dict[str, float] = {}
        for split in s.query_splits:
            qs = s.queries(split, stale_ok=True)
            if qs.stale is not None:  # (another model's layer inputs: no check of this store's)
                continue
            qk = {n: qs.layer_rows(n)["keys"][: max(samples, 1)] for n in qs.layers if n in di.layers}
            qk = {n: k for n, k in qk.items() if len(k)}
            if qk:
                for n, e in di.verify(queries={n: torch.from_numpy(k) for n, k in qk.items()}).items():
                    recorded[n] = max(recorded.get(n, 0.0), e)
        missing = set(missing_certificate(s))
        layers = []
        for name in di.layers:
            lay = di.layer(name)
            cert = lay.certificate.rel_err if lay.certificate is not None else None
            sums = di.stored_sums_error(name)
            errs = [e for e in (sampled.get(name), recorded.get(name), cert, sums) if e is not None]
            worst = max(errs) if errs else None
            ok = worst is not None and worst <= tol and lay.exact and s.optimizer_exact
            notes = []
            if not (lay.exact and s.optimizer_exact):
                notes.append(lay.inexact_reason or "recorded with exact=False")
            if sums is not None and not sums <= tol:
                notes.append("the certificate's stored sums do not rebuild the final weights")
            if name in missing:
                notes.append("certificate missing: --write-certificate writes it")
            layers.append({"layer": name, "rows": lay.n_rows, "certificate": cert, "sampled": sampled.get(name),
                           "queries": recorded.get(name), "stored_sums": sums, "worst": worst, "ok": bool(ok),
                           "note": "; ".join(notes)})
    return {"path": path, "tolerance": tol, "row_dtype": s.row_dtype, "ok": all(r["ok"] for r in layers), "layers": layers,
            "certificate_written": wrote, "certificate_missing": sorted(missing), "repairs": list(getattr(s, "repairs", []))}


def cmd_verify(args: argparse.Namespace) -> int:
    """``lightning-dualform verify``: print the verdict per layer; 1 when a layer is beyond its tolerance."""
    check_store_path(args.store)
    positive(args.samples, "--samples")
    positive(args.block_rows, "--block-rows")
    out = Output(args.json, "--json", JSON_SUFFIXES, keep=Inputs(args.store))
    try:
        code = _verify(args, out)
    finally:
        out.discard()
    return code


def _verify(args: argparse.Namespace, out: Output) -> int:
    v = verify_store(args.store, samples=args.samples, device=args.device, block_rows=args.block_rows,
                     progress=progress(args), write_certificate=args.write_certificate)
    if v["certificate_written"]:
        note(args, f"wrote the certificate of {', '.join(v['certificate_written'])} in {args.store}")
    elif args.write_certificate:
        note(args, f"every layer of {args.store} holds its certificate: kept (--write-certificate writes only a "
             "missing one)")

    def e(x: float | None) -> str:
        return "-" if x is None else f"{x:.2e}"

    rows = [[r["layer"], r["rows"], e(r["certificate"]), e(r["sampled"]), e(r["queries"]), e(r["stored_sums"]),
             ("ok" if r["ok"] else "FAIL") + (f" ({r['note']})" if r["note"] else "")] for r in v["layers"]]
    print(f"{v['path']}: dual form against the trained weights, tolerance {v['tolerance']:.0e} ({v['row_dtype']} rows)")
    print(table(["layer", "rows", "certificate", "training keys", "recorded queries", "stored sums", "verdict"], rows))
    print("exact" if v["ok"] else "NOT exact: at least one layer is beyond the tolerance")
    if v["certificate_missing"]:
        print(f"the store is complete but its certificate is missing for {', '.join(v['certificate_missing'])}: "
              f"`{PROG} verify --write-certificate {args.store}` writes it")
    out.write_text(json_text(v))
    return 0 if v["ok"] else 1
