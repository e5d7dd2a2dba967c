"""What a long chat costs: the sleep engine against mlx-lm's own generation with a full KV cache,
on the same model, in one process on one machine.

  (a) decode tokens/s and peak memory against session length (1k, 4k, 16k tokens; --lengths)
  (b) one consolidation (N passes) against N plain prefills of the same window from the same state
  (c) session save / load time and size against session length
  (d) the live window on disk: its KV stored, or its tokens re-prefilled on load
  (e) the wake pass reused as the first sleep pass, against recomputing it: time and how far
      the consolidated state and the next logits move (and prefill tokens/s with each)
  (f) the decode loop itself: the library's stream_generate (pipelined with mx.async_eval)
      against the step-by-step loop it replaced and mlx-lm's generate_step
  (g) deferred sleep: per-token latency of a reply across window boundaries with and without
      it, the catch-up's cost against the sleeps it replaces, and (--depo-run) the accuracy of
      answers from the shallow interim memory before catch-up

    python benchmarks/chat.py                  # hidden 512, 6 layers, L = 512, N = 2
    python benchmarks/chat.py --quick          # a smaller model and lengths, for a smoke run
    python benchmarks/chat.py --only deferred,deferred_quality --depo-run demo_out/seed0/N3

Writes benchmarks/results/chat.{json,md}.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import mlx_sleep  # noqa: F401  (BLAS first)
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from mlx_sleep import HybridLM, ModelConfig, SleepConfig
from mlx_sleep import _blas
from mlx_sleep.generate import stream_generate
from mlx_sleep.session import SessionEngine, open_session
from mlx_sleep.tasks import accuracy_by_difficulty
from mlx_sleep.train import load_run
from mlx_sleep.sleep import SleepEngine, continue_passes, evict, run_chunk

HERE = os.path.dirname(os.path.abspath(__file__))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def decode_engine(engine, token, n):
    """Per-token seconds of n greedy decode steps (one wake pass each); returns (times, token)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        logits = engine.feed(mx.array([[token]]), logits="last")
        token = int(mx.argmax(logits[0, -1]).item())
        times.append(time.perf_counter() - start)
    return times, token


def decode_mlx_lm(model, cache, token, n):
    """Per-token seconds of n steps of mlx-lm's generate_step continuing a full KV cache."""
    times, start = [], time.perf_counter()
    for token, _ in generate_step(mx.array([token]), model, max_tokens=n, prompt_cache=cache):
        token = int(token)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times, token


def decode_stream(engine, token, n):
    """Per-token seconds between the tokens of the library's decode loop (stream_generate,
    which queues each step before reading the token before it); returns (times, token)."""
    times, last = [], None
    for token in stream_generate(engine, [token], n):
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return times, token


def bench_decode_loop(model, sleep, T, n_decode, rounds, rng, vocab):
    """Greedy decode after a T-token prompt, within one window (no sleep among the timed steps:
    this is the loop's own cost): the step-by-step loop (read the token, then feed it: what
    stream_generate did before it was pipelined), stream_generate, and mlx-lm's generate_step
    on a full KV cache, in interleaved rounds."""
    prompt = rng.integers(0, vocab, T + 1).tolist()  # T + 1: the window after it is almost empty
    if (rounds + 1) * n_decode >= sleep.window - (T + 1) % sleep.window:
        raise ValueError("the timed decode must fit in one window: fewer tokens or a larger L")
    engines = {}
    for name in ("step_by_step", "pipelined"):
        engines[name] = SessionEngine(model, sleep)
        engines[name].feed(mx.array([prompt[:-1]]), logits=None)
        mx.eval(engines[name].state)
    cache = prefill_mlx_lm(model, prompt[:-1])
    tokens = {name: prompt[-1] for name in ("step_by_step", "pipelined", "mlx_lm")}
    times = {name: [] for name in tokens}
    loops = {
        "step_by_step": lambda t: decode_engine(engines["step_by_step"], t, n_decode),
        "pipelined": lambda t: decode_stream(engines["pipelined"], t, n_decode),
        "mlx_lm": lambda t: decode_mlx_lm(model, cache, t, n_decode),
    }
    for r in range(rounds + 1):  # round 0 warms up
        for name, loop in loops.items():
            got, tokens[name] = loop(tokens[name])
            if r > 0:
                times[name] += got
    rate = {name: 1 / statistics.median(t) for name, t in times.items()}
    row = {
        "length": T,
        "tokens_timed": {k: len(v) for k, v in times.items()},
        "step_by_step_tok_s": rate["step_by_step"],
        "pipelined_tok_s": rate["pipelined"],
        "mlx_lm_tok_s": rate["mlx_lm"],
        "pipelined_over_step_by_step": rate["pipelined"] / rate["step_by_step"],
        "step_by_step_over_mlx_lm": rate["step_by_step"] / rate["mlx_lm"],
        "pipelined_over_mlx_lm": rate["pipelined"] / rate["mlx_lm"],
    }
    print(row, flush=True)
    return row


