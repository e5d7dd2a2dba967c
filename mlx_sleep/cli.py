"""The `mlx-sleep` command line."""

import json
import sys

from . import _blas  # noqa: F401  (first: loads an optimized BLAS before mlx.core)

import click

from .config import ConfigError, ModelConfig, SleepConfig

# The paper's full settings (for a Mac GPU; far beyond a CPU): Section "Models in the paper".
PAPER_PRESETS = {
    "rule110": dict(model=dict(hidden_size=256, layers="attn,gdn,attn,gdn", num_heads=8),
                    task=dict(n_strings=4, n_bits=24, steps=32),
                    train=dict(batch_size=512, lr=2e-3, adam_lr=5e-5)),
    "depo": dict(model=dict(hidden_size=512, layers="attn,gdn,attn,gdn,attn,gdn,attn,gdn,attn,gdn",
                            num_heads=8),
                 task=dict(max_nodes=75, max_hops=16, n_queries=10, window=75, context_len=300),
                 train=dict(batch_size=128, lr=2e-3, adam_lr=5e-5)),
}


class Failure(click.ClickException):
    """A one-line error for the user (exit code 1)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def _run_safely(fn):
    """Turn expected errors (bad settings, missing files) into one clear line, not a traceback."""
    try:
        return fn()
    except (ConfigError, ValueError, FloatingPointError) as e:
        raise Failure(str(e)) from None
    except OSError as e:  # unwritable, not a directory, disk full, ...: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        raise Failure(f"{where}{e.strerror or e}") from None
    except MemoryError:
        raise Failure("out of memory; make the model, batch or window smaller") from None


def _parse_options(pairs):
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--task-option")
        k, v = pair.split("=", 1)
        try:
            out[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.replace("-", "_")] = v
    return out


def _parse_loops_list(value):
    """'1,2,4' -> [1, 2, 4] (eval --loops)."""
    try:
        loops = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        loops = []
    if not loops:
        raise click.BadParameter(f"{value!r} is not a list of loop counts (e.g. 1,2,4)",
                                 param_hint="--loops")
    return list(dict.fromkeys(loops))  # each checked by SleepConfig


def _parse_core(value, hint="--core", form="START:STOP"):
    if value is None:
        return None
    try:
        start, stop = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not {form} (e.g. 1:3)", param_hint=hint)
    return (start, stop)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-sleep")
def main():
    """Sleep-like fast-weight consolidation for hybrid language models on MLX."""


@main.command()
@click.option("--task", "task_name", type=click.Choice(["rule110", "depo"]), required=True)
@click.option("--loops", "-N", type=int, default=None, help="Sleep passes N per context window (default: 1; with --loops-sample, its B).")
@click.option("--loops-sample", default=None, metavar="A:B", help="Draw N per batch uniformly in [A, B] (test-time depth dial).")
@click.option("--window", "-L", type=int, default=None, help="Window L (default: the task's).")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None, help="Default: the task's.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (resumes if it holds a run).")
@click.option("--task-option", "-o", multiple=True, metavar="KEY=VALUE", help="Task setting, e.g. -o n_bits=8 -o steps=4.")
@click.option("--hidden-size", type=int, default=128, show_default=True)
@click.option("--layers", default="attn,gdn,attn,gdn", show_default=True, help="Block pattern (attn, swa, gdn, jet).")
@click.option("--heads", type=int, default=4, show_default=True)
@click.option("--kv-heads", type=int, default=None)
@click.option("--core", default=None, metavar="START:STOP", help="Looped block range (default: all).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Muon learning rate (matrix weights).")
@click.option("--adam-lr", type=float, default=5e-5, show_default=True, help="AdamW learning rate (other weights).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup", type=int, default=50, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=int, default=0, help="Evaluate every K steps (0: at the end).")
@click.option("--eval-samples", type=int, default=256, show_default=True)
@click.option("--checkpoint-every", type=int, default=200, show_default=True)
@click.option("--activation-checkpoint", is_flag=True, help="Recompute activations per chunk on backward.")
@click.option("--random-chunks", is_flag=True, help="Train with random chunk lengths <= L.")
@click.option("--compile/--no-compile", default=None, help="mx.compile the step (default: on with Metal).")
@click.option("--paper", is_flag=True, help="The paper's full model/task/batch settings (for a Mac GPU).")
@click.option("--force", is_flag=True, help="Write into a directory holding other files (never "
              "replacing them); train what may not fit in memory. See docs/files.md.")
def train(task_name, loops, loops_sample, window, eviction, out, task_option, hidden_size, layers, heads,
          kv_heads, core, steps, batch_size, lr, adam_lr, weight_decay, warmup, grad_clip, seed,
          eval_every, eval_samples, checkpoint_every, activation_checkpoint, random_chunks,
          compile, paper, force):
    """Train a hybrid from scratch on a synthetic task with N sleep loops."""
    from .tasks import get_task
    from .train import TrainConfig, Trainer, default_compile

    def go():
        model_kw = dict(hidden_size=hidden_size, layers=layers, num_heads=heads,
                        num_kv_heads=kv_heads, core=_parse_core(core))
        task_kw = {}
        train_kw = dict(batch_size=batch_size, lr=lr, adam_lr=adam_lr)
        if paper:
            preset = PAPER_PRESETS[task_name]
            model_kw.update(preset["model"])
            task_kw.update(preset["task"])
            train_kw.update(preset["train"])
        task_kw.update(_parse_options(task_option))
        task = get_task(task_name, **task_kw)
        sample = _parse_core(loops_sample, "--loops-sample", "A:B") if loops_sample else None
        n = loops if loops is not None else (sample[1] if sample else 1)
        sleep = SleepConfig(loops=n, window=task.window if window is None else window,
                            eviction=eviction or task.eviction)
        model_cfg = ModelConfig(vocab_size=task.vocab_size, **model_kw)
        cfg = TrainConfig(steps=steps, weight_decay=weight_decay, warmup=warmup,
                          grad_clip=grad_clip, seed=seed, eval_every=eval_every,
                          eval_samples=eval_samples, checkpoint_every=checkpoint_every,
                          activation_checkpoint=activation_checkpoint,
                          random_chunks=random_chunks, loops_sample=sample,
                          compile=default_compile() if compile is None else compile, **train_kw)
        trainer = Trainer(out, model_cfg, sleep, task, cfg, force=force)
        if trainer.step:
            click.echo(f"resuming {out} at step {trainer.step}")
        trainer.run()
        click.echo(f"saved to {out}")

    _run_safely(go)


def _gsm_infinite_options(fn):
    """The options of `eval --task gsm-infinite` (see docs/gsm-infinite.md)."""
    options = [
        click.option("--model", "model_path", default=None, help="gsm-infinite: a converted model directory (or Hub id)."),
        click.option("--task", "task_name", type=click.Choice(["gsm-infinite"]), default=None, help="Evaluate a model on a benchmark instead of a training run."),
        click.option("--subset", type=click.Choice(["symbolic", "medium", "hard"]), default="medium", show_default=True),
        click.option("--length", type=click.Choice(["0", "8k", "16k", "32k"]), default="8k", show_default=True),
        click.option("--ops", default="2,4,6,8", show_default=True, help="Op counts: 2,4,6,8 or a range 2-8 (2-8:2)."),
        click.option("--limit", type=int, default=None, help="Problems per op (default: all in --data; from the Hub the official 100 / 200)."),
        click.option("--data", type=click.Path(dir_okay=False), default=None, help="A local JSONL in the dataset's schema instead of the Hub."),
        click.option("--protocol", type=click.Choice(["paper", "official"]), default="paper", show_default=True),
        click.option("--max-tokens", type=int, default=None, help="Generation limit (default: paper 24, symbolic 256; official 4096)."),
        click.option("--judge-model", default=None, help="Symbolic, official protocol: the judge model (any model `load` opens)."),
        click.option("--judge-max-tokens", type=int, default=2048, show_default=True, help="The judge's generation limit (upstream's)."),
        click.option("--adapter", default=None, type=click.Path(file_okay=False), help="A fine-tune's adapter directory."),
        click.option("--out", default=None, type=click.Path(file_okay=False), help="Results directory (resumes the run in it)."),
        click.option("--score", "score_path", default=None, type=click.Path(dir_okay=False), help="Re-score a predictions JSONL (no model)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command("eval")
@click.option("--checkpoint", type=click.Path(), default=None, help="A run directory from `train`.")
@click.option("--loops", "-N", default=None, metavar="N[,N...]", help="Override the sleep loops N; several (1,2,4) evaluate each: a run's table gets a column per N and --plot draws accuracy against N; gsm-infinite sweeps them.")
@click.option("--window", "-L", type=int, default=None, help="Override the window L.")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None)
@click.option("--samples", type=int, default=512, show_default=True, help="Sequences per difficulty.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG plot here.")
@_gsm_infinite_options
def eval_cmd(checkpoint, loops, window, eviction, samples, batch_size, seed, json_path, plot_path,
             task_name, **gsm):
    """Accuracy by difficulty (t for Rule 110, hops k for Depo) of a trained run, or a model on
    GSM-Infinite (--model DIR --task gsm-infinite).

    With several --loops (e.g. 1,2,3,4,6) a run is evaluated at each N: one column per N, and
    --plot draws accuracy against N, one line per difficulty."""
    from .eval import evaluate, format_table, plot, plot_against_loops
    from .io import check_file_target, write_json
    from .train import load_run

    if task_name == "gsm-infinite" or gsm["score_path"]:
        from .gsm_infinite import run_cli

        return _run_safely(lambda: run_cli(loops=loops, window=window, eviction=eviction,
                                       echo=click.echo, **gsm))
    if checkpoint is None:
        raise Failure("pass --checkpoint RUN (a training run), or --model DIR --task gsm-infinite")

    def go():
        loops_list = _parse_loops_list(loops) if loops is not None else None
        for path in (json_path, plot_path):  # before the work, not after it
            if path:
                check_file_target(path)
        model, sleep, task, _ = load_run(checkpoint)
        window_ = sleep.window if window is None else window
        if window_ > task.seq_len:
            raise ConfigError(f"window L={window_} is larger than the sequence length "
                              f"T={task.seq_len}")
        by_loops = {}
        for n in loops_list or [sleep.loops]:
            run_sleep = SleepConfig(loops=n, window=window_, eviction=eviction or sleep.eviction)
            by_loops[n] = evaluate(model, task, run_sleep, samples, batch_size, seed,
                                   progress=True)
        dname = "t (steps)" if task.name == "rule110" else "k (hops)"
        click.echo(f"{task.name}, {run_sleep.eviction} eviction, L = {window_}, "
                   f"{samples} sequences per row")
        if len(by_loops) == 1:
            (n, results), = by_loops.items()
            label = f"N = {n}"
            click.echo(format_table({label + " exact": results}, dname, "exact"))
            click.echo(format_table({label + " per-item": results}, dname, "token"))
            if json_path:
                write_json(json_path, {"checkpoint": checkpoint, "sleep": run_sleep.to_dict(),
                                       "task": task.to_dict(), "results": results})
            if plot_path:
                plot({label: results}, plot_path, f"{task.name}", dname)
            return
        # Several N: the demo's schema, results["N = n"][difficulty]
        named = {f"N = {n}": r for n, r in by_loops.items()}
        click.echo("exact match\n" + format_table(named, dname, "exact"))
        click.echo("per-item accuracy\n" + format_table(named, dname, "token"))
        if json_path:
            write_json(json_path, {"checkpoint": checkpoint, "loops": list(by_loops),
                                   "sleep": run_sleep.to_dict(), "task": task.to_dict(),
                                   "results": named})
        if plot_path:
            plot_against_loops(by_loops, plot_path, f"{task.name}: accuracy against test-time N",
                               dname, "token")

    _run_safely(go)


@main.command()
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--steps", type=int, default=None, help="Training steps per run (default: the demo's).")
@click.option("--loops", "-N", type=int, multiple=True, help="Loop counts to compare (default: the demo's).")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--seeds", type=click.IntRange(min=1, max=1000), default=None, help="Number of seeds: SEED, SEED+1, ... (default: the demo's).")
@click.option("--force", is_flag=True, help="Write into a directory holding other files (never "
              "replacing them).")
def demo(out, steps, loops, seed, seeds, force):
    """Train N = 1 and N > 1 on a small synthetic task over several seeds, evaluate, print the
    spread over seeds and plot it."""
    from .demo import run_demo

    _run_safely(lambda: run_demo(out, steps=steps, loops=tuple(loops) or None, seed=seed,
                                 seeds=seeds, echo=click.echo, force=force))


@main.group()
def data():
    """Build training files from benchmarks."""


@data.command("gsm-infinite")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The JSONL to write.")
@click.option("--subset", type=click.Choice(["symbolic", "medium", "hard"]), default="medium", show_default=True)
@click.option("--length", type=click.Choice(["0", "8k", "16k", "32k"]), default="8k", show_default=True)
@click.option("--ops", default="2-8", show_default=True, help="Op counts: 2,4,6,8 or a range 2-8.")
@click.option("--limit", type=int, default=None, help="Problems per op (default: all after --skip).")
@click.option("--skip", type=int, default=None, help="Skip the first K of each op, the test problems (default: 200 from the Hub, 0 with --data).")
@click.option("--data", "data_path", type=click.Path(dir_okay=False), default=None, help="A local JSONL in the dataset's schema instead of the Hub.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def data_gsm_infinite(out, subset, length, ops, limit, skip, data_path, force):
    """The paper-format fine-tuning file ({"prompt", "answer"} a line; question before context)."""
    from .gsm_infinite import write_data

    _run_safely(lambda: write_data(out, subset, length, ops, limit, skip, data_path, force,
                                   click.echo))


@main.command()
def doctor():
    """Show the platform, MLX, the BLAS in use and each Metal kernel's status."""
    from .doctor import report

    click.echo(report())


