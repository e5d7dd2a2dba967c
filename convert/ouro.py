"""Ouro (ByteDance, e.g. ByteDance/Ouro-1.4B) -> mlx-sleep's looped Ouro model.

`insert_jet_layers=K` applies the paper's recipe: K MLP-free Jet layers inserted into the
stack, zero-initialised output so the converted model computes exactly what the original does
until fine-tuned. Sleep default: the whole unrolled stack (every loop of every block) is the
core, so one sleep pass is one full Ouro forward (total_ut_steps loops).
"""

from ..models import ouro as arch
from .jet_nemotron import prepare_weights  # same tied-embedding rule

MODEL_TYPE = "ouro"
from_hf_config = arch.from_hf_config
to_ours, to_hf = arch.to_ours, arch.to_hf
Model = arch.Model
insert_jet_layers = arch.insert_jet_layers

__all__ = ["MODEL_TYPE", "from_hf_config", "to_ours", "to_hf", "Model", "insert_jet_layers",
           "prepare_weights"]
