"""Loading models, mirroring mlx-lm:

    model, tokenizer = mlx_sleep.load("jet-2b-mlx")      # a converted directory (or a Hub id)
    model = mlx_sleep.load_model("jet-2b-mlx")           # no tokenizer files needed
    logits = model(mx.array([ids]))                       # [B, T, V], a plain forward
    engine = SleepEngine(model, model.sleep_config)       # sleep with the stored settings

Only a directory written by `mlx-sleep convert` (or a fine-tune's fused model) is loaded. A Hugging
Face checkpoint is refused in one line saying to convert it first (`mlx_sleep.convert.build`
converts one in memory, weights only). Hub ids go through huggingface_hub.

A model directory is untrusted input, and nothing in it is ever executed: config.json and the
tokenizer files are read as JSON with limits (io.read_json), an `auto_map` (Python code for
transformers to import) in config.json or tokenizer_config.json is refused, transformers and
mlx-lm are called with trust_remote_code=False (so they never ask "Do you wish to run the custom
code?" on stdin), and anything but a regular file where one is read (a FIFO, a device) is refused
before it is opened. Each problem is one line naming the file and the field.
"""

import importlib.util
import os
import stat
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .config import ConfigError, SleepConfig
from .io import check_regular_file, read_json, read_json_object
from .models import model_from_config
from .weights import apply_quantization, check_quantization, read_weights, resolve_source

# Any one of these lets the tokenizer loader open a directory.
TOKENIZER_ENTRY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# The tokenizer and generation files a model directory may hold: convert copies them next to
# the weights; each must be a regular file, the JSON ones valid JSON within io's limits.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
# transformers also reads every *.jinja in this folder as a chat template.
CHAT_TEMPLATE_DIR = "additional_chat_templates"
# tokenizer_config.json settings that make mlx-lm import one of its own modules by name.
MLX_LM_MODULES = {
    "chat_template_type": "mlx_lm.chat_templates",
    "tool_parser_type": "mlx_lm.tool_parsers",
}
CONVERT_HINT = "convert it first: mlx-sleep convert --hf-path {} --out DIR"


def refuse_code(config: dict, where: str):
    """An `auto_map` names Python files for transformers to import and run (its remote-code
    mechanism); a model directory may not carry one."""
    if "auto_map" in config:
        names = config["auto_map"]
        names = list(names.values()) if isinstance(names, dict) else names
        shown = str(names)[:80]
        raise ConfigError(
            f"{where}: auto_map names Python code to run ({shown}); mlx-sleep never "
            "runs code from a model directory (remove auto_map to use the standard "
            "classes)"
        )


def check_special_files(path: str):
    """Refuse FIFOs, devices and sockets in a model directory (and its chat-template folder):
    a library reading one would block or read without end. Links are followed; dangling ones are
    left to whoever reads them."""
    for directory in (path, os.path.join(path, CHAT_TEMPLATE_DIR)):
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            entry = os.path.join(directory, name)
            try:
                st = os.stat(entry)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                check_regular_file(entry, "; a model directory may hold only regular files")


def read_model_config(path: str, shown: Optional[str] = None) -> dict:
    """config.json of the converted model directory `path` (`shown`: how the user named it),
    after refusing a Hugging Face checkpoint (convert first), an auto_map, and special files."""
    shown = shown or path
    config_path = os.path.join(path, "config.json")
    if not os.path.lexists(config_path):
        raise FileNotFoundError(
            f"{path} has no config.json: not a model directory mlx-sleep "
            f"converted ({CONVERT_HINT.format(shown)})"
        )
    config = read_json_object(config_path)
    if "model" not in config or "sleep" not in config:
        if "model_type" in config or "architectures" in config:
            raise ConfigError(
                f"{shown} is a Hugging Face checkpoint, not a model directory "
                f"mlx-sleep converted: {CONVERT_HINT.format(shown)}"
            )
        raise ConfigError(
            f"{config_path} has no 'model' and 'sleep' settings: not a model "
            f"directory mlx-sleep converted ({CONVERT_HINT.format(shown)})"
        )
    refuse_code(config, config_path)
    check_special_files(path)
    return config


