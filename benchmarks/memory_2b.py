"""Peak memory of one LoRA fine-tuning step at the full Jet-Nemotron 2B shape (issue 22):
28 blocks (Jet, attention at 14 and 19, SWA at 20-21; the middle 14 looped), hidden 1536, the
151,936-word vocabulary, random weights in bf16 (or quantized to 4 bits as `convert -q` does),
LoRA rank 8 on every layer, batch 1, one GSM-shaped record: a context window of L tokens slept
N passes (hard eviction, or `--eviction sliding`), then a scored answer. `--shape ouro-jet` is
Ouro 1.4B with the paper's 6 inserted Jet layers instead (24 + 6 blocks run 4 times per pass,
all looped: one sleep pass is one Ouro forward, 120 block applications). One step = the
gradient of that record (`summed_loss_and_grads`, the path `mlx-sleep finetune` takes) and an
AdamW update. The peak is
MLX's own count (mx.get_peak_memory: every array, weights included) from just before the step.

On the CPU backend MLX multiplies bf16 matrices about 35x slower than float32 (5 against 174
GFLOP/s on this 2-core x86), which puts one step at the full shape out of reach (hours).
`--f32-matmul` (the default on the CPU) therefore multiplies in float32: each matmul upcasts its
two operands and rounds the product back to the input's dtype (all but the vocabulary head's),
a quantized matmul dequantizes its weight first, and attention takes float32 queries, keys and
values (its bf16 fallback took 5.8 s per Ouro block at L = 2000, float32 1.1 s; rows from before
this have no "f32_attention"). Everything stored stays bf16 (weights, activations, the tape); the
upcast copies are the one thing added, and autograd keeps them for the block being
differentiated, so the peak measured this way is an upper bound on the same step's in bf16
(about one block's weights in float32, ~0.2 GB, on top). On a Mac (Metal) run it with
`--no-f32-matmul`.

    python benchmarks/memory_2b.py --loops 6 --length 2000              # ~40 min on 2 cores
    python benchmarks/memory_2b.py --loops 6 --length 2000 --quantize   # the 4-bit base
    python benchmarks/memory_2b.py --length 128 --loops 2 --blocks 4    # a quick check
    python benchmarks/memory_2b.py --shape ouro-jet --loops 4 --length 512 --eviction sliding
    python benchmarks/memory_2b.py --shape ouro-jet --loops 4 --length 2000 --progress  # ~65 min

Appends one JSON line per run to benchmarks/results/memory_2b.jsonl and rewrites
benchmarks/results/memory_2b.md from all of them.
"""

import argparse
import gc
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mlx_sleep import HybridLM, ModelConfig, SleepConfig  # noqa: E402
from mlx_sleep.models.ouro import Model as OuroModel  # noqa: E402
from mlx_sleep.models.ouro import OuroConfig  # noqa: E402
from mlx_sleep.convert.common import quantize  # noqa: E402
from mlx_sleep.finetune import FinetuneConfig  # noqa: E402
from mlx_sleep.finetune.adapters import prepare_model  # noqa: E402
from mlx_sleep.finetune.run import summed_loss_and_grads  # noqa: E402
from mlx_sleep.io import read_jsonl, write_text  # noqa: E402
from mlx_sleep.report import markdown_table  # noqa: E402
from mlx_sleep import sleep as sleep_module  # noqa: E402
from mlx_sleep.sleep import plan_chunks  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "memory_2b.jsonl")
# The vocabulary head (151,936 x 1536) stays in bf16: its float32 copy would add 0.9 GB to the
# peak, and it multiplies only the answer's positions. Every block matrix is far below this.
BIGGEST_UPCAST = 2**26


