"""Fine-tuning converted models to sleep: `mlx-sleep finetune`.

A converted model with N > 1 has never slept; its N-pass consolidation helps only after it is
trained for it. This trains any supported model (Jet-Nemotron, Ouro (+ Jet layers), the mlx-lm
hybrids) with backprop through every window and pass (`sleep.sleep_value_and_grad`, memory
bounded to one chunk), LoRA / DoRA adapters through mlx-lm's tuner or all weights (`full`).

    config.py     FinetuneConfig (the flags)
    data.py       JSONL records: read, checked, tokenized, batched
    adapters.py   what trains (layer kinds, LoRA / DoRA), loading and fusing adapters
    run.py        Finetune: the run on the one training loop (loop.py)
    estimate.py   --estimate: peak memory and time per step
"""

from .adapters import (
    adapter_config,
    fuse_model,
    layer_parts,
    load_adapter,
    part_kind,
    prepare_model,
)
from .config import FINE_TUNE_TYPES, LAYER_KINDS, FinetuneConfig
from .data import DataError, batch_indices, load_examples, make_batch, read_records, tokenize_record
from .estimate import choose_memory_bound, estimate_step, format_choice, format_estimate
from .run import Finetune, summed_loss_and_grads, validation_loss

__all__ = [
    "DataError",
    "FINE_TUNE_TYPES",
    "Finetune",
    "FinetuneConfig",
    "LAYER_KINDS",
    "adapter_config",
    "batch_indices",
    "choose_memory_bound",
    "estimate_step",
    "format_choice",
    "format_estimate",
    "fuse_model",
    "layer_parts",
    "load_adapter",
    "load_examples",
    "make_batch",
    "part_kind",
    "prepare_model",
    "read_records",
    "summed_loss_and_grads",
    "tokenize_record",
    "validation_loss",
]