@main.command()
@click.option("--hf-path", required=True, help="Checkpoint directory or Hugging Face Hub id.")
@click.option("--out", "--mlx-path", "out", required=True, type=click.Path(file_okay=False),
              help="Output MLX model directory (written only when complete).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Weight dtype (default: the checkpoint's).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize (mlx-lm's affine quantization).")
@click.option("--q-bits", type=int, default=4, show_default=True)
@click.option("--q-group-size", type=int, default=64, show_default=True)
@click.option("--loops", "-N", type=int, default=None, help="Sleep passes N (default: 1).")
@click.option("--window", "-L", type=int, default=None, help="Sleep window L (default: 2000).")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None, help="Default: hard.")
@click.option("--core", default=None, metavar="START:STOP",
              help="Looped block range (default per architecture; see docs/models.md).")
@click.option("--insert-jet-layers", type=int, default=0, metavar="K",
              help="Ouro: insert K MLP-free Jet layers (outputs unchanged until fine-tuned).")
@click.option("--force", is_flag=True, help="Replace OUT if it is a model converted by mlx-sleep "
              "(never the source, the current directory or a parent of either).")
def convert(hf_path, out, dtype, quantize, q_bits, q_group_size, loops, window, eviction, core,
            insert_jet_layers, force):
    """Import a Jet-Nemotron, Ouro, Qwen3.5, Qwen3-Next or OLMo Hybrid checkpoint into an MLX
    model directory with sleep settings."""
    from .convert import convert as run_convert

    def go():
        path = run_convert(hf_path, out, dtype=dtype, quantize=quantize, q_bits=q_bits,
                           q_group_size=q_group_size, loops=loops, window=window,
                           eviction=eviction, core=_parse_core(core),
                           insert_jet_layers=insert_jet_layers, force=force)
        click.echo(f"saved to {path}")

    _run_safely(go)


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A converted model directory.")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help='JSONL of {"prompt","answer"}, {"text"} or {"messages"} records.')
@click.option("--valid", type=click.Path(dir_okay=False), default=None, help="Validation JSONL.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory (re-running the same command resumes).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per micro-batch (all processes).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=float, default=None, help="Learning rate (default: 1e-4 for LoRA/DoRA (AdamW), 2e-4 for --full (Muon)).")
@click.option("--adam-lr", type=float, default=1e-5, show_default=True, help="--full: AdamW rate for non-matrix weights.")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--grad-clip", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--loops", "-N", type=int, default=None, help="Sleep passes N (default: the model's).")
@click.option("--window", "-L", type=int, default=None, help="Window L (default: the model's).")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None, help="Default: the model's.")
@click.option("--core", default=None, metavar="START:STOP", help="Looped block range (default: the model's).")
@click.option("--full", is_flag=True, help="Train all weights instead of LoRA adapters.")
@click.option("--dora", is_flag=True, help="DoRA adapters instead of LoRA.")
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank.")
@click.option("--scale", type=float, default=20.0, show_default=True, help="LoRA scale.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--lora-layers", type=int, default=None, help="Adapters on the last K decoder layers (default: all).")
@click.option("--train-only", default=None, metavar="KINDS", help="Train only these layer kinds: jet,gdn,attn,mlp.")
@click.option("--hard-warmup", type=int, default=0, show_default=True, metavar="STEPS",
              help="Train the first STEPS with hard eviction, then the configured one.")
