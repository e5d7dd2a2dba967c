"""The math of Gated DeltaNet that the layers and the kernels' ops fallbacks share.

A leaf module (it imports only MLX), so that `layers/gated_deltanet.py` can dispatch to
`kernels.py` and `kernels.py` can fall back to this same math without importing the layer.
"""

import mlx.core as mx
import mlx.nn as nn

L2_EPS = 1e-6  # x / sqrt(sum(x^2) + eps), as flash-linear-attention's l2norm


def l2_normalize(x):
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + L2_EPS)


def decay_and_beta(a, b, A_log, dt_bias):
    """a_t = exp(-exp(A_log) * softplus(a + dt_bias)) (a linear factor in (0,1)), b_t = sigmoid(b)."""
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    decay = mx.exp(-mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias))
    return decay, mx.sigmoid(b)


def causal_conv(x, conv_state, weight):
    """Depthwise causal conv. x [B, T, C]; conv_state [B, W-1, C] (the W-1 inputs before x);
    weight [C, W] static or [B, T, C, W] per token (dynamic). Tap W-1 is the current token.
    Returns (y [B, T, C], new conv_state)."""
    W = weight.shape[-1]
    T = x.shape[1]
    # The state takes x's dtype: a float32 state (a fresh one is zeros) would promote a bf16
    # model's whole residual stream, and every matmul after it, to float32.
    padded = mx.concatenate([conv_state.astype(x.dtype), x], axis=1) if W > 1 else x
    y = sum(padded[:, w : w + T] * weight[..., w] for w in range(W))
    new_state = padded[:, padded.shape[1] - (W - 1) :] if W > 1 else conv_state
    return y, new_state


def evict_conv(conv, keep: int):
    """A conv state [B, W-1, C] after eviction: the inputs of at most the last `keep` tokens
    stay, older ones are zeroed (as if they had never been seen)."""
    drop = conv.shape[1] - min(keep, conv.shape[1])
    if not drop:
        return conv
    return mx.concatenate([mx.zeros_like(conv[:, :drop]), conv[:, drop:]], axis=1)


# ------------------------------------------------------------------ the delta-rule recurrence
#
# Per value head h (key head h // (Hv / Hk)), a_t = decay, b_t = beta, S [Dv, Dk]:
#     S_t = a_t S_{t-1} + b_t (v_t - a_t S_{t-1} k_t) k_t^T,    y_t = S_t q_t
# Dtype rule: q, k, v stay in the model's dtype outside; inside, and for decay, beta and S,
# everything is float32 whatever came in (a bf16 decay of 0.999 rounds to 1.0), and the state
# comes out float32. y comes out in the dtype of q, k, v.

GDN_CHUNK = 32  # tokens between the states the backward keeps (it recomputes inside a chunk)


def _key_heads_to_value_heads(x, v_heads):
    groups = v_heads // x.shape[2]
    return mx.repeat(x, groups, axis=2) if groups > 1 else x


def _delta_step(S, q, k, v, decay, beta):
    """One token for all heads, float32. S [B, H, Dv, Dk]; q, k [B, H, Dk]; v [B, H, Dv];
    decay, beta [B, H]. Returns (S_t, y_t, v - a S_{t-1} k). Products as multiply + sum, not
    matmul: batched matrix-vector products are slower on the CPU (docs/kernels.md)."""
    S = decay[..., None, None] * S
    residual = v - (S * k[..., None, :]).sum(-1)
    S = S + (beta[..., None] * residual)[..., None] * k[..., None, :]
    return S, (S * q[..., None, :]).sum(-1), residual


def _as_float32(*xs):
    return [x.astype(mx.float32) for x in xs]


def gated_delta_ops(q, k, v, decay, beta, state, chunk=GDN_CHUNK):
    """The recurrence token by token in float32. q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv];
    decay, beta [B, T, Hv]; state [B, Hv, Dv, Dk]. Returns y [B, T, Hv, Dv] (dtype of q, k, v),
    the final state (float32) and the states before tokens 0, chunk, 2 chunk, ...
    [B, Hv, ceil(T / chunk), Dv, Dk] (float32; what the backward keeps)."""
    T, Hv = v.shape[1], v.shape[2]
    y_dtype = mx.result_type(q, k, v)
    q, k = (_key_heads_to_value_heads(x, Hv) for x in (q, k))
    q, k, v, decay, beta, S = _as_float32(q, k, v, decay, beta, state)
    ys, saved = [], []
    for t in range(T):
        if t % chunk == 0:
            saved.append(S)
        S, y, _ = _delta_step(S, q[:, t], k[:, t], v[:, t], decay[:, t], beta[:, t])
        S = mx.depends(S, y)  # y_t before S_t+1: see the note above gated_delta_backward_ops
        ys.append(y)
    return mx.stack(ys, axis=1).astype(y_dtype), S, mx.stack(saved, axis=2)


