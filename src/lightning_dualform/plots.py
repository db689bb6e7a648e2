"""Pictures of which training examples a query depends on: influence first, then the attention view.

Given an influence answer (``influence=``: :func:`~lightning_dualform.attribute.views.influence_answer`'s dict, or
an :class:`~lightning_dualform.attribute.Influence`, of whichever method: the first-order score through the output
layer that the CLI computes from the store alone, or every layer, TracIn at every step, the metagradient with the
model), each query's first two rows are its proponents and opponents by influence on the prediction's margin,
each number labelled ``dmargin/dw``. Then one row per query and layer: the query image (once per query), the
top-k training images with their score, label and epoch, the attention mass per class as bars, and the attention mass over training steps
(the "spotlights": which moments of training the layer's output draws on). A layer whose result ranks
contributions to an output unit (``units``: the output layer, and every layer of an element-wise optimizer's
store) gets two more rows: its proponents and opponents. Every number is labelled with what it is (the score
``k . q`` or the unit's attention weight ``-(Q_s[u] (.) k) . q``, or a contribution). Data that is not an image
gets the same layout with text cards instead of thumbnails.

Matplotlib is an optional extra (``pip install 'lightning-dualform[plot]'``); drawing uses the Agg canvas
directly, so no global backend is changed.

Example::

    from lightning_dualform.query_runs import attend_queries
    with DualInference("demo/mnist.h5") as di:
        run = attend_queries(di, split="test", positions=[0, 1], top_k=5)
        plot_attention(run, di.store, "top.png")            # attention only
        inf = di.influence(model, x_test_0_1)                # any method, with the model
        plot_attention(run, di.store, "top.png", influence=inf)
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Any, Sequence

import numpy as np

_INSTALL = "pip install 'lightning-dualform[plot]'"
MAX_QUERIES = 8
#: proponents and opponents drawn from an ``Influence`` table
MAX_THUMBS = 8
_POS = "#2a7ab0"  # bars: attention toward a class
_NEG = "#c0504d"
_HIGHLIGHT = "#e69f00"  # the predicted class
_MATCH = "#3a9a4a"  # thumbnail frame: same label as the prediction
_OTHER = "#bbbbbb"


def require_matplotlib() -> Any:
    """Import matplotlib or say how to install it.

    Raises:
        ImportError: matplotlib is not installed; the message gives the pip command.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(f"pictures need matplotlib, an optional extra: `{_INSTALL}`.") from err
    return matplotlib


def as_image(x: np.ndarray) -> np.ndarray | None:
    """A raw input as something ``imshow`` takes, or None when it is not an image.

    ``(H, W)``, ``(1|3, H, W)``, ``(H, W, 3)`` are images; a flat vector whose length is a square
    ``>= 64`` (784 = 28 x 28) is reshaped to a square.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        side = int(math.isqrt(a.size))
        if a.size >= 64 and side * side == a.size:
            return a.reshape(side, side)
        return None
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a, 0, -1)
        return a
    if a.ndim == 3 and a.shape[-1] == 3:
        return a
    return None


#: the lists a layer's rows show: the top by score, and, where the result has units, proponents and opponents
_KINDS = {"top": ("top", "top_examples"), "pro": ("proponents", "proponent_examples"),
          "con": ("opponents", "opponent_examples")}


def _ranking(res: Any, r: int, by: str, kind: str = "top") -> list[dict[str, Any]]:
    rows_attr, examples_attr = _KINDS[kind]
    if by == "example":
        t = getattr(res, examples_attr)
        if t is None:
            return []
        return [{"index": int(t.index[r, i]), "label": int(t.label[r, i]), "score": float(t.score[r, i]),
                 "sub": f"{int(t.rows[r, i])} rows"} for i in range(t.index.shape[1]) if int(t.index[r, i]) >= 0]
    t = getattr(res, rows_attr)
    if t is None:
        return []
    return [{"index": int(t.index[r, i]), "label": int(t.label[r, i]), "score": float(t.score[r, i]),
             "sub": f"ep {int(t.epoch[r, i])}"} for i in range(t.row.shape[1]) if int(t.row[r, i]) >= 0]


def _kinds(res: Any) -> list[str]:
    """The lists drawn for a layer: the top rows, then proponents and opponents where the result has units."""
    return ["top", "pro", "con"] if getattr(res, "units", None) is not None else ["top"]


def score_symbol(res: Any) -> str:
    """What a result's scores are, short: ``k·q`` (similarity) or ``w_u`` (the unit's attention weight)."""
    return "w_u" if getattr(res, "score", "raw") == "unit" else "k·q"


def score_phrase(results: dict[str, Any]) -> str:
    """What the pictures rank by, from the results' ``score`` (``AttentionResult.score``)."""
    scores = {getattr(r, "score", "raw") for r in results.values()}
    if scores == {"unit"}:
        return "ranked by w_u = -(Q_s[u] ⊙ k) · q, the attention weight for each query's unit u"
    if scores == {"raw"}:
        return "ranked by the similarity k · q"
    return "ranked by k · q or by the unit attention weight w_u = -(Q_s[u] ⊙ k) · q (per layer)"


