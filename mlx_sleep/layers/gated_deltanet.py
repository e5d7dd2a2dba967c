"""Gated DeltaNet and its Jet variant: the layers whose recurrent state S holds the fast weights.

Per head, with a_t (decay) and b_t (write strength) in (0, 1) computed from the token:

    S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T        S: [Dv, Dk]
    o_t = S_t q_t

State layout follows MLX core: S [B, Hv, Dv, Dk]. The recurrence of a chunk runs through our op
`kernels.gated_delta` (gates, decay and S in float32 whatever the model's dtype; a backward that
keeps one state per chunk of tokens); a decode token (T == 1) takes one fused launch instead
(`kernels.gdn_step`, with this same math as its fallback). Key heads may be fewer than value
heads (GVA): value head h reads key head h // (Hv / Hk).

State: {"conv": [B, W-1, C] raw (pre-conv) inputs of the last W-1 tokens, "S": fast weights}.
Only S is carried from pass to pass during sleep; the conv state restarts from its chunk-start
value like the attention KV (it is a window of the chunk's tokens, not a fast weight).
"""

import math

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from ..gdn_math import causal_conv, decay_and_beta, evict_conv, l2_normalize


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (Yang et al. 2025) in the Qwen3-Next / flash-linear-attention form:
    q, k, v projections -> short causal depthwise conv + SiLU -> L2-normalised q, k ->
    gated delta rule -> per-head RMSNorm gated by SiLU(g_proj x) -> o_proj."""

    carried = ("S",)

    def __init__(
        self, hidden_size, k_heads, v_heads, head_k_dim, head_v_dim, conv_size, norm_eps=1e-6
    ):
        super().__init__()
        self.k_heads, self.v_heads = k_heads, v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.conv_size = conv_size
        key_dim, value_dim = k_heads * head_k_dim, v_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, v_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.o_norm = nn.RMSNorm(head_v_dim, eps=norm_eps)
        # Mamba-style gate init: A in [1, 16], dt in [1e-3, 1e-1] through the inverse softplus.
        self.A_log = mx.log(mx.random.uniform(1, 16, (v_heads,)))
        dt = mx.exp(mx.random.uniform(math.log(1e-3), math.log(1e-1), (v_heads,)))
        self.dt_bias = dt + mx.log(-mx.expm1(-dt))
        self._init_conv(hidden_size)

    def _init_conv(self, hidden_size):
        channels = 2 * self.k_heads * self.head_k_dim + self.v_heads * self.head_v_dim
        bound = 1 / math.sqrt(self.conv_size)
        self.conv_weight = mx.random.uniform(-bound, bound, (channels, self.conv_size))

    @property
    def conv_channels(self) -> int:
        return self.conv_weight.shape[0]

    def initial_state(self, batch_size: int) -> dict:
        return {
            "conv": mx.zeros((batch_size, self.conv_size - 1, self.conv_channels)),
            "S": mx.zeros((batch_size, self.v_heads, self.head_v_dim, self.head_k_dim)),
        }

    def evict(self, state: dict, keep: int) -> dict:
        """Keep S; keep the conv inputs of at most the last `keep` tokens."""
        return {"conv": evict_conv(state["conv"], keep), "S": state["S"]}

    def qkv(self, x, conv_state):
        """q, k [B, T, Hk, Dk] (before L2 norm), v [B, T, Hv, Dv], and the new conv state."""
        B, T, _ = x.shape
        mixed = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        mixed, conv_state = causal_conv(mixed, conv_state, self.conv_weight)
        mixed = nn.silu(mixed)
        kd = self.k_heads * self.head_k_dim
        q = mixed[..., :kd].reshape(B, T, self.k_heads, self.head_k_dim)
        k = mixed[..., kd : 2 * kd].reshape(B, T, self.k_heads, self.head_k_dim)
        v = mixed[..., 2 * kd :].reshape(B, T, self.v_heads, self.head_v_dim)
        return q, k, v, conv_state

    def __call__(self, x, state: dict, offset: int = 0, window=None):
        B, T, _ = x.shape
        q, k, v, conv_state = self.qkv(x, state["conv"])
        gate = self.g_proj(x).reshape(B, T, self.v_heads, self.head_v_dim)
        if T == 1:  # decode: gates, norms, update, readout and gated norm in one launch
            o, S = kernels.gdn_step(
                q,
                k,
                v,
                self.a_proj(x),
                self.b_proj(x),
                self.A_log,
                self.dt_bias,
                state["S"],
                gate,
                self.o_norm.weight,
                self.o_norm.eps,
            )
            return self.o_proj(o.reshape(B, T, -1)), {"conv": conv_state, "S": S}
        q = l2_normalize(q) * self.head_k_dim**-0.5
        k = l2_normalize(k)
        decay, beta = decay_and_beta(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias)
        o, S = kernels.gated_delta(q, k, v, decay, beta, state["S"])
        o = self.o_norm(o) * nn.silu(gate)
        return self.o_proj(o.reshape(B, T, -1)), {"conv": conv_state, "S": S}


class KernelGenerator(nn.Module):
    """Jet-Nemotron's generator of per-token conv kernels: w2(silu(w1 x)) -> [B, T, C, W].
    Its bottleneck is channels // reduction wide (channels = the value dim, as Jet-Nemotron)."""

    def __init__(self, hidden_size, channels, conv_size, reduction):
        super().__init__()
        self.channels, self.conv_size = channels, conv_size
        width = max(1, channels // reduction)
        self.w1 = nn.Linear(hidden_size, width, bias=False)
        self.w2 = nn.Linear(width, channels * conv_size, bias=True)

    def __call__(self, x):
        B, T, _ = x.shape
        return self.w2(nn.silu(self.w1(x))).reshape(B, T, self.channels, self.conv_size)


class JetBlock(GatedDeltaNet):
    """Jet-Nemotron's JetBlock: GDN whose values go through a dynamic causal convolution with a
    kernel generated from the hidden state per token; q and k get SiLU but no conv."""

    def __init__(
        self,
        hidden_size,
        k_heads,
        v_heads,
        head_k_dim,
        head_v_dim,
        conv_size,
        norm_eps=1e-6,
        generator_reduction=8,
    ):
        self._generator_reduction = generator_reduction
        super().__init__(hidden_size, k_heads, v_heads, head_k_dim, head_v_dim, conv_size, norm_eps)

    def _init_conv(self, hidden_size):
        self.kernel_generator = KernelGenerator(
            hidden_size, self.v_heads * self.head_v_dim, self.conv_size, self._generator_reduction
        )

    @property
    def conv_channels(self) -> int:
        return self.v_heads * self.head_v_dim

    def qkv(self, x, conv_state):
        B, T, _ = x.shape
        q = nn.silu(self.q_proj(x)).reshape(B, T, self.k_heads, self.head_k_dim)
        k = nn.silu(self.k_proj(x)).reshape(B, T, self.k_heads, self.head_k_dim)
        # causal_conv + SiLU, through a Metal kernel (forward and backward) where one runs
        v, conv_state = kernels.dynamic_conv(
            self.v_proj(x), conv_state, self.kernel_generator(x), silu=True
        )
        v = v.reshape(B, T, self.v_heads, self.head_v_dim)
        return q, k, v, conv_state
