"""Accuracy by difficulty (t for Rule 110, hop count k for Depo), answers in one ordinary pass."""

from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from .config import ConfigError, SleepConfig
from .report import Line, line_plot, markdown_table
from .sleep import sleep_forward
from .tasks.base import accuracy_by_difficulty


def predict(model, batch, sleep: SleepConfig, tolerance=None, passes_used=None) -> np.ndarray:
    """Argmax predictions [B, T] (-1 outside answer chunks) under Algorithm 1 (`tolerance`,
    `passes_used`: sleep_forward's stopping rule)."""
    answers, _ = sleep_forward(
        model,
        mx.array(batch.inputs),
        batch.mask,
        sleep,
        tolerance=tolerance,
        passes_used=passes_used,
    )
    preds = np.full(batch.inputs.shape, -1, dtype=np.int64)
    for a, b, logits in answers:
        preds[:, a:b] = np.array(mx.argmax(logits, axis=-1))
    return preds


def evaluate(
    model,
    task,
    sleep: SleepConfig,
    samples: int = 256,
    batch_size: int = 64,
    seed: int = 1234,
    difficulties=None,
    progress: bool = False,
    tolerance: Optional[float] = None,
) -> Dict[int, dict]:
    """{difficulty: {"exact", "token", "count"}} on `samples` fresh sequences per difficulty;
    with `tolerance` (sleep as deep as it helps, at most sleep.loops passes) also "passes",
    the mean passes a sleeping window ran.

    Each difficulty draws from its own seeded generator, so results do not depend on which
    other difficulties are evaluated or in what order."""
    for name, value in (("samples", samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 24:
            raise ConfigError(f"{name} must be an integer in 1..{1 << 24} (got {value!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"seed must be an integer in 0..{2**31 - 1} (got {seed!r})")
    difficulties = task.eval_difficulties if difficulties is None else difficulties
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(difficulties) * samples, unit="seq", desc="eval", leave=False)
    results = {}
    for d in difficulties:
        rng = np.random.default_rng([seed, int(d)])
        exact = token = count = seqs = 0.0
        done, passes = 0, []
        while done < samples:
            n = min(batch_size, samples - done)
            batch = task.sample(rng, n, difficulty=int(d))
            preds = predict(model, batch, sleep, tolerance, passes)
            r = accuracy_by_difficulty(batch, preds)[int(d)]
            exact += r["exact"] * n
            token += r["token"] * r["count"]
            count += r["count"]
            seqs += n
            done += n
            if bar is not None:
                bar.update(n)
        results[int(d)] = {
            "exact": exact / seqs,
            "token": token / max(count, 1),
            "count": int(count),
        }
        if tolerance is not None:
            results[int(d)]["passes"] = float(np.mean(passes)) if passes else 0.0
    if bar is not None:
        bar.close()
    return results


def _cell(results: dict, d: int):
    return results.get(d) or results.get(str(d))  # keys are ints, or strings read from JSON


def format_table(
    results_by_run: Dict[str, Dict[int, dict]],
    difficulty_name: str = "difficulty",
    metric: str = "exact",
) -> str:
    """A markdown table: one row per difficulty, one column per run (e.g. N = 1, N = 4)."""
    runs = list(results_by_run)
    diffs = sorted({int(d) for r in results_by_run.values() for d in r})
    rows = [
        [d]
        + [
            f"{_cell(results_by_run[run], d)[metric]:.3f}" if _cell(results_by_run[run], d) else "-"
            for run in runs
        ]
        for d in diffs
    ]
    return markdown_table([difficulty_name] + runs, rows)


METRIC_LABELS = {"token": "per-item accuracy", "exact": "exact-match accuracy"}


def plot(
    results_by_run: Dict[str, Dict[int, dict]],
    path: str,
    title: str = "",
    difficulty_name: str = "difficulty",
    metric: str = "exact",
    chance: Optional[float] = None,
    spread: Optional[Dict[str, Dict[int, tuple]]] = None,
):
    """PNG of accuracy vs difficulty, one line per run; `spread[run][d] = (lo, hi)` shades a band
    (e.g. the range over seeds around their mean)."""
    lines = []
    for run, res in results_by_run.items():
        diffs = sorted(int(d) for d in res)
        band = None
        if spread and run in spread:
            lo_hi = [_cell(spread[run], d) for d in diffs]
            band = ([b[0] for b in lo_hi], [b[1] for b in lo_hi])
        lines.append(Line(run, diffs, [_cell(res, d)[metric] for d in diffs], band))
    line_plot(
        path,
        lines,
        xlabel=difficulty_name,
        ylabel=METRIC_LABELS.get(metric, metric),
        title=title,
        logx=True,
        chance=chance,
    )


def plot_against_loops(
    results_by_loops: Dict[int, Dict[int, dict]],
    path: str,
    title: str = "",
    difficulty_name: str = "difficulty",
    metric: str = "token",
    chance: Optional[float] = None,
):
    """PNG of accuracy vs test-time sleep passes N, one line per difficulty (sleep depth as a
    dial)."""
    loops = sorted(int(n) for n in results_by_loops)
    diffs = sorted({int(d) for r in results_by_loops.values() for d in r})
    lines = [
        Line(
            f"{difficulty_name.split()[0]} = {d}",
            loops,
            [_cell(results_by_loops[n], d)[metric] for n in loops],
        )
        for d in diffs
    ]
    line_plot(
        path,
        lines,
        xlabel="sleep passes N at test time",
        ylabel=METRIC_LABELS.get(metric, metric),
        title=title,
        chance=chance,
    )
