"""Loading models, mirroring mlx-lm:

    model, tokenizer = mlx_sleep.load("jet-2b-mlx")      # a converted directory (or a Hub id)
    model = mlx_sleep.load_model("jet-2b-mlx")           # no tokenizer files needed
    logits = model(mx.array([ids]))                       # [B, T, V], a plain forward
    engine = SleepEngine(model, model.sleep_config)       # sleep with the stored settings

A directory written by `mlx-sleep convert` is loaded as is. An unconverted Hugging Face
checkpoint of a supported architecture (local or on the Hub) is converted in memory on the way
(nothing is written; its code is never run). Hub ids go through huggingface_hub.
"""

import os
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .config import ModelConfig, SleepConfig
from .io import read_json


def _model_types():
    from .models import hybrid, mlx_lm_adapters, ouro
    adapted = (mlx_lm_adapters.AdapterConfig, mlx_lm_adapters.Model)
    return {
        "jet_nemotron": (ModelConfig, hybrid.HybridLM),
        "hybrid": (ModelConfig, hybrid.HybridLM),
        "ouro": (ouro.OuroConfig, ouro.Model),
        **{t: adapted for t in mlx_lm_adapters.ARCHS},
    }


def _local(path_or_id: str) -> str:
    if os.path.isdir(path_or_id):
        return path_or_id
    from .convert.common import resolve_source
    return resolve_source(path_or_id)


def _read_weights(path: str) -> dict:
    from .convert.common import read_weights
    return read_weights(path)


def load_model(path_or_id: str, lazy: bool = False):
    """The model of a converted directory (or a supported Hugging Face checkpoint), with its
    sleep settings as `model.sleep_config` (a SleepConfig)."""
    path = _local(path_or_id)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json")
    config = read_json(os.path.join(path, "config.json"))
    if "model" not in config or "sleep" not in config:  # a Hugging Face checkpoint: convert
        from .convert import DEFAULT_SLEEP, build
        model, _, _ = build(path)
        model.sleep_config = SleepConfig(**DEFAULT_SLEEP)
        return model
    model_type = config.get("model_type", "hybrid")
    types = _model_types()
    if model_type not in types:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(sorted(types))}")
    config_cls, model_cls = types[model_type]
    model = model_cls(config_cls.from_dict(config["model"]))
    weights = _read_weights(path)
    from .convert.common import apply_quantization
    apply_quantization(model, config, weights)
    model.load_weights(list(weights.items()))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.sleep_config = SleepConfig.from_dict(config["sleep"])
    return model


def load(path_or_id: str, tokenizer_config: Optional[dict] = None, lazy: bool = False):
    """(model, tokenizer): the tokenizer is mlx-lm's TokenizerWrapper (streaming detokenizer,
    chat template) over the directory's tokenizer files."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = _local(path_or_id)
    model = load_model(path, lazy=lazy)
    config = read_json(os.path.join(path, "config.json"))
    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    tokenizer = load_tokenizer(Path(path), tokenizer_config or {}, eos_token_ids=eos)
    return model, tokenizer
