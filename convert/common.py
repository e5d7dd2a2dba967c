"""What every importer shares: finding the checkpoint, reading its tensors safely, checking them
against the model, dtype and quantization, and writing the MLX model directory atomically.

Nothing from a checkpoint repository is ever executed: config.json is read as JSON, weights as
safetensors (or PyTorch .bin through torch.load(weights_only=True), which refuses pickled code).
"""

import glob
import json
import os
import shutil
import struct
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..io import atomic_dir, write_json


class ConversionError(ValueError):
    """The checkpoint or the options cannot be converted; the message says what and where."""


# Tokenizer and generation files copied next to the weights when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# What a Hub download fetches: never *.py (no remote code), never the weights of other formats
# when safetensors exist (decided after listing, see resolve_source).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
MAX_SHARD_BYTES = 5 << 30  # as mlx-lm


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def listing(items, n=3) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# -- finding a checkpoint ---------------------------------------------------------------------

def resolve_source(path_or_id: str) -> str:
    """A local directory, or a Hugging Face Hub id downloaded with huggingface_hub (users'
    machines; tests only use local directories)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ConversionError(f"{path_or_id} is a file; pass the checkpoint directory")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise ConversionError(f"{path_or_id}: no such directory (and not a Hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, missing repo: one line either way
        raise ConversionError(f"could not download {path_or_id} from the Hugging Face Hub: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def read_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{src} has no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON: {e}")


# -- reading tensors --------------------------------------------------------------------------

_ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
              "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}  # U32: packed quantized weights


def check_safetensors(path: str) -> dict:
    """Validate a safetensors file's header against its size; returns {name: (dtype, shape)}.
    Catches truncated and corrupt files with a clear message before any tensor is read."""
    size = os.path.getsize(path)
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{name} is truncated ({size} bytes, not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise ConversionError(f"{name} is corrupt or truncated: header of {n} bytes in a "
                                  f"{size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{name} is corrupt: its header is not valid JSON")
    if not isinstance(header, dict):
        raise ConversionError(f"{name} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for tname, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{name} is corrupt: bad header entry for {tname}")
        if dtype not in _ST_DTYPES:
            raise ConversionError(f"{name}: tensor {tname} has unsupported dtype {dtype}")
        count = 1
        for s in shape:
            count *= s
        if b - a != count * _ST_DTYPES[dtype] or a < 0:
            raise ConversionError(f"{name} is corrupt: {tname} {shape_str(shape)} {dtype} "
                                  f"has {b - a} bytes of data")
        end = max(end, b)
        out[tname] = (dtype, shape)
    if 8 + n + end > size:
        raise ConversionError(f"{name} is truncated: {size} bytes, its header needs {8 + n + end}")
    return out


def _load_safetensors(path: str) -> Dict[str, mx.array]:
    check_safetensors(path)
    try:
        return mx.load(path)
    except Exception as e:
        raise ConversionError(f"{os.path.basename(path)} could not be read: {e}")


def _load_bin(path: str) -> Dict[str, mx.array]:
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{os.path.basename(path)} is a PyTorch file: install torch to "
                              "read it, or convert the checkpoint to safetensors")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    except Exception as e:
        raise ConversionError(f"{os.path.basename(path)} could not be read safely "
                              f"(weights_only=True): {str(e).splitlines()[0]}")
    out = {}
    for k, v in state.items():
        if not hasattr(v, "dtype"):
            continue
        if v.dtype == torch.bfloat16:
            out[k] = mx.array(v.float().numpy()).astype(mx.bfloat16)
        else:
            out[k] = mx.array(v.numpy())
    return out


def _shard_files(src: str, ext: str):
    """The shard files of one format: from the index when there is one, else every file."""
    index = os.path.join(src, f"model.{ext}.index.json" if ext == "safetensors"
                         else "pytorch_model.bin.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConversionError(f"{os.path.basename(index)} is not a valid shard index")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(src, f))]
        if missing:
            raise ConversionError(f"shard(s) listed in {os.path.basename(index)} are missing: "
                                  f"{listing(missing)}")
        return [os.path.join(src, f) for f in files], weight_map
    # No index: the conventional names first, so stray files (e.g. test fixtures) stay out.
    stem = "model" if ext == "safetensors" else "pytorch_model"
    for pattern in (f"{stem}.{ext}", f"{stem}-*-of-*.{ext}", f"*.{ext}"):
        files = sorted(glob.glob(os.path.join(src, pattern)))
        if files:
            return files, None
    return [], None


def read_weights(src: str) -> Dict[str, mx.array]:
    """Every tensor of the checkpoint in `src`, by its original name (any shard layout)."""
    files, weight_map = _shard_files(src, "safetensors")
    loader = _load_safetensors
    if not files:
        files, weight_map = _shard_files(src, "bin")
        loader = _load_bin
    if not files:
        raise ConversionError(f"{src} holds no weights (*.safetensors or pytorch_model*.bin)")
    weights = {}
    for path in files:
        for k, v in loader(path).items():
            if k in weights:
                raise ConversionError(f"tensor {k} appears in more than one shard")
            weights[k] = v
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(weights))
        if absent:
            raise ConversionError(f"tensor(s) listed in the shard index are not in the shards: "
                                  f"{listing(absent)}")
    return weights


# -- checking tensors against the model -------------------------------------------------------

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
    unexpected = [f"{to_hf(k)} {shape_str(v.shape)}" for k, v in weights.items() if k not in expected]
    if missing:
        raise ConversionError(f"missing tensor(s): {listing(missing)}")
    if unexpected:
        raise ConversionError(f"unexpected tensor(s): {listing(unexpected)}")
    wrong = [f"{to_hf(k)} is {shape_str(weights[k].shape)}, config.json implies "
             f"{shape_str(s)}" for k, s in expected.items() if tuple(weights[k].shape) != tuple(s)]
    if wrong:
        raise ConversionError(f"config.json disagrees with the weights: {listing(wrong, 2)}")


# -- dtype, quantization ----------------------------------------------------------------------

def source_dtype(hf: dict) -> str:
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float16"
    return dtype if dtype in DTYPES else "float16"


def cast(model: nn.Module, dtype: str):
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")
    model.set_dtype(DTYPES[dtype])


def quantize(model: nn.Module, config: dict, bits: int, group_size: int,
             skip: Callable[[str], bool] = lambda path: False) -> dict:
    """mlx-lm's quantization (nn.quantize with a class predicate; config gets "quantization")."""
    from mlx_lm.utils import quantize_model

    if bits not in (2, 3, 4, 5, 6, 8):
        raise ConversionError(f"--q-bits must be one of 2, 3, 4, 5, 6, 8 (got {bits})")
    if group_size not in (32, 64, 128):
        raise ConversionError(f"--q-group-size must be 32, 64 or 128 (got {group_size})")
    _, config = quantize_model(model, config, group_size, bits,
                               quant_predicate=lambda path, module: not skip(path))
    return config


