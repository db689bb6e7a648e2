"""The paper's measures for the classifier examples, per seed and over seeds (mean ± std).

Each classifier example (``mnist_mlp.py``, ``multitask.py``, ``continual.py``, ``cifar10.py``) trains one model per
seed, then calls :func:`study_seed` with its query sets: test inputs, training inputs and, for the MNIST model,
Fashion-MNIST inputs (out of distribution). The numbers come from :mod:`lightning_dualform.studies`, under both
scores: the authors' ``|k·q|`` (``abs``) and the signed ``k·q`` (``signed``). :func:`write_tables` turns the seeds'
results into ``paper_tables.md`` (every table names its score) and ``paper_results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lightning_dualform import StoreReader
from lightning_dualform.studies import (
    SCORES,
    class_spread,
    fmt_mean_std,
    layer_inputs,
    pick_queries,
    plot_class_curves,
    plot_example_totals,
    plot_rank_profile,
    plot_top_images,
    scan_layer_scores,
    vote_rates,
    votes,
)


def add_study_args(p: argparse.ArgumentParser, *, picks: int = 2, vote_queries: int = 500, train_queries: int = 200) -> None:
    """The options every classifier study shares (``--paper`` sets the authors' values)."""
    p.add_argument("--paper", action="store_true",
                   help="the authors' setting: their data split and standardisation, step count, 5 seeds, 10 random "
                        "correct and 10 wrong picks, 1,000 training queries, float16 rows (see docs/paper.md)")
    p.add_argument("--seeds", type=int, default=None, help="models trained (seeds 0..N-1); tables give mean ± std (default: 1; --paper: 5)")
    p.add_argument("--raw-pixels", action="store_true", help="feed [0, 1] pixels instead of standardised ones (x - mean) / std")
    p.add_argument("--picks", type=int, default=None, help=f"random correct and as many wrong test inputs analysed one by one (default: {picks}; --paper: 10)")
    p.add_argument("--vote-queries", type=int, default=None,
                   help=f"test inputs (per dataset) in the vote tables (default: {vote_queries}; --paper: 1000; the authors: all)")
    p.add_argument("--train-queries", type=int, default=None, help=f"training inputs (per dataset) in the vote tables (default: {train_queries}; --paper: 1000, as the authors)")
    p.add_argument("--keep-stores", action="store_true", help="keep every seed's store (default: seed 0's only, or none with --paper)")
    p.add_argument("--figures", default="all", type=_figure_kinds,
                   help="figures to draw: 'all', 'none', or a comma list of 'study' (the per-query figures of seed 0, "
                        "study_*.png) and 'analyses' (those of the recorded-query analyses: topk.png, ...)")
    p.add_argument("--no-figures", dest="figures", action="store_const", const=frozenset(), help="--figures none")
    p.add_argument("--no-legacy", action="store_true",
                   help="skip recording the test queries and the recorded-query analyses (votes.md, topk.png, ...)")
    p.set_defaults(_study_defaults={"picks": picks, "vote_queries": vote_queries, "train_queries": train_queries})


FIGURE_KINDS = ("study", "analyses")


def _figure_kinds(text: str) -> frozenset[str]:
    """``--figures``: ``all``, ``none`` or a comma list of :data:`FIGURE_KINDS`."""
    if text in ("all", "none"):
        return frozenset(FIGURE_KINDS if text == "all" else ())
    kinds = frozenset(t.strip() for t in text.split(",") if t.strip())
    if not kinds or kinds - set(FIGURE_KINDS):
        raise argparse.ArgumentTypeError(f"{text!r}: expected all, none, or a comma list of {', '.join(FIGURE_KINDS)}")
    return kinds


def draws(args: argparse.Namespace, kind: str) -> bool:
    """Whether ``--figures`` asks for this kind of figure (``study`` or ``analyses``)."""
    figures = getattr(args, "figures", "all")
    return kind in (_figure_kinds(figures) if isinstance(figures, str) else figures)


def resolve(args: argparse.Namespace) -> None:
    """Fill the study options left unset: the fast defaults, or under ``--paper`` the authors' values."""
    d = dict(args._study_defaults)
    if args.paper:
        d.update({"picks": 10, "vote_queries": 1000, "train_queries": 1000, "seeds": 5})
    d.setdefault("seeds", 1)
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("seeds", "picks", "vote_queries", "train_queries"):
        if getattr(args, k) < (1 if k == "seeds" else 0):
            raise SystemExit(f"--{k.replace('_', '-')} must be {'positive' if k == 'seeds' else 'non-negative'}, got {getattr(args, k)}")


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None, paper: dict[str, Any]) -> argparse.Namespace:
    """Parse, then :func:`resolve`: under ``--paper`` every option the command line did not give takes the paper's
    value (``paper`` and the study options); one given explicitly wins, even at its default value."""
    import common

    args = common.parse_paper_args(p, argv, paper)
    resolve(args)
    return args


