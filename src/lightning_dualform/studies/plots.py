"""The authors' figures of one query, drawn from a :class:`~lightning_dualform.studies.measures.LayerScan`.

Each function takes ``{layer: LayerScan}`` (one score, one or more queries) and the query's position ``i`` in
the scans, writes a PNG (matplotlib, Agg backend) and returns its path. Titles name the score (``|k·q|`` or
``k·q``). What the authors drew (``plot_per_update`` and ``plot_total_scores`` in their task code):

- :func:`plot_rank_profile`: the top 500 rows' score, label, training step and dataset against their rank;
- :func:`plot_class_curves`: per dataset and class, the top scores sorted, side by side, and the class totals;
- :func:`plot_example_totals`: every training example's total over its presentations, sorted, by dataset.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from lightning_dualform.studies.measures import LayerScan, score_label


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fixed_margins(fig: Any, *, left: float, right: float, top: float, bottom: float, wspace: float,
                   hspace: float) -> None:
    """Margins in inches (``wspace``/``hspace`` as fractions of an axis), in place of ``tight_layout``, which
    draws the figure once more to measure it (half the time of a grid of many small axes)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, wspace=wspace,
                        hspace=hspace)


def _score_of(scans: Mapping[str, LayerScan]) -> str:
    kinds = {s.score for s in scans.values()}
    if len(kinds) != 1:
        raise ValueError(f"the scans mix scores {sorted(kinds)}; draw one score at a time.")
    return score_label(kinds.pop())


