"""GSM-Infinite evaluation throughput (problems per minute) against sleep loops N and window L.

The paper protocol on real "8k" medium problems (tests/fixtures/gsm-infinite/medium_8k.jsonl,
~3-4.5k Llama-3 tokens; ~15-20k tokens under the tiny byte-level tokenizer used here) with a tiny
random hybrid model, through the real runner (gsm_infinite.evaluate: generation, scoring,
predictions file). Each prompt window is fed (a wake pass) and consolidated: prelude and coda
blocks once, core blocks N times. At N = 1 the wake pass is the sleep; at N > 1 the sleep starts
again from the window's start state, and the wake pass's outputs (logits and state) are never
used, so MLX never computes them. The predicted time ratio to N = 1 is then the block passes per
prompt token, (B - C + N C) / B for B blocks of which C are looped (generation, 24 tokens at
most, is negligible next to ~19k prompt tokens). Each setting runs `--repeats` times (the
fastest counts: the machine may be shared).

    python benchmarks/gsm_infinite_throughput.py             # 2 problems, N 1 2 4, L 256 2048
    python benchmarks/gsm_infinite_throughput.py --quick     # 1 problem, N 1 2, L 512

Writes benchmarks/results/gsm_infinite_throughput.{json,md}.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mlx_sleep  # noqa: E402  (BLAS first)
import mlx.core as mx  # noqa: E402

from mlx_sleep import _blas, gsm_infinite as gi  # noqa: E402
from tests.tiny_models import make_model_dir  # noqa: E402

DATA = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "gsm-infinite", "medium_8k.jsonl")


def measure(model, tokenizer, by_op, loops, window, workdir, repeats=1):
    times = []
    for r in range(repeats):
        out = os.path.join(workdir, f"N{loops}-L{window}-{r}")
        t0 = time.perf_counter()
        gi.run_sweep(
            model,
            tokenizer,
            by_op,
            out,
            loops=[loops],
            window=window,
            eviction="hard",
            protocol="paper",
            settings={"subset": "medium", "length": "8k"},
            progress=False,
            echo=lambda *_: None,
        )
        times.append(time.perf_counter() - t0)
    seconds = min(times)
    problems = sum(len(r) for r in by_op.values())
    tokens = sum(
        len(tokenizer.encode(gi.paper_example(r)["prompt"])) for rs in by_op.values() for r in rs
    )
    return {
        "loops": loops,
        "window": window,
        "problems": problems,
        "prompt_tokens": tokens,
        "seconds": seconds,
        "all_seconds": times,
        "problems_per_minute": 60 * problems / seconds,
        "prompt_tokens_per_s": tokens / seconds,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--loops", type=int, nargs="+", default=None)
    p.add_argument("--windows", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "gsm_infinite_throughput"))
    a = p.parse_args()
    loops = a.loops or ([1, 2] if a.quick else [1, 2, 4])
    windows = a.windows or ([512] if a.quick else [256, 2048])
    records = gi.read_problems(DATA)
    by_op = gi.select(records, [2] if a.quick else [2, 8], 1)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        model, tokenizer = mlx_sleep.load(make_model_dir(os.path.join(work, "m"), "hybrid"))
        measure(model, tokenizer, {2: by_op[2][:1]}, 1, windows[0], work)  # warm-up
        for window in windows:
            for n in loops:
                r = measure(model, tokenizer, by_op, n, window, work, a.repeats)
                rows.append(r)
                print(json.dumps(r), flush=True)
    blocks, core = len(model.layers), model.core[1] - model.core[0]

    def passes(n):  # block passes per prompt token (at N > 1 the wake pass is never computed)
        return blocks - core + n * core

    for r in rows:
        base = next(x for x in rows if x["window"] == r["window"] and x["loops"] == loops[0])
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["predicted_ratio"] = passes(r["loops"]) / passes(loops[0])
    meta = {
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "blas": _blas.status["library"] or _blas.status["reason"],
        "model": model.config.to_dict(),
        "data": os.path.basename(DATA),
        "protocol": "paper",
        "max_tokens": gi.PAPER_MAX_TOKENS,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [
        f"GSM-Infinite evaluation throughput, paper protocol ({meta['machine']}, "
        f"{meta['device']}, mlx {meta['mlx']}; tiny hybrid {model.config.layers}, width "
        f"{model.config.hidden_size}, blocks {model.core[0]}..{model.core[1] - 1} looped; "
        f"{rows[0]['problems']} medium 8k problems, fastest of {a.repeats} runs, "
        f"{rows[0]['prompt_tokens']:,} prompt tokens in all, byte-level tokenizer)",
        "",
        "| L | N | problems/min | prompt tokens/s | time ratio to N=1 | predicted (block passes) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['window']} | {r['loops']} | {r['problems_per_minute']:.1f} | "
            f"{r['prompt_tokens_per_s']:,.0f} | {r['time_ratio']:.2f} | "
            f"{r['predicted_ratio']:.2f} |"
        )
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
