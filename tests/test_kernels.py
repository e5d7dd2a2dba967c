"""mlx_sleep.kernels: every Metal kernel, run on the CPU through tests/metal_emulator, against its
ops fallback and a naive reference; plus the dispatch (self-check, forced fallback, no Metal).

Tolerances (tests/numerics.py: max |error| against the reference's largest |value|): float32
1e-5 against the fallback and the naive float32 reference (measured <= 1e-6 of the scale). In
half precision the kernels accumulate in float32 and round once, the ops fallback rounds after
every op, so both are compared to the float32 naive reference on the same (rounded) inputs with
a bound of 4 ulps of the largest output: float16 2^-8 (4e-3), bfloat16 2^-5 (3.1e-2) (measured:
at most 1-2 ulps).
"""

import math
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_sleep import kernels
from mlx_sleep.gdn_math import GDN_CHUNK
from tests.metal_emulator import metal_kernel
from tests.numerics import assert_close

TOL = {mx.float32: 1e-5, mx.float16: 2**-8, mx.bfloat16: 2**-5}  # of the outputs' scale


SELF_CHECKS = {}  # kernel name -> its self-check's (diff, tolerance) on the shipped sources


def remembered_check(kernel):
    """The kernel's self-check, run once per session (every test's configure() forgets the
    verdict, and the self-checks cover every model's heads: seconds per kernel emulated).
    test_kernel_report_runs_the_self_checks runs them afresh, test_kernel_mutants on mutants."""
    check = kernel.check

    def remembered(fn):
        if kernel.name not in SELF_CHECKS:
            SELF_CHECKS[kernel.name] = check(fn)
        return SELF_CHECKS[kernel.name]

    return remembered