@click.option("--memory-bounded/--no-memory-bounded", default=True, show_default=True,
              help="Recompute one chunk at a time on backward (peak memory ~ one chunk).")
@click.option("--valid-every", type=int, default=100, show_default=True)
@click.option("--valid-batches", type=int, default=0, show_default=True, help="0: the whole file.")
@click.option("--checkpoint-every", type=int, default=100, show_default=True)
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--fuse", is_flag=True, help="Afterwards, merge the adapters into OUT/fused (a model directory).")
@click.option("--estimate", is_flag=True, help="Print the expected peak memory and time per step, then exit.")
def finetune(model_dir, data, valid, out, steps, batch_size, grad_accum, lr, adam_lr, weight_decay,
             warmup, grad_clip, seed, loops, window, eviction, core, full, dora, rank, scale,
             dropout, lora_layers, train_only, hard_warmup, memory_bounded, valid_every,
             valid_batches, checkpoint_every, log_every, fuse, estimate):
    """Fine-tune a converted model to sleep (LoRA/DoRA or full), on one Mac or several
    (launch with `mlx.launch`; see docs/finetune.md)."""
    from .finetune import Finetune, FinetuneConfig, estimate_step, format_estimate

    def go():
        if full and dora:
            raise ConfigError("--full and --dora exclude each other")
        kind = "full" if full else "dora" if dora else "lora"
        cfg = FinetuneConfig(
            steps=steps, batch_size=batch_size, grad_accum=grad_accum, fine_tune_type=kind,
            lr=lr if lr is not None else (2e-4 if full else 1e-4), adam_lr=adam_lr,
            weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip, seed=seed,
            rank=rank, scale=scale, dropout=dropout, lora_layers=lora_layers,
            train_only=train_only, hard_warmup=hard_warmup, memory_bounded=memory_bounded,
            valid_every=valid_every, valid_batches=valid_batches,
            checkpoint_every=checkpoint_every, log_every=log_every)
        sleep = dict(loops=loops, window=window, eviction=eviction)
        ft = Finetune(model_dir, data, out, cfg, sleep=sleep, core=_parse_core(core), valid=valid,
                      log=click.echo, dry_run=estimate)
        if estimate:
            click.echo(format_estimate(estimate_step(ft)))
            return
        if ft.step and ft.step < cfg.steps and ft.is_writer:
            click.echo(f"resuming {out} at step {ft.step}")
        ft.run()
        if ft.is_writer:
            click.echo(f"saved to {out}")
        if fuse and ft.is_writer:
            click.echo(f"fused model saved to {ft.fuse()}")

    _run_safely(go)


