"""What trains in a fine-tune: layer kinds, frozen parts, LoRA / DoRA adapters (mlx-lm's
tuner), and fusing them back into a model directory."""

import hashlib
import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ConfigError, SleepConfig, check_core, machine_memory
from ..io import read_json, read_json_object
from .config import FinetuneConfig


def part_kind(module) -> Optional[str]:
    """The layer kind of a decoder layer's child (its mixer or MLP), from the class name:
    JetBlock -> jet, *DeltaNet -> gdn, *Attention -> attn, SwiGLU / *MLP / *MoE* -> mlp."""
    name = type(module).__name__.lower()
    for kind, words in (
        ("jet", ("jet",)),
        ("gdn", ("deltanet",)),
        ("attn", ("attention",)),
        ("mlp", ("mlp", "swiglu", "moe")),
    ):
        if any(w in name for w in words):
            return kind
    return None


def layer_parts(model):
    """(kind, module) for every mixer and MLP inside model.layers."""
    parts = []
    for layer in model.layers:
        for child in layer.children().values():
            if isinstance(child, nn.Module) and part_kind(child):
                parts.append((part_kind(child), child))
    return parts


def linear_dims(module):
    """(out, in) of a Linear or QuantizedLinear (whose packed weight hides `in`), else None."""
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[0], module.scales.shape[1] * module.group_size
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    return None


def check_adapters_fit(model, cfg: FinetuneConfig):
    """--lora-layers within the model's layers, and the adapters with their optimizer state
    within the machine's memory, checked before any is allocated (a --rank of 10^9 would ask MLX
    for terabytes and crash it)."""
    layers = len(model.layers)
    if cfg.lora_layers is not None and cfg.lora_layers > layers:
        raise ConfigError(
            f"--lora-layers {cfg.lora_layers} is more than this model's {layers} decoder layers"
        )
    if cfg.fine_tune_type == "full":
        return
    n = layers if cfg.lora_layers is None else cfg.lora_layers
    sizes = [
        sum(dims)
        for layer in model.layers[layers - n :]
        for _, m in layer.named_modules()
        if (dims := linear_dims(m)) is not None
    ]
    # float32 A and B, their gradients and AdamW's two moments: 4 copies
    need, have = cfg.rank * sum(sizes) * 4 * 4, machine_memory()
    if have and need > have:
        raise ConfigError(
            f"--rank {cfg.rank}: the adapters and their optimizer state need "
            f"{need / 1e9:,.1f} GB, more than this machine's {have / 1e9:.1f} GB; "
            "use a smaller --rank (8-64 is usual) or fewer --lora-layers"
        )


