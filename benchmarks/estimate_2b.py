"""What fits which Mac: `finetune --estimate` at the full Jet-Nemotron 2B shape (issue 22).

The model of benchmarks/memory_2b.py (28 blocks, random weights, bf16 or 4-bit, LoRA rank 8,
batch 1), a GSM-Infinite-shaped record (three windows of prompt, a 100-token scored answer),
hard eviction. `estimate_step` probes the model on short chunks (64-256 tokens; 1 and 2 passes)
and extrapolates in L and N; one set of probes gives every cell of the table. The probes are
printed as JSON lines, and `--probes FILE` recomputes the table from them in seconds.
benchmarks/memory_2b.py measures one of the cells (L = 2000, N = 6) whole, which checks the
extrapolation; docs/finetune.md quotes both.

    python benchmarks/estimate_2b.py > benchmarks/results/estimate_2b_bf16.jsonl
    python benchmarks/estimate_2b.py --quantize > benchmarks/results/estimate_2b_q4.jsonl
    python benchmarks/estimate_2b.py --shape ouro-jet > benchmarks/results/estimate_ouro_jet_bf16.jsonl
    python benchmarks/estimate_2b.py --probes benchmarks/results/estimate_2b_bf16.jsonl
    python benchmarks/estimate_2b.py --table    # the markdown table from the three files

(25-40 minutes per base on 2 shared CPU cores, with memory_2b.py's float32 matmuls.)
"""

import argparse
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import mlx_sleep  # noqa: E402,F401  (BLAS first)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from memory_2b import build, multiply_in_float32  # noqa: E402
from mlx_sleep import SleepConfig  # noqa: E402
from mlx_sleep.convert.common import quantize  # noqa: E402
from mlx_sleep.finetune import FinetuneConfig, estimate_step  # noqa: E402
from mlx_sleep.finetune import estimate as F  # noqa: E402
from mlx_sleep.finetune.adapters import prepare_model  # noqa: E402
from mlx_sleep.io import read_jsonl, write_text  # noqa: E402
from mlx_sleep.loop import World  # noqa: E402
from mlx_sleep.report import markdown_table  # noqa: E402

LENGTHS = (512, 1000, 2000, 3300)
LOOPS = (1, 2, 4, 6)
MACS = (8, 16, 24, 32)
# macOS lets the GPU wire about three quarters of the memory (the recommended working set is
# ~0.67-0.75 of RAM, the rest is the system's): a run fits a Mac when its peak is below that
USABLE = 0.75
RESULTS = {  # the table's columns
    "Jet-Nemotron 2B, bf16": os.path.join(HERE, "results", "estimate_2b_bf16.jsonl"),
    "Jet-Nemotron 2B, 4-bit": os.path.join(HERE, "results", "estimate_2b_q4.jsonl"),
    "Ouro 1.4B + 6 Jet, bf16": os.path.join(HERE, "results", "estimate_ouro_jet_bf16.jsonl"),
}


def estimates(a):
    mx.random.seed(0)
    model = build(a.shape, a.blocks)
    model.set_dtype(mx.bfloat16)
    if a.quantize:
        quantize(model, {}, 4, 64, model.keep_unquantized)
    cfg = FinetuneConfig(batch_size=1, rank=8, memory_bound=a.memory_bound)
    prepare_model(model, cfg)
    mx.eval(model.parameters())
    sleep = None
    ft = types.SimpleNamespace(model=model, cfg=cfg, sleep_at=lambda s: sleep, world=World())
    cache, probe = {}, F._probe
    if a.probes:  # the probes an earlier run printed
        for _, r in read_jsonl(a.probes):
            if "probe" in r:
                cache[tuple(r["probe"])] = (r["peak_bytes"], r["seconds"])

    def memo(model, s, batch, length, passes, scored, mb):
        key = (batch, length, passes, scored, mb)
        if key not in cache:
            cache[key] = probe(model, s, batch, length, passes, scored, mb)
            print(
                json.dumps({"probe": key, "peak_bytes": cache[key][0], "seconds": cache[key][1]}),
                flush=True,
            )
        return cache[key]

    F._probe = memo
    for L in LENGTHS:
        scored = np.zeros(3 * L + 101, bool)
        scored[-100:] = True
        ft.train_examples = [(np.zeros(3 * L + 101, np.int32), scored)]
        for n in LOOPS:
            sleep = SleepConfig(loops=n, window=L, eviction="hard")
            e = estimate_step(ft)
            row = {
                "shape": a.shape,
                "base": "q4" if a.quantize else "bf16",
                "memory_bound": a.memory_bound,
                "L": L,
                "N": n,
                **e["parts"],
                "peak": e["peak_bytes"],
            }  # not the time: probes timed on a shared machine (or resumed) do not scale
            print(json.dumps(row), flush=True)


def smallest_mac(peak: float) -> str:
    fits = [m for m in MACS if peak <= USABLE * m * 1e9]
    return f"{fits[0]} GB" if fits else f"> {MACS[-1]} GB"


def table() -> str:
    rows = {}
    for base, path in RESULTS.items():
        for _, r in read_jsonl(path) if os.path.exists(path) else ():
            if "L" in r:
                rows[(r["L"], r["N"], base)] = r["peak"]
    cells = [
        [L, n]
        + [
            f"{rows[(L, n, b)] / 1e9:.1f} GB: {smallest_mac(rows[(L, n, b)])}"
            if (L, n, b) in rows
            else "-"
            for b in RESULTS
        ]
        for L in LENGTHS
        for n in LOOPS
    ]
    return markdown_table(["L", "N", *RESULTS], cells)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantize", action="store_true", help="a 4-bit base (group 64)")
    p.add_argument("--memory-bound", choices=["block", "chunk"], default="block")
    p.add_argument("--blocks", type=int, default=28, help="fewer: a quick check only")
    p.add_argument(
        "--shape",
        choices=["jet-nemotron-2b", "ouro-jet"],
        default="jet-nemotron-2b",
        help="ouro-jet: Ouro 1.4B + 6 Jet layers (memory_2b.py)",
    )
    p.add_argument("--probes", help="a file of probes printed by an earlier run")
    p.add_argument("--table", action="store_true", help="print the markdown table and exit")
    p.add_argument("--f32-matmul", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    if a.table:
        out = table()
        write_text(os.path.join(HERE, "results", "estimate_2b.md"), out)
        print(out)
        return
    if a.f32_matmul and mx.default_device() == mx.cpu:
        multiply_in_float32()
    estimates(a)


if __name__ == "__main__":
    main()
