"""Ouro (ByteDance, e.g. ByteDance/Ouro-1.4B) -> mlx-sleep's looped Ouro model.

`insert_jet_layers=K` applies the paper's recipe: K MLP-free Jet layers inserted into the
stack, zero-initialised output so the converted model computes exactly what the original does
until fine-tuned. Sleep default: the whole unrolled stack (every loop of every block) is the
core, so one sleep pass is one full Ouro forward (total_ut_steps loops).
"""

from ..config import ConfigError, json_bool
from ..models.ouro import Model, OuroConfig, insert_jet_layers
from .jet_nemotron import prepare_weights  # same tied-embedding rule

MODEL_TYPE = "ouro"


def from_hf_config(hf: dict) -> OuroConfig:
    """OuroConfig for a Hugging Face Ouro config.json (a dict)."""
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    ):
        if key not in hf:
            raise ConfigError(f"config.json has no {key!r}")
    if hf.get("rope_scaling"):
        raise ConfigError(f"rope_scaling {hf['rope_scaling']!r} is not supported yet")
    if hf.get("use_sliding_window") or any(
        t != "full_attention" for t in hf.get("layer_types") or []
    ):
        raise ConfigError("sliding-window Ouro layers are not supported yet")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    return OuroConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        total_ut_steps=int(hf.get("total_ut_steps", 4)),
        early_exit_threshold=hf.get("early_exit_threshold", 1.0),
        early_exit_step=hf.get("early_exit_step"),
        tie_embeddings=json_bool(hf, "tie_word_embeddings"),
    )


def to_ours(hf_name: str):
    """Our parameter name for a Hugging Face tensor name (None: not a tensor we know)."""
    if hf_name == "lm_head.weight":
        return hf_name
    if not hf_name.startswith("model."):
        return None
    name = hf_name[len("model.") :]
    return name.replace(".self_attn.", ".mixer.")


def to_hf(name: str) -> str:
    """The Hugging Face tensor name of one of our parameters (for error messages)."""
    if name.startswith("lm_head."):
        return name
    return "model." + name.replace(".mixer.", ".self_attn.")


__all__ = [
    "MODEL_TYPE",
    "from_hf_config",
    "to_ours",
    "to_hf",
    "Model",
    "insert_jet_layers",
    "prepare_weights",
]
