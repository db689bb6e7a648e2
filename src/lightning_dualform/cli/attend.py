"""``lightning-dualform attend STORE``: which training patterns queries attend to, per layer, as text, JSON
and a picture, led by the training examples ranked by first-order influence on each prediction's margin through
the output layer (from the store alone: :mod:`~lightning_dualform.cli.which_examples`). :func:`attend_run`
computes the attention from the options as the command line takes them and :func:`attend_answer` the JSON; the
viewer's ``/api/attend`` calls both too."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from lightning_dualform.attend.request import MAX_STEP_BUCKETS, AttendRequest
from lightning_dualform.cli.inputs import (
    UsageError,
    check_store_path,
    load_queries,
    parse_contribution,
    parse_index,
    parse_layers,
    pick_split,
    positive,
)
from lightning_dualform.cli.output import (
    JSON_SUFFIXES,
    Inputs,
    Output,
    check_output,
    json_text,
    note,
    progress,
    table,
    write_together,
)
from lightning_dualform.cli.which_examples import influence_heading, render_influence, store_influence
from lightning_dualform.cli.usage import DEFAULT_QUERIES, TERMINAL_TOP_K

if TYPE_CHECKING:
    from lightning_dualform.query_runs import QueryAttention

log = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
#: --step-buckets beyond this are refused (the mass tables are queries x buckets; attend() also refuses more
#: buckets than steps beyond 1024)
MAX_STEP_BUCKETS_CLI = 1 << 16


def cmd_attend(args: argparse.Namespace) -> int:
    """``lightning-dualform attend``: check every option and output before opening the store, then attend."""
    check_store_path(args.store)
    keep = Inputs(args.store, [(args.queries, "the --queries file")])
    check_output(args.json, "--json", JSON_SUFFIXES, keep)
    check_output(args.plot, "--plot", _IMAGE_SUFFIXES, keep)
    positive(args.block_rows, "--block-rows")
    if args.step_buckets is not None and args.step_buckets > MAX_STEP_BUCKETS_CLI:
        raise UsageError(f"--step-buckets {args.step_buckets}: at most {MAX_STEP_BUCKETS_CLI} (more buckets than steps hold nothing).")
    positive(args.step_buckets, "--step-buckets")
    if args.top_k < 1:  # (0 would print "proponents ...: none", which reads as a finding)
        raise UsageError(f"--top-k {args.top_k}: expected 1 or more (the training patterns shown per query and layer).")
    if args.queries is not None and (args.split is not None or args.index is not None):
        raise UsageError("--queries reads queries from a file; leave out --split and --index, or drop --queries.")
    parse_contribution(args.contribution_to)  # a mistake here is reported before any long work
    if args.plot:
        from lightning_dualform.plots import require_matplotlib

        require_matplotlib()
    queries = load_queries(args.queries) if args.queries is not None else None
    json_out = Output(args.json, "--json", JSON_SUFFIXES, keep)
    plot_out = Output(args.plot, "--plot", _IMAGE_SUFFIXES, keep)
    try:
        _attend(args, di_kwargs={"device": args.device, "block_rows": args.block_rows, "progress": progress(args)},
                queries=queries, json_out=json_out, plot_out=plot_out)
    finally:
        json_out.discard()
        plot_out.discard()
    return 0


def _attend(args: argparse.Namespace, di_kwargs: dict[str, Any], queries: np.ndarray | None,
            json_out: Output, plot_out: Output) -> None:
    from lightning_dualform.attend.inference import DualInference

    t0 = time.perf_counter()
    with DualInference(args.store, **di_kwargs) as di:
        run = attend_run(di, args.store, split=args.split, index=args.index, queries=queries, source=args.queries or "",
                         layer=args.layer, top_k=args.top_k, by=args.by, contribution_to=args.contribution_to,
                         at_step=args.at_step, step_buckets=args.step_buckets, score=args.score)
        influence = store_influence(di, run, args.top_k) if args.influence else None
        print(render_attend(run, by=args.by, store=di.store, influence=influence))

        def draw(target: str) -> None:
            from lightning_dualform.plots import plot_attention

            plot_attention(run, di.store, target, by=args.by, influence=influence)

        # both, or neither: a picture that fails to draw leaves no JSON behind either
        write_together((json_out, json_text(attend_answer(run, influence)) if args.json else ""), (plot_out, draw))
        for path in (args.json, args.plot):
            if path:
                note(args, f"wrote {path}")
    log.debug("attend took %.2f s", time.perf_counter() - t0)


def attend_run(
    di: Any,
    store: str,
    *,
    split: str | None = None,
    index: str | None = None,
    queries: np.ndarray | None = None,
    source: str = "",
    layer: Sequence[str] | None = None,
    top_k: int = TERMINAL_TOP_K,
    by: str = "pattern",
    contribution_to: str | None = None,
    at_step: int | None = None,
    step_buckets: int | None = None,
    score: str | None = None,
) -> QueryAttention:
    """What ``attend`` computes, from its options as the command line takes them; its ``to_dict()`` is what
    ``--json`` writes. The viewer's ``/api/attend`` calls it too, so both answer the same.

    Args:
        di: the open store (a :class:`~lightning_dualform.DualInference`).
        store: the store's path as given (its absolute path goes into ``settings["store"]``).
        split, index: recorded queries: the split (default: 'test' or the only one) and ``--index`` text
            (``'3,17'``, ``'0:10'``, ``'all'``; default: the first :data:`DEFAULT_QUERIES`).
        queries, source: ``(n, d)`` queries instead (from :func:`load_queries`) and where they came from.
        layer: ``--layer`` values (names, or comma-separated names; default: every layer).
        top_k, by, contribution_to, at_step, step_buckets, score: as ``--top-k`` (default :data:`TERMINAL_TOP_K`),
            ``--by``, ``--contribution-to`` (text: ``auto``, ``pred``, ``label``, ``none`` or a unit), ``--at-step``,
            ``--step-buckets``, ``--score``; ``None`` takes :class:`~lightning_dualform.attend.request.AttendRequest`'s
            default.

    Raises:
        UsageError: a bad option (unknown split, layer or index, a negative ``top_k`` ...).
        ValueError, KeyError: what :func:`~lightning_dualform.analysis.attend_queries` raises.
    """
    from lightning_dualform.query_runs import attend_queries

    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise UsageError(f"--top-k {top_k}: expected 0 or more.")
    positive(step_buckets, "--step-buckets")
    if step_buckets is not None and step_buckets > MAX_STEP_BUCKETS_CLI:
        raise UsageError(f"--step-buckets {step_buckets}: at most {MAX_STEP_BUCKETS_CLI} (more buckets than steps hold nothing).")
    if by not in ("pattern", "example"):
        raise UsageError(f"--by {by}: expected pattern or example.")
    if queries is not None and (split is not None or index is not None):
        raise UsageError("--queries reads queries from a file; leave out --split and --index, or drop --queries.")
    if score is not None and score not in ("auto", "raw", "unit"):
        raise UsageError(f"--score {score}: expected auto, raw or unit.")
    contribution = parse_contribution(contribution_to) if contribution_to is not None else AttendRequest.contribution_to
    by_label = contribution == "label"
    knobs: dict[str, Any] = {"top_k": top_k, "at_step": at_step}
    if step_buckets is not None:
        knobs["step_buckets"] = step_buckets
    if score is not None:
        knobs["score"] = score
    if not by_label:
        knobs["contribution_to"] = contribution
    try:
        request = AttendRequest.checked("attend", **knobs)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    layers = parse_layers(list(layer) if layer else None, di.layers)
    if isinstance(contribution, int):
        d_out = di.layer(di.layers[-1]).d_out
        if contribution >= d_out:
            raise UsageError(f"--contribution-to {contribution}: the output layer {di.layers[-1]} has units 0..{d_out - 1}.")
    if contribution is None and request.score != "raw" and di.store.form == "element-wise":
        raise UsageError(
            f"--contribution-to none: in this {di.store.update_rule} store a pattern's attention weight depends on "
            "the output unit; name one (auto, pred, label, a unit number), or rank by similarity with --score raw."
        )
    label = {"contribution_to": "label"} if by_label else {}
    if queries is not None:
        # (the layers attend_queries picks: those named, else every layer that takes the queries' width)
        check_steps(di, layers or [n for n in di.layers if di.layer(n).d_in == queries.shape[1]], top_k, at_step,
                    step_buckets)
        run = attend_queries(di, queries=queries, source=source, layers=layers, request=request, **label)
    else:
        split = pick_split(di.store, split)
        qs = di.store.queries(split)
        positions = parse_index(index, qs.index, split) if index is not None else np.arange(min(DEFAULT_QUERIES, qs.n))
        check_steps(di, layers or [n for n in di.layers if n in qs.layers], top_k, at_step, step_buckets)
        run = attend_queries(di, split=split, positions=positions, layers=layers, request=request, **label)
    run.settings.update({"by": by, "store": os.path.abspath(store)})
    return run


def check_steps(di: Any, layers: Sequence[str], top_k: int, at_step: int | None, step_buckets: int | None) -> None:
    """``--at-step``, ``--top-k`` and ``--step-buckets`` against what the store holds, said in the command's words
    before the pass would refuse them in the library's (``attend(top_k=...)``, ``at_step=...``).

    Raises:
        UsageError: ``at_step`` outside the run; a layer with fewer rows up to ``at_step`` than ``top_k`` (with the
            first ``--at-step`` that has enough); more step buckets than a scalar rule's pass takes.
    """
    first, last = di.store.first_step, di.last_step
    if at_step is not None and not first <= at_step <= last:
        raise UsageError(f"--at-step {at_step}: outside the run; the store holds the models after {first} to {last} "
                         "optimizer steps.")
    end = last if at_step is None else at_step
    span = end - first
    if step_buckets is not None and di.store.form != "element-wise" and step_buckets > max(MAX_STEP_BUCKETS, span):
        raise UsageError(f"--step-buckets {step_buckets}: use {max(MAX_STEP_BUCKETS, span):,} or fewer (the most is "
                         f"{MAX_STEP_BUCKETS:,}, or one per step for a model of more steps; the model after step {end} "
                         f"has {span}).")
    for name in layers if top_k else ():
        lay = di.layer(name)
        n = lay.rows_before(end)
        if top_k <= n:
            continue
        later = _first_step_with(lay, top_k, end + 1, last)
        if n == 0 and at_step is not None and later is not None:
            model = "the model before any optimizer step" if end == 0 else f"the model after {end} optimizer steps"
            raise UsageError(f"--at-step {end}: {model} has seen no training row of layer {name}, so there is nothing "
                             f"to attend; use --at-step {later} or later (up to {last}).")
        if n == 0:
            raise UsageError(f"--top-k {top_k}: layer {name} holds no training rows up to step {end}, so there is "
                             "nothing to rank.")
        more = f", or --at-step {later} or later" if at_step is not None and later is not None else ""
        raise UsageError(f"--top-k {top_k}: layer {name} holds {n} training rows up to step {end}; use --top-k {n} "
                         f"or less{more}.")


def _first_step_with(lay: Any, k: int, lo: int, hi: int) -> int | None:
    """The first step in ``lo..hi`` whose model has seen at least ``k`` rows of ``lay`` (rows are in step order, so
    a binary search over :meth:`rows_before`), or None."""
    if lo > hi or lay.rows_before(hi) < k:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if lay.rows_before(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def attend_answer(run: QueryAttention, influence: dict[str, Any] | None) -> dict[str, Any]:
    """What ``attend --json`` writes (and the viewer's ``/api/attend`` answers): ``"influence"`` (the store-only
    answer of :func:`~lightning_dualform.cli.which_examples.store_influence`, or None with ``--no-influence``),
    then the attention, ``run.to_dict()``, unchanged."""
    return {"influence": influence, **run.to_dict()}


def _query_title(run: QueryAttention, j: int) -> str:
    if run.source.startswith("split:"):
        parts = [f"query {run.source[6:]}[{int(run.index[j])}]"]
    else:
        parts = [f"query {j} of {os.path.basename(run.source)}"]
    if run.label[j] >= 0:
        parts.append(f"label {int(run.label[j])}")
    if run.prediction[j] >= 0:
        parts.append(f"predicted {int(run.prediction[j])}" + (" (wrong)" if 0 <= run.label[j] != run.prediction[j] else ""))
    return ", ".join(parts)


def ranked(res: Any, r: int, by: str, kind: str = "top") -> tuple[list[str], list[list[Any]]]:
    """Rows of one query's ranking (``kind``: top, proponents, opponents) as table cells."""
    if by == "example":
        t = {"top": res.top_examples, "proponents": res.proponent_examples, "opponents": res.opponent_examples}[kind]
        if t is None:
            return [], []
        rows = [[i + 1, int(t.index[r, i]), int(t.label[r, i]), int(t.rows[r, i]), float(t.score[r, i])]
                for i in range(t.index.shape[1]) if int(t.index[r, i]) >= 0]
        return ["rank", "index", "label", "rows", "score" if kind == "top" else "contribution"], rows
    t = {"top": res.top, "proponents": res.proponents, "opponents": res.opponents}[kind]
    if t is None:
        return [], []
    rows = [[i + 1, int(t.index[r, i]), int(t.label[r, i]), int(t.epoch[r, i]), int(t.step[r, i]), float(t.score[r, i])]
            for i in range(t.row.shape[1]) if int(t.row[r, i]) >= 0]
    return ["rank", "index", "label", "epoch", "step", "score" if kind == "top" else "contribution"], rows


