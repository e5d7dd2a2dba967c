"""Gated DeltaNet hybrids that mlx-lm ships -> mlx-sleep model directories.

    qwen3_5 / qwen3_5_text   Qwen3.5 (text; a multimodal checkpoint's vision tower is dropped)
    qwen3_5_moe / _moe_text  Qwen3.5 MoE (the same, every MLP a routed MoE with a shared expert)
    qwen3_next               Qwen3-Next (MoE or dense MLPs)
    olmo_hybrid              OLMo Hybrid (separate q/k/v convs, beta in [0, 2], post-norms)

The models are mlx-lm's own files under an adapter (mlx_sleep/models/mlx_lm_adapters.py); this
module maps the Hugging Face config onto mlx-lm's ModelArgs and the tensors onto mlx-lm's names,
using mlx-lm's sanitize for the layout changes. Traps handled here:

- transformers 5 configs carry `layer_types` and `rope_parameters`, not `full_attention_interval`
  and `rope_theta`; mlx-lm's Qwen files assume the interval (default 4) and Qwen3-Next's
  ModelArgs requires `rope_theta` / `partial_rotary_factor` at the top level;
- Qwen RMSNorms store w with the scale 1 + w; mlx-lm's Qwen3-Next sanitize adds the 1 (and moves
  the conv axis) only for MoE checkpoints, so dense ones get it here;
- Qwen3.5 MoE experts come fused (experts.gate_up_proj [E, 2I, H], experts.down_proj: released
  multimodal checkpoints, split by mlx-lm's qwen3_5_moe sanitize) or one tensor per expert
  (experts.<e>.gate_proj ...: transformers' save of a text-only Qwen3_5MoeForCausalLM, stacked
  here); their configs have no intermediate_size (no dense MLP) and no norm_topk_prob (the router
  always renormalizes the top k);
- OLMo Hybrid checkpoints name the pre-norms attention_layer_norm / feedforward_layer_norm (as
  transformers' conversion mapping renames them), and released ones have no RoPE
  (`rope_parameters` null), which mlx-lm's ModelArgs would turn into the default RoPE.

Sleep default, all of them: the middle half of the blocks is the looped core (as Jet-Nemotron).
"""

import dataclasses
import re

from ..config import ConfigError, middle_half_core
from ..models import mlx_lm_adapters as arch
from .common import ConversionError

# Config keys every one of these needs (mlx-lm's Qwen3.5 args would default them silently).
REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "intermediate_size",
    "rms_norm_eps",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_conv_kernel_dim",
)
# Qwen3.5 MoE: every layer's MLP is routed (no dense intermediate_size)
MOE_REQUIRED = tuple(k for k in REQUIRED if k != "intermediate_size") + (
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
)


def _need(c: dict, keys, where="config.json"):
    missing = [k for k in keys if c.get(k) is None]
    if missing:
        raise ConfigError(f"{where} lacks {', '.join(missing)}")


def _layer_types(c: dict, model_type: str) -> list:
    """The checkpoint's own layer_types; older configs give full_attention_interval instead."""
    if c.get("layer_types") is not None:
        return list(c["layer_types"])
    n = c["num_hidden_layers"]
    if model_type == "olmo_hybrid":  # transformers' default: every 4th, at least the last
        types = [arch.FULL if i % 4 == 3 else arch.LINEAR for i in range(n)]
        if arch.FULL not in types:
            types[-1] = arch.FULL
        return types
    interval = int(c.get("full_attention_interval", 4))
    return [arch.LINEAR if (i + 1) % interval else arch.FULL for i in range(n)]


def _rope_type(rope: dict) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