# -- generation, chat and sessions (docs/chat.md) ---------------------------------------------

def _sampling_options(fn):
    """The generation flags `generate` and `chat` share (mlx-lm's sampler and processors)."""
    options = [
        click.option("--max-tokens", "-m", type=int, default=512, show_default=True),
        click.option("--temp", type=float, default=0.0, show_default=True, help="0: greedy."),
        click.option("--top-p", type=float, default=0.0, help="Nucleus sampling (0: off)."),
        click.option("--top-k", type=int, default=0, help="Top-k sampling (0: off)."),
        click.option("--min-p", type=float, default=0.0, help="Min-p sampling (0: off)."),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None, help="Random seed for sampling."),
        click.option("--stop", multiple=True, help="Stop at this string (repeatable)."),
        click.option("--system-prompt", default=None),
        click.option("--window", "-L", type=int, default=None, help="Override the model's window L."),
        click.option("--loops", "-N", type=int, default=None, help="Override the sleep passes N."),
        click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _sleep_override(model, window, loops, eviction):
    """The model's sleep settings with the flags given applied, or None when none is given."""
    if window is None and loops is None and eviction is None:
        return None
    base = model.sleep_config
    return SleepConfig(loops=base.loops if loops is None else loops,
                       window=base.window if window is None else window,
                       eviction=eviction or base.eviction)


