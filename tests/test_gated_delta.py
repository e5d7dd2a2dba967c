"""Our Gated DeltaNet op (kernels.gated_delta): forward and VJP against the naive float64
recurrence (tests/naive.py), the float32 dtype rule, and the layers' use of it.

The Metal kernels of the op run through the CPU emulator in test_kernels.py; here is the ops
path (the one every non-Metal run takes) and what it must guarantee whatever the path."""

import math

import mlx.core as mx
import pytest

from mlx_sleep import kernels
from mlx_sleep.gdn_math import GDN_CHUNK, gated_delta_ops, l2_normalize

from . import naive
from .numerics import assert_close

F64 = mx.float64


def max_diff(a, b):
    return mx.abs(a.astype(F64) - b.astype(F64)).max().item()


def rand(shape, seed, lo=None, hi=None):
    key = mx.random.key(seed)
    if lo is not None:
        return mx.random.uniform(lo, hi, shape, key=key)
    return mx.random.normal(shape, key=key)


def recurrence_inputs(B, T, Hk, Hv, Dk, Dv, gates="mixed", seed=0):
    """float32 (q, k, v, decay, beta, state), q and k normalised as the layers do."""
    q = l2_normalize(rand((B, T, Hk, Dk), seed)) * Dk**-0.5
    k = l2_normalize(rand((B, T, Hk, Dk), seed + 1))
    v = rand((B, T, Hv, Dv), seed + 2)
    decay = rand((B, T, Hv), seed + 3, 0.3, 1.0)
    beta = rand((B, T, Hv), seed + 4, 0.0, 1.0)
    if gates == "decay near 0":
        decay = rand((B, T, Hv), seed + 3, 1e-4, 1e-2)
    elif gates == "decay near 1":
        decay = 1 - rand((B, T, Hv), seed + 3, 1e-5, 1e-3)
    elif gates == "beta near 1, repeated keys":
        # (I - b k k^T) with b -> 1 projects k out: S k is overwritten by v every token
        k = mx.broadcast_to(k[:, :1], k.shape)
        beta = 1 - rand((B, T, Hv), seed + 4, 1e-6, 1e-3)
    state = rand((B, Hv, Dv, Dk), seed + 5) * 0.5
    return q, k, v, decay, beta, state


CASES = [  # B, T, Hk, Hv, Dk, Dv, gates
    (1, 5, 2, 2, 8, 8, "mixed"),  # T < chunk: one partial chunk
    (2, GDN_CHUNK + 7, 1, 3, 12, 16, "mixed"),  # GVA 3:1, a full and a partial chunk
    (1, 2 * GDN_CHUNK, 2, 4, 8, 6, "mixed"),  # GVA 2:1, chunks exactly full
    (1, 11, 1, 2, 8, 8, "decay near 0"),
    (1, GDN_CHUNK + 3, 1, 2, 8, 8, "decay near 1"),
    (2, 9, 1, 2, 8, 4, "beta near 1, repeated keys"),
]


def f64(*xs):
    return [x.astype(F64) for x in xs]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:6]}-{c[6]}")
def test_forward_matches_naive(case):
    args = recurrence_inputs(*case)
    y, S = kernels.gated_delta(*args)
    y_ref, S_ref = naive.delta_rule(*f64(*args))
    assert y.shape == y_ref.shape and S.shape == S_ref.shape
    assert y.dtype == mx.float32 and S.dtype == mx.float32
    # float32 against float64, short sums: 2e-6 of the scale (~30 ulps; measured <= 2e-7)
    assert_close(y, y_ref, rtol=2e-6, what="y")
    assert_close(S, S_ref, rtol=2e-6, what="S")


def vjp(fn, args, seed=20):
    """Gradients of <y, dy> + <S, dS> w.r.t. all six inputs."""
    y, S = fn(*args)
    dy, dS = rand(y.shape, seed).astype(y.dtype), rand(S.shape, seed + 1).astype(S.dtype)
    return mx.vjp(lambda *p: fn(*p), list(args), [dy, dS])[1]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[:6]}-{c[6]}")