def _name(label: int, class_names: Sequence[str] | None) -> str:
    if label < 0:
        return "?"
    if class_names is not None and label < len(class_names):
        return str(class_names[label])
    return str(label)


def _epoch_starts(store: Any) -> list[int]:
    steps = np.asarray(getattr(store, "update_steps", []))
    epochs = np.asarray(getattr(store, "update_epochs", []))
    if len(steps) < 2:
        return []
    return [int(s) for s in steps[1:][np.diff(epochs) != 0]]


def plot_attention(
    run: Any,
    store: Any,
    path: str | os.PathLike,
    *,
    by: str = "pattern",
    class_names: Sequence[str] | None = None,
    max_queries: int = MAX_QUERIES,
    dpi: int = 110,
    influence: Any = None,
) -> str:
    """Draw an :class:`~lightning_dualform.analysis.QueryAttention` into ``path`` (.png, .pdf or .svg).

    Args:
        run: queries and results, from :func:`lightning_dualform.analysis.attend_queries`.
        store: the :class:`~lightning_dualform.StoreReader` the results came from (thumbnails, epochs).
        path: the output file.
        by: ``"pattern"`` (single training rows, with their epoch) or ``"example"`` (epochs summed).
        class_names: names of the labels (default: the numbers).
        max_queries: draw at most this many queries.
        dpi: resolution of a PNG.
        influence: drawn first for each query (proponents and opponents, labelled with the method and what the
            numbers are): an influence answer dict, or an ``Influence`` for the same queries; None: attention only.

    Returns:
        ``path`` as a string.

    Raises:
        ImportError: matplotlib is missing.
        ValueError: ``by`` is not ``"pattern"`` or ``"example"``.
    """
    path = os.fspath(path)
    attention_figure(run, store, by=by, class_names=class_names, max_queries=max_queries, dpi=dpi,
                     influence=influence).savefig(path, dpi=dpi)
    return path


def attention_image(run: Any, store: Any, **kw: Any) -> np.ndarray:
    """The picture of :func:`plot_attention` as an ``(H, W, 3)`` uint8 array (for a logger's images)."""
    fig = attention_figure(run, store, **kw)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


