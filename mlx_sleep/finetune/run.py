"""A fine-tuning run: `mlx-sleep finetune` on the one training loop (loop.TrainingRun).

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences (the global batch: with
several processes each takes its own slice). Gradients are sums over scored tokens, summed over
micro-batches and processes, divided by the number of scored tokens: one process on the global
batch and several on its slices take the same step.

An output directory holds (besides the loop's config.json, checkpoint/ and metrics.jsonl):
    checkpoint/       adapters.safetensors (the trainable weights), optimizer.safetensors,
                      adapter_config.json (mlx-lm's), state.json (step, tokens)
    fused/            with --fuse: a model directory (`mlx_sleep.load` opens it)
"""

import os
from dataclasses import asdict, replace
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten, tree_map

from ..config import ConfigError, SleepConfig
from ..loop import TrainingRun, World
from ..sleep import (
    depth_draw,
    depth_loss,
    depth_value_and_grad,
    loss_depths,
    plan_chunks,
    sleep_loss,
    trained_at_every_depth,
)
from ..train import make_optimizer, memory_bound_of
from .adapters import adapter_config, fuse_model, load_trainable, prepare_model
from .config import FinetuneConfig
from .data import batch_indices, load_examples, make_batch


def summed_loss_and_grads(model, inputs, targets, mask, depths, plan, memory_bound):
    """(summed cross-entropy over the scored tokens, their count, gradients of that sum), the
    cross-entropy taken at each of `depths` (sleep.loss_depths: Algorithm 1's N alone by
    default) and weighted; a SleepConfig means Algorithm 1 at its N. `memory_bound`: "chunk" or
    "block" (sleep_value_and_grad's granularity), or "none" (one graph over the whole
    sequence); True and False mean "chunk" and "none" (older callers)."""
    x, y, w = mx.array(inputs), mx.array(targets), mx.array(mask)
    if isinstance(depths, SleepConfig):
        depths = loss_depths(depths)
    if isinstance(memory_bound, bool):
        memory_bound = memory_bound_of(memory_bound)
    if memory_bound != "none":
        (loss, n), grads = depth_value_and_grad(
            model, x, y, w, depths, plan=plan, granularity=memory_bound
        )
    else:
        fn = nn.value_and_grad(model, lambda m, x, y, w: depth_loss(m, x, y, w, depths, plan=plan))
        (loss, n), grads = fn(model, x, y, w)
    scale = mx.maximum(n, 1.0)  # float32: the product is rounded once, to the weights' dtype
    return loss * scale, n, tree_map(lambda g: (g * scale).astype(g.dtype), grads)


