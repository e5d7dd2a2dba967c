"""Benchmark the custom Metal kernels against their ops fallbacks and MLX core / mlx-lm.

    python benchmarks/kernels.py            # writes benchmarks/results/kernels.{json,md}
    python benchmarks/kernels.py --quick    # fewer shapes and repeats
    python benchmarks/kernels.py --only consolidation   # just the sleep-pass recurrence
                                                        # (writes kernels_consolidation.*)

Each variant is timed as a decode or training step is run: build the graph, mx.eval, repeat;
the median wall time is reported with tokens/s (B * T / time) and the effective bandwidth (bytes
of the inputs read plus the outputs written, once, divided by the time: a lower bound of the
traffic, so a memory-bound kernel near the device's bandwidth has little left to gain).
Without Metal (or with MLX_SLEEP_KERNELS=0) only the fallback and MLX rows are measured.

Variants:
  dynamic_conv  kernel (SiLU fused) | kernel, then nn.silu | ops fallback (causal_conv + silu);
                no MLX core or mlx-lm equivalent exists (mlx-lm has no Jet block)
  gdn_step      kernel (one launch) | ops fallback: L2 norms, gates, kernels.gated_delta,
                rms_norm, silu | mlx-lm: the same with mlx_lm's gated_delta_update (its Metal
                kernel) for the recurrence
  consolidation one sleep pass of the GDN recurrence over L = 2000 tokens (--quick: 256), forward
                and forward + backward, ours (kernels.gated_delta) | MLX core
                (mx.fast.gated_delta_update, differentiated by MLX), for the Jet-Nemotron 2B
                shape (12 heads, Dk 96, Dv 256: MLX core has no kernel, it runs a per-token
                ops loop) and a Qwen3.5 shape (16 key / 32 value heads of 128: MLX core's Metal
                kernels). Time, peak memory and the difference from MLX core, with the criteria
                a Mac run must meet printed beside them (docs/kernels.md)
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mlx_sleep  # noqa: F401,E402  (BLAS first)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_sleep import kernels  # noqa: E402
from mlx_sleep.gdn_math import l2_normalize  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timeit(fn, min_time, min_repeats=3):
    mx.eval(fn())  # warm up: builds, self-checks and compiles the kernel
    times = []
    while len(times) < min_repeats or sum(times) < min_time:
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def nbytes(*arrays):
    return sum(a.nbytes for a in arrays)


# ------------------------------------------------------------------------------ cases


def conv_cases(B, T, C, W, dtype):
    key = mx.random.split(mx.random.key(0), 4)
    x = mx.random.normal((B, T, C), key=key[0]).astype(dtype)
    state = mx.random.normal((B, W - 1, C), key=key[1]).astype(dtype)
    kern = (0.5 * mx.random.normal((B, T, C, W), key=key[2])).astype(dtype)
    dy = mx.random.normal((B, T, C), key=key[3]).astype(dtype)
    io = nbytes(x, state, kern) + nbytes(x, state)  # read x, state, kernel; write y, state
    variants = {
        "kernel (SiLU fused)": lambda: kernels.dynamic_conv(x, state, kern, silu=True),
        "kernel + nn.silu": lambda: (nn.silu(kernels.dynamic_conv(x, state, kern)[0]),),
        "ops fallback": lambda: kernels.dynamic_conv_ops(x, state, kern, silu=True),
    }
    yield f"dynamic_conv fwd B={B} T={T} C={C} W={W}", B * T, io, variants
    if T > 1:

        def grad(fn):
            return lambda: mx.vjp(
                lambda a, s, k: fn(a, s, k, silu=True)[0], [x, state, kern], [dy]
            )[1]

        bwd = {
            "kernel fwd+bwd": grad(kernels.dynamic_conv),
            "ops fallback fwd+bwd": grad(kernels.dynamic_conv_ops),
        }
        # forward io, then read x, state, kernel, dy and write their three gradients
        io_bwd = io + nbytes(x, state, kern, dy) + nbytes(x, state, kern)
        yield f"dynamic_conv fwd+bwd B={B} T={T} C={C} W={W}", B * T, io_bwd, bwd


def mlx_lm_step(q, k, v, a, b, A_log, dt_bias, state, gate, weight, eps):
    from mlx_lm.models.gated_delta import gated_delta_update

    q = l2_normalize(q) * q.shape[-1] ** -0.5
    k = l2_normalize(k)
    o, state = gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    return mx.fast.rms_norm(o, weight, eps) * nn.silu(gate), state


def gdn_cases(B, Hk, Hv, Dk, Dv, dtype):
    key = mx.random.split(mx.random.key(1), 8)
    args = (
        mx.random.normal((B, 1, Hk, Dk), key=key[0]).astype(dtype),
        mx.random.normal((B, 1, Hk, Dk), key=key[1]).astype(dtype),
        mx.random.normal((B, 1, Hv, Dv), key=key[2]).astype(dtype),
        mx.random.normal((B, 1, Hv), key=key[3]).astype(dtype),
        mx.random.normal((B, 1, Hv), key=key[4]).astype(dtype),
        mx.log(mx.random.uniform(1, 16, (Hv,), key=key[5])),
        mx.random.uniform(-6, -2, (Hv,), key=key[6]),
        0.1 * mx.random.normal((B, Hv, Dv, Dk), key=key[7]),  # float32 state, as the layer
        mx.random.normal((B, 1, Hv, Dv), key=key[0]).astype(dtype),
        mx.ones((Dv,)),
        1e-6,
    )
    y, _ = kernels.gdn_step_ops(*args)
    io = nbytes(*args[:-1]) + nbytes(y, args[7])
    variants = {
        "kernel (one launch)": lambda: kernels.gdn_step(*args),
        "ops fallback (kernels.gated_delta ops)": lambda: kernels.gdn_step_ops(*args),
    }
    try:
        import mlx_lm.models.gated_delta  # noqa: F401

        variants["mlx-lm gated_delta_update + ops"] = lambda: mlx_lm_step(*args)
    except ImportError:
        pass
    yield f"gdn_step B={B} Hk={Hk} Hv={Hv} Dk={Dk} Dv={Dv}", B, io, variants


# ------------------------------------------------------------------------------ consolidation

CONSOLIDATION_SHAPES = {  # Hk, Hv, Dk, Dv, from the converters' heads (kernels.MODEL_GDN_HEADS)
    "Jet-Nemotron-2B": kernels.MODEL_GDN_HEADS["jet_nemotron"][1:],
    "Qwen3.5 (MLX core kernel shape)": kernels.MODEL_GDN_HEADS["qwen3_5"][1:],
}


def consolidation_inputs(L, Hk, Hv, Dk, Dv, dtype):
    key = mx.random.split(mx.random.key(2), 7)
    q = l2_normalize(mx.random.normal((1, L, Hk, Dk), key=key[0])) * Dk**-0.5
    k = l2_normalize(mx.random.normal((1, L, Hk, Dk), key=key[1]))
    v = mx.random.normal((1, L, Hv, Dv), key=key[2])
    decay = mx.random.uniform(0.9, 1.0, (1, L, Hv), key=key[3])  # float32, as decay_and_beta
    beta = mx.random.uniform(0.0, 1.0, (1, L, Hv), key=key[4])
    state = 0.1 * mx.random.normal((1, Hv, Dv, Dk), key=key[5])
    dy = mx.random.normal((1, L, Hv, Dv), key=key[6]).astype(dtype)
    return [q.astype(dtype), k.astype(dtype), v.astype(dtype), decay, beta, state], dy


def peak_memory(fn):
    mx.eval(fn())  # warm
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - before


def max_rel_diff(a, b):
    return max(
        (
            mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max()
            / mx.maximum(mx.abs(y.astype(mx.float32)).max(), 1e-6)
        ).item()
        for x, y in zip(a, b)
    )


def consolidation(L, dtype, min_time):
    """Rows (ours and MLX core, forward and forward + backward, per shape) and the criteria."""
    ours = kernels.gated_delta
    core = mx.fast.gated_delta_update
    rows, criteria = [], []
    for shape_name, shape in CONSOLIDATION_SHAPES.items():
        args, dy = consolidation_inputs(L, *shape, dtype)

        def fwd(fn):
            return lambda: fn(*args)

        def fwd_bwd(fn):
            return lambda: mx.vjp(lambda *p: fn(*p)[0], args, [dy])[1]

        measured = {}
        for impl, fn in (("ours", ours), ("MLX core", core)):
            for what, run in (("fwd", fwd(fn)), ("fwd+bwd", fwd_bwd(fn))):
                sec = timeit(run, min_time, min_repeats=1)
                mem = peak_memory(run)
                measured[impl, what] = (sec, mem, run())
                rows.append(
                    dict(
                        case=f"consolidation {shape_name} L={L}",
                        variant=f"{impl} {what}",
                        ms=sec * 1e3,
                        tokens_per_s=L / sec,
                        peak_MB=mem / 2**20,
                    )
                )
                print(
                    f"consolidation {shape_name:32s} L={L} {impl:9s} {what:8s} "
                    f"{sec * 1e3:10.1f} ms {mem / 2**20:9.1f} MB peak",
                    flush=True,
                )
        (t_of, _, y_of), (t_cf, _, y_cf) = measured["ours", "fwd"], measured["MLX core", "fwd"]
        (t_ob, m_ob, g_o), (t_cb, m_cb, g_c) = (
            measured["ours", "fwd+bwd"],
            measured["MLX core", "fwd+bwd"],
        )
        diff = max(max_rel_diff(y_of, y_cf), max_rel_diff(g_o, g_c))
        tol = 1e-4 if dtype == mx.float32 else 2e-2
        crit = [
            (
                f"{shape_name}: matches MLX core (max rel diff of y, S and the 6 gradients)",
                f"{diff:.2e}",
                f"<= {tol:g}",
                diff <= tol,
            )
        ]
        if shape_name.startswith("Jet"):  # MLX core runs its ops loop here
            crit.append(
                (
                    f"{shape_name}: fwd+bwd speed-up over the ops loop",
                    f"{t_cb / t_ob:.1f}x",
                    ">= 50x",
                    t_cb / t_ob >= 50,
                )
            )
        else:
            crit += [
                (
                    f"{shape_name}: fwd+bwd speed-up over MLX core",
                    f"{t_cb / t_ob:.2f}x",
                    ">= 3x",
                    t_cb / t_ob >= 3,
                ),
                (
                    f"{shape_name}: fwd+bwd peak memory, MLX core / ours",
                    f"{m_cb / m_ob:.1f}x",
                    ">= 10x",
                    m_cb / m_ob >= 10,
                ),
                (
                    f"{shape_name}: forward time, MLX core / ours",
                    f"{t_cf / t_of:.2f}x",
                    ">= 1x (no slower)",
                    t_cf / t_of >= 1,
                ),
            ]
        criteria += crit
    return rows, criteria


# ------------------------------------------------------------------------------ main


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    p.add_argument(
        "--dtype",
        default=None,
        help="float32 | bfloat16 | float16 (default: bfloat16 with Metal, float32 on the CPU)",
    )
    p.add_argument(
        "--only",
        choices=["kernels", "consolidation"],
        default=None,
        help="run only the per-kernel cases or only the consolidation case",
    )
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="tokens of the consolidation pass (default 2000; --quick: 256)",
    )
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    use_kernels = kernels.enabled()
    dtype = getattr(mx, args.dtype or ("bfloat16" if use_kernels else "float32"))
    min_time = 0.2 if args.quick else 1.0

    # Jet-Nemotron-2B-like value channels; Qwen3-Next-like GDN heads
    cases = [
        *conv_cases(1, 1, 3072, 4, dtype),
        *conv_cases(8, 1, 3072, 4, dtype),
        *conv_cases(1, 512 if args.quick else 2048, 3072, 4, dtype),
        *gdn_cases(1, 16, 32, 128, 128, dtype),
        *gdn_cases(8, 16, 32, 128, 128, dtype),
    ]
    if not args.quick:
        cases += [*conv_cases(4, 512, 3072, 2, dtype), *gdn_cases(32, 16, 32, 128, 128, dtype)]

    rows = []
    if args.only == "consolidation":
        cases = []
    for case, tokens, io, variants in cases:
        for name, fn in variants.items():
            if name.startswith("kernel") and not use_kernels:
                continue  # the dispatcher would run the fallback: nothing new to time
            sec = timeit(fn, min_time)
            rows.append(
                dict(
                    case=case,
                    variant=name,
                    ms=sec * 1e3,
                    tokens_per_s=tokens / sec,
                    GB_per_s=io / sec / 1e9,
                )
            )
            print(
                f"{case:44s} {name:42s} {sec * 1e3:9.3f} ms {tokens / sec:12.0f} tok/s "
                f"{io / sec / 1e9:8.2f} GB/s",
                flush=True,
            )

    criteria, L = [], args.length or (256 if args.quick else 2000)
    if args.only != "kernels":
        consolidation_rows, criteria = consolidation(L, dtype, min_time)
        rows += consolidation_rows
        print("\nCriteria for a Mac run (Metal kernels on):")
        for what, value, want, ok in criteria:
            print(f"  {what:72s} {value:>10s}  want {want:18s} {'met' if ok else 'NOT met'}")

    env = dict(
        mlx=mx.__version__,
        device=str(mx.default_device()),
        metal=mx.metal.is_available(),
        kernels_enabled=use_kernels,
        machine=f"{platform.machine()} {platform.system()} {platform.processor()}".strip(),
        dtype=str(dtype),
        quick=args.quick,
        kernel_status={k.name: k.status for k in kernels.KERNELS.values()},
    )
    if mx.metal.is_available():
        env["gpu"] = mx.metal.device_info().get("device_name", "?")
    os.makedirs(args.out, exist_ok=True)
    crit_rows = [dict(criterion=c, value=v, want=w, met=ok) for c, v, w, ok in criteria]
    stem = "kernels" + (f"_{args.only}" if args.only else "")
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(dict(env=env, rows=rows, criteria=crit_rows), f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(
            "# Kernel benchmark\n\n"
            + ", ".join(f"{k}: {v}" for k, v in env.items() if k != "kernel_status")
            + "\n\n"
        )
        f.write(
            "| case | variant | ms | tokens/s | GB/s | peak MB |\n|---|---|---:|---:|---:|---:|\n"
        )
        for r in rows:
            gbs = f"{r['GB_per_s']:.2f}" if "GB_per_s" in r else ""
            peak = f"{r['peak_MB']:.1f}" if "peak_MB" in r else ""
            f.write(
                f"| {r['case']} | {r['variant']} | {r['ms']:.3f} | {r['tokens_per_s']:.0f} "
                f"| {gbs} | {peak} |\n"
            )
        if crit_rows:
            f.write(
                "\nCriteria a Mac run (Metal kernels on) must meet; on the CPU both sides run "
                "ops, so they only record where the CPU stands:\n\n"
                "| criterion | measured | want | met |\n|---|---:|---|---|\n"
            )
            for c in crit_rows:
                f.write(
                    f"| {c['criterion']} | {c['value']} | {c['want']} | "
                    f"{'yes' if c['met'] else 'no'} |\n"
                )
        status = "; ".join(f"{k}: {v}" for k, v in env["kernel_status"].items())
        f.write(f"\nKernel status: {status}\n")
    print(f"wrote {args.out}/{stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