def _fmt_rows(rows: list[list[Any]]) -> list[list[Any]]:
    return [[*r[:-1], f"{r[-1]:+.4g}"] for r in rows]


def mass_line(res: Any, r: int, n: int = 3) -> str:
    """The labels whose training patterns carry most of the signed attention mass, as shares of |mass|."""
    m = res.mass.get("label")
    if m is None:
        return ""
    signed = m.signed[r].double()
    total = float(m.absolute[r].sum()) or 1.0
    order = signed.argsort(descending=True)[:n].tolist()
    parts = [f"{'none' if int(m.keys[i]) < 0 else int(m.keys[i])}: {100 * float(signed[i]) / total:+.0f}%" for i in order]
    return "mass by label  " + ", ".join(parts)


def answer_check(res: Any, r: int) -> str:
    """What the text says of row ``r``'s check against the stored final weights beyond ``rel_err``: the unit
    output rebuilt from the rows, and a plain "NOT exact" when the answer is beyond the store's tolerance."""
    out = ""
    unit_err = getattr(res, "unit_rel_err", None)
    if unit_err is not None:
        out += f", unit {int(res.units[r])} rebuilt from the rows rel. err. {float(unit_err[r]):.1e}"
    if getattr(res, "within_tolerance", None) is False:
        out += (f"; NOT exact: beyond the store's tolerance {res.tolerance:.0e}, the store does not rebuild its final "
                "weights (run `lightning-dualform verify`)")
    return out


