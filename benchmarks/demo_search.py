"""Search for a CPU-sized setting where more sleep loops help (the paper's effect).

Each trial trains N = 1 and N > 1 from the same seed on the same data stream for the same number
of steps (equal training tokens), then evaluates per-query accuracy by difficulty. One JSON line per
(trial, seed, run) is appended to benchmarks/results/demo_search.jsonl; docs/demo-search.md
summarises them.

    python benchmarks/demo_search.py --trial depo-k4 --loops 1 3 --steps 1200 --seeds 0 1
    python benchmarks/demo_search.py --trial depo-k4 --loops 1 3 --warm 0.5    # N > 1 from N = 1
    python benchmarks/demo_search.py --trial depo-k4 --loops-sample 1:4 --eval-loops 1 2 3 4

--warm F: the N > 1 run is the N = 1 run up to F * steps (weights, optimizer, data stream), then
continues with N passes to the same total steps (equal training tokens, same schedule).
--loops-sample A:B: one run that draws N per batch, evaluated at each of --eval-loops.
Train time per step is measured on its own (the machine is shared: wall times are inflated).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import mlx_sleep  # noqa: F401  (BLAS first)
from mlx_sleep.config import ModelConfig, SleepConfig
from mlx_sleep.eval import evaluate
from mlx_sleep.tasks import get_task, task_from_dict
from mlx_sleep.train import TrainConfig, Trainer

DEPO8 = dict(
    name="depo", max_nodes=8, min_nodes=8, n_names=16, window=24, context_len=24, n_queries=8
)
ONE_GDN = dict(hidden_size=64, layers="gdn", num_heads=4)
FAST = dict(batch_size=64, lr=2e-2, adam_lr=3e-3)

TRIALS = {
    # name: (task settings, model settings, train settings)
    "depo-tiny": (
        dict(
            name="depo",
            max_nodes=8,
            min_nodes=8,
            n_names=16,
            max_hops=4,
            window=8,
            context_len=24,
            n_queries=4,
        ),
        dict(hidden_size=64, layers="attn,gdn,attn,gdn", num_heads=4),
        dict(batch_size=64, lr=2e-3, adam_lr=3e-3),
    ),
    # The whole cycle is one context chunk; 2 GDN layers can chain 2 lookups at answer time.
    "depo-1chunk": (dict(DEPO8, max_hops=4), dict(ONE_GDN, layers="gdn,gdn"), FAST),
    # One GDN block: at answer time it reads S once, so k = 2 needs the composition in S.
    "depo-1layer": (dict(DEPO8, max_hops=2), ONE_GDN, FAST),
    # Deeper items for one GDN block (issue 12): k in {1, 2, 3} / {1, .., 4}, weights by -o.
    "depo-k3": (dict(DEPO8, max_hops=3), ONE_GDN, FAST),
    "depo-k4": (dict(DEPO8, max_hops=4), ONE_GDN, FAST),
    # Edges in cycle order (a b ; b c ; ...): no edge's continuation is written before it, so a
    # single pass cannot compose two hops through the delta rule's erase term; a pass that reads
    # the whole S (pass 2) and one that writes from those reads (pass 3) can.
    "depo-fwd": (dict(DEPO8, max_hops=2, edge_order="forward"), ONE_GDN, FAST),
    "depo-rev": (dict(DEPO8, max_hops=2, edge_order="reverse"), ONE_GDN, FAST),
    # 6-node cycle, names = nodes (a permutation of 6 names): smaller, faster to learn.
    "depo6-k3": (
        dict(
            name="depo",
            max_nodes=6,
            min_nodes=6,
            n_names=6,
            max_hops=3,
            window=18,
            context_len=18,
            n_queries=6,
        ),
        ONE_GDN,
        FAST,
    ),
    "r110-tiny": (
        dict(name="rule110", n_strings=2, n_bits=8, steps=4, steps_range=(1, 4)),
        dict(hidden_size=64, layers="attn,gdn,attn,gdn", num_heads=4),
        dict(batch_size=64, lr=2e-3, adam_lr=3e-3),
    ),
    # Rule 110, small t, one GDN block as the whole core (each pass advances a bounded amount).
    "r110-1gdn": (dict(name="rule110", n_strings=1, n_bits=8, steps_range=(1, 3)), ONE_GDN, FAST),
}


def split_overrides(name, overrides):
    task_kw, model_kw, train_kw = (dict(x) for x in TRIALS[name])
    for k, v in overrides.items():
        if k in task_kw or k in (
            "hops",
            "hop_weights",
            "max_hops",
            "min_nodes",
            "steps_range",
            "edge_order",
            "edge_gap",
        ):
            task_kw[k] = v
        elif k in ModelConfig.__dataclass_fields__:
            model_kw[k] = v
        else:
            train_kw[k] = v
    return task_kw, model_kw, train_kw


def make_trainer(out, task, model_kw, train_kw, loops, steps, seed, **extra):
    return Trainer(
        out,
        ModelConfig(vocab_size=task.vocab_size, **model_kw),
        SleepConfig(loops=loops, window=task.window, eviction=task.eviction),
        task,
        TrainConfig(
            steps=steps,
            warmup=min(50, steps // 10),
            seed=seed,
            compile=False,
            eval_samples=256,
            checkpoint_every=0,
            **train_kw,
            **extra,
        ),
        progress=False,
    )


def timed_run(trainer, stop, first=None, checkpoints=(), on_checkpoint=None):
    """Train to step `stop`; returns (seconds of training only, seconds per step).
    `first` = (steps, task): a depth curriculum, batches from `task` until step `steps`.
    `on_checkpoint(step)` runs at each step in `checkpoints` (outside the timed part)."""
    t0, s0, spent = time.perf_counter(), trainer.step, 0.0
    while trainer.step < stop:
        if trainer.step in checkpoints and on_checkpoint:
            on_checkpoint(trainer.step)
        task = first[1] if first and trainer.step < first[0] else trainer.task
        batch = task.sample(trainer.rng, trainer.cfg.batch_size)
        t = time.perf_counter()
        trainer.train_step(batch)
        spent += time.perf_counter() - t
    return time.perf_counter() - t0, spent / max(trainer.step - s0, 1)


def eval_at(trainer, task, loops_list, samples):
    out = {}
    for n in loops_list:
        t = time.perf_counter()
        sleep = SleepConfig(loops=n, window=task.window, eviction=task.eviction)
        r = evaluate(
            trainer.model, task, sleep, samples, trainer.cfg.batch_size, seed=trainer.cfg.seed + 1
        )
        out[n] = {"eval": r, "eval_seconds": time.perf_counter() - t}
    return out


def record(out_jsonl, **rec):
    os.makedirs(os.path.dirname(out_jsonl), exist_ok=True)
    with open(out_jsonl, "a") as f:
        f.write(json.dumps(rec) + "\n")
    ev = rec["evals"]
    print(
        rec["trial"],
        rec["run"],
        f"seed={rec['seed']}",
        rec["overrides"],
        f"{rec['seconds_per_step'] * 1e3:.0f} ms/step",
        {n: {d: round(r["token"], 3) for d, r in e["eval"].items()} for n, e in ev.items()},
        flush=True,
    )


def summary(path):
    """A markdown table of the per-seed records (one row per trial, settings and run)."""
    rows = {}
    for line in open(path):
        r = json.loads(line)
        if "run" not in r:  # the first search's records (one per trial, one seed)
            continue
        key = (
            r["trial"],
            r["steps"],
            json.dumps(r["overrides"], sort_keys=True),
            r["run"],
            r.get("tag", ""),
        )
        rows.setdefault(key, []).append(r)
    print(
        "| trial | steps | settings | run | eval N | seeds | per-query accuracy by k "
        "(mean; each seed) | ms/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (trial, steps, over, run, tag), recs in rows.items():
        for n in recs[0]["evals"]:
            accs = []
            for d in recs[0]["evals"][n]["eval"]:
                vals = [x["evals"][n]["eval"][d]["token"] for x in recs]
                accs.append(
                    f"k={d}: {sum(vals) / len(vals):.3f} ("
                    + "/".join(f"{v:.2f}" for v in vals)
                    + ")"
                )
            ms = sum(x["seconds_per_step"] for x in recs) / len(recs) * 1e3
            print(
                f"| {trial} | {steps} | {over} {tag} | {run} | {n} | "
                f"{','.join(str(x['seed']) for x in recs)} | {'; '.join(accs)} | {ms:.0f} |"
            )


def main():
    if sys.argv[1:2] == ["--summary"]:
        return summary(
            sys.argv[2]
            if len(sys.argv) > 2
            else os.path.join(os.path.dirname(__file__), "results", "demo_search.jsonl")
        )
    p = argparse.ArgumentParser()
    p.add_argument("--trial", choices=sorted(TRIALS), required=True)
    p.add_argument("--loops", type=int, nargs="+", default=[1, 3])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--warm", type=float, default=None, help="N > 1 from N = 1 at this fraction")
    p.add_argument("--loops-sample", default=None, metavar="A:B")
    p.add_argument("--eval-loops", type=int, nargs="+", default=None)
    p.add_argument(
        "--curriculum",
        type=int,
        default=None,
        metavar="STEPS",
        help="Depo: train on k = 1 only for the first STEPS steps, then on all hops",
    )
    p.add_argument(
        "--eval-steps",
        type=int,
        nargs="*",
        default=[],
        help="also evaluate at these steps (kept as evals_at in the record)",
    )
    p.add_argument("--samples", type=int, default=256, help="eval sequences per difficulty")
    p.add_argument("--tag", default="", help="free text kept in the record")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides (JSON values)")
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "demo_search.jsonl")
    )
    a = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    task_kw, model_kw, train_kw = split_overrides(a.trial, overrides)
    task = get_task(task_kw.pop("name"), **task_kw)
    first = None
    if a.curriculum:
        first = (a.curriculum, task_from_dict({**task.to_dict(), "hops": [1], "hop_weights": None}))
    common = dict(
        trial=a.trial,
        curriculum=a.curriculum,
        steps=a.steps,
        overrides=overrides,
        tag=a.tag,
        task=task.to_dict(),
        model=model_kw,
        train=train_kw,
        load=os.getloadavg()[0],
    )
    if a.warm is not None and a.loops[0] != 1:
        p.error("--warm needs --loops to start with 1")
    for seed in a.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            if a.loops_sample:
                lo, hi = (int(x) for x in a.loops_sample.split(":"))
                tr = make_trainer(
                    os.path.join(tmp, "s"),
                    task,
                    model_kw,
                    train_kw,
                    hi,
                    a.steps,
                    seed,
                    loops_sample=(lo, hi),
                )
                wall, per_step = timed_run(tr, a.steps)
                record(
                    a.out,
                    **common,
                    seed=seed,
                    run=f"sample {lo}:{hi}",
                    train_seconds=wall,
                    seconds_per_step=per_step,
                    evals=eval_at(tr, task, a.eval_loops or list(range(1, hi + 1)), a.samples),
                )
                continue
            base = None
            for n in a.loops:
                tr = make_trainer(
                    os.path.join(tmp, f"N{n}"), task, model_kw, train_kw, n, a.steps, seed
                )
                run = f"N = {n}"
                if a.warm is not None and n > 1 and base is not None:
                    tr.load_checkpoint(base)  # the N = 1 run at the switch point
                    run += f" warm from N = 1 at {a.warm:g}"
                if a.warm is not None and n == 1:
                    timed_run(tr, round(a.warm * a.steps))
                    tr.save_checkpoint()  # the N > 1 runs start here
                    base = os.path.join(tmp, "N1", "checkpoint")
                    tr = make_trainer(
                        os.path.join(tmp, "N1"), task, model_kw, train_kw, n, a.steps, seed
                    )  # resumes from that checkpoint
                evals_at = {}

                def eval_now(step, tr=tr, n=n):
                    evals_at[step] = eval_at(tr, task, a.eval_loops or [n], a.samples)

                wall, per_step = timed_run(tr, a.steps, first, a.eval_steps, eval_now)
                record(
                    a.out,
                    **common,
                    seed=seed,
                    run=run,
                    train_seconds=wall,
                    seconds_per_step=per_step,
                    evals_at=evals_at,
                    evals=eval_at(tr, task, a.eval_loops or [n], a.samples),
                )


if __name__ == "__main__":
    sys.exit(main())
