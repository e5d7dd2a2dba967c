"""What every importer shares besides reading checkpoints (mlx_sleep/weights.py): the Hugging
Face config, checking tensors against the model, dtype and quantization, and writing the MLX
model directory atomically. config.json is read as JSON: nothing in a checkpoint is executed.
"""

import os
import re
import shutil
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..io import (
    MARKER,
    atomic_dir,
    check_replaceable_dir,
    file_mode,
    read_json_object,
    save_arrays,
    write_json,
)
from ..loading import TOKENIZER_FILES, check_tokenizer_files  # noqa: F401 (convert uses it)
from ..weights import CheckpointError, listing, shape_str

# One error for reading and converting checkpoints.
ConversionError = CheckpointError

# TOKENIZER_FILES: the tokenizer and generation files copied next to the weights when present,
# after check_tokenizer_files (regular files, JSON within limits, no auto_map).
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 << 30  # as mlx-lm


def read_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.lexists(path):
        raise ConversionError(f"{src} has no config.json")
    try:
        return read_json_object(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConversionError(str(e))


# -- checking tensors against the model -------------------------------------------------------


def rename(name: str, rules) -> Optional[str]:
    """`name` rewritten by the first of the (pattern, replacement) rules that matches; None when
    none does."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def rename_weights(weights: dict, to_ours: Callable[[str], Optional[str]]) -> dict:
    out, unknown = {}, []
    for k, v in weights.items():
        name = to_ours(k)
        if name is None:
            unknown.append(f"{k} {shape_str(v.shape)}")
        else:
            out[name] = v
    if unknown:
        raise ConversionError(f"unexpected tensor(s): {listing(unknown)}")
    return out


def check_weights(model: nn.Module, weights: dict, to_hf: Callable[[str], str]):
    """Missing, unexpected and mis-shaped tensors, named with their shapes (original names)."""
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    missing = [f"{to_hf(k)} {shape_str(s)}" for k, s in expected.items() if k not in weights]
    unexpected = [
        f"{to_hf(k)} {shape_str(v.shape)}" for k, v in weights.items() if k not in expected
    ]
    if missing:
        raise ConversionError(f"missing tensor(s): {listing(missing)}")
    if unexpected:
        raise ConversionError(f"unexpected tensor(s): {listing(unexpected)}")
    wrong = [
        f"{to_hf(k)} is {shape_str(weights[k].shape)}, config.json implies {shape_str(s)}"
        for k, s in expected.items()
        if tuple(weights[k].shape) != tuple(s)
    ]
    if wrong:
        raise ConversionError(f"config.json disagrees with the weights: {listing(wrong, 2)}")


# -- dtype, quantization ----------------------------------------------------------------------


def source_dtype(hf: dict) -> str:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float16"
    return dtype if isinstance(dtype, str) and dtype in DTYPES else "float16"


def cast(model: nn.Module, dtype: str):
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    model.set_dtype(DTYPES[dtype])


def quantize(
    model: nn.Module,
    config: dict,
    bits: int,
    group_size: int,
    skip: Callable[[str], bool] = lambda path: False,
) -> dict:
    """mlx-lm's quantization (nn.quantize with a class predicate; config gets "quantization")."""
    from mlx_lm.utils import quantize_model

    if bits not in (2, 3, 4, 5, 6, 8):
        raise ConversionError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8 (got {bits})")
    if group_size not in (32, 64, 128):
        raise ConversionError(f"--q-group-size must be 32, 64 or 128 (got {group_size})")
    _, config = quantize_model(
        model, config, group_size, bits, quant_predicate=lambda path, module: not skip(path)
    )
    return config


# -- writing ----------------------------------------------------------------------------------


def check_output(out: str, force: bool, src: Optional[str] = None):
    """`out` may be (re)written as a whole: see io.check_replaceable_dir (never the source, the
    current directory or a parent of either; with --force only a converted model of ours)."""
    check_replaceable_dir(out, "model", force, protect=[src] if src else [])


def save_model_dir(out: str, config: dict, weights: Dict[str, mx.array], src: Optional[str]):
    """config.json, safetensors shards (+ index when more than one), tokenizer files; written
    under a temporary name and renamed into place only when complete. `out` may only be new
    or a model this tool converted (see check_output)."""
    check_replaceable_dir(out, "model", force=True, protect=[src] if src else [])
    shards, size = [{}], 0
    for k in sorted(weights):
        v = weights[k]
        if shards[-1] and size + v.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    with atomic_dir(out) as tmp:
        write_json(os.path.join(tmp, MARKER), {"owner": "model", "written_by": "mlx-sleep"})
        weight_map = {}
        for i, shard in enumerate(shards):
            name = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            save_arrays(os.path.join(tmp, name), shard, metadata={"format": "mlx"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(v.nbytes for v in weights.values())
            write_json(
                os.path.join(tmp, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map},
            )
        if src is not None:
            for f in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, f)):
                    shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
                    os.chmod(os.path.join(tmp, f), file_mode())
        write_json(os.path.join(tmp, "config.json"), config)
    return out
