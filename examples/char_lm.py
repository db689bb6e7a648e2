"""A character-level LSTM language model, and which training contexts a test prediction attends to.

The paper's language-modelling study analyses an LSTM's input projection, whose key is ``[h_{t-1}; x_t]``,
and its output layer. ``nn.LSTM`` runs its weights inside a fused kernel, so this model writes the cell
with one ``nn.Linear`` on the concatenation ``[h_{t-1}; x_t]`` (``LSTMCell.proj``), called once per time
step, plus an ``nn.Embedding`` for the characters and an ``nn.Linear`` head. Every call of the cell adds
one memory row per sequence; the row's ``position`` is its time step inside the sequence (the callback
counts positions across calls), and its dataset index names the training chunk. So a row points at a
place in the training text, and the analysis prints the text around the most attended rows.

The text is the source code of standard-library modules (``--modules``, read from their installed files:
every Python install has it), or with ``--corpus pydoc`` Python's documentation topics (English prose from
``pydoc_data``, PSF licence), or any ``--text-file``. Training chunks are consecutive ``--seq-len`` character pieces
of the first 90%; test chunks come from the rest.

Outputs in ``--out``: ``char_lm.h5``, ``contexts.md`` (for each analysed test prediction, the training
contexts each layer attends to most), ``votes.md`` (next-character votes of the output layer),
``top_steps.png``, ``summary.json``.

    python examples/char_lm.py --out runs/char_lm
    python examples/char_lm.py --modules os,inspect,argparse,typing --max-steps 3000 --hidden 256
    python examples/char_lm.py --corpus pydoc --seeds 3 --out runs/char_lm-pydoc

``--paper`` sets the authors' model (1,024 units, Adam, 5,000 steps of 64 x 100 characters; their text was Aesop's
Fables, here Python's documentation or ``--text-file``); its store would hold about 390 GB of float16 rows, which no
machine of this project has (``docs/paper.md``).
"""

from __future__ import annotations

import argparse
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
from lightning_dualform.studies import fmt_mean_std


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
    """Embedding (-> linear adapter, as the authors' model) -> LSTM cell (unrolled over time) -> linear head;
    SGD with momentum, or Adam (the authors')."""

    def __init__(self, vocab: int, embed: int = 16, hidden: int = 64, lr: float = 0.5, momentum: float = 0.9,
                 adapter: int = 0, optimizer: str = "sgd") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.adapter = nn.Linear(embed, adapter) if adapter else None
        self.cell = LSTMCell(adapter or embed, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.lr, self.momentum, self.optimizer_name = lr, momentum, optimizer

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T)`` character ids -> logits ``(B, T, vocab)`` of the next character."""
        e = self.embed(x)
        if self.adapter is not None:
            e = self.adapter(e)
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
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
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


#: The authors' Aesop's Fables model (``sweeps/ff_as_attention/ff_as_attention_aeshop.yaml`` with the ``enwik8_lstm``
#: profile): 1,024 LSTM units, 64-wide embedding through a linear adapter, Adam lr 1e-3, clipping 1.0, batch 64,
#: 100-character sequences, 5,000 steps. The text here is Python's own documentation (``pydoc_data``), not the fables.
PAPER = {"max_steps": 5000, "hidden": 1024, "embed": 64, "adapter": 1024, "optimizer": "adam", "lr": 1e-3,
         "batch_size": 64, "seq_len": 100, "corpus": "pydoc", "dtype": "float16"}


def corpus_text(args: Any) -> str:
    """The training text: ``--text-file``, Python's documentation topics (``pydoc``), or stdlib sources."""
    if args.text_file:
        with open(args.text_file, encoding="utf-8", errors="replace") as fh:
            return fh.read()[: args.max_chars]
    if args.corpus == "pydoc":
        import pydoc_data.topics

        return "\n\n".join(pydoc_data.topics.topics.values())[: args.max_chars]
    return stdlib_text([m.strip() for m in args.modules.split(",") if m.strip()], args.max_chars)