def jet_2b_config(blocks: int = 28) -> ModelConfig:
    """Jet-Nemotron 2B as the converter builds it (docs/finetune.md); `blocks` < 28 keeps the
    prelude/core/coda proportions (a quick check of this script, not the measurement)."""
    layers = ["jet"] * 28
    layers[14] = layers[19] = "attn"
    layers[20] = layers[21] = "swa"
    if blocks != 28:
        keep = sorted({round(i * 27 / (blocks - 1)) for i in range(blocks)})
        layers = [layers[i] for i in keep]
    n = len(layers)
    return ModelConfig(
        vocab_size=151936,
        hidden_size=1536,
        layers=",".join(layers),
        intermediate_size=8960,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        attention_bias=True,
        rope_theta=1e6,
        swa_window=1152,
        gdn_k_heads=12,
        gdn_v_heads=12,
        gdn_head_k_dim=96,
        gdn_head_v_dim=192,
        gdn_norm_eps=1e-5,
        core=(n // 4, n - n // 4),
        tie_embeddings=True,
    )


def ouro_jet_config() -> OuroConfig:
    """Ouro 1.4B (ByteDance/Ouro-1.4B's config.json) with the paper's 6 Jet layers inserted
    where `convert --insert-jet-layers 6` puts them (after blocks 3, 7, ..., 23)."""
    return OuroConfig(
        vocab_size=49152,
        hidden_size=2048,
        num_layers=24,
        num_heads=16,
        intermediate_size=5632,
        rope_theta=1e6,
        total_ut_steps=4,
        jet_after=[3, 7, 11, 15, 19, 23],
    )


def build(shape: str, blocks: int = 28):
    return OuroModel(ouro_jet_config()) if shape == "ouro-jet" else HybridLM(jet_2b_config(blocks))


def multiply_in_float32():
    """bf16/fp16 matmuls computed in float32, results rounded back (see the module docstring)."""
    low = (mx.bfloat16, mx.float16)
    matmul, addmm, qmm = mx.matmul, mx.addmm, mx.quantized_matmul
    array_matmul = mx.array.__matmul__

    def up(*xs):
        return [x.astype(mx.float32) for x in xs]

    def mm(a, b, _f=matmul):
        if (a.dtype in low or b.dtype in low) and max(a.size, b.size) <= BIGGEST_UPCAST:
            return _f(*up(a, b)).astype(a.dtype if a.dtype in low else b.dtype)
        return _f(a, b)

    def am(c, a, b, *args, **kw):
        if (a.dtype in low or b.dtype in low) and max(a.size, b.size) <= BIGGEST_UPCAST:
            return addmm(*up(c, a, b), *args, **kw).astype(a.dtype if a.dtype in low else b.dtype)
        return addmm(c, a, b, *args, **kw)

    def qm(x, w, scales, biases=None, transpose=True, group_size=None, bits=None, **kw):
        if w.size * 32 // (bits or 4) > BIGGEST_UPCAST:
            return qmm(x, w, scales, biases, transpose, group_size, bits, **kw)
        dense = mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, **kw)
        dense = dense.astype(mx.float32)
        y = matmul(x.astype(mx.float32), dense.T if transpose else dense)
        return y.astype(x.dtype)

    def attend(q, k, v, *args, _f=mx.fast.scaled_dot_product_attention, **kw):
        if q.dtype in low:
            return _f(*up(q, k, v), *args, **kw).astype(q.dtype)
        return _f(q, k, v, *args, **kw)

    mx.matmul, mx.addmm, mx.quantized_matmul = mm, am, qm
    mx.array.__matmul__ = lambda a, b: mm(a, b, _f=array_matmul)
    mx.fast.scaled_dot_product_attention = attend


def log_progress(every: int = 20):
    """A line on stderr every `every` steps the tape records (block applications, and the
    embedding, head and evictions between them) and every `every` it differentiates: elapsed
    minutes and MLX's peak so far. One Ouro step at L = 2000 takes an hour on 2 cores; its peak
    is reached as the window's forward ends."""
    t0, counts = time.perf_counter(), {"forward": 0, "backward": 0}

    def tick(phase):
        counts[phase] += 1
        if counts[phase] % every == 0:
            print(
                f"{phase} step {counts[phase]}: {(time.perf_counter() - t0) / 60:.1f} min, "
                f"peak so far {mx.get_peak_memory() / 1e9:.2f} GB",
                file=sys.stderr,
                flush=True,
            )

    step, vjp = sleep_module._Tape.step, mx.vjp

    def counted_step(self, fn, *args):
        out = step(self, fn, *args)
        tick("forward")
        return out

    def counted_vjp(*args, **kw):
        out = vjp(*args, **kw)
        tick("backward")
        return out

    sleep_module._Tape.step, mx.vjp = counted_step, counted_vjp


