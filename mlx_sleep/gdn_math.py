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
    padded = mx.concatenate([conv_state, x], axis=1) if W > 1 else x
    y = sum(padded[:, w:w + T] * weight[..., w] for w in range(W))
    new_state = padded[:, padded.shape[1] - (W - 1):] if W > 1 else conv_state
    return y, new_state


def evict_conv(conv, keep: int):
    """A conv state [B, W-1, C] after eviction: the inputs of at most the last `keep` tokens
    stay, older ones are zeroed (as if they had never been seen)."""
    drop = conv.shape[1] - min(keep, conv.shape[1])
    if not drop:
        return conv
    return mx.concatenate([mx.zeros_like(conv[:, :drop]), conv[:, drop:]], axis=1)