def main(argv: Sequence[str] | None = None) -> int:
    p = common.parser(__doc__.split("\n\n")[0], max_steps=200, lr=0.5, batch_size=32, queries=8)
    p.set_defaults(top_k=5)
    p.add_argument("--corpus", choices=("stdlib", "pydoc"), default="stdlib",
                   help="stdlib: the source of --modules; pydoc: Python's documentation topics (English prose, PSF licence)")
    p.add_argument("--text-file", default=None, help="train on this UTF-8 text instead (e.g. Aesop's Fables, Gutenberg #49010)")
    p.add_argument("--modules", default="textwrap,string,argparse", help="standard-library modules whose source is the text")
    p.add_argument("--max-chars", type=int, default=300_000, help="characters of text used at most")
    p.add_argument("--seq-len", type=int, default=32, help="characters per training sequence")
    p.add_argument("--hidden", type=int, default=64, help="LSTM hidden units")
    p.add_argument("--embed", type=int, default=16, help="character embedding width")
    p.add_argument("--adapter", type=int, default=0, help="width of a linear layer between embedding and LSTM (the authors': 1024; 0: none)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd (with --momentum) or adam (the authors')")
    p.add_argument("--positions", type=int, default=4, help="analysed predictions per test sequence (its last ones)")
    p.add_argument("--paper", action="store_true", help="the authors' model and optimizer (see PAPER in the source; on another text)")
    p.add_argument("--seeds", type=int, default=1, help="models trained (seeds --seed..); the vote table gives mean ± std")
    p.add_argument("--keep-stores", action="store_true", help="keep every seed's store (default: the first seed's only)")
    args = common.parse_paper_args(p, argv, PAPER)
    out = common.prepare_out(args, "char_lm")
    if args.seeds < 1:
        print(f"char_lm: --seeds must be positive, got {args.seeds}", file=sys.stderr)
        return 2
    try:
        text = corpus_text(args)
    except (ValueError, OSError) as err:
        print(f"char_lm: {err}", file=sys.stderr)
        return 2
    chars = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([lookup[ch] for ch in text], dtype=np.int64)
    cut = int(0.9 * len(ids)) // args.seq_len * args.seq_len
    train_text, test_text = text[:cut], text[cut:]
    train_set, test_set = chunks(ids[: cut + 1], args.seq_len), chunks(ids[cut:], args.seq_len)
    tables: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for k in range(args.seeds):
        seed = args.seed + k
        pl.seed_everything(seed, verbose=False)
        train, test = common.loaders(argparse.Namespace(**{**vars(args), "seed": seed}), train_set, test_set)
        model = CharLM(len(chars), args.embed, args.hidden, lr=args.lr, momentum=args.momentum, adapter=args.adapter,
                       optimizer=args.optimizer)
        store = os.path.join(out, "char_lm.h5" if k == 0 else f"char_lm_seed{seed}.h5")
        common.fit_and_test(args, model, store, train, test)
        result = analyse(args, out, store, model, test_set, test_text, train_text, chars, contexts=k == 0)
        tables.append(result["votes"])
        if k == 0:
            summary = result
        elif not args.keep_stores:
            os.remove(store)
    summary["votes_over_seeds"] = tables
    rows = []
    raw = summary.get("score", "raw") == "raw"
    for kind in ("absolute", "signed"):
        for key, what in (("label_correct", "correct"), ("label_wrong", "wrong → label"), ("pred_wrong", "wrong → pred"),
                          ("pred_all", "all → pred")):
            named = ("|k·q|" if raw else "|unit weight|") if kind == "absolute" else ("k·q" if raw else "unit weight")
            rows.append(f"| head | {'abs' if kind == 'absolute' else 'signed'} ({named}) | {what} | "
                        f"{fmt_mean_std([t[kind]['rows'][0][key] for t in tables])} |")
    n = tables[0]["absolute"]["n"]
    common.write(out, "votes.md", f"# Char LM: next-character votes of the output layer\n\n{n} predictions per seed, "
                 f"{args.seeds} seed(s) (mean ± std, percent; model accuracy {fmt_mean_std([t['absolute']['accuracy'] for t in tables])}). "
                 "The vote: the character whose training rows hold the largest total score, under the authors' absolute score and "
                 "under the signed one (k·q for SGD; for Adam the unit attention weight).\n\n| layer | score | vote = | rate |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    common.write(out, "summary.json", json.dumps(summary, indent=2, default=float))
    print(f"char_lm: test loss {summary['test_loss']:.3f} nats/char after {summary['steps']} steps; outputs in {out}")
    return 0


def analyse(args: Any, out: str, store: str, model: CharLM, test_set: common.IndexedTensors, test_text: str, train_text: str,
            chars: Sequence[str], contexts: bool) -> dict[str, Any]:
    """``contexts.md`` (top training contexts per layer, both scores' ranking named), ``top_steps.png``, the head's votes."""
    n_q = min(args.queries, len(test_set))
    with torch.no_grad():
        logits = model(test_set.x[:n_q])
    loss = float(nn.functional.cross_entropy(logits.flatten(0, 1), test_set.y[:n_q].flatten()))
    first_pos = args.seq_len - min(args.positions, args.seq_len)
    with DualInference(store, device="cpu") as di:
        layers = [n for n in ("adapter", "cell.proj", "head", "embed") if n in di.layers]
        run = attend_recorded(di, "test", layers=layers, limit=n_q, top_k=args.top_k, positions=lambda n, pos: pos >= first_pos)
        if contexts:
            lines = ["# Char LM: what a test prediction attends to\n",
                     f"Model after {di.store.last_step} steps (test loss {loss:.3f} nats/char on the analysed sequences). "
                     "For each prediction: the test text up to the current character, the true next character in ⟦ ⟧ and "
                     "the model's guess; then per layer the training rows with the highest score (training step): k·q under SGD, the "
                     "unit attention weight −(Q_s[u]⊙k)·q under Adam (docs/dual-form.md); "
                     "each shown as the training text up to the row's character with the character that followed it in ⟦ ⟧ "
                     "(⏎ = newline).\n"]
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
            common.plot_top_steps({n: step_histogram(run.results[n], di.store.first_step, bins=20, k=args.top_k) for n in layers},
                                  os.path.join(out, "top_steps.png"))
        head = run.results["head"]
        ex_h, pos_h = run.example["head"], run.position["head"]
        label = test_set.y[:n_q].numpy()[ex_h, pos_h]
        pred = logits.argmax(-1).numpy()[ex_h, pos_h]
        votes = {kind: vote_table({"head": head}, label, pred, kind=kind).to_dict() for kind in ("absolute", "signed")}
        return {"score": head.score, "store": store, "store_bytes": os.path.getsize(store), "steps": di.store.last_step, "layers": di.layers,
                "vocab": len(chars), "train_chars": len(train_text), "test_loss": loss, "votes": votes,
                "certificate": {n: float(di.layer(n).attrs.get("certificate_rel_err", float("nan"))) for n in di.layers}}


def show_char(ch: str) -> str:
    return {"\n": "⏎", " ": "␣", "\t": "⇥"}.get(ch, ch)


if __name__ == "__main__":
    sys.exit(main())
