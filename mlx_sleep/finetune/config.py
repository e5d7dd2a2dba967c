"""The settings of a fine-tuning run (`mlx-sleep finetune`'s flags)."""

from dataclasses import InitVar, dataclass, fields
from typing import List, Optional

from ..config import ConfigError, check_depth_losses
from ..train import MEMORY_BOUNDS, TrainConfig, memory_bound_of

LAYER_KINDS = ("jet", "gdn", "attn", "mlp")
FINE_TUNE_TYPES = ("lora", "dora", "full")


@dataclass
class FinetuneConfig:
    steps: int = 1000
    batch_size: int = 4  # sequences per micro-batch, over all processes
    grad_accum: int = 1  # micro-batches per optimizer step
    fine_tune_type: str = "lora"  # lora | dora | full
    lr: float = 1e-4  # LoRA/DoRA: AdamW on the adapters; full: Muon on the matrix weights
    adam_lr: float = 1e-5  # full: AdamW on the other weights (embeddings, norms, gates)
    weight_decay: float = 0.0
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    rank: int = 8
    scale: float = 20.0  # mlx-lm's LoRA scale (its default)
    dropout: float = 0.0
    lora_layers: Optional[int] = None  # LoRA on the last K decoder layers (None: all)
    train_only: Optional[str] = None  # e.g. "jet" or "gdn,attn": freeze every other layer kind
    hard_warmup: int = 0  # steps trained with hard eviction before the configured eviction
    memory_bound: str = "chunk"  # train.MEMORY_BOUNDS: recompute per chunk or block; none
    depth_losses: Optional[tuple] = None  # as TrainConfig's: the loss at several depths
    depth_losses_from: int = 0
    valid_every: int = 100
    valid_batches: int = 0  # 0: the whole validation file
    checkpoint_every: int = 100
    log_every: int = 10
    memory_bounded: InitVar[Optional[bool]] = None  # the older setting: True "chunk", False "none"

    def __post_init__(self, memory_bounded: Optional[bool]):
        if memory_bounded is not None:
            self.memory_bound = memory_bound_of(memory_bounded)
        if self.memory_bound not in MEMORY_BOUNDS:
            raise ConfigError(
                f"memory_bound must be one of {', '.join(MEMORY_BOUNDS)} (got {self.memory_bound!r})"
            )
        for name in ("steps", "batch_size", "grad_accum", "rank", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ConfigError(f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}")
        if not (self.lr > 0 and self.adam_lr > 0 and self.grad_clip > 0):
            raise ConfigError("--lr, --adam-lr and --grad-clip must be > 0")
        if self.warmup < 0 or self.hard_warmup < 0 or self.valid_every < 0:
            raise ConfigError("--warmup, --hard-warmup and --valid-every must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigError(f"--lora-layers must be >= 1 (got {self.lora_layers})")
        self.kinds()  # validates train_only
        self.depth_losses = check_depth_losses(self.depth_losses, "--depth-losses")
        if self.depth_losses_from < 0:
            raise ConfigError(f"--depth-losses-from must be >= 0 (got {self.depth_losses_from})")

    def kinds(self) -> Optional[List[str]]:
        if not self.train_only:
            return None
        kinds = [k.strip() for k in self.train_only.split(",") if k.strip()]
        bad = [k for k in kinds if k not in LAYER_KINDS]
        if bad or not kinds:
            raise ConfigError(
                f"--train-only takes layer kinds from {', '.join(LAYER_KINDS)} "
                f"(got {self.train_only!r})"
            )
        return kinds

    def optimizer_config(self) -> TrainConfig:
        """train.make_optimizer's settings: Muon (lr) for matrix weights, AdamW (adam_lr) for the
        rest. Adapters are never Muon's (LoRALinear is not an nn.Linear): they get AdamW at lr."""
        adam_lr = self.adam_lr if self.fine_tune_type == "full" else self.lr
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            adam_lr=adam_lr,
            weight_decay=self.weight_decay,
            warmup=self.warmup,
            min_lr_ratio=self.min_lr_ratio,
            grad_clip=self.grad_clip,
            seed=self.seed,
        )

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)} | {"memory_bounded"}
        return cls(**{k: v for k, v in d.items() if k in known})
