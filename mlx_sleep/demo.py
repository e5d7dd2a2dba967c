"""`mlx-sleep demo`: the paper's effect at a size a laptop CPU trains in minutes, over seeds.

For each seed, trains the same hybrid with N = 1 (the plain hybrid) and N > 1 sleep loops on the
same data stream for the same number of steps (equal training tokens), evaluates both by
difficulty, and prints the spread over seeds (mean, min, each seed): at this size one seed's
comparison can flip with the platform (BLAS build, instruction set), so a single seed proves
nothing. The setting was found by the search in docs/demo-search.md (benchmarks/demo_search.py);
nothing here is tuned per N.
"""

import os
import time

import numpy as np

from .config import ModelConfig, SleepConfig
from .eval import evaluate, format_table, plot
from .report import markdown_table
from .io import claim_dir, write_json, write_text
from .tasks import get_task, task_from_dict
from .train import TrainConfig, Trainer

# Depo with an 8-node cycle written as its 8 edges in cycle order (a b ; b c ; ...) in ONE
# context window (24 tokens, hard eviction), then 8 queries "v +k", k in {1, 2}. One GDN block: at
# answer time it reads S once, so a 2-hop answer must already be in S, and in one pass no edge's
# continuation is in S when the edge is written; a third pass writes from reads of the whole S.
# A depth curriculum (k = 1 only for the first 160 steps) lets N = 3 compose early: the best
# setting of the search (docs/demo-search.md, where its results are). k = 1 is learned by step
# ~100; a longer one-hop phase (300 steps, the earlier default) leaves the two-hop phase fewer
# steps at a high learning rate, and one N = 3 run in five stayed at chance (issue 20).
DEMO = dict(
    task=dict(
        name="depo",
        max_nodes=8,
        min_nodes=8,
        n_names=16,
        max_hops=2,
        window=24,
        context_len=24,
        n_queries=8,
        edge_order="forward",
    ),
    model=dict(hidden_size=64, layers="gdn", num_heads=4),
    train=dict(steps=800, batch_size=64, lr=2e-2, adam_lr=3e-3, warmup=50, eval_samples=512),
    curriculum=dict(fraction=0.2, hops=[1]),
    loops=(1, 3),
    seeds=5,
    # N = 1 trained N_max times as many steps: the compute a sleep run spends (its passes), the
    # baseline the paper lacks, beside the equal-tokens one
    compute_matched=True,
)
MARGIN = 0.10  # the gain on the deepest items the demo is meant to show on every seed


