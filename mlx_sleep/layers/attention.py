"""Causal attention over the live window plus retained keys, with RoPE at global positions."""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn


def attention_mask(q_len: int, k_len: int, offset: int, window: Optional[int]):
    """Boolean [q_len, k_len] mask (True = may attend) for queries at positions offset..offset+q_len-1
    over keys that end at the last query's position. `window` bounds how many keys a query sees,
    itself included (None = unbounded). Returns the string "causal" when that is all it is."""
    if k_len == q_len and (window is None or window >= q_len):
        return "causal"
    q_pos = mx.arange(offset, offset + q_len)[:, None]
    k_pos = mx.arange(offset + q_len - k_len, offset + q_len)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    return allowed


def evict_kv(state: dict, keep: int) -> dict:
    """Attention state {"keys", "values"} [B, Hkv, Tk, D] keeping the last `keep` tokens."""
    if keep == 0 or not state:
        return {}
    return {name: a[:, :, max(0, a.shape[2] - keep) :] for name, a in state.items()}


def min_window(a: Optional[int], b: Optional[int]) -> Optional[int]:
    if a is None:
        return b
    return a if b is None else min(a, b)


class Attention(nn.Module):
    """GQA attention. State: {"keys", "values"} [B, Hkv, Tk, D], post-RoPE; empty at the start.

    `window` (the layer's own sliding window, e.g. Jet-Nemotron's SWA layers) and the window passed
    at call time (sliding eviction) both bound what a query sees; the tighter one wins, and keys
    that no future query can see are dropped from the state as soon as they fall out of it.
    """

    carried = ()  # nothing here is a fast weight: KV restarts from its chunk-start value each pass

    def __init__(
        self, hidden_size, num_heads, num_kv_heads, head_dim, rope_theta, bias=False, window=None
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta, self.window = rope_theta, window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def initial_state(self, batch_size: int) -> dict:
        return {}

    def evict(self, state: dict, keep: int) -> dict:
        return evict_kv(state, keep)

    def __call__(self, x, state: dict, offset: int = 0, window: Optional[int] = None):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        rope = dict(
            dims=self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=offset
        )
        q, k = mx.fast.rope(q, **rope), mx.fast.rope(k, **rope)
        if state:
            k = mx.concatenate([state["keys"], k], axis=2)
            v = mx.concatenate([state["values"], v], axis=2)
        window = min_window(self.window, window)
        mask = attention_mask(T, k.shape[2], offset, window)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, T, -1)
        new_state = {"keys": k, "values": v}
        if window is not None:
            new_state = evict_kv(new_state, window - 1)
        return self.o_proj(o), new_state
