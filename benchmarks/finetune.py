"""Fine-tuning throughput and peak memory of `mlx-sleep finetune` against the sleep loops N.

On a tiny converted Jet-Nemotron (tests/tiny_models.py, the original-layout fixture converted by
`convert`), for LoRA and full fine-tuning, with and without the memory-bounded backward
(sleep_value_and_grad), N in {1, 2, 4}: tokens/s, seconds per step, the measured peak memory and
what `--estimate` predicted for it. Then data parallelism: the same global batch on two
processes (`mlx.launch --backend ring -n 2` on loopback) against one process.

    python benchmarks/finetune.py            # L = 64, prompts of ~4 windows, batch 8
    python benchmarks/finetune.py --quick    # a smoke run

Writes benchmarks/results/finetune.{json,md}. All numbers of one table come from one run on one
machine; on a 2-core machine two processes share the cores, so the ring row measures the
overhead of the all-reduce more than a speed-up (on two Macs each process has its own machine).
"""

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx  # noqa: E402

from mlx_sleep import _blas  # noqa: E402
from mlx_sleep.finetune import Finetune, FinetuneConfig, estimate_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def write_data(path, n, prompt_chars, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            digits = "".join(rng.choice("0123456789") for _ in range(prompt_chars))
            f.write(json.dumps({"prompt": f"keep {digits} first:", "answer": digits[:8]}) + "\n")
    return path


def measure(
    model_dir, data, out, kind, loops, window, bounded, batch, warmup, steps, estimate=True
):
    cfg = FinetuneConfig(
        steps=warmup + steps,
        batch_size=batch,
        fine_tune_type=kind,
        lr=1e-4,
        memory_bounded=bounded,
        valid_every=0,
        checkpoint_every=10**9,
    )
    ft = Finetune(
        model_dir,
        data,
        out,
        cfg,
        sleep={"loops": loops, "window": window},
        progress=False,
        dry_run=True,
    )
    predicted = estimate_step(ft)["peak_bytes"] if estimate else None
    for _ in range(warmup):
        ft.train_step()
    mx.clear_cache()
    mx.reset_peak_memory()
    tokens0, t0 = ft.tokens, time.perf_counter()
    for _ in range(steps):
        ft.train_step()
    seconds = time.perf_counter() - t0
    return {
        "fine_tune_type": kind,
        "loops": loops,
        "memory_bounded": bounded,
        "processes": ft.world.size,
        "tokens_per_s": (ft.tokens - tokens0) / seconds,
        "seconds_per_step": seconds / steps,
        "peak_memory_mb": mx.get_peak_memory() / 2**20,
        "estimated_peak_mb": predicted / 2**20 if predicted else None,
    }


def worker(a):
    """One process of the ring measurement (run under mlx.launch), or the single process."""
    r = measure(
        a.model_dir,
        a.data,
        a.out,
        "lora",
        2,
        a.window,
        True,
        a.batch,
        a.warmup,
        a.steps,
        estimate=False,
    )
    if mx.distributed.init().rank() == 0:
        print("RESULT " + json.dumps(r), flush=True)


def ring(model_dir, data, work, a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = []
    for n in (1, 2):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--worker",
            "--model-dir",
            model_dir,
            "--data",
            data,
            "--out",
            os.path.join(work, f"ring{n}"),
            "--window",
            str(a.window),
            "--batch",
            str(a.batch),
            "--warmup",
            str(a.warmup),
            "--steps",
            str(a.steps),
        ]
        if n > 1:
            cmd = [
                sys.executable,
                "-c",
                "from mlx._distributed_utils.launch import main; main()",
                "--backend",
                "ring",
                "-n",
                str(n),
                "-p",
                str(port),
                "--",
            ] + cmd
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not line:
            raise RuntimeError(
                f"{n} process(es) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        rows.append(json.loads(line[0][len("RESULT ") :]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(HERE, "results", "finetune"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    if a.quick:
        a.window, a.batch, a.steps = 16, 4, 2
    from tests.tiny_models import make_model_dir

    rows = []
    with tempfile.TemporaryDirectory() as work:
        model_dir = make_model_dir(os.path.join(work, "jet"), "jet_nemotron", window=a.window)
        data = write_data(os.path.join(work, "train.jsonl"), 64, 4 * a.window - 24)
        for kind in ("lora", "full"):
            for bounded in (True, False):
                for n in a.loops:
                    r = measure(
                        model_dir,
                        data,
                        os.path.join(work, "o"),
                        kind,
                        n,
                        a.window,
                        bounded,
                        a.batch,
                        a.warmup,
                        a.steps,
                    )
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        ring_rows = ring(model_dir, data, work, a)
    for r in rows:
        base = next(
            x
            for x in rows
            if x["loops"] == a.loops[0]
            and (x["fine_tune_type"], x["memory_bounded"])
            == (r["fine_tune_type"], r["memory_bounded"])
        )
        r["throughput_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
    ring_rows[1]["throughput_ratio"] = ring_rows[1]["tokens_per_s"] / ring_rows[0]["tokens_per_s"]
    ring_rows[0]["throughput_ratio"] = 1.0
    meta = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": _blas.status["library"] or _blas.status["reason"],
        "model": "tiny converted Jet-Nemotron (tests/fixtures/jet-nemotron-tiny)",
        "window": a.window,
        "batch_size": a.batch,
        "prompt_tokens": 4 * a.window - 24 + 15,
        "steps": a.steps,
        "warmup": a.warmup,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows, "ring": ring_rows}, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(markdown(meta, rows, ring_rows))
    print(markdown(meta, rows, ring_rows))


def markdown(meta, rows, ring_rows):
    out = [
        f"Fine-tuning throughput and peak memory vs sleep loops N ({meta['machine']}, "
        f"{meta['device']}, mlx {meta['mlx']}; {meta['model']}, L = {meta['window']}, batch "
        f"{meta['batch_size']}, prompts of ~{meta['prompt_tokens']} tokens)",
        "",
        "| fine-tune | memory-bounded | N | tokens/s | s/step | ratio to N=1 | peak MB | "
        "--estimate MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['fine_tune_type']} | {'yes' if r['memory_bounded'] else 'no'} | "
            f"{r['loops']} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.2f} | "
            f"{r['throughput_ratio']:.2f} | {r['peak_memory_mb']:.1f} | "
            f"{r['estimated_peak_mb']:.1f} |"
        )
    out += [
        "",
        "Data parallel, LoRA, N = 2, the same global batch "
        "(`mlx.launch --backend ring`, loopback):",
        "",
        "| processes | tokens/s (all processes) | s/step | ratio to 1 process | peak MB (rank 0) |",
        "|---|---|---|---|---|",
    ]
    for r in ring_rows:
        out.append(
            f"| {r['processes']} | {r['tokens_per_s']:,.0f} | "
            f"{r['seconds_per_step']:.2f} | {r['throughput_ratio']:.2f} | "
            f"{r['peak_memory_mb']:.1f} |"
        )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