def validation_loss(
    model,
    examples,
    sleep: SleepConfig,
    batch_size: int,
    pad_id: int,
    world: World,
    max_batches: int = 0,
) -> float:
    """Mean cross-entropy per scored token over `examples` (each process its slice)."""
    ce, n = mx.array(0.0), mx.array(0.0)
    starts = range(0, len(examples), batch_size)
    if max_batches:
        starts = list(starts)[:max_batches]
    for start in starts:
        inputs, targets, mask = make_batch(examples[start : start + batch_size], pad_id)
        per = -(-len(inputs) // world.size)
        rows = slice(world.rank * per, (world.rank + 1) * per)
        if len(inputs[rows]) == 0:
            continue
        plan = plan_chunks(mask[rows], sleep.window)  # each row its own plan
        loss, count = sleep_loss(
            model,
            mx.array(inputs[rows]),
            mx.array(targets[rows]),
            mx.array(mask[rows]),
            sleep,
            plan=plan,
        )
        ce, n = ce + loss * count, n + count
        mx.eval(ce, n)
    ce, n = world.sum([ce, n])
    return (ce / mx.maximum(n, 1.0)).item()


class Finetune(TrainingRun):
    """One fine-tuning run of the model in `model_dir` into `out_dir`; resumes from `out_dir`.

    ft = Finetune("jet-2b-mlx", "data.jsonl", "runs/jet", FinetuneConfig(steps=200),
                  sleep=SleepConfig(loops=4, window=2000, eviction="sliding"))
    ft.run(); ft.fuse()
    """

    OWNER, META_FILE, WEIGHTS_FILE = "finetune", "state.json", "adapters.safetensors"
    EVAL_AT_START = True
    # the memory bound: the same math either way (within float rounding)
    RESUMABLE_CHANGES = ("finetune.steps", "finetune.memory_bound")

    def __init__(
        self,
        model_dir: str,
        data: str,
        out_dir: str,
        cfg: FinetuneConfig,
        sleep=None,
        core=None,
        valid: Optional[str] = None,
        progress: bool = True,
        echo=print,
        dry_run: bool = False,
        force: bool = False,
        resume_adapters: Optional[str] = None,
    ):
        """`sleep`: a SleepConfig, or a dict of overrides (loops, window, eviction; None keeps
        the model's). `dry_run`: build everything but neither read nor write `out_dir`.
        `resume_adapters`: start from the trainable weights in that directory (another run's
        checkpoint/), with a fresh optimizer."""
        from ..loading import load

        self.model_dir, self.out_dir, self.cfg = model_dir, out_dir, cfg
        self.progress, self.echo, self.world = progress, echo, World()
        self.eval_every = cfg.valid_every
        if cfg.batch_size % self.world.size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} must be a multiple of the number "
                f"of processes ({self.world.size})"
            )
        model, self.tokenizer = load(model_dir)
        if not isinstance(sleep, SleepConfig):
            overrides = {k: v for k, v in (sleep or {}).items() if v is not None}
            sleep = SleepConfig(**{**model.sleep_config.to_dict(), **overrides})
        # what this training makes of the model: a stopped sleep may keep its passes only when
        # every depth 1..N is trained (recorded in the adapters and the fused model)
        self.sleep = replace(sleep, partial=trained_at_every_depth(sleep.loops, cfg.depth_losses))
        if core is not None:
            model.config.core = tuple(core)
            model.config.validate()
        self.pad_id = self.tokenizer.eos_token_id or 0
        self.train_examples = load_examples(data, self.tokenizer, model.vocab_size)
        self.valid_examples = (
            load_examples(valid, self.tokenizer, model.vocab_size) if valid else []
        )
        self.model = prepare_model(model, cfg)
        start = load_trainable(self.model, resume_adapters) if resume_adapters else None
        self.optimizer = make_optimizer(cfg.optimizer_config(), model)
        self.settings = {
            "model": os.path.abspath(model_dir),
            "model_type": model.model_type,
            "core": list(model.core),
            "sleep": self.sleep.to_dict(),
            "data": os.path.abspath(data),
            "valid": os.path.abspath(valid) if valid else None,
            "finetune": asdict(cfg),
            "processes": self.world.size,
        }
        if start is not None:  # only when given: runs from before the flag resume unchanged
            self.settings["resume_adapters"] = start
        if not dry_run:
            self.open_run(force)

    def saved_settings(self, saved: dict) -> dict:
        finetune = saved.get("finetune")
        if isinstance(finetune, dict) and "memory_bounded" in finetune:  # before --memory-bound
            finetune = dict(finetune)
            finetune["memory_bound"] = memory_bound_of(finetune.pop("memory_bounded"))
        if isinstance(finetune, dict):  # settings added since: their defaults
            saved = {**saved, "finetune": {**asdict(FinetuneConfig()), **finetune}}
        return saved

    @property
    def trainable_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def sleep_at(self, step: int) -> SleepConfig:
        """--hard-warmup: hard eviction for the first steps, then the configured eviction."""
        return replace(self.sleep, eviction="hard") if step < self.cfg.hard_warmup else self.sleep

    def checkpoint_weights(self) -> dict:
        return dict(tree_flatten(self.model.trainable_parameters()))

    def checkpoint_extras(self) -> dict:
        return {"adapter_config.json": adapter_config(self.cfg, self.model, self.sleep)}

    def learning_rate(self) -> float:
        """The learning rate of what mostly trains: Muon's (full) or AdamW's (adapters)."""
        muon, adamw = self.optimizer.optimizers
        return float((muon if self.cfg.fine_tune_type == "full" else adamw).learning_rate)

    def log_extras(self) -> dict:
        return {"eviction": self.sleep_at(self.step - 1).eviction}

    # -- training -----------------------------------------------------------------------------
    def train_step(self):
        """One optimizer step over grad_accum micro-batches of the global batch."""
        cfg, world = self.cfg, self.world
        sleep = self.sleep_at(self.step)
        extra = cfg.depth_losses if self.step >= cfg.depth_losses_from else None
        depths = loss_depths(sleep, extra, depth_draw(cfg.seed, self.step))
        # Dropout draws from MLX's generator: seed it per step so a resumed run draws the same.
        mx.random.seed(cfg.seed * 1_000_003 + self.step)
        ce, n, grads, tokens = mx.array(0.0), mx.array(0.0), None, 0
        for micro in range(cfg.grad_accum):
            start = (self.step * cfg.grad_accum + micro) * cfg.batch_size
            examples = [
                self.train_examples[i]
                for i in batch_indices(cfg.seed, len(self.train_examples), start, cfg.batch_size)
            ]
            inputs, targets, mask = make_batch(examples, self.pad_id)
            rows = world.rows(cfg.batch_size)
            plan = plan_chunks(mask[rows], sleep.window)  # each row its own plan
            c, k, g = summed_loss_and_grads(
                self.model,
                inputs[rows],
                targets[rows],
                mask[rows],
                depths,
                plan,
                cfg.memory_bound,
            )
            ce, n = ce + c, n + k
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(ce, n, grads)
            tokens += sum(len(ids) - 1 for ids, _ in examples)  # padding is not trained on
        if world.size > 1:
            grads = tree_map(
                lambda g: g * world.size, nn.average_gradients(grads, group=world.group)
            )
            ce, n = world.sum([ce, n])
        denom = mx.maximum(n, 1.0)
        grads = tree_map(lambda g: (g / denom).astype(g.dtype), grads)
        grads, norm = clip_grad_norm(grads, cfg.grad_clip)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, norm)
        self.step += 1
        self.tokens += tokens
        return (ce / denom).item(), norm.item()

    def evaluate(self) -> Optional[dict]:
        if not self.valid_examples:
            return None
        loss = validation_loss(
            self.model,
            self.valid_examples,
            self.sleep_at(self.step),
            self.cfg.batch_size,
            self.pad_id,
            self.world,
            self.cfg.valid_batches,
        )
        self.say(f"step {self.step}: validation loss {loss:.4f}")
        return {"valid_loss": loss}

    def validate(self) -> Optional[float]:
        """The validation loss now, in evaluation mode (dropout off)."""
        self.model.eval()
        try:
            result = self.evaluate()
        finally:
            self.model.train()
        return None if result is None else result["valid_loss"]

    def windows(self):
        """(context windows, answer windows) over the training records at this run's L: every
        context window sleeps N passes whatever else its batch holds (per-row plans)."""
        context = answer = 0
        for _, scored in self.train_examples:
            _, is_answer = plan_chunks(scored[None, 1:], self.sleep.window)
            n_answer = sum(rows[0] for rows in is_answer)
            answer, context = answer + n_answer, context + len(is_answer) - n_answer
        return context, answer

    def run(self, on_eval=None, on_step=None):
        if self.is_writer and self.progress and self.step < self.cfg.steps:
            self.say(
                f"{self.cfg.fine_tune_type}: {self.trainable_parameters:,} trainable "
                f"parameters; L = {self.sleep.window}, N = {self.sleep.loops}, "
                f"{self.sleep.eviction} eviction"
            )
            context, answer = self.windows()
            self.say(
                f"data: {len(self.train_examples):,} records; {context:,} context windows, "
                f"each slept N = {self.sleep.loops} passes; {answer:,} answer windows, one pass each"
            )
        return super().run(on_eval, on_step)

    # -- fuse ---------------------------------------------------------------------------------
    def fuse(self, out: Optional[str] = None) -> Optional[str]:
        """Merge the adapters into the weights and write a model directory (default OUT/fused)
        with the fine-tuned sleep settings; `mlx_sleep.load` and `chat` open it."""
        if not self.is_writer:
            return None
        return fuse_model(
            self.model,
            self.model_dir,
            out or os.path.join(self.out_dir, "fused"),
            self.sleep,
            {"run": os.path.abspath(self.out_dir), "step": self.step},
        )
