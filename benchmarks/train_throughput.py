"""Training throughput and peak memory against the number of sleep loops N.

The paper says training throughput falls as 1/N (every context chunk is run N times, forward and
backward). This measures tokens/s and peak memory for N in {1, 2, 4}, with and without
activation checkpointing per chunk, in one process on one machine, and reports each throughput
as a ratio to N = 1 next to the 1/N prediction. With checkpointing the step is
sleep.sleep_value_and_grad: a forward that keeps only the chunk-boundary states, then one chunk
at a time recomputed under vjp, so peak memory is about one chunk's activations (all N passes).

    python benchmarks/train_throughput.py            # Rule 110 shape: 4 layers, width 128, T = 100
    python benchmarks/train_throughput.py --quick    # a smaller model, for a smoke run

Writes benchmarks/results/train_throughput.{json,md}.
"""

import argparse
import json
import os
import platform
import time

import mlx_sleep  # noqa: F401  (BLAS first)
import mlx.core as mx

from mlx_sleep import _blas
from mlx_sleep.config import ModelConfig, SleepConfig
from mlx_sleep.tasks import get_task
from mlx_sleep.train import TrainConfig, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(task, model_cfg, loops, checkpoint, batch_size, warmup, steps, workdir):
    trainer = Trainer(
        os.path.join(workdir, f"N{loops}-ckpt{int(checkpoint)}"),
        model_cfg,
        SleepConfig(loops=loops, window=task.window, eviction=task.eviction),
        task,
        TrainConfig(
            steps=warmup + steps,
            batch_size=batch_size,
            activation_checkpoint=checkpoint,
            compile=False,
        ),
        progress=False,
    )
    batches = [task.sample(trainer.rng, batch_size) for _ in range(warmup + steps)]
    for b in batches[:warmup]:
        trainer.train_step(b)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        trainer.train_step(b)
    seconds = time.perf_counter() - t0
    return {
        "loops": loops,
        "checkpoint": checkpoint,
        "tokens_per_s": steps * batch_size * task.seq_len / seconds,
        "seconds_per_step": seconds / steps,
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_throughput"))
    a = p.parse_args()
    import tempfile

    task = get_task("rule110") if not a.quick else get_task("rule110", n_strings=2, n_bits=8)
    hidden, batch = (128, 64) if not a.quick else (32, 16)
    model_cfg = ModelConfig(vocab_size=task.vocab_size, hidden_size=hidden, num_heads=4)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for checkpoint in (False, True):
            for n in a.loops:
                r = measure(task, model_cfg, n, checkpoint, batch, a.warmup, a.steps, work)
                rows.append(r)
                print(json.dumps(r), flush=True)
    for r in rows:
        base = next(
            x for x in rows if x["loops"] == a.loops[0] and x["checkpoint"] == r["checkpoint"]
        )
        r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["predicted_ratio"] = a.loops[0] / r["loops"]
    meta = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": _blas.status["library"] or _blas.status["reason"],
        "model": model_cfg.to_dict(),
        "task": task.to_dict(),
        "batch_size": batch,
        "timed_steps": a.steps,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [
        f"Training throughput vs sleep loops N ({meta['machine']}, {meta['device']}, "
        f"mlx {meta['mlx']}; {model_cfg.num_layers} layers, width {hidden}, batch {batch}, "
        f"T = {task.seq_len}, window {task.window})",
        "",
        "| N | act. checkpoint | tokens/s | s/step | ratio to N=1 | 1/N | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['loops']} | {'yes' if r['checkpoint'] else 'no'} | "
            f"{r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.2f} | "
            f"{r['throughput_ratio']:.2f} | {r['predicted_ratio']:.2f} | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
