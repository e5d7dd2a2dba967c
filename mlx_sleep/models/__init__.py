"""The architectures, by the `model_type` a converted directory or a training run records."""

from . import mlx_lm_adapters, ouro
from ..config import ConfigError, ModelConfig
from .base import SleepModel, check_token_ids
from .hybrid import Block, HybridLM

MODEL_TYPES = {
    "hybrid": (ModelConfig, HybridLM),
    "jet_nemotron": (ModelConfig, HybridLM),
    "ouro": (ouro.OuroConfig, ouro.Model),
    **{t: (mlx_lm_adapters.AdapterConfig, mlx_lm_adapters.Model) for t in mlx_lm_adapters.ARCHS},
}


def model_from_config(model_type: str, config: dict) -> SleepModel:
    """A freshly initialised model of `model_type` with the settings `config` (a dict)."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                          f"{', '.join(sorted(MODEL_TYPES))}")
    config_cls, model_cls = MODEL_TYPES[model_type]
    return model_cls(config_cls.from_dict(config))


__all__ = ["Block", "HybridLM", "MODEL_TYPES", "SleepModel", "check_token_ids",
           "model_from_config"]
