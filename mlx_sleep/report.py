"""The one markdown-table writer and the one plot function; the commands shape their results
into rows and lines and call these.

    markdown_table(["N", "k = 1", "k = 2"], [[1, "0.95", "0.61"], [3, "0.99", "0.98"]])
    line_plot("acc.png", [Line("N = 3", [1, 2, 4], [0.9, 0.8, 0.5], band=(lo, hi))],
              xlabel="k", ylabel="accuracy", logx=True, chance=0.25)
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .io import WRITTEN_BY, atomic_path, check_file_target, stream


def show_bytes(n: float) -> str:
    """A memory size as people read it: "1.21 GB", or "9.7 MB" below 0.1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def markdown_table(header: Sequence, rows: Sequence[Sequence]) -> str:
    """A markdown table; cells are written with str()."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Line:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    band: Optional[Tuple[Sequence[float], Sequence[float]]] = None  # (lo, hi) per x, shaded


def line_plot(
    path: str,
    lines: Sequence[Line],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    chance: Optional[float] = None,
):
    """A PNG of accuracy-like values in [0, 1] against x, one line per `Line`, written under
    the write policy (atomically, or to stdout for "-")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xticks = set()
    for line in lines:
        (drawn,) = ax.plot(line.xs, line.ys, marker="o", label=line.label)
        xticks.update(line.xs)
        if line.band is not None:
            ax.fill_between(
                line.xs, line.band[0], line.band[1], color=drawn.get_color(), alpha=0.2, linewidth=0
            )
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    if logx:
        ax.set_xscale("log", base=2)
    ticks = sorted(xticks)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
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
        with atomic_path(path) as tmp:  # marked as ours: io.written_by reads it back
            fig.savefig(tmp, format="png", metadata={"Software": f"{WRITTEN_BY} plot"})
    plt.close(fig)
