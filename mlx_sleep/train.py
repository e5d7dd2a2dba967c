"""Training with backprop through every sleep pass (Algorithm 1), as in the paper.

Any supported model trains here: a from-scratch HybridLM, or a converted Jet-Nemotron, Ouro or
mlx-lm hybrid. Muon for the weights the model declares as matrices (`model.matrix_weights()`:
the Linear weights of its decoder layers) and AdamW for everything else (embeddings, head, norms,
gates, conv kernels), linear warmup then cosine decay, gradient clipping, an mx.compile'd step,
checkpoints with exact resume, periodic evaluation, a progress bar and a JSONL log.

A run directory (loop.py) holds config.json (model, sleep, task and training settings: what
`eval` needs), checkpoint/ (model.safetensors, optimizer.safetensors, trainer.json) and
metrics.jsonl.
"""

import json
import os
from dataclasses import InitVar, asdict, dataclass, fields, replace
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from .config import (
    MAX_LOOPS,
    ConfigError,
    ModelConfig,
    SleepConfig,
    check_depth_losses,
    check_memory,
    check_types,
)
from .eval import evaluate
from .io import check_regular_file, read_json_object, recover_dir
from .loop import TrainingRun
from .models import HybridLM, SleepModel, model_from_config
from .sleep import (
    depth_draw,
    depth_loss,
    depth_value_and_grad,
    loss_depths,
    plan_chunks,
    trained_at_every_depth,
)
from .tasks import task_from_dict
from .weights import read_safetensors


# What a step's backward holds in memory (--memory-bound; sleep.sleep_value_and_grad): the
# activations of one chunk (all its passes) or of one block application, the rest recomputed;
# or, with none, the graph of the whole sequence.
MEMORY_BOUNDS = ("chunk", "block", "none")


def memory_bound_of(bounded: bool) -> str:
    """The memory bound of the older boolean settings (`activation_checkpoint` of train,
    `memory_bounded` of finetune), for runs saved with them and scripts that pass them."""
    return "chunk" if bounded else "none"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3  # Muon, matrix weights (the paper's synthetic-task setting)
    adam_lr: float = 5e-5  # AdamW, everything else (the paper's setting)
    weight_decay: float = 0.0
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 256  # per difficulty
    checkpoint_every: int = 200
    log_every: int = 10
    compile: bool = False  # see default_compile(); ignored with a memory bound
    # MEMORY_BOUNDS. chunk: recompute each chunk on backward (sleep.sleep_value_and_grad): peak
    # memory ~ one chunk's activations + the chunk-boundary states; block: one block
    # application's + the block inputs of a chunk. Both evaluate as they go, so the step is not
    # mx.compile'd then.
    memory_bound: str = "none"
    random_chunks: bool = False  # sample chunk lengths in [1, L] (see sleep.chunk_bounds)
    # (lo, hi): draw the sleep passes N per batch uniformly in [lo, hi] (a model whose depth is a
    # dial at test time). From its own seeded generator, so the data stream is the same as a
    # fixed-N run's. Evaluation during training uses the run's SleepConfig.loops.
    loops_sample: Optional[Tuple[int, int]] = None
    # ((lo, hi, weight), ...): take the loss at each depth (every context window slept that many
    # passes, one drawn per step from lo..hi), weighted (sleep.loss_depths), from step
    # depth_losses_from on; before it, and by default, Algorithm 1 at N alone.
    depth_losses: Optional[tuple] = None
    depth_losses_from: int = 0
    activation_checkpoint: InitVar[Optional[bool]] = None  # the older setting: True is "chunk"

    def __post_init__(self, activation_checkpoint: Optional[bool]):
        if activation_checkpoint is not None:
            self.memory_bound = memory_bound_of(activation_checkpoint)
        check_types(self)
        if self.memory_bound not in MEMORY_BOUNDS:
            raise ConfigError(
                f"memory_bound must be one of {', '.join(MEMORY_BOUNDS)} (got {self.memory_bound!r})"
            )
        for name, lo, hi in LIMITS:
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(f"{name} must be in {lo}..{hi} (got {value})")
        for name in ("lr", "adam_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("lr", "adam_lr"):
            if getattr(self, name) > 10:
                raise ConfigError(f"{name} must be <= 10 (got {getattr(self, name)})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.loops_sample is not None:
            lo, hi = self.loops_sample
            if not 1 <= lo <= hi <= MAX_LOOPS:
                raise ConfigError(
                    f"loops_sample must be LO:HI with 1 <= LO <= HI <= {MAX_LOOPS} (got {lo}:{hi})"
                )
            self.loops_sample = (int(lo), int(hi))
        self.depth_losses = check_depth_losses(self.depth_losses)
        if self.depth_losses and self.loops_sample:
            raise ConfigError("depth_losses and loops_sample cannot be combined: choose one")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)} | {"activation_checkpoint"}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("loops_sample") is not None:
            d["loops_sample"] = tuple(d["loops_sample"])
        return cls(**d)


