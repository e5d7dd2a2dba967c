"""`mlx-sleep finetune --estimate`: expected peak memory and time per step, from probes."""

import math
import time
from dataclasses import replace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..config import SleepConfig, machine_memory
from .run import Finetune, summed_loss_and_grads


def _probe(
    model,
    sleep: SleepConfig,
    batch: int,
    length: int,
    passes: int,
    scored: int,
    memory_bound: str,
):
    """(peak bytes above what was live, seconds) of one chunk's gradient at this size: an
    answer chunk (one pass) whose last `scored` positions are scored (only they reach the head),
    or, with scored = 0, a context chunk of `passes` passes followed by one scored token."""
    import gc

    rng = np.random.default_rng(0)
    T = length if scored else length + 1
    inputs = rng.integers(0, model.vocab_size, size=(batch, T)).astype(np.int32)
    mask = np.zeros((batch, T), np.float32)
    if scored:
        mask[:, -min(scored, length) :] = 1
        plan = ([(0, length)], [True])
    else:
        mask[:, -1] = 1
        plan = ([(0, length), (length, length + 1)], [False, True])
    probe_sleep = replace(sleep, loops=passes)
    peak, seconds = float("inf"), float("inf")
    for _ in range(2):  # the first run pays one-time costs: keep the second (the smaller)
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        out = summed_loss_and_grads(
            model, inputs, inputs, mask, [(probe_sleep, 1.0)], plan, memory_bound
        )
        mx.eval(out)
        seconds = min(seconds, time.perf_counter() - t0)
        peak = min(peak, mx.get_peak_memory() - base)
        del out
    return peak, seconds


def _fit_with_intercept(ts, rs):
    """c, a, b with c + a t + b t^2 through three probes (a, b >= 0; linear through the two
    longest if the curve bends down)."""
    if len(set(ts)) < 3:
        return max(rs[0], 0), max(rs[-1] - rs[0], 0) / max(ts[-1] - ts[0], 1), 0.0
    b, a, _ = np.polyfit(ts, rs, 2)
    if b < 0:
        b, (a, _) = 0.0, np.polyfit(ts[1:], rs[1:], 1)
    a = max(a, 0.0)
    return max(float(rs[-1] - a * ts[-1] - b * ts[-1] ** 2), 0.0), float(a), float(b)