def test_gradients_match_naive(case):
    args = recurrence_inputs(*case)
    grads = vjp(kernels.gated_delta, args)
    ref = vjp(naive.delta_rule, f64(*args))
    for name, g, g_ref in zip(("q", "k", "v", "decay", "beta", "state"), grads, ref):
        assert g.shape == g_ref.shape and g.dtype == mx.float32, name
        assert_close(g, g_ref, rtol=1e-5, what=name)  # measured <= 5e-7 of the scale


def test_backward_keeps_one_state_per_chunk():
    T = 2 * GDN_CHUNK + 1
    *_, saved = gated_delta_ops(*recurrence_inputs(1, T, 1, 2, 8, 8))
    assert saved.shape == (1, 2, 3, 8, 8) and saved.dtype == mx.float32


def test_gradient_peak_memory_is_chunk_states_not_a_state_per_token():
    """The op's forward and VJP as MLX evaluates them: without the ordering in gdn_math, MLX
    held every per-token state (580 states' worth for T = 512); with it, the chunk states, one
    chunk's and the per-token inputs and gradients (T x D each: T / D states): about 100."""
    B, T, H, D = 1, 16 * GDN_CHUNK, 2, 64
    inputs = recurrence_inputs(B, T, H, H, D, D)
    mx.eval(inputs)
    state_bytes = B * H * D * D * 4

    def loss(q, k, v):
        y, S = kernels.gated_delta(q, k, v, *inputs[3:])
        return (y * y).sum() + S.sum()

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(mx.grad(loss, argnums=(0, 1, 2))(*inputs[:3]))
    held = (mx.get_peak_memory() - base) / state_bytes
    assert held < 0.4 * T, f"the gradient held {held:.0f} states for T = {T}"


def test_input_half_dtypes_keep_float32_state():
    q, k, v, decay, beta, state = recurrence_inputs(1, 6, 1, 2, 8, 8)
    half = [x.astype(mx.float16) for x in (q, k, v, decay, beta, state)]
    y, S = kernels.gated_delta(*half)
    assert y.dtype == mx.float16 and S.dtype == mx.float32
    g = mx.grad(lambda *p: kernels.gated_delta(*p)[1].sum(), argnums=(0, 3, 5))(*half)
    assert [x.dtype for x in g] == [mx.float16] * 3  # cotangents in the primals' dtypes


def test_bad_shapes_are_one_clear_error():
    q, k, v, decay, beta, state = recurrence_inputs(1, 4, 2, 3, 8, 8)
    with pytest.raises(ValueError, match="not a multiple of 2 key heads"):
        kernels.gated_delta(q, k, v, decay, beta, state)
    q, k, v, decay, beta, state = recurrence_inputs(1, 4, 1, 2, 8, 8)
    with pytest.raises(ValueError, match=r"decay has shape \(1, 4\), expected \(1, 4, 2\)"):
        kernels.gated_delta(q, k, v, decay[..., 0], beta, state)


# ------------------------------------------------------------------ the dtype rule in bf16


def test_bf16_decay_near_one_is_not_lost():
    """All inputs (raw gate inputs included) and the state in bf16, decay 0.999: cast to bf16,
    as MLX core casts the gates to q's dtype, it rounds to 1.0 and the state never decays. With
    beta ~ 0 the state after T tokens must be decay^T (0.60) of its start."""
    T, bf = 512, mx.bfloat16
    q, k, v, _, _, state = (x.astype(bf) for x in recurrence_inputs(1, T, 1, 1, 8, 8))
    a = mx.full((1, T, 1), math.log(math.expm1(1e-3))).astype(bf)  # softplus(a) ~ 1e-3
    b = mx.full((1, T, 1), -30.0).astype(bf)  # beta = sigmoid(-30) ~ 1e-13
    A_log, dt_bias = mx.zeros((1,), dtype=bf), mx.zeros((1,), dtype=bf)
    decay = math.exp(-math.log1p(math.exp(a[0, 0, 0].item())))
    assert 0.998 < decay < 0.9995 and mx.array(decay).astype(bf).item() == 1.0
    _, S = kernels.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    ratio = (S / state.astype(mx.float32)).mean().item()
    assert_close(ratio, decay**T, rtol=1e-3, what="decay of S")