def run_demo(
    out: str,
    steps=None,
    loops=None,
    seed: int = 0,
    seeds=None,
    echo=print,
    settings=None,
    progress: bool = True,
    force: bool = False,
    compute_matched=None,
):
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in (settings or DEMO).items()}
    curriculum = settings.get("curriculum")
    if steps is not None:
        settings["train"]["steps"] = steps
    loops = tuple(loops or settings["loops"])
    if compute_matched is None:
        compute_matched = settings.get("compute_matched", False)
    # (name, N, steps, directory) of each run per seed
    base_steps = settings["train"]["steps"]
    runs = [(f"N = {n}", n, base_steps, f"N{n}") for n in loops]
    if compute_matched and 1 in loops and max(loops) > 1:
        x = max(loops)
        runs.append((f"N = 1, {x}x steps", 1, x * base_steps, f"N1x{x}"))
    seed_list = list(range(seed, seed + (seeds or settings["seeds"])))
    task_kw = dict(settings["task"])
    task = get_task(task_kw.pop("name"), **task_kw)
    dname = "t (steps)" if task.name == "rule110" else "k (hops)"
    claim_dir(
        out,
        "demo",
        force,
        writes=("accuracy.png", "results.json", "results.md", *(f"seed{s}" for s in seed_list)),
    )
    echo(f"demo: {task.describe()}")
    echo(
        f"model {settings['model']}, {base_steps} steps of batch "
        f"{settings['train']['batch_size']} for each N in {list(loops)}, seeds {seed_list}"
        + (f"; and {runs[-1][0]} (compute-matched)" if len(runs) > len(loops) else "")
    )
    if curriculum:
        stages = ", then ".join(
            f"k in {p['hops']} to step {round(p['fraction'] * base_steps)}"
            for p in curriculum_phases(curriculum)
        )
        echo(f"depth curriculum: {stages}, then the full mix")
    by_seed, timing = {name: {} for name, *_ in runs}, {}
    for s in seed_list:
        for name, n, run_steps, where in runs:
            t0 = time.time()
            echo(f"\nseed {s}, training {name}")
            trainer = Trainer(
                os.path.join(out, f"seed{s}", where),
                ModelConfig(vocab_size=task.vocab_size, **settings["model"]),
                SleepConfig(loops=n, window=task.window, eviction=task.eviction),
                task,
                TrainConfig(seed=s, **{**settings["train"], "steps": run_steps}),
                progress=progress,
                force=force,
            )
            trainer.report_every = trainer.cfg.steps  # the bar, and one line at the end
            evals = []
            train_with_curriculum(
                trainer, curriculum, on_eval=lambda step, r: evals.append(r["eval"])
            )
            if not evals:  # a finished run from before: evaluate it as its last step did
                evals.append(
                    evaluate(
                        trainer.model,
                        task,
                        trainer.sleep,
                        trainer.cfg.eval_samples,
                        trainer.cfg.batch_size,
                        seed=trainer.cfg.seed + 1,
                    )
                )
            by_seed[name][s] = evals[-1]
            timing[f"seed {s}, {name}"] = time.time() - t0
    results, spread = combine_seeds(by_seed, seed_list)
    table = seed_tables(results, by_seed, seed_list, dname)
    verdict = conclude(results, seed_list, dname)
    echo("\n" + table + "\n" + verdict)
    png = os.path.join(out, "accuracy.png")
    chance = (
        1 / task.max_nodes if task.name == "depo" and task.min_nodes == task.max_nodes else None
    )
    plot(
        results,
        png,
        f"{task.name}: mean over {len(seed_list)} seeds (band: min to max)",
        dname,
        "token",
        chance=chance,
        spread=spread,
    )
    from .doctor import platform_summary

    write_json(
        os.path.join(out, "results.json"),
        {
            "settings": settings,
            "task": task.to_dict(),
            "seeds": seed_list,
            "platform": platform_summary(),
            "results": results,
            "verdict": verdict,
            "seconds": timing,
        },
    )
    write_text(os.path.join(out, "results.md"), table + "\n" + verdict + "\n")
    echo(f"wrote {png}, results.json and results.md to {out}")
    return results


def curriculum_phases(curriculum) -> list:
    """A depth curriculum as its phases: one {"fraction": f, "hops": [...]} or a list of them
    (staged: k = 1 -> 2 -> ...; each fraction is where its phase ends, ascending)."""
    if not curriculum:
        return []
    return [curriculum] if isinstance(curriculum, dict) else list(curriculum)


def train_with_curriculum(trainer, curriculum, on_eval):
    """Depth curriculum: until each phase's fraction of the steps, draw only its hop counts
    (same data generator, same schedule), then the task's own mix. Resumes in any phase."""
    full, total = trainer.task, trainer.cfg.steps
    for phase in curriculum_phases(curriculum):
        switch = round(phase["fraction"] * total)
        if trainer.step >= switch:
            continue
        trainer.task = task_from_dict(
            {**full.to_dict(), "hops": list(phase["hops"]), "hop_weights": None}
        )
        trainer.cfg.steps = switch  # the learning-rate schedule was built for `total`
        try:
            trainer.run()  # checkpoints (and evaluates the phase's task) at the switch
        finally:
            trainer.task, trainer.cfg.steps = full, total
    trainer.run(on_eval=on_eval)


