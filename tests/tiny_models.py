"""Tiny converted model directories, with a tokenizer and a chat template, for end-to-end tests.

    from tests.tiny_models import make_model_dir
    path = make_model_dir(tmp_path / "m", "jet_nemotron", loops=2, window=64)
    model, tokenizer = mlx_sleep.load(path)   # mlx-lm's TokenizerWrapper, with a chat template

Every kind is a directory as `mlx-sleep convert` writes it (config.json with "model" and "sleep",
model.safetensors) plus tokenizer files:
  hybrid         HybridLM built from a ModelConfig (attn, gdn, swa, jet blocks)
  jet_nemotron   the tiny original-layout Jet-Nemotron fixture, converted by `convert`
  ouro           the tiny Ouro fixture, converted
  ouro_jet       the same with 2 Jet layers inserted (`--insert-jet-layers 2`)
  qwen3_5        mlx-lm's Qwen3.5 under the adapter (GDN + attention), random weights
The models have random weights, so what they generate is meaningless; the mechanics are real.

The tokenizer is byte-level BPE without merges (one token per byte, so any text round-trips),
ChatML special tokens, and reserved filler tokens up to the model's vocabulary so every id a
model can emit decodes. Its eos is <|im_end|>, written into config.json as eos_token_id.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

FIXTURES = Path(__file__).parent / "fixtures"
KINDS = ("hybrid", "jet_nemotron", "ouro", "ouro_jet", "qwen3_5")
VOCAB_SIZE = 512  # the converted fixtures' vocabulary; the built models use the same
# The shape of the tiny mlx-lm linear/full-attention hybrids (Qwen3.5 and its kin) every test
# builds: 4 layers of width 32, GDN heads 2 (keys) x 4 (values).
LINEAR_HYBRID_SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=8,
    linear_conv_kernel_dim=4,
    num_hidden_layers=4,
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS = "<|im_end|>"
BOS = "<|endoftext|>"  # only where a test asks for a tokenizer that adds one
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def write_tokenizer(path, vocab_size: int = VOCAB_SIZE, add_bos: bool = False) -> dict:
    """tokenizer.json + tokenizer_config.json in `path`; returns {special token: id}.

    Ids 0..255 are the 256 bytes (GPT-2's byte-to-unicode alphabet), then the special tokens,
    then reserved tokens up to `vocab_size`. `add_bos`: `encode` puts <|endoftext|> before
    every text (as GPT-2 and Llama tokenizers put their BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    assert set(vocab) == set(ByteLevel.alphabet())
    special = {tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    n_reserved = vocab_size - len(vocab) - len(special)
    if n_reserved < 0:
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(vocab) + len(special)} "
            "tokens of the byte-level tokenizer"
        )
    vocab.update(special)
    vocab.update({f"<|reserved_{i}|>": len(vocab) + i for i in range(n_reserved)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    if add_bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, special[BOS])]
        )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": EOS,
                "pad_token": "<|endoftext|>",
                "bos_token": BOS if add_bos else None,
                "add_bos_token": add_bos,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 1 << 20,
            },
            f,
            indent=2,
        )
    return special


def _built_model(kind: str):
    """(model, model_type) for the kinds built here rather than converted from a fixture."""
    mx.random.seed(0)
    if kind == "hybrid":
        from mlx_sleep import HybridLM, ModelConfig

        return HybridLM(
            ModelConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=32,
                num_heads=2,
                layers="attn,gdn,swa,jet",
                swa_window=8,
                core=(1, 3),
            )
        ), "hybrid"
    if kind == "qwen3_5":
        from mlx_sleep.models.mlx_lm_adapters import FULL, LINEAR, AdapterConfig, Model

        args = dict(
            model_type="qwen3_5",
            vocab_size=VOCAB_SIZE,
            **LINEAR_HYBRID_SIZES,
            layer_types=[LINEAR, FULL, LINEAR, FULL],
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.25,
            },
        )
        return Model(AdapterConfig("qwen3_5", args, (1, 3))), "qwen3_5"
    raise ValueError(f"unknown tiny model kind {kind!r}; kinds: {', '.join(KINDS)}")


def make_model_dir(
    path,
    kind: str = "hybrid",
    loops: int = 1,
    window: int = 64,
    eviction: str = "hard",
    **convert_kw,
) -> str:
    """Write a tiny converted model directory of `kind` with a tokenizer at `path`; returns it.
    `convert_kw` (e.g. quantize=True) go to the converter (jet_nemotron, ouro, ouro_jet)."""
    from mlx_sleep.config import SleepConfig
    from mlx_sleep.convert import FORMAT, convert
    from mlx_sleep.convert.common import save_model_dir
    from mlx_sleep.io import read_json, write_json

    path = str(path)
    sleep = SleepConfig(loops=loops, window=window, eviction=eviction)
    if kind in ("jet_nemotron", "ouro", "ouro_jet"):
        src = FIXTURES / ("jet-nemotron-tiny" if kind == "jet_nemotron" else "ouro-tiny")
        convert(
            str(src),
            path,
            loops=loops,
            window=window,
            eviction=eviction,
            insert_jet_layers=2 if kind == "ouro_jet" else 0,
            **convert_kw,
        )
    else:
        model, model_type = _built_model(kind)
        config = {
            "format": FORMAT,
            "model_type": model_type,
            "model": model.config.to_dict(),
            "sleep": sleep.to_dict(),
            "source": {"path": f"tests/tiny_models.py:{kind}"},
        }
        save_model_dir(path, config, dict(tree_flatten(model.parameters())), None)
    special = write_tokenizer(path, VOCAB_SIZE)
    config = read_json(os.path.join(path, "config.json"))
    config["eos_token_id"] = special[EOS]
    config.pop("bos_token_id", None)
    write_json(os.path.join(path, "config.json"), config)
    return path
