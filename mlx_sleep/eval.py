"""Accuracy by difficulty (t for Rule 110, hop count k for Depo), answers in one ordinary pass."""

from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from .config import ConfigError, SleepConfig
from .io import atomic_path, check_file_target, stream
from .sleep import sleep_forward
from .tasks.base import score


def predict(model, batch, sleep: SleepConfig) -> np.ndarray:
    """Argmax predictions [B, T] (-1 outside answer chunks) under Algorithm 1."""
    answers, _ = sleep_forward(model, mx.array(batch.inputs), batch.mask, sleep)
    preds = np.full(batch.inputs.shape, -1, dtype=np.int64)
    for a, b, logits in answers:
        preds[:, a:b] = np.array(mx.argmax(logits, axis=-1))
    return preds


def evaluate(model, task, sleep: SleepConfig, samples: int = 256, batch_size: int = 64,
             seed: int = 1234, difficulties=None, progress: bool = False) -> Dict[int, dict]:
    """{difficulty: {"exact", "token", "count"}} on `samples` fresh sequences per difficulty.

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
        done = 0
        while done < samples:
            n = min(batch_size, samples - done)
            batch = task.sample(rng, n, difficulty=int(d))
            r = score(batch, predict(model, batch, sleep))[int(d)]
            exact += r["exact"] * n
            token += r["token"] * r["count"]
            count += r["count"]
            seqs += n
            done += n
            if bar is not None:
                bar.update(n)
        results[int(d)] = {"exact": exact / seqs, "token": token / max(count, 1), "count": int(count)}
    if bar is not None:
        bar.close()
    return results


def format_table(results_by_run: Dict[str, Dict[int, dict]], difficulty_name: str = "difficulty",
                 metric: str = "exact") -> str:
    """A markdown table: one row per difficulty, one column per run (e.g. N = 1, N = 4)."""
    runs = list(results_by_run)
    diffs = sorted({int(d) for r in results_by_run.values() for d in r})
    lines = [f"| {difficulty_name} | " + " | ".join(runs) + " |",
             "|---|" + "---|" * len(runs)]
    for d in diffs:
        cells = []
        for run in runs:
            r = results_by_run[run].get(d) or results_by_run[run].get(str(d))
            cells.append(f"{r[metric]:.3f}" if r else "-")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRIC_LABELS = {"token": "per-item accuracy", "exact": "exact-match accuracy"}


def save_accuracy_plot(fig, ax, path: str, title: str, ylabel: str):
    """What every accuracy plot ends with: the y axis in [0, 1], grid, legend, title, and the PNG
    written under the write policy (atomically, or through /dev/stdout)."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if check_file_target(path) == "stream":
        out = stream(path)
        out.flush()
        fig.savefig(getattr(out, "buffer", out), format="png")
    else:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    plt.close(fig)


def plot(results_by_run: Dict[str, Dict[int, dict]], path: str, title: str = "",
         difficulty_name: str = "difficulty", metric: str = "exact",
         chance: Optional[float] = None, spread: Optional[Dict[str, Dict[int, tuple]]] = None):
    """PNG of accuracy vs difficulty, one line per run; `spread[run][d] = (lo, hi)` shades a band
    (e.g. the range over seeds around their mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    all_diffs = set()
    for run, res in results_by_run.items():
        diffs = sorted(int(d) for d in res)
        all_diffs.update(diffs)
        line, = ax.plot(diffs, [(res.get(d) or res[str(d)])[metric] for d in diffs], marker="o",
                        label=run)
        if spread and run in spread:
            band = [spread[run].get(d) or spread[run][str(d)] for d in diffs]
            ax.fill_between(diffs, [b[0] for b in band], [b[1] for b in band],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_diffs), [str(d) for d in sorted(all_diffs)])
    ax.minorticks_off()
    ax.set_xlabel(difficulty_name)
    save_accuracy_plot(fig, ax, path, title, METRIC_LABELS.get(metric, metric))


def plot_against_loops(results_by_loops: Dict[int, Dict[int, dict]], path: str, title: str = "",
                       difficulty_name: str = "difficulty", metric: str = "token",
                       chance: Optional[float] = None):
    """PNG of accuracy vs test-time sleep passes N, one line per difficulty (sleep depth as a dial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = sorted(int(n) for n in results_by_loops)
    diffs = sorted({int(d) for r in results_by_loops.values() for d in r})
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for d in diffs:
        ys = [(results_by_loops[n].get(d) or results_by_loops[n][str(d)])[metric] for n in loops]
        ax.plot(loops, ys, marker="o", label=f"{difficulty_name.split()[0]} = {d}")
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(loops)
    ax.set_xlabel("sleep passes N at test time")
    save_accuracy_plot(fig, ax, path, title, METRIC_LABELS.get(metric, metric))