def bf16_layer_inputs(B, T, Hk, Hv, Dk, Dv, seed=0):
    """Raw (pre-norm, pre-gate) bf16 inputs of a GDN layer with decays near 1 (0.995-0.9999)."""
    bf = mx.bfloat16
    q, k = rand((B, T, Hk, Dk), seed).astype(bf), rand((B, T, Hk, Dk), seed + 1).astype(bf)
    v = rand((B, T, Hv, Dv), seed + 2).astype(bf)
    A_log = mx.log(rand((Hv,), seed + 3, 1, 4)).astype(bf)
    decay_target = 1 - rand((B, T, Hv), seed + 4, 1e-4, 5e-3)  # a = exp(-A softplus(x))
    x = -decay_target.log() / A_log.astype(mx.float32).exp()
    a = (x + (-mx.expm1(-x)).log()).astype(bf)  # inverse softplus, dt_bias = 0
    b = rand((B, T, Hv), seed + 5, -4, 0).astype(bf)
    dt_bias = mx.zeros((Hv,), dtype=bf)
    state = (rand((B, Hv, Dv, Dk), seed + 6) * 0.5).astype(bf)
    return q, k, v, a, b, A_log, dt_bias, state


def float32_reference_state(q, k, v, a, b, A_log, dt_bias, state):
    """The same bf16 numbers, upcast, through the naive float64 recurrence."""
    q, k, v, a, b, A_log, dt_bias, state = f64(q, k, v, a, b, A_log, dt_bias, state)
    Dk = q.shape[-1]
    q = q / mx.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / math.sqrt(Dk)
    k = k / mx.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    decay = mx.exp(-mx.exp(A_log) * mx.log(1 + mx.exp(a + dt_bias)))
    beta = 1 / (1 + mx.exp(-b))
    return naive.delta_rule(q, k, v, decay, beta, state)[1]


@pytest.mark.parametrize("emulate", [False, True], ids=["ops", "emulated kernels"])
def test_bf16_pass_decode_and_float32_reference_agree(emulate, monkeypatch):
    """The issue's test: everything bf16, long chunks, decays near 1. The multi-token pass and
    token-by-token decode (the layer's fused step) keep S within bf16 tolerance of the float32
    reference."""
    if emulate:
        from tests.metal_emulator import metal_kernel

        monkeypatch.delenv(kernels.ENV, raising=False)
        kernels.configure(factory=metal_kernel, metal_available=True)
    try:
        T = 2 * GDN_CHUNK + 5
        q, k, v, a, b, A_log, dt_bias, state = bf16_layer_inputs(1, T, 1, 2, 16, 8)
        S_ref = float32_reference_state(q, k, v, a, b, A_log, dt_bias, state)
        scale = mx.abs(S_ref).max().item()

        qn, kn = l2_normalize(q) * 16**-0.5, l2_normalize(k)
        _, S_pass = kernels.gated_delta_update(qn, kn, v, a, b, A_log, dt_bias, state)
        assert S_pass.dtype == mx.float32

        S_dec = state
        gate = mx.ones((1, 1, 2, 8), dtype=mx.bfloat16)
        for t in range(T):
            _, S_dec = kernels.gdn_step(
                q[:, t : t + 1],
                k[:, t : t + 1],
                v[:, t : t + 1],
                a[:, t : t + 1],
                b[:, t : t + 1],
                A_log,
                dt_bias,
                S_dec,
                gate,
                mx.ones((8,)),
                1e-6,
            )
            assert S_dec.dtype == mx.float32
        if emulate:
            assert kernels.KERNELS["gdn_step"].status.startswith("ok")
        # bf16 has 8 bits of mantissa: inputs rounded once, accumulation in float32, some
        # intermediates rounded to bf16: 2^-5 (4 ulps) of S's scale; measured 1 ulp (4.3e-3).
        # Decays rounded to 1.0 (mean 0.9975 here, T = 69) would keep ~16% more of the start S.
        assert_close(S_pass, S_ref, rtol=2**-5, what="pass vs reference")
        assert_close(S_dec, S_ref, rtol=2**-5, what="decode vs reference")
        assert_close(S_pass, S_dec, rtol=2**-5, scale=scale, what="pass vs decode")
    finally:
        kernels.configure()