def _load_for_chat(model_path):
    from transformers.utils import logging as hf_logging

    from .loading import load
    from .weights import resolve_source

    hf_logging.set_verbosity_error()  # its "model of type hybrid" note is noise here
    path = resolve_source(model_path)
    model, tokenizer = load(path)
    return path, model, tokenizer


@main.command()
@click.option("--model", required=True, help="A converted model directory (or Hub id).")
@click.option("--prompt", "-p", required=True, help="The prompt ('-' reads stdin).")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as is.")
@_sampling_options
def generate(model, prompt, no_chat_template, max_tokens, temp, top_p, top_k, min_p,
             repetition_penalty, seed, stop, system_prompt, window, loops, eviction):
    """Generate a reply to one prompt, streamed, over the sleep engine."""
    import time

    import mlx.core as mx

    from .generate import Reply, chat_prompt, make_sampling, stream_reply
    from .sleep import SleepEngine

    def go():
        path, m, tokenizer = _load_for_chat(model)
        text = sys.stdin.read() if prompt == "-" else prompt
        if not no_chat_template:
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) \
                + [{"role": "user", "content": text}]
            text = chat_prompt(tokenizer, messages)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if seed is not None:
            mx.random.seed(seed)
        sampler, processors = make_sampling(temp, top_p, top_k, min_p, repetition_penalty)
        engine = SleepEngine(m, _sleep_override(m, window, loops, eviction))
        reply, start = Reply(), time.perf_counter()
        for piece in stream_reply(engine, tokenizer, ids, max_tokens, stop, reply=reply,
                                  sampler=sampler, logits_processors=processors):
            click.echo(piece, nl=False)
        click.echo()
        took = time.perf_counter() - start
        click.echo(f"[{len(ids)} prompt + {len(reply.tokens)} generated tokens in {took:.2f} s, "
                   f"stopped: {reply.stopped}, {engine.sleeps} consolidations]", err=True)

    _run_safely(go)