def check_tokenizer_files(path: str) -> Optional[dict]:
    """The tokenizer files in `path` are safe to hand to transformers / mlx-lm: regular files,
    JSON within io's limits, no auto_map, and mlx-lm module names that exist. Returns
    tokenizer_config.json's settings (None without one)."""
    for name in TOKENIZER_FILES:
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            continue
        check_regular_file(file, " (a tokenizer file)")
        if name.endswith(".json"):
            read_json(file)
    template_dir = os.path.join(path, CHAT_TEMPLATE_DIR)
    if os.path.isdir(template_dir):
        for name in sorted(os.listdir(template_dir)):
            check_regular_file(os.path.join(template_dir, name), " (a chat template)")
    config_path = os.path.join(path, "tokenizer_config.json")
    if not os.path.lexists(config_path):
        return None
    config = read_json_object(config_path)
    refuse_code(config, config_path)
    for key, package in MLX_LM_MODULES.items():
        value = config.get(key)
        if value is None:
            continue
        if not (
            isinstance(value, str)
            and value.isidentifier()
            and importlib.util.find_spec(f"{package}.{value}") is not None
        ):
            raise ConfigError(
                f"{config_path}: {key} {str(value)[:40]!r} is not one of mlx-lm's ({package})"
            )
    return config


def load_model(path_or_id: str, lazy: bool = False, force: bool = False):
    """The model of a converted directory, with its sleep settings as `model.sleep_config` (a
    SleepConfig). A config that cannot fit the machine's memory is refused unless `force`."""
    path = resolve_source(path_or_id, lambda d: read_model_config(d, path_or_id))
    config = read_model_config(path, path_or_id)
    where = os.path.join(path, "config.json")
    check_quantization(config, where)
    try:
        model = model_from_config(config.get("model_type", "hybrid"), config["model"], force=force)
        sleep = SleepConfig.from_dict(config["sleep"])
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    weights = read_weights(path)
    apply_quantization(model, config, weights, where)
    try:
        model.load_weights(list(weights.items()))
    except ValueError as e:  # names missing, unexpected or mis-shaped tensors
        raise ConfigError(
            f"{path}: the weights do not match config.json ({' '.join(str(e).split())[:300]})"
        ) from None
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
        raise ConfigError(
            f"the tokenizer has {n} tokens but the model's vocabulary only "
            f"{model.vocab_size}: they do not belong together"
        )
    for i in eos_ids:
        if not 0 <= i < model.vocab_size:
            raise ConfigError(
                f"eos_token_id {i} is outside the model's vocabulary of {model.vocab_size}"
            )


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


def tokenizer_options(tokenizer_config: Optional[dict]) -> dict:
    """What goes to AutoTokenizer.from_pretrained: the caller's settings with
    trust_remote_code=False (explicit: left unset, transformers asks on stdin)."""
    options = dict(tokenizer_config or {})
    if options.get("trust_remote_code"):
        raise ConfigError("trust_remote_code: mlx-sleep never runs code from a model directory")
    options["trust_remote_code"] = False
    return options


def load(path_or_id: str, tokenizer_config: Optional[dict] = None, lazy: bool = False):
    """(model, tokenizer): the tokenizer is mlx-lm's TokenizerWrapper (streaming detokenizer,
    chat template) over the directory's tokenizer files."""
    _, model, tokenizer = load_with_path(path_or_id, tokenizer_config, lazy)
    return model, tokenizer


def has_tokenizer(path: str) -> bool:
    return any(os.path.lexists(os.path.join(path, f)) for f in TOKENIZER_ENTRY_FILES)


def missing_tokenizer(path: str) -> str:
    """What to do about a model directory without tokenizer files (docs/models.md)."""
    return (
        f"{path} has no tokenizer files ({', '.join(TOKENIZER_ENTRY_FILES)}): copy them "
        "from the original checkpoint into it (docs/models.md, 'Adding a tokenizer'); "
        "in Python, mlx_sleep.load_model() loads the weights alone"
    )


def load_with_path(path_or_id: str, tokenizer_config: Optional[dict] = None, lazy: bool = False):
    """(local directory, model, tokenizer): `load` for callers that record where it came from."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    options = tokenizer_options(tokenizer_config)
    path = resolve_source(path_or_id, lambda d: read_model_config(d, path_or_id))
    config = read_model_config(path, path_or_id)
    if not has_tokenizer(path):
        raise FileNotFoundError(missing_tokenizer(path))
    check_tokenizer_files(path)
    eos = config.get("eos_token_id")
    eos = [eos] if type(eos) is int else eos
    if eos is not None and not (isinstance(eos, list) and all(type(i) is int for i in eos)):
        raise ConfigError(
            f"{path}/config.json: eos_token_id must be an integer or a list of "
            f"integers (got {str(eos)[:40]})"
        )
    model = load_model(path, lazy=lazy)
    try:
        tokenizer = _quietly(load_tokenizer, Path(path), options, eos_token_ids=eos)
    except Exception as e:  # transformers' and tokenizers' many errors: one line, the directory
        message = " ".join(str(e).split())[:200]
        raise ConfigError(
            f"{path}: the tokenizer files could not be loaded "
            f"({type(e).__name__}{': ' + message if message else ''})"
        ) from None
    check_tokenizer(model, tokenizer, eos or ())
    return path, model, tokenizer
