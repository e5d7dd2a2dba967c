"""Jet-Nemotron (NVlabs, e.g. jet-ai/Jet-Nemotron-2B, model_type "jet_nemotron") -> the hybrid model.

Jet-Nemotron is exactly our HybridLM: Qwen2-style attention (q/k/v biases, no o_proj bias, RoPE
at global positions), sliding-window attention, JetBlocks (GDN with a dynamic conv on values,
SiLU on q/k before the L2 norm, a gated per-head RMSNorm), SwiGLU MLPs and tied embeddings. So
this file only maps the Hugging Face config and tensor names onto it. Traps it handles (see
tests/fixtures and the reference README):

- `efficient_attention_config.jet.norm_eps` is a string ("1e-5") and is the o_norm eps, which
  differs from `rms_norm_eps` (1e-6) used by every other norm;
- the Jet head_dim is its own setting, not hidden_size / num_attention_heads;
- value dims use int() truncation: int(head_dim * expand_v), int(key_dim * expand_v);
- the dynamic-conv kernel generator is sized from the value dim: value_dim // reduction;
- SWA `window_size` W lets a query see itself plus W-1 earlier keys, which is what our
  Attention's `window` counts (keys including the query's own), so it maps over unchanged;
- attention keys are cached post-RoPE, as ours are.

Sleep default: the middle half of the blocks is the looped core (2B: blocks 7..20 of 28).
"""

from ..config import ConfigError, ModelConfig, json_bool, middle_half_core
from ..models.hybrid import HybridLM
from .common import ConversionError, rename

MODEL_TYPE = "jet_nemotron"
Model = HybridLM
LAYER_TYPES = {"jet": "jet", "attn": "attn", "swa": "swa"}


def from_hf_config(hf: dict) -> ModelConfig:
    """ModelConfig for a Hugging Face Jet-Nemotron config.json (a dict)."""

    def get(d, key, where="config.json"):
        if key not in d:
            raise ConfigError(f"{where} has no {key!r}")
        return d[key]

    eff = get(hf, "efficient_attention_config")
    types = get(hf, "layer_types")
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ConfigError(
            f"unsupported Jet-Nemotron layer type(s) {bad}; supported: {', '.join(LAYER_TYPES)}"
        )
    if len(types) != get(hf, "num_hidden_layers"):
        raise ConfigError(
            f"config.json: layer_types has {len(types)} entries but "
            f"num_hidden_layers is {hf['num_hidden_layers']}"
        )
    if hf.get("rope_scaling"):
        raise ConfigError(f"rope_scaling {hf['rope_scaling']!r} is not supported yet")
    if hf.get("use_mrope"):
        raise ConfigError("use_mrope (multimodal RoPE) is not supported")

    heads = get(hf, "num_attention_heads")
    kw = dict(
        vocab_size=get(hf, "vocab_size"),
        hidden_size=get(hf, "hidden_size"),
        layers=",".join(LAYER_TYPES[t] for t in types),
        intermediate_size=get(hf, "intermediate_size"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        attention_bias=True,  # Qwen2-style: q/k/v biases; o_proj has none (Attention never has one)
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(get(hf, "rms_norm_eps")),
        tie_embeddings=json_bool(hf, "tie_word_embeddings"),
    )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (silu only)")
    if "swa" in types:
        kw["swa_window"] = int(
            get(
                get(eff, "swa", "efficient_attention_config"),
                "window_size",
                "efficient_attention_config.swa",
            )
        )
    if "jet" in types:
        jet = get(eff, "jet", "efficient_attention_config")
        where = "efficient_attention_config.jet"
        jet_heads, head_k = int(get(jet, "num_heads", where)), int(get(jet, "head_dim", where))
        expand_v = float(get(jet, "expand_v", where))
        head_v = int(head_k * expand_v)  # int() truncation, as the original
        value_dim = int(jet_heads * head_k * expand_v)
        if value_dim != jet_heads * head_v:
            raise ConfigError(
                f"{where}: expand_v {expand_v} gives value_dim {value_dim} but "
                f"{jet_heads} heads x head_v_dim {head_v} = {jet_heads * head_v}"
            )
        reduction = int(get(jet, "dconv_generator_reduction", where))
        kw.update(
            gdn_k_heads=jet_heads,
            gdn_v_heads=jet_heads,
            gdn_head_k_dim=head_k,
            gdn_head_v_dim=head_v,
            gdn_norm_eps=float(get(jet, "norm_eps", where)),
            conv_size=int(get(jet, "conv_size", where)),
            jet_generator_reduction=reduction,
        )
    kw["core"] = middle_half_core(len(types))
    return ModelConfig(**kw)


# Hugging Face tensor name <-> ours. Ordered: the first matching rule wins.
_TO_OURS = [
    (r"^model\.embed_tokens\.", "embed_tokens."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.dynamic_conv1d\.", r"layers.\1.mixer."),
    (r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.mixer."),
    (r"^model\.layers\.(\d+)\.", r"layers.\1."),
    (r"^lm_head\.", "lm_head."),
]
_TO_HF = [
    (r"^embed_tokens\.", "model.embed_tokens."),
    (r"^norm\.", "model.norm."),
    (
        r"^layers\.(\d+)\.mixer\.kernel_generator\.",
        r"model.layers.\1.self_attn.dynamic_conv1d.kernel_generator.",
    ),
    (r"^layers\.(\d+)\.mixer\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.", r"model.layers.\1."),
    (r"^lm_head\.", "lm_head."),
]


def to_ours(hf_name: str):
    """Our parameter name for a Hugging Face tensor name (None: not a tensor we know)."""
    return rename(hf_name, _TO_OURS)


def to_hf(name: str) -> str:
    """The Hugging Face tensor name of one of our parameters (for error messages)."""
    return rename(name, _TO_HF) or name


def prepare_weights(weights: dict, config) -> dict:
    """Tied embeddings: the head is embed_tokens; a stored lm_head must agree with it."""
    if config.tie_embeddings and "lm_head.weight" in weights:
        import mlx.core as mx

        head = weights.pop("lm_head.weight")
        embed = weights.get("embed_tokens.weight")
        if embed is not None and (head.shape != embed.shape or not mx.array_equal(head, embed)):
            raise ConversionError(
                "config.json says tie_word_embeddings but lm_head.weight "
                "differs from model.embed_tokens.weight"
            )
    return weights
