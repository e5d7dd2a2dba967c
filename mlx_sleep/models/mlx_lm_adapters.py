"""mlx-lm's own Gated DeltaNet hybrids under the sleep engine, through adapters (no copies).

Qwen3.5 (text, dense or MoE), Qwen3-Next and OLMo Hybrid are built with mlx-lm's model files
(mlx_lm/models/qwen3_5.py, qwen3_5_moe.py, qwen3_next.py, olmo_hybrid.py; their math in
gated_delta.py). The adapter takes over the mlx-lm model's children, so parameter names are
mlx-lm's and `layers` is mlx-lm's decoder layers; its `sleep_blocks()` (see models/base.py) wrap
them as blocks with per-layer state dicts. Each block runs the mlx-lm decoder layer as is and
translates our state to and from the cache object the layer expects:

  GDN layers        an mlx-lm ArraysCache filled from {"conv", "S"} (Qwen) or
                    {"conv_q", "conv_k", "conv_v", "S"} (OLMo Hybrid); S is [B, Hv, Dv, Dk] in
                    float32 and is the only carried entry (the conv inputs restart per pass).
  attention layers  a KVCache stand-in over {"keys", "values"} whose offset is the global
                    position (RoPE continues across windows even after eviction); we build the
                    mask, so the `window` argument is honoured as in layers/attention.py.

The checkpoint's own `layer_types` decides which layer is which. mlx-lm's Qwen3.5 / Qwen3-Next
files derive it from a fixed `full_attention_interval` (default 4, and transformers 5 configs
no longer write it), so mismatching layers are rebuilt here with the right kind.
"""

import copy
import dataclasses
import importlib
import typing
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .. import kernels
from ..config import ConfigError, ModelConfigBase, check_type
from ..gdn_math import evict_conv
from ..layers.attention import attention_mask, evict_kv
from .base import SleepModel

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass(frozen=True)
class Arch:
    module: str  # mlx_lm.models.<module>
    model_class: str  # the text model class in it
    layer_class: Optional[str]  # decoder layer built per layer_types (None: mlx-lm reads them)
    conv_slots: Tuple[str, ...]  # the ArraysCache slots before S, in mlx-lm's order
    # "<module>.<class>" whose sanitize (a multimodal wrapper's) runs before the text model's
    wrapper: Optional[str] = None


ARCHS = {
    "qwen3_5": Arch("qwen3_5", "TextModel", "DecoderLayer", ("conv",)),
    # Qwen3.5 MoE: qwen3_5's TextModel with num_experts > 0; mlx-lm's qwen3_5_moe.Model only adds
    # the sanitize that splits fused experts.gate_up_proj into switch_mlp.gate_proj / up_proj
    "qwen3_5_moe": Arch("qwen3_5", "TextModel", "DecoderLayer", ("conv",), "qwen3_5_moe.Model"),
    "qwen3_next": Arch("qwen3_next", "Model", "Qwen3NextDecoderLayer", ("conv",)),
    "olmo_hybrid": Arch("olmo_hybrid", "Model", None, ("conv_q", "conv_k", "conv_v")),
}


@dataclass
class AdapterConfig(ModelConfigBase):
    """model_type: an ARCHS key; args: the text config as mlx-lm's ModelArgs reads it, with
    `layer_types` and `num_hidden_layers`; core: the looped blocks (None = all)."""

    model_type: str
    args: dict = field(default_factory=dict)
    core: Optional[Tuple[int, int]] = None

    @property
    def layer_types(self) -> list:
        return list(self.args.get("layer_types") or [])

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def validate(self):
        if self.model_type not in ARCHS:
            raise ConfigError(
                f"unsupported mlx-lm hybrid {self.model_type!r}; supported: "
                f"{', '.join(sorted(ARCHS))}"
            )
        types, n = self.layer_types, self.args.get("num_hidden_layers")
        if not types:
            raise ConfigError("layer_types is missing or empty")
        bad = sorted({t for t in types if t not in (LINEAR, FULL)})
        if bad:
            raise ConfigError(
                f"unsupported layer type(s) {bad} in layer_types; supported: {LINEAR}, {FULL}"
            )
        if n != len(types):
            raise ConfigError(f"layer_types has {len(types)} entries but num_hidden_layers is {n}")
        self.check_args()
        super().validate()

    def check_args(self):
        """Every setting mlx-lm's ModelArgs declares has the type it declares (a string
        "false" for tie_word_embeddings would be true); null is left to mlx-lm's handling."""
        arch = ARCHS[self.model_type]
        module = _mlx_lm_module(arch.module)
        args_cls = module.TextModelArgs if arch.model_class == "TextModel" else module.ModelArgs
        hints = typing.get_type_hints(args_cls)
        for f in dataclasses.fields(args_cls):
            value = self.args.get(f.name)
            if value is not None and f.name in hints:
                check_type(f.name, value, hints[f.name])


