"""Search for a training recipe under which sleep depth is a dial (issue 20): accuracy that rises
with test-time N up to the trained depth and does not fall past it.

Each recipe trains the demo's model on the demo's Depo (or a deeper one, --task depo-k4) with N
sleep passes and its own loss over depths, then evaluates at every test-time N of --eval-loops.
One JSON line per (recipe, seed) is appended to benchmarks/results/depth_search.jsonl;
`--report` summarises them in benchmarks/results/depth_search.md (docs/training.md quotes it).

    python benchmarks/depth_search.py --recipe fixed --seeds 0 1 2
    python benchmarks/depth_search.py --recipe beyond --seeds 0 1 2
    python benchmarks/depth_search.py --report
    python benchmarks/depth_search.py --answers --recipe dial-k4-untied --task depo-k4 --seeds 0

`--answers` trains nothing: it reads a recipe's trained runs back (--models) and records which
node they answer to the deepest queries at each test-time N (depth_search_answers.jsonl).
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx  # noqa: E402
import mlx_sleep.sleep as sleep_module  # noqa: E402
from mlx_sleep.config import ModelConfig, SleepConfig  # noqa: E402
from mlx_sleep.demo import DEMO, train_with_curriculum  # noqa: E402
from mlx_sleep.doctor import platform_summary  # noqa: E402
from mlx_sleep.eval import evaluate  # noqa: E402
from mlx_sleep.io import read_jsonl, write_text  # noqa: E402
from mlx_sleep.tasks import get_task  # noqa: E402
from mlx_sleep.tasks.depo import PAD  # noqa: E402
from mlx_sleep.sleep import sleep_forward  # noqa: E402
from mlx_sleep.train import TrainConfig, Trainer, load_run  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "depth_search.jsonl")
ANSWERS = os.path.join(HERE, "results", "depth_search_answers.jsonl")

TASKS = {
    "depo-k2": DEMO["task"],  # the demo's: 8-node cycle in one window, k in {1, 2}
    "depo-k4": {**DEMO["task"], "max_hops": 4},
}
# The demo's curriculum when these recipes were searched (k = 1 alone for 300 of 800 steps); a
# recipe may set its own ("curriculum"). The demo's is 160 steps now (the k1-160 rows).
CURRICULUM = {"fraction": 0.375, "hops": [1]}
STAGED_K4 = [
    {"fraction": 0.1, "hops": [1]},
    {"fraction": 0.25, "hops": [1, 2]},
    {"fraction": 0.4, "hops": [1, 2, 3]},
]
QUICK_K4 = [
    {"fraction": 0.05, "hops": [1]},
    {"fraction": 0.15, "hops": [1, 2]},
    {"fraction": 0.3, "hops": [1, 2, 3]},
]
# the deeper Depo (--task depo-k4): one hop more per stage, twice the demo's steps
K4 = {"steps": 1600, "curriculum": STAGED_K4}
DIAL_K4 = {
    **K4,
    "depth_losses": ((1, 4, 0.3), (5, 5, 1.0), (6, 10, 0.5)),
    "depth_losses_from": 640,
}
SHALLOW_K4 = ((1, 4, 1.0), (5, 5, 1.0), (6, 10, 0.5))
UNTIED = {"tie_embeddings": False}
# name: (N, TrainConfig overrides, and "curriculum" and "model": ModelConfig overrides). The
# depth losses join after the depth curriculum (step 300 of 800), when the N-pass model has
# begun to compose.
RECIPES = {
    "fixed": (3, {}),  # Algorithm 1 at N = 3: the baseline
    "fixed-6": (6, {}),  # Algorithm 1 at N = 6: what a model trained at 2N reaches there
    "beyond": (3, {"depth_losses": ((3, 1.0), (6, 0.5)), "depth_losses_from": 300}),
    "ladder": (
        3,
        {"depth_losses": ((1, 0.1), (2, 0.3), (3, 1.0), (6, 0.5)), "depth_losses_from": 300},
    ),
    "ladder-0": (3, {"depth_losses": ((1, 0.1), (2, 0.3), (3, 1.0), (6, 0.5))}),
    # one depth drawn per step from a range (LO-HI): every depth gets a loss, at a cost of one
    # extra sleep per range per step
    "beyond-range": (3, {"depth_losses": ((3, 3, 1.0), (4, 6, 0.5)), "depth_losses_from": 300}),
    "dial": (
        3,
        {"depth_losses": ((1, 2, 0.3), (3, 3, 1.0), (4, 6, 0.5)), "depth_losses_from": 300},
    ),
    "dial-0": (3, {"depth_losses": ((1, 2, 0.3), (3, 3, 1.0), (4, 6, 0.5))}),  # from step 0
    "sample-3-6": (6, {"loops_sample": (3, 6)}),  # stochastic depth with a minimum of 3
    # The race (issue 20): a run composes two hops once it finds how, and the learning rate
    # decays meanwhile; the one-hop phase is learned by step ~100 of its 300. A shorter one
    # leaves the two-hop phase more steps at a high rate.
    "fixed-k1-160": (3, {"curriculum": {"fraction": 0.2, "hops": [1]}}),
    "one-k1-160": (1, {"curriculum": {"fraction": 0.2, "hops": [1]}}),
    "fixed-k1-100": (3, {"curriculum": {"fraction": 0.125, "hops": [1]}}),
    "one-k1-100": (1, {"curriculum": {"fraction": 0.125, "hops": [1]}}),
    # `dial` on the demo's curriculum: the depth losses join when the two-hop phase begins
    "dial-k1-160": (
        3,
        {
            "curriculum": {"fraction": 0.2, "hops": [1]},
            "depth_losses": ((1, 2, 0.3), (3, 3, 1.0), (4, 6, 0.5)),
            "depth_losses_from": 160,
        },
    ),
    # stochastic depth with a minimum N (the third direction) on the same curriculum:
    # N drawn in 3..6 per batch, so every depth from N to 2N gets a loss and none below N does
    "sample-3-6-k1-160": (
        3,
        {"curriculum": {"fraction": 0.2, "hops": [1]}, "loops_sample": (3, 6)},
    ),
    "fixed-k4-staged": (5, K4),
    "one-k4-staged": (1, K4),
    # `dial-k1-160` scaled to N = 5: the depth losses join when the last phase (k up to 4) begins
    "dial-k4-staged": (5, DIAL_K4),
    # The k = 4 race: seed 3 never learns k = 3 in its phase (loss 2.2 at step 480 against 0.9
    # for seed 4). Phases that end sooner (80 / 240 / 480 steps) leave the deep hops more steps
    # at a high learning rate, as the 160-step one-hop phase did for k = 2.
    "fixed-k4-quick": (5, {**K4, "curriculum": QUICK_K4}),
    # The shock at a phase switch (loss 0.06 -> 3.97 on seed 3 when "+3" arrives): with tied
    # embeddings a hop token's row was trained only as an output never to predict before its
    # phase, so as an input it first arrives as a vector the model learned to answer away from.
    "fixed-k4-untied": (5, {**K4, "model": UNTIED}),
    "dial-k4-untied": (5, {**DIAL_K4, "model": UNTIED}),
    # stochastic depth with a minimum N on the deeper Depo: N drawn in 5..10 per batch
    "sample-5-10-k4-untied": (5, {**K4, "model": UNTIED, "loops_sample": (5, 10)}),
    # The dip below N: the shallow depths answer a four-hop query with a confident wrong node.
    # Their loss at full weight (`dial-k4-staged` has 0.3) should make them hedge instead.
    "dial-k4-shallow": (5, {**DIAL_K4, "depth_losses": SHALLOW_K4}),
    # the two levers together: untied embeddings (the race), shallow depths at full weight (the dip)
    "dial-k4-shallow-untied": (5, {**DIAL_K4, "depth_losses": SHALLOW_K4, "model": UNTIED}),
    # The dip is a ranking, not a certainty: below N the dial hedges, but the hedge's top is the
    # node two steps on (--answers). A hinge on the depths below N pushes a hedge's top wrong
    # answer below the right one (a prototype, `hinge_below_n`: not a train option).
    "dial-k4-untied-hinge": (5, {**DIAL_K4, "model": UNTIED, "hinge": 1.0}),
}


def baseline(recipe: str) -> str:
    """The Algorithm 1 recipe a recipe is compared with: `fixed` on the same curriculum, steps
    and model (`fixed-k1-160` for `dial-k1-160`), else `fixed`."""
    own = {k: v for k, v in RECIPES[recipe][1].items() if k in ("curriculum", "steps", "model")}
    for name, (_, kw) in RECIPES.items():
        if name.startswith("fixed") and kw == own:  # `fixed` comes first: it wins over fixed-6
            return name
    return "fixed"


TOLERANCES = (0.3, 0.1, 0.03)  # the stopping rule, at most max(8, 2N) passes


@contextlib.contextmanager
def hinge_below_n(loops: int, weight: float):
    """Training's loss over depths with `weight` x a multi-class hinge (margin 1: the right
    answer's logit above every other's by 1) added to the cross-entropy of each depth below
    `loops`: mlx_sleep.sleep's sleep_loss, which depth_loss calls per depth, is wrapped while the
    block runs (the plain loss path: run() refuses a memory bound with it)."""
    ce_sum, sleep_loss = sleep_module._ce_sum, sleep_module.sleep_loss

    def ce_and_hinge(logits, targets, mask):
        z = logits.astype(mx.float32)
        right = mx.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
        wrong = mx.max(mx.where(mx.arange(z.shape[-1]) == targets[..., None], -1e9, z), axis=-1)
        hinge = mx.maximum(0.0, 1 + wrong - right)
        return ce_sum(logits, targets, mask) + weight * (hinge * mask).sum()

    def with_hinge(model, inputs, targets, mask, sleep, *, plan=None):
        sleep_module._ce_sum = ce_and_hinge if sleep.loops < loops else ce_sum
        try:
            return sleep_loss(model, inputs, targets, mask, sleep, plan=plan)
        finally:
            sleep_module._ce_sum = ce_sum

    sleep_module.sleep_loss = with_hinge
    try:
        yield
    finally:
        sleep_module.sleep_loss = sleep_loss


def run(
    recipe: str, task_name: str, seed: int, eval_loops, samples: int, models: str, stopping=True
) -> dict:
    loops, overrides = RECIPES[recipe]
    overrides = dict(overrides)
    curriculum = overrides.pop("curriculum", CURRICULUM)
    model = {**DEMO["model"], **overrides.pop("model", {})}
    hinge = overrides.pop("hinge", None)
    task_kw = dict(TASKS[task_name])
    task = get_task(task_kw.pop("name"), **task_kw)
    train = {**DEMO["train"], **overrides}
    if hinge and train.get("memory_bound", "none") != "none":
        raise SystemExit(f"{recipe}: the hinge prototype wraps the plain loss path only")
    out = os.path.join(models, task_name, recipe, f"seed{seed}")  # kept: re-run resumes
    trainer = Trainer(
        out,
        ModelConfig(vocab_size=task.vocab_size, **model),
        SleepConfig(loops=loops, window=task.window, eviction=task.eviction),
        task,
        TrainConfig(seed=seed, **train),
        progress=False,
        echo=lambda *a: None,
    )
    t0 = time.time()
    with hinge_below_n(loops, hinge) if hinge else contextlib.nullcontext():
        train_with_curriculum(trainer, curriculum, on_eval=lambda step, r: None)
    seconds = time.time() - t0
    by_loops = {}
    for n in eval_loops:
        sleep = SleepConfig(loops=n, window=task.window, eviction=task.eviction)
        r = evaluate(trainer.model, task, sleep, samples, 64, seed=seed + 1)
        by_loops[str(n)] = {str(k): v["token"] for k, v in r.items()}
        print(f"  {recipe} seed {seed} test N = {n}: {by_loops[str(n)]}", flush=True)
    tolerances = TOLERANCES if stopping else ()
    max_passes = max(8, 2 * loops)
    stopping = {}
    for tol in tolerances:
        sleep = SleepConfig(loops=max_passes, window=task.window, eviction=task.eviction)
        r = evaluate(trainer.model, task, sleep, samples, 64, seed=seed + 1, tolerance=tol)
        stopping[str(tol)] = {
            str(k): {"token": v["token"], "passes": v["passes"]} for k, v in r.items()
        }
        print(f"  {recipe} seed {seed} tolerance {tol}: {stopping[str(tol)]}", flush=True)
    trainer.close()
    return {
        "recipe": recipe,
        "task": task_name,
        "seed": seed,
        "loops": loops,
        "train": {k: v for k, v in train.items()},
        "curriculum": curriculum,
        "model_config": model,
        **({"hinge_below_n": hinge} if hinge else {}),
        "train_seconds": seconds,
        "samples": samples,
        "accuracy": by_loops,
        **({"stopping": stopping} if stopping else {}),
        "model": out,
        # float-level differences between CPUs decide races (an AMD and an Intel 2-core x86
        # train the demo's seed 0 differently), so a record names its machine
        "platform": platform_summary(),
    }


def answer_offsets(recipe: str, task_name: str, seed: int, eval_loops, samples: int, models: str):
    """Which node a trained run answers to its deepest queries after n passes: the share of
    answers j steps on from the query node (j = k is right; 0..n_nodes - 1, the last entry: not
    a node of the cycle), the mean probability of the answer chosen and that of the right one.
    Below N a dial's answers are near-uniform hedges and accuracy is their argmax: this shows
    where the argmax goes."""
    model, sleep, task, _ = load_run(os.path.join(models, task_name, recipe, f"seed{seed}"))
    k, n_nodes = task.max_hops, task.max_nodes  # both tasks: one cycle size (min = max nodes)
    batch = task.sample(np.random.default_rng([seed, 30]), samples, difficulty=k)
    rows, cols = np.nonzero(batch.mask)
    by_loops = {}
    for n in eval_loops:
        answers, _ = sleep_forward(
            model, mx.array(batch.inputs), batch.mask, replace(sleep, loops=n)
        )
        ((a, _, logits),) = answers  # the queries are one answer chunk
        probs = np.array(mx.softmax(logits.astype(mx.float32), axis=-1))
        counts, p_top = np.zeros(n_nodes + 1), []
        p_right = probs[rows, cols - a, batch.targets[rows, cols]]
        for r, c in zip(rows, cols):
            edges = batch.inputs[r, : task.context_len]
            edges = edges[edges != PAD].reshape(-1, 3)
            successor = dict(zip(edges[:, 0].tolist(), edges[:, 1].tolist()))
            guess = int(probs[r, c - a].argmax())
            node, j = int(batch.inputs[r, c - 1]), 0
            while node != guess and j < n_nodes:
                node, j = successor[node], j + 1
            counts[j] += 1  # j == n_nodes: not a node of this cycle
            p_top.append(float(probs[r, c - a, guess]))
        by_loops[str(n)] = {
            "offsets": (counts / counts.sum()).round(4).tolist(),
            "p_answer": round(float(np.mean(p_top)), 4),
            "p_right": round(float(np.mean(p_right)), 4),
        }
        print(f"  {recipe} seed {seed} k = {k}, {n} passes: {by_loops[str(n)]}", flush=True)
    return {"recipe": recipe, "task": task_name, "seed": seed, "k": k, "answers": by_loops}


def answers_report(path: str) -> list:
    rows = [r for _, r in read_jsonl(path)]
    if not rows:
        return []
    out = [
        "## Which node a sleep shorter than k passes answers",
        "",
        "`--answers`: the deepest queries (k = max) of a trained run, share of answers j steps on "
        "from the query node after n passes (j = k is right), the mean probability the model "
        "gave the answer it chose and the mean probability of the right answer (chance over the "
        "cycle's 8 nodes: 0.125).",
        "",
    ]
    width = max(len(a["offsets"]) for r in rows for a in r["answers"].values()) - 1
    out.append(
        "| task | recipe | seed | passes | "
        + " | ".join(f"j = {j}" for j in range(width))
        + " | not a node | p(answer) | p(right) |"
    )
    out.append("|" + "---|" * (width + 7))
    for r in rows:
        for n, a in r["answers"].items():
            cells = " | ".join(f"{x:.3f}" for x in a["offsets"])
            out.append(
                f"| {r['task']} | {r['recipe']} | {r['seed']} | {n} | {cells} | "
                f"{a['p_answer']:.2f} | {a['p_right']:.2f} |"
            )
    return out + [""]


def report(path: str) -> str:
    rows = [r for _, r in read_jsonl(path)]
    out = [
        "# Sleep depth as a dial: the recipe search (issue 20)",
        "",
        "The demo's model (one GDN block, width 64) and Depo task (depo-k2: 800 steps with its "
        "depth curriculum; depo-k4: k up to 4, 1,600 steps, a staged curriculum); each recipe "
        "evaluated at test-time N on 512 sequences x 8 queries per k. "
        "Per-query accuracy at the deepest k: mean [min, max] over seeds. `python "
        "benchmarks/depth_search.py --report` writes this from depth_search.jsonl.",
        "",
    ]
    for task_name in sorted({r["task"] for r in rows}):
        runs = [r for r in rows if r["task"] == task_name]
        ns = sorted({int(n) for r in runs for n in r["accuracy"]})
        deepest = max(int(k) for r in runs for k in r["accuracy"][str(ns[0])])
        out += [
            f"## {task_name}: k = {deepest}",
            "",
            "| recipe | N | seeds | train min (mean) | "
            + " | ".join(f"test N = {n}" for n in ns)
            + " | rises to N on every seed | at 2N: worst drop |",
            "|---|---|---|---|" + "---|" * len(ns) + "---|---|",
        ]
        for recipe in RECIPES:
            mine = [r for r in runs if r["recipe"] == recipe]
            if not mine:
                continue
            N = mine[0]["loops"] if recipe != "sample-3-6" else 3
            cells = []
            for n in ns:
                acc = [r["accuracy"].get(str(n), {}).get(str(deepest)) for r in mine]
                acc = [a for a in acc if a is not None]
                cells.append(f"{np.mean(acc):.3f} [{min(acc):.3f}, {max(acc):.3f}]" if acc else "-")
            trained = [r for r in mine if r["train_seconds"] > 1]  # not a finished run reused
            rises, drops = [], []
            for r in mine:
                a = {int(n): v[str(deepest)] for n, v in r["accuracy"].items()}
                up = [a[n] for n in ns if n <= N and n in a]
                rises.append(all(x <= y + 1e-9 for x, y in zip(up, up[1:])))
                if 2 * N in a:
                    drops.append(a[N] - a[2 * N])
            minutes = np.mean([r["train_seconds"] for r in trained]) / 60 if trained else None
            out.append(
                f"| {recipe} | {mine[0]['loops']} | {len(mine)} | "
                + (f"{minutes:.1f}" if trained else "-")
                + " | "
                + " | ".join(cells)
                + f" | {sum(rises)}/{len(rises)} | "
                + (f"{max(drops):+.3f} |" if drops else "- |")
            )
        out.append("")
        for recipe in RECIPES:
            base = baseline(recipe)
            fixed = {r["seed"]: r for r in runs if r["recipe"] == base}
            pairs = [
                (r["accuracy"][str(r["loops"])][str(deepest)], fixed[r["seed"]])
                for r in runs
                if r["recipe"] == recipe and recipe != base and r["seed"] in fixed
            ]
            gaps = [a - f["accuracy"][str(f["loops"])][str(deepest)] for a, f in pairs]
            if gaps:
                out.append(
                    f"- `{recipe}` at its N against `{base}` at its N, same seeds "
                    f"({len(gaps)}): {min(gaps):+.3f} to {max(gaps):+.3f}"
                )
        out += [
            "",
            "The stopping rule (at most max(8, 2N) passes; a window stops once a pass changes "
            "the fast weights by less than the tolerance): mean passes per sleeping window and "
            "accuracy "
            f"at k = {deepest}, mean over seeds.",
            "",
            "| recipe | " + " | ".join(f"tolerance {t}" for t in TOLERANCES) + " |",
            "|---|" + "---|" * len(TOLERANCES),
        ]
        for recipe in RECIPES:
            mine = [r for r in runs if r["recipe"] == recipe and "stopping" in r]
            if mine:
                cells = []
                for t in TOLERANCES:
                    got = [r["stopping"][str(t)][str(deepest)] for r in mine]
                    cells.append(
                        f"{np.mean([g['passes'] for g in got]):.1f} passes: "
                        f"{np.mean([g['token'] for g in got]):.3f}"
                    )
                out.append(f"| {recipe} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Recipes (TrainConfig overrides; N = the run's sleep passes):", ""]
    for name, (n, kw) in RECIPES.items():
        out.append(f"- `{name}`: N = {n}, {kw or 'Algorithm 1'}")
    if os.path.exists(ANSWERS):
        out += [""] + answers_report(ANSWERS)
    return "\n".join(out) + "\n"


def append_record(path: str, record: dict):
    """One JSON line more in `path`, rewritten whole through io.py's atomic write."""
    kept = open(path).read() if os.path.exists(path) else ""
    write_text(path, kept + json.dumps(record) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES))
    p.add_argument("--task", choices=sorted(TASKS), default="depo-k2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-loops", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--report", action="store_true", help="Write the markdown summary.")
    p.add_argument(
        "--answers",
        action="store_true",
        help="Instead of training: which node the recipe's trained runs answer to the deepest "
        "queries at each --eval-loops (depth_search_answers.jsonl).",
    )
    p.add_argument(
        "--no-stopping", action="store_true", help="Skip the stopping rule's evaluations."
    )
    p.add_argument(
        "--models",
        default=os.path.join(tempfile.gettempdir(), "depth-search-models"),
        help="Where the trained runs are kept (a re-run resumes or reuses them).",
    )
    args = p.parse_args()
    if args.recipe and args.answers:
        for seed in args.seeds:
            record = answer_offsets(
                args.recipe, args.task, seed, args.eval_loops, args.samples, args.models
            )
            append_record(ANSWERS, record)
    elif args.recipe:
        for seed in args.seeds:
            record = run(
                args.recipe,
                args.task,
                seed,
                args.eval_loops,
                args.samples,
                args.models,
                stopping=not args.no_stopping,
            )
            append_record(RESULTS, record)
    if args.report or not args.recipe:
        write_text(RESULTS.replace(".jsonl", ".md"), report(RESULTS))


if __name__ == "__main__":
    main()
