"""Fine-tuning converted models to sleep: `mlx-sleep finetune`.

A converted model with N > 1 has never slept; its N-pass consolidation helps only after it is
trained for it. This trains any supported model (Jet-Nemotron, Ouro (+ Jet layers), the mlx-lm
hybrids) with backprop through every window and pass (`sleep.sleep_value_and_grad`, memory
bounded to one chunk), LoRA / DoRA adapters through mlx-lm's tuner or all weights (`full`).

Data, one JSON object per line:
    {"prompt": ..., "answer": ...}   loss on the answer (and eos); the prompt is the context the
                                     model consolidates window by window
    {"text": ...}                    loss on every token
    {"messages": [{"role", "content"}, ...]}   the tokenizer's chat template; loss on assistant turns

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences (the global batch: with
several processes each takes its own slice). Gradients are sums over scored tokens, summed over
micro-batches and processes, divided by the number of scored tokens: one process on the global
batch and several on its slices take the same step.

An output directory holds:
    config.json       the settings (re-running the same command resumes; other settings refuse)
    checkpoint/       adapters.safetensors (the trainable weights), optimizer.safetensors,
                      adapter_config.json (mlx-lm's), state.json (step, tokens); swapped in atomically
    metrics.jsonl     one JSON object per logged step / validation
    fused/            with --fuse: a model directory (`mlx_sleep.load` opens it)
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.optimizers import clip_grad_norm
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .config import ConfigError, SleepConfig
from .io import atomic_dir, read_json, recover_dir, save_arrays, write_json
from .sleep import plan_chunks, sleep_loss, sleep_value_and_grad
from .train import TrainConfig, _progress, _restore_lists, make_optimizer

LAYER_KINDS = ("jet", "gdn", "attn", "mlp")
FINE_TUNE_TYPES = ("lora", "dora", "full")


class DataError(ValueError):
    """A data file is unreadable or a record malformed; the message names the file and line."""


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
    memory_bounded: bool = True  # sleep_value_and_grad (recompute per chunk) vs one graph
    valid_every: int = 100
    valid_batches: int = 0  # 0: the whole validation file
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self):
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

    def kinds(self) -> Optional[List[str]]:
        if not self.train_only:
            return None
        kinds = [k.strip() for k in self.train_only.split(",") if k.strip()]
        bad = [k for k in kinds if k not in LAYER_KINDS]
        if bad or not kinds:
            raise ConfigError(f"--train-only takes layer kinds from {', '.join(LAYER_KINDS)} "
                              f"(got {self.train_only!r})")
        return kinds

    def optimizer_config(self) -> TrainConfig:
        """train.make_optimizer's settings: Muon (lr) for matrix weights, AdamW (adam_lr) for the
        rest. Adapters are never Muon's (LoRALinear is not an nn.Linear): they get AdamW at lr."""
        adam_lr = self.adam_lr if self.fine_tune_type == "full" else self.lr
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                           adam_lr=adam_lr, weight_decay=self.weight_decay, warmup=self.warmup,
                           min_lr_ratio=self.min_lr_ratio, grad_clip=self.grad_clip,
                           seed=self.seed)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- data ---------------------------------------------------------------------------------------