def prefill_mlx_lm(model, prompt, step=1024):
    cache = model.make_cache()
    for a in range(0, len(prompt), step):
        model(mx.array([prompt[a : a + step]]), cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def bench_decode(model, sleep, lengths, n_decode, rounds, rng, vocab):
    """Decode at every session length, in interleaved rounds (engine and mlx-lm, each length,
    then again), so the ratios hold on a machine whose load drifts. Memory: what the session
    holds (engine state / KV cache) and the decode-time peak above what was allocated before."""
    sessions = []
    for T in lengths:
        prompt = rng.integers(0, vocab, T).tolist()
        engine = SessionEngine(model, sleep)
        start = time.perf_counter()
        engine.feed(mx.array([prompt]), logits=None)
        mx.eval(engine.state)
        e_prefill = time.perf_counter() - start
        start = time.perf_counter()
        cache = prefill_mlx_lm(model, prompt)
        m_prefill = time.perf_counter() - start
        sessions.append(
            {
                "length": T,
                "engine": engine,
                "cache": cache,
                "e_tok": prompt[-1],
                "m_tok": prompt[-1],
                "e_times": [],
                "m_times": [],
                "engine_prefill_tok_s": T / e_prefill,
                "mlx_lm_prefill_tok_s": T / m_prefill,
            }
        )
        print(f"prefilled {T}", flush=True)
    per_round = max(1, n_decode // rounds)
    for r in range(rounds + 1):  # round 0 warms up
        for s in sessions:
            e_times, s["e_tok"] = decode_engine(s["engine"], s["e_tok"], per_round)
            m_times, s["m_tok"] = decode_mlx_lm(model, s["cache"], s["m_tok"], per_round)
            if r > 0:
                s["e_times"] += e_times
                s["m_times"] += m_times
    rows = []
    for s in sessions:
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        decode_engine(s["engine"], s["e_tok"], per_round)
        e_peak = mx.get_peak_memory() - base
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        decode_mlx_lm(model, s["cache"], s["m_tok"], per_round)
        m_peak = mx.get_peak_memory() - base
        rows.append(
            {
                "length": s["length"],
                "engine_tok_s": 1 / statistics.median(s["e_times"]),
                "mlx_lm_tok_s": 1 / statistics.median(s["m_times"]),
                "engine_state_mb": nbytes(s["engine"].state) / 2**20,
                "mlx_lm_cache_mb": nbytes([c.state for c in s["cache"]]) / 2**20,
                "engine_decode_peak_mb": e_peak / 2**20,
                "mlx_lm_decode_peak_mb": m_peak / 2**20,
                "engine_prefill_tok_s": s["engine_prefill_tok_s"],
                "mlx_lm_prefill_tok_s": s["mlx_lm_prefill_tok_s"],
            }
        )
        print(rows[-1], flush=True)
    return rows


class RecomputingEngine(SessionEngine):
    """The engine as it was before it reused the wake pass: every sleep recomputes N passes."""

    def consolidate(self, cancel=None, on_pass=None):
        self.window_core = []
        return super().consolidate(cancel, on_pass)


def bench_prefill(model, sleep, T, rng, vocab, repeats):
    """Feeding a T-token prompt: the engine reusing each window's wake pass as sleep pass 1,
    recomputing it, and mlx-lm's prefill with a full cache (chunks of 1024); interleaved."""
    prompt = rng.integers(0, vocab, T).tolist()

    def feed(cls):
        engine = cls(model, sleep)
        engine.feed(mx.array([prompt]), logits=None)
        mx.eval(engine.state)

    runs = {"reuse": [], "recompute": [], "mlx_lm": []}
    for r in range(repeats + 1):
        for name, fn in (
            ("reuse", lambda: feed(SessionEngine)),
            ("recompute", lambda: feed(RecomputingEngine)),
            ("mlx_lm", lambda: prefill_mlx_lm(model, prompt)),
        ):
            t = median_time(fn, 1)
            if r > 0:
                runs[name].append(t)
    return {"length": T, **{f"{k}_tok_s": T / statistics.median(v) for k, v in runs.items()}}


def full_window(model, sleep, rng, vocab, pieces=1):
    """An engine whose live window is exactly full (the next token would force a sleep),
    after one earlier consolidated window; fed in `pieces` calls."""
    engine = SessionEngine(model, sleep)
    engine.feed(mx.array([rng.integers(0, vocab, sleep.window).tolist()]), logits=None)
    engine.consolidate()
    ids = rng.integers(0, vocab, sleep.window)
    for part in np.array_split(ids, pieces):
        engine.feed(mx.array([part.tolist()]), logits=None)
    mx.eval(engine.state)
    return engine


def bench_consolidation(model, sleep, rng, vocab, repeats):
    engine = full_window(model, sleep, rng, vocab)
    ids = mx.concatenate(engine.window_ids, axis=1)
    start_state, start, win = engine.window_start_state, engine.window_start, sleep.attention_window

    def consolidate():
        _, state = run_chunk(
            model, ids, start_state, start, sleep.loops, win, lambda n, s: mx.eval(s)
        )
        mx.eval(evict(model, state, sleep.keep_after_eviction))

    def prefills():
        for _ in range(sleep.loops):
            _, state = run_chunk(model, ids, start_state, start, 1, win)
            mx.eval(state)

    def engine_sleep():  # the engine's own, reusing the one-piece wake pass as pass 1
        e = SessionEngine(model, sleep)
        e.load_arrays_and_meta(*engine.arrays_and_meta())
        start = time.perf_counter()
        e.consolidate()
        return time.perf_counter() - start

    c, p, r = [], [], []
    for i in range(repeats + 1):  # interleaved; the first round warms up
        times = median_time(consolidate, 1), median_time(prefills, 1), engine_sleep()
        if i > 0:
            c.append(times[0]), p.append(times[1]), r.append(times[2])
    c, p, r = statistics.median(c), statistics.median(p), statistics.median(r)
    return {
        "window": sleep.window,
        "loops": sleep.loops,
        "consolidation_s": c,
        "n_prefills_s": p,
        "ratio": c / p,
        "engine_reusing_wake_s": r,
    }


def reply_latencies(model, sleep, prompt, reply, defer):
    """Per-token seconds of a reply fed token by token (each token's logits read, as a decoder
    must) after `prompt`, synchronous or deferred; returns (times, the tokens at which a
    window filled, the engine)."""
    engine = SleepEngine(model, sleep, defer=defer, max_pending=8)
    engine.feed(mx.array([prompt]), logits=None)
    mx.eval(engine.state)
    times, boundaries = [], []
    for i, token in enumerate(reply):
        closed = engine.sleeps + len(engine.pending)
        start = time.perf_counter()
        mx.eval(engine.feed(mx.array([[token]]), logits="last"))
        times.append(time.perf_counter() - start)
        if engine.sleeps + len(engine.pending) > closed:
            boundaries.append(i)
    return times, boundaries, engine


def bench_deferred(model, sleep, rng, vocab, repeats, windows=2):
    """(g) A reply that crosses `windows` window boundaries, with the synchronous schedule and
    with deferred sleep (the same tokens): per-token latency at the boundaries against the
    median; then the deferred engine's catch-up against what it replaces (the synchronous
    sleeps at the boundaries, beyond their token's median, plus one prefill of the live window),
    and how far the caught-up state and next logits are from the synchronous ones."""
    L = sleep.window
    prompt = rng.integers(0, vocab, L - 8).tolist()
    reply = rng.integers(0, vocab, 8 + (windows - 1) * L + 8).tolist()
    rows = {"sync": [], "defer": []}
    catch_up, live_prefill, diffs = [], [], None
    for i in range(repeats + 1):  # interleaved; the first round warms up
        for mode in rows:
            times, bounds, engine = reply_latencies(model, sleep, prompt, reply, mode == "defer")
            assert len(bounds) == windows, bounds
            if mode == "sync":
                sync_engine = engine
            else:
                ids = mx.concatenate(engine.window_ids, axis=1)
                t0 = time.perf_counter()  # what catch-up adds: the live window, one pass
                _, s = run_chunk(
                    model,
                    ids,
                    engine.window_start_state,
                    engine.window_start,
                    1,
                    sleep.attention_window,
                )
                mx.eval(s)
                t1 = time.perf_counter()
                engine.catch_up()
                t2 = time.perf_counter()
                if i > 0:
                    live_prefill.append(t1 - t0)
                    catch_up.append(t2 - t1)
                nxt = mx.array([[reply[0]]])
                a, b = engine.feed(nxt, logits="last"), sync_engine.feed(nxt, logits="last")
                fast = [
                    float(mx.abs(x[k] - y[k]).max())
                    for x, y, blk in zip(engine.state, sync_engine.state, model.sleep_blocks())
                    for k in blk.mixer.carried
                ]
                diffs = (max(fast), float(mx.abs(a - b).max()))
            if i > 0:
                median = statistics.median(times)
                rows[mode].append(
                    {
                        "median_ms": 1e3 * median,
                        "boundary_ms": [1e3 * times[j] for j in bounds],
                        "boundary_over_median": max(times[j] for j in bounds) / median,
                        "sleep_s": sum(times[j] - median for j in bounds),
                    }
                )
    out = {"window": L, "loops": sleep.loops, "windows": windows, "reply_tokens": len(reply)}
    for mode, rs in rows.items():
        out[mode] = {
            "median_ms": statistics.median(r["median_ms"] for r in rs),
            "boundary_over_median": statistics.median(r["boundary_over_median"] for r in rs),
            "worst_boundary_over_median": max(r["boundary_over_median"] for r in rs),
        }
    sync_sleeps = statistics.median(r["sleep_s"] for r in rows["sync"])
    out["catch_up_s"] = statistics.median(catch_up)
    out["sync_sleeps_s"] = sync_sleeps
    out["live_prefill_s"] = statistics.median(live_prefill)
    out["catch_up_ratio"] = out["catch_up_s"] / (sync_sleeps + out["live_prefill_s"])
    out["fast_weights_max_abs_diff"], out["next_logits_max_abs_diff"] = diffs
    return out


def bench_deferred_quality(run_dir, samples):
    """(g) What answers from the shallow interim memory cost, on a trained Depo run (e.g. the
    demo's N = 3 model): each sequence fed in one piece to a deferred engine (its context
    window evicted after the wake pass, pending) answers its queries before catch-up; the
    synchronous engine on the same tokens is what it answers after (the caught-up state is
    checked against it)."""
    model, sleep, task, _ = load_run(run_dir)
    by_k = {}
    for k in task.eval_difficulties:
        batch = task.sample(np.random.default_rng([1234, k]), samples, difficulty=k)
        if batch.inputs.shape[1] > 2 * sleep.window:  # later windows hold answers: one pass
            raise SystemExit("--depo-run: a sequence must fit in two windows")
        ids = mx.array(batch.inputs)
        deferred = SleepEngine(model, sleep, batch_size=samples, defer=True)
        before = deferred.feed(ids)
        sync = SleepEngine(model, sleep, batch_size=samples)
        after = sync.feed(ids)
        deferred.catch_up()
        for (name, x), (_, y) in zip(tree_flatten(deferred.state), tree_flatten(sync.state)):
            scale = float(mx.abs(y).max()) or 1.0  # float rounding, relative to the tensor
            if float(mx.abs(x - y).max()) > 1e-4 * scale:
                raise SystemExit(f"catch-up differs from the synchronous schedule at {name}")

        def accuracy(logits):
            preds = np.where(batch.mask > 0, np.array(mx.argmax(logits, axis=-1)), -1)
            return accuracy_by_difficulty(batch, preds)[k]["token"]

        by_k[str(k)] = {"before": accuracy(before), "after": accuracy(after)}
    return {
        "model": f"run .../{'/'.join(os.path.normpath(run_dir).split(os.sep)[-2:])} "
        f"({task.name}, trained at "
        f"N = {sleep.loops}, L = {sleep.window})",
        "loops": sleep.loops,
        "samples": samples,
        "by_k": by_k,
    }


def bench_sessions(model, sleep, model_dir, lengths, rng, vocab, repeats):
    rows = []
    os.environ["MLX_SLEEP_HOME"] = tempfile.mkdtemp(prefix="mlx-sleep-bench-")
    for T in lengths:
        name = f"len{T}"
        session = open_session(name, model, model_dir, sleep)
        session.engine.feed(mx.array([rng.integers(0, vocab, T).tolist()]), logits=None)
        mx.eval(session.engine.state)
        save = median_time(session.save, repeats)
        size = session.meta["state_bytes"]
        session.close()
        load = median_time(
            lambda: open_session(name, model, model_dir, lock=False, create=False), repeats
        )
        rows.append(
            {
                "length": T,
                "live_window": session.engine.window_len,
                "save_s": save,
                "load_s": load,
                "state_mb": size / 2**20,
            }
        )
        print(rows[-1], flush=True)
    return rows


def bench_window_storage(model, sleep, model_dir, rng, vocab, repeats):
    """Storing the live window's KV against storing its tokens and re-running them on load."""
    engine = full_window(model, sleep, rng, vocab)
    arrays, _ = engine.arrays_and_meta()
    kv = {
        k: v for k, v in arrays.items() if k.startswith("state.") and k.endswith(("keys", "values"))
    }
    tmp = tempfile.mkdtemp()
    with_kv, without_kv = os.path.join(tmp, "kv.safetensors"), os.path.join(tmp, "ids.safetensors")
    mx.save_safetensors(with_kv, arrays)
    mx.save_safetensors(without_kv, {k: v for k, v in arrays.items() if k not in kv})
    ids = mx.concatenate(engine.window_ids, axis=1)

    def load_kv():
        mx.eval(list(mx.load(with_kv).values()))

    def load_and_prefill():
        mx.eval(list(mx.load(without_kv).values()))
        _, state = run_chunk(
            model, ids, engine.window_start_state, engine.window_start, 1, sleep.attention_window
        )
        mx.eval(state)

    load_kv(), load_and_prefill()
    _, re_state = run_chunk(
        model, ids, engine.window_start_state, engine.window_start, 1, sleep.attention_window
    )
    diff = max(float(mx.abs(a[k] - b[k]).max()) for a, b in zip(engine.state, re_state) for k in a)
    return {
        "window": sleep.window,
        "kv_mb": sum(v.nbytes for v in kv.values()) / 2**20,
        "file_with_kv_mb": os.path.getsize(with_kv) / 2**20,
        "file_without_kv_mb": os.path.getsize(without_kv) / 2**20,
        "load_kv_s": median_time(load_kv, repeats),
        "load_and_prefill_s": median_time(load_and_prefill, repeats),
        "prefill_state_max_abs_diff": diff,
    }


def bench_wake_reuse(model, sleep, rng, vocab, repeats, pieces):
    """Feed a window in `pieces` calls recording the core outputs, then consolidate by
    recomputing all N passes (what SleepEngine does) or by reusing the wake pass as pass 1."""
    win = sleep.attention_window
    engine = full_window(model, sleep, rng, vocab)
    start_state, offset = engine.window_start_state, engine.window_start
    ids = mx.concatenate(engine.window_ids, axis=1)
    state, hs, pos = start_state, [], offset
    for part in np.array_split(np.arange(ids.shape[1]), pieces):
        _, state = run_chunk(model, ids[:, part[0] : part[-1] + 1], state, pos, 1, win, core_out=hs)
        pos += len(part)
    core_h = mx.concatenate(hs, axis=1)
    mx.eval(core_h, state)

    def recompute():
        _, s = run_chunk(model, ids, start_state, offset, sleep.loops, win)
        mx.eval(s)
        return s

    def reuse():
        s = continue_passes(model, core_h, state, start_state, offset, sleep.loops, win)
        mx.eval(s)
        return s

    a, b = recompute(), reuse()
    carried = [(i, k) for i, blk in enumerate(model.sleep_blocks()) for k in blk.mixer.carried]
    s_diff = max(float(mx.abs(a[i][k] - b[i][k]).max()) for i, k in carried)
    s_scale = max(float(mx.abs(a[i][k]).max()) for i, k in carried)
    nxt = mx.array([[1]])
    la = model.head(
        run_chunk(model, nxt, evict(model, a, sleep.keep_after_eviction), pos, 1, win)[0]
    )
    lb = model.head(
        run_chunk(model, nxt, evict(model, b, sleep.keep_after_eviction), pos, 1, win)[0]
    )
    return {
        "pieces": pieces,
        "recompute_s": median_time(recompute, repeats),
        "reuse_s": median_time(reuse, repeats),
        "fast_weights_max_abs_diff": s_diff,
        "fast_weights_max_abs": s_scale,
        "next_logits_max_abs_diff": float(mx.abs(la - lb).max()),
    }


def markdown(res) -> str:
    m = res["machine"]
    out = [
        f"# Chat benchmarks ({m['platform']}, {m['device']}, BLAS {m['blas']})",
        "",
        f"Model: {res['model']}; sleep: {res['sleep']}. One process, one machine."
        + "".join(
            f" Re-run alone ({r['when']}, {r['repeats']} repeats): {', '.join(r['sections'])}."
            for r in res.get("reruns", [])
        ),
        "",
        "## (a) decode against session length",
        "",
        "Median decode step over interleaved rounds; memory: what the session holds (engine "
        "state with the live window's KV / mlx-lm's KV cache) and the decode-time peak above "
        "it (the engine's includes the sleeps decode forces).",
        "",
        "| session tokens | engine tok/s | mlx-lm full-cache tok/s | engine state MB | "
        "mlx-lm cache MB | engine decode peak MB | mlx-lm decode peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["decode"]:
        out.append(
            f"| {r['length']} | {r['engine_tok_s']:.1f} | {r['mlx_lm_tok_s']:.1f} | "
            f"{r['engine_state_mb']:.2f} | {r['mlx_lm_cache_mb']:.2f} | "
            f"{r['engine_decode_peak_mb']:.2f} | {r['mlx_lm_decode_peak_mb']:.2f} |"
        )
    f = res["prefill"]
    out += [
        "",
        f"Prefill of {f['length']} tokens: engine {f['reuse_tok_s']:.0f} tok/s reusing the "
        f"wake pass, {f['recompute_tok_s']:.0f} recomputing it, mlx-lm {f['mlx_lm_tok_s']:.0f} "
        f"(ratios to mlx-lm {f['reuse_tok_s'] / f['mlx_lm_tok_s']:.2f} and "
        f"{f['recompute_tok_s'] / f['mlx_lm_tok_s']:.2f}).",
    ]
    d = res["decode"]
    out += [
        "",
        "Decode against the shortest session (goal for the engine: >= 0.95 at 16k): "
        + "; ".join(
            f"{r['length']}: engine {r['engine_tok_s'] / d[0]['engine_tok_s']:.2f}, "
            f"mlx-lm {r['mlx_lm_tok_s'] / d[0]['mlx_lm_tok_s']:.2f}"
            for r in d[1:]
        )
        + ".",
        "",
        "## (b) one consolidation against N plain prefills of the window",
        "",
        "| L | N | consolidation (N passes) s | N prefills s | ratio (goal <= 1.10) | "
        "engine, wake pass reused, s |",
        "|---|---|---|---|---|---|",
    ]
    c = res["consolidation"]
    out += [
        f"| {c['window']} | {c['loops']} | {c['consolidation_s']:.3f} | {c['n_prefills_s']:.3f} "
        f"| {c['ratio']:.2f} | {c['engine_reusing_wake_s']:.3f} |",
        "",
        "## (c) session save and load",
        "",
        "| session tokens | live window | save s | load s | state MB |",
        "|---|---|---|---|---|",
    ]
    for r in res["sessions"]:
        out.append(
            f"| {r['length']} | {r['live_window']} | {r['save_s']:.3f} | {r['load_s']:.3f} "
            f"| {r['state_mb']:.2f} |"
        )
    w = res["window_storage"]
    out += [
        "",
        "## (d) the live window on disk: KV stored or tokens re-prefilled",
        "",
        "| L | KV MB | file with KV MB | file without MB | load with KV s | "
        "load + re-prefill s | re-prefill max abs diff |",
        "|---|---|---|---|---|---|---|",
        f"| {w['window']} | {w['kv_mb']:.2f} | {w['file_with_kv_mb']:.2f} | "
        f"{w['file_without_kv_mb']:.2f} | {w['load_kv_s']:.4f} | {w['load_and_prefill_s']:.4f} "
        f"| {w['prefill_state_max_abs_diff']:.1e} |",
        "",
        "## (e) the wake pass as the first sleep pass",
        "",
        "| window fed in | recompute s | reuse s | fast weights max abs diff (max abs) | "
        "next logits max abs diff |",
        "|---|---|---|---|---|",
    ]
    for r in res["wake_reuse"]:
        out.append(
            f"| {r['pieces']} piece(s) | {r['recompute_s']:.3f} | {r['reuse_s']:.3f} | "
            f"{r['fast_weights_max_abs_diff']:.1e} ({r['fast_weights_max_abs']:.1e}) | "
            f"{r['next_logits_max_abs_diff']:.1e} |"
        )
    if "decode_loop" in res:
        d = res["decode_loop"]
        out += [
            "",
            "## (f) the decode loop",
            "",
            f"Greedy decode after a {d['length']}-token prompt, within one window (no sleep "
            "among the timed steps); median step over interleaved rounds.",
            "",
            "| loop | tok/s | against mlx-lm |",
            "|---|---|---|",
            f"| step by step (read the token, then feed it) | {d['step_by_step_tok_s']:.1f} | "
            f"{d['step_by_step_over_mlx_lm']:.2f} |",
            f"| stream_generate, pipelined (mx.async_eval) | {d['pipelined_tok_s']:.1f} | "
            f"{d['pipelined_over_mlx_lm']:.2f} |",
            f"| mlx-lm generate_step, full KV cache | {d['mlx_lm_tok_s']:.1f} | 1.00 |",
            "",
            f"Pipelining: {d['pipelined_over_step_by_step']:.2f}x the step-by-step loop.",
        ]
    if "deferred" in res:
        g = res["deferred"]
        out += [
            "",
            "## (g) deferred sleep: no reply waits for a sleep",
            "",
            f"A reply fed token by token (each token's logits read) across {g['windows']} window "
            f"boundaries (L = {g['window']}, N = {g['loops']}, {g['reply_tokens']} tokens), the "
            "same tokens with the synchronous schedule and with `defer=True`; median over "
            "interleaved rounds.",
            "",
            "| schedule | median token ms | boundary token / median (goal <= 1.2) | worst round |",
            "|---|---|---|---|",
        ]
        for mode, name in (("sync", "synchronous"), ("defer", "deferred")):
            r = g[mode]
            out.append(
                f"| {name} | {r['median_ms']:.1f} | {r['boundary_over_median']:.2f} | "
                f"{r['worst_boundary_over_median']:.2f} |"
            )
        out += [
            "",
            f"Catch-up of the {g['windows']} deferred windows: {g['catch_up_s']:.3f} s against "
            f"{g['sync_sleeps_s']:.3f} s of synchronous sleeps (the boundary tokens beyond their "
            f"median) + {g['live_prefill_s']:.3f} s for one pass over the live window: ratio "
            f"{g['catch_up_ratio']:.2f} (goal <= 1.10). After catch-up, the fast weights are "
            f"{g['fast_weights_max_abs_diff']:.1e} and the next logits "
            f"{g['next_logits_max_abs_diff']:.1e} (max abs) from the synchronous engine's.",
        ]
    if "deferred_quality" in res:
        q = res["deferred_quality"]
        out += [
            "",
            "### What the shallow interim memory costs",
            "",
            f"{q['model']}: Depo queries answered from the deferred engine's memory before "
            "catch-up (the context window slept 1 pass) and after it (the state the synchronous "
            f"schedule reaches, N = {q['loops']}); {q['samples']} sequences per k, per-query "
            "accuracy.",
            "",
            "| k | before catch-up | after catch-up |",
            "|---|---|---|",
        ]
        for k, r in q["by_k"].items():
            out.append(f"| {k} | {r['before']:.3f} | {r['after']:.3f} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--lengths", default=None, help="Comma-separated session lengths.")
    p.add_argument("--out", default=os.path.join(HERE, "results", "chat"))
    p.add_argument(
        "--only",
        default=None,
        metavar="SECTIONS",
        help="Re-run these sections (comma-separated: decode, prefill, consolidation, "
        "sessions, window_storage, wake_reuse, decode_loop, deferred) on a quiet machine; "
        "the others are kept from --out's JSON.",
    )
    p.add_argument("--repeats", type=int, default=None, help="Interleaved repeats per timing.")
    p.add_argument(
        "--depo-run",
        default=None,
        help="A trained Depo run (e.g. demo_out/seed0/N3): adds deferred_quality, the accuracy "
        "of answers from the shallow interim memory.",
    )
    args = p.parse_args()
    if args.quick:
        cfg = ModelConfig(vocab_size=512, hidden_size=64, layers="attn,gdn,attn,gdn", num_heads=4)
        sleep, lengths, n_decode, repeats = SleepConfig(loops=2, window=128), [256, 1024], 16, 3
    else:
        cfg = ModelConfig(
            vocab_size=8192,
            hidden_size=512,
            layers="attn,gdn,attn,gdn,attn,gdn",
            num_heads=8,
            num_kv_heads=2,
        )
        sleep, lengths, n_decode, repeats = (
            SleepConfig(loops=2, window=512),
            [1024, 4096, 16384],
            64,
            3,
        )
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    repeats = args.repeats or repeats
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    model = HybridLM(cfg)
    mx.eval(model.parameters())
    model_dir = tempfile.mkdtemp(prefix="mlx-sleep-bench-model-")
    mx.save_safetensors(
        os.path.join(model_dir, "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    res = {
        "machine": {
            "platform": platform.platform(),
            "device": str(mx.default_device()),
            "blas": _blas.status["library"] or _blas.status["reason"],
        },
        "model": f"HybridLM {cfg.layers}, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{n_params / 1e6:.1f}M parameters",
        "sleep": sleep.to_dict(),
    }
    vocab = cfg.vocab_size
    sections = {
        "decode": lambda: bench_decode(model, sleep, lengths, n_decode, 4, rng, vocab),
        "prefill": lambda: bench_prefill(
            model, sleep, lengths[min(1, len(lengths) - 1)], rng, vocab, repeats
        ),
        "consolidation": lambda: bench_consolidation(model, sleep, rng, vocab, repeats),
        "sessions": lambda: bench_sessions(model, sleep, model_dir, lengths, rng, vocab, repeats),
        "window_storage": lambda: bench_window_storage(
            model, sleep, model_dir, rng, vocab, repeats
        ),
        "wake_reuse": lambda: [
            bench_wake_reuse(model, sleep, rng, vocab, repeats, pieces)
            for pieces in (1, 8, sleep.window)
        ],
        "decode_loop": lambda: bench_decode_loop(model, sleep, lengths[0], n_decode, 4, rng, vocab),
        "deferred": lambda: bench_deferred(model, sleep, rng, vocab, repeats),
    }
    if args.depo_run:
        sections["deferred_quality"] = lambda: bench_deferred_quality(args.depo_run, 512)
    only = args.only.split(",") if args.only else list(sections)
    if set(only) - set(sections):
        p.error(f"--only takes {', '.join(sections)}")
    if args.only:  # the other sections come from the last full run, on the same model
        with open(args.out + ".json") as f:
            kept = json.load(f)
        if kept["model"] != res["model"] or kept["sleep"] != res["sleep"]:
            p.error(f"{args.out}.json holds another model or sleep setting: run all sections")
        res = {
            **kept,
            "reruns": kept.get("reruns", [])
            + [{"sections": only, "when": time.strftime("%Y-%m-%d %H:%M"), "repeats": repeats}],
        }
    for name in only:
        res[name] = sections[name]()
        print(name, res[name], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
