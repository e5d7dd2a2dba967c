"""Jet-Nemotron (NVlabs, e.g. jet-ai/Jet-Nemotron-2B) -> mlx-sleep's hybrid model.

The architecture mapping (config and tensor names, every trap of the original) lives in
mlx_sleep/models/jet_nemotron.py; this module adds what only conversion needs.
Sleep default: the middle half of the blocks is the looped core (2B: blocks 7..20 of 28).
"""

from ..models import jet_nemotron as arch
from .common import ConversionError

MODEL_TYPE = "jet_nemotron"
from_hf_config = arch.from_hf_config
to_ours, to_hf = arch.to_ours, arch.to_hf
Model = arch.Model


def prepare_weights(weights: dict, config) -> dict:
    """Tied embeddings: the head is embed_tokens; a stored lm_head must agree with it."""
    if config.tie_embeddings and "lm_head.weight" in weights:
        import mlx.core as mx

        head = weights.pop("lm_head.weight")
        embed = weights.get("embed_tokens.weight")
        if embed is not None and (head.shape != embed.shape or not mx.array_equal(head, embed)):
            raise ConversionError("config.json says tie_word_embeddings but lm_head.weight "
                                  "differs from model.embed_tokens.weight")
    return weights