# (setting, lowest, highest) of TrainConfig's integers (and weight decay); bounds keep a typo
# from running for years or taking the machine's memory.
LIMITS = (
    ("steps", 1, 10**9),
    ("batch_size", 1, 1 << 20),
    ("warmup", 0, 10**9),
    ("seed", 0, 2**31 - 1),
    ("eval_every", 0, 10**9),
    ("eval_samples", 1, 1 << 24),
    ("checkpoint_every", 0, 10**9),
    ("log_every", 1, 10**9),
    ("weight_decay", 0, 1e3),
    ("depth_losses_from", 0, 10**9),
)


def default_compile() -> bool:
    """mx.compile pays on Metal. On the CPU backend the first compile of a sleep step runs the
    C++ compiler for minutes and is no faster per step (docs/linux-cpu.md), so it is off there."""
    return mx.metal.is_available()


def make_optimizer(cfg: TrainConfig, model: SleepModel):
    """Muon for the model's matrix weights, AdamW for the rest, on one warmup + cosine schedule."""

    def schedule(peak):
        warm = optim.linear_schedule(peak * 1e-2, peak, max(cfg.warmup, 1))
        decay = optim.cosine_decay(peak, max(cfg.steps - cfg.warmup, 1), peak * cfg.min_lr_ratio)
        return optim.join_schedules([warm, decay], [max(cfg.warmup, 1)])

    muon = optim.Muon(learning_rate=schedule(cfg.lr), weight_decay=cfg.weight_decay)
    adamw = optim.AdamW(learning_rate=schedule(cfg.adam_lr), weight_decay=cfg.weight_decay)
    matrices = model.matrix_weights()
    return optim.MultiOptimizer([muon, adamw], [lambda path, weight: path in matrices])


def build_model(model_cfg: ModelConfig, seed: int, evaluate: bool = True) -> HybridLM:
    """A HybridLM initialised from `seed` (lazily, until evaluated: its size is known first)."""
    mx.random.seed(seed)
    try:
        model = HybridLM(model_cfg)
    except OverflowError as e:  # a size product past MLX's 32-bit shapes
        raise ConfigError(f"a model with these sizes cannot be built: {e}")
    if evaluate:
        mx.eval(model.parameters())
    return model


def training_bytes(model: SleepModel, sleep: SleepConfig, seq_len: int, cfg: "TrainConfig") -> int:
    """A rough upper estimate of a training step's memory: weights, gradients and optimizer
    state (4 copies of the parameters) plus the activations kept for backward (a few
    vectors per block, pass and token; per chunk with a memory bound, and with the block bound
    one vector per block and pass (its input) plus one block's few) and logits."""
    params = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    width = model.embed(mx.zeros((1, 1), dtype=mx.int32)).shape[-1]  # lazy: shapes only
    tokens = cfg.batch_size * (
        min(sleep.window, seq_len) if cfg.memory_bound != "none" else seq_len
    )
    # one graph holds every depth's passes at once; a memory-bounded step one depth at a time
    depths = [hi for _, hi, w in cfg.depth_losses or [(0, sleep.loops, 1)] if w > 0]
    passes = max(depths) if cfg.memory_bound != "none" else sum(depths)
    applications = len(model.sleep_blocks()) * passes
    if cfg.memory_bound == "block":
        activations = 4 * tokens * width * applications + 16 * tokens * width
    else:
        activations = 16 * tokens * width * applications
    return 4 * params + activations + 12 * tokens * model.vocab_size