def measure(a) -> dict:
    mx.random.seed(0)
    model = build(a.shape, a.blocks)
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    if a.quantize:
        quantize(model, {}, 4, 64, model.keep_unquantized)
        mx.eval(model.parameters())
    prepare_model(model, FinetuneConfig(batch_size=1, rank=8))
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

    rng = np.random.default_rng(0)
    T = a.length + a.answer
    inputs = rng.integers(0, model.config.vocab_size, (1, T)).astype(np.int32)
    mask = np.zeros((1, T), np.float32)
    mask[:, a.length :] = 1
    sleep = SleepConfig(loops=a.loops, window=a.length, eviction=a.eviction)
    plan = plan_chunks(mask, a.length)
    optimizer = optim.AdamW(1e-4)

    active = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    loss, n, grads = summed_loss_and_grads(model, inputs, inputs, mask, sleep, plan, a.memory_bound)
    mx.eval(loss, grads)
    optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    seconds = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    return {
        "shape": a.shape
        if a.shape == "ouro-jet" or a.blocks == 28
        else f"{a.shape}, {a.blocks} blocks",
        "base": "4-bit" if a.quantize else "bf16",
        "fine_tune": "lora rank 8",
        "L": a.length,
        "N": a.loops,
        "answer": a.answer,
        "eviction": a.eviction,
        "batch": 1,
        "memory_bound": a.memory_bound,
        "f32_matmul": a.f32_matmul,
        "f32_attention": a.f32_matmul,
        "parameters": int(sum(v.size for _, v in tree_flatten(model.parameters()))),
        "trainable": int(trainable),
        "weights_gb": weights / 1e9,
        "before_step_gb": active / 1e9,
        "peak_gb": peak / 1e9,
        "loss": float(loss) / max(float(n), 1.0),
        "seconds": seconds,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {mx.default_device()}",
        "mlx": mx.__version__,
        "command": " ".join(["python benchmarks/memory_2b.py"] + sys.argv[1:]),
    }


def report(rows) -> str:
    table = markdown_table(
        [
            "shape",
            "base",
            "eviction",
            "L",
            "N",
            "bound",
            "weights GB",
            "peak GB",
            "minutes",
            "command",
        ],
        [
            [
                r["shape"],
                r["base"],
                r.get("eviction", "hard"),
                r["L"],
                r["N"],
                r["memory_bound"],
                f"{r['weights_gb']:.2f}",
                f"{r['peak_gb']:.2f}",
                f"{r['seconds'] / 60:.1f}",
                f"`{r['command']}`",
            ]
            for r in rows
        ],
    )
    return (
        "# One LoRA fine-tuning step at the paper's model shapes: measured peak memory\n\n"
        "Jet-Nemotron 2B, or Ouro 1.4B with 6 inserted Jet layers (`--shape ouro-jet`). "
        "Random weights, LoRA rank 8, batch 1, one record of a context window of L tokens slept N "
        "passes and a 100-token scored answer; gradient + AdamW update. Peak = "
        "MLX's count of every live array (weights included) during the step, on this machine's "
        "CPU backend with float32 matmuls (an upper bound on the bf16 step: see "
        "benchmarks/memory_2b.py).\n\n" + table + "\n"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["jet-nemotron-2b", "ouro-jet"], default="jet-nemotron-2b")
    p.add_argument("--eviction", choices=["hard", "sliding"], default="hard")
    p.add_argument("--length", type=int, default=2000, help="L: the context window")
    p.add_argument("--loops", type=int, default=6, help="N: sleep passes")
    p.add_argument("--answer", type=int, default=100, help="scored answer tokens")
    p.add_argument("--blocks", type=int, default=28, help="fewer: a quick check only")
    p.add_argument("--quantize", action="store_true", help="a 4-bit base (group 64)")
    p.add_argument("--memory-bound", choices=["block", "chunk", "none"], default="block")
    p.add_argument(
        "--f32-matmul",
        action=argparse.BooleanOptionalAction,
        default=mx.default_device() == mx.cpu,
        help="multiply bf16 in float32 (the CPU's bf16 matmul is ~35x slower)",
    )
    p.add_argument("--progress", action="store_true", help="log the tape's progress to stderr")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args()
    if a.f32_matmul:
        multiply_in_float32()
    if a.progress:
        log_progress()
    row = measure(a)
    print(json.dumps(row), flush=True)
    rows = [r for _, r in read_jsonl(a.out)] if os.path.exists(a.out) else []
    rows.append(row)
    write_text(a.out, "".join(json.dumps(r) + "\n" for r in rows))  # io.py's atomic write
    write_text(a.out.replace(".jsonl", ".md"), report(rows))


if __name__ == "__main__":
    main()