@pytest.fixture
def emulated(monkeypatch):
    """The kernels run through the CPU emulator as if Metal were there."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    for k in kernels.KERNELS.values():
        monkeypatch.setattr(k, "check", remembered_check(k))
    kernels.configure(factory=metal_kernel, metal_available=True)
    yield
    kernels.configure()


def max_diff(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def randn(shape, seed, dtype=mx.float32, scale=1.0):
    return (scale * mx.random.normal(shape, key=mx.random.key(seed))).astype(dtype)


# ------------------------------------------------------------------ naive references


def naive_conv(x, conv_state, kern, silu):
    """y[t] = sum_w kern[t, w] padded[t + w], token by token, in float32."""
    x, conv_state, kern = (a.astype(mx.float32) for a in (x, conv_state, kern))
    T, W = x.shape[1], kern.shape[-1]
    seq = mx.concatenate([conv_state, x], axis=1)
    ys = []
    for t in range(T):
        acc = mx.zeros(x[:, 0].shape)
        for w in range(W):
            acc = acc + kern[:, t, :, w] * seq[:, t + w]
        ys.append(acc / (1 + mx.exp(-acc)) if silu else acc)
    return mx.stack(ys, axis=1), seq[:, T:]


def naive_gdn_step(q, k, v, a, b, A_log, dt_bias, S, gate, weight, eps):
    """The decode step from the equations, head by head with explicit matrices, in float32."""
    q, k, v, a, b, S, gate = (t.astype(mx.float32) for t in (q, k, v, a, b, S, gate))
    B, _, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    ys, S_new = [], []
    for h in range(Hv):
        kh = h // (Hv // Hk)
        qh = q[:, 0, kh] / mx.sqrt((q[:, 0, kh] ** 2).sum(-1, keepdims=True) + 1e-6) / math.sqrt(Dk)
        kt = k[:, 0, kh] / mx.sqrt((k[:, 0, kh] ** 2).sum(-1, keepdims=True) + 1e-6)
        decay = mx.exp(-mx.exp(A_log[h]) * mx.log(1 + mx.exp(a[:, 0, h] + dt_bias[h])))
        beta = 1 / (1 + mx.exp(-b[:, 0, h]))
        kkT = kt[:, :, None] * kt[:, None, :]
        Sh = decay[:, None, None] * (S[:, h] @ (mx.eye(Dk) - beta[:, None, None] * kkT)) + beta[
            :, None, None
        ] * (v[:, 0, h][:, :, None] * kt[:, None, :])
        o = (Sh @ qh[:, :, None])[..., 0]
        o = o / mx.sqrt((o * o).mean(-1, keepdims=True) + eps) * weight
        g = gate[:, 0, h]
        ys.append(o * g / (1 + mx.exp(-g)))
        S_new.append(Sh)
    return mx.stack(ys, axis=1)[:, None], mx.stack(S_new, axis=1)


# ------------------------------------------------------------------ Jet dynamic conv


def conv_inputs(B, T, C, W, dtype, seed=0):
    return (
        randn((B, T, C), seed, dtype),
        randn((B, W - 1, C), seed + 1, dtype),
        randn((B, T, C, W), seed + 2, dtype, 0.5),
    )


CONV_SHAPES = [  # B, T, C, W
    (1, 1, 8, 4),  # the decode step
    (2, 2, 40, 4),  # T < W - 1: part of the new state comes from the old one
    (2, 37, 12, 2),  # T a multiple of nothing, short conv
    (1, 9, 300, 4),  # C over one threadgroup (256) with a partial second
]


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_dynamic_conv_forward(emulated, shape):
    x, state, kern = conv_inputs(*shape, mx.float32)
    for silu in (True, False) if shape[1] == 1 else (True,):
        y, new_state = kernels.dynamic_conv(x, state, kern, silu=silu)
        y_ops, s_ops = kernels.dynamic_conv_ops(x, state, kern, silu=silu)
        y_ref, s_ref = naive_conv(x, state, kern, silu)
        assert y.shape == y_ops.shape and new_state.shape == s_ops.shape
        assert_close(y, y_ops, rtol=1e-5, what="y vs ops")
        assert_close(y, y_ref, rtol=1e-5, what="y vs naive")
        assert max_diff(new_state, s_ops) == 0 and max_diff(new_state, s_ref) == 0
    assert kernels.KERNELS["dynamic_conv"].status.startswith("ok")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_dynamic_conv_half(emulated, dtype):
    x, state, kern = conv_inputs(2, 11, 24, 4, dtype)
    y, new_state = kernels.dynamic_conv(x, state, kern, silu=True)
    y_ops, s_ops = kernels.dynamic_conv_ops(x, state, kern, silu=True)
    y_ref, _ = naive_conv(x, state, kern, True)
    assert y.dtype == y_ops.dtype == dtype and new_state.dtype == s_ops.dtype
    assert_close(y, y_ref, rtol=TOL[dtype], what="y vs naive")
    assert_close(y_ops, y_ref, rtol=TOL[dtype], what="ops vs naive")
    assert max_diff(new_state, s_ops) == 0
    # a fresh (float32) state fed half-precision tokens takes their dtype: a float32 state would
    # turn the layer's output, and the model's residual stream after it, into float32
    y, new_state = kernels.dynamic_conv(x[:, :1], state.astype(mx.float32), kern[:, :1], silu=True)
    y_ops, s_ops = kernels.dynamic_conv_ops(x[:, :1], state.astype(mx.float32), kern[:, :1], True)
    assert y.dtype == y_ops.dtype == new_state.dtype == s_ops.dtype == dtype
    assert_close(y, y_ops, rtol=TOL[dtype], what="fresh state y")


def conv_vjps(fn, x, state, kern, silu, seed=9):
    """Gradients of <y, dy> + <new_state, dstate> w.r.t. (x, conv_state, kern)."""
    y, s = fn(x, state, kern, silu)
    dy, ds = randn(y.shape, seed, y.dtype), randn(s.shape, seed + 1, s.dtype)
    return mx.vjp(lambda *p: fn(*p, silu), [x, state, kern], [dy, ds])[1]


@pytest.mark.parametrize(
    "shape,silu",
    [((1, 1, 8, 4), True), ((2, 2, 40, 4), True), ((2, 13, 12, 2), False), ((1, 6, 33, 4), True)],
)
def test_dynamic_conv_gradients(emulated, shape, silu):
    x, state, kern = conv_inputs(*shape, mx.float32)
    grads = conv_vjps(kernels.dynamic_conv, x, state, kern, silu)
    ops = conv_vjps(kernels.dynamic_conv_ops, x, state, kern, silu)
    ref = conv_vjps(naive_conv, x, state, kern, silu)
    for g, g_ops, g_ref in zip(grads, ops, ref):
        assert g.shape == g_ops.shape
        assert_close(g, g_ops, rtol=1e-5, what="grad vs ops")
        assert_close(g, g_ref, rtol=1e-5, what="grad vs naive")
    assert kernels.KERNELS["dynamic_conv_backward"].status.startswith("ok")


def test_dynamic_conv_gradients_bfloat16(emulated):
    x, state, kern = conv_inputs(1, 7, 16, 4, mx.bfloat16)
    grads = conv_vjps(kernels.dynamic_conv, x, state, kern, True)
    ref = conv_vjps(naive_conv, x, state, kern, True)
    for g, g_ref in zip(grads, ref):
        assert g.dtype == mx.bfloat16
        assert_close(g, g_ref, rtol=TOL[mx.bfloat16], what="grad vs naive")


# ------------------------------------------------------------------ fused GDN step


def gdn_inputs(B, Hk, Hv, Dk, Dv, dtype, seed=0):
    f32 = mx.float32
    return (
        randn((B, 1, Hk, Dk), seed, dtype),
        randn((B, 1, Hk, Dk), seed + 1, dtype),
        randn((B, 1, Hv, Dv), seed + 2, dtype),
        randn((B, 1, Hv), seed + 3, dtype),
        randn((B, 1, Hv), seed + 4, dtype),
        mx.log(mx.random.uniform(1, 16, (Hv,), key=mx.random.key(seed + 5))),
        mx.random.uniform(-6, -2, (Hv,), key=mx.random.key(seed + 6)),
        randn((B, Hv, Dv, Dk), seed + 7, f32, 0.3),
        randn((B, 1, Hv, Dv), seed + 8, dtype),
        1 + randn((Dv,), seed + 9, f32, 0.1),
        1e-5,
    )


GDN_SHAPES = [  # B, Hk, Hv, Dk, Dv
    (1, 2, 2, 8, 8),  # MHA-style heads, Dk < 32 lanes
    (2, 1, 4, 8, 6),  # GVA 4:1
    (1, 2, 4, 40, 36),  # GVA 2:1; Dk over 32 lanes, Dv over 32 rows (two row passes)
    (1, 1, 2, 64, 64),  # full lanes, two key entries per lane
]


@pytest.mark.parametrize("shape", GDN_SHAPES)
def test_gdn_step(emulated, shape):
    args = gdn_inputs(*shape, mx.float32)
    y, S = kernels.gdn_step(*args)
    y_ops, S_ops = kernels.gdn_step_ops(*args)
    y_ref, S_ref = naive_gdn_step(*args)
    assert y.shape == y_ops.shape and S.shape == S_ops.shape and S.dtype == S_ops.dtype
    assert_close(y, y_ops, rtol=1e-5, what="y vs ops")
    assert_close(y, y_ref, rtol=1e-5, what="y vs naive")
    assert_close(S, S_ops, rtol=1e-5, what="S vs ops")
    assert_close(S, S_ref, rtol=1e-5, what="S vs naive")
    assert kernels.KERNELS["gdn_step"].status.startswith("ok")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_gdn_step_half(emulated, dtype):
    args = gdn_inputs(2, 1, 2, 16, 12, dtype)  # float32 state and norm weight, as in the layer
    y, S = kernels.gdn_step(*args)
    y_ops, S_ops = kernels.gdn_step_ops(*args)
    y_ref, S_ref = naive_gdn_step(*args)
    assert y.dtype == y_ops.dtype and S.dtype == S_ops.dtype
    assert_close(y, y_ref, rtol=TOL[dtype], what="y vs naive")
    assert_close(y_ops, y_ref, rtol=TOL[dtype], what="ops vs naive")
    assert_close(S, S_ref, rtol=TOL[dtype], what="S vs naive")


def test_gdn_step_gradient_uses_ops_vjp(emulated):
    # inference kernel, but a T == 1 chunk under mx.grad must still differentiate
    args = gdn_inputs(1, 1, 2, 8, 8, mx.float32)

    def loss(step, q, S):
        y, S = step(q, *args[1:7], S, *args[8:])
        return (y * y).sum() + S.sum()

    g = mx.grad(lambda q, S: loss(kernels.gdn_step, q, S), argnums=(0, 1))(args[0], args[7])
    g_ops = mx.grad(lambda q, S: loss(kernels.gdn_step_ops, q, S), argnums=(0, 1))(args[0], args[7])
    assert_close(list(g), list(g_ops), rtol=1e-5, what="grads")


# ------------------------------------------------------------------ the GDN recurrence

GATED_DELTA_CASES = [  # B, T, Hk, Hv, Dk, Dv, gates
    (1, GDN_CHUNK + 9, 3, 3, 24, 64, "mixed"),  # Jet-2B (12 x Dk 96 x Dv 256) scaled down
    (2, 7, 1, 4, 40, 12, "mixed"),  # GVA 4:1, T < a chunk, Dk over 32 lanes
    (1, 2 * GDN_CHUNK, 2, 4, 8, 6, "mixed"),  # GVA 2:1, chunks exactly full
    (1, 13, 1, 2, 16, 8, "decay near 0"),
    (1, GDN_CHUNK + 1, 1, 2, 16, 8, "decay near 1"),
    (1, 9, 1, 2, 16, 40, "beta near 1, repeated keys"),  # Dv over 32 rows
]


def gated_delta_vjps(fn, args, passes=1, seed=30):
    """Gradients of <y_1, dy_1> + ... + <y_N, dy_N> + <S_N, dS> w.r.t. the six inputs, for N
    chained passes over the same tokens (each starts from the last one's state, as in sleep)."""

    def run(q, k, v, decay, beta, state):
        ys = []
        for _ in range(passes):
            y, state = fn(q, k, v, decay, beta, state)
            ys.append(y)
        return mx.stack(ys), state

    q, k, v, state = args[0], args[1], args[2], args[5]
    ys_shape = (passes, *v.shape)  # one forward: the outputs come with the VJP
    cot = [randn(ys_shape, seed, mx.result_type(q, k, v)), randn(state.shape, seed + 1)]
    outs, grads = mx.vjp(run, list(args), cot)
    return outs, grads


@pytest.mark.parametrize("case", GATED_DELTA_CASES, ids=lambda c: f"{c[:6]}-{c[6]}")
def test_gated_delta_kernels(emulated, case):
    from tests.naive import delta_rule
    from tests.test_gated_delta import recurrence_inputs

    args = recurrence_inputs(*case)
    passes = 3 if case[-1] == "mixed" and case[-2] < 64 else 1  # N chained passes
    (ys, S), grads = gated_delta_vjps(kernels.gated_delta, args, passes)
    (ys_ops, S_ops), grads_ops = gated_delta_vjps(
        lambda *a: kernels.gated_delta(*a, use_kernel=False), args, passes
    )
    y_ref, S_ref = delta_rule(*(a.astype(mx.float64) for a in args))
    assert_close(ys, ys_ops, rtol=1e-5, what="ys vs ops")
    assert_close(S, S_ops, rtol=1e-5, what="S vs ops")
    assert_close(ys[0], y_ref, rtol=1e-5, what="y vs naive")
    if passes == 1:
        assert_close(S, S_ref, rtol=1e-5, what="S vs naive")
    for name, g, g_ops in zip(("q", "k", "v", "decay", "beta", "state"), grads, grads_ops):
        assert g.shape == g_ops.shape and g.dtype == g_ops.dtype, name
        assert_close(g, g_ops, rtol=1e-5, what=name)
    assert kernels.KERNELS["gated_delta"].status.startswith("ok")
    assert kernels.KERNELS["gated_delta_backward"].status.startswith("ok")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_gated_delta_kernels_half(emulated, dtype):
    from tests.test_gated_delta import recurrence_inputs

    args = [a.astype(dtype) for a in recurrence_inputs(1, GDN_CHUNK + 4, 1, 2, 24, 16)]
    (ys, S), grads = gated_delta_vjps(kernels.gated_delta, args)
    (ys_ops, S_ops), grads_ops = gated_delta_vjps(
        lambda *a: kernels.gated_delta(*a, use_kernel=False), args
    )
    assert ys.dtype == dtype and S.dtype == mx.float32
    assert_close(ys, ys_ops, rtol=TOL[dtype], what="ys vs ops")
    assert_close(S, S_ops, rtol=1e-5, what="S vs ops")
    for g, g_ops in zip(grads, grads_ops):  # float32 inside: differ by the final rounding only
        assert g.dtype == dtype
        assert_close(g, g_ops, rtol=TOL[dtype], what="grad vs ops")


# ------------------------------------------------------------------ the converted models' heads

MODEL_HEADS = sorted(kernels.model_head_shapes().items())  # ((Hk, Hv, Dk, Dv), model)


def rel_diff(a, b):
    """max |a - b| relative to b's largest magnitude (at least 1)."""
    return max_diff(a, b) / max(1.0, mx.abs(b.astype(mx.float32)).max().item())


def test_every_converter_declares_its_gdn_heads():
    from mlx_sleep.convert import CONVERTERS

    assert set(CONVERTERS) == set(kernels.MODEL_GDN_HEADS)  # a new architecture adds its heads
    shapes = kernels.model_head_shapes()
    assert shapes[(12, 12, 96, 256)] == "Jet-Nemotron 2B" and (16, 32, 128, 128) in shapes
    for Hk, Hv, Dk, Dv in shapes:  # the self-checks run each on two key heads, GVA kept
        hk, hv = kernels._self_check_heads(Hk, Hv)
        assert hv // hk == Hv // Hk and hk == min(Hk, 2)
        assert (1, 2, hk, hv, Dk, Dv, mx.float32) in kernels.GDN_CHECK_SHAPES
        assert (1, hk, hv, Dk, Dv, mx.float32) in kernels.GDN_STEP_CHECK_SHAPES


@pytest.mark.parametrize("heads,model", MODEL_HEADS, ids=[m for _, m in MODEL_HEADS])
def test_gated_delta_kernels_model_heads(emulated, heads, model):
    """Forward and backward on every head of the model (three tokens): threadgroup memory sized
    for its Dk and Dv, the head indexing of its Hk and Hv."""
    from tests.test_gated_delta import recurrence_inputs

    args = recurrence_inputs(1, 3, *heads)
    (ys, S), grads = gated_delta_vjps(kernels.gated_delta, args)
    (ys_ops, S_ops), grads_ops = gated_delta_vjps(
        lambda *a: kernels.gated_delta(*a, use_kernel=False), args
    )
    assert rel_diff(ys, ys_ops) < 1e-5 and rel_diff(S, S_ops) < 1e-5
    for name, g, g_ops in zip(("q", "k", "v", "decay", "beta", "state"), grads, grads_ops):
        assert rel_diff(g, g_ops) < kernels.GDN_BWD_RTOL_F32, name
    assert kernels.KERNELS["gated_delta_backward"].status.startswith("ok")


@pytest.mark.parametrize("heads,model", MODEL_HEADS, ids=[m for _, m in MODEL_HEADS])
def test_gdn_step_model_heads(emulated, heads, model):
    args = gdn_inputs(1, *heads, mx.float32)
    y, S = kernels.gdn_step(*args)
    y_ops, S_ops = kernels.gdn_step_ops(*args)
    y_ref, S_ref = naive_gdn_step(*args)
    assert rel_diff(y, y_ops) < 1e-5 and rel_diff(y, y_ref) < 1e-5
    assert rel_diff(S, S_ops) < 1e-5 and rel_diff(S, S_ref) < 1e-5
    assert kernels.KERNELS["gdn_step"].status.startswith("ok")


# ------------------------------------------------------------------ degenerate inputs


def test_gated_delta_degenerate_inputs(emulated):
    """All-zero q rows (token 0) and k rows (token 1), beta 0 (token 1), decay 0 and 1, beta 1
    and 2 (its largest, OLMo Hybrid's allow_neg_eigval) on tokens 2 to 5."""
    from tests.naive import delta_rule
    from tests.test_gated_delta import recurrence_inputs

    q, k, v, decay, beta, state = recurrence_inputs(2, 7, 2, 4, 40, 36)
    q[:, 0] = 0.0
    k[:, 1] = 0.0
    beta[:, 1] = 0.0
    decay[:, 2] = 0.0
    decay[:, 3] = 1.0
    beta[:, 4] = 1.0
    beta[:, 5] = 2.0
    args = (q, k, v, decay, beta, state)
    (ys, S), grads = gated_delta_vjps(kernels.gated_delta, args)
    (ys_ops, S_ops), grads_ops = gated_delta_vjps(
        lambda *a: kernels.gated_delta(*a, use_kernel=False), args
    )
    y_ref, S_ref = delta_rule(*(a.astype(mx.float64) for a in args))
    assert max_diff(ys[0, :, 0], mx.zeros_like(ys[0, :, 0])) == 0  # y = S q = 0 for q = 0
    assert rel_diff(ys[0], y_ref) < 1e-5 and rel_diff(S, S_ref) < 1e-5
    assert rel_diff(ys, ys_ops) < 1e-5 and rel_diff(S, S_ops) < 1e-5
    for name, g, g_ops in zip(("q", "k", "v", "decay", "beta", "state"), grads, grads_ops):
        assert not mx.isnan(g).any().item(), name
        assert rel_diff(g, g_ops) < kernels.GDN_BWD_RTOL_F32, name
    assert kernels.KERNELS["gated_delta"].status.startswith("ok")
    assert kernels.KERNELS["gated_delta_backward"].status.startswith("ok")


def test_gdn_step_degenerate_inputs(emulated):
    """An all-zero q row and an all-zero k row (the L2 norm's epsilon keeps them 0, not NaN), and
    the gates at their ends: decay 1 and 0, beta 0 and 1."""
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 40, 36
    q, k, v, a, b, *rest = gdn_inputs(B, Hk, Hv, Dk, Dv, mx.float32)
    q[0, 0, 0] = 0.0
    k[1, 0, 1] = 0.0
    a = mx.broadcast_to(mx.array([-100.0, 100.0, 0.0, 0.0]), a.shape)  # decay 1, 0
    b = mx.broadcast_to(mx.array([0.0, 0.0, -100.0, 100.0]), b.shape)  # beta 0, 1
    args = (q, k, v, a, b, *rest)
    y, S = kernels.gdn_step(*args)
    y_ops, S_ops = kernels.gdn_step_ops(*args)
    y_ref, S_ref = naive_gdn_step(*args)
    assert not mx.isnan(y).any().item() and not mx.isnan(S).any().item()
    assert max_diff(y[0, 0, :2], mx.zeros_like(y[0, 0, :2])) == 0  # zero q: o = 0, y = 0
    assert rel_diff(y, y_ops) < 1e-5 and rel_diff(y, y_ref) < 1e-5
    assert rel_diff(S, S_ops) < 1e-5 and rel_diff(S, S_ref) < 1e-5
    assert kernels.KERNELS["gdn_step"].status.startswith("ok")


# ------------------------------------------------------------------ a window's length


def test_gated_delta_kernels_long_window(emulated):
    """T = 2081 (a 2,000-token window and more: 65 chunks, the last partial), forward and
    backward against the ops; one head (the heads are independent threadgroups)."""
    from tests.test_gated_delta import recurrence_inputs

    args = recurrence_inputs(1, 65 * GDN_CHUNK + 1, 1, 1, 40, 4)
    (ys, S), grads = gated_delta_vjps(kernels.gated_delta, args)
    (ys_ops, S_ops), grads_ops = gated_delta_vjps(
        lambda *a: kernels.gated_delta(*a, use_kernel=False), args
    )
    assert rel_diff(ys, ys_ops) < 1e-5 and rel_diff(S, S_ops) < 1e-5
    for name, g, g_ops in zip(("q", "k", "v", "decay", "beta", "state"), grads, grads_ops):
        assert rel_diff(g, g_ops) < kernels.GDN_BWD_RTOL_F32, name


# ------------------------------------------------------------------ through the layers


def test_layers_route_through_kernels(emulated, monkeypatch):
    """Jet chunk (forward + parameter grads) and decode tokens of both layers: kernels on ==
    kernels off."""
    from mlx_sleep.layers.gated_deltanet import GatedDeltaNet, JetBlock

    mx.random.seed(3)
    for layer in (
        JetBlock(16, 1, 2, 8, 6, 4, generator_reduction=4),
        GatedDeltaNet(16, 1, 2, 8, 6, 4),
    ):
        x = randn((1, 5, 16), 4)
        state = layer.initial_state(1)
        state["S"] = randn(state["S"].shape, 5, scale=0.3)

        def run():
            y, s = layer(x, state)  # a chunk
            outs = [y]
            for t in range(2):  # then decode tokens
                y, s = layer(x[:, t : t + 1], s)
                outs.append(y)
            return [*outs, s["S"], s["conv"]], param_grads(layer, x, state)

        on, grads_on = run()
        monkeypatch.setenv(kernels.ENV, "0")
        off, grads_off = run()
        monkeypatch.delenv(kernels.ENV)
        assert_close(on, off, rtol=1e-5, what="outputs and states")
        for name, g in grads_on.items():
            assert_close(g, grads_off[name], rtol=1e-5, what=name)
    assert all(k.status.startswith("ok") for k in kernels.KERNELS.values())


def param_grads(layer, x, state):
    def loss(model):
        y, s = model(x, state)
        return (y * y).sum() + s["S"].sum()

    return dict(tree_flatten(nn.value_and_grad(layer, loss)(layer)[1]))


# ------------------------------------------------------------------ dispatch


def test_every_metal_source_is_a_registered_kernel():
    shipped = {p.name for p in Path(kernels.metal_dir()).glob("*.metal")}
    assert shipped == {k.source for k in kernels.KERNELS.values()}


def patched_factory(find, replace, calls=None):
    """The emulator, with one kernel's source edited."""

    def factory(**kw):
        if calls is not None:
            calls.append(kw["name"])
        if kw["name"] == "mlx_sleep_dynamic_conv":
            assert find in kw["source"]
            kw["source"] = kw["source"].replace(find, replace)
        return metal_kernel(**kw)

    return factory


@pytest.mark.parametrize(
    "find,replace,why",
    [
        ("SILU ? silu_f(acc) : acc", "SILU ? silu_f(acc) : 1.01f * acc", "self-check mismatch"),
        ("const int T = x_shape[1];", "const int T = x_shape[1] +;", "failed"),  # compile error
    ],
)
def test_broken_kernel_warns_once_and_falls_back(monkeypatch, find, replace, why):
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.configure(factory=patched_factory(find, replace), metal_available=True)
    try:
        x, state, kern = conv_inputs(1, 3, 8, 4, mx.float32)
        with pytest.warns(RuntimeWarning, match="dynamic_conv.*" + why):
            y, _ = kernels.dynamic_conv(x, state, kern)
        assert max_diff(y, kernels.dynamic_conv_ops(x, state, kern)[0]) == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process: no second warning
            kernels.dynamic_conv(x, state, kern)
        assert kernels.KERNELS["dynamic_conv"].status.startswith("fallback: " + why)
        # the other kernels are unaffected
        assert kernels.gdn_step(*gdn_inputs(1, 1, 1, 8, 8, mx.float32))
        assert kernels.KERNELS["gdn_step"].status.startswith("ok")
    finally:
        kernels.configure()


def refusing_factory(**kw):
    raise AssertionError("no kernel may be built")


@pytest.mark.parametrize("why", ["env", "no metal"])
def test_fallback_without_building(monkeypatch, why):
    if why == "env":
        monkeypatch.setenv(kernels.ENV, "0")
        kernels.configure(factory=refusing_factory, metal_available=True)
    else:
        monkeypatch.delenv(kernels.ENV, raising=False)
        kernels.configure(factory=refusing_factory, metal_available=False)
    try:
        x, state, kern = conv_inputs(1, 3, 8, 4, mx.float32)
        y, _ = kernels.dynamic_conv(x, state, kern, silu=True)
        assert max_diff(y, kernels.dynamic_conv_ops(x, state, kern, silu=True)[0]) == 0
        args = gdn_inputs(1, 1, 1, 8, 8, mx.float32)
        assert max_diff(kernels.gdn_step(*args)[0], kernels.gdn_step_ops(*args)[0]) == 0
        report = kernels.kernel_report()
        assert ("forced" if why == "env" else "no Metal") in report[0]
        assert all(line.split()[-1] == "fallback" for line in report[1:])
        assert all(k.status == "not used yet" for k in kernels.KERNELS.values())
    finally:
        kernels.configure()


def test_metal_detection(monkeypatch):
    kernels.configure()
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert not kernels.metal_available()
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert kernels.metal_available()
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert not kernels.metal_available()  # a CPU default device cannot launch Metal kernels


def test_self_check_stops_at_the_first_output_over_its_tolerance():
    ran = []

    def cases(slots):  # each case yields one (diff, tolerance) per output slot
        for i, checks in enumerate(slots):
            ran.append(i)
            yield checks

    check = kernels._self_check(cases)
    assert check([[(1.0, 4.0)], [(1.0, 2.0), (3.0, 1.0)], [(0.0, 1.0)]]) == (3.0, 1.0)
    assert ran == [0, 1]  # the third case never ran
    nan = check([[(float("nan"), 1.0)], [(5.0, 1.0)]])
    assert nan[0] != nan[0]
    assert check([[(1.0, 4.0), (1.0, 2.0)], [(0.0, 1.0)]]) == (1.0, 2.0)  # all pass: the nearest


def test_kernel_report_runs_the_self_checks(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.configure(factory=metal_kernel, metal_available=True)  # self-checks run afresh
    try:
        lines = kernels.kernel_report()
    finally:
        kernels.configure()
    assert "self-checked" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(kernels.KERNELS)
    assert all("ok (self-check max abs diff" in line for line in lines[1:])
