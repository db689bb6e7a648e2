"""Markdown tables of ``benchmarks/lds.py``'s JSON results (for ``docs/benchmarks.md``).

    python benchmarks/lds_report.py benchmarks/results/lds-single-sgd.json benchmarks/results/lds-single-adamw.json
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


if __name__ == "__main__":
    print(table(sys.argv[1:]))