def render_attend(run: QueryAttention, by: str, store: Any = None, influence: dict[str, Any] | None = None) -> str:
    """The text ``attend`` prints: per query, the examples ranked by influence (when ``influence`` is given, from
    :func:`~lightning_dualform.cli.which_examples.store_influence`), then per layer the top patterns by
    attention, the mass by label, proponents and opponents."""
    out = []
    if influence is not None:
        out.extend(influence_heading(influence))
    steps = ""
    first = next(iter(run.results.values()), None)
    if first is not None:
        steps = f" after {first.at_step} optimizer steps"
    ranking = {"raw": "similarity k . q", "unit": "attention weight for each query's unit, -(Q_s[u] (.) k) . q"}
    scores = sorted({getattr(r, "score", "raw") for r in run.results.values()})
    out.append(f"attention (the paper's view: how each layer's output is assembled from its training rows, not a "
               f"prediction of what removing one would do) over training patterns{steps}; ranked by "
               f"{'single patterns' if by == 'pattern' else 'examples (epochs summed)'}"
               f", score = {' / '.join(ranking[s] for s in scores)}")
    for j in range(len(run.index)):
        out.append("")
        out.append(_query_title(run, j))
        if influence is not None:
            out.extend(render_influence(influence, j))
        for name, res in run.results.items():
            ex = run.rows[name]["example"]
            for r in np.flatnonzero(ex == j).tolist():
                pos = int(run.rows[name]["position"][r])
                err = "" if res.rel_err is None else f", dual vs weights rel. err. {float(res.rel_err[r]):.1e}"
                if res.rel_err is not None and res.dual_source == "certificate":
                    replayed = store is not None and getattr(store, "form", "scalar") == "element-wise"
                    err += " (weights replayed by the certificate)" if replayed else " (memory sums from the certificate)"
                err += answer_check(res, r)
                where = f" position {pos}" if len(np.flatnonzero(ex == j)) > 1 else ""
                unit = f", attention weights for unit {int(res.units[r])}" if res.score == "unit" and res.units is not None else ""
                out.append(f"  {name}{where}: {res.rows} rows{err}{unit}")
                headers, rows = ranked(res, r, by, "top")
                if rows:
                    out.append(table(headers, _fmt_rows(rows), indent="    "))
                line = mass_line(res, r)
                if line:
                    out.append("    " + line)
                if res.units is not None:
                    unit = int(res.units[r])
                    why = ""
                    ranks_argmax = run.settings.get("contribution_to") in ("pred", "auto")
                    if ranks_argmax and run.settings.get("at_step") is not None and 0 <= run.prediction[j] != unit:
                        why = f" (the argmax of {name} after {res.at_step} steps; the trained model predicts " \
                              f"{int(run.prediction[j])})"
                    for kind in ("proponents", "opponents"):
                        headers, rows = ranked(res, r, by, kind)
                        out.append(f"    {kind} of output unit {unit}{why}" + ("" if rows else ": none"))
                        if rows:
                            out.append(table(headers, _fmt_rows(rows), indent="    "))
    return "\n".join(out)
