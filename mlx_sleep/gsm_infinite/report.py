"""Results of a run: accuracy per op with 95% intervals, the leaderboard AUC, the markdown
table, the plot, results.json."""

import math
import os
from typing import Dict, Iterable, List

import numpy as np

from .. import report
from ..io import atomic_path, write_json

PREDICTIONS, RESULTS_JSON, RESULTS_MD, PLOT = (
    "predictions.jsonl",
    "results.json",
    "results.md",
    "accuracy.png",
)


def wilson(correct: int, n: int, z: float = 1.96):
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def leaderboard_auc(accuracy: Dict[int, float]) -> float:
    """The leaderboard's summary: np.trapz(acc, ops) * 100 with ops sorted."""
    ops = sorted(accuracy)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it
    return float(trapezoid([accuracy[o] for o in ops], ops) * 100)


def summarize(predictions: Iterable[dict]) -> Dict[str, dict]:
    """{"N = n": {"ops": {op: {n, correct, accuracy, ci}}, "auc"}} from prediction records."""
    counts: Dict[int, Dict[int, List[int]]] = {}
    for p in predictions:
        c = counts.setdefault(int(p.get("loops", 1)), {}).setdefault(int(p["op"]), [0, 0])
        c[0] += bool(p["correct"])
        c[1] += 1
    out = {}
    for loops in sorted(counts):
        ops = {
            op: {"n": n, "correct": k, "accuracy": k / n, "ci95": list(wilson(k, n))}
            for op, (k, n) in sorted(counts[loops].items())
        }
        auc = (
            leaderboard_auc({op: r["accuracy"] for op, r in ops.items()}) if len(ops) > 1 else None
        )
        out[f"N = {loops}"] = {"loops": loops, "ops": ops, "auc": auc}
    return out


def markdown_table(summary: Dict[str, dict]) -> str:
    """Accuracy [95% CI] per op (rows) and N (columns), then the AUC."""
    runs = list(summary)
    ops = sorted({op for r in summary.values() for op in r["ops"]})

    def cell(r):
        return (
            f"{r['accuracy']:.3f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] (n={r['n']})"
            if r
            else "-"
        )

    rows = [[op] + [cell(summary[run]["ops"].get(op)) for run in runs] for op in ops]
    rows.append(
        ["AUC"]
        + [f"{summary[r]['auc']:.1f}" if summary[r]["auc"] is not None else "-" for r in runs]
    )
    return report.markdown_table(["op"] + runs, rows)


def plot(summary: Dict[str, dict], path: str, title: str = ""):
    """PNG of accuracy against op count, one line per N, with the 95% intervals shaded."""
    lines = []
    for run, r in summary.items():
        ops = sorted(r["ops"])
        label = run + (f" (AUC {r['auc']:.1f})" if r["auc"] is not None else "")
        lines.append(
            report.Line(
                label,
                ops,
                [r["ops"][o]["accuracy"] for o in ops],
                band=([r["ops"][o]["ci95"][0] for o in ops], [r["ops"][o]["ci95"][1] for o in ops]),
            )
        )
    report.line_plot(path, lines, xlabel="operations (op)", ylabel="accuracy", title=title)


def write_results(out: str, summary: dict, settings: dict) -> str:
    """results.json, results.md and accuracy.png in `out`; returns the markdown table."""
    table = markdown_table(summary)
    write_json(
        os.path.join(out, RESULTS_JSON),
        {"settings": settings, "results": summary, "predictions": PREDICTIONS},
    )
    with atomic_path(os.path.join(out, RESULTS_MD)) as tmp, open(tmp, "w") as f:
        f.write(f"{describe(settings)}\n\n{table}\n")
    plot(summary, os.path.join(out, PLOT), describe(settings))
    return table


def describe(settings: dict) -> str:
    s = settings
    data = s.get("data") or f"{s['subset']} {s['length']}"
    return (
        f"GSM-Infinite ({data}), {s['protocol']} protocol, "
        f"{s.get('eviction', '?')} eviction, L = {s.get('window', '?')}"
    )
