"""The measures the paper's authors computed over a layer's memory, streamed over a store's rows.

The authors' code (``RobertCsordas/linear_layer_as_attention``, ``tasks/simple/ff_as_attention/``) scores
every stored row ``k_t`` of a layer against a query ``q`` (the layer's input for a test or training input)
as ``|k_t . q|`` and then draws, per query and layer:

- the top 500 rows by score, with their label, training step and dataset (``plot_per_update``: ``top_500``,
  ``labels_500``, ``timesteps_500``, ``datasets_500``): :attr:`LayerScan.top`;
- per dataset and class, the top 500 scores sorted, their steps, and the class totals
  (``magic_class_plot``, ``magic_timestep_plot``, ``total_score_per_class``): :attr:`LayerScan.group_top`,
  :attr:`LayerScan.group_mass`;
- per training example, the total over all its presentations (``plot_total_scores``):
  :attr:`LayerScan.example_mass`;
- the vote, the class with the largest total, against the label and the model's prediction, for correctly
  and wrongly classified queries (``MatchTracker``, ``print_predictive_power.py``): :func:`vote_rates`;
- the spread of the class totals, ``mean / std`` over the classes of each dataset, averaged over good and
  over bad queries (``mean_of_normalized_class_variances``): :func:`class_spread`;
- means and (sample) standard deviations over seeds (``paper/lib/stat_tracker.py``): :func:`mean_std`.

Every measure takes ``score="abs"`` (the authors' ``|k . q|``) or ``score="signed"`` (``k . q``, the term
the layer's output actually sums) and says which it used. The two agree only where every ``k . q`` is
non-negative, e.g. a first layer fed non-negative pixels.

Memory: a scan keeps ``n_queries x (groups + top_k)`` numbers, plus ``n_queries x n_examples`` with
``example_mass=True``; it reads the layer's rows once, in blocks of ``block_rows``.

Example::

    with StoreReader("runs/mnist.h5") as store:
        q = layer_inputs(model, x_test[:100])                  # {layer: (100, d_in)}
        scan = scan_layer(store, "net.1", q["net.1"], score="abs", classes=10)
        rates = vote_rates(votes(scan), y_test[:100], pred[:100])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lightning_dualform._unwrap import named_modules
from lightning_dualform.store.reader import StoreReader

Score = Literal["abs", "signed"]
SCORES: tuple[Score, ...] = ("abs", "signed")
#: ``dataset_of(index (B,)) -> (B,)`` dataset number of each stored row's dataset index (0 for one dataset).
DatasetOf = Callable[[np.ndarray], np.ndarray]


def _check_score(score: str, call: str) -> None:
    if score not in SCORES:
        raise ValueError(f"`{call}(score={score!r})`: expected 'abs' (the authors' |k.q|) or 'signed' (k.q).")


def score_label(score: str) -> str:
    """How a figure or table names a score: ``"|k·q|"`` or ``"k·q"``."""
    return "|k·q|" if score == "abs" else "k·q"


# ------------------------------------------------------------------------------------------------------
# queries: a layer's inputs
# ------------------------------------------------------------------------------------------------------
def layer_inputs(
    model: nn.Module, x: torch.Tensor | np.ndarray, layers: Sequence[str] | None = None, *, batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """The input of each ``nn.Linear`` layer of ``model`` for inputs ``x``: the layer's queries.

    Args:
        model: the trained model (put in eval mode for the pass, then restored).
        x: ``(n, ...)`` model inputs.
        layers: module names (default: every ``nn.Linear``).
        batch_size: inputs per forward pass.

    Returns:
        ``{layer: (n, d_in) float32}``.

    Raises:
        ValueError: a named layer is not an ``nn.Linear`` of the model.
    """
    mods = named_modules(model)
    names = list(layers) if layers is not None else [n for n, m in mods.items() if isinstance(m, nn.Linear)]
    bad = [n for n in names if not isinstance(mods.get(n), nn.Linear)]
    if bad:
        raise ValueError(f"`layer_inputs(layers=...)`: {bad} are not nn.Linear layers of the model; "
                         f"it has {[n for n, m in mods.items() if isinstance(m, nn.Linear)]}.")
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    handles = [mods[n].register_forward_hook(
        lambda m, inp, out, n=n: parts[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]).float().cpu().numpy()))
        for n in names]
    was_training = model.training
    model.eval()
    xt = torch.as_tensor(x)
    try:
        with torch.no_grad():
            for i in range(0, len(xt), batch_size):
                model(xt[i: i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: np.concatenate(p) if p else np.zeros((0, mods[n].in_features), np.float32) for n, p in parts.items()}


# ------------------------------------------------------------------------------------------------------
# one pass over a layer's rows
# ------------------------------------------------------------------------------------------------------
@dataclass
class LayerScan:
    """What one pass over a layer's rows found for ``n`` queries, under one score.

    Attributes:
        layer, score: the layer and ``"abs"``/``"signed"``.
        n_rows: rows attended (the memory of the model after ``at_step``).
        group_mass: ``(n, D, C)`` float64 sum of the score over rows of dataset ``d`` and class ``c``
            (rows without a label are left out).
        total: ``(n,)`` float64 sum of ``|score|`` over every row (the denominator of shares).
        top: ``{"score", "row", "step", "index", "label", "dataset"}``, each ``(n, k)``, the ``k`` highest
            scores per query, highest first (ties: the earlier row first).
        group_top: ``{"score", "step"}``, each ``(n, D, C, k_group)``, the highest scores per dataset and class
            (NaN / -1 where a group has fewer rows), or empty when not asked for.
        example_mass: ``(n, E)`` float64 sum of the score over every presentation of each training example
            (dataset index ``0..E-1``), or ``None``.
        example_dataset: ``(E,)`` the dataset of each example (from ``dataset_of``), or ``None``.
    """

    layer: str
    score: str
    n_rows: int
    group_mass: np.ndarray
    total: np.ndarray
    top: dict[str, np.ndarray]
    group_top: dict[str, np.ndarray] = field(default_factory=dict)
    example_mass: np.ndarray | None = None
    example_dataset: np.ndarray | None = None

    @property
    def class_mass(self) -> np.ndarray:
        """``(n, C)``: the class totals over every dataset (what the authors' vote takes the argmax of)."""
        return self.group_mass.sum(1)

    def top_share(self, k: int) -> np.ndarray:
        """``(n,)`` share of each query's total ``|score|`` held by its ``k`` highest-scoring rows
        (``k`` at most the scan's ``top_k``)."""
        if k > self.top["score"].shape[1]:
            raise ValueError(f"`top_share(k={k})`: the scan kept only the top {self.top['score'].shape[1]} rows; "
                             f"scan with top_k >= {k}.")
        held = np.abs(self.top["score"][:, :k]).sum(1)
        return np.divide(held, self.total, out=np.full(len(held), np.nan), where=self.total > 0)


def _merge_top(
    best: dict[str, np.ndarray], scores: np.ndarray, meta: dict[str, np.ndarray], k: int,
) -> dict[str, np.ndarray]:
    """Keep the ``k`` largest of ``best`` (n, k) and a block's ``scores`` (n, B); earlier rows win ties, NaN
    counts as -inf."""
    n, b = scores.shape
    if not (k and b):
        return best
    take = None
    if best["score"].shape[1] == k:
        # once the top is full only scores strictly above a query's k-th can enter (a tie loses to the earlier
        # row it holds); after a layer's first blocks those are few, and no partition of the block is needed
        kth = best["score"][:, k - 1]
        take = scores > np.where(np.isnan(kth), -np.inf, kth)[:, None]
        if 4 * int(take.sum(1).max()) > b:
            take = None
    if take is None:
        # the block's k highest, and every row tied with the k-th: the sort below orders ties by row
        s = np.where(np.isnan(scores), -np.inf, scores)
        kk = min(k, b)
        take = s >= np.partition(s, b - kk, axis=1)[:, b - kk][:, None]
    counts = take.sum(1)
    width = int(counts.max())
    if width == 0:
        return best
    q, col = np.nonzero(take)  # row-major: by query, then by column
    slot = np.arange(len(q)) - np.repeat(np.cumsum(counts) - counts, counts)
    cand = {"score": np.full((n, width), -np.inf)}
    cand["score"][q, slot] = scores[q, col]
    for c, v in meta.items():
        cand[c] = np.full((n, width), -1, dtype=v.dtype)
        cand[c][q, slot] = v[col]
    merged = {c: np.concatenate([best[c], cand[c]], 1) for c in best}
    order = _order(merged["score"], merged["row"])[:, :k]  # the padding (-inf, row -1) sorts last
    return {c: np.take_along_axis(v, order, 1) for c, v in merged.items()}


def _order(score: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Per query: positions sorted by score descending, then row ascending (rows -1, empty slots, last)."""
    key_row = np.where(row < 0, np.iinfo(np.int64).max, row)
    out = np.empty(score.shape, dtype=np.int64)
    for i in range(score.shape[0]):
        s = np.where(np.isnan(score[i]), -np.inf, score[i])
        out[i] = np.lexsort((key_row[i], -s))
    return out


def _empty_top(n: int, k: int) -> dict[str, np.ndarray]:
    top = {c: np.full((n, 0), -1, dtype=np.int64) for c in ("row", "step", "index", "label", "dataset")}
    top["score"] = np.zeros((n, 0))
    return top


def scan_layer(
    store: StoreReader | str,
    layer: str,
    queries: np.ndarray | torch.Tensor,
    *,
    score: Score = "abs",
    **kw: object,
) -> LayerScan:
    """Score every stored row of ``layer`` against ``queries`` under one score; see :func:`scan_layer_scores`
    for the arguments."""
    _check_score(score, "scan_layer")
    return scan_layer_scores(store, layer, queries, scores=(score,), **kw)[score]  # type: ignore[arg-type]


class _Acc:
    """The running state of one score during a scan."""

    def __init__(
        self, score: str, n: int, d: int, c: int, top_k: int, group_top_k: int, n_examples: int | None,
    ) -> None:
        self.score, self.top_k, self.group_top_k = score, top_k, group_top_k
        self.group_mass = np.zeros((n, d, c))
        self.total = np.zeros(n)
        self.top = _empty_top(n, top_k)
        self.group_top = {"score": np.full((n, d, c, group_top_k), np.nan),
                          "step": np.full((n, d, c, group_top_k), -1, np.int64)} if group_top_k else {}
        self.example_mass = np.zeros((n, n_examples)) if n_examples is not None else None

    def add(
        self, s: np.ndarray, meta: dict[str, np.ndarray], known: np.ndarray, group: np.ndarray, classes: int,
    ) -> None:
        n = s.shape[0]
        d, c = self.group_mass.shape[1:]
        self.total += (s if self.score == "abs" else np.abs(s)).sum(1)
        gm = torch.zeros(n, d * c, dtype=torch.float64)
        s_known = s if known.all() else np.ascontiguousarray(s[:, known])
        gm.index_add_(1, torch.from_numpy(group), torch.from_numpy(s_known))
        self.group_mass += gm.numpy().reshape(n, d, c)
        if self.top_k:
            self.top = _merge_top(self.top, s, meta, self.top_k)
        if self.group_top_k:
            cols_known = np.flatnonzero(known)
            for g in np.unique(group):
                dd, cc = divmod(int(g), classes)
                cols = cols_known[group == g]
                both = np.concatenate([self.group_top["score"][:, dd, cc], s[:, cols]], 1)
                steps = np.concatenate([self.group_top["step"][:, dd, cc],
                                        np.broadcast_to(meta["step"][cols], (n, len(cols)))], 1)
                order = np.argsort(-np.where(np.isnan(both), -np.inf, both), axis=1, kind="stable")
                keep = order[:, : self.group_top_k]
                self.group_top["score"][:, dd, cc] = np.take_along_axis(both, keep, 1)
                self.group_top["step"][:, dd, cc] = np.take_along_axis(steps, keep, 1)
        if self.example_mass is not None:
            index = meta["index"]
            ok = index >= 0
            em = torch.from_numpy(self.example_mass)
            em.index_add_(1, torch.from_numpy(index[ok]), torch.from_numpy(np.ascontiguousarray(s[:, ok])))


def scan_layer_scores(
    store: StoreReader | str,
    layer: str,
    queries: np.ndarray | torch.Tensor,
    *,
    scores: Sequence[Score] = SCORES,
    classes: int | None = None,
    dataset_of: DatasetOf | None = None,
    n_datasets: int = 1,
    top_k: int = 500,
    group_top_k: int = 0,
    example_mass: bool = False,
    n_examples: int | None = None,
    at_step: int | None = None,
    block_rows: int = 32768,
) -> dict[str, LayerScan]:
    """Score every stored row of ``layer`` against ``queries`` once and keep, for each score asked for,
    what the authors' measures need.

    Args:
        store: an open :class:`StoreReader` or a store path.
        layer: the layer (one of ``store.layers``; a linear layer: one row per example and step).
        queries: ``(n, d_in)`` the layer's inputs (:func:`layer_inputs`).
        scores: any of ``"abs"`` (``|k.q|``, the authors') and ``"signed"`` (``k.q``).
        classes: number of classes (default: ``1 +`` the largest stored label).
        dataset_of: maps rows' dataset indices to dataset numbers ``0..n_datasets-1`` (default: all 0).
        n_datasets: how many datasets ``dataset_of`` names.
        top_k: rows kept per query (the authors drew 500).
        group_top_k: rows kept per query, dataset and class (0: none; the authors drew 500).
        example_mass: also sum the score per training example (dataset index).
        n_examples: number of dataset indices (default: ``1 +`` the largest stored index).
        at_step: the model after this many steps (default: the end of training).
        block_rows: rows read at a time.

    Returns:
        ``{score: LayerScan}``.

    Raises:
        ValueError: a bad score, a query width the layer does not take, or a label/dataset outside range.
    """
    scores = tuple(scores)
    if not scores:
        raise ValueError("`scan_layer_scores(scores=())`: name at least one of 'abs', 'signed'.")
    for sc in scores:
        _check_score(sc, "scan_layer_scores")
    sizes = (("top_k", top_k), ("group_top_k", group_top_k), ("block_rows", block_rows), ("n_datasets", n_datasets))
    for name, v in sizes:
        positive = name in ("block_rows", "n_datasets")
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if positive else 0):
            kind = "positive" if positive else "non-negative"
            raise ValueError(f"`scan_layer_scores({name}={v!r})` must be a {kind} integer.")
    own = not isinstance(store, StoreReader)
    reader = StoreReader(store) if own else store
    try:
        lay = reader.layer(layer)
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32)) if not isinstance(queries, torch.Tensor) else queries
        q = q.to(torch.float32)
        if q.dim() == 1:
            q = q[None]
        if q.dim() != 2 or q.shape[1] != lay.d_in:
            raise ValueError(
                f"`scan_layer_scores`: queries of layer {layer!r} must be (n, {lay.d_in}); got {tuple(q.shape)}.")
        n = q.shape[0]
        _, end = lay.end_step(at_step)
        n_rows = lay.rows_before(end)
        if classes is None or (example_mass and n_examples is None):
            lab_max, idx_max = -1, -1
            for s0 in range(0, n_rows, 1 << 20):
                blk = lay.read(s0, min(n_rows, s0 + (1 << 20)), ("label", "index"))
                if len(blk["label"]):
                    lab_max, idx_max = max(lab_max, int(blk["label"].max())), max(idx_max, int(blk["index"].max()))
            classes = classes if classes is not None else lab_max + 1
            n_examples = n_examples if n_examples is not None else idx_max + 1
        classes = max(int(classes), 1)
        accs = {sc: _Acc(sc, n, n_datasets, classes, top_k, group_top_k, int(n_examples) if example_mass else None)
                for sc in scores}
        ex_dataset = np.full(int(n_examples), -1, np.int64) if example_mass else None
        for start in range(0, n_rows, block_rows):
            stop = min(n_rows, start + block_rows)
            blk = lay.read(start, stop, ("keys", "step", "index", "label"))
            raw = (q @ torch.from_numpy(blk["keys"]).t()).double().numpy()  # (n, B): float32 products
            label, index = blk["label"].astype(np.int64), blk["index"].astype(np.int64)
            ds = np.zeros(len(index), np.int64) if dataset_of is None else np.asarray(dataset_of(index), np.int64)
            if len(ds) and (ds.min() < 0 or ds.max() >= n_datasets):
                raise ValueError(f"`scan_layer_scores`: dataset_of gave datasets outside 0..{n_datasets - 1}.")
            if len(label) and label.max() >= classes:
                raise ValueError(
                    f"`scan_layer_scores(classes={classes})`: layer {layer!r} holds label {int(label.max())}.")
            if ex_dataset is not None:
                ok = index >= 0
                if ok.any() and index[ok].max() >= len(ex_dataset):
                    raise ValueError(f"`scan_layer_scores(n_examples={len(ex_dataset)})`: layer {layer!r} holds "
                                     f"index {int(index.max())}.")
                ex_dataset[index[ok]] = ds[ok]
            known = label >= 0
            group = ds[known] * classes + label[known]
            meta = {"row": np.arange(start, stop, dtype=np.int64), "step": blk["step"].astype(np.int64),
                    "index": index, "label": label, "dataset": ds}
            for sc, acc in accs.items():
                acc.add(np.abs(raw) if sc == "abs" else raw, meta, known, group, classes)
        return {sc: LayerScan(layer=layer, score=sc, n_rows=n_rows, group_mass=a.group_mass, total=a.total, top=a.top,
                              group_top=a.group_top, example_mass=a.example_mass, example_dataset=ex_dataset)
                for sc, a in accs.items()}
    finally:
        if own:
            reader.close()


# ------------------------------------------------------------------------------------------------------
# votes, spread, seeds
# ------------------------------------------------------------------------------------------------------
def votes(scan: LayerScan | np.ndarray) -> np.ndarray:
    """``(n,)`` the class with the largest total score over every dataset (the authors' ``won``)."""
    mass = scan.class_mass if isinstance(scan, LayerScan) else np.asarray(scan)
    return np.argmax(mass, axis=1)


@dataclass
class VoteRates:
    """The authors' vote table for one layer: fractions, NaN where a group is empty."""

    n_correct: int
    n_wrong: int
    correct: float  # vote == label (== prediction) among correctly classified queries
    wrong_label: float  # vote == label among wrongly classified queries
    wrong_prediction: float  # vote == prediction among wrongly classified queries
    all_label: float
    all_prediction: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def _rate(hit: np.ndarray) -> float:
    return float(hit.mean()) if len(hit) else float("nan")


def vote_rates(vote: np.ndarray, label: np.ndarray, prediction: np.ndarray) -> VoteRates:
    """How often the vote equals the label and the prediction, split by whether the model was right.

    Args:
        vote, label, prediction: ``(n,)`` integers.

    Raises:
        ValueError: the three differ in length.
    """
    vote, label, prediction = (np.asarray(a).reshape(-1) for a in (vote, label, prediction))
    if not len(vote) == len(label) == len(prediction):
        raise ValueError(f"`vote_rates`: {len(vote)} votes, {len(label)} labels, {len(prediction)} predictions.")
    ok = label == prediction
    return VoteRates(n_correct=int(ok.sum()), n_wrong=int((~ok).sum()), correct=_rate((vote == label)[ok]),
                     wrong_label=_rate((vote == label)[~ok]), wrong_prediction=_rate((vote == prediction)[~ok]),
                     all_label=_rate(vote == label), all_prediction=_rate(vote == prediction))


def class_spread(scan: LayerScan | np.ndarray) -> np.ndarray:
    """``(n, D)``: per query and dataset, the mean of the class totals over their standard deviation (sample,
    ``ddof=1``), the authors' ``score_per_label.mean(0) / score_per_label.std(0)``. Low values: one or a few
    classes hold most of the total; high: the totals are even across classes."""
    mass = scan.group_mass if isinstance(scan, LayerScan) else np.asarray(scan)
    std = mass.std(axis=2, ddof=1)
    return np.divide(mass.mean(axis=2), std, out=np.full(std.shape, np.nan), where=std > 0)


def mean_std(values: Sequence[float] | np.ndarray, axis: int = 0) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value) over ``axis``, NaNs ignored, as the
    authors' ``StatTracker`` reports over seeds."""
    a = np.asarray(values, dtype=np.float64)
    mean = np.nanmean(a, axis=axis)
    n = np.sum(~np.isnan(a), axis=axis)
    var = np.nansum((a - np.expand_dims(mean, axis)) ** 2, axis=axis) / np.maximum(n - 1, 1)
    std = np.where(n > 1, np.sqrt(var), 0.0)
    if np.ndim(mean) == 0:
        return float(mean), float(std)
    return mean, std


def fmt_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"79.6 ± 1.2"`` (percent by default) over seeds; ``"79.6"`` for one value; ``"–"`` for none."""
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "–"
    m, s = mean_std(vals)
    return f"{scale * m:.{digits}f}" if len(vals) == 1 else f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def pick_queries(label: np.ndarray, prediction: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(correct, wrong)``: up to ``n`` random positions of correctly and of wrongly classified queries
    (the authors drew ``analyze_n_samples`` of each at random)."""
    label, prediction = np.asarray(label), np.asarray(prediction)
    rng = np.random.default_rng(seed)
    right, wrong = np.flatnonzero(label == prediction), np.flatnonzero(label != prediction)
    return (np.sort(rng.permutation(right)[:n]), np.sort(rng.permutation(wrong)[:n]))


def dataset_ranges(sizes: Mapping[str, int] | Sequence[int]) -> DatasetOf:
    """``dataset_of`` for a concatenation ``[d0 | d1 | ...]`` of datasets of these sizes (dataset indices
    ``0..sum-1``): index ``i`` belongs to the dataset whose range holds it."""
    ends = np.cumsum(list(sizes.values()) if isinstance(sizes, Mapping) else list(sizes))

    def dataset_of(index: np.ndarray) -> np.ndarray:
        return np.searchsorted(ends, np.asarray(index), side="right")

    return dataset_of


def step_ranges(bounds: Sequence[int]) -> Callable[[np.ndarray], np.ndarray]:
    """For continual learning: the phase of each step, where phase ``p`` starts at ``bounds[p]``
    (``bounds[0]`` is the first step); use it on a scan's ``top["step"]``."""
    b = np.asarray(bounds[1:])

    def phase(step: np.ndarray) -> np.ndarray:
        return np.searchsorted(b, np.asarray(step), side="right")

    return phase


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
    "scan_layer",
    "scan_layer_scores",
    "score_label",
    "step_ranges",
    "vote_rates",
    "votes",
]