def attention_figure(
    run: Any,
    store: Any,
    *,
    by: str = "pattern",
    class_names: Sequence[str] | None = None,
    max_queries: int = MAX_QUERIES,
    dpi: int = 110,
    influence: Any = None,
) -> Any:
    """The matplotlib ``Figure`` (Agg canvas) that :func:`plot_attention` saves."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if by not in ("pattern", "example"):
        raise ValueError(f"`plot_attention(by={by!r})`: expected 'pattern' or 'example'.")
    layers = list(run.results)
    n_q = min(len(run.index), max_queries)
    kinds = {n: _kinds(run.results[n]) for n in layers}
    inf = _influence_answer(influence, len(run.index))
    inf_rows = 2 if inf is not None else 0
    k = max([len(_ranking(run.results[n], 0, by, kind)) for n in layers for kind in kinds[n]]
            + [len(q[side]) for q in (inf or {}).get("queries", [])[:n_q] for side in ("proponents", "opponents")]
            + [1])
    # the first result row of each (query, layer)
    first_row = {n: {int(e): int(np.flatnonzero(run.rows[n]["example"] == e)[0]) for e in np.unique(run.rows[n]["example"])}
                 for n in layers}
    # thumbnails: one read of every index shown
    shown = sorted({it["index"] for n in layers for j in range(n_q) if j in first_row[n] for kind in kinds[n]
                    for it in _ranking(run.results[n], first_row[n][j], by, kind)}
                   | {it["index"] for q in (inf or {}).get("queries", [])[:n_q] for side in ("proponents", "opponents")
                      for it in q[side]})
    raw = store.train_inputs(np.array(shown, dtype=np.int64)) if shown else None
    thumbs = {i: raw[p] for p, i in enumerate(shown)} if raw is not None else {}
    images = bool(thumbs) and as_image(next(iter(thumbs.values()))) is not None
    epoch_starts = _epoch_starts(store)

    per_query = inf_rows + sum(len(kinds[n]) for n in layers)  # grid rows of one query: influence, each layer's lists
    n_rows = n_q * per_query
    thumb_w = 1.25
    width = thumb_w * (1.6 + k) + 6.4
    what = "training patterns (one per presentation)" if by == "pattern" else "training examples (epochs summed)"
    at = next(iter(run.results.values())).at_step if run.results else 0
    # the title wraps to the figure's width (a one-layer figure is narrow): about 0.6 em per character
    text = f"Top-{k} {what} each layer attends to, after {at} optimizer steps; {score_phrase(run.results)}"
    if inf is not None:
        text = (f"Which training examples: {inf['label']}. Below, the paper's view (attention, not a prediction of "
                f"what removing an example would do): {text[0].lower()}{text[1:]}")
    title = textwrap.wrap(text, width=max(20, int(width * 72 / (12 * 0.62))))
    head = 0.45 + 0.24 * len(title)  # inches above the grid
    height = 1.55 * n_rows + head + 0.4
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    # columns: query, spacer (layer names), k thumbnails, spacer, class bars, spotlights
    gs = fig.add_gridspec(
        n_rows, 2 + k + 3, width_ratios=[1.15, 0.55] + [1] * k + [0.25, 2.2, 2.6],
        left=0.015, right=0.985, top=1 - head / height, bottom=0.4 / height, hspace=0.85, wspace=0.25,
    )
    fig.suptitle("\n".join(title), fontsize=12, fontweight="bold", y=1 - 0.12 / height, va="top")

    for j in range(n_q):
        r0 = j * per_query
        label, pred = int(run.label[j]), int(run.prediction[j])
        # the query
        ax = fig.add_subplot(gs[r0:r0 + per_query, 0])
        ax.set_xticks([])
        ax.set_yticks([])
        img = as_image(run.inputs[j]) if run.inputs is not None else None
        title = f"test #{int(run.index[j])}" if run.source.startswith("split:") else f"query {j}"
        if run.source.startswith("split:"):
            title = f"{run.source[6:]} #{int(run.index[j])}"
        sub = []
        if label >= 0:
            sub.append(f"label {_name(label, class_names)}")
        if pred >= 0:
            sub.append(f"pred {_name(pred, class_names)}" + (" ✗" if label >= 0 and label != pred else ""))
        if img is not None:
            ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, interpolation="nearest")
            ax.set_anchor("N")
        else:
            ax.set_facecolor("#f4f4f4")
            ax.text(0.5, 0.5, "query", ha="center", va="center", fontsize=10, transform=ax.transAxes)
        ax.set_title(title + "\n" + ", ".join(sub), fontsize=9.5, fontweight="bold",
                     color=_NEG if (label >= 0 and pred >= 0 and label != pred) else "black")
        for spine in ax.spines.values():
            spine.set_edgecolor("#444444")
        row = r0
        if inf is not None:
            q = inf["queries"][j] if j < len(inf["queries"]) else {"proponents": [], "opponents": []}
            sym = f"d{inf['target']}/dw" if inf["target"] in ("margin", "loss", "logit") else "df/dw"
            method = {"first_order": "first order", "every_step": "TracIn, every step",
                      "metagradient": "metagradient"}.get(inf["method"], inf["method"])
            scope = ", ".join(inf["layers"]) + (" only" if inf.get("scope") == "output layer" else "")
            for side in ("proponents", "opponents"):
                items = [{**it, "sub": f"#{it['index']}"} for it in q[side]]
                _thumb_row(fig, gs, row, k, items, f"influence\n{side}\n{method}\n{scope}", sym, "pro", pred, thumbs,
                           images, class_names)
                row += 1
        for li, name in enumerate(layers):
            res = run.results[name]
            rr = first_row[name].get(j)
            symbol = score_symbol(res)
            for kind in kinds[name]:
                items = _ranking(res, rr, by, kind) if rr is not None else []
                unit = int(res.units[rr]) if (kind != "top" and rr is not None) else None
                heading = {"top": f"{name}\nby {symbol}", "pro": f"{name}\nproponents\nof unit {unit}",
                           "con": f"{name}\nopponents\nof unit {unit}"}[kind]
                value = symbol if kind == "top" else "contrib."
                _thumb_row(fig, gs, row, k, items, heading, value, kind, pred, thumbs, images, class_names)
                if kind == "top":
                    axes = (fig.add_subplot(gs[row, 2 + k + 1]), fig.add_subplot(gs[row, 2 + k + 2]))
                    _mass_charts(axes, res, rr, pred=pred, class_names=class_names, symbol=symbol,
                                 epoch_starts=epoch_starts, first=li == 0, last=li == len(layers) - 1)
                row += 1
    if len(run.index) > n_q:
        fig.text(0.5, 0.002, f"{len(run.index) - n_q} more queries are in the table and the JSON", ha="center", fontsize=8)
    return fig


def _thumb_row(fig: Any, gs: Any, row: int, k: int, items: list[dict[str, Any]], heading: str, value: str, kind: str,
               pred: int, thumbs: dict[int, Any], images: bool, class_names: Sequence[str] | None) -> None:
    """One row of ``k`` thumbnails (a ranking), each titled with its number (``value`` says what it is), its label
    and ``sub``; the row's heading on the left."""
    for c in range(k):
        ax = fig.add_subplot(gs[row, 2 + c])
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
            ax.set_ylabel(heading, fontsize=9 if kind == "top" else 8.5, fontweight="bold", rotation=0,
                          ha="right", va="center", labelpad=6)
        if c >= len(items):
            if c == 0:  # keep the heading: hide the frame, not the axes
                ax.set_frame_on(False)
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, color="#777777", transform=ax.transAxes)
            else:
                ax.set_axis_off()
            continue
        it = items[c]
        x = thumbs.get(it["index"])
        match = pred >= 0 and it["label"] == pred
        if images and x is not None and not np.isnan(np.asarray(x, dtype=np.float32)).all():
            ax.imshow(as_image(x), cmap="gray_r", interpolation="nearest")
        else:
            ax.set_facecolor("#f6f6f6")
            ax.text(0.5, 0.5, f"#{it['index']}\nlabel {_name(it['label'], class_names)}", ha="center",
                    va="center", fontsize=8.5, transform=ax.transAxes)
        for spine in ax.spines.values():
            spine.set_edgecolor(_MATCH if match else _OTHER)
            spine.set_linewidth(2.2 if match else 1.0)
        color = _MATCH if match else "#333333"
        if kind != "top":
            color = _POS if it["score"] >= 0 else _NEG
        ax.set_title(f"{value} {it['score']:+.3g}\n{_name(it['label'], class_names)} · {it['sub']}",
                     fontsize=8, pad=2, color=color)