def estimate_step(ft: Finetune) -> dict:
    """Expected peak memory (bytes) and seconds per optimizer step of this run on this machine.

    weights + optimizer state (AdamW: 2 per trainable weight, Muon: 1) + accumulated gradients
    + the chunk-boundary states the memory-bounded backward keeps (one per chunk) + one chunk's
    activations across its N passes. The activations and the time are measured on short probe
    chunks (up to 256 tokens, at the run's batch) and extrapolated in length (linear +
    quadratic) and passes, so a 2B model is probed without running a full step."""
    model, cfg, sleep = ft.model, ft.cfg, ft.sleep_at(ft.cfg.steps - 1)
    B, L, N = cfg.batch_size // ft.world.size, sleep.window, sleep.loops
    lengths = np.array([len(ids) - 1 for ids, _ in ft.train_examples])
    T_max, T_mean = int(lengths.max()), float(lengths.mean())
    n_chunks = math.ceil(T_max / L)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    train_bytes = sum(v.nbytes for v in trainable.values())
    matrices = model.matrix_weights() if cfg.fine_tune_type == "full" else set()
    optimizer = sum(v.nbytes * (1 if k in matrices else 2) for k, v in trainable.items())
    accumulated = train_bytes if cfg.grad_accum > 1 else 0

    # One chunk's state after eviction: fixed part (fast weights, conv) + KV kept per token.
    t2 = min(L, 256)
    t1 = max(1, t2 // 2)
    from ..sleep import evict, run_chunk

    ids = mx.zeros((1, t2), dtype=mx.int32)
    _, state = run_chunk(model, ids, model.initial_state(1), 0, 1, sleep.attention_window)
    state = evict(model, state, sleep.keep_after_eviction)
    kv = sum(a.nbytes for s in state for k, a in s.items() if k in ("keys", "values"))
    fixed = sum(a.nbytes for s in state for k, a in s.items() if k not in ("keys", "values"))
    kept = min(sleep.keep_after_eviction, t2)
    per_state = B * (fixed + (kv / kept * sleep.keep_after_eviction if kept else 0))
    boundary = n_chunks * per_state if cfg.memory_bound != "none" else 0
    del state

    # Probes at the run's own batch: a peak is the larger of what grows with the tokens
    # (activations) and what does not (gradients, temporaries), so a peak measured at another
    # batch does not scale to this one. Each part is fitted as fixed + a t + b t^2 (attention's
    # scores grow as t^2) through probes at three lengths, then read at L.
    mb = cfg.memory_bound
    ts = (max(1, t2 // 4), t1, t2)
    ctx = [_probe(model, sleep, B, t, 1, 0, mb) for t in ts]
    m_two, s_two = _probe(model, sleep, B, t2, 2, 0, mb)
    # an answer chunk scores the answer's tokens (all of a {"text"} record's): head width S,
    # capped at each probe's length by _probe
    S = min(L, max(int(scored[1:].sum()) for _, scored in ft.train_examples))
    ans = [_probe(model, sleep, B, t, 1, S, mb)[0] for t in ts]
    c_fixed, ca, cb = _fit_with_intercept(ts, [m for m, _ in ctx])
    a_fixed, aa, ab = _fit_with_intercept(ts, ans)
    extra_pass = max(m_two - ctx[-1][0], 0)  # what a second pass adds at t2 tokens
    if mb == "block":
        # an extra pass keeps its block applications' inputs (linear in L); attention's t^2
        # belongs to the one block application being differentiated, held once
        context = ca * L + cb * L * L + extra_pass / t2 * L * (N - 1)
    else:  # the chunk's graph holds every pass's activations, attention's scores included
        pass_frac = extra_pass / max(ca * t2 + cb * t2 * t2, 1)
        context = (ca * L + cb * L * L) * (1 + pass_frac * (N - 1))
    answer = aa * L + ab * L * L
    if mb != "none":
        activations = max(c_fixed + context, a_fixed + answer)
    else:  # one graph over every chunk
        activations = max(c_fixed, a_fixed) + (n_chunks - 1) * context + answer
    peak = weights + optimizer + accumulated + boundary + activations

    # Time the same way; each probe is a whole forward + backward, as a chunk of a step is.
    s_fixed, sa, sb = _fit_with_intercept(ts, [s for _, s in ctx])
    time_frac = max(s_two - ctx[-1][1], 0) / max(ctx[-1][1] - s_fixed, 1e-9)
    chunk_s = s_fixed + (sa * L + sb * L * L) * (1 + time_frac * (N - 1))
    step_s = cfg.grad_accum * math.ceil(T_mean / L) * chunk_s
    return {
        "peak_bytes": int(peak),
        "seconds_per_step": step_s,
        "tokens_per_step": int(cfg.grad_accum * cfg.batch_size * T_mean),
        "parts": {
            "weights": int(weights),
            "optimizer": int(optimizer),
            "accumulated_grads": int(accumulated),
            "boundary_states": int(boundary),
            "activations": int(activations),
        },
        "settings": {
            "batch_per_process": B,
            "L": L,
            "N": N,
            "longest": T_max,
            "mean_length": T_mean,
            "chunks": n_chunks,
            "memory_bound": mb,
            "fine_tune_type": cfg.fine_tune_type,
            "trainable_parameters": int(sum(v.size for v in trainable.values())),
        },
    }


# Where Metal does not say how much a process may wire, three quarters of the memory (macOS's
# recommended working set is about that; the rest is the system's and other programs')
USABLE_FRACTION = 0.75


def usable_memory() -> int:
    """Bytes one training step may take here (0 when unknown): Metal's recommended working set,
    else USABLE_FRACTION of the physical memory."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    return int(USABLE_FRACTION * machine_memory())


def choose_memory_bound(ft: Finetune, usable=None) -> dict:
    """--estimate's choice of --memory-bound: the estimate with each bound that keeps memory to
    a chunk or a block pass, and the faster of those that fit this machine (pick_bound)."""
    keep, estimates = ft.cfg.memory_bound, {}
    try:
        for bound in ("chunk", "block"):
            ft.cfg.memory_bound = bound
            estimates[bound] = estimate_step(ft)
    finally:
        ft.cfg.memory_bound = keep
    return pick_bound(estimates, usable_memory() if usable is None else usable)


def pick_bound(estimates: dict, usable: int) -> dict:
    """The faster of the bounds whose estimated peak fits `usable` bytes (0: unknown, all fit);
    choice None when none does."""
    fits = [b for b, e in estimates.items() if not usable or e["peak_bytes"] <= usable]
    choice = min(fits, key=lambda b: estimates[b]["seconds_per_step"]) if fits else None
    return {"estimates": estimates, "usable": usable, "choice": choice}


def _gb(x):
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


def format_choice(choice: dict) -> str:
    lines = [
        f"--memory-bound {b}: {_gb(e['peak_bytes'])}, {e['seconds_per_step']:.2f} s per step"
        for b, e in choice["estimates"].items()
    ]
    room = f"{_gb(choice['usable'])} usable here" if choice["usable"] else "memory unknown"
    if choice["choice"]:
        lines.append(f"{room}: run with --memory-bound {choice['choice']}")
    else:
        lines.append(
            f"{room}: neither fits; shorten the window (-L), take fewer passes (-N), "
            "a smaller batch (--batch-size with --grad-accum) or a 4-bit base (convert -q)"
        )
    return "\n".join(lines)


def format_estimate(est: dict) -> str:
    s, p = est["settings"], est["parts"]
    gb = _gb
    lines = [
        f"{s['fine_tune_type']}, {s['trainable_parameters']:,} trainable parameters; "
        f"L = {s['L']}, N = {s['N']}, batch {s['batch_per_process']} per process, "
        f"sequences up to {s['longest']} tokens ({s['chunks']} chunks)",
        f"expected peak memory: {gb(est['peak_bytes'])}  (weights {gb(p['weights'])}, "
        f"optimizer {gb(p['optimizer'])}, accumulated gradients "
        f"{gb(p['accumulated_grads'])}, chunk-boundary states {gb(p['boundary_states'])}, "
        f"activations {gb(p['activations'])})",
        f"expected time per step: {est['seconds_per_step']:.2f} s "
        f"(~{est['tokens_per_step'] / max(est['seconds_per_step'], 1e-9):,.0f} tokens/s)",
    ]
    return "\n".join(lines)