def combine_seeds(by_seed, seed_list):
    """results[run][d] = mean "token"/"exact" over seeds, summed "count", and each seed's values
    (lists in seed order); spread[run][d] = (min, max) of per-query accuracy."""
    results, spread = {}, {}
    for run, per in by_seed.items():
        results[run], spread[run] = {}, {}
        for d in per[seed_list[0]]:
            tok = [per[s][d]["token"] for s in seed_list]
            exact = [per[s][d]["exact"] for s in seed_list]
            results[run][d] = {
                "token": float(np.mean(tok)),
                "exact": float(np.mean(exact)),
                "count": int(sum(per[s][d]["count"] for s in seed_list)),
                "token_by_seed": tok,
                "exact_by_seed": exact,
            }
            spread[run][d] = (min(tok), max(tok))
    return results, spread


def seed_tables(results, by_seed, seed_list, dname) -> str:
    runs = list(results)
    diffs = sorted({int(d) for r in results.values() for d in r})
    mean_rows = [
        [d]
        + [
            f"{results[r][d]['token']:.3f} [{min(results[r][d]['token_by_seed']):.3f}, "
            f"{max(results[r][d]['token_by_seed']):.3f}]"
            for r in runs
        ]
        for d in diffs
    ]
    head = [f"{r}, {dname.split()[0]} = {d}" for d in diffs for r in runs]
    seed_rows = [
        [s] + [f"{by_seed[r][s][d]['token']:.3f}" for d in diffs for r in runs] for s in seed_list
    ]
    return (
        "\n".join(
            [
                f"### per-query accuracy over {len(seed_list)} seeds: mean [min, max]",
                "",
                markdown_table([dname] + runs, mean_rows),
                "",
                "### per-query accuracy, each seed",
                "",
                markdown_table(["seed"] + head, seed_rows),
                "",
                "### exact match (all queries of a sequence right), mean over seeds",
                "",
                format_table(results, dname, "exact"),
            ]
        )
        + "\n"
    )


def conclude(results, seed_list, dname) -> str:
    """Which way the evidence points: each N > 1 against each N = 1 run (equal tokens, and
    compute-matched when there is one) on the deepest and shallowest difficulty, seed by seed."""
    baselines = [r for r in results if r.startswith("N = 1")]
    sleepers = [r for r in results if r not in baselines]
    if not baselines or not sleepers:
        return "(no N = 1 and N > 1 pair to compare)"
    diffs = sorted(results[baselines[0]])
    deep, shallow, k = diffs[-1], diffs[0], dname.split()[0]
    out = []
    for run, base in ((r, b) for r in sleepers for b in baselines):
        gain = np.subtract(
            results[run][deep]["token_by_seed"], results[base][deep]["token_by_seed"]
        )
        flat = np.subtract(
            results[run][shallow]["token_by_seed"], results[base][shallow]["token_by_seed"]
        )
        ahead = int((gain > 0).sum())
        if gain.min() >= MARGIN - 1e-9:  # accuracies are ratios: 0.5 - 0.4 < 0.1 in floats
            word = f"ahead by >= {MARGIN:.2f} on every seed: sleep helps the deepest items"
        elif ahead == len(gain):
            word = "ahead on every seed, but not by the margin everywhere"
        elif ahead == 0:
            word = "behind on every seed: at this size sleep does not help"
        else:
            word = (
                f"ahead on {ahead} of {len(gain)} seeds: the evidence points "
                f"{'towards' if gain.mean() > 0 else 'against'} sleep, not conclusively"
            )
        out.append(
            f"{run} - {base} at {k} = {deep}: mean {_signed(gain.mean())}, min "
            f"{_signed(gain.min())}, max {_signed(gain.max())} ({word}); at {k} = "
            f"{shallow}: mean {_signed(flat.mean())}, min {_signed(flat.min())}"
        )
    return "\n".join(out)


def _signed(x) -> str:
    return f"{round(float(x), 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"
