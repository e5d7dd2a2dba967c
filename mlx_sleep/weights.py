"""Reading checkpoints: finding one (a local directory or a Hugging Face Hub id), reading its
tensors safely from any shard layout, and re-applying a saved quantization before loading.
Used by both `loading` (converted directories) and `convert` (Hugging Face checkpoints).

Nothing from a checkpoint repository is ever executed: weights are read as safetensors (headers
checked against the file size first) or PyTorch .bin through torch.load(weights_only=True),
which refuses pickled code; a Hub download never fetches *.py files.
"""

import glob
import os
import struct
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import ConfigError
from .io import check_regular_file, parse_json, read_json


class CheckpointError(ValueError):
    """A checkpoint cannot be read or converted; the message says what and where."""


# What a Hub download fetches: never *.py (no remote code), never the weights of other formats
# when safetensors exist (decided after listing, see resolve_source).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


def shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def listing(items, n=3) -> str:
    items = list(items)
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# -- finding a checkpoint ---------------------------------------------------------------------


def resolve_source(path_or_id: str, check_config: Optional[Callable[[str], object]] = None) -> str:
    """A local directory, or a Hugging Face Hub id downloaded with huggingface_hub (users'
    machines; tests only use local directories). `check_config(directory)`, for a Hub id, runs
    on the directory holding its config.json alone, before the rest (the weights) is fetched:
    it raises to stop there (e.g. a checkpoint that needs converting first)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise CheckpointError(f"{path_or_id} is a file; pass the checkpoint directory")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise CheckpointError(f"{path_or_id}: no such directory (and not a Hub id 'owner/name')")

    def download(fetch):
        try:
            return fetch()
        except Exception as e:  # network, auth, missing repo: one line either way
            raise CheckpointError(
                f"could not download {path_or_id} from the Hugging Face Hub: "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )

    import huggingface_hub as hub

    if check_config is not None:
        check_config(
            os.path.dirname(download(lambda: hub.hf_hub_download(path_or_id, "config.json")))
        )
    return download(lambda: hub.snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS))


# -- reading tensors --------------------------------------------------------------------------

_ST_DTYPES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "BOOL": 1,
}  # U32: packed quantized weights


def check_safetensors(path: str) -> dict:
    """Validate a safetensors file's header against its size; returns {name: (dtype, shape)}.
    Catches truncated and corrupt files with a clear message before any tensor is read (and
    anything that is not a regular file, e.g. a FIFO that would block, before it is opened)."""
    name = os.path.basename(path)
    try:
        check_regular_file(path)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name} is truncated ({size} bytes, not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(
                f"{name} is corrupt or truncated: header of {n} bytes in a {size}-byte file"
            )
        try:
            header = parse_json(f.read(n), f"{name}: its header")
        except ConfigError as e:
            raise CheckpointError(f"{name} is corrupt: {str(e)[len(name) + 2 :]}")
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for tname, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and len(shape) <= 8
                and all(type(x) is int and 0 <= x < 2**31 for x in [*shape, a, b])
                and a <= b
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{name} is corrupt: bad header entry for {tname[:60]}")
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: tensor {tname} has unsupported dtype {dtype}")
        count = 1
        for s in shape:
            count *= s
        if b - a != count * _ST_DTYPES[dtype] or a < 0:
            raise CheckpointError(
                f"{name} is corrupt: {tname} {shape_str(shape)} {dtype} has {b - a} bytes of data"
            )
        end = max(end, b)
        out[tname] = (dtype, shape)
    if 8 + n + end > size:
        raise CheckpointError(f"{name} is truncated: {size} bytes, its header needs {8 + n + end}")
    return out


def read_safetensors(path: str) -> Dict[str, mx.array]:
    """Every tensor of one safetensors file, after check_safetensors."""
    check_safetensors(path)
    try:
        return mx.load(path)
    except Exception as e:
        raise CheckpointError(f"{os.path.basename(path)} could not be read: {e}")


def _load_bin(path: str) -> Dict[str, mx.array]:
    try:
        check_regular_file(path)
    except (ValueError, FileNotFoundError) as e:
        raise CheckpointError(str(e))
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{os.path.basename(path)} is a PyTorch file: install torch to "
            "read it, or convert the checkpoint to safetensors"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    except Exception as e:
        raise CheckpointError(
            f"{os.path.basename(path)} could not be read safely "
            f"(weights_only=True): {str(e).splitlines()[0]}"
        )
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
    index = os.path.join(
        src, f"model.{ext}.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    )
    if os.path.exists(index):
        try:
            weight_map = read_json(index, max_bytes=64 << 20)["weight_map"]
        except (ValueError, KeyError, TypeError, OSError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and os.path.basename(v) == v and v.endswith(f".{ext}")
            for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{os.path.basename(index)} is not a valid shard index "
                '(a "weight_map" of tensor name -> shard file name)'
            )
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(src, f))]
        if missing:
            raise CheckpointError(
                f"shard(s) listed in {os.path.basename(index)} are missing: {listing(missing)}"
            )
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
    loader = read_safetensors
    if not files:
        files, weight_map = _shard_files(src, "bin")
        loader = _load_bin
    if not files:
        raise CheckpointError(f"{src} holds no weights (*.safetensors or pytorch_model*.bin)")
    weights = {}
    for path in files:
        for k, v in loader(path).items():
            if k in weights:
                raise CheckpointError(f"tensor {k} appears in more than one shard")
            weights[k] = v
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(weights))
        if absent:
            raise CheckpointError(
                f"tensor(s) listed in the shard index are not in the shards: {listing(absent)}"
            )
    return weights


# What mlx's quantization accepts, by mode (mlx-lm's modes): {mode: (group sizes, bits)}.
QUANT_MODES = {
    "affine": ((32, 64, 128), (2, 3, 4, 5, 6, 8)),
    "mxfp4": ((32,), (4,)),
    "mxfp8": ((32,), (8,)),
    "nvfp4": ((16,), (4,)),
}
_QUANT_KEYS = ("group_size", "bits", "mode")


def _quant_params(q, where: str) -> dict:
    """{group_size, bits, mode} of one quantization entry, checked (`where` names it)."""
    if not isinstance(q, dict):
        raise ConfigError(
            f"{where} must be an object with group_size and bits (got {type(q).__name__})"
        )
    mode = q.get("mode", "affine")
    if not isinstance(mode, str) or mode not in QUANT_MODES:
        raise ConfigError(
            f"{where}.mode must be one of {', '.join(QUANT_MODES)} (got {mode!r:.40})"
        )
    sizes, bits = QUANT_MODES[mode]
    for key, allowed in (("group_size", sizes), ("bits", bits)):
        if key not in q:
            raise ConfigError(f"{where} has no {key}")
        value = q[key]
        if type(value) is not int or value not in allowed:
            raise ConfigError(
                f"{where}.{key} must be one of {', '.join(map(str, allowed))} for "
                f"{mode} quantization (got {value!r:.40})"
            )
    return {"group_size": q["group_size"], "bits": q["bits"], "mode": mode}


def check_quantization(config: dict, where: str = "config.json"):
    """config["quantization"] as mlx-lm writes it (group_size, bits, mode and per-layer
    overrides: path -> parameters or false), or None; anything else raises ConfigError naming
    the field."""
    q = config.get("quantization")
    if q is None:
        return None
    where = f"{where}: quantization"
    params = _quant_params(q, where)
    for path, entry in q.items():
        if path in _QUANT_KEYS:
            continue
        if not isinstance(entry, bool):
            _quant_params(entry, f"{where}[{path!r:.60}]")
    return params


def apply_quantization(model: nn.Module, config: dict, weights: dict, where: str = "config.json"):
    """Before loading a quantized model: quantize exactly the layers that have scales on disk.
    A quantization the weights do not carry (no scales at all) is refused, as are malformed
    settings; shapes that disagree are caught by the strict load that follows."""
    params = check_quantization(config, where)
    if params is None:
        return
    q = config["quantization"]
    if not any(k.endswith(".scales") for k in weights):
        raise ConfigError(
            f"{where}: quantization says {params['bits']}-bit {params['mode']} but "
            "the weights hold no quantization scales (they are not quantized)"
        )

    def predicate(path, module):
        if not (hasattr(module, "to_quantized") and f"{path}.scales" in weights):
            return False
        entry = None if path in _QUANT_KEYS else q.get(path)
        if isinstance(entry, dict):
            return entry  # its own parameters (checked above)
        return entry is None or entry

    try:
        nn.quantize(
            model,
            group_size=params["group_size"],
            bits=params["bits"],
            mode=params["mode"],
            class_predicate=predicate,
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"{where}: quantization does not fit the model "
            f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        )
