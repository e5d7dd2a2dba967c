"""Checkpoint importers: Hugging Face / PyTorch checkpoints -> MLX model directories with sleep
settings. One module per source architecture; `CONVERTERS` maps config.json's model_type to it.

    from mlx_sleep.convert import convert
    convert("path/to/Jet-Nemotron-2B", "jet-2b-mlx", quantize=True, loops=4, window=2000)

Installed as `mlx_sleep.convert` (the sources live in the repository's top-level convert/).
"""

import os
from typing import Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ConfigError, SleepConfig
from . import jet_nemotron, ouro
from ..weights import read_weights, resolve_source
from .common import ConversionError, read_config
from .mlx_lm_hybrids import HYBRIDS

CONVERTERS = {m.MODEL_TYPE: m for m in (jet_nemotron, ouro)}
CONVERTERS.update(HYBRIDS)  # Qwen3.5 (MoE), Qwen3-Next, OLMo Hybrid: mlx-lm's files, adapted
FORMAT = "mlx-sleep"  # marks a converted directory's config.json
# Sleep settings a converted model starts with (the paper's GSM-Infinite hard-eviction runs use
# L = 2000; N = 1 is the pretrained model as is: N > 1 is meant to be fine-tuned for).
DEFAULT_SLEEP = dict(loops=1, window=2000, eviction="hard")

__all__ = ["convert", "build", "ConversionError", "CONVERTERS"]


def converter_for(hf: dict):
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONVERTERS:
        raise ConversionError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(CONVERTERS))}"
        )
    return CONVERTERS[model_type]


def build(src: str, *, core: Optional[Tuple[int, int]] = None, insert_jet_layers: int = 0):
    """(model, converter, hf config) for the checkpoint directory `src`, weights loaded in
    their stored dtype and checked tensor by tensor."""
    from .common import check_weights, rename_weights

    hf = read_config(src)
    conv = converter_for(hf)
    if insert_jet_layers and conv is not ouro:
        raise ConversionError(f"--insert-jet-layers applies to Ouro models, not {conv.MODEL_TYPE}")
    try:
        config = conv.from_hf_config(hf)
    except (ConfigError, TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise ConversionError(
            f"{os.path.join(src, 'config.json')}: "
            f"{type(e).__name__ if isinstance(e, KeyError) else ''}{e}"
        )
    if not isinstance(insert_jet_layers, int) or not 0 <= insert_jet_layers <= config.num_layers:
        raise ConversionError(
            f"--insert-jet-layers must be in 0..{config.num_layers} (at most one "
            f"per block; got {insert_jet_layers})"
        )
    weights = conv.prepare_weights(rename_weights(read_weights(src), conv.to_ours), config)
    model = conv.Model(config)
    check_weights(model, weights, conv.to_hf)
    model.load_weights(list(weights.items()))
    if insert_jet_layers:
        model = conv.insert_jet_layers(model, insert_jet_layers)
    if core is not None:
        try:
            model.config.core = tuple(core)
            model.config.validate()
        except ConfigError as e:
            raise ConversionError(f"--core: {e}")
    mx.eval(model.parameters())
    return model, conv, hf


def convert(
    hf_path: str,
    out: str,
    *,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    loops: Optional[int] = None,
    window: Optional[int] = None,
    eviction: Optional[str] = None,
    core: Optional[Tuple[int, int]] = None,
    insert_jet_layers: int = 0,
    force: bool = False,
) -> str:
    """Convert a Hugging Face checkpoint (local directory or Hub id) into an MLX model
    directory `out`. Errors are ConversionError (a ValueError) with one line; `out` is only
    created, complete, at the very end."""
    from .common import (
        cast,
        check_output,
        check_tokenizer_files,
        quantize as quantize_model,
        save_model_dir,
        source_dtype,
    )

    check_output(out, force, hf_path if os.path.isdir(hf_path) else None)
    try:
        sleep = SleepConfig(
            **{
                **DEFAULT_SLEEP,
                **{
                    k: v
                    for k, v in dict(loops=loops, window=window, eviction=eviction).items()
                    if v is not None
                },
            }
        )
    except ConfigError as e:
        raise ConversionError(str(e))
    src = resolve_source(hf_path)
    check_output(out, force, src)
    try:  # copied as they are: what `load` would refuse is refused now, before any work
        check_tokenizer_files(src)
    except (ConfigError, FileNotFoundError) as e:
        raise ConversionError(str(e))
    model, conv, hf = build(src, core=core, insert_jet_layers=insert_jet_layers)
    cast(model, dtype or source_dtype(hf))
    config = {
        "format": FORMAT,
        "model_type": conv.MODEL_TYPE,
        "model": model.config.to_dict(),
        "sleep": sleep.to_dict(),
        # A Hub id as given; a local directory by its name only (no user paths in shared files).
        "source": {
            "path": hf_path if src != hf_path else os.path.basename(os.path.normpath(src)),
            "architectures": hf.get("architectures"),
            "dtype": source_dtype(hf),
        },
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = hf.get(key)
        if value is None:
            continue
        if not all(
            type(i) is int and 0 <= i < model.vocab_size
            for i in (value if isinstance(value, list) else [value])
        ):
            raise ConversionError(
                f"config.json: {key} {str(value)[:40]} is not a token id of the "
                f"model's vocabulary of {model.vocab_size}"
            )
        config[key] = value
    if quantize:
        config = quantize_model(model, config, q_bits, q_group_size, model.keep_unquantized)
    weights = dict(tree_flatten(model.parameters()))
    return save_model_dir(out, config, weights, src)
