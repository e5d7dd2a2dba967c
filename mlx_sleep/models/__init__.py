"""The architectures, by the `model_type` a converted directory or a training run records."""

from mlx.utils import tree_flatten

from . import mlx_lm_adapters, ouro
from ..config import ConfigError, ModelConfig, check_memory
from .base import SleepModel, check_token_ids
from .hybrid import Block, HybridLM

MODEL_TYPES = {
    "hybrid": (ModelConfig, HybridLM),
    "jet_nemotron": (ModelConfig, HybridLM),
    "ouro": (ouro.OuroConfig, ouro.Model),
    **{t: (mlx_lm_adapters.AdapterConfig, mlx_lm_adapters.Model) for t in mlx_lm_adapters.ARCHS},
}


def model_from_config(model_type: str, config: dict, force: bool = False) -> SleepModel:
    """A freshly initialised model of `model_type` with the settings `config` (a dict). Its
    size is known before anything is allocated (MLX is lazy): one that cannot fit the machine's
    memory is refused unless `force`."""
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    config_cls, model_cls = MODEL_TYPES[model_type]
    try:
        model = model_cls(config_cls.from_dict(config))
    except OverflowError as e:  # a size product past MLX's 32-bit shapes
        raise ConfigError(f"a {model_type} model with these sizes cannot be built: {e}")
    check_memory(
        sum(v.nbytes for _, v in tree_flatten(model.parameters())),
        f"a {model_type} model with these settings",
        force,
    )
    return model


__all__ = ["Block", "HybridLM", "MODEL_TYPES", "SleepModel", "check_token_ids", "model_from_config"]