@main.command()
@click.option("--model", default=None, help="A converted model directory (default: the session's).")
@click.option("--session", "-s", "session_name", default="default", show_default=True)
@click.option("--history", type=int, default=3, show_default=True,
              help="Consolidations /forget can roll back.")
@click.option("--idle-delay", type=float, default=60.0, show_default=True,
              help="Sleep after this many quiet seconds (0: never).")
@click.option("--idle-fill", type=float, default=0.5, show_default=True,
              help="...if the window is at least this full.")
@_sampling_options
def chat(model, session_name, history, idle_delay, idle_fill, max_tokens, temp, top_p, top_k,
         min_p, repetition_penalty, seed, stop, system_prompt, window, loops, eviction):
    """Chat with a model; the session (memory included) is saved and resumed by name."""
    import mlx.core as mx

    from .chat import Chat
    from .session import open_session, read_meta, session_path

    def go():
        import os
        model_path = model
        if model_path is None:
            if not os.path.isfile(os.path.join(session_path(session_name), "session.json")):
                raise Failure(f"session {session_name!r} does not exist yet: pass --model DIR")
            model_path = read_meta(session_name)["model"]["path"]
        path, m, tokenizer = _load_for_chat(model_path)
        session = open_session(session_name, m, path, _sleep_override(m, window, loops, eviction),
                               history, system_prompt)
        if system_prompt and session.meta.get("generation"):
            click.echo("[--system-prompt applies to new sessions; this one keeps its own]", err=True)
        if seed is not None:
            mx.random.seed(seed)
        try:
            Chat(session, tokenizer, max_tokens=max_tokens, stop=stop, idle_delay=idle_delay,
                 idle_fill=idle_fill, sampling=dict(temp=temp, top_p=top_p, top_k=top_k,
                                                    min_p=min_p,
                                                    repetition_penalty=repetition_penalty)).run()
        finally:
            session.close()

    _run_safely(go)


