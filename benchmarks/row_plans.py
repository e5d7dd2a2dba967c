"""What per-row chunk plans cost and what the batch-wide plan they replace got wrong.

A fine-tuning batch of GSM-shaped records (question-first prompts of different lengths, short
answers), right-padded: the batch-wide plan gave a chunk one pass for every row as soon as any
row scored in it, so the other rows' context there was never slept on. Per-row plans run pass 1
for all rows of such a chunk and passes 2..N for the sleeping rows. For a few window sizes:
the share of context (row, chunk) pairs the batch-wide plan gave one pass, and the seconds per
memory-bounded LoRA step under each plan (the same batches, one run, one machine).

    python benchmarks/row_plans.py             # tiny converted Jet-Nemotron, N = 4, batch 4
    python benchmarks/row_plans.py --quick

Writes benchmarks/results/row_plans.{json,md}.
"""

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_sleep.finetune import Finetune, FinetuneConfig  # noqa: E402
from mlx_sleep.finetune.data import batch_indices, make_batch  # noqa: E402
from mlx_sleep.finetune.run import summed_loss_and_grads  # noqa: E402
from mlx_sleep.report import markdown_table  # noqa: E402
from mlx_sleep.sleep import plan_chunks  # noqa: E402
from tests.tiny_models import make_model_dir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def write_records(path, n, lo, hi, seed=0):
    """{"prompt", "answer"} records with prompts of lo..hi characters (byte tokens)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))
            f.write(json.dumps({"prompt": f"Q: first four? {digits}", "answer": digits[:4]}))
            f.write("\n")
    return path


def batch_wide(plan):
    bounds, rows = plan
    return bounds, [any(r) for r in rows]


def one_pass_share(plan):
    """Of the context (row, chunk) pairs (a row's chunks before its first answer chunk; the
    padding after a row's answer is not context), how many a batch-wide plan gives one pass."""
    rows = np.array(plan[1])  # [chunks, B]
    first = rows.argmax(axis=0)  # each row's first answer chunk
    context = np.arange(len(rows))[:, None] < first[None, :]
    starved = context & rows.any(axis=1, keepdims=True)
    return int(starved.sum()), int(context.sum())


def seconds_per_step(ft, batches, plan_of, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for inputs, targets, mask in batches:
            out = summed_loss_and_grads(
                ft.model,
                inputs,
                targets,
                mask,
                ft.sleep,
                plan_of(plan_chunks(mask, ft.sleep.window)),
                True,
            )
            mx.eval(out)
        times.append((time.perf_counter() - t0) / len(batches))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", default="32,64,128")
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "row_plans"))
    a = p.parse_args()
    if a.quick:
        a.windows, a.batches, a.repeats = "32", 2, 1
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model_dir = make_model_dir(os.path.join(work, "m"), "jet_nemotron")
        data = write_records(os.path.join(work, "d.jsonl"), 64, 100, 500)
        for window in (int(w) for w in a.windows.split(",")):
            ft = Finetune(
                model_dir,
                data,
                os.path.join(work, f"run{window}"),
                FinetuneConfig(steps=1, batch_size=a.batch, lr=1e-4, valid_every=0),
                sleep={"loops": a.loops, "window": window},
                progress=False,
                dry_run=True,
            )
            batches = []
            for b in range(a.batches):
                picked = batch_indices(0, len(ft.train_examples), b * a.batch, a.batch)
                batches.append(make_batch([ft.train_examples[i] for i in picked], ft.pad_id))
            starved = total = 0
            for _, _, mask in batches:
                s, t = one_pass_share(plan_chunks(mask, window))
                starved, total = starved + s, total + t
            seconds_per_step(ft, batches[:1], lambda plan: plan, 1)  # warm-up
            per_row = seconds_per_step(ft, batches, lambda plan: plan, a.repeats)
            wide = seconds_per_step(ft, batches, batch_wide, a.repeats)
            rows.append(
                {
                    "window": window,
                    "context_pairs": total,
                    "batch_wide_one_pass_share": starved / max(total, 1),
                    "seconds_per_step_batch_wide": wide,
                    "seconds_per_step_per_row": per_row,
                    "per_row_over_batch_wide": per_row / wide,
                }
            )
            print(rows[-1], flush=True)
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "mlx": mx.__version__,
        "loops": a.loops,
        "batch": a.batch,
        "batches": a.batches,
        "repeats (median)": a.repeats,
        "records": "prompts of 100-500 digits, answers of 4",
        "command": "python benchmarks/row_plans.py" + (" --quick" if a.quick else ""),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = markdown_table(
        [
            "L",
            "context (row, chunk) pairs",
            "one pass under the batch-wide plan",
            "s/step batch-wide",
            "s/step per-row",
            "ratio",
        ],
        [
            [
                r["window"],
                r["context_pairs"],
                f"{100 * r['batch_wide_one_pass_share']:.0f} %",
                f"{r['seconds_per_step_batch_wide']:.3f}",
                f"{r['seconds_per_step_per_row']:.3f}",
                f"{r['per_row_over_batch_wide']:.2f}",
            ]
            for r in rows
        ],
    )
    with open(a.out + ".md", "w") as f:
        f.write("# Per-row chunk plans\n\n" + "\n".join(f"- {k}: {v}" for k, v in meta.items()))
        f.write("\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