def _delta_step_vjp(dS, S_prev, S_t, residual, q, k, decay, beta, dy):
    """Cotangents through one token: dS is d/dS_t (from the later tokens and y_t's readout
    excluded); returns (d/dS_{t-1}, dq, dk, dv, ddecay, dbeta) for all heads."""
    a, b = decay[..., None, None], beta[..., None]
    dS = dS + dy[..., None] * q[..., None, :]  # y_t = S_t q_t
    d_delta = (dS * k[..., None, :]).sum(-1)  # S_t = S~ + delta k^T
    d_u = -b * d_delta  # delta = b (v - S~ k)
    dS_decayed = dS + d_u[..., None] * k[..., None, :]
    dq = (dy[..., None] * S_t).sum(-2)
    dk = ((b * residual)[..., None] * dS + d_u[..., None] * (a * S_prev)).sum(-2)
    ddecay = (dS_decayed * S_prev).sum((-2, -1))  # S~ = a S_{t-1}
    return a * dS_decayed, dq, dk, b * d_delta, ddecay, (d_delta * residual).sum(-1)


# Memory: left to itself, MLX's evaluation order may compute every state of the chain before any
# of the small per-token outputs that read them (y_t, the token's gradients), and hold a state per
# token. mx.depends makes each token's outputs come before the next state and each chunk's
# recompute after the later chunk's walk, so the forward holds one state and the backward the
# chunk states plus one chunk (tests/test_gated_delta.py measures it).
def gated_delta_backward_ops(q, k, v, decay, beta, chunk_states, dy, dstate, chunk=GDN_CHUNK):
    """VJP of gated_delta_ops, chunk by chunk from the last: recompute the chunk's states
    forward from its saved start, then walk it in reverse. Memory: the saved chunk states plus
    one chunk of states, instead of a state per token. Returns float32
    (dq, dk [B, T, Hk, Dk], dv, ddecay, dbeta, dstate); dstate is d/d(initial state)."""
    B, T, Hk, _ = q.shape
    Hv = v.shape[2]
    qh, kh = (_key_heads_to_value_heads(x, Hv) for x in (q, k))
    qh, kh, v, decay, beta, dy, dS = _as_float32(qh, kh, v, decay, beta, dy, dstate)
    grads = {n: [None] * T for n in ("q", "k", "v", "decay", "beta")}
    for c in reversed(range(chunk_states.shape[2])):
        t0, t1 = c * chunk, min(T, (c + 1) * chunk)
        states, residuals = [mx.depends(chunk_states[:, :, c], dS)], []  # S before token t0 + i
        for t in range(t0, t1):
            S, _, residual = _delta_step(
                states[-1], qh[:, t], kh[:, t], v[:, t], decay[:, t], beta[:, t]
            )
            states.append(S)
            residuals.append(residual)
        for t in reversed(range(t0, t1)):
            dS, *g = _delta_step_vjp(
                dS,
                states[t - t0],
                states[t - t0 + 1],
                residuals[t - t0],
                qh[:, t],
                kh[:, t],
                decay[:, t],
                beta[:, t],
                dy[:, t],
            )
            dS = mx.depends(dS, g)
            for name, g_t in zip(("q", "k", "v", "decay", "beta"), g):
                grads[name][t] = g_t
    dq, dk, dv, ddecay, dbeta = (
        mx.stack(grads[n], axis=1) for n in ("q", "k", "v", "decay", "beta")
    )
    if Hv != Hk:  # GVA: a key head's gradient sums over the value heads that read it
        dq, dk = (g.reshape(B, T, Hk, Hv // Hk, -1).sum(3) for g in (dq, dk))
    return dq, dk, dv, ddecay, dbeta, dS