@main.group()
def sessions():
    """List, show, export and remove saved chat sessions ($MLX_SLEEP_HOME, default ~/.mlx_sleep)."""


@sessions.command("list")
def sessions_list():
    """One line per session."""
    import datetime
    import os

    from .session import list_sessions, read_meta, sessions_dir

    def go():
        names = list_sessions()
        if not names:
            click.echo(f"no sessions in {sessions_dir()}")
        for name in names:
            try:
                meta = read_meta(name)
            except ValueError as e:
                click.echo(f"{name}: {e}")
                continue
            e, L = meta["engine"], meta["sleep"]["window"]
            saved = datetime.datetime.fromtimestamp(meta["saved"]).strftime("%Y-%m-%d %H:%M")
            click.echo(f"{name}: {e['offset']} tokens, window {e['offset'] - e['window_start']}/{L}, "
                       f"{e['sleeps']} consolidations, {len(meta['transcript']['messages'])} "
                       f"messages, {meta['state_bytes'] / (1 << 20):.1f} MiB, saved {saved}, "
                       f"model {os.path.basename(meta['model']['path'])}")

    _run_safely(go)


@sessions.command("show")
@click.argument("name")
def sessions_show(name):
    """The settings and the transcript of one session."""
    from .session import read_meta

    def go():
        meta = read_meta(name)
        e = meta["engine"]
        click.echo(f"session {name}: model {meta['model']['path']} "
                   f"(fingerprint {meta['model']['fingerprint']}, weights {meta['model']['weights']})")
        click.echo(f"sleep {meta['sleep']}, {e['offset']} tokens, window "
                   f"{e['offset'] - e['window_start']}, {e['sleeps']} consolidations, "
                   f"format {meta['format']}")
        for m in meta["transcript"]["messages"]:
            click.echo(f"{m['role']}: {m['content']}")

    _run_safely(go)


@sessions.command("export")
@click.argument("name")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="Write the transcript JSON here (default: stdout).")
def sessions_export(name, out):
    """The transcript and settings as JSON (no weights, no state)."""
    import os

    from .io import write_json
    from .session import read_meta

    def go():
        meta = read_meta(name)
        doc = {k: meta[k] for k in ("name", "model", "sleep", "engine", "created", "saved")
               if k in meta}
        doc["messages"] = meta["transcript"]["messages"]
        if out is None:
            click.echo(json.dumps(doc, indent=2))
        elif os.path.exists(out):
            raise Failure(f"{out} exists; choose another --out")
        else:
            write_json(out, doc, mode=0o600)
            click.echo(f"wrote {out}")

    _run_safely(go)


@sessions.command("rm")
@click.argument("name")
def sessions_rm(name):
    """Remove a session and its memory."""
    from .session import remove_session

    _run_safely(lambda: (remove_session(name), click.echo(f"removed session {name}")))


@main.command()
@click.option("--session", "-s", "names", multiple=True, help="A session (repeatable).")
@click.option("--all", "all_sessions", is_flag=True, help="Every saved session.")
@click.option("--min-fill", type=float, default=0.5, show_default=True,
              help="Only windows at least this full.")
@click.option("--when-idle", is_flag=True, help="Wait until the machine is idle; yield when it is not.")
@click.option("--idle-source", default="auto", show_default=True,
              help="auto, mac, load or file:PATH (idle while PATH holds 'idle').")
