"""Mutants of the shipped Metal kernels: realistic bugs, each of which the first-use self-check
or the kernel tests (test_kernels.py, run through the emulator) must catch.

A mutant is one edit of one kernel's source (or of a header it includes). Every mutant must
be killed by the kernel's tests on their own (the self-check bypassed: a wrong value, or an
emulator error -- an out-of-bounds access, a race between thread schedules) and by the first-use
self-check on its own (the kernel then falls back to the ops): a bug the tests catch on one
shape must not pass the self-check on another. The summary at the end of the pytest run says
what killed each. (The unmutated kernels pass the same self-checks and tests: test_kernels.py.)"""

import warnings

import mlx.core as mx
import pytest

from mlx_sleep import kernels
from tests import test_kernels as tk
from tests.metal_emulator import metal_kernel

RESULTS = {}  # mutant id -> what killed it (printed by conftest)

# (id, kernel, file, find, replace): `find` must occur exactly once in `file`
MUTANTS = [
    # ---- gated_delta (forward)
    ("fwd: no decay", "gated_delta", "gated_delta.metal", "s[r][i] *= a;", ""),
    (
        "fwd: S k read with q",
        "gated_delta",
        "gated_delta.metal",
        "u += s[r][i] * kv[i];",
        "u += s[r][i] * qv[i];",
    ),
    (
        "fwd: beta dropped",
        "gated_delta",
        "gated_delta.metal",
        "const float delta = b * (",
        "const float delta = (",
    ),
    (
        "fwd: y read before the update",
        "gated_delta",
        "gated_delta.metal",
        "s[r][i] += kv[i] * delta;\n        out += s[r][i] * qv[i];",
        "out += s[r][i] * qv[i];\n        s[r][i] += kv[i] * delta;",
    ),
    ("fwd: no simd_sum for S k", "gated_delta", "gated_delta.metal", "- simd_sum(u));", "- u);"),
    (
        "fwd: chunk state one token late",
        "gated_delta",
        "gated_delta.metal",
        "if (t % CHUNK == 0) {",
        "if (t % CHUNK == 1 % CHUNK) {",
    ),
    (
        "fwd: last token skipped",
        "gated_delta",
        "gated_delta.metal",
        "for (int t = 0; t < T; ++t) {",
        "for (int t = 0; t < T - 1; ++t) {",
    ),
    (
        "fwd: final state ignores the batch",
        "gated_delta",
        "gated_delta.metal",
        "state_out + size_t(at.n)",
        "state_out + size_t(at.h)",
    ),
    (
        "fwd: y rounded to half",
        "gated_delta",
        "gated_delta.metal",
        "static_cast<Ty>(out)",
        "static_cast<Ty>(static_cast<half>(out))",
    ),
    (
        "header: GVA key head h % Hk",
        "gated_delta",
        "gated_delta.h",
        "hk((n_ % Hv) / (Hv / Hk))",
        "hk((n_ % Hv) % Hk)",
    ),
    (
        "header: key lanes read past Dk",
        "gated_delta",
        "gated_delta.h",
        "x[i] = d < Dk ? static_cast<float>(src[d]) : 0.0f;",
        "x[i] = static_cast<float>(src[d]);",
    ),
    # ---- gated_delta_backward
    (
        "bwd: no barrier before the row sums",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n      if (ty == 0)",
        "if (ty == 0)",
    ),
    (
        "bwd: no barrier before the next token",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "threadgroup_barrier(mem_flags::mem_threadgroup);  // before",
        "// before",
    ),
    (
        "bwd: barrier without mem_threadgroup",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n      if (ty == 0)",
        "threadgroup_barrier(mem_flags::mem_device);\n      if (ty == 0)",
    ),
    (
        "bwd: dS not decayed",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "ds[r][i] = a * dsd;",
        "ds[r][i] = dsd;",
    ),
    (
        "bwd: dk misses the S~^T du term",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "dk[i] += ds[r][i] * delta + a * s[r][i] * du;",
        "dk[i] += ds[r][i] * delta;",
    ),
    (
        "bwd: dbeta with delta for r",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "db += dd * res;",
        "db += dd * delta;",
    ),
    (
        "bwd: ddecay with dS for dS~",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "da += dsd * s[r][i];",
        "da += ds[r][i] * s[r][i];",
    ),
    (
        "bwd: row sum misses a simdgroup",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "for (int j = 0; j < R; ++j) {\n            sq",
        "for (int j = 1; j < R; ++j) {\n            sq",
    ),
    (
        "bwd: state of the wrong slot",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "load_rows<NR, NK, R, Dv, Dk>(s, slots + size_t(t - t0)",
        "load_rows<NR, NK, R, Dv, Dk>(s, slots + size_t(metal::max(t - t0 - 1, 0))",
    ),
    (
        "bwd: partial last chunk overruns T",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "const int t1 = metal::min(T, t0 + CHUNK);",
        "const int t1 = t0 + CHUNK;",
    ),
    (
        "bwd: dq from the state before the update",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "dq[i] += (a * s[r][i] + delta * kv[i]) * dy_r;",
        "dq[i] += a * s[r][i] * dy_r;",
    ),
    # threadgroup arrays sized by the wrong constant: they overflow on the models' heads only
    # (Dk 96 / 128: NK = 3 / 4; Dv > 32: NR > 1), into a neighbour or past the arena's end
    (
        "bwd: dq/dk partials sized for Dk <= 64",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "part_q[R * NK * 32];  // per simdgroup: its rows' share of dq, dk\n"
        "  threadgroup float part_k[R * NK * 32];",
        "part_q[R * 2 * 32];  // per simdgroup: its rows' share of dq, dk\n"
        "  threadgroup float part_k[R * 2 * 32];",
    ),
    (
        "bwd: ddecay partials sized by rows per simdgroup",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "threadgroup float part_a[R];",
        "threadgroup float part_a[NR];",
    ),
    (
        "bwd: dbeta partials sized by rows per simdgroup",
        "gated_delta_backward",
        "gated_delta_backward.metal",
        "threadgroup float part_b[R];",
        "threadgroup float part_b[NR];",
    ),
    # a key entry read past Dk whose value is then masked: a read past the head, and past the
    # buffer for the last head when Dk is no multiple of 32
    (
        "header: keys read past Dk, masked after (fwd)",
        "gated_delta",
        "gated_delta.h",
        "x[i] = d < Dk ? static_cast<float>(src[d]) : 0.0f;",
        "const float xd = static_cast<float>(src[d]);\n    x[i] = d < Dk ? xd : 0.0f;",
    ),
    (
        "header: keys read past Dk, masked after (bwd)",
        "gated_delta_backward",
        "gated_delta.h",
        "x[i] = d < Dk ? static_cast<float>(src[d]) : 0.0f;",
        "const float xd = static_cast<float>(src[d]);\n    x[i] = d < Dk ? xd : 0.0f;",
    ),
    # ---- gdn_step
    (
        "step: q not scaled by Dk^-1/2",
        "gdn_step",
        "gdn_step.metal",
        " * metal::rsqrt(float(Dk));",
        ";",
    ),
    (
        "step: no barrier before the RMS sum",
        "gdn_step",
        "gdn_step.metal",
        "threadgroup_barrier(mem_flags::mem_threadgroup);",
        "",
    ),
    (
        "step: decay without softplus",
        "gdn_step",
        "gdn_step.metal",
        "softplus_f(static_cast<float>(a_in[n]) +",
        "(static_cast<float>(a_in[n]) +",
    ),
    (
        "step: S k read with q",
        "gdn_step",
        "gdn_step.metal",
        "kv_mem += s[i] * kv[i];",
        "kv_mem += s[i] * qv[i];",
    ),
    (
        "step: state rounded to bfloat16",
        "gdn_step",
        "gdn_step.metal",
        "s_out[dv * Dk + d] = static_cast<StT>(s[i]);",
        "s_out[dv * Dk + d] = static_cast<StT>(static_cast<bfloat16_t>(s[i]));",
    ),
    (
        "step: RMS partials sized by rows per simdgroup",
        "gdn_step",
        "gdn_step.metal",
        "threadgroup float row_sumsq[R];",
        "threadgroup float row_sumsq[NR];",
    ),
    (
        "step: q's L2 norm without its epsilon",
        "gdn_step",
        "gdn_step.metal",
        "metal::rsqrt(simd_sum(qq) + 1e-6f)",
        "metal::rsqrt(simd_sum(qq))",
    ),
    (
        "step: k's L2 norm without its epsilon",
        "gdn_step",
        "gdn_step.metal",
        "metal::rsqrt(simd_sum(kk) + 1e-6f)",
        "metal::rsqrt(simd_sum(kk))",
    ),
    (
        "step: q read past Dk, masked after",
        "gdn_step",
        "gdn_step.metal",
        "qv[i] = d < Dk ? static_cast<float>(q_[d]) : 0.0f;",
        "const float qd = static_cast<float>(q_[d]);\n    qv[i] = d < Dk ? qd : 0.0f;",
    ),
    # equal to the right weight while Dv <= 32 (one row per simdgroup: dv == ty)
    (
        "step: RMSNorm weight indexed by simdgroup",
        "gdn_step",
        "gdn_step.metal",
        "static_cast<float>(weight[dv])",
        "static_cast<float>(weight[ty])",
    ),
    # ---- dynamic_conv
    (
        "conv: new state one token early",
        "dynamic_conv",
        "dynamic_conv.metal",
        "padded_at(x, conv_state, b, T + t, c, T, C, W)",
        "padded_at(x, conv_state, b, T + t - 1, c, T, C, W)",
    ),
    (
        "conv: new state misses its last row",
        "dynamic_conv",
        "dynamic_conv.metal",
        "if (t < W - 1) {",
        "if (t < W - 2) {",
    ),
    (
        "conv header: state/x boundary off by one",
        "dynamic_conv",
        "dynamic_conv.h",
        "return j < W - 1 ?",
        "return j <= W - 1 ?",
    ),
    (
        "conv bwd: first token's taps dropped",
        "dynamic_conv_backward",
        "dynamic_conv_backward.metal",
        "if (t >= 0 && t < T) {",
        "if (t > 0 && t < T) {",
    ),
    (
        "conv bwd: new-state cotangent dropped at j = T",
        "dynamic_conv_backward",
        "dynamic_conv_backward.metal",
        "if (j >= T) {",
        "if (j > T) {",
    ),
    # the template flag hard-coded: right for the flag value a check happens to use
    (
        "conv bwd: SiLU flag hard-coded (input gradients)",
        "dynamic_conv_backward",
        "dynamic_conv_backward.metal",
        "dp += grad_pre<SILU>(",
        "dp += grad_pre<true>(",
    ),
    (
        "conv bwd: SiLU flag hard-coded (kernel gradients)",
        "dynamic_conv_backward",
        "dynamic_conv_backward.metal",
        "float g = grad_pre<SILU>(",
        "float g = grad_pre<true>(",
    ),
]