def _influence_answer(influence: Any, n: int) -> dict[str, Any] | None:
    """An influence answer dict (with ``queries``) from what ``influence=`` got, or None (nothing to draw)."""
    if influence is None:
        return None
    if not isinstance(influence, dict):  # an Influence table
        from lightning_dualform.attribute.views import influence_answer

        influence = influence_answer(influence, MAX_THUMBS)
    if not influence.get("queries"):
        return None
    if len(influence["queries"]) != n:
        raise ValueError(f"`plot_attention(influence=...)` has {len(influence['queries'])} queries; the run has {n}.")
    return influence


def _mass_charts(axes: tuple[Any, Any], res: Any, rr: int | None, *, pred: int, class_names: Sequence[str] | None,
                 symbol: str, epoch_starts: list[int], first: bool, last: bool) -> None:
    """The attention mass of one query at one layer: per class (bars, the predicted class highlighted) and over
    training steps (the spotlights, epoch starts dashed), as shares of the summed absolute scores."""
    from matplotlib.ticker import MaxNLocator

    ax = axes[0]
    m = res.mass.get("label") if rr is not None else None
    if m is not None:
        keys = m.keys.numpy()
        signed = m.signed[rr].double().numpy()
        total = float(m.absolute[rr].sum()) or 1.0
        keep = keys >= 0 if (keys >= 0).any() else np.ones_like(keys, dtype=bool)
        share = 100 * signed[keep] / total
        colors = [_HIGHLIGHT if int(kk) == pred else (_POS if v >= 0 else _NEG) for kk, v in zip(keys[keep], share)]
        ax.bar(np.arange(keep.sum()), share, color=colors, width=0.75)
        ax.set_xticks(np.arange(keep.sum()))
        narrow = len(keys[keep]) <= 12 and (class_names is None or max(len(str(n)) for n in class_names) <= 2)
        ax.set_xticklabels([_name(int(kk), class_names) if int(kk) >= 0 else "none" for kk in keys[keep]], fontsize=7.5,
                           rotation=0 if narrow else 60)
        ax.axhline(0, color="#666666", lw=0.6)
        ax.tick_params(axis="y", labelsize=7)
        if first:
            ax.set_title(f"mass per class: Σ {symbol}, % of Σ|{symbol}|", fontsize=8.5, pad=3)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    else:
        ax.set_axis_off()
    # spotlights: attention mass over training steps
    ax = axes[1]
    m = res.mass.get("step") if rr is not None else None
    if m is not None and m.edges is not None:
        edges = np.asarray(m.edges, dtype=np.float64)
        signed = m.signed[rr].double().numpy()
        total = float(m.absolute[rr].sum()) or 1.0
        share = 100 * signed / total
        widths = np.diff(edges)
        ax.bar(edges[:-1], share, width=widths * 0.92, align="edge", color=[_POS if v >= 0 else _NEG for v in share])
        for s in epoch_starts:
            if edges[0] < s < edges[-1]:
                ax.axvline(s, color="#333333", lw=1.2, ls="--")
        ax.axhline(0, color="#666666", lw=0.6)
        ax.set_xlim(edges[0], edges[-1])
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        if first:
            ax.set_title(f"spotlights: Σ {symbol} over steps, % (- - epochs)", fontsize=8.5, pad=3)
        if last:
            ax.set_xlabel("optimizer step", fontsize=7.5, labelpad=1)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    else:
        ax.set_axis_off()
