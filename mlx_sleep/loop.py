"""The one training loop: `train`, `finetune` and the demo all run through `TrainingRun`.

A run lives in a directory of its own (claimed through io.py's write policy, locked while it
trains):
    config.json          the run's settings; re-running the same command resumes, a run with
                         other settings is refused naming the keys that differ
    checkpoint/          the weights that train, optimizer.safetensors and a small JSON of
                         the loop's position (swapped in atomically: a crash leaves the
                         previous complete checkpoint)
    metrics.jsonl        one JSON object per logged step / evaluation (trimmed to the
                         checkpoint's step on resume, so no step appears twice)

A subclass says what one step is (`train_step`), what evaluation is (`evaluate`), and what
a checkpoint holds besides the optimizer state (`checkpoint_weights`, `checkpoint_extras`,
`checkpoint_meta` / `restore_meta`). Everything else lives here once: the directory, resume,
the settings check, the checkpoint writer, the log, the progress bar and console lines, the
NaN check, evaluation mode, data-parallel processes, and a checkpoint on Ctrl-C.
"""

import json
import math
import os
import sys
import time
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .config import ConfigError
from .io import (
    OutputError,
    acquire_lock,
    atomic_dir,
    claim_dir,
    read_json_object,
    recover_dir,
    save_arrays,
    trim_jsonl,
    write_json,
)
from .report import show_bytes
from .weights import read_safetensors


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


def settings_diff(saved: dict, new: dict, prefix: str = "") -> list:
    """["train.lr: 0.002 -> 0.001", ...]: the settings that differ between two runs."""
    out = []
    for k in sorted(set(saved) | set(new)):
        a, b = saved.get(k, "(unset)"), new.get(k, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)[:30]} -> {json.dumps(b)[:30]}")
    return out


def refuse_other_settings(where: str, saved: dict, new: dict, ignore=()):
    """One line naming the keys (and values) that differ, if any do outside `ignore`."""
    diff = [d for d in settings_diff(saved, new) if d.split(":", 1)[0] not in ignore]
    if diff:
        raise ConfigError(
            f"{where} holds a run with other settings ({'; '.join(diff[:4])}"
            f"{' ...' if len(diff) > 4 else ''}); re-run the same command to "
            "resume, or use a new --out directory"
        )


def progress_bar(total: int, initial: int, unit: str = "step", desc: Optional[str] = None):
    """A tqdm bar on a terminal; None without one (the loop prints plain lines instead)."""
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=True)


def restore_lists(loaded, template):
    """tree_unflatten turns {"0": ...} back into lists only where keys are digits; keep the
    optimizer state's own structure by walking the template."""
    if isinstance(template, list):
        items = (
            loaded if isinstance(loaded, list) else [loaded[str(i)] for i in range(len(template))]
        )
        return [restore_lists(l, t) for l, t in zip(items, template)]
    if isinstance(template, dict):
        return {k: restore_lists(loaded[k], v) if k in loaded else v for k, v in template.items()}
    if isinstance(template, mx.array) and (
        not isinstance(loaded, mx.array) or loaded.shape != template.shape
    ):
        raise ValueError(
            f"optimizer state of shape {getattr(loaded, 'shape', '?')} where "
            f"{template.shape} belongs"
        )
    return loaded


