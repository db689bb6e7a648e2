"""The paper's studies: the authors' measures over a store (:mod:`.measures`) and their figures (:mod:`.plots`).

Irie, Csordás and Schmidhuber (ICML 2022) published their code (``RobertCsordas/linear_layer_as_attention``);
the measures here are the ones its task code computes and its plot scripts draw, each with the authors'
``|k·q|`` and with the signed ``k·q`` that the layer's output sums. ``docs/paper.md`` sets our runs beside
theirs.
"""

from lightning_dualform.studies.measures import (
    SCORES,
    DatasetOf,
    LayerScan,
    Score,
    VoteRates,
    class_spread,
    dataset_ranges,
    fmt_mean_std,
    layer_inputs,
    mean_std,
    pick_queries,
    scan_layer,
    scan_layer_scores,
    score_label,
    step_ranges,
    vote_rates,
    votes,
)
from lightning_dualform.studies.plots import plot_class_curves, plot_example_totals, plot_rank_profile, plot_top_images

__all__ = [
    "SCORES",
    "DatasetOf",
    "LayerScan",
    "Score",
    "VoteRates",
    "class_spread",
    "dataset_ranges",
    "fmt_mean_std",
    "layer_inputs",
    "mean_std",
    "pick_queries",
    "plot_class_curves",
    "plot_example_totals",
    "plot_rank_profile",
    "plot_top_images",
    "scan_layer",
    "scan_layer_scores",
    "score_label",
    "step_ranges",
    "vote_rates",
    "votes",
]
