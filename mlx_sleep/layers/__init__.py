from .attention import Attention, attention_mask
from .gated_deltanet import GatedDeltaNet, JetBlock, causal_conv, decay_and_beta, l2_normalize
from .mlp import SwiGLU

__all__ = ["Attention", "attention_mask", "GatedDeltaNet", "JetBlock", "SwiGLU", "causal_conv",
           "decay_and_beta", "l2_normalize"]
