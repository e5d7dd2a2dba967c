"""Naive references written straight from the equations: one token at a time, explicit matrices.

Slow on purpose; they share no code with mlx_sleep.layers except reading its parameters."""

import math

import mlx.core as mx


def silu(x):
    return x / (1 + mx.exp(-x))


def rms_norm(x, w, eps):
    return x / mx.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def softplus(x):
    return mx.log(1 + mx.exp(x))


def linear(layer, x):
    y = x @ layer.weight.T
    return y + layer.bias if "bias" in layer else y


def gdn(layer, x, conv_inputs=None, S=None, jet=False):
    """Gated DeltaNet (or JetBlock) on x [B, T, D] from (conv history, S). Returns (y, S)."""
    B, T, _ = x.shape
    Hk, Hv, Dk, Dv = layer.k_heads, layer.v_heads, layer.head_k_dim, layer.head_v_dim
    W = layer.conv_size
    q_lin, k_lin, v_lin = linear(layer.q_proj, x), linear(layer.k_proj, x), linear(layer.v_proj, x)
    if jet:
        raw = v_lin
        kern = linear(layer.kernel_generator.w2, silu(linear(layer.kernel_generator.w1, x)))
        kern = kern.reshape(B, T, -1, W)
    else:
        raw = mx.concatenate([q_lin, k_lin, v_lin], axis=-1)
    C = raw.shape[-1]
    hist = mx.zeros((B, W - 1, C)) if conv_inputs is None else conv_inputs
    seq = mx.concatenate([hist, raw], axis=1)
    conv = []
    for t in range(T):
        acc = mx.zeros((B, C))
        for w in range(W):
            weight = kern[:, t, :, w] if jet else layer.conv_weight[:, w]
            acc = acc + weight * seq[:, t + w]
        conv.append(acc)
    conv = silu(mx.stack(conv, axis=1))
    if jet:
        q, k, v = silu(q_lin), silu(k_lin), conv
    else:
        kd = Hk * Dk
        q, k, v = conv[..., :kd], conv[..., kd : 2 * kd], conv[..., 2 * kd :]
    q, k, v = q.reshape(B, T, Hk, Dk), k.reshape(B, T, Hk, Dk), v.reshape(B, T, Hv, Dv)
    a_in, b_in = linear(layer.a_proj, x), linear(layer.b_proj, x)
    S = mx.zeros((B, Hv, Dv, Dk)) if S is None else S
    eye = mx.eye(Dk)
    outs = []
    for t in range(T):
        o_t, S_new = [], []
        for h in range(Hv):
            kh = h // (Hv // Hk)
            qt = (
                q[:, t, kh]
                / mx.sqrt((q[:, t, kh] ** 2).sum(-1, keepdims=True) + 1e-6)
                / math.sqrt(Dk)
            )
            kt = k[:, t, kh] / mx.sqrt((k[:, t, kh] ** 2).sum(-1, keepdims=True) + 1e-6)
            a = mx.exp(-mx.exp(layer.A_log[h]) * softplus(a_in[:, t, h] + layer.dt_bias[h]))
            b = 1 / (1 + mx.exp(-b_in[:, t, h]))
            kkT = kt[:, :, None] * kt[:, None, :]
            Sh = a[:, None, None] * (S[:, h] @ (eye - b[:, None, None] * kkT)) + b[
                :, None, None
            ] * (v[:, t, h][:, :, None] * kt[:, None, :])
            S_new.append(Sh)
            o_t.append((Sh @ qt[:, :, None])[..., 0])
        S = mx.stack(S_new, axis=1)
        outs.append(mx.stack(o_t, axis=1))
    o = mx.stack(outs, axis=1)  # [B, T, Hv, Dv]
    o = rms_norm(o, layer.o_norm.weight, layer.o_norm.eps)
    o = o * silu(linear(layer.g_proj, x).reshape(B, T, Hv, Dv))
    return linear(layer.o_proj, o.reshape(B, T, -1)), S


def delta_rule(q, k, v, decay, beta, S):
    """The recurrence alone, per token and head: S = a S (I - b k k^T) + b v k^T, y = S q.
    q, k [B, T, Hk, Dk] (already normalised), v [B, T, Hv, Dv], decay, beta [B, T, Hv],
    S [B, Hv, Dv, Dk]; computes in the inputs' dtype (float64 for a reference)."""
    _, T, Hk, Dk = q.shape
    Hv = v.shape[2]
    eye = mx.eye(Dk, dtype=S.dtype)
    ys = []
    for t in range(T):
        y_t, S_new = [], []
        for h in range(Hv):
            kh = h // (Hv // Hk)
            a, b = decay[:, t, h, None, None], beta[:, t, h, None, None]
            kt = k[:, t, kh]
            Sh = a * (S[:, h] @ (eye - b * (kt[:, :, None] * kt[:, None, :]))) + b * (
                v[:, t, h][:, :, None] * kt[:, None, :]
            )
            S_new.append(Sh)
            y_t.append((Sh @ q[:, t, kh][:, :, None])[..., 0])
        S = mx.stack(S_new, axis=1)
        ys.append(mx.stack(y_t, axis=1))
    return mx.stack(ys, axis=1), S


def rotate_half_rope(x, positions, theta):
    """x [B, H, T, D]; non-interleaved RoPE (rotate_half) at the given absolute positions."""
    D = x.shape[-1]
    inv_freq = theta ** (-mx.arange(0, D, 2).astype(mx.float32) / D)
    ang = positions[:, None].astype(mx.float32) * inv_freq[None, :]
    cos = mx.concatenate([mx.cos(ang), mx.cos(ang)], axis=-1)
    sin = mx.concatenate([mx.sin(ang), mx.sin(ang)], axis=-1)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + mx.concatenate([-x2, x1], axis=-1) * sin


def attention(layer, x, positions, window=None):
    """Full-sequence softmax attention with an explicit causal (and window) mask."""
    B, T, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = linear(layer.q_proj, x).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = linear(layer.k_proj, x).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
    v = linear(layer.v_proj, x).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
    q, k = (
        rotate_half_rope(q, positions, layer.rope_theta),
        rotate_half_rope(k, positions, layer.rope_theta),
    )
    outs = []
    for h in range(H):
        kh = h // (H // Hkv)
        scores = (q[:, h] @ k[:, kh].transpose(0, 2, 1)) / math.sqrt(D)
        i, j = positions[:, None], positions[None, :]
        allowed = j <= i
        if window is not None:
            allowed = allowed & (j > i - window)
        scores = mx.where(allowed, scores, -mx.inf)
        p = mx.exp(scores - scores.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        outs.append(p @ v[:, kh])
    o = mx.stack(outs, axis=1).transpose(0, 2, 1, 3).reshape(B, T, -1)
    return linear(layer.o_proj, o)