@click.option("--idle-seconds", type=float, default=300, show_default=True,
              help="mac: no input for this long.")
@click.option("--max-load", type=float, default=0.3, show_default=True,
              help="load: 1-minute load average per core below this.")
@click.option("--poll", type=float, default=30, show_default=True, help="Seconds between idle checks.")
@click.option("--max-wait", type=float, default=None, help="Give up waiting after this many seconds.")
def consolidate(names, all_sessions, min_fill, when_idle, idle_source, idle_seconds, max_load,
                poll, max_wait):
    """Consolidate saved sessions' live windows (sleep outside the chat)."""
    from .idle import idle_source as make_idle_source
    from .session import consolidate_sessions, list_sessions

    def go():
        chosen = list_sessions() if all_sessions else list(names)
        if not chosen:
            raise Failure("name sessions with --session NAME, or pass --all")
        idle = make_idle_source(idle_source, idle_seconds, max_load) if when_idle else None
        consolidate_sessions(chosen, min_fill, idle, poll, max_wait, echo=click.echo)

    _run_safely(go)


@main.group()
def schedule():
    """Run `consolidate --all --when-idle` periodically in the background."""


def _schedule_command(interval):
    import shutil
    exe = shutil.which("mlx-sleep") or sys.argv[0]
    return [exe, "consolidate", "--all", "--when-idle", "--max-wait", str(max(60, interval // 2))]


def _agent_label(path):
    """The Label of the launchd agent at `path` (None if it is not a readable plist)."""
    import plistlib
    from xml.parsers.expat import ExpatError

    try:
        with open(path, "rb") as f:
            return plistlib.load(f).get("Label")
    except (OSError, ValueError, ExpatError, AttributeError):
        return None


@schedule.command("install")
@click.option("--interval", type=int, default=1800, show_default=True, help="Seconds between runs.")
@click.option("--print", "print_only", is_flag=True, help="Print the agent/units, install nothing.")
def schedule_install(interval, print_only):
    """macOS: write and load a launchd agent; elsewhere: print the systemd user timer."""
    import os
    import subprocess

    from .idle import LABEL, launchd_path, launchd_plist, systemd_units
    from .io import atomic_path

    command = _schedule_command(interval)
    if sys.platform != "darwin":
        click.echo(systemd_units(command, interval))
        return
    plist = launchd_plist(command, interval)
    if print_only:
        click.echo(plist.decode())
        return
    path = launchd_path()
    if os.path.exists(path) and _agent_label(path) != LABEL:
        raise Failure(f"{path} exists and was not written by mlx-sleep; leaving it (move it "
                      "away to install ours)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path, 0o644) as tmp:
        with open(tmp, "wb") as f:
            f.write(plist)
    subprocess.run(["launchctl", "bootout", f"gui/{os.getuid()}", path], capture_output=True)
    loaded = subprocess.run(["launchctl", "bootstrap", f"gui/{os.getuid()}", path],
                            capture_output=True, text=True)
    click.echo(f"installed {path} (every {interval} s)")
    if loaded.returncode != 0:
        click.echo(f"warning: launchctl bootstrap failed ({loaded.stderr.strip()}); it loads at "
                   "the next login, or run: launchctl bootstrap gui/$(id -u) " + path, err=True)


@schedule.command("remove")
def schedule_remove():
    """Unload and delete the launchd agent `schedule install` wrote."""
    import os
    import subprocess

    from .idle import LABEL, launchd_path

    if sys.platform != "darwin":
        click.echo("systemctl --user disable --now mlx-sleep-consolidate.timer && rm "
                   "~/.config/systemd/user/mlx-sleep-consolidate.{service,timer}")
        return
    path = launchd_path()
    if not os.path.exists(path):
        raise Failure(f"no agent at {path}: nothing to remove")
    if _agent_label(path) != LABEL:
        raise Failure(f"{path} was not written by mlx-sleep; leaving it")
    subprocess.run(["launchctl", "bootout", f"gui/{os.getuid()}", path], capture_output=True)
    os.remove(path)
    click.echo(f"removed {path}")


if __name__ == "__main__":
    sys.exit(main())