class Trainer(TrainingRun):
    """One training run in `out_dir` (the loop: loop.TrainingRun). Construct, then `run()`;
    resumes from `out_dir` when it already holds a checkpoint of the same settings.

    `model` is any supported model (e.g. from `mlx_sleep.load_model`), or a ModelConfig for a
    HybridLM trained from scratch (initialised from `train.seed`)."""

    OWNER, META_FILE, WEIGHTS_FILE = "run", "trainer.json", "model.safetensors"
    # compile and the memory bound: the same math either way (within float rounding)
    RESUMABLE_CHANGES = ("train.steps", "train.compile", "train.memory_bound")

    def __init__(
        self,
        out_dir: str,
        model,
        sleep: SleepConfig,
        task,
        train: TrainConfig,
        progress: bool = True,
        echo=print,
        force: bool = False,
    ):
        if train.depth_losses:  # recorded with the run: its model may keep a partial sleep
            sleep = replace(sleep, partial=trained_at_every_depth(sleep.loops, train.depth_losses))
        self.out_dir, self.sleep, self.task, self.cfg = out_dir, sleep, task, train
        self.progress, self.echo, self.eval_every = progress, echo, train.eval_every
        if sleep.window > task.seq_len:
            raise ConfigError(
                f"window L={sleep.window} is larger than the task's sequence "
                f"length T={task.seq_len}; use --window <= {task.seq_len}"
            )
        if isinstance(model, ModelConfig):
            model = build_model(model, train.seed, evaluate=False)
        if model.vocab_size < task.vocab_size:
            raise ConfigError(
                f"the model's vocab_size {model.vocab_size} < the task's {task.vocab_size}"
            )
        check_memory(
            training_bytes(model, sleep, task.seq_len, train),
            "training this model at this batch size",
            force,
        )
        mx.eval(model.parameters())
        # As JSON has them (tuples become lists), so a rerun compares equal to what was saved
        self.settings = json.loads(
            json.dumps(
                {
                    "model_type": model.model_type,
                    "model": model.config.to_dict(),
                    "sleep": sleep.to_dict(),
                    "task": task.to_dict(),
                    "train": asdict(train),
                }
            )
        )
        self.model = model
        self.optimizer = make_optimizer(train, model)
        self.rng = np.random.default_rng(train.seed)
        self.loops_rng = np.random.default_rng([train.seed, 1])  # N per batch (loops_sample)
        self._steps = {}  # compiled step per chunk plan
        self.open_run(force)

    def saved_settings(self, saved: dict) -> dict:
        saved.setdefault("model_type", "hybrid")  # runs from before model types were recorded
        if isinstance(saved.get("train"), dict):  # settings added since: their defaults
            train = dict(saved["train"])
            if "activation_checkpoint" in train:  # runs from before --memory-bound
                train["memory_bound"] = memory_bound_of(train.pop("activation_checkpoint"))
            saved["train"] = {**asdict(TrainConfig()), **train}
        return saved

    def checkpoint_meta(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "loops_rng": self.loops_rng.bit_generator.state,
            "settings": self.settings,
        }

    def restore_meta(self, meta: dict):
        self.rng.bit_generator.state = meta["rng"]
        if "loops_rng" in meta:  # runs with loops_sample
            self.loops_rng.bit_generator.state = meta["loops_rng"]

    # -- one step -----------------------------------------------------------------------------
    def _step_fn(self, plan, depths):
        key = (tuple(plan[0]), tuple(plan[1]), tuple((s.loops, w) for s, w in depths))
        if key in self._steps:
            return self._steps[key]
        model, optimizer, cfg = self.model, self.optimizer, self.cfg

        if cfg.memory_bound != "none":

            def value_and_grad(x, y, w):
                return depth_value_and_grad(
                    model, x, y, w, depths, plan=plan, granularity=cfg.memory_bound
                )
        else:
            grad_fn = nn.value_and_grad(
                model, lambda m, x, y, w: depth_loss(m, x, y, w, depths, plan=plan)
            )

            def value_and_grad(x, y, w):
                return grad_fn(model, x, y, w)

        def step(x, y, w):
            (loss, _), grads = value_and_grad(x, y, w)
            grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            return loss, norm

        # sleep_value_and_grad evaluates chunk by chunk: it cannot be traced by mx.compile.
        if cfg.compile and not cfg.random_chunks and cfg.memory_bound == "none":
            state = [model.state, optimizer.state]
            step = mx.compile(step, inputs=state, outputs=state)
        self._steps[key] = step
        return step

    def train_step(self, batch=None):
        """One optimizer step on `batch` (default: the next one from the task's stream)."""
        if batch is None:
            batch = self.task.sample(self.rng, self.cfg.batch_size)
        for name in ("inputs", "targets"):
            ids = getattr(batch, name)
            if ids.size and (ids.min() < 0 or ids.max() >= self.model.vocab_size):
                bad = ids.min() if ids.min() < 0 else ids.max()
                raise ValueError(
                    f"training batch {name}: token id {bad} is outside the model's "
                    f"vocabulary of {self.model.vocab_size}; the task does not "
                    "match the model"
                )
        rng = self.rng if self.cfg.random_chunks else None
        plan = plan_chunks(batch.mask, self.sleep.window, rng)
        sleep = self.sleep
        if self.cfg.loops_sample is not None:
            lo, hi = self.cfg.loops_sample
            sleep = replace(sleep, loops=int(self.loops_rng.integers(lo, hi + 1)))
        extra = self.cfg.depth_losses if self.step >= self.cfg.depth_losses_from else None
        depths = loss_depths(sleep, extra, depth_draw(self.cfg.seed, self.step))
        loss, norm = self._step_fn(plan, depths)(
            mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.mask)
        )
        mx.eval(loss, norm, self.model.parameters(), self.optimizer.state)
        self.step += 1
        self.tokens += batch.inputs.size
        return loss.item(), norm.item()

    def evaluate(self) -> dict:
        cfg = self.cfg
        return {
            "eval": evaluate(
                self.model,
                self.task,
                self.sleep,
                cfg.eval_samples,
                cfg.batch_size,
                seed=cfg.seed + 1,
            )
        }