def plot_rank_profile(scans: Mapping[str, LayerScan], i: int, path: str, *, title: str = "", k: int = 500,
                      dataset_names: Sequence[str] = ()) -> str:
    """One row per layer; columns: score, label, training step (and dataset, with several) of the top ``k``
    rows of query ``i``, against rank."""
    plt = _plt()
    score = _score_of(scans)
    multi = bool(dataset_names) and len(dataset_names) > 1
    cols = [("score", score), ("label", "label"), ("step", "training step")]
    cols += [("dataset", "dataset")] if multi else []
    fig, axes = plt.subplots(len(scans), len(cols), figsize=(2.9 * len(cols), 1.9 * len(scans)), squeeze=False)
    for r, (name, scan) in enumerate(scans.items()):
        top = scan.top
        kk = min(k, top["score"].shape[1])
        rank = np.arange(1, kk + 1)
        for c, (col, lab) in enumerate(cols):
            ax = axes[r, c]
            y = top[col][i, :kk]
            ax.plot(rank, y, ".", ms=2) if col != "score" else ax.plot(rank, y, lw=1)
            ax.set_title(f"{name}: {lab}", fontsize=8)
            ax.tick_params(labelsize=6)
            if col == "dataset":
                ax.set_yticks(range(len(dataset_names)))
                ax.set_yticklabels(dataset_names, fontsize=6)
            if r == len(scans) - 1:
                ax.set_xlabel("rank", fontsize=7)
    fig.suptitle(f"Top {k} training rows by {score}{': ' + title if title else ''}", fontsize=9)
    _fixed_margins(fig, left=0.45, right=0.12, top=0.5, bottom=0.42, wspace=0.48 if multi else 0.32, hspace=0.6)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_class_curves(scans: Mapping[str, LayerScan], i: int, path: str, *, title: str = "",
                      class_names: Sequence[str] = (), dataset_names: Sequence[str] = ()) -> str:
    """One row per layer. Left: the highest scores of each (dataset, class) group, sorted, groups side by side
    (the authors' ``magic_class_plot``). Right: each group's total score (``total_score_per_class``)."""
    plt = _plt()
    score = _score_of(scans)
    fig, axes = plt.subplots(len(scans), 2, figsize=(10, 2.1 * len(scans)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("tab10")
    for r, (name, scan) in enumerate(scans.items()):
        if not scan.group_top:
            raise ValueError(f"layer {name}: the scan kept no per-class top rows; scan with group_top_k > 0.")
        gs = scan.group_top["score"][i]  # (D, C, k)
        n_d, n_c, k = gs.shape
        ax = axes[r, 0]
        x0, ticks = 0, []
        for d in range(n_d):
            for c in range(n_c):
                y = gs[d, c]
                y = y[~np.isnan(y)]
                ax.plot(np.arange(x0, x0 + len(y)), y, lw=1, color=cmap(d % 10))
                ticks.append((x0 + k / 2, class_names[c] if c < len(class_names) else str(c)))
                x0 += k + k // 10
        ax.set_xticks([t for t, _ in ticks])
        ax.set_xticklabels([t[:5] for _, t in ticks], fontsize=5, rotation=90 if n_d * n_c > 10 else 0)
        ax.tick_params(labelsize=6)
        ax.set_title(f"{name}: top {k} per class, sorted", fontsize=8)
        ax = axes[r, 1]
        mass = scan.group_mass[i]
        for d in range(n_d):
            ax.bar(np.arange(n_c) + d * (n_c + 1), mass[d], color=cmap(d % 10),
                   label=dataset_names[d] if d < len(dataset_names) else None)
        ax.set_xticks(np.arange(n_d * (n_c + 1)))
        ax.set_xticklabels([(class_names[c][:5] if c < len(class_names) else str(c)) if c < n_c else ""
                            for d in range(n_d) for c in range(n_c + 1)], fontsize=5, rotation=90)
        ax.tick_params(labelsize=6)
        ax.set_title(f"{name}: total {score} per class", fontsize=8)
        if r == 0 and n_d > 1 and dataset_names:
            ax.legend(fontsize=6)
    fig.suptitle(f"Scores by class ({score}){': ' + title if title else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_example_totals(scans: Mapping[str, LayerScan], i: int, path: str, *, title: str = "",
                        dataset_names: Sequence[str] = ()) -> str:
    """One panel per layer: every training example's total score over its presentations, sorted, coloured
    by dataset (the authors' ``plot_total_scores``)."""
    plt = _plt()
    score = _score_of(scans)
    fig, axes = plt.subplots(1, len(scans), figsize=(3.4 * len(scans), 2.5), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, scan) in zip(axes[0], scans.items()):
        if scan.example_mass is None:
            raise ValueError(f"layer {name}: the scan has no per-example totals; scan with example_mass=True.")
        tot = scan.example_mass[i]
        seen = scan.example_dataset >= 0
        order = np.argsort(-tot[seen], kind="stable")
        ds = scan.example_dataset[seen][order]
        y = tot[seen][order]
        for d in np.unique(ds):
            m = ds == d
            ax.plot(np.flatnonzero(m), y[m], ".", ms=1.5, color=cmap(int(d) % 10),
                    label=dataset_names[d] if d < len(dataset_names) else f"dataset {d}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training example, by rank", fontsize=7)
        ax.tick_params(labelsize=6)
        if len(np.unique(ds)) > 1:
            ax.legend(fontsize=6, markerscale=4)
    axes[0, 0].set_ylabel(f"total {score}", fontsize=7)
    suffix = f": {title}" if title else ""
    fig.suptitle(f"Per training example: total {score} over its presentations{suffix}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_top_images(scans: Mapping[str, LayerScan], i: int, path: str, images: Any, query_image: np.ndarray, *,
                    k: int = 3, title: str = "", class_names: Sequence[str] = ()) -> str:
    """The query image, then the ``k`` highest-scoring training rows' images per layer; ``images(index (m,))``
    returns their pictures ``(m, H, W)`` in [0, 1]."""
    plt = _plt()
    score = _score_of(scans)
    fig, axes = plt.subplots(1, 1 + k * len(scans), figsize=(1.15 * (1 + k * len(scans)), 1.6), squeeze=False)

    def show(ax: Any, img: np.ndarray, text: str) -> None:
        ax.imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(text, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])

    show(axes[0, 0], query_image, title or "query")
    for j, (name, scan) in enumerate(scans.items()):
        idx = scan.top["index"][i, :k]
        pics = images(idx)
        for r in range(len(idx)):
            lab = int(scan.top["label"][i, r])
            named = class_names[lab] if 0 <= lab < len(class_names) else lab
            text = f"{name} #{r + 1}\n{named} s{int(scan.top['step'][i, r])}"
            show(axes[0, 1 + j * k + r], pics[r], text)
    fig.suptitle(f"Top {k} training rows per layer by {score} (title: layer, rank, label, step)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


__all__ = ["plot_class_curves", "plot_example_totals", "plot_rank_profile", "plot_top_images"]
