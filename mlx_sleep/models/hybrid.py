"""The paper's from-scratch hybrid: embeddings, a pattern of attention / GDN blocks, a head.

What the sleep engine needs from a model (any model that has these can sleep):
  embed(ids) -> h                    token features, computed once per chunk
  layers[i](h, state, offset, window) -> (h, state)   blocks with per-layer state
  layers[i].mixer.carried            names of the state entries that are fast weights
  layers[i].mixer.evict(state, keep) the state after eviction, keeping `keep` recent tokens
  head(h) -> logits
  initial_state(batch_size) -> [state per layer]
  core -> (start, stop)              the looped range of blocks
"""

import mlx.nn as nn

from ..cache import make_cache, plain_forward
from ..config import ModelConfig
from ..layers import Attention, GatedDeltaNet, JetBlock, SwiGLU


def make_mixer(config: ModelConfig, layer_type: str):
    c = config
    if layer_type in ("attn", "swa"):
        return Attention(c.hidden_size, c.num_heads, c.resolved("num_kv_heads"),
                         c.resolved("head_dim"), c.rope_theta, bias=c.attention_bias,
                         window=c.swa_window if layer_type == "swa" else None)
    gdn_args = (c.hidden_size, c.resolved("gdn_k_heads"), c.resolved("gdn_v_heads"),
                c.resolved("gdn_head_k_dim"), c.resolved("gdn_head_v_dim"), c.conv_size,
                c.resolved("gdn_norm_eps"))
    if layer_type == "gdn":
        return GatedDeltaNet(*gdn_args)
    return JetBlock(*gdn_args, generator_reduction=c.jet_generator_reduction)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (the MLP is optional)."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = make_mixer(config, layer_type)
        if config.mlp:
            self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
            self.mlp = SwiGLU(config.hidden_size, config.resolved("intermediate_size"))

    def __call__(self, x, state, offset: int = 0, window=None):
        h, state = self.mixer(self.input_layernorm(x), state, offset, window)
        x = x + h
        if "mlp" in self:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, state


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, t) for t in config.layer_types]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def core(self):
        return self.config.core_range

    def embed(self, ids):
        return self.embed_tokens(ids)

    def head(self, h):
        h = self.norm(h)
        if self.config.tie_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def initial_state(self, batch_size: int) -> list:
        return [layer.mixer.initial_state(batch_size) for layer in self.layers]

    def make_cache(self):
        return make_cache(self)

    def __call__(self, ids, state=None, offset: int = 0, cache=None):
        """A plain forward: one pass over every block, no eviction. Returns logits [B, T, V].
        With `cache` (from `make_cache`, mlx-lm's protocol) it continues a cached sequence."""
        return plain_forward(self, ids, state, offset, cache)
