"""Custom Metal kernels, and the one place that decides whether they run.

    dynamic_conv(x, conv_state, kernel, silu)   Jet's per-token causal conv (+ SiLU), a chunk or
                                                one decode token; its VJP has a kernel too
    gated_delta(q, k, v, decay, beta, state)    the GDN recurrence over a chunk (sleep passes,
                                                prefill, training); its VJP has a kernel that
                                                keeps one state per GDN_CHUNK tokens
    gdn_step(q, k, v, a, b, ...)                one decode token of Gated DeltaNet: gates, L2
                                                norms, delta rule, readout, gated RMSNorm

Every kernel sits beside its ops fallback (the layer's own math), and a kernel is only trusted
after it has matched that fallback once in this process: on first use it is built and run on
a few inputs (GVA, T shorter than a chunk or than W - 1, a decode token, float16 and bfloat16,
the heads of every model the converters produce (MODEL_GDN_HEADS), degenerate inputs), every
output slot and template flag compared; a compile error or a mismatch warns once and the
fallback serves the rest of the process. Without Metal (Linux, or a CPU default device) or with
MLX_SLEEP_KERNELS=0 the fallbacks run and nothing is built.

The SiLU after Jet's conv is fused (template flag SILU): unfused, the activation re-reads and
re-writes y and costs a launch (docs/kernels.md counts the transfers). The backward recomputes
the pre-activation from taps it loads anyway rather than storing it.

Kernel bodies live in metal/*.metal (headers in metal/*.h) and are handed to
`mx.fast.metal_kernel`, or to whatever factory `configure(factory=...)` injects -- the tests
inject the CPU emulator in tests/metal_emulator, which runs these same sources on Linux.
"""

import functools
import os
import threading
import warnings
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .gdn_math import (
    GDN_CHUNK,
    causal_conv,
    decay_and_beta,
    gated_delta_backward_ops,
    gated_delta_ops,
    l2_normalize,
)

ENV = "MLX_SLEEP_KERNELS"

# A wheel ships the sources as the package mlx_sleep.metal; a source checkout (editable
# install, tests) has them in metal/ at the repository root.
_METAL_DIRS = (
    Path(__file__).resolve().parent / "metal",
    Path(__file__).resolve().parent.parent / "metal",
)


def metal_dir() -> Path:
    for d in _METAL_DIRS:
        if (d / "common.h").is_file():
            return d
    raise FileNotFoundError(f"Metal kernel sources not found in {', '.join(map(str, _METAL_DIRS))}")


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    return (metal_dir() / name).read_text()


# ------------------------------------------------------------------------------ dispatch

_factory = None  # None: mx.fast.metal_kernel
_metal_available = None  # None: ask MLX


def configure(factory=None, metal_available=None):
    """Inject the kernel factory (signature of mx.fast.metal_kernel) and/or override Metal
    detection, then forget every kernel's build and self-check. configure() restores defaults."""
    global _factory, _metal_available
    _factory, _metal_available = factory, metal_available
    for k in KERNELS.values():
        k.reset()


def metal_available() -> bool:
    if _metal_available is not None:
        return _metal_available
    return mx.metal.is_available() and mx.default_device() == mx.gpu


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0" and metal_available()