# -- per-layer state <-> mlx-lm cache objects ---------------------------------------------------


class _KV:
    """The part of mlx-lm's KVCache its attention uses: `offset` (the RoPE position, global
    here, not the number of cached keys, which eviction shrinks) and update_and_fetch."""

    def __init__(self, state: dict, offset: int):
        self.offset = offset
        self.keys, self.values = state.get("keys"), state.get("values")

    def update_and_fetch(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values


class AttentionState:
    """State policy of an attention layer: {"keys", "values"} [B, Hkv, Tk, D], post-RoPE."""

    carried = ()

    def initial_state(self, batch_size: int) -> dict:
        return {}

    def evict(self, state: dict, keep: int) -> dict:
        return evict_kv(state, keep)


class GDNState:
    """State policy of a GDN layer: the conv inputs of the last W-1 tokens per conv slot, and S."""

    carried = ("S",)

    def __init__(self, slots, channels, width, s_shape, dtype):
        self.slots, self.channels, self.width = tuple(slots) + ("S",), channels, width
        self.s_shape, self.dtype = s_shape, dtype

    def initial_state(self, batch_size: int) -> dict:
        state = {
            s: mx.zeros((batch_size, self.width - 1, c), dtype=self.dtype)
            for s, c in zip(self.slots, self.channels)
        }
        state["S"] = mx.zeros((batch_size,) + self.s_shape, dtype=mx.float32)
        return state

    def evict(self, state: dict, keep: int) -> dict:
        """Keep S; keep the conv inputs of at most the last `keep` tokens."""
        return {**state, **{s: evict_conv(state[s], keep) for s in self.slots[:-1]}}


class MlxLmLayerBlock:
    """One mlx-lm decoder layer as a sleep-engine block: (h, state, offset, window) -> (h, state).
    Not an nn.Module: the layer's weights are registered once, under the adapter's `model`."""

    def __init__(self, layer, kind: str, mixer):
        self.layer, self.kind, self.mixer = layer, kind, mixer

    def __call__(self, h, state: dict, offset: int = 0, window: Optional[int] = None):
        if self.kind == LINEAR:
            from mlx_lm.models.cache import ArraysCache

            cache = ArraysCache(size=len(self.mixer.slots))
            cache.cache = [state[s] for s in self.mixer.slots]
            h = self.layer(h, mask=None, cache=cache)
            return h, dict(zip(self.mixer.slots, cache.cache))
        T = h.shape[1]
        cache = _KV(state, offset)
        k_len = T + (state["keys"].shape[2] if state else 0)
        h = self.layer(h, mask=attention_mask(T, k_len, offset, window), cache=cache)
        new_state = {"keys": cache.keys, "values": cache.values}
        if window is not None:  # keys no future query can see
            new_state = self.mixer.evict(new_state, window - 1)
        return h, new_state


# -- the adapter ---------------------------------------------------------------------------------


def _mlx_lm_module(name: str):
    try:
        return importlib.import_module(f"mlx_lm.models.{name}")
    except ImportError as e:  # an mlx-lm older than the file (tested with 0.32.2)
        import mlx_lm

        raise ConfigError(f"mlx-lm {mlx_lm.__version__} has no {name} model ({e}); upgrade mlx-lm")


def _mlx_lm_model(config: AdapterConfig):
    """The mlx-lm text model for `config`, with layer kinds as `layer_types` says."""
    arch = ARCHS[config.model_type]
    module = _mlx_lm_module(arch.module)
    # mlx-lm's GDN layers call the module's `gated_delta_update`: route it through our op (every
    # shape, float32 gates and state, a chunked backward; docs/kernels.md). Same math and
    # signature, so anything else using this mlx-lm module in the process gets the same numbers.
    module.gated_delta_update = kernels.gated_delta_update
    if arch.wrapper is not None:
        _mlx_lm_module(arch.wrapper.rsplit(".", 1)[0])
    args_cls = module.TextModelArgs if arch.model_class == "TextModel" else module.ModelArgs
    args = args_cls.from_dict(copy.deepcopy(config.args))  # mlx-lm edits rope dicts in place
    lm = getattr(module, arch.model_class)(args)
    types = config.layer_types
    if arch.layer_class is not None:
        layer_cls = getattr(module, arch.layer_class)
        n = len(types)
        for i, t in enumerate(types):
            if lm.model.layers[i].is_linear != (t == LINEAR):
                # is_linear = (i + 1) % interval != 0: interval 1 makes attention, n + 1 GDN
                fixed = dataclasses.replace(args, full_attention_interval=1 if t == FULL else n + 1)
                lm.model.layers[i] = layer_cls(fixed, i)
        # mlx-lm's own forward picks its mask-making caches by these indices
        lm.model.fa_idx = next((i for i, t in enumerate(types) if t == FULL), None)
        lm.model.ssm_idx = next((i for i, t in enumerate(types) if t == LINEAR), None)
    return lm, arch


class Model(SleepModel):
    """A Qwen3.5 (MoE) / Qwen3-Next / OLMo Hybrid model from mlx-lm, with the sleep interface.

    Parameters live exactly where mlx-lm puts them (`model.embed_tokens`, `model.layers.i...`,
    `lm_head`) and `layers` is mlx-lm's decoder layers, as on mlx-lm's own models; `args` is
    mlx-lm's ModelArgs, so mlx-lm's sanitize runs on this object."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        lm, self._arch = _mlx_lm_model(config)
        self.args = lm.args
        self._lm_class = type(lm)
        for name, child in lm.items():  # adopt mlx-lm's children: its parameter names
            self[name] = child

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def layers(self):
        return self.model.layers

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def tie_embeddings(self) -> bool:
        return self.args.tie_word_embeddings

    def sleep_blocks(self) -> list:
        """Fresh wrappers each call: they hold no state and always see the current modules."""
        dtype = self.model.norm.weight.dtype  # the activations' dtype (quantization-proof)
        blocks = []
        for layer, kind in zip(self.model.layers, self.config.layer_types):
            if kind == FULL:
                blocks.append(MlxLmLayerBlock(layer, kind, AttentionState()))
                continue
            la = layer.linear_attn
            if len(self._arch.conv_slots) == 1:
                channels = (la.conv_dim,)
            else:
                channels = (la.key_dim, la.key_dim, la.value_dim)
            mixer = GDNState(
                self._arch.conv_slots,
                channels,
                la.conv_kernel_size,
                (la.num_v_heads, la.head_v_dim, la.head_k_dim),
                dtype,
            )
            blocks.append(MlxLmLayerBlock(layer, kind, mixer))
        return blocks

    def embed(self, ids):
        return self.model.embed_tokens(ids)

    def head(self, h):
        h = self.model.norm(h)
        return self.model.embed_tokens.as_linear(h) if self.tie_embeddings else self.lm_head(h)

    def keep_unquantized(self, path: str) -> bool:
        # MoE routers: tiny outputs that mlx-lm keeps at 8 bits; we keep them unquantized
        return path.endswith(("mlp.gate", "shared_expert_gate"))

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face tensors -> mlx-lm's (conv layout, zero-centred norms, dropped MTP heads),
        by mlx-lm's own sanitize, which only reads `self.args`."""
        if self._arch.wrapper is None:
            return self._lm_class.sanitize(self, weights)
        # The wrapper's sanitize prefixes names with `language_model.`, does its own part (fused
        # MoE experts) and hands over to `language_model.sanitize`: the text model's, unprefixed.
        module, cls = self._arch.wrapper.rsplit(".", 1)
        wrapper = getattr(_mlx_lm_module(module), cls)

        def text_sanitize(w):
            w = {
                k[len("language_model.") :] if k.startswith("language_model.") else k: v
                for k, v in w.items()
            }
            return self._lm_class.sanitize(self, w)

        shim = SimpleNamespace(
            language_model=SimpleNamespace(args=self.args, sanitize=text_sanitize)
        )
        return wrapper.sanitize(shim, weights)

    def set_dtype(self, dtype, predicate=lambda t: mx.issubdtype(t, mx.floating)):
        """As nn.Module.set_dtype, but A_log stays float32 (mlx-lm's cast_predicate)."""
        keep = [(k, v) for k, v in tree_flatten(self.parameters()) if k.endswith("A_log")]
        super().set_dtype(dtype, predicate)
        self.update(tree_unflatten(keep))
