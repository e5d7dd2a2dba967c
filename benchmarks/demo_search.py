"""Search for a CPU-sized setting where more sleep loops help (the paper's effect).

Each trial trains N = 1 and N > 1 from the same seed on the same data stream for the same number
of steps (equal training tokens), then evaluates accuracy by difficulty. Results are appended to
benchmarks/results/demo_search.jsonl and summarised in demo_search.md.

    python benchmarks/demo_search.py --trial depo-tiny --loops 1 3 --steps 600
"""

import argparse
import json
import os
import sys
import tempfile
import time

import mlx_sleep  # noqa: F401  (BLAS first)
from mlx_sleep.config import ModelConfig, SleepConfig
from mlx_sleep.train import TrainConfig, Trainer
from mlx_sleep.tasks import get_task

TRIALS = {
    # name: (task settings, model settings, train settings)
    "depo-tiny": (dict(name="depo", max_nodes=8, min_nodes=8, n_names=16, max_hops=4,
                       window=8, context_len=24, n_queries=4),
                  dict(hidden_size=64, layers="attn,gdn,attn,gdn", num_heads=4),
                  dict(batch_size=64, lr=2e-3, adam_lr=3e-3)),
    # The whole cycle is one context chunk; 2 GDN layers can chain 2 lookups at answer time.
    "depo-1chunk": (dict(name="depo", max_nodes=8, min_nodes=8, n_names=16, max_hops=4,
                         window=24, context_len=24, n_queries=8),
                    dict(hidden_size=64, layers="gdn,gdn", num_heads=4),
                    dict(batch_size=64, lr=2e-2, adam_lr=3e-3)),
    # One GDN block: at answer time it can chain only one lookup, so k = 2 needs sleep.
    "depo-1layer": (dict(name="depo", max_nodes=8, min_nodes=8, n_names=16, max_hops=2,
                         window=24, context_len=24, n_queries=8),
                    dict(hidden_size=64, layers="gdn", num_heads=4),
                    dict(batch_size=64, lr=2e-2, adam_lr=3e-3)),
    "r110-tiny": (dict(name="rule110", n_strings=2, n_bits=8, steps=4, steps_range=(1, 4)),
                  dict(hidden_size=64, layers="attn,gdn,attn,gdn", num_heads=4),
                  dict(batch_size=64, lr=2e-3, adam_lr=3e-3)),
}


def run_trial(name, loops, steps, overrides, out_jsonl):
    task_kw, model_kw, train_kw = (dict(x) for x in TRIALS[name])
    for k, v in overrides.items():
        for d in (task_kw, model_kw, train_kw):
            if k in d:
                d[k] = v
                break
        else:
            (model_kw if k in ModelConfig.__dataclass_fields__ else train_kw)[k] = v
    task = get_task(task_kw.pop("name"), **task_kw)
    results = {}
    for n in loops:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            trainer = Trainer(out, ModelConfig(vocab_size=task.vocab_size, **model_kw),
                              SleepConfig(loops=n, window=task.window, eviction=task.eviction),
                              task, TrainConfig(steps=steps, warmup=min(50, steps // 10),
                                                compile=False, eval_samples=256, **train_kw),
                              progress=False)
            evals = []
            trainer.run(on_eval=lambda step, r: evals.append(r))
            results[n] = {"eval": evals[-1], "seconds": time.time() - t0}
            print(f"{name} N={n} steps={steps} {overrides} {time.time() - t0:.0f}s",
                  {d: round(r['token'], 3) for d, r in evals[-1].items()}, flush=True)
    record = {"trial": name, "steps": steps, "overrides": overrides, "task": task.to_dict(),
              "model": model_kw, "train": train_kw, "results": results}
    os.makedirs(os.path.dirname(out_jsonl), exist_ok=True)
    with open(out_jsonl, "a") as f:
        f.write(json.dumps(record) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--trial", choices=sorted(TRIALS), required=True)
    p.add_argument("--loops", type=int, nargs="+", default=[1, 3])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides (JSON values)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "demo_search.jsonl"))
    a = p.parse_args()
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in a.set)}
    run_trial(a.trial, a.loops, a.steps, overrides, a.out)


if __name__ == "__main__":
    sys.exit(main())