class TrainingRun:
    """A run of `steps` optimizer steps in `out_dir`, resumed from its last checkpoint.

    Subclasses set, before calling `open_run()`: model, optimizer, settings (a JSON-able dict),
    cfg (with steps, log_every, checkpoint_every), eval_every, and the class attributes below;
    and define train_step() -> (loss, grad_norm), which advances self.step and self.tokens (the
    tokens trained on, padding excluded), and evaluate() -> a record to log, or None."""

    OWNER = "run"  # io.OWNERS: what the directory's marker says it holds
    META_FILE = "trainer.json"  # the loop's position inside checkpoint/
    WEIGHTS_FILE = "model.safetensors"
    EVAL_AT_START = False  # finetune reports the validation loss before it trains
    # Settings that may change between a run and its continuation: steps grows to extend it.
    RESUMABLE_CHANGES = ()

    world = None
    step, tokens = 0, 0
    _lock = None

    # -- what a subclass may override --------------------------------------------------------
    def checkpoint_weights(self) -> dict:
        return dict(tree_flatten(self.model.parameters()))

    def checkpoint_extras(self) -> dict:
        """{file name: JSON object} written beside the weights (e.g. adapter_config.json)."""
        return {}

    def checkpoint_meta(self) -> dict:
        return {}

    def restore_meta(self, meta: dict):
        pass

    def learning_rate(self) -> float:
        return float(self.optimizer.optimizers[0].learning_rate)

    def log_extras(self) -> dict:
        return {}

    def evaluate(self) -> Optional[dict]:
        return None

    # -- the directory ------------------------------------------------------------------------
    @property
    def is_writer(self) -> bool:
        return self.world is None or self.world.rank == 0

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.out_dir, "checkpoint")

    def open_run(self, force: bool = False):
        """Claim and lock the directory, resume from its checkpoint (settings checked first),
        and record the settings. Other processes take rank 0's state."""
        resumed = False
        if self.is_writer:
            claim_dir(
                self.out_dir,
                self.OWNER,
                force,
                writes=("config.json", "metrics.jsonl", "checkpoint"),
            )
            self._lock = acquire_lock(self.out_dir, "a training")
            try:
                resumed = self._resume()
                trim_jsonl(
                    os.path.join(self.out_dir, "metrics.jsonl"),
                    lambda record: record.get("step", 0) <= self.step,
                )
                write_json(os.path.join(self.out_dir, "config.json"), self.settings)
            except BaseException:
                self.close()
                raise
        mx.eval(self.model.parameters(), self.optimizer.state)
        if self.world is not None and self.world.size > 1:
            self._sync_from_rank0(resumed)

    def _resume(self) -> bool:
        ckpt = recover_dir(self.checkpoint_dir)
        if os.path.islink(ckpt) or (os.path.lexists(ckpt) and not os.path.isdir(ckpt)):
            raise OutputError(
                f"{ckpt} is not a plain directory; mlx-sleep replaces it on every "
                "save: remove it or use another --out directory"
            )
        config_path = os.path.join(self.out_dir, "config.json")
        if not (os.path.exists(config_path) and os.path.exists(ckpt)):
            return False
        saved = self.saved_settings(read_json_object(config_path, " (a run's settings)"))
        refuse_other_settings(
            self.out_dir,
            {k: saved.get(k) for k in self.settings},
            json.loads(json.dumps(self.settings)),  # as config.json has them: tuples are lists
            self.RESUMABLE_CHANGES,
        )
        self.load_checkpoint(ckpt)
        if self.step > self.cfg.steps:
            raise ConfigError(
                f"{self.out_dir} is at step {self.step}, past --steps "
                f"{self.cfg.steps}: pass --steps {self.step} or more"
            )
        return True

    def saved_settings(self, saved: dict) -> dict:
        """A saved config.json brought up to today's keys (runs from earlier versions)."""
        return saved

    def close(self):
        """Release the directory's lock (done at the end of run())."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __del__(self):
        self.close()

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self):
        if not self.is_writer:
            return
        with atomic_dir(self.checkpoint_dir) as tmp:
            save_arrays(os.path.join(tmp, self.WEIGHTS_FILE), self.checkpoint_weights())
            save_arrays(
                os.path.join(tmp, "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state))
            )
            for name, obj in self.checkpoint_extras().items():
                write_json(os.path.join(tmp, name), obj)
            write_json(
                os.path.join(tmp, self.META_FILE),
                {"step": self.step, "tokens": self.tokens, **self.checkpoint_meta()},
            )
        self._saved_step = self.step

    def load_checkpoint(self, ckpt: str):
        """Resume from `ckpt`. A damaged one (missing or truncated files, tensors that do not
        fit, a position of the wrong shape) is refused with one line."""
        try:
            weights = read_safetensors(os.path.join(ckpt, self.WEIGHTS_FILE))
            opt_state = read_safetensors(os.path.join(ckpt, "optimizer.safetensors"))
            meta = read_json_object(os.path.join(ckpt, self.META_FILE))
            step, tokens = meta["step"], meta["tokens"]
            if type(step) is not int or type(tokens) is not int or step < 0 or tokens < 0:
                raise ValueError(f"step {step!r} and tokens {tokens!r} must be integers >= 0")
            self.model.load_weights(
                list(weights.items()), strict=self.WEIGHTS_FILE == "model.safetensors"
            )
            self.optimizer.init(self.model.trainable_parameters())  # the structure to fill in
            self.optimizer.state = restore_lists(
                tree_unflatten(list(opt_state.items())), self.optimizer.state
            )
            self.restore_meta(meta)
        except (KeyError, TypeError, ValueError, OverflowError, FileNotFoundError) as e:
            raise ConfigError(
                f"{ckpt} is damaged ({type(e).__name__}: {str(e)[:300]}); move it "
                "away to start the run over"
            ) from None
        self.step, self.tokens = self._saved_step = step, tokens
        mx.eval(self.model.parameters(), self.optimizer.state)

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
            return self.world.sum(
                tree_map(
                    lambda x: x if self.is_writer else mx.zeros_like(x),
                    tree,
                    is_leaf=lambda x: isinstance(x, mx.array),
                )
            )

        self.model.update(rank0s(self.model.trainable_parameters()))
        self.optimizer.state = rank0s(self.optimizer.state)
        self.step, self.tokens = step, tokens
        mx.eval(self.model.parameters(), self.optimizer.state)

    # -- the log and the console --------------------------------------------------------------
    def log(self, record: dict):
        if self.is_writer:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def say(self, line: str):
        """A console line that does not break the progress bar."""
        if not (self.is_writer and self.progress):
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            self.echo(line)

    # -- the loop -----------------------------------------------------------------------------
    _bar = None
    _saved_step = None
    progress = True
    report_every = None  # console lines every this many steps (default: cfg.log_every)
    echo = staticmethod(print)

    def run(self, on_eval=None, on_step=None):
        """Train to cfg.steps from wherever the run stands; `on_eval(step, result)` after each
        evaluation, `on_step(step)` after each step (and its checkpoint). Ctrl-C saves a
        checkpoint at the step reached, then stops."""
        try:
            if self._lock is None and self.is_writer:
                self._lock = acquire_lock(self.out_dir, "a training")
            return self._run(on_eval, on_step)
        except KeyboardInterrupt:
            if self.step and self._saved_step != self.step:
                self.save_checkpoint()
                self.say(f"interrupted: checkpoint saved at step {self.step}")
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.close()

    def _run(self, on_eval, on_step):
        cfg = self.cfg
        if self.step == 0 and self.EVAL_AT_START:
            self._evaluate(on_eval)
        self.model.train()
        if self.is_writer and self.progress:
            self._bar = progress_bar(cfg.steps, self.step)
        t0, tokens0, losses = time.perf_counter(), self.tokens, []
        mx.reset_peak_memory()
        while self.step < cfg.steps:
            loss, norm = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {self.step}; lower --lr")
            losses.append(loss)
            tok_s = (self.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            peak_gb = mx.get_peak_memory() / 1e9
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(
                    loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", peak=f"{peak_gb:.2f}GB"
                )
            last = self.step == cfg.steps
            if self.step % cfg.log_every == 0 or last:
                record = {
                    "step": self.step,
                    "loss": sum(losses) / len(losses),
                    "grad_norm": norm,
                    "tokens": self.tokens,
                    "tokens_per_s": tok_s,
                    "peak_memory_gb": peak_gb,
                    "lr": self.learning_rate(),
                    **self.log_extras(),
                }
                self.log(record)
                if self.step % (self.report_every or cfg.log_every) == 0 or last:
                    self.say(
                        f"step {self.step}: loss {record['loss']:.4f}, lr {record['lr']:.3g}, "
                        f"{tok_s:,.0f} tokens/s, peak memory {show_bytes(peak_gb * 1e9)}"
                    )
                losses = []
                t0, tokens0 = time.perf_counter(), self.tokens  # per report interval
            if (self.eval_every and self.step % self.eval_every == 0) or last:
                self._evaluate(on_eval)
                t0 = time.perf_counter()  # evaluation time is not training time
            if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                self.save_checkpoint()
            if on_step is not None:
                on_step(self.step)
        return self.model

    def _evaluate(self, on_eval):
        self.model.eval()  # dropout off: two evaluations of the same weights agree
        try:
            result = self.evaluate()
        finally:
            self.model.train()
        if result is None:
            return
        self.log({"step": self.step, "tokens": self.tokens, **result})
        if on_eval is not None:
            on_eval(self.step, result)