def prepare_model(model, cfg: FinetuneConfig):
    """Freeze what does not train and add the adapters (mlx-lm's linear_to_lora_layers)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    check_adapters_fit(model, cfg)
    kinds = cfg.kinds()
    parts = layer_parts(model)
    if kinds:
        missing = [k for k in kinds if not any(kind == k for kind, _ in parts)]
        if missing:
            have = sorted({kind for kind, _ in parts})
            raise ConfigError(
                f"--train-only {','.join(missing)}: this model has no such layers "
                f"(it has {', '.join(have)})"
            )
    if cfg.fine_tune_type == "full" and any(
        isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()
    ):
        raise ConfigError(
            "this model is quantized: its weights cannot be trained directly; "
            "train LoRA/DoRA adapters (drop --full) or convert without -q"
        )
    model.freeze()
    if cfg.fine_tune_type == "full":
        if kinds:
            for kind, part in parts:
                if kind in kinds:
                    part.unfreeze()
        else:
            model.unfreeze()
    else:
        mx.random.seed(cfg.seed)  # the same adapters on every process
        n = len(model.layers) if cfg.lora_layers is None else cfg.lora_layers
        linear_to_lora_layers(
            model,
            n,
            {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout},
            use_dora=cfg.fine_tune_type == "dora",
        )
        if kinds:  # adapters outside the named kinds stay at their zero update
            for kind, part in layer_parts(model):
                if kind not in kinds:
                    part.freeze()
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if n_train == 0:
        raise ConfigError(
            "nothing to train: the chosen --train-only / --lora-layers select no weights"
        )
    return model


def adapter_config(cfg: FinetuneConfig, model, sleep: SleepConfig) -> dict:
    """mlx-lm's adapter_config.json fields (its load_adapters reads them), and the sleep
    settings and looped core the adapters were trained with (mlx-lm ignores those two):
    `load_adapter` puts them on the model, so evaluation sleeps as training did."""
    n = len(model.layers) if cfg.lora_layers is None else cfg.lora_layers
    return {
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": n,
        "lora_parameters": {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout},
        "sleep": sleep.to_dict(),
        "core": list(model.core),
    }


def load_trainable(model, path: str) -> dict:
    """Set `model`'s trainable weights from `path`/adapters.safetensors (another run's
    checkpoint/: mlx-lm's --resume-adapter-file); every tensor must be there with its shape.
    Returns what the run's settings record: the path and the file's sha256."""
    from ..weights import read_safetensors

    file = os.path.join(path, "adapters.safetensors")
    if not os.path.isfile(file):
        raise ValueError(
            f"--resume-adapters {path}: no adapters.safetensors there (a run's checkpoint/ has one)"
        )
    weights = read_safetensors(file)
    want = dict(tree_flatten(model.trainable_parameters()))
    wrong = sorted(set(want) ^ set(weights)) + [
        k for k in sorted(set(want) & set(weights)) if weights[k].shape != want[k].shape
    ]
    if wrong:
        raise ValueError(
            f"--resume-adapters {path}: its weights do not fit this run ({len(wrong)} differ, "
            f"e.g. {wrong[0]}); use the --rank, --lora-layers, --dora / --full and --train-only "
            "it was trained with"
        )
    model.load_weights([(k, v.astype(want[k].dtype)) for k, v in weights.items()], strict=False)
    with open(file, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()  # adapters: megabytes, not gigabytes
    return {"path": os.path.abspath(path), "sha256": digest}


def load_adapter(model, path: str):
    """Apply a fine-tune's adapter directory (mlx-lm's layout: adapter_config.json and
    adapters.safetensors) to `model`, in evaluation mode (dropout off)."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"{path} has no adapter_config.json: not an adapter directory")
    from mlx_lm.tuner.utils import load_adapters

    from ..weights import check_safetensors

    config = read_json_object(os.path.join(path, "adapter_config.json"))  # regular file, size
    check_safetensors(os.path.join(path, "adapters.safetensors"))
    try:  # adapters from before the settings were recorded (or mlx-lm's) keep the model's
        sleep = SleepConfig.from_dict(config["sleep"]) if "sleep" in config else None
        core = tuple(config["core"]) if "core" in config else None
        if core is not None:
            check_core(core, model.config.num_sleep_blocks)
    except (ConfigError, TypeError, ValueError) as e:
        raise ValueError(f"{path}/adapter_config.json: {e}") from None

    try:
        model = load_adapters(model, path)
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: the adapter does not fit this model ({type(e).__name__}: {e})")
    model.eval()  # the LoRA layers it added start in training mode
    if sleep is not None:
        model.sleep_config = sleep
    if core is not None:
        model.config.core = core
    return model


def fuse_model(model, model_dir: str, out: str, sleep: SleepConfig, provenance: dict) -> str:
    from ..convert.common import save_model_dir

    fused = [
        (name, m.fuse())
        for name, m in model.named_modules()
        if hasattr(m, "fuse") and hasattr(m, "lora_a")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    config = read_json(os.path.join(model_dir, "config.json"))
    config["model"] = model.config.to_dict()
    config["sleep"] = sleep.to_dict()
    config["finetune"] = provenance
    save_model_dir(out, config, dict(tree_flatten(model.parameters())), model_dir)
    return out
