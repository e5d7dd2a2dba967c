"""The paper's from-scratch hybrid: embeddings, a pattern of attention / GDN blocks, a head.
Everything a model needs to sleep besides its blocks comes from SleepModel (models/base.py).
"""

import mlx.nn as nn

from ..config import ModelConfig
from ..layers import Attention, GatedDeltaNet, JetBlock, SwiGLU
from .base import SleepModel


def make_mixer(config: ModelConfig, layer_type: str):
    c = config
    if layer_type in ("attn", "swa"):
        return Attention(
            c.hidden_size,
            c.num_heads,
            c.resolved("num_kv_heads"),
            c.resolved("head_dim"),
            c.rope_theta,
            bias=c.attention_bias,
            window=c.swa_window if layer_type == "swa" else None,
        )
    gdn_args = (
        c.hidden_size,
        c.resolved("gdn_k_heads"),
        c.resolved("gdn_v_heads"),
        c.resolved("gdn_head_k_dim"),
        c.resolved("gdn_head_v_dim"),
        c.conv_size,
        c.resolved("gdn_norm_eps"),
    )
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


class HybridLM(SleepModel):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, t) for t in config.layer_types]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