class HybridConverter:
    """What convert/__init__.py needs of an importer, for one mlx-lm hybrid family."""

    Model = arch.Model

    def __init__(self, model_type: str, to_ours=(), to_hf=(), required=REQUIRED):
        self.MODEL_TYPE = model_type
        self._required = tuple(required)
        self._to_ours, self._to_hf = list(to_ours), list(to_hf)

    # -- config ----------------------------------------------------------------------------
    def from_hf_config(self, hf: dict) -> arch.AdapterConfig:
        c = dict(hf.get("text_config") or hf)  # multimodal Qwen3.5: the text model's config
        if "tie_word_embeddings" not in c and "tie_word_embeddings" in hf:
            c["tie_word_embeddings"] = hf["tie_word_embeddings"]
        for key in ("text_config", "vision_config", "auto_map"):  # auto_map: never carried over
            c.pop(key, None)
        _need(c, self._required)
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {c['hidden_act']!r} is not supported (silu only)")
        c["layer_types"] = _layer_types(c, self.MODEL_TYPE)
        c["model_type"] = self.MODEL_TYPE
        getattr(self, "_args_" + self.MODEL_TYPE)(c)
        return arch.AdapterConfig(self.MODEL_TYPE, c, middle_half_core(c["num_hidden_layers"]))

    def _args_qwen3_5(self, c):
        if c.get("rope_parameters") is None:  # older layout: rope settings at the top level
            if c.get("rope_theta") is None:
                raise ConfigError("config.json has neither rope_parameters nor rope_theta")
            c["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": c["rope_theta"],
                "partial_rotary_factor": c.get("partial_rotary_factor", 0.25),
            }

    def _args_qwen3_5_moe(self, c):
        self._args_qwen3_5(c)
        c["norm_topk_prob"] = True  # transformers' Qwen3.5 MoE router always renormalizes

    def _args_qwen3_next(self, c):
        rope = c.get("rope_parameters") or {}
        for key in ("rope_theta", "partial_rotary_factor"):
            if c.get(key) is None and key in rope:
                c[key] = rope[key]
        if rope and _rope_type(rope) != "default" and not c.get("rope_scaling"):
            c["rope_scaling"] = rope
        c.setdefault("mlp_only_layers", [])
        c.setdefault("decoder_sparse_step", 1)
        from mlx_lm.models.qwen3_next import ModelArgs

        _need(
            c,
            [
                f.name
                for f in dataclasses.fields(ModelArgs)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ],
        )

    def _args_olmo_hybrid(self, c):
        rope = c.get("rope_parameters")
        if rope is None and "rope_theta" in c:
            rope = {"rope_theta": c["rope_theta"]}
        if rope is None or rope.get("rope_theta") is None:
            # Released checkpoints: no RoPE at all. mlx-lm skips RoPE when rope_theta is None.
            c["rope_parameters"], c["rope_theta"] = None, None
        elif _rope_type(rope) != "default":
            raise ConfigError(
                f"rope type {_rope_type(rope)!r} is not supported for olmo_hybrid "
                "(mlx-lm's model file implements plain RoPE)"
            )
        for key, default in (
            ("linear_allow_neg_eigval", True),
            ("tie_word_embeddings", False),
            ("attention_bias", False),
            ("max_position_embeddings", 65536),
        ):
            c.setdefault(key, default)
        if c.get("num_key_value_heads") is None:
            c["num_key_value_heads"] = c["num_attention_heads"]

    # -- tensors -----------------------------------------------------------------------------
    def to_ours(self, name: str) -> str:
        for pattern, repl in self._to_ours:
            name = re.sub(pattern, repl, name)
        return name  # unknown names go on to check_weights, which names them with shapes

    def to_hf(self, name: str) -> str:
        for pattern, repl in self._to_hf:
            name = re.sub(pattern, repl, name)
        return name

    def prepare_weights(self, weights: dict, config: arch.AdapterConfig) -> dict:
        weights = {
            k: v
            for k, v in weights.items()
            if not k.startswith(("model.visual.", "visual.", "vision_tower."))
        }
        tied = config.args.get("tie_word_embeddings")
        head, embed = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
        if tied and head is not None and embed is not None:
            import mlx.core as mx

            if head.shape != embed.shape or not mx.array_equal(head, embed):
                raise ConversionError(
                    "config.json says tie_word_embeddings but lm_head.weight "
                    "differs from model.embed_tokens.weight"
                )
        moe = any(".mlp.experts." in k for k in weights)
        if self.MODEL_TYPE == "qwen3_5_moe":
            weights = _stack_experts(weights)
        weights = arch.Model(config).sanitize(weights)
        if self.MODEL_TYPE == "qwen3_next" and not moe:
            weights = _qwen_norms_and_conv(weights)  # mlx-lm's sanitize returns early here
        return weights


def _stack_experts(weights: dict) -> dict:
    """One tensor per expert (...mlp.experts.<e>.gate_proj.weight, as transformers saves a
    text-only Qwen3.5 MoE) -> mlx-lm's stacked ...mlp.switch_mlp.gate_proj.weight [E, ...].
    Fused checkpoints (experts.gate_up_proj) pass through to mlx-lm's sanitize."""
    import mlx.core as mx

    pattern = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    groups, out = {}, {}
    for k, v in weights.items():
        m = pattern.match(k)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = v
        else:
            out[k] = v
    for (prefix, proj), experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            missing = sorted(set(range(max(experts) + 1)) - set(experts))
            raise ConversionError(
                "missing tensor(s): "
                + ", ".join(f"{prefix}.experts.{e}.{proj}.weight" for e in missing)
            )
        out[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack(
            [experts[e] for e in range(len(experts))]
        )
    return out


def _qwen_norms_and_conv(weights: dict) -> dict:
    """What mlx-lm's Qwen sanitize does to a Hugging Face checkpoint: conv weights [C, 1, W] ->
    [C, W, 1]; zero-centred RMSNorm weights w -> 1 + w (not the gated GDN norm)."""
    norms = (
        ".input_layernorm.weight",
        ".post_attention_layernorm.weight",
        "model.norm.weight",
        ".q_norm.weight",
        ".k_norm.weight",
    )
    out = {}
    for k, v in weights.items():
        if "conv1d.weight" in k and v.ndim == 3 and v.shape[-1] != 1:
            v = v.moveaxis(2, 1)
        elif k.endswith(norms) and v.ndim == 1:
            v = v + 1.0
        out[k] = v
    return out


QWEN3_5 = HybridConverter(
    "qwen3_5",
    [
        (r"^model\.language_model\.", "model."),
        (r"^language_model\.model\.", "model."),
        (r"^language_model\.lm_head\.", "lm_head."),
    ],
)
QWEN3_5_MOE = HybridConverter("qwen3_5_moe", QWEN3_5._to_ours, required=MOE_REQUIRED)
QWEN3_NEXT = HybridConverter("qwen3_next")
OLMO_HYBRID = HybridConverter(
    "olmo_hybrid",
    to_ours=[
        (r"\.attention_layer_norm\.", ".input_layernorm."),
        (r"\.feedforward_layer_norm\.", ".post_attention_layernorm."),
    ],
    to_hf=[
        (r"\.input_layernorm\.", ".attention_layer_norm."),
        (r"\.post_attention_layernorm\.", ".feedforward_layer_norm."),
    ],
)

# config.json model_type -> importer (..._text: a text-only checkpoint)
HYBRIDS = {
    "qwen3_5": QWEN3_5,
    "qwen3_5_text": QWEN3_5,
    "qwen3_5_moe": QWEN3_5_MOE,
    "qwen3_5_moe_text": QWEN3_5_MOE,
    "qwen3_next": QWEN3_NEXT,
    "olmo_hybrid": OLMO_HYBRID,
}
