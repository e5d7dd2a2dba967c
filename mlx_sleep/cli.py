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


def _run_safely(fn):
    """Turn expected errors (bad settings, missing files) into one clear line, not a traceback."""
    try:
        return fn()
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as e:
        raise Failure(str(e)) from None


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
    if not loops or min(loops) < 1:
        raise click.BadParameter(f"{value!r} is not a list of loop counts >= 1 (e.g. 1,2,4)",
                                 param_hint="--loops")
    return list(dict.fromkeys(loops))


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
def train(task_name, loops, loops_sample, window, eviction, out, task_option, hidden_size, layers, heads,
          kv_heads, core, steps, batch_size, lr, adam_lr, weight_decay, warmup, grad_clip, seed,
          eval_every, eval_samples, checkpoint_every, activation_checkpoint, random_chunks,
          compile, paper):
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
        trainer = Trainer(out, model_cfg, sleep, task, cfg)
        if trainer.step:
            click.echo(f"resuming {out} at step {trainer.step}")
        trainer.run()
        click.echo(f"saved to {out}")

    _run_safely(go)


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A run directory from `train`.")
@click.option("--loops", "-N", default=None, metavar="N[,N...]", help="Override the sleep loops N; several (1,2,4) evaluate each and plot accuracy against N.")
@click.option("--window", "-L", type=int, default=None, help="Override the window L.")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None)
@click.option("--samples", type=int, default=512, show_default=True, help="Sequences per difficulty.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Write a PNG plot here.")
def eval_cmd(checkpoint, loops, window, eviction, samples, batch_size, seed, json_path, plot_path):
    """Accuracy by difficulty (t for Rule 110, hops k for Depo) of a trained run.

    With several --loops (e.g. 1,2,3,4,6) the same checkpoint is evaluated at each N: one column
    per N, and --plot draws accuracy against N, one line per difficulty."""
    from .eval import evaluate, format_table, plot, plot_against_loops
    from .io import write_json
    from .train import load_run

    loops_list = _parse_loops_list(loops) if loops is not None else None

    def go():
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
@click.option("--seeds", type=click.IntRange(min=1), default=None, help="Number of seeds: SEED, SEED+1, ... (default: the demo's).")
def demo(out, steps, loops, seed, seeds):
    """Train N = 1 and N > 1 on a small synthetic task over several seeds, evaluate, print the
    spread over seeds and plot it."""
    from .demo import run_demo

    _run_safely(lambda: run_demo(out, steps=steps, loops=tuple(loops) or None, seed=seed,
                                 seeds=seeds, echo=click.echo))


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
              help="Looped block range (default per architecture; see README).")
@click.option("--insert-jet-layers", type=int, default=0, metavar="K",
              help="Ouro: insert K MLP-free Jet layers (outputs unchanged until fine-tuned).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
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


if __name__ == "__main__":
    sys.exit(main())
