from .attention import Attention, attention_mask
from ..gdn_math import causal_conv, decay_and_beta, l2_normalize
from .gated_deltanet import GatedDeltaNet, JetBlock
from .mlp import SwiGLU

__all__ = [
    "Attention",
    "attention_mask",
    "GatedDeltaNet",
    "JetBlock",
    "SwiGLU",
    "causal_conv",
    "decay_and_beta",
    "l2_normalize",
]
