"""A character-level LSTM language model, and which training contexts a test prediction attends to.

The paper's language-modelling study analyses an LSTM's input projection, whose key is ``[h_{t-1}; x_t]``,
and its output layer. ``nn.LSTM`` runs its weights inside a fused kernel, so this model writes the cell
with one ``nn.Linear`` on the concatenation ``[h_{t-1}; x_t]`` (``LSTMCell.proj``), called once per time
step, plus an ``nn.Embedding`` for the characters and an ``nn.Linear`` head. Every call of the cell adds
one memory row per sequence; the row's ``position`` is its time step inside the sequence (the callback
counts positions across calls), and its dataset index names the training chunk. So a row points at a
place in the training text, and the analysis prints the text around the most attended rows.

The text is the source code of standard-library modules (``--modules``, read from their installed files:
every Python install has it). Training chunks are consecutive ``--seq-len`` character pieces of the first
90%; test chunks come from the rest.

Outputs in ``--out``: ``char_lm.h5``, ``contexts.md`` (for each analysed test prediction, the training
contexts each layer attends to most), ``votes.md`` (next-character votes of the output layer),
``top_steps.png``, ``summary.json``.

    python examples/char_lm.py --out runs/char_lm
    python examples/char_lm.py --modules os,inspect,argparse,typing --max-steps 3000 --hidden 256
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from typing_extensions import override

import common
from lightning_dualform import DualInference
from lightning_dualform.analysis import attend_recorded, step_histogram, top_rows, vote_table


def stdlib_text(modules: Sequence[str], max_chars: int) -> str:
    """The source files of standard-library modules, concatenated (at most ``max_chars`` characters)."""
    parts = []
    for name in modules:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
        except (ImportError, TypeError) as err:
            raise ValueError(f"--modules: cannot read the source of {name!r} ({err}); name pure-Python modules such as os, inspect.") from err
        with open(path, encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read())
    return "\n".join(parts)[:max_chars]


class LSTMCell(nn.Module):
    """An LSTM cell whose four gates come from one ``nn.Linear`` on ``[h_{t-1}; x_t]`` (capturable)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.proj = nn.Linear(hidden + d_in, 4 * hidden)

    @override
    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, g, o = self.proj(torch.cat([h, x], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class CharLM(pl.LightningModule):
    """Embedding -> LSTM cell (unrolled over time) -> linear head; SGD with momentum."""

    def __init__(self, vocab: int, embed: int = 16, hidden: int = 64, lr: float = 0.5, momentum: float = 0.9) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.cell = LSTMCell(embed, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.lr, self.momentum = lr, momentum

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T)`` character ids -> logits ``(B, T, vocab)`` of the next character."""
        e = self.embed(x)
        h = e.new_zeros(x.shape[0], self.cell.hidden)
        c = torch.zeros_like(h)
        hs = []
        for t in range(x.shape[1]):
            h, c = self.cell(e[:, t], (h, c))
            hs.append(h)
        return self.head(torch.stack(hs, dim=1))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x).flatten(0, 1), y.flatten())

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self(x)[:, -1]  # the prediction of a chunk's last next character is the query set's `prediction`

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def chunks(ids: np.ndarray, seq_len: int) -> common.IndexedTensors:
    """Non-overlapping ``(input, next-character)`` pairs: chunk ``i`` covers ``ids[i*T : i*T + T + 1]``."""
    n = (len(ids) - 1) // seq_len
    x = torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len).astype(np.int64))
    y = torch.from_numpy(ids[1: n * seq_len + 1].reshape(n, seq_len).astype(np.int64))
    return common.IndexedTensors(x, y)


def show(text: str, at: int, before: int = 40) -> str:
    """``text`` up to and including ``text[at]``, then the next character in brackets, on one line."""
    ctx = text[max(0, at - before): at + 1]
    nxt = text[at + 1] if at + 1 < len(text) else ""
    return (ctx + "⟦" + nxt + "⟧").replace("\n", "⏎").replace("\t", "⇥").replace("`", "ˋ")


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=200, lr=0.5, batch_size=32, queries=8)
    p.set_defaults(top_k=5)
    p.add_argument("--modules", default="textwrap,string,argparse", help="standard-library modules whose source is the text")
    p.add_argument("--max-chars", type=int, default=300_000, help="characters of text used at most")
    p.add_argument("--seq-len", type=int, default=32, help="characters per training sequence")
    p.add_argument("--hidden", type=int, default=64, help="LSTM hidden units")
    p.add_argument("--embed", type=int, default=16, help="character embedding width")
    p.add_argument("--positions", type=int, default=4, help="analysed predictions per test sequence (its last ones)")
    args = p.parse_args(argv)
    out = common.prepare_out(args, "char_lm")
    try:
        text = stdlib_text([m.strip() for m in args.modules.split(",") if m.strip()], args.max_chars)
    except ValueError as err:
        print(f"char_lm: {err}", file=sys.stderr)
        return 2
    pl.seed_everything(args.seed, verbose=False)
    chars = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([lookup[ch] for ch in text], dtype=np.int64)
    cut = int(0.9 * len(ids)) // args.seq_len * args.seq_len
    train_text, test_text = text[:cut], text[cut:]
    train_set, test_set = chunks(ids[: cut + 1], args.seq_len), chunks(ids[cut:], args.seq_len)
    train, test = common.loaders(args, train_set, test_set)
    model = CharLM(len(chars), args.embed, args.hidden, lr=args.lr, momentum=args.momentum)
    store = os.path.join(out, "char_lm.h5")
    common.fit_and_test(args, model, store, train, test)

    n_q = min(args.queries, len(test_set))
    with torch.no_grad():
        logits = model(test_set.x[:n_q])
    loss = float(nn.functional.cross_entropy(logits.flatten(0, 1), test_set.y[:n_q].flatten()))
    first_pos = args.seq_len - min(args.positions, args.seq_len)
    with DualInference(store, device="cpu") as di:
        layers = [n for n in ("cell.proj", "head", "embed") if n in di.layers]
        run = attend_recorded(di, "test", layers=layers, limit=n_q, top_k=args.top_k, positions=lambda n, pos: pos >= first_pos)
        lines = ["# Char LM: what a test prediction attends to\n",
                 f"Model after {di.store.last_step} steps (test loss {loss:.3f} nats/char on the analysed sequences). "
                 "For each prediction: the test text up to the current character, the true next character in ⟦ ⟧ and "
                 "the model's guess; then per layer the most attended training rows (score k·q, training step), each "
                 "shown as the training text up to the row's character with the character that followed it in ⟦ ⟧ "
                 "(⏎ = newline).\n"]
        # per (example, position) query row: the labels and predictions of the output layer
        head = run.results.get("head")
        ex_h, pos_h = run.example.get("head"), run.position.get("head")
        for e in range(min(n_q, 3)):
            for t in range(first_pos, args.seq_len):
                at = e * args.seq_len + t  # offset inside test_text
                guess = chars[int(logits[e, t].argmax())]
                lines.append(f"\n## test sequence {e}, position {t}: guess {show_char(guess)}\n\n`{show(test_text, at)}`\n")
                for name in layers:
                    rows = np.flatnonzero((run.example[name] == e) & (run.position[name] == t))
                    if not len(rows):
                        continue
                    lines.append(f"\n{name}:\n")
                    for r in top_rows(run.results[name], int(rows[0]), args.top_k):
                        where = r["index"] * args.seq_len + r["position"]
                        lines.append(f"- {r['score']:.2f} (step {r['step']}): `{show(train_text, where)}`")
        common.write(out, "contexts.md", "\n".join(lines) + "\n")
        summary: dict[str, Any] = {"store": store, "store_bytes": os.path.getsize(store), "steps": di.store.last_step,
                                   "layers": di.layers, "vocab": len(chars), "train_chars": len(train_text),
                                   "test_loss": loss, "certificate": {n: float(di.layer(n).attrs.get("certificate_rel_err", float("nan")))
                                                                      for n in di.layers}}
        if head is not None:
            label = test_set.y[:n_q].numpy()[ex_h, pos_h]
            pred = logits.argmax(-1).numpy()[ex_h, pos_h]
            table = vote_table({"head": head}, label, pred)
            summary["votes"] = table.to_dict()
            common.write(out, "votes.md", f"# Char LM: next-character votes of the output layer\n\n{table.n} predictions "
                         f"(accuracy {100 * table.accuracy:.1f}%); vote = the character whose training rows hold the most attention.\n\n"
                         + table.to_markdown())
        common.plot_top_steps({n: step_histogram(run.results[n], di.store.first_step, bins=20, k=args.top_k) for n in layers},
                              os.path.join(out, "top_steps.png"))
    common.write(out, "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"char_lm: test loss {loss:.3f} nats/char after {summary['steps']} steps; outputs in {out}")
    return 0


def show_char(ch: str) -> str:
    return {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(ch, ch)


if __name__ == "__main__":
    sys.exit(main())