def mutant_factory(kernel, file, find, replace):
    """The emulator, with one edit in the source or a header of one kernel."""
    k = kernels.KERNELS[kernel]
    original = kernels.read_source(file)
    assert original.count(find) == 1, f"{file}: the mutant's text must occur once: {find!r}"
    mutated = original.replace(find, replace)

    def factory(**kw):
        if kw["name"] == f"mlx_sleep_{kernel}":
            if file == k.source:
                kw["source"] = mutated
            else:
                kw["header"] = kw["header"].replace(original, mutated)
        return metal_kernel(**kw)

    return factory


def kernel_tests(kernel):
    """The tests of test_kernels.py that exercise `kernel`, as callables, smallest first."""
    if kernel.startswith("gated_delta"):
        cases = sorted(tk.GATED_DELTA_CASES, key=lambda c: c[0] * c[1] * c[3] * c[4] * c[5])
        return (
            [lambda c=c: tk.test_gated_delta_kernels(None, c) for c in cases]
            + [
                lambda d=d: tk.test_gated_delta_kernels_half(None, d)
                for d in (mx.float16, mx.bfloat16)
            ]
            + [lambda: tk.test_gated_delta_degenerate_inputs(None)]
            + [
                lambda h=h, m=m: tk.test_gated_delta_kernels_model_heads(None, h, m)
                for h, m in tk.MODEL_HEADS
            ]
            + [lambda: tk.test_gated_delta_kernels_long_window(None)]
        )
    if kernel == "gdn_step":
        return (
            [lambda s=s: tk.test_gdn_step(None, s) for s in tk.GDN_SHAPES]
            + [lambda d=d: tk.test_gdn_step_half(None, d) for d in (mx.float16, mx.bfloat16)]
            + [lambda: tk.test_gdn_step_degenerate_inputs(None)]
            + [lambda h=h, m=m: tk.test_gdn_step_model_heads(None, h, m) for h, m in tk.MODEL_HEADS]
        )
    if kernel == "dynamic_conv":
        return [lambda s=s: tk.test_dynamic_conv_forward(None, s) for s in tk.CONV_SHAPES] + [
            lambda d=d: tk.test_dynamic_conv_half(None, d) for d in (mx.float16, mx.bfloat16)
        ]
    return [
        lambda s=s, f=f: tk.test_dynamic_conv_gradients(None, s, f)
        for s, f in [
            ((1, 1, 8, 4), True),
            ((2, 2, 40, 4), True),
            ((2, 13, 12, 2), False),
            ((1, 6, 33, 4), True),
        ]
    ] + [lambda: tk.test_dynamic_conv_gradients_bfloat16(None)]


