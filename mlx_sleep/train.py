"""Training with backprop through every sleep pass (Algorithm 1), as in the paper.

Muon for the matrix weights of the blocks and AdamW for everything else (embeddings, head,
norms, gates, conv kernels), linear warmup then cosine decay, gradient clipping, an mx.compile'd
step, checkpoints with exact resume, periodic evaluation, a progress bar and a JSONL log.

A run directory holds:
    config.json          model, sleep, task and training settings (what `eval` needs)
    checkpoint/          model.safetensors, optimizer.safetensors, trainer.json (swapped in
                         atomically: a crash leaves the previous complete checkpoint)
    metrics.jsonl        one JSON object per logged step / evaluation
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import ConfigError, ModelConfig, SleepConfig
from .eval import evaluate
from .io import atomic_dir, read_json, recover_dir, save_arrays, write_json
from .models import HybridLM
from .sleep import plan_chunks, sleep_loss, sleep_value_and_grad
from .tasks import task_from_dict


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
    compile: bool = False  # see default_compile(); ignored with activation_checkpoint
    # Recompute each chunk on backward (sleep.sleep_value_and_grad): peak memory ~ one chunk's
    # activations + the chunk-boundary states. It evaluates chunk by chunk, so the step is not
    # mx.compile'd then.
    activation_checkpoint: bool = False
    random_chunks: bool = False  # sample chunk lengths in [1, L] (see sleep.chunk_bounds)
    # (lo, hi): draw the sleep passes N per batch uniformly in [lo, hi] (a model whose depth is a
    # dial at test time). From its own seeded generator, so the data stream is the same as a
    # fixed-N run's. Evaluation during training uses the run's SleepConfig.loops.
    loops_sample: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("lr", "adam_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.warmup < 0 or self.grad_clip <= 0:
            raise ConfigError("warmup must be >= 0 and grad_clip > 0")
        if self.loops_sample is not None:
            lo, hi = self.loops_sample
            if not 1 <= lo <= hi:
                raise ConfigError(f"loops_sample must be LO:HI with 1 <= LO <= HI "
                                  f"(got {lo}:{hi})")
            self.loops_sample = (int(lo), int(hi))

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("loops_sample") is not None:
            d["loops_sample"] = tuple(d["loops_sample"])
        return cls(**d)


def default_compile() -> bool:
    """mx.compile pays on Metal. On the CPU backend the first compile of a sleep step runs the
    C++ compiler for minutes and measured no faster per step, so it is off there."""
    return mx.metal.is_available()


def is_matrix_weight(path: str, weight: mx.array) -> bool:
    """Muon takes the 2-D projection weights inside the blocks; embeddings, the head, the short
    conv kernels, norms and gate parameters go to AdamW (as in the paper and Muon's authors)."""
    return weight.ndim == 2 and path.startswith("layers.") and path.endswith(".weight")


def make_optimizer(cfg: TrainConfig):
    def schedule(peak):
        warm = optim.linear_schedule(peak * 1e-2, peak, max(cfg.warmup, 1))
        decay = optim.cosine_decay(peak, max(cfg.steps - cfg.warmup, 1), peak * cfg.min_lr_ratio)
        return optim.join_schedules([warm, decay], [max(cfg.warmup, 1)])

    muon = optim.Muon(learning_rate=schedule(cfg.lr), weight_decay=cfg.weight_decay)
    adamw = optim.AdamW(learning_rate=schedule(cfg.adam_lr), weight_decay=cfg.weight_decay)
    return optim.MultiOptimizer([muon, adamw], [is_matrix_weight])


def build_model(model_cfg: ModelConfig, seed: int) -> HybridLM:
    mx.random.seed(seed)
    model = HybridLM(model_cfg)
    mx.eval(model.parameters())
    return model


class Trainer:
    """One training run in `out_dir`. Construct, then `run()`; resumes from `out_dir` when it
    already holds a checkpoint of the same settings."""

    def __init__(self, out_dir: str, model_cfg: ModelConfig, sleep: SleepConfig, task,
                 train: TrainConfig, progress: bool = True, log=print):
        self.out_dir, self.sleep, self.task, self.cfg = out_dir, sleep, task, train
        self.progress, self.log = progress, log
        if sleep.window > task.seq_len:
            raise ConfigError(f"window L={sleep.window} is larger than the task's sequence "
                              f"length T={task.seq_len}; use --window <= {task.seq_len}")
        if model_cfg.vocab_size < task.vocab_size:
            raise ConfigError(f"vocab_size {model_cfg.vocab_size} < the task's {task.vocab_size}")
        self.settings = {"model": model_cfg.to_dict(), "sleep": sleep.to_dict(),
                         "task": task.to_dict(), "train": asdict(train)}
        self.model = build_model(model_cfg, train.seed)
        self.optimizer = make_optimizer(train)
        self.rng = np.random.default_rng(train.seed)
        self.loops_rng = np.random.default_rng([train.seed, 1])  # N per batch (loops_sample)
        self.step, self.tokens = 0, 0
        self._steps = {}  # compiled step per chunk plan
        os.makedirs(out_dir, exist_ok=True)
        config_path = os.path.join(out_dir, "config.json")
        ckpt = recover_dir(os.path.join(out_dir, "checkpoint"))
        if os.path.exists(config_path) and os.path.exists(ckpt):
            saved = read_json(config_path)
            if {k: saved.get(k) for k in ("model", "sleep", "task")} != \
                    {k: self.settings[k] for k in ("model", "sleep", "task")}:
                raise ConfigError(f"{out_dir} holds a run with different model/sleep/task "
                                  "settings; use a new --out directory")
            self.load_checkpoint(ckpt)
        write_json(config_path, self.settings)

    # -- one step -----------------------------------------------------------------------------
    def _step_fn(self, plan, sleep):
        key = (tuple(plan[0]), tuple(plan[1]), sleep.loops)
        if key in self._steps:
            return self._steps[key]
        model, optimizer, cfg = self.model, self.optimizer, self.cfg

        if cfg.activation_checkpoint:
            def value_and_grad(x, y, w):
                return sleep_value_and_grad(model, x, y, w, sleep, plan=plan)
        else:
            grad_fn = nn.value_and_grad(model, lambda m, x, y, w: sleep_loss(m, x, y, w, sleep,
                                                                             plan=plan))

            def value_and_grad(x, y, w):
                return grad_fn(model, x, y, w)

        def step(x, y, w):
            (loss, _), grads = value_and_grad(x, y, w)
            grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
            optimizer.update(model, grads)
            return loss, norm

        # sleep_value_and_grad evaluates chunk by chunk: it cannot be traced by mx.compile.
        if cfg.compile and not cfg.random_chunks and not cfg.activation_checkpoint:
            state = [model.state, optimizer.state]
            step = mx.compile(step, inputs=state, outputs=state)
        self._steps[key] = step
        return step

    def train_step(self, batch):
        rng = self.rng if self.cfg.random_chunks else None
        plan = plan_chunks(batch.mask, self.sleep.window, rng)
        sleep = self.sleep
        if self.cfg.loops_sample is not None:
            lo, hi = self.cfg.loops_sample
            sleep = replace(sleep, loops=int(self.loops_rng.integers(lo, hi + 1)))
        loss, norm = self._step_fn(plan, sleep)(mx.array(batch.inputs), mx.array(batch.targets),
                                                mx.array(batch.mask))
        mx.eval(loss, norm, self.model.parameters(), self.optimizer.state)
        self.step += 1
        self.tokens += batch.inputs.size
        return loss.item(), norm.item()

    # -- the loop -------------------------------------------------------------------------------
    def run(self, on_eval=None):
        cfg = self.cfg
        bar = _progress(cfg.steps, self.step, self.progress)
        t0, tokens0, losses = time.perf_counter(), self.tokens, []
        while self.step < cfg.steps:
            loss, norm = self.train_step(self.task.sample(self.rng, cfg.batch_size))
            losses.append(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr")
            elapsed = time.perf_counter() - t0
            tok_s = (self.tokens - tokens0) / max(elapsed, 1e-9)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log({"step": self.step, "loss": float(np.mean(losses)), "grad_norm": norm,
                           "tokens": self.tokens, "tokens_per_s": tok_s,
                           "lr": float(self.optimizer.optimizers[0].learning_rate)})
                losses = []
            last = self.step == cfg.steps
            if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                results = evaluate(self.model, self.task, self.sleep, cfg.eval_samples,
                                   cfg.batch_size, seed=cfg.seed + 1)
                self._log({"step": self.step, "tokens": self.tokens, "eval": results})
                if on_eval is not None:
                    on_eval(self.step, results)
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.model

    def _log(self, record):
        record = {"time": time.time(), **record}
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self):
        with atomic_dir(os.path.join(self.out_dir, "checkpoint")) as tmp:
            save_arrays(os.path.join(tmp, "model.safetensors"),
                        dict(tree_flatten(self.model.parameters())))
            save_arrays(os.path.join(tmp, "optimizer.safetensors"),
                        dict(tree_flatten(self.optimizer.state)))
            write_json(os.path.join(tmp, "trainer.json"), {
                "step": self.step, "tokens": self.tokens,
                "rng": self.rng.bit_generator.state,
                "loops_rng": self.loops_rng.bit_generator.state, "settings": self.settings})

    def load_checkpoint(self, ckpt):
        self.model.load_weights(os.path.join(ckpt, "model.safetensors"))
        self.optimizer.init(self.model.trainable_parameters())  # the structure to fill in
        opt_state = tree_unflatten(list(mx.load(os.path.join(ckpt, "optimizer.safetensors")).items()))
        self.optimizer.state = _restore_lists(opt_state, self.optimizer.state)
        meta = read_json(os.path.join(ckpt, "trainer.json"))
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.rng.bit_generator.state = meta["rng"]
        if "loops_rng" in meta:
            self.loops_rng.bit_generator.state = meta["loops_rng"]
        mx.eval(self.model.parameters(), self.optimizer.state)


def _restore_lists(loaded, template):
    """tree_unflatten turns {"0": ...} back into lists only where keys are digits; keep the
    optimizer state's own structure by walking the template."""
    if isinstance(template, list):
        items = loaded if isinstance(loaded, list) else [loaded[str(i)] for i in range(len(template))]
        return [_restore_lists(l, t) for l, t in zip(items, template)]
    if isinstance(template, dict):
        return {k: _restore_lists(loaded[k], v) if k in loaded else v for k, v in template.items()}
    return loaded


def _progress(total, initial, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


# -- loading a trained run --------------------------------------------------------------------

def find_run(path: str) -> str:
    """The run directory for `path` (a run dir or its checkpoint/ subdirectory)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory; pass a run directory made by "
                                "`mlx-sleep train --out DIR`")
    for candidate in (path, os.path.dirname(os.path.abspath(path))):
        recover_dir(os.path.join(candidate, "checkpoint"))
        if os.path.exists(os.path.join(candidate, "config.json")) and \
                os.path.exists(os.path.join(candidate, "checkpoint", "model.safetensors")):
            return candidate
    raise FileNotFoundError(f"{path} is not a training run (no config.json and "
                            "checkpoint/model.safetensors); pass the --out directory of "
                            "`mlx-sleep train`")


def load_run(path: str):
    """(model, sleep config, task, settings) of a trained run."""
    run = find_run(path)
    settings = read_json(os.path.join(run, "config.json"))
    model = HybridLM(ModelConfig.from_dict(settings["model"]))
    model.load_weights(os.path.join(run, "checkpoint", "model.safetensors"))
    mx.eval(model.parameters())
    return model, SleepConfig.from_dict(settings["sleep"]), task_from_dict(settings["task"]), settings
