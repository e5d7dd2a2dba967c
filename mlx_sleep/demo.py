"""`mlx-sleep demo`: the paper's effect at a size a laptop CPU trains in minutes.

Trains the same hybrid with N = 1 (the plain hybrid) and N > 1 sleep loops from the same seed on
the same data stream for the same number of steps (equal training tokens), evaluates both by
difficulty, prints a table and writes a plot. The setting was found by the search recorded in
docs/demo.md (benchmarks/demo_search.py); nothing here is tuned per N.
"""

import os
import time

from .config import ModelConfig, SleepConfig
from .eval import evaluate, format_table, plot
from .io import claim_dir, write_json, write_text
from .tasks import get_task
from .train import TrainConfig, Trainer

# Depo with an 8-node cycle written as 8 shuffled edges in ONE context window (24 tokens, hard
# eviction), then 8 queries "v +k", k in {1, 2}. One GDN block: at answer time it reads S once,
# so a 2-hop answer must already be in S; a sleep pass sees the whole cycle before writing it.
# Measured (docs/demo.md): at this scale N = 2 does not reliably beat N = 1; the demo shows that.
DEMO = dict(
    task=dict(name="depo", max_nodes=8, min_nodes=8, n_names=16, max_hops=2, window=24,
              context_len=24, n_queries=8),
    model=dict(hidden_size=64, layers="gdn", num_heads=4),
    train=dict(steps=1200, batch_size=64, lr=2e-2, adam_lr=3e-3, warmup=50, eval_samples=512),
    loops=(1, 2),
)


def run_demo(out: str, steps=None, loops=None, echo=print, force: bool = False):
    settings = {k: dict(v) if isinstance(v, dict) else v for k, v in DEMO.items()}
    if steps is not None:
        settings["train"]["steps"] = steps
    loops = loops or settings["loops"]
    task_kw = dict(settings["task"])
    task = get_task(task_kw.pop("name"), **task_kw)
    dname = "t (steps)" if task.name == "rule110" else "k (hops)"
    claim_dir(out, "demo", force, writes=("accuracy.png", "results.json", "results.md",
                                          *(f"N{n}" for n in loops)))
    echo(f"demo: {task.describe()}")
    echo(f"model {settings['model']}, {settings['train']['steps']} steps of batch "
         f"{settings['train']['batch_size']} for each N in {list(loops)}")
    results, timing = {}, {}
    for n in loops:
        t0 = time.time()
        echo(f"\ntraining N = {n}")
        trainer = Trainer(os.path.join(out, f"N{n}"),
                          ModelConfig(vocab_size=task.vocab_size, **settings["model"]),
                          SleepConfig(loops=n, window=task.window, eviction=task.eviction),
                          task, TrainConfig(seed=0, **settings["train"]), force=force)
        evals = []
        trainer.run(on_eval=lambda step, r: evals.append(r))
        if not evals:  # a finished run from before: evaluate it as the last step did
            evals.append(evaluate(trainer.model, task, trainer.sleep, trainer.cfg.eval_samples,
                                  trainer.cfg.batch_size, seed=trainer.cfg.seed + 1))
        results[f"N = {n}"] = evals[-1]
        timing[f"N = {n}"] = time.time() - t0
    table = (f"### exact match (all queries of a sequence right)\n\n"
             f"{format_table(results, dname, 'exact')}\n\n"
             f"### per-query accuracy\n\n{format_table(results, dname, 'token')}\n")
    echo("\n" + table)
    png = os.path.join(out, "accuracy.png")
    chance = 1 / task.max_nodes if task.name == "depo" and task.min_nodes == task.max_nodes else None
    plot(results, png, f"{task.name}: accuracy by difficulty, equal training tokens",
         dname, "token", chance=chance)
    write_json(os.path.join(out, "results.json"),
               {"settings": settings, "task": task.to_dict(), "results": results,
                "seconds": timing})
    write_text(os.path.join(out, "results.md"), table)
    echo(f"wrote {png}, results.json and results.md to {out}")
    return results