def self_check_verdict(kernel, factory):
    """What the first-use self-check says of the mutant ('ok ...' or 'fallback: ...')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the self-check's fallback warning
            kernels.configure(factory=factory, metal_available=True)
            kernels.KERNELS[kernel].ready()
            return kernels.KERNELS[kernel].status
    finally:
        kernels.configure()


def failing_test(kernel, factory, monkeypatch):
    """The first kernel test that fails on the mutant, the self-check bypassed (every kernel
    trusted as built), or None."""
    for k in kernels.KERNELS.values():
        monkeypatch.setattr(k, "check", lambda fn: (0.0, 1.0))
    try:
        for test in kernel_tests(kernel):
            kernels.configure(factory=factory, metal_available=True)
            try:
                test()
            except Exception as e:  # AssertionError, or an emulator error
                return f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        return None
    finally:
        kernels.configure()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_killed(mutant, monkeypatch):
    """By the self-check on first use, and by the kernel tests on their own."""
    name, kernel, file, find, replace = mutant
    monkeypatch.delenv(kernels.ENV, raising=False)
    factory = mutant_factory(kernel, file, find, replace)
    status = self_check_verdict(kernel, factory)
    test = failing_test(kernel, factory, monkeypatch)
    RESULTS[name] = (
        (
            "self-check: " + status.removeprefix("fallback: ")[:60]
            if status.startswith("fallback")
            else "self-check: passed"
        )
        + " | tests: "
        + (test or "passed")
    )
    assert status.startswith("fallback") or test, f"mutant '{name}' of {kernel} survived"
    assert test, f"mutant '{name}' of {kernel} passes the kernel tests (the self-check caught it)"
    assert status.startswith("fallback"), (
        f"mutant '{name}' of {kernel} passes the first-use self-check (the tests caught it)"
    )