# ------------------------------------------------------------------ the layers use it


@pytest.mark.parametrize("kind", ["gdn", "jet"])
def test_layers_run_their_recurrence_through_the_op(kind, monkeypatch):
    from mlx_sleep.layers import GatedDeltaNet, JetBlock

    calls = []
    op = kernels.gated_delta
    monkeypatch.setattr(kernels, "gated_delta", lambda *a: calls.append(a[0].shape) or op(*a))
    mx.random.seed(0)
    layer = (
        JetBlock(16, 1, 2, 8, 6, 4, generator_reduction=4)
        if kind == "jet"
        else GatedDeltaNet(16, 1, 2, 8, 6, 4)
    )
    x = rand((1, 7, 16), 1)
    state = layer.initial_state(1)
    grads = mx.grad(lambda x: (layer(x, state)[0] ** 2).sum())(x)  # training
    _, s = layer(x, state)  # a pass
    layer(x[:, :1], s)  # decode: the fused step (its fallback calls the op)
    mx.eval(grads)
    assert calls[:2] == [(1, 7, 1, 8)] * 2


def test_gated_delta_update_matches_mlx_lm():
    """kernels.gated_delta_update is a drop-in for mlx-lm's (float32: same numbers), mask too."""
    gd = pytest.importorskip("mlx_lm.models.gated_delta")
    B, T, Hk, Hv, Dk, Dv = 2, 6, 1, 2, 8, 4
    q, k, v, _, _, state = recurrence_inputs(B, T, Hk, Hv, Dk, Dv)
    a, b = rand((B, T, Hv), 30), rand((B, T, Hv), 31)
    A_log, dt_bias = mx.log(rand((Hv,), 32, 1, 16)), rand((Hv,), 33, -3, 0)
    y, S = kernels.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state)
    y_lm, S_lm = gd.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, use_kernel=False)
    assert_close(y, y_lm, rtol=1e-5, what="y")
    assert_close(S, S_lm, rtol=1e-5, what="S")
    # padding at the end of the second sequence: the state stops there
    mask = mx.array([[True] * T, [True] * 3 + [False] * (T - 3)])
    _, S = kernels.gated_delta_update(q, k, v, a, b, A_log, dt_bias, state, mask=mask)
    _, S_lm = gd.gated_delta_update(
        q, k, v, a, b, A_log, dt_bias, state, mask=mask, use_kernel=False
    )
    _, S3 = kernels.gated_delta_update(
        q[1:, :3], k[1:, :3], v[1:, :3], a[1:, :3], b[1:, :3], A_log, dt_bias, state[1:]
    )
    assert_close(S, S_lm, rtol=1e-5, what="masked S")
    assert_close(S[1:], S3, rtol=1e-5, what="masked S vs cut")
    # no state given: zeros, as mlx-lm
    _, S0 = kernels.gated_delta_update(q, k, v, a, b, A_log, dt_bias)
    assert S0.shape == (B, Hv, Dv, Dk) and S0.dtype == mx.float32