class Kernel:
    """One Metal kernel: built lazily, self-checked on first use, or replaced by its fallback.

    `check(kernel)` runs the kernel and its fallback on its check cases and returns the
    (max abs diff, tolerance) of the first output over its tolerance, else of the nearest."""

    def __init__(self, name, source, headers, inputs, outputs, check):
        self.name, self.source, self.headers = name, source, headers
        self.inputs, self.outputs, self.check = inputs, outputs, check
        self.reset()

    def reset(self):
        self._fn, self.status = None, "not used yet"
        self._lock = threading.Lock()  # an idle sleep may run in a background thread

    def build(self):
        factory = _factory or mx.fast.metal_kernel
        header = "\n".join(read_source(h) for h in self.headers)
        return factory(
            name=f"mlx_sleep_{self.name}",
            input_names=self.inputs,
            output_names=self.outputs,
            source=read_source(self.source),
            header=header,
        )

    def ready(self) -> bool:
        """True if the kernel may run; builds and self-checks it the first time."""
        if not enabled():
            return False
        if self._fn is None and self.status == "not used yet":
            with self._lock:
                if self.status == "not used yet":
                    self._first_use()
        return self._fn is not None

    def _first_use(self):
        try:
            fn = self.build()
            diff, tol = self.check(fn)
        except Exception as e:  # compile errors surface on the first call
            return self._give_up(f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if not diff <= tol:  # also catches NaN
            return self._give_up(f"self-check mismatch (max abs diff {diff:.3g} > {tol:.3g})")
        self._fn, self.status = fn, f"ok (self-check max abs diff {diff:.2g})"

    def _give_up(self, why):
        self.status = f"fallback: {why}"
        warnings.warn(
            f"mlx-sleep kernel '{self.name}' {why}; using the ops fallback for the "
            f"rest of this process",
            RuntimeWarning,
            stacklevel=4,
        )

    def __call__(self, **kwargs):
        return self._fn(**kwargs)


def _compare(out, ref, rtol=1e-4):
    """[(max abs diff, tolerance)], one per output slot: every output the kernel writes is
    compared on its own, its bound relative to its own largest reference value (rtol: room for
    Metal's exp / rsqrt and the output type's rounding), so a small output's error cannot hide
    under a large one's scale. A NaN anywhere makes that diff NaN."""
    if len(out) != len(ref):
        raise ValueError(f"{len(out)} outputs against {len(ref)} references")
    checks = []
    for a, b in zip(out, ref):
        a, b = a.astype(mx.float32), b.astype(mx.float32)
        diff = mx.abs(a - b).max().item()
        if mx.isnan(a).any().item() or tuple(a.shape) != tuple(b.shape):
            diff = float("nan")
        checks.append((diff, rtol * max(1.0, mx.abs(b).max().item())))
    return checks


_RTOL = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}  # of outputs rounded once
GDN_RTOL_F32 = 2e-5
# the backward's decay gradient sums Dv x Dk products per token, so its float32 summation-order
# error is larger than the forward's (docs/kernels.md)
GDN_BWD_RTOL_F32 = 5e-5


def _self_check(cases):
    """A kernel's self-check from a generator of its cases (each yields _compare's list): the
    (diff, tolerance) of the first output over its tolerance -- the later cases are not run, a
    broken kernel is known at its first wrong case -- else of the one nearest to it."""

    @functools.wraps(cases)
    def check(fn):
        worst = None
        for checks in cases(fn):
            for diff, tol in checks:
                if not diff <= tol:  # also NaN
                    return diff, tol
                if worst is None or diff / tol > worst[0] / worst[1]:
                    worst = (diff, tol)
        return worst

    return check


# The Gated DeltaNet heads of the checkpoints each converter imports, by config.json model_type
# (tests/test_kernels.py fails when a converter of convert.CONVERTERS has no entry here):
# (model, key heads Hk, value heads Hv, Dk, Dv). The self-checks and the kernel tests run them.
MODEL_GDN_HEADS = {
    "jet_nemotron": ("Jet-Nemotron 2B", 12, 12, 96, 256),
    "ouro": ("Ouro 1.4B + Jet layers", 16, 16, 128, 128),  # Jet heads default to attention's
    "qwen3_5": ("Qwen3.5", 16, 32, 128, 128),
    "qwen3_5_text": ("Qwen3.5", 16, 32, 128, 128),
    "qwen3_5_moe": ("Qwen3.5 MoE", 16, 32, 128, 128),
    "qwen3_5_moe_text": ("Qwen3.5 MoE", 16, 32, 128, 128),
    "qwen3_next": ("Qwen3-Next", 16, 32, 128, 128),
    "olmo_hybrid": ("OLMo Hybrid 7B", 30, 30, 96, 192),  # beta up to 2 (allow_neg_eigval)
}


def model_head_shapes():
    """{(Hk, Hv, Dk, Dv): model} for the distinct head shapes of MODEL_GDN_HEADS."""
    shapes = {}
    for model, Hk, Hv, Dk, Dv in MODEL_GDN_HEADS.values():
        shapes.setdefault((Hk, Hv, Dk, Dv), model)
    return shapes


