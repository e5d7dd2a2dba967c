"""mlx-sleep: sleep-like fast-weight consolidation for hybrid language models on MLX."""

from . import _blas

_blas.load()  # must run before mlx.core is imported anywhere (see _blas.py)

from .config import ModelConfig, SleepConfig  # noqa: E402
from .models.hybrid import HybridLM  # noqa: E402
from .sleep import SleepEngine, sleep_forward, sleep_loss, sleep_value_and_grad  # noqa: E402
from .loading import load, load_model  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ModelConfig",
    "SleepConfig",
    "HybridLM",
    "SleepEngine",
    "sleep_forward",
    "sleep_loss",
    "sleep_value_and_grad",
    "load",
    "load_model",
]
