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

from .config import ConfigError, SleepConfig
from .io import read_json_object
from .models import model_from_config
from .weights import apply_quantization, read_weights, resolve_source

# Any one of these lets the tokenizer loader open a directory (convert copies more: its
# TOKENIZER_FILES).
TOKENIZER_ENTRY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_model(path_or_id: str, lazy: bool = False, force: bool = False):
    """The model of a converted directory (or a supported Hugging Face checkpoint), with its
    sleep settings as `model.sleep_config` (a SleepConfig). A config that cannot fit the
    machine's memory is refused unless `force`."""
    path = resolve_source(path_or_id)
    if not os.path.lexists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json")
    config = read_json_object(os.path.join(path, "config.json"))
    if "model" not in config or "sleep" not in config:  # a Hugging Face checkpoint: convert
        from .convert import DEFAULT_SLEEP, build
        model, _, _ = build(path)
        model.sleep_config = SleepConfig(**DEFAULT_SLEEP)
        return model
    model = model_from_config(config.get("model_type", "hybrid"), config["model"], force=force)
    sleep = SleepConfig.from_dict(config["sleep"])
    weights = read_weights(path)
    apply_quantization(model, config, weights)
    model.load_weights(list(weights.items()))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    model.sleep_config = sleep
    return model


def check_tokenizer(model, tokenizer, eos_ids=()):
    """A tokenizer that can produce ids the model has no embedding for is refused (MLX would
    read past the embedding table). Models may have more rows than tokens (padding), not fewer."""
    n = len(tokenizer._tokenizer) if hasattr(tokenizer, "_tokenizer") else len(tokenizer)
    if n > model.vocab_size:
        raise ConfigError(f"the tokenizer has {n} tokens but the model's vocabulary only "
                          f"{model.vocab_size}: they do not belong together")
    for i in eos_ids:
        if not 0 <= i < model.vocab_size:
            raise ConfigError(f"eos_token_id {i} is outside the model's vocabulary of "
                              f"{model.vocab_size}")


def _quietly(fn, *args, **kwargs):
    """Run fn with transformers' warnings off: reading our config.json (model_type
    "jet_nemotron", "ouro", ...) to find the tokenizer class, it warns that the type is not its
    own, on every load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def load(path_or_id: str, tokenizer_config: Optional[dict] = None, lazy: bool = False):
    """(model, tokenizer): the tokenizer is mlx-lm's TokenizerWrapper (streaming detokenizer,
    chat template) over the directory's tokenizer files."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = resolve_source(path_or_id)
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_ENTRY_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files "
                                f"({', '.join(TOKENIZER_ENTRY_FILES)}); "
                                "use load_model() for the weights alone")
    model = load_model(path, lazy=lazy)
    config = read_json_object(os.path.join(path, "config.json"))
    eos = config.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    if eos is not None and not (isinstance(eos, list) and all(type(i) is int for i in eos)):
        raise ConfigError(f"{path}/config.json: eos_token_id must be an integer or a list of "
                          f"integers (got {eos!r})")
    tokenizer = _quietly(load_tokenizer, Path(path), tokenizer_config or {}, eos_token_ids=eos)
    check_tokenizer(model, tokenizer, eos or ())
    return model, tokenizer
