"""``plots.attention_figure``: what the picture draws and that it fits (read back from the figure's artists)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from helpers import TRAINER_KW, MLP, IndexedDataset, loader
from lightning_dualform import DualFormCallback, DualInference
from lightning_dualform.analysis import attend_queries

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.text import Text  # noqa: E402

from lightning_dualform.plots import attention_figure  # noqa: E402


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    out = {}
    for name, opt in (("sgd", lambda m: torch.optim.SGD(m.parameters(), lr=0.1)),
                      ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2))):
        path = str(tmp_path_factory.mktemp(name) / f"{name}.h5")
        torch.manual_seed(0)
        L.Trainer(max_epochs=2, callbacks=[DualFormCallback(path)], accelerator="cpu", **TRAINER_KW).fit(
            MLP(opt_factory=opt), loader(IndexedDataset(n=64), 16))
        out[name] = path
    return out


def _texts(fig) -> list[Text]:
    fig.canvas.draw()
    return [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]


def _figure(path: str, layers: list[str], n: int = 2):
    q = np.random.default_rng(0).normal(size=(n, 6)).astype(np.float32)
    with DualInference(path, device="cpu") as di:
        q = q if layers == ["net.0"] else None
        if q is None:  # the hidden layer's width
            q = np.random.default_rng(0).normal(size=(n, di.layer(layers[0]).d_in)).astype(np.float32)
        run = attend_queries(di, queries=q, layers=layers, top_k=5)
        return attention_figure(run, di.store), run


@pytest.mark.parametrize("store", ["sgd", "adamw"])
def test_a_one_layer_title_fits_the_figure(stores, store) -> None:
    fig, _ = _figure(stores[store], ["net.2"])
    title = [t for t in _texts(fig) if t.get_text().startswith("Top-")]
    assert len(title) == 1
    box = title[0].get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)


def test_every_list_of_a_result_is_drawn_and_labelled(stores) -> None:
    """An AdamW store's results rank by the unit's attention weight and have proponents and opponents at every
    layer: each list gets its row, each number says what it is."""
    fig, run = _figure(stores["adamw"], ["net.2"])
    res = run.results["net.2"]
    assert res.score == "unit" and res.units is not None and res.proponents is not None
    texts = [t.get_text() for t in _texts(fig)]
    units = {int(u) for u in res.units}
    for u in units:
        assert any(f"proponents\nof unit {u}" in t for t in texts), texts
        assert any(f"opponents\nof unit {u}" in t for t in texts)
    shown = [t for t in texts if t.startswith("contrib. ")]
    want = [float(s) for s in res.proponents.score[0].tolist() if s > 0][:5]
    drawn = [float(t.split()[1].split("\n")[0]) for t in shown[: len(want)]]
    assert drawn == pytest.approx(want, rel=5e-3)  # (3 digits)
    assert any(t.startswith("w_u ") for t in texts) and not any(t.startswith("k·q ") for t in texts)
    assert any("w_u = -(Q_s[u] ⊙ k) · q" in t for t in texts)
    assert any(t.startswith("mass per class: Σ w_u") for t in texts)


def test_an_sgd_hidden_layer_has_no_contribution_rows(stores) -> None:
    fig, run = _figure(stores["sgd"], ["net.0"])
    assert run.results["net.0"].units is None and run.results["net.0"].score == "raw"
    texts = [t.get_text() for t in _texts(fig)]
    assert not any("proponents" in t for t in texts) and any(t.startswith("k·q ") for t in texts)