def _self_check_heads(Hk, Hv):
    """Two key heads with the model's GVA ratio: the per-head work (Dk, Dv, threadgroup layout
    and memory) and the head indexing of the model's shape, at a fraction of the heads."""
    hk = min(Hk, 2)
    return hk, hk * (Hv // Hk)


# ------------------------------------------------------------------- Jet dynamic causal conv


def dynamic_conv_ops(x, conv_state, kernel, silu=False):
    """The fallback: the layer's causal_conv (+ SiLU)."""
    y, new_state = causal_conv(x, conv_state, kernel)
    return (nn.silu(y) if silu else y), new_state


def _conv_forward(fn, x, conv_state, kernel, silu):
    B, T, C = x.shape
    W = kernel.shape[-1]
    y_dtype = mx.result_type(x, conv_state, kernel)  # what the ops give
    state_dtype = mx.result_type(x, conv_state)
    return fn(
        inputs=[x, conv_state, kernel],
        template=[("Ty", y_dtype), ("Tn", state_dtype), ("W", W), ("SILU", silu)],
        grid=(C, max(T, W - 1), B),
        threadgroup=(min(C, 256), 1, 1),
        output_shapes=[(B, T, C), (B, W - 1, C)],
        output_dtypes=[y_dtype, state_dtype],
    )


def _conv_backward(fn, x, conv_state, kernel, dy, dstate, silu):
    B, T, C = x.shape
    W = kernel.shape[-1]
    return fn(
        inputs=[x, conv_state, kernel, dy, dstate],
        template=[
            ("Tx", x.dtype),
            ("Ts", conv_state.dtype),
            ("Tk", kernel.dtype),
            ("W", W),
            ("SILU", silu),
        ],
        grid=(C, T + W - 1, B),
        threadgroup=(min(C, 256), 1, 1),
        output_shapes=[x.shape, conv_state.shape, kernel.shape],
        output_dtypes=[x.dtype, conv_state.dtype, kernel.dtype],
    )


def _conv_backward_ops(x, conv_state, kernel, dy, dstate, silu):
    _, grads = mx.vjp(
        lambda *p: dynamic_conv_ops(*p, silu=silu), [x, conv_state, kernel], [dy, dstate]
    )
    return grads


CONV_CHECK_SHAPES = [  # B, T, C, W, dtype
    (2, 5, 40, 4, mx.float32),  # T a multiple of no tile; C = 40 a partial threadgroup
    (1, 2, 24, 4, mx.float16),  # T < W - 1: part of the new state is the old one
    (2, 1, 16, 4, mx.bfloat16),  # a decode token
]


def _conv_check_inputs(B, T, C, W, dtype):
    keys = mx.random.split(mx.random.key(7), 5)
    x = mx.random.normal((B, T, C), key=keys[0])
    state = mx.random.normal((B, W - 1, C), key=keys[1])
    kern = mx.random.normal((B, T, C, W), key=keys[2]) / 2
    return [
        a.astype(dtype)
        for a in (
            x,
            state,
            kern,
            mx.random.normal((B, T, C), key=keys[3]),
            mx.random.normal((B, W - 1, C), key=keys[4]),
        )
    ]


def _float32(arrays):
    return [a.astype(mx.float32) for a in arrays]


# The kernels accumulate in float32 and round once: the reference is the fallback on the same
# (rounded) inputs upcast to float32, within the output type's rounding.


@_self_check
def _check_conv_forward(fn):
    for *shape, dtype in CONV_CHECK_SHAPES:
        x, state, kern, _, _ = _conv_check_inputs(*shape, dtype)
        for silu in (False, True):
            yield _compare(
                _conv_forward(fn, x, state, kern, silu),
                dynamic_conv_ops(*_float32((x, state, kern)), silu),
                _RTOL[dtype],
            )


@_self_check
def _check_conv_backward(fn):
    for *shape, dtype in CONV_CHECK_SHAPES:
        args = _conv_check_inputs(*shape, dtype)
        for silu in (False, True):
            yield _compare(
                _conv_backward(fn, *args, silu),
                _conv_backward_ops(*_float32(args), silu),
                _RTOL[dtype],
            )


@functools.lru_cache(maxsize=None)
def _conv_function(silu: bool):
    """dynamic_conv as an mx.custom_function: Metal forward, and a Metal backward when that
    kernel passed its own self-check (else the VJP of the ops fallback)."""

    @mx.custom_function
    def conv(x, conv_state, kernel):
        return tuple(_conv_forward(KERNELS["dynamic_conv"], x, conv_state, kernel, silu))

    @conv.vjp
    def conv_vjp(primals, cotangents, outputs):
        dy, dstate = cotangents
        bwd = KERNELS["dynamic_conv_backward"]
        if bwd.ready():
            return tuple(_conv_backward(bwd, *primals, dy, dstate, silu))
        return tuple(_conv_backward_ops(*primals, dy, dstate, silu))

    return conv


def dynamic_conv(x, conv_state, kernel, silu=False):
    """Jet's dynamic causal convolution. x [B, T, C]; conv_state [B, W-1, C] (raw inputs of the
    W-1 tokens before x); kernel [B, T, C, W] per token, tap W-1 = the current token.
    Returns (act(y) [B, T, C], new conv_state [B, W-1, C]), act = SiLU if `silu`. Differentiable
    in all three inputs. T == 1 is the decode step (one launch, state included)."""
    conv_state = conv_state.astype(x.dtype)  # as causal_conv does: keep the model's dtype
    if kernel.shape[-1] < 2 or not KERNELS["dynamic_conv"].ready():
        return dynamic_conv_ops(x, conv_state, kernel, silu)
    y, new_state = _conv_function(bool(silu))(x, conv_state, kernel)
    return y, new_state


# ------------------------------------------------------------------- fused GDN decode step


def gdn_step_ops(
    q, k, v, a, b, A_log, dt_bias, state, gate, norm_weight, norm_eps, use_kernel=True
):
    """The fallback: GatedDeltaNet.__call__'s math after the projections (the recurrence
    through gated_delta; use_kernel=False: its ops, as the self-check's reference)."""
    q = l2_normalize(q) * q.shape[-1] ** -0.5
    k = l2_normalize(k)
    decay, beta = decay_and_beta(a, b, A_log, dt_bias)
    o, state = gated_delta(q, k, v, decay, beta, state, use_kernel)
    return mx.fast.rms_norm(o, norm_weight, norm_eps) * nn.silu(gate), state


def _gdn_step(fn, q, k, v, a, b, A_log, dt_bias, state, gate, norm_weight, norm_eps):
    B, _, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    R = min(Dv, 32)  # simdgroups per head: (32, R) threads <= 1024
    out_dtype = mx.result_type(q, k, v, norm_weight, gate)
    y, state = fn(
        inputs=[q, k, v, gate, a, b, A_log, dt_bias, state, norm_weight, norm_eps],
        template=[
            ("StT", mx.float32),
            ("OutT", out_dtype),
            ("Hk", Hk),
            ("Hv", Hv),
            ("Dk", Dk),
            ("Dv", Dv),
            ("R", R),
        ],
        grid=(32, R, B * Hv),
        threadgroup=(32, R, 1),
        output_shapes=[(B, 1, Hv, Dv), state.shape],
        output_dtypes=[out_dtype, mx.float32],
    )  # the state is float32 (gated_delta)
    return y, state


GDN_STEP_CHECK_SHAPES = [  # B, Hk, Hv, Dk, Dv, dtype of the activations (state: float32)
    (2, 1, 2, 40, 36, mx.float32),  # GVA 2:1; partial lanes and a second row pass
    (1, 2, 4, 16, 12, mx.float16),  # two key heads, GVA 2:1
    (2, 1, 1, 8, 8, mx.bfloat16),
] + [
    (1, *_self_check_heads(Hk, Hv), Dk, Dv, mx.float32)  # every converted model's heads
    for Hk, Hv, Dk, Dv in model_head_shapes()
]


def _gdn_step_check_inputs(B, Hk, Hv, Dk, Dv, dtype, degenerate=False):
    """Random inputs; `degenerate`: an all-zero q row and an all-zero k row, and per value head
    the gates at their ends (decay 1, decay 0, beta 0, beta 1, in turn)."""
    keys = mx.random.split(mx.random.key(11), 11)
    q, k, v, a, b, gate = (
        mx.random.normal(shape, key=key)
        for shape, key in (
            ((B, 1, Hk, Dk), keys[0]),
            ((B, 1, Hk, Dk), keys[1]),
            ((B, 1, Hv, Dv), keys[2]),
            ((B, 1, Hv), keys[3]),
            ((B, 1, Hv), keys[4]),
            ((B, 1, Hv, Dv), keys[8]),
        )
    )
    A_log = mx.log(mx.random.uniform(1, 16, (Hv,), key=keys[5]))
    dt_bias = mx.random.uniform(-5, -1, (Hv,), key=keys[6])
    state = mx.random.normal((B, Hv, Dv, Dk), key=keys[7]) / 4
    weight = 1 + mx.random.normal((Dv,), key=keys[9]) / 2  # row by row different
    if degenerate:
        q[0, 0, 0] = 0.0
        k[-1, 0, -1] = 0.0
        ends = mx.array([-100.0, 100.0, 0.0, 0.0])[mx.arange(Hv) % 4]  # softplus 0: decay 1
        a = mx.where(mx.arange(Hv) % 4 < 2, ends, a)
        ends = mx.array([0.0, 0.0, -100.0, 100.0])[mx.arange(Hv) % 4]  # beta 0, 1
        b = mx.where(mx.arange(Hv) % 4 >= 2, ends, b)
    acts = [x.astype(dtype) for x in (q, k, v, a, b)]
    return acts, (A_log, dt_bias, state), gate.astype(dtype), (weight, 1e-6)


GDN_STEP_DEGENERATE_CHECK = (2, 2, 4, 40, 36, mx.float32)


@_self_check
def _check_gdn_step(fn):
    cases = [(*shape, False) for shape in GDN_STEP_CHECK_SHAPES[:3]]
    cases.append((*GDN_STEP_DEGENERATE_CHECK, True))
    cases += [(*shape, False) for shape in GDN_STEP_CHECK_SHAPES[3:]]  # the largest last
    for B, Hk, Hv, Dk, Dv, dtype, degenerate in cases:
        acts, rest, gate, norm = _gdn_step_check_inputs(B, Hk, Hv, Dk, Dv, dtype, degenerate)
        out = _gdn_step(fn, *acts, *rest, gate, *norm)
        ref = gdn_step_ops(*_float32(acts), *rest, gate.astype(mx.float32), *norm, use_kernel=False)
        yield _compare(out[:1], ref[:1], _RTOL[dtype]) + _compare(out[1:], ref[1:])  # y, state


@functools.lru_cache(maxsize=None)
def _gdn_step_function(norm_eps: float):
    """The kernel is for inference; should a T == 1 chunk meet mx.grad (sleep training may
    sample one), its VJP is the ops fallback's, recomputed."""

    @mx.custom_function
    def step(*args):
        return _gdn_step(KERNELS["gdn_step"], *args, norm_eps)

    @step.vjp
    def step_vjp(primals, cotangents, outputs):
        _, grads = mx.vjp(lambda *p: gdn_step_ops(*p, norm_eps), list(primals), list(cotangents))
        return tuple(grads)

    return step


def gdn_step(q, k, v, a, b, A_log, dt_bias, state, gate, norm_weight, norm_eps):
    """One decode token of Gated DeltaNet, fused. q, k [B, 1, Hk, Dk] (after conv and SiLU, before
    the L2 norm); v, gate [B, 1, Hv, Dv] (gate = g_proj output); a, b [B, 1, Hv] (a_proj, b_proj
    outputs); A_log, dt_bias [Hv]; state [B, Hv, Dv, Dk]; the o_norm RMSNorm's weight and eps.
    Returns (rmsnorm(o) * weight * silu(gate) [B, 1, Hv, Dv], new state)."""
    if q.shape[1] != 1 or v.shape[-2] % q.shape[-2] or not KERNELS["gdn_step"].ready():
        return gdn_step_ops(q, k, v, a, b, A_log, dt_bias, state, gate, norm_weight, norm_eps)
    y, state = _gdn_step_function(float(norm_eps))(
        q, k, v, a, b, A_log, dt_bias, state, gate, norm_weight
    )
    return y, state


# ------------------------------------------------------------------- the GDN recurrence


def _check_gated_delta_shapes(q, k, v, decay, beta, state):
    B, T, Hk, Dk = q.shape if q.ndim == 4 else (None,) * 4
    Hv, Dv = v.shape[-2:]
    want = {
        "q": (B, T, Hk, Dk),
        "k": (B, T, Hk, Dk),
        "v": (B, T, Hv, Dv),
        "decay": (B, T, Hv),
        "beta": (B, T, Hv),
        "state": (B, Hv, Dv, Dk),
    }
    for name, x in zip(want, (q, k, v, decay, beta, state)):
        if tuple(x.shape) != want[name]:
            raise ValueError(
                f"gated_delta: {name} has shape {tuple(x.shape)}, expected "
                f"{want[name]} (q, k [B, T, Hk, Dk], v [B, T, Hv, Dv], decay, beta "
                f"[B, T, Hv], state [B, Hv, Dv, Dk])"
            )
    if Hv % Hk:
        raise ValueError(f"gated_delta: {Hv} value heads are not a multiple of {Hk} key heads")


def _gated_delta_forward(fn, q, k, v, decay, beta, state):
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    R = min(Dv, 32)  # simdgroups per head: (32, R) threads
    y_dtype = mx.result_type(q, k, v)
    return fn(
        inputs=[q, k, v, decay, beta, state],
        template=[
            ("Ty", y_dtype),
            ("Hk", Hk),
            ("Hv", Hv),
            ("Dk", Dk),
            ("Dv", Dv),
            ("R", R),
            ("CHUNK", GDN_CHUNK),
        ],
        grid=(32, R, B * Hv),
        threadgroup=(32, R, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk), (B, Hv, -(-T // GDN_CHUNK), Dv, Dk)],
        output_dtypes=[y_dtype, mx.float32, mx.float32],
    )


def _gated_delta_backward(fn, q, k, v, decay, beta, chunk_states, dy, dstate):
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    # two [R, Dk] float partials in threadgroup memory: R * ceil(Dk / 32) <= 64 keeps 16 KiB
    R = max(1, min(Dv, 32, 64 // -(-Dk // 32)))
    f32 = mx.float32
    dq, dk, dv, ddecay, dbeta, dstate, _ = fn(
        inputs=[q, k, v, decay, beta, chunk_states, dy, dstate.astype(f32)],
        template=[("Hk", Hk), ("Hv", Hv), ("Dk", Dk), ("Dv", Dv), ("R", R), ("CHUNK", GDN_CHUNK)],
        grid=(32, R, B * Hv),
        threadgroup=(32, R, 1),
        output_shapes=[
            (B, T, Hv, Dk),
            (B, T, Hv, Dk),
            v.shape,
            decay.shape,
            beta.shape,
            (B, Hv, Dv, Dk),
            (B * Hv, GDN_CHUNK, Dv, Dk),
        ],
        output_dtypes=[f32] * 7,
    )
    if Hv != Hk:  # GVA: a key head's gradient sums over the value heads that read it
        dq, dk = (g.reshape(B, T, Hk, Hv // Hk, Dk).sum(3) for g in (dq, dk))
    return dq, dk, dv, ddecay, dbeta, dstate


GDN_CHECK_SHAPES = [  # B, T, Hk, Hv, Dk, Dv, dtype
    (1, 5, 2, 6, 24, 20, mx.float32),  # GVA 3:1, T < a chunk, Dk < 32 lanes
    (2, GDN_CHUNK + 3, 2, 2, 40, 9, mx.float16),  # a partial second chunk, Dk over 32 lanes
    (1, 1, 1, 2, 8, 40, mx.bfloat16),  # a decode token, Dv over 32 rows
] + [
    (1, 2, *_self_check_heads(Hk, Hv), Dk, Dv, mx.float32)  # every converted model's heads
    for Hk, Hv, Dk, Dv in model_head_shapes()
]
GDN_DEGENERATE_CHECK = (1, 6, 2, 4, 40, 36, mx.float32)


def _gated_delta_check_inputs(B, T, Hk, Hv, Dk, Dv, dtype, degenerate=False):
    """Random inputs; `degenerate` (T >= 6): token 0 has all-zero q rows, token 1 all-zero k
    rows and beta 0, then decay 0, decay 1, beta 1 and beta 2 (the largest: OLMo Hybrid's
    allow_neg_eigval) on tokens 2 to 5."""
    keys = mx.random.split(mx.random.key(13), 8)
    q = l2_normalize(mx.random.normal((B, T, Hk, Dk), key=keys[0])) * Dk**-0.5
    k = l2_normalize(mx.random.normal((B, T, Hk, Dk), key=keys[1]))
    v = mx.random.normal((B, T, Hv, Dv), key=keys[2])
    decay = mx.random.uniform(0.5, 1.0, (B, T, Hv), key=keys[3])
    beta = mx.random.uniform(0.0, 1.0, (B, T, Hv), key=keys[4])
    state = mx.random.normal((B, Hv, Dv, Dk), key=keys[5]) / 2
    dy = mx.random.normal((B, T, Hv, Dv), key=keys[6])
    dstate = mx.random.normal((B, Hv, Dv, Dk), key=keys[7])
    if degenerate:
        q[:, 0] = 0.0
        k[:, 1] = 0.0
        beta[:, 1] = 0.0
        decay[:, 2] = 0.0
        decay[:, 3] = 1.0
        beta[:, 4] = 1.0
        beta[:, 5] = 2.0
    return [x.astype(dtype) for x in (q, k, v, decay, beta, state)], dy.astype(dtype), dstate


def _gated_delta_check_cases():
    """The small shapes, the degenerate inputs, then the models' heads (the largest last)."""
    return (
        [(*shape, False) for shape in GDN_CHECK_SHAPES[:3]]
        + [(*GDN_DEGENERATE_CHECK, True)]
        + [(*shape, False) for shape in GDN_CHECK_SHAPES[3:]]
    )


@_self_check
def _check_gated_delta_forward(fn):
    for *shape, dtype, degenerate in _gated_delta_check_cases():
        args, _, _ = _gated_delta_check_inputs(*shape, dtype, degenerate)
        out, ref = _gated_delta_forward(fn, *args), gated_delta_ops(*args, GDN_CHUNK)
        # no exp / rsqrt in this kernel: float32 results differ by summation order only
        yield (
            _compare(out[:1], ref[:1], GDN_RTOL_F32 if dtype == mx.float32 else _RTOL[dtype])
            + _compare(out[1:], ref[1:], GDN_RTOL_F32)
        )  # y; the float32 states


@_self_check
def _check_gated_delta_backward(fn):
    for *shape, dtype, degenerate in _gated_delta_check_cases():
        args, dy, dstate = _gated_delta_check_inputs(*shape, dtype, degenerate)
        saved = gated_delta_ops(*args, GDN_CHUNK)[2]
        yield _compare(
            _gated_delta_backward(fn, *args[:5], saved, dy, dstate),
            gated_delta_backward_ops(*args[:5], saved, dy, dstate, GDN_CHUNK),
            GDN_BWD_RTOL_F32,
        )


@functools.lru_cache(maxsize=None)
def _gated_delta_function(use_kernel: bool):
    """The op as an mx.custom_function: the forward returns the chunk states too (the third
    output, dropped by gated_delta), which is all its VJP needs. Metal forward / backward where
    each passed its self-check, else the ops."""

    @mx.custom_function
    def op(q, k, v, decay, beta, state):
        fwd = KERNELS["gated_delta"]
        if use_kernel and fwd.ready():
            return tuple(_gated_delta_forward(fwd, q, k, v, decay, beta, state))
        return gated_delta_ops(q, k, v, decay, beta, state, GDN_CHUNK)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        dy, dstate, _ = cotangents
        bwd = KERNELS["gated_delta_backward"]
        if use_kernel and bwd.ready():
            grads = _gated_delta_backward(bwd, *primals[:5], outputs[2], dy, dstate)
        else:
            grads = gated_delta_backward_ops(*primals[:5], outputs[2], dy, dstate, GDN_CHUNK)
        return tuple(g.astype(p.dtype) for g, p in zip(grads, primals))

    return op


def gated_delta(q, k, v, decay, beta, state, use_kernel=True):
    """The Gated DeltaNet recurrence (gdn_math's equations) for a chunk of T >= 1 tokens, with
    its own VJP: the backward keeps one state per GDN_CHUNK tokens and recomputes inside a chunk.
    q (L2-normalised, times Dk^-1/2), k (L2-normalised) [B, T, Hk, Dk]; v [B, T, Hv, Dv];
    decay, beta [B, T, Hv]; state [B, Hv, Dv, Dk]; Hk divides Hv (GVA). Gates and state are
    float32 inside whatever their dtype. Returns (y [B, T, Hv, Dv] in the dtype of q, k, v,
    new state float32). use_kernel=False: the ops path even where Metal runs."""
    _check_gated_delta_shapes(q, k, v, decay, beta, state)
    if use_kernel:
        KERNELS["gated_delta"].ready()  # first use (build, self-check) outside the transform
    y, state, _ = _gated_delta_function(bool(use_kernel))(q, k, v, decay, beta, state)
    return y, state


def gated_delta_update(
    q,
    k,
    v,
    a,
    b,
    A_log,
    dt_bias,
    state=None,
    mask=None,
    *,
    use_kernel=True,
    lower_bound=None,
    allow_neg_eigval=False,
):
    """Drop-in for mlx_lm.models.gated_delta.gated_delta_update (scalar gates), on our op:
    decay and beta from the raw a, b in float32 (beta in [0, 2] with `allow_neg_eigval`, as
    OLMo Hybrid). Tokens where mask [B, T] is False leave the state untouched (decay 1, beta 0;
    y there is S q of the untouched state). The mlx-lm adapters route their GDN layers here."""
    if lower_bound is not None:
        raise ValueError("lower-bounded gates (Kimi Delta Attention) are not supported")
    if state is None:
        state = mx.zeros((q.shape[0], v.shape[2], v.shape[3], q.shape[3]), dtype=mx.float32)
    decay, beta = decay_and_beta(a, b, A_log, dt_bias)
    if allow_neg_eigval:
        beta = beta * 2.0
    if mask is not None:
        mask = mask[..., None]
        decay, beta = mx.where(mask, decay, 1.0), mx.where(mask, beta, 0.0)
    return gated_delta(q, k, v, decay, beta, state, use_kernel)


# ------------------------------------------------------------------------------ registry

KERNELS = {
    k.name: k
    for k in (
        Kernel(
            "dynamic_conv",
            "dynamic_conv.metal",
            ["common.h", "dynamic_conv.h"],
            ["x", "conv_state", "kern"],
            ["y", "new_state"],
            _check_conv_forward,
        ),
        Kernel(
            "dynamic_conv_backward",
            "dynamic_conv_backward.metal",
            ["common.h", "dynamic_conv.h"],
            ["x", "conv_state", "kern", "dy", "dstate"],
            ["dx", "dconv_state", "dkern"],
            _check_conv_backward,
        ),
        Kernel(
            "gated_delta",
            "gated_delta.metal",
            ["common.h", "gated_delta.h"],
            ["q", "k", "v", "decay", "beta", "state_in"],
            ["y", "state_out", "chunk_states"],
            _check_gated_delta_forward,
        ),
        Kernel(
            "gated_delta_backward",
            "gated_delta_backward.metal",
            ["common.h", "gated_delta.h"],
            ["q", "k", "v", "decay", "beta", "chunk_states", "dy", "dstate"],
            ["dq_out", "dk_out", "dv_out", "ddecay", "dbeta", "dstate_in", "scratch"],
            _check_gated_delta_backward,
        ),
        Kernel(
            "gdn_step",
            "gdn_step.metal",
            ["common.h"],
            [
                "q",
                "k",
                "v",
                "gate",
                "a_in",
                "b_in",
                "A_log",
                "dt_bias",
                "state_in",
                "weight",
                "eps",
            ],
            ["y", "state_out"],
            _check_gdn_step,
        ),
    )
}


def kernel_report() -> list:
    """Lines for `mlx-sleep doctor`: each kernel's status (runs the self-checks on Metal)."""
    if os.environ.get(ENV, "1") == "0":
        why = f"{ENV}=0: ops fallbacks forced"
    elif not metal_available():
        why = "no Metal device: ops fallbacks"
    else:
        why = "Metal: self-checked against the ops fallbacks"
    lines = [f"kernels     {why} (sources: {metal_dir()})"]
    for k in KERNELS.values():
        k.ready()
        status = k.status if enabled() else "fallback"
        lines.append(f"  {k.name:<22}{status}")
    return lines