# -- loading a trained run --------------------------------------------------------------------


def find_run(path: str) -> str:
    """The run directory for `path` (a run dir or its checkpoint/ subdirectory)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path} is not a directory; pass a run directory made by `mlx-sleep train --out DIR`"
        )
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        recover_dir(os.path.join(candidate, "checkpoint"))
        if os.path.exists(os.path.join(candidate, "config.json")) and os.path.exists(
            os.path.join(candidate, "checkpoint", "model.safetensors")
        ):
            return candidate
    raise FileNotFoundError(
        f"{path} is not a training run (no config.json and "
        "checkpoint/model.safetensors); pass the --out directory of "
        "`mlx-sleep train`"
    )


def load_run(path: str, force: bool = False):
    """(model, sleep config, task, settings) of a trained run. A run whose files disagree
    (settings missing or of the wrong shape, a task whose tokens the model cannot read) is
    refused with one line."""
    run = find_run(path)
    config_path = os.path.join(run, "config.json")
    what = " (a run's settings, written by `mlx-sleep train`)"
    settings = read_json_object(config_path, what)
    for key in ("model", "sleep", "task"):
        if not isinstance(settings.get(key), dict):
            raise ConfigError(f"{config_path} has no {key!r} settings{what}")
    model_type = settings.get("model_type", "hybrid")
    try:
        model = model_from_config(model_type, settings["model"], force=force)
        sleep = SleepConfig.from_dict(settings["sleep"])
        task = task_from_dict(settings["task"])
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"{config_path}: {e}")
    if task.vocab_size > model.vocab_size:
        raise ConfigError(
            f"{config_path}: the task's {task.vocab_size} tokens do not fit the "
            f"model's vocabulary of {model.vocab_size}"
        )
    weights = check_regular_file(os.path.join(run, "checkpoint", "model.safetensors"))
    model.load_weights(list(read_safetensors(weights).items()))
    mx.eval(model.parameters())
    return model, sleep, task, settings
