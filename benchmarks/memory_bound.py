"""What the block-by-block backward (--memory-bound block) costs and saves against the chunkwise
one (--memory-bound chunk), the default of `mlx-sleep finetune`.

(a) Time: seconds per micro-batch (forward + backward, `summed_loss_and_grads`) on the tiny
    converted models of the tests (Jet-Nemotron, Ouro with 2 Jet layers, Qwen3.5 under the
    mlx-lm adapter), LoRA and full, N = 4, L = 32, batch 4, records of ~100-170 tokens (4-6
    chunks). The two paths alternate, the fastest of the repeats is kept (on a shared machine
    others' work only adds time).
(b) Memory: the peak above the weights (mx.get_peak_memory) of one micro-batch's gradient on a
    wider from-scratch hybrid (gdn,attn,gdn,jet,gdn,attn, prelude and coda of one block each,
    LoRA rank 8 on every layer), one context window of L tokens slept N passes then a 64-token
    answer, where one chunk's activations (all N passes of all blocks) dominate.

    python benchmarks/memory_bound.py --part a   # (a), ~4 minutes on 2 cores
    python benchmarks/memory_bound.py --part b   # (b), ~4 minutes; the other part's rows stay
    python benchmarks/memory_bound.py --quick    # both, small

Writes benchmarks/results/memory_bound.{json,md}.
"""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_sleep import HybridLM, ModelConfig, SleepConfig  # noqa: E402
from mlx_sleep.finetune import Finetune, FinetuneConfig  # noqa: E402
from mlx_sleep.finetune.adapters import prepare_model  # noqa: E402
from mlx_sleep.finetune.data import batch_indices, make_batch  # noqa: E402
from mlx_sleep.finetune.run import summed_loss_and_grads  # noqa: E402
from mlx_sleep.report import markdown_table  # noqa: E402
from mlx_sleep.sleep import plan_chunks  # noqa: E402
from row_plans import write_records  # noqa: E402  (this script's directory: benchmarks/)
from tests.tiny_models import make_model_dir  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BOUNDS = ("chunk", "block")


def one_step(model, batch, sleep, bound):
    inputs, targets, mask = batch
    plan = plan_chunks(mask, sleep.window)
    mx.eval(summed_loss_and_grads(model, inputs, targets, mask, sleep, plan, bound))


def peak_above_weights(fn):
    """(peak bytes above what was live before, seconds) of fn()."""
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    fn()
    return mx.get_peak_memory() - base, time.perf_counter() - t0


def time_rows(a, work):
    """(a): seconds per micro-batch, chunk and block, on the tiny converted models."""
    data = write_records(os.path.join(work, "d.jsonl"), 32, 80, 150)
    rows = []
    for kind in ("jet_nemotron", "ouro_jet", "qwen3_5"):
        model_dir = make_model_dir(os.path.join(work, kind), kind)
        for fine_tune_type in ("lora", "full"):
            ft = Finetune(
                model_dir,
                data,
                os.path.join(work, f"run-{kind}-{fine_tune_type}"),
                FinetuneConfig(steps=1, batch_size=a.batch, fine_tune_type=fine_tune_type),
                sleep={"loops": a.loops, "window": a.window},
                progress=False,
                dry_run=True,
            )
            batches = []
            for b in range(a.batches):
                picked = batch_indices(0, len(ft.train_examples), b * a.batch, a.batch)
                batches.append(make_batch([ft.train_examples[i] for i in picked], ft.pad_id))
            seconds = {bound: [] for bound in BOUNDS}
            for bound in BOUNDS:  # warm-up
                one_step(ft.model, batches[0], ft.sleep, bound)
            for _ in range(a.repeats):
                for bound in BOUNDS:  # alternate, so a slow spell of the machine hits both
                    t0 = time.perf_counter()
                    for batch in batches:
                        one_step(ft.model, batch, ft.sleep, bound)
                    seconds[bound].append((time.perf_counter() - t0) / len(batches))
            # the fastest repeat: the machine may be shared, and others' work only adds time
            fastest = {bound: min(s) for bound, s in seconds.items()}
            peak = {
                bound: peak_above_weights(
                    lambda bound=bound: one_step(ft.model, batches[0], ft.sleep, bound)
                )[0]
                for bound in BOUNDS
            }
            rows.append(
                {
                    "model": kind,
                    "fine_tune_type": fine_tune_type,
                    "tokens_per_row": int(np.mean([b[0].shape[1] for b in batches])),
                    "seconds_chunk": fastest["chunk"],
                    "seconds_block": fastest["block"],
                    "time_ratio": fastest["block"] / fastest["chunk"],
                    "peak_mb_chunk": peak["chunk"] / 2**20,
                    "peak_mb_block": peak["block"] / 2**20,
                }
            )
            print(rows[-1], flush=True)
    return rows