def read_records(path: str) -> List[Tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file, each checked."""
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; pass a JSONL file of {{\"prompt\", \"answer\"}}, "
                        "{\"text\"} or {\"messages\"} records")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg}); each line must be one "
                                "JSON object") from None
            _check_record(rec, where)
            records.append((lineno, rec))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _check_record(rec, where):
    forms = 'a {"prompt", "answer"}, {"text"} or {"messages"} object'
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected {forms}, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise DataError(f"{where}: \"messages\" must be a non-empty list of "
                            "{\"role\": str, \"content\": str}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: \"messages\" has no assistant turn to learn")
    elif "prompt" in rec or "answer" in rec:
        if not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("answer"), str)):
            raise DataError(f"{where}: a prompt/answer record needs both \"prompt\" and "
                            "\"answer\" as strings")
        if not rec["answer"]:
            raise DataError(f"{where}: \"answer\" is empty; there is nothing to learn")
    elif "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: \"text\" must be a non-empty string")
    else:
        raise DataError(f"{where}: expected {forms} (keys found: {', '.join(sorted(rec)) or 'none'})")


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_record(rec: dict, tokenizer) -> Tuple[List[int], List[bool]]:
    """(token ids, scored) where scored[i] says token i is a target the loss counts."""
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    if "messages" in rec:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("{\"messages\"} records need a tokenizer with a chat template; "
                            "this model's tokenizer_config.json has none")
        msgs, ids, scored = rec["messages"], [], []

        def extend(upto, score):
            if upto[:len(ids)] != ids:
                raise DataError("the chat template renders earlier turns differently once later "
                                "ones are added; use {\"prompt\", \"answer\"} records instead")
            scored.extend([score] * (len(upto) - len(ids)))
            ids.extend(upto[len(ids):])

        for i, msg in enumerate(msgs):
            if msg["role"] == "assistant":  # its header is context, its content the target
                extend(list(tokenizer.apply_chat_template(msgs[:i], tokenize=True,
                                                          add_generation_prompt=True)), False)
            extend(list(tokenizer.apply_chat_template(msgs[:i + 1], tokenize=True)),
                   msg["role"] == "assistant")
        return ids, scored
    if "text" in rec:
        ids = _encode(tokenizer, rec["text"]) + tail
        return ids, [True] * len(ids)
    prompt, answer = _encode(tokenizer, rec["prompt"]), _encode(tokenizer, rec["answer"]) + tail
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def load_examples(path: str, tokenizer, vocab_size: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Every record of `path` tokenized: (ids int32, scored bool), checked against the model."""
    examples = []
    for lineno, rec in read_records(path):
        where = f"{path}:{lineno}"
        try:
            ids, scored = tokenize_record(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if len(ids) < 2 or not any(scored[1:]):
            raise DataError(f"{where}: the record tokenizes to {len(ids)} token(s) with nothing "
                            "to predict; give it more text")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise DataError(f"{where}: token id {int(ids.max())} is outside the model's "
                            f"vocabulary of {vocab_size}; is the tokenizer the model's?")
        examples.append((ids.astype(np.int32), np.asarray(scored, dtype=bool)))
    return examples


def make_batch(examples, pad_id: int):
    """inputs, targets, mask [B, T-1] (numpy), right-padded to the longest sequence."""
    T = max(len(ids) for ids, _ in examples)
    ids = np.full((len(examples), T), pad_id, dtype=np.int32)
    scored = np.zeros((len(examples), T), dtype=bool)
    for i, (x, s) in enumerate(examples):
        ids[i, :len(x)], scored[i, :len(s)] = x, s
    return ids[:, :-1], ids[:, 1:], scored[:, 1:].astype(np.float32)


@lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, n: int, start: int, size: int) -> List[int]:
    """Examples start..start+size-1 of the training stream: a fresh shuffle every epoch, a pure
    function of the position, so a resumed run reads exactly what the first run would have."""
    return [int(_epoch_order(seed, n, i // n)[i % n]) for i in range(start, start + size)]


# -- the model: what trains ---------------------------------------------------------------------

def part_kind(module) -> Optional[str]:
    """The layer kind of a decoder layer's child (its mixer or MLP), from the class name:
    JetBlock -> jet, *DeltaNet -> gdn, *Attention -> attn, SwiGLU / *MLP / *MoE* -> mlp."""
    name = type(module).__name__.lower()
    for kind, words in (("jet", ("jet",)), ("gdn", ("deltanet",)), ("attn", ("attention",)),
                        ("mlp", ("mlp", "swiglu", "moe"))):
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


def prepare_model(model, cfg: FinetuneConfig):
    """Freeze what does not train and add the adapters (mlx-lm's linear_to_lora_layers)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    kinds = cfg.kinds()
    parts = layer_parts(model)
    if kinds:
        missing = [k for k in kinds if not any(kind == k for kind, _ in parts)]
        if missing:
            have = sorted({kind for kind, _ in parts})
            raise ConfigError(f"--train-only {','.join(missing)}: this model has no such layers "
                              f"(it has {', '.join(have)})")
    if cfg.fine_tune_type == "full" and any(isinstance(m, nn.QuantizedLinear)
                                            for _, m in model.named_modules()):
        raise ConfigError("this model is quantized: its weights cannot be trained directly; "
                          "train LoRA/DoRA adapters (drop --full) or convert without -q")
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
        n = len(model.layers) if cfg.lora_layers is None else min(cfg.lora_layers, len(model.layers))
        linear_to_lora_layers(model, n, {"rank": cfg.rank, "scale": cfg.scale,
                                         "dropout": cfg.dropout},
                              use_dora=cfg.fine_tune_type == "dora")
        if kinds:  # adapters outside the named kinds stay at their zero update
            for kind, part in layer_parts(model):
                if kind not in kinds:
                    part.freeze()
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if n_train == 0:
        raise ConfigError("nothing to train: the chosen --train-only / --lora-layers select "
                          "no weights")
    return model


def adapter_config(cfg: FinetuneConfig, model) -> dict:
    """mlx-lm's adapter_config.json fields (its load_adapters reads them)."""
    n = len(model.layers) if cfg.lora_layers is None else min(cfg.lora_layers, len(model.layers))
    return {"fine_tune_type": cfg.fine_tune_type, "num_layers": n,
            "lora_parameters": {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout}}


# -- one step -----------------------------------------------------------------------------------

class World:
    """This process's place among the data-parallel processes (mx.distributed)."""

    def __init__(self):
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def rows(self, batch_size: int) -> slice:
        per = batch_size // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def sum(self, tree):
        if self.size == 1:
            return tree
        return tree_map(lambda x: mx.distributed.all_sum(x, group=self.group), tree)


def summed_loss_and_grads(model, inputs, targets, mask, sleep: SleepConfig, plan,
                          memory_bounded: bool):
    """(summed cross-entropy over the scored tokens, their count, gradients of that sum)."""
    x, y, w = mx.array(inputs), mx.array(targets), mx.array(mask)
    if memory_bounded:
        (loss, n), grads = sleep_value_and_grad(model, x, y, w, sleep, plan=plan)
    else:
        fn = nn.value_and_grad(model, lambda m, x, y, w: sleep_loss(m, x, y, w, sleep, plan=plan))
        (loss, n), grads = fn(model, x, y, w)
    scale = mx.maximum(n, 1.0)  # float32: the product is rounded once, to the weights' dtype
    return loss * scale, n, tree_map(lambda g: (g * scale).astype(g.dtype), grads)


def validation_loss(model, examples, sleep: SleepConfig, batch_size: int, pad_id: int,
                    world: World, max_batches: int = 0) -> float:
    """Mean cross-entropy per scored token over `examples` (each process its slice)."""
    ce, n = mx.array(0.0), mx.array(0.0)
    starts = range(0, len(examples), batch_size)
    if max_batches:
        starts = list(starts)[:max_batches]
    for start in starts:
        inputs, targets, mask = make_batch(examples[start:start + batch_size], pad_id)
        plan = plan_chunks(mask, sleep.window)  # the global batch's plan on every process
        per = -(-len(inputs) // world.size)
        rows = slice(world.rank * per, (world.rank + 1) * per)
        if len(inputs[rows]) == 0:
            continue
        loss, count = sleep_loss(model, mx.array(inputs[rows]), mx.array(targets[rows]),
                                 mx.array(mask[rows]), sleep, plan=plan)
        ce, n = ce + loss * count, n + count
        mx.eval(ce, n)
    ce, n = world.sum([ce, n])
    return (ce / mx.maximum(n, 1.0)).item()


# -- the run ------------------------------------------------------------------------------------

class Finetune:
    """One fine-tuning run of the model in `model_dir` into `out_dir`; resumes from `out_dir`.

        ft = Finetune("jet-2b-mlx", "data.jsonl", "runs/jet", FinetuneConfig(steps=200),
                      sleep=SleepConfig(loops=4, window=2000, eviction="sliding"))
        ft.run(); ft.fuse()
    """

    def __init__(self, model_dir: str, data: str, out_dir: str, cfg: FinetuneConfig,
                 sleep=None, core=None, valid: Optional[str] = None,
                 progress: bool = True, log=print, dry_run: bool = False):
        """`sleep`: a SleepConfig, or a dict of overrides (loops, window, eviction; None keeps
        the model's). `dry_run`: build everything but neither read nor write `out_dir`."""
        from .loading import load

        self.model_dir, self.out_dir, self.cfg = model_dir, out_dir, cfg
        self.progress, self.log, self.world = progress, log, World()
        if cfg.batch_size % self.world.size:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the number "
                              f"of processes ({self.world.size})")
        model, self.tokenizer = load(model_dir)
        if not isinstance(sleep, SleepConfig):
            overrides = {k: v for k, v in (sleep or {}).items() if v is not None}
            sleep = SleepConfig(**{**model.sleep_config.to_dict(), **overrides})
        self.sleep = sleep
        if core is not None:
            model.config.core = tuple(core)
            model.config.validate()
        self.pad_id = self.tokenizer.eos_token_id or 0
        self.train_examples = load_examples(data, self.tokenizer, model.vocab_size)
        self.valid_examples = load_examples(valid, self.tokenizer, model.vocab_size) if valid else []
        self.model = prepare_model(model, cfg)
        self.optimizer = make_optimizer(cfg.optimizer_config(), model)
        self.settings = {"model": os.path.abspath(model_dir), "model_type": model.model_type,
                         "core": list(model.core), "sleep": self.sleep.to_dict(),
                         "data": os.path.abspath(data),
                         "valid": os.path.abspath(valid) if valid else None,
                         "finetune": asdict(cfg), "processes": self.world.size}
        self.step, self.tokens = 0, 0
        if not dry_run:
            self._resume()

    @property
    def is_writer(self) -> bool:
        return self.world.rank == 0

    def sleep_at(self, step: int) -> SleepConfig:
        """--hard-warmup: hard eviction for the first steps, then the configured eviction."""
        return replace(self.sleep, eviction="hard") if step < self.cfg.hard_warmup else self.sleep

    # -- checkpoints --------------------------------------------------------------------------
    def _resume(self):
        ckpt = recover_dir(os.path.join(self.out_dir, "checkpoint"))
        config_path = os.path.join(self.out_dir, "config.json")
        found = os.path.exists(os.path.join(ckpt, "state.json"))
        if found:
            saved = read_json(config_path) if os.path.exists(config_path) else None
            if saved != self.settings:
                differ = sorted(k for k in self.settings if (saved or {}).get(k) != self.settings[k])
                raise ConfigError(f"{self.out_dir} holds a run with other settings ("
                                  f"{', '.join(differ)}); re-run the same command to resume, or "
                                  "use a new --out directory")
            self.model.load_weights(os.path.join(ckpt, "adapters.safetensors"), strict=False)
            self.optimizer.init(self.model.trainable_parameters())
            state = tree_unflatten(list(mx.load(os.path.join(ckpt, "optimizer.safetensors")).items()))
            self.optimizer.state = _restore_lists(state, self.optimizer.state)
            meta = read_json(os.path.join(ckpt, "state.json"))
            self.step, self.tokens = meta["step"], meta["tokens"]
        elif self.is_writer:
            if os.path.exists(self.out_dir) and os.listdir(self.out_dir) and \
                    not os.path.exists(config_path):
                raise ConfigError(f"{self.out_dir} exists and is not a fine-tuning run; use a "
                                  "new --out directory")
            os.makedirs(self.out_dir, exist_ok=True)
            write_json(config_path, self.settings)
        mx.eval(self.model.parameters(), self.optimizer.state)
        if self.world.size > 1:
            self._sync_from_rank0(found)

    def _sync_from_rank0(self, resumed_here: bool):
        """Other machines do not see rank 0's disk: everyone takes rank 0's step, trainable
        weights and optimizer state (a sum where only rank 0 contributes)."""
        mine = mx.array([self.step if self.is_writer else 0, self.tokens if self.is_writer else 0])
        step, tokens = (int(v) for v in self.world.sum(mine).tolist())
        if step == 0:
            return
        if not resumed_here:
            self.optimizer.init(self.model.trainable_parameters())
        def rank0s(tree):
            return self.world.sum(tree_map(lambda x: x if self.is_writer else mx.zeros_like(x),
                                           tree, is_leaf=lambda x: isinstance(x, mx.array)))

        params = rank0s(self.model.trainable_parameters())
        state = rank0s(self.optimizer.state)
        self.model.update(params)
        self.optimizer.state = state
        self.step, self.tokens = step, tokens
        mx.eval(self.model.parameters(), self.optimizer.state)

    def save_checkpoint(self):
        if not self.is_writer:
            return
        with atomic_dir(os.path.join(self.out_dir, "checkpoint")) as tmp:
            save_arrays(os.path.join(tmp, "adapters.safetensors"),
                        dict(tree_flatten(self.model.trainable_parameters())))
            save_arrays(os.path.join(tmp, "optimizer.safetensors"),
                        dict(tree_flatten(self.optimizer.state)))
            write_json(os.path.join(tmp, "adapter_config.json"),
                       adapter_config(self.cfg, self.model))
            write_json(os.path.join(tmp, "state.json"), {"step": self.step, "tokens": self.tokens})

    def _log(self, record):
        if self.is_writer:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    # -- training -----------------------------------------------------------------------------
    def train_step(self):
        """One optimizer step over grad_accum micro-batches of the global batch."""
        cfg, world = self.cfg, self.world
        sleep = self.sleep_at(self.step)
        # Dropout draws from MLX's generator: seed it per step so a resumed run draws the same.
        mx.random.seed(cfg.seed * 1_000_003 + self.step)
        ce, n, grads, tokens = mx.array(0.0), mx.array(0.0), None, 0
        for micro in range(cfg.grad_accum):
            start = (self.step * cfg.grad_accum + micro) * cfg.batch_size
            idx = batch_indices(cfg.seed, len(self.train_examples), start, cfg.batch_size)
            inputs, targets, mask = make_batch([self.train_examples[i] for i in idx], self.pad_id)
            plan = plan_chunks(mask, sleep.window)  # from the global batch: same on every rank
            rows = world.rows(cfg.batch_size)
            c, k, g = summed_loss_and_grads(self.model, inputs[rows], targets[rows], mask[rows],
                                            sleep, plan, cfg.memory_bounded)
            ce, n = ce + c, n + k
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(ce, n, grads)
            tokens += int(inputs.size)
        if world.size > 1:
            grads = tree_map(lambda g: g * world.size, nn.average_gradients(grads, group=world.group))
            ce, n = world.sum([ce, n])
        denom = mx.maximum(n, 1.0)
        grads = tree_map(lambda g: (g / denom).astype(g.dtype), grads)
        grads, norm = clip_grad_norm(grads, cfg.grad_clip)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state, norm)
        self.step += 1
        self.tokens += tokens
        return (ce / denom).item(), norm.item()

    def validate(self) -> Optional[float]:
        if not self.valid_examples:
            return None
        loss = validation_loss(self.model, self.valid_examples, self.sleep_at(self.step),
                               self.cfg.batch_size, self.pad_id, self.world,
                               self.cfg.valid_batches)
        self._log({"step": self.step, "valid_loss": loss})
        return loss

    def run(self, on_step=None):
        """Train to cfg.steps (from wherever the run stands). `on_step(step)` after each step."""
        cfg = self.cfg
        if self.step == 0 and cfg.valid_every:
            self._report_valid(self.validate())
        bar = _progress(cfg.steps, self.step, self.progress and self.is_writer)
        t0, tokens0, losses = time.perf_counter(), self.tokens, []
        mx.reset_peak_memory()
        while self.step < cfg.steps:
            loss, norm = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr")
            losses.append(loss)
            tok_s = (self.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            peak_gb = mx.get_peak_memory() / 1e9
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}", peak=f"{peak_gb:.2f}GB")
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                self._log({"step": self.step, "loss": float(np.mean(losses)), "grad_norm": norm,
                           "tokens": self.tokens, "tokens_per_s": tok_s, "peak_memory_gb": peak_gb,
                           "lr": self._lr(),
                           "eviction": self.sleep_at(self.step - 1).eviction})
                losses = []
            if (cfg.valid_every and self.step % cfg.valid_every == 0) or last:
                self._report_valid(self.validate())
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
            if on_step is not None:
                on_step(self.step)
        if bar is not None:
            bar.close()
        return self.model

    def _lr(self) -> float:
        """The learning rate of what mostly trains: Muon's (full) or AdamW's (adapters)."""
        muon, adamw = self.optimizer.optimizers
        return float((muon if self.cfg.fine_tune_type == "full" else adamw).learning_rate)

    def _report_valid(self, loss):
        if loss is not None and self.is_writer and self.progress:
            self.log(f"step {self.step}: validation loss {loss:.4f}")

    # -- fuse ---------------------------------------------------------------------------------
    def fuse(self, out: Optional[str] = None) -> Optional[str]:
        """Merge the adapters into the weights and write a model directory (default OUT/fused)
        with the fine-tuned sleep settings; `mlx_sleep.load` and `chat` open it."""
        if not self.is_writer:
            return None
        return fuse_model(self.model, self.model_dir, out or os.path.join(self.out_dir, "fused"),
                          self.sleep, {"run": os.path.abspath(self.out_dir), "step": self.step})


def fuse_model(model, model_dir: str, out: str, sleep: SleepConfig, provenance: dict) -> str:
    from .convert.common import save_model_dir

    fused = [(name, m.fuse()) for name, m in model.named_modules()
             if hasattr(m, "fuse") and hasattr(m, "lora_a")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    config = read_json(os.path.join(model_dir, "config.json"))
    config["model"] = model.config.to_dict()
    config["sleep"] = sleep.to_dict()
    config["finetune"] = provenance
    save_model_dir(out, config, dict(tree_flatten(model.parameters())), model_dir)
    return out




# -- --estimate ---------------------------------------------------------------------------------

def _probe(model, sleep: SleepConfig, batch: int, length: int, passes: int, scored: int,
           memory_bounded: bool):
    """(peak bytes above what was live, seconds) of one chunk's gradient at this size: an
    answer chunk (one pass) whose last `scored` positions are scored (only they reach the head),
    or, with scored = 0, a context chunk of `passes` passes followed by one scored token."""
    import gc

    rng = np.random.default_rng(0)
    T = length if scored else length + 1
    inputs = rng.integers(0, model.vocab_size, size=(batch, T)).astype(np.int32)
    mask = np.zeros((batch, T), np.float32)
    if scored:
        mask[:, -min(scored, length):] = 1
        plan = ([(0, length)], [True])
    else:
        mask[:, -1] = 1
        plan = ([(0, length), (length, length + 1)], [False, True])
    probe_sleep = replace(sleep, loops=passes)
    peak, seconds = float("inf"), float("inf")
    for _ in range(2):  # the first run pays one-time costs: keep the second (the smaller)
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        out = summed_loss_and_grads(model, inputs, inputs, mask, probe_sleep, plan, memory_bounded)
        mx.eval(out)
        seconds = min(seconds, time.perf_counter() - t0)
        peak = min(peak, mx.get_peak_memory() - base)
        del out
    return peak, seconds


def _fit_with_intercept(ts, rs):
    """c, a, b with c + a t + b t^2 through three probes (a, b >= 0; linear through the two
    longest if the curve bends down)."""
    if len(set(ts)) < 3:
        return max(rs[0], 0), max(rs[-1] - rs[0], 0) / max(ts[-1] - ts[0], 1), 0.0
    b, a, _ = np.polyfit(ts, rs, 2)
    if b < 0:
        b, (a, _) = 0.0, np.polyfit(ts[1:], rs[1:], 1)
    a = max(a, 0.0)
    return max(float(rs[-1] - a * ts[-1] - b * ts[-1] ** 2), 0.0), float(a), float(b)


def estimate_step(ft: Finetune) -> dict:
    """Expected peak memory (bytes) and seconds per optimizer step of this run on this machine.

    weights + optimizer state (AdamW: 2 per trainable weight, Muon: 1) + accumulated gradients
    + the chunk-boundary states the memory-bounded backward keeps (one per chunk) + one chunk's
    activations across its N passes. The activations and the time are measured on short probe
    chunks (up to 256 tokens, at the run's batch) and extrapolated in length (linear +
    quadratic) and passes, so a 2B model is probed without running a full step."""
    model, cfg, sleep = ft.model, ft.cfg, ft.sleep_at(ft.cfg.steps - 1)
    B, L, N = cfg.batch_size // ft.world.size, sleep.window, sleep.loops
    lengths = np.array([len(ids) - 1 for ids, _ in ft.train_examples])
    T_max, T_mean = int(lengths.max()), float(lengths.mean())
    n_chunks = math.ceil(T_max / L)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    train_bytes = sum(v.nbytes for v in trainable.values())
    matrices = model.matrix_weights() if cfg.fine_tune_type == "full" else set()
    optimizer = sum(v.nbytes * (1 if k in matrices else 2) for k, v in trainable.items())
    accumulated = train_bytes if cfg.grad_accum > 1 else 0

    # One chunk's state after eviction: fixed part (fast weights, conv) + KV kept per token.
    t2 = min(L, 256)
    t1 = max(1, t2 // 2)
    from .sleep import evict, run_chunk
    ids = mx.zeros((1, t2), dtype=mx.int32)
    _, state = run_chunk(model, ids, model.initial_state(1), 0, 1, sleep.attention_window)
    state = evict(model, state, sleep.keep_after_eviction)
    kv = sum(a.nbytes for s in state for k, a in s.items() if k in ("keys", "values"))
    fixed = sum(a.nbytes for s in state for k, a in s.items() if k not in ("keys", "values"))
    kept = min(sleep.keep_after_eviction, t2)
    per_state = B * (fixed + (kv / kept * sleep.keep_after_eviction if kept else 0))
    boundary = n_chunks * per_state if cfg.memory_bounded else 0
    del state

    # Probes at the run's own batch: a peak is the larger of what grows with the tokens
    # (activations) and what does not (gradients, temporaries), so a peak measured at another
    # batch does not scale to this one. Each part is fitted as fixed + a t + b t^2 (attention's
    # scores grow as t^2) through probes at three lengths, then read at L.
    mb = cfg.memory_bounded
    ts = (max(1, t2 // 4), t1, t2)
    ctx = [_probe(model, sleep, B, t, 1, 0, mb) for t in ts]
    m_two, s_two = _probe(model, sleep, B, t2, 2, 0, mb)
    # an answer chunk scores the answer's tokens (all of a {"text"} record's): head width S,
    # capped at each probe's length by _probe
    S = min(L, max(int(scored[1:].sum()) for _, scored in ft.train_examples))
    ans = [_probe(model, sleep, B, t, 1, S, mb)[0] for t in ts]
    c_fixed, ca, cb = _fit_with_intercept(ts, [m for m, _ in ctx])
    a_fixed, aa, ab = _fit_with_intercept(ts, ans)
    one_pass = ca * t2 + cb * t2 * t2
    pass_frac = max(m_two - ctx[-1][0], 0) / max(one_pass, 1)  # each extra pass, per pass
    context = (ca * L + cb * L * L) * (1 + pass_frac * (N - 1))
    answer = aa * L + ab * L * L
    if mb:
        activations = max(c_fixed + context, a_fixed + answer)
    else:  # one graph over every chunk
        activations = max(c_fixed, a_fixed) + (n_chunks - 1) * context + answer
    peak = weights + optimizer + accumulated + boundary + activations

    # Time the same way; each probe is a whole forward + backward, as a chunk of a step is.
    s_fixed, sa, sb = _fit_with_intercept(ts, [s for _, s in ctx])
    time_frac = max(s_two - ctx[-1][1], 0) / max(ctx[-1][1] - s_fixed, 1e-9)
    chunk_s = s_fixed + (sa * L + sb * L * L) * (1 + time_frac * (N - 1))
    step_s = cfg.grad_accum * math.ceil(T_mean / L) * chunk_s
    return {"peak_bytes": int(peak), "seconds_per_step": step_s,
            "tokens_per_step": int(cfg.grad_accum * cfg.batch_size * T_mean),
            "parts": {"weights": int(weights), "optimizer": int(optimizer),
                      "accumulated_grads": int(accumulated), "boundary_states": int(boundary),
                      "activations": int(activations)},
            "settings": {"batch_per_process": B, "L": L, "N": N, "longest": T_max,
                         "mean_length": T_mean, "chunks": n_chunks, "memory_bounded": mb,
                         "fine_tune_type": cfg.fine_tune_type,
                         "trainable_parameters": int(sum(v.size for v in trainable.values()))}}


def format_estimate(est: dict) -> str:
    s, p = est["settings"], est["parts"]

    def gb(x):
        return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"

    lines = [f"{s['fine_tune_type']}, {s['trainable_parameters']:,} trainable parameters; "
             f"L = {s['L']}, N = {s['N']}, batch {s['batch_per_process']} per process, "
             f"sequences up to {s['longest']} tokens ({s['chunks']} chunks)",
             f"expected peak memory: {gb(est['peak_bytes'])}  (weights {gb(p['weights'])}, "
             f"optimizer {gb(p['optimizer'])}, accumulated gradients "
             f"{gb(p['accumulated_grads'])}, chunk-boundary states {gb(p['boundary_states'])}, "
             f"activations {gb(p['activations'])})",
             f"expected time per step: {est['seconds_per_step']:.2f} s "
             f"(~{est['tokens_per_step'] / max(est['seconds_per_step'], 1e-9):,.0f} tokens/s)"]
    return "\n".join(lines)