def apply_quantization(model: nn.Module, config: dict, weights: dict):
    """Before loading a quantized model: quantize exactly the layers that have scales on disk."""
    q = config.get("quantization")
    if not q:
        return

    def predicate(path, module):
        if isinstance(q.get(path), dict):
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                class_predicate=predicate)


# -- writing ----------------------------------------------------------------------------------

def check_output(out: str, force: bool):
    if os.path.exists(out) and not force:
        raise ConversionError(f"{out} already exists; pass --force to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"{out} exists and is not a directory")


def save_model_dir(out: str, config: dict, weights: Dict[str, mx.array], src: Optional[str]):
    """config.json, safetensors shards (+ index when more than one), tokenizer files; written
    under a temporary name and renamed into place only when complete."""
    shards, size = [{}], 0
    for k in sorted(weights):
        v = weights[k]
        if shards[-1] and size + v.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    with atomic_dir(out) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a model directory, not a private one (mkdtemp makes 0700)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = ("model.safetensors" if len(shards) == 1
                    else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            mx.save_safetensors(os.path.join(tmp, name), shard, metadata={"format": "mlx"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(v.nbytes for v in weights.values())
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        if src is not None:
            for f in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, f)):
                    shutil.copyfile(os.path.join(src, f), os.path.join(tmp, f))
        write_json(os.path.join(tmp, "config.json"), config)
    return out