@dataclass
class QuerySet:
    """Inputs a study asks about: ``x`` model inputs ``(n, ...)``, ``y`` labels, ``dataset`` ``(n,)`` the dataset
    each belongs to (a number of the study's ``dataset_names``), ``pictures`` ``(n, H, W)`` in [0, 1] for figures."""

    name: str
    x: torch.Tensor
    y: np.ndarray
    dataset: np.ndarray
    pictures: np.ndarray


def predict(model: nn.Module, x: torch.Tensor, batch: int = 2048) -> np.ndarray:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i: i + batch]).argmax(-1) for i in range(0, len(x), batch)]).numpy()
    model.train(was)
    return out


def _phase_of(steps: np.ndarray, bounds: Sequence[int] | None) -> np.ndarray:
    return np.searchsorted(np.asarray(bounds[1:]), steps, side="right") if bounds else np.zeros_like(steps)


def study_seed(
    store: str, model: nn.Module, query_sets: Sequence[QuerySet], *, seed: int, out: str | None, picks: int,
    classes: Sequence[str], dataset_names: Sequence[str], dataset_of: Callable[[np.ndarray], np.ndarray] | None,
    train_pictures: Callable[[np.ndarray], np.ndarray], phases: Sequence[int] | None = None,
    pick_sets: Sequence[str] = ("test",), prefix: str = "study",
) -> dict[str, Any]:
    """Every measure of one trained model: per query set, layer and score. Figures of the first correct and
    the first wrong pick of each pick set go to ``out`` (``None``: no figures).

    ``phases`` (continual learning): the first step of each training phase; rows are then also grouped by phase.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    warnings.filterwarnings("ignore", message="Mean of empty slice")
    reader = StoreReader(store, probe=False)  # this process has just written and closed it
    layers = [n for n in reader.layers if reader.layer(n).kind == "linear"]
    n_d, n_c = (max(1, len(dataset_names)) if dataset_of is not None else 1), len(classes)
    stored_names = tuple(dataset_names[:n_d])  # the datasets the rows come from (the others are only queried)
    res: dict[str, Any] = {"seed": seed, "layers": layers, "store_bytes": os.path.getsize(store), "sets": {}}
    try:
        n_rows = {n: reader.layer(n).n_rows for n in layers}
        for qs in query_sets:
            pred = predict(model, qs.x)
            qin = layer_inputs(model, qs.x, layers)
            entry: dict[str, Any] = {"n": len(qs.y), "accuracy": float((pred == qs.y).mean()) if len(qs.y) else float("nan"),
                                     "per_dataset_accuracy": {dataset_names[d]: float((pred == qs.y)[qs.dataset == d].mean())
                                                              for d in np.unique(qs.dataset)}, "layers": {}}
            for name in layers:
                scans = scan_layer_scores(reader, name, qin[name], scores=SCORES, classes=n_c, dataset_of=dataset_of,
                                          n_datasets=n_d, top_k=min(500, n_rows[name]), block_rows=8192)
                per_score = {}
                for sc, scan in scans.items():
                    v = votes(scan)
                    spread = class_spread(scan)
                    ok = pred == qs.y
                    top_label = scan.top["label"]
                    m: dict[str, Any] = {
                        "votes": vote_rates(v, qs.y, pred).to_dict(),
                        "votes_by_dataset": {dataset_names[d]: vote_rates(v[qs.dataset == d], qs.y[qs.dataset == d],
                                                                          pred[qs.dataset == d]).to_dict()
                                             for d in np.unique(qs.dataset)},
                        "spread_good": np.nanmean(spread[ok], 0).tolist() if ok.any() else [math.nan] * n_d,
                        "spread_bad": np.nanmean(spread[~ok], 0).tolist() if (~ok).any() else [math.nan] * n_d,
                        "top500_label_share": float((top_label == qs.y[:, None]).mean()),
                    }
                    if n_d > 1:
                        same = scan.top["dataset"] == qs.dataset[:, None]
                        mass_d = np.abs(scan.group_mass).sum(2) if sc == "abs" else scan.group_mass.sum(2)
                        share = mass_d / np.maximum(np.abs(mass_d).sum(1, keepdims=True), 1e-300)
                        m["top500_same_dataset"] = {dataset_names[d]: float(same[qs.dataset == d].mean()) for d in np.unique(qs.dataset)}
                        m["mass_share_same_dataset"] = {dataset_names[d]: float(share[qs.dataset == d, d].mean())
                                                        for d in np.unique(qs.dataset)}
                    if phases:
                        ph = _phase_of(scan.top["step"], phases)
                        m["top500_phase_share"] = {dataset_names[d]: [float((ph[qs.dataset == d] == p).mean()) for p in range(len(phases))]
                                                   for d in np.unique(qs.dataset)}
                    per_score[sc] = m
                entry["layers"][name] = per_score
            if qs.name in pick_sets:
                entry["picks"] = _picks(reader, model, qs, pred, layers, n_rows, seed=seed, out=out, picks=picks,
                                        classes=classes, dataset_names=stored_names, dataset_of=dataset_of,
                                        train_pictures=train_pictures, prefix=prefix)
            res["sets"][qs.name] = entry
    finally:
        reader.close()
    res["analysis_s"] = time.perf_counter() - t0
    res["analysis_cpu_s"] = time.process_time() - c0
    res["load_avg"] = list(os.getloadavg())  # the machine's load when this seed finished (1, 5, 15 minutes)
    return res


def _picks(reader: StoreReader, model: nn.Module, qs: QuerySet, pred: np.ndarray, layers: Sequence[str], n_rows: dict,
           *, seed: int, out: str | None, picks: int, classes: Sequence[str], dataset_names: Sequence[str],
           dataset_of: Any, train_pictures: Callable[[np.ndarray], np.ndarray], prefix: str) -> dict[str, Any]:
    """Random correct and wrong queries, one by one: concentration (share of the top 1% of rows) and figures."""
    right, wrong = pick_queries(qs.y, pred, picks, seed=seed)
    if qs.name == "ood":  # out of distribution: the labels are another task's; pick at random
        right, wrong = np.sort(np.random.default_rng(seed).permutation(len(qs.y))[: 2 * picks]), np.zeros(0, np.int64)
    chosen = np.concatenate([right, wrong]).astype(np.int64)
    info: dict[str, Any] = {"correct": right.tolist(), "wrong": wrong.tolist(), "layers": {}}
    if not len(chosen):
        return info
    draw = out is not None
    qin = layer_inputs(model, qs.x[chosen], layers)
    scans = {}
    for name in layers:
        one_pct = max(1, math.ceil(0.01 * n_rows[name]))
        scans[name] = scan_layer_scores(reader, name, qin[name], scores=SCORES, classes=len(classes), dataset_of=dataset_of,
                                        n_datasets=max(1, len(dataset_names)), top_k=min(max(500, one_pct), n_rows[name]),
                                        group_top_k=500 if draw else 0, example_mass=draw, block_rows=8192)
        info["layers"][name] = {sc: {"top1pct_share": s.top_share(min(one_pct, s.top["score"].shape[1])).tolist(),
                                     "top1pct_rows": one_pct} for sc, s in scans[name].items()}
    if draw:
        firsts = [("correct", 0)] if len(right) else []
        if len(wrong):
            firsts.append(("wrong", len(right)))
        for kind, i in firsts:
            e = int(chosen[i])
            what = (f"{qs.name} input {e}, label {classes[qs.y[e]]}, predicted {classes[pred[e]]}"
                    if qs.name != "ood" else f"{dataset_names[qs.dataset[e]] if len(dataset_names) > qs.dataset[e] else 'OOD'} "
                                             f"input {e} (label {qs.y[e]}), predicted {classes[pred[e]]}")
            tag = f"{prefix}_{qs.name}_{kind}"
            for sc in SCORES:
                by_layer = {n: scans[n][sc] for n in layers}
                plot_rank_profile(by_layer, i, os.path.join(out, f"{tag}_rank_{sc}.png"), title=what, dataset_names=dataset_names)
                plot_top_images(by_layer, i, os.path.join(out, f"{tag}_top_{sc}.png"), train_pictures, qs.pictures[e],
                                title=what.split(",")[0], class_names=classes)
            abs_scans = {n: scans[n]["abs"] for n in layers}
            plot_class_curves(abs_scans, i, os.path.join(out, f"{tag}_class_curves_abs.png"), title=what, class_names=classes,
                              dataset_names=dataset_names)
            plot_example_totals(abs_scans, i, os.path.join(out, f"{tag}_example_totals_abs.png"), title=what,
                                dataset_names=dataset_names)
    return info


# ------------------------------------------------------------------------------------------------------
# tables over seeds
# ------------------------------------------------------------------------------------------------------
def _collect(results: Sequence[dict], path: Sequence[str]) -> list[float]:
    vals = []
    for r in results:
        x: Any = r
        for p in path:
            if not isinstance(x, dict) or p not in x:
                x = None
                break
            x = x[p]
        if x is not None:
            vals.append(float(np.nanmean(x)) if isinstance(x, list) else float(x))
    return vals


def tables(results: Sequence[dict], *, title: str, dataset_names: Sequence[str], setting: str) -> str:
    """Markdown: accuracy, vote tables, top-500 label share, concentration, class spread, dataset shares;
    each number mean ± std over the seeds (percent unless said)."""
    if not results:
        return f"# {title}\n\nNo seed has finished.\n"
    layers = results[0]["layers"]
    sets = list(results[0]["sets"])
    n = len(results)
    lines = [f"# {title}\n", f"{setting}\n", f"Seeds: {n} ({', '.join(str(r['seed']) for r in results)}); every number is the "
             f"mean ± sample standard deviation over the seeds, in percent unless said. `abs` = the authors' |k·q|, "
             f"`signed` = k·q.\n"]
    lines.append("## Accuracy\n\n| query set | n | accuracy |\n|---|---|---|")
    for s in sets:
        lines.append(f"| {s} | {results[0]['sets'][s]['n']} | {fmt_mean_std(_collect(results, ['sets', s, 'accuracy']))} |")
        if len(dataset_names) > 1:
            for d in results[0]["sets"][s]["per_dataset_accuracy"]:
                lines.append(f"| {s}: {d} | | {fmt_mean_std(_collect(results, ['sets', s, 'per_dataset_accuracy', d]))} |")
    for s in sets:
        lines.append(f"\n## Votes on the {s} queries\n\nThe vote: the class with the largest total score (summed over every "
                     f"training row of that class). `correct`: vote = label (= prediction) among correctly classified "
                     f"queries; `wrong → label` / `wrong → pred`: vote = label / = prediction among wrongly classified ones.\n")
        lines.append("| layer | score | correct | wrong → label | wrong → pred | all → pred |\n|---|---|---|---|---|---|")
        for name in layers:
            for sc in SCORES:
                base = ["sets", s, "layers", name, sc, "votes"]
                lines.append(f"| {name} | {sc} | " + " | ".join(fmt_mean_std(_collect(results, base + [k]))
                                                             for k in ("correct", "wrong_label", "wrong_prediction", "all_prediction")) + " |")
        lines.append("\n| layer | score | top-500 rows with the query's label | class spread, good (mean/std of class totals) | class spread, bad |"
                     "\n|---|---|---|---|---|")
        for name in layers:
            for sc in SCORES:
                base = ["sets", s, "layers", name, sc]
                lines.append(f"| {name} | {sc} | {fmt_mean_std(_collect(results, base + ['top500_label_share']))} | "
                             f"{fmt_mean_std(_collect(results, base + ['spread_good']), scale=1, digits=2)} | "
                             f"{fmt_mean_std(_collect(results, base + ['spread_bad']), scale=1, digits=2)} |")
        if len(dataset_names) > 1 and s != "ood":
            lines.append("\n| layer | score | query dataset | top-500 rows from the query's dataset | share of the total score on the query's dataset |"
                         "\n|---|---|---|---|---|")
            for name in layers:
                for sc in SCORES:
                    base = ["sets", s, "layers", name, sc]
                    for d in dataset_names:
                        lines.append(f"| {name} | {sc} | {d} | {fmt_mean_std(_collect(results, base + ['top500_same_dataset', d]))} | "
                                     f"{fmt_mean_std(_collect(results, base + ['mass_share_same_dataset', d]))} |")
        if any("top500_phase_share" in results[0]["sets"][s]["layers"][n]["abs"] for n in layers):
            lines.append("\n| layer | score | query dataset | top-500 rows written in phase 1 | in phase 2 |\n|---|---|---|---|---|")
            for name in layers:
                for sc in SCORES:
                    for d in results[0]["sets"][s]["layers"][name][sc]["top500_phase_share"]:
                        vals = [r["sets"][s]["layers"][name][sc]["top500_phase_share"][d] for r in results]
                        lines.append(f"| {name} | {sc} | {d} | {fmt_mean_std([v[0] for v in vals])} | {fmt_mean_std([v[1] for v in vals])} |")
        if "picks" in results[0]["sets"][s]:
            picks = results[0]["sets"][s]["picks"]
            lines.append(f"\n{len(picks['correct'])} correct and {len(picks['wrong'])} wrong {s} queries drawn at random per seed: "
                         f"share of each query's total |score| held by its top 1% of rows (the \"spotlight\" test):\n")
            lines.append("| layer | score | rows in the top 1% | share of the total |\n|---|---|---|---|")
            for name in layers:
                for sc in SCORES:
                    lines.append(f"| {name} | {sc} | {picks['layers'][name][sc]['top1pct_rows']} | "
                                 f"{fmt_mean_std(_collect(results, ['sets', s, 'picks', 'layers', name, sc, 'top1pct_share']))} |")
    lines.append("\n## Cost\n")
    lines.append(f"Store per seed: {np.mean([r['store_bytes'] for r in results]) / 1e9:.2f} GB; training "
                 f"{fmt_mean_std([r.get('train_s', math.nan) for r in results], scale=1, digits=0)} s and analysis "
                 f"{fmt_mean_std([r.get('analysis_s', math.nan) for r in results], scale=1, digits=0)} s per seed (wall); CPU "
                 f"{fmt_mean_std([r.get('train_cpu_s', math.nan) for r in results], scale=1, digits=0)} s and "
                 f"{fmt_mean_std([r.get('analysis_cpu_s', math.nan) for r in results], scale=1, digits=0)} s; 15-minute load "
                 f"average at each seed's end {fmt_mean_std([r.get('load_avg', [math.nan] * 3)[2] for r in results], scale=1, digits=1)}.")
    return "\n".join(lines) + "\n"


def write_tables(out: str, results: Sequence[dict], **kw: Any) -> str:
    """``paper_tables.md`` and ``paper_results.json`` in ``out``; returns the markdown."""
    md = tables(results, **kw)
    with open(os.path.join(out, "paper_tables.md"), "w") as fh:
        fh.write(md)
    with open(os.path.join(out, "paper_results.json"), "w") as fh:
        json.dump(list(results), fh, indent=1, default=float)
    return md


def load_results(out: str) -> list[dict]:
    """The per-seed results already written under ``out/seed<k>/result.json``, by seed."""
    found = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        path = os.path.join(out, name, "result.json")
        if name.startswith("seed") and os.path.isfile(path):
            with open(path) as fh:
                found.append(json.load(fh))
    return sorted(found, key=lambda r: r["seed"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python examples/study.py RUN_DIR``: rewrite ``paper_tables.md`` from the ``seed<k>/result.json`` under
    ``RUN_DIR`` (seeds run as separate processes, or a run stopped before its last seed)."""
    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dir", help="an example's --out folder")
    p.add_argument("--title", default="The paper's measures", help="the tables' heading")
    p.add_argument("--setting", default="", help="a sentence on the setting, under the heading")
    args = p.parse_args(argv)
    results = load_results(args.run_dir)
    if not results:
        print(f"study: no seed<k>/result.json under {args.run_dir}", file=sys.stderr)
        return 2
    names: list[str] = []
    for entry in results[0]["sets"].values():
        names += [d for d in entry.get("per_dataset_accuracy", {}) if d not in names]
    md = write_tables(args.run_dir, results, title=args.title, dataset_names=names, setting=args.setting)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
