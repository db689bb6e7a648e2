"""Markdown tables of ``benchmarks/lds.py``'s JSON results (for ``docs/benchmarks.md``).

    python benchmarks/lds_report.py benchmarks/results/lds-single-sgd.json benchmarks/results/lds-single-adamw.json
    python benchmarks/lds_report.py --recipes benchmarks/results/lds-single-adamw*.json

``--recipes``: one row per run (a training recipe), its held-out accuracy beside each method's LDS.
"""

from __future__ import annotations

import json
import sys


def table(paths: list[str]) -> str:
    runs = [json.load(open(p)) for p in paths]
    names: list[str] = []
    for r in runs:
        names += [n for n in r["methods"] if n not in names]
    head = "| method | " + " | ".join(f"{r['args']['setting']} {r['args']['optimizer']} (batch {r['args']['batch']})"
                                      for r in runs) + " | attribution time | extra training |"
    lines = [head, "|" + " --- |" * (len(runs) + 3)]
    for n in names:
        cells, times, extra = [], [], []
        for r in runs:
            m = r["methods"].get(n)
            if m is None or "lds" not in m:
                cells.append("failed" if m else "")
                continue
            sub = f" (± {m['se_subsets']:.3f})" if "se_subsets" in m else ""
            cells.append(f"{m['lds']:.3f} ± {m['se']:.3f}{sub}")
            times.append(f"{m['seconds']:.1f} s")
            extra.append(f"{m['extra_training_seconds']:.1f} s")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {' / '.join(times)} | {' / '.join(extra)} |")
    facts = "; ".join(f"{r['args']['setting']} {r['args']['optimizer']}: fit {r['fit_seconds']:.2f} s, recorded "
                      f"{r['recorded_fit_seconds']:.2f} s, {r['args']['subsets']} retrainings "
                      f"{r['retrain_seconds']:.0f} s, "
                      f"load {r['load'][0]:.1f}" for r in runs)
    return "\n".join(lines) + "\n\n" + facts + "\n"


RECIPE_COLUMNS = {"metagradient": "lightning-dualform metagradient", "first order": "lightning-dualform first_order",
                  "every step": "lightning-dualform every_step", "TracInCP": "captum TracInCP (per-epoch checkpoints)",
                  "EK-FAC": "kronfluence EK-FAC", "TRAK": "dattri TRAK (1 model, proj 512)",
                  "label-signed pixel": "label-signed pixel similarity"}


def recipes(paths: list[str]) -> str:
    """One row per run: the recipe, the base model's held-out accuracy, each method's LDS, the metagradient's time."""
    lines = ["| recipe | held-out accuracy | " + " | ".join(RECIPE_COLUMNS) + " | metagradient time | load |",
             "|" + " --- |" * (len(RECIPE_COLUMNS) + 4)]
    for path in paths:
        r = json.load(open(path))
        cells = []
        for name in RECIPE_COLUMNS.values():
            m = r["methods"].get(name, {})
            cells.append(f"{m['lds']:.3f} ± {m['se']:.3f}" if "lds" in m else "")
        mg = r["methods"].get(RECIPE_COLUMNS["metagradient"], {})
        sec = f"{mg['seconds']:.0f} s" if "seconds" in mg else ""
        lines.append(f"| {r.get('recipe', r['args']['optimizer'])} | {r.get('held_out_accuracy', float('nan')):.3f} | "
                     + " | ".join(cells) + f" | {sec} | {r['load'][0]:.1f}-{r.get('load_end', r['load'])[0]:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--recipes"]:
        print(recipes(sys.argv[2:]))
    else:
        print(table(sys.argv[1:]))