def memory_rows(a):
    """(b): peak memory and seconds of one micro-batch at a wider shape, for each N."""
    rows = []
    mx.random.seed(0)
    layers = "gdn,attn,gdn,jet,gdn,attn"
    config = ModelConfig(
        vocab_size=512,
        hidden_size=a.width,
        layers=layers,
        num_heads=a.width // 64,
        core=(1, 5),
    )
    model = prepare_model(HybridLM(config), FinetuneConfig(rank=8))
    mx.eval(model.parameters())
    T = a.length + 64
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 512, (a.rows, T)).astype(np.int32)
    mask = np.zeros((a.rows, T), np.float32)
    mask[:, a.length :] = 1
    for loops in (int(n) for n in a.big_loops.split(",")):
        sleep = SleepConfig(loops=loops, window=a.length)
        result = {}
        for bound in BOUNDS:
            t0 = time.perf_counter()
            one_step(model, (inputs, inputs, mask), sleep, bound)  # warm-up
            warm_up = time.perf_counter() - t0
            peak, seconds = peak_above_weights(
                lambda bound=bound: one_step(model, (inputs, inputs, mask), sleep, bound)
            )
            result[bound] = peak, min(seconds, warm_up)  # the faster of the two runs
        rows.append(
            {
                "width": a.width,
                "blocks": len(layers.split(",")),
                "core": "1:5",
                "L": a.length,
                "N": loops,
                "rows": a.rows,
                "peak_mb_chunk": result["chunk"][0] / 2**20,
                "peak_mb_block": result["block"][0] / 2**20,
                "memory_ratio": result["block"][0] / result["chunk"][0],
                "seconds_chunk": result["chunk"][1],
                "seconds_block": result["block"][1],
                "time_ratio": result["block"][1] / result["chunk"][1],
            }
        )
        print(rows[-1], flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--loops", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--big-loops", default="4,6")
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "memory_bound"))
    a = p.parse_args()
    if a.quick:
        a.batches, a.repeats, a.width, a.length, a.big_loops = 1, 1, 256, 128, "4"
    # One part at a time keeps the other part's rows from the last run (each takes minutes).
    saved = {}
    if a.part != "both" and os.path.exists(a.out + ".json"):
        with open(a.out + ".json") as f:
            saved = json.load(f)
    meta = {
        **saved.get("meta", {}),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {mx.default_device()}",
        "mlx": mx.__version__,
    }
    timed, wide = saved.get("time", []), saved.get("memory", [])
    command = " ".join(["python benchmarks/memory_bound.py"] + sys.argv[1:])
    if a.part in ("a", "both"):
        with tempfile.TemporaryDirectory() as work:
            timed = time_rows(a, work)
        meta["(a)"] = (
            f"tiny converted models, N = {a.loops}, L = {a.window}, batch {a.batch}, "
            f"{a.batches} batches, fastest of {a.repeats}: `{command}`"
        )
    if a.part in ("b", "both"):
        wide = memory_rows(a)
        meta["(b)"] = (
            f"HybridLM width {a.width}, LoRA rank 8, {a.rows} row(s) of one context window of "
            f"L tokens then a 64-token answer: `{command}`"
        )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "time": timed, "memory": wide}, f, indent=2)
    time_table = markdown_table(
        [
            "model",
            "fine-tune",
            "tokens/row",
            "s chunk",
            "s block",
            "block / chunk",
            "peak MB c / b",
        ],
        [
            [
                r["model"],
                r["fine_tune_type"],
                r["tokens_per_row"],
                f"{r['seconds_chunk']:.3f}",
                f"{r['seconds_block']:.3f}",
                f"{r['time_ratio']:.2f}",
                f"{r['peak_mb_chunk']:.1f} / {r['peak_mb_block']:.1f}",
            ]
            for r in timed
        ],
    )
    memory_table = markdown_table(
        ["width", "blocks", "L", "N", "peak MB chunk", "peak MB block", "ratio", "s c / b"],
        [
            [
                r["width"],
                r["blocks"],
                r["L"],
                r["N"],
                f"{r['peak_mb_chunk']:.0f}",
                f"{r['peak_mb_block']:.0f}",
                f"{r['memory_ratio']:.2f}",
                f"{r['seconds_chunk']:.1f} / {r['seconds_block']:.1f}",
            ]
            for r in wide
        ],
    )
    with open(a.out + ".md", "w") as f:
        f.write("# --memory-bound block vs chunk\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in meta.items()))
        f.write("\n\n(a) Seconds per micro-batch on the tiny models\n\n" + time_table)
        f.write("\n\n(b) Peak memory above the weights, one micro-batch\n\n" + memory_table + "\n")
    print(time_table)
    print(memory_table)


if __name__ == "__main__":
    main()
