"""`mlx-sleep train`, `eval` and `demo`: training from scratch on the synthetic tasks and
evaluating runs and models."""

import click

from ..config import MAX_LOOPS, ConfigError, ModelConfig, SleepConfig, parse_depth_losses
from .common import (
    BATCH,
    SEED,
    STEPS,
    Failure,
    MEMORY_BOUND,
    MEMORY_BOUND_HELP,
    Finite,
    PathArg,
    Text,
    count,
    depth_loss_options,
    memory_bound_flag,
    parse_core,
    parse_loops_list,
    parse_options,
    refuse_unused,
    run_safely,
)

# eval's three paths and the flags each reads (anything else given is refused)
RUN_FLAGS = {"checkpoint", "samples", "batch_size", "seed", "tolerance", "json_path", "plot_path"}
GSM_FLAGS = {
    "model_path",
    "task_name",
    "subset",
    "length",
    "ops",
    "limit",
    "data",
    "max_tokens",
    "adapter",
}
SCORE_FLAGS = {"score_path", "protocol", "judge_model", "judge_max_tokens", "out"}
SLEEP_FLAGS = {"loops", "window", "eviction"}

# The paper's full settings (for a Mac GPU; far beyond a CPU): Section "Models in the paper".
PAPER_PRESETS = {
    "rule110": dict(
        model=dict(hidden_size=256, layers="attn,gdn,attn,gdn", num_heads=8),
        task=dict(n_strings=4, n_bits=24, steps=32),
        train=dict(batch_size=512, lr=2e-3, adam_lr=5e-5),
    ),
    "depo": dict(
        model=dict(
            hidden_size=512, layers="attn,gdn,attn,gdn,attn,gdn,attn,gdn,attn,gdn", num_heads=8
        ),
        task=dict(max_nodes=75, max_hops=16, n_queries=10, window=75, context_len=300),
        train=dict(batch_size=128, lr=2e-3, adam_lr=5e-5),
    ),
}


@click.command()
@click.option("--task", "task_name", type=click.Choice(["rule110", "depo"]), required=True)
@click.option(
    "--loops",
    "-N",
    type=count(1, MAX_LOOPS),
    default=None,
    help="Sleep passes N per context window (default: 1; with --loops-sample, its B).",
)
@click.option(
    "--loops-sample",
    default=None,
    metavar="A:B",
    help="Draw N per batch uniformly in [A, B] (test-time depth dial).",
)
@click.option("--window", "-L", type=count(1), default=None, help="Window L (default: the task's).")
@click.option(
    "--eviction", type=click.Choice(["hard", "sliding"]), default=None, help="Default: the task's."
)
@click.option(
    "--out",
    required=True,
    type=PathArg(file_okay=False),
    help="Run directory (resumes if it holds a run).",
)
@click.option(
    "--task-option",
    "-o",
    multiple=True,
    metavar="KEY=VALUE",
    help="Task setting, e.g. -o n_bits=8 -o steps=4.",
)
@click.option("--hidden-size", type=count(1), default=128, show_default=True)
@click.option(
    "--layers",
    type=Text(),
    default="attn,gdn,attn,gdn",
    show_default=True,
    help="Block pattern (attn, swa, gdn, jet).",
)
@click.option("--heads", type=count(1), default=4, show_default=True)
@click.option("--kv-heads", type=count(1), default=None)
@click.option(
    "--core", default=None, metavar="START:STOP", help="Looped block range (default: all)."
)
@click.option("--steps", type=STEPS, default=1000, show_default=True)
@click.option("--batch-size", type=BATCH, default=64, show_default=True)
@click.option(
    "--lr",
    type=Finite(0, above=True),
    default=2e-3,
    show_default=True,
    help="Muon learning rate (matrix weights).",
)
@click.option(
    "--adam-lr",
    type=Finite(0, above=True),
    default=5e-5,
    show_default=True,
    help="AdamW learning rate (other weights).",
)
@click.option("--weight-decay", type=Finite(0), default=0.0, show_default=True)
@click.option("--warmup", type=count(0), default=50, show_default=True)
@click.option("--grad-clip", type=Finite(0, above=True), default=1.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--eval-every", type=count(0), default=0, help="Evaluate every K steps (0: at the end)."
)
@click.option("--eval-samples", type=count(1), default=256, show_default=True)
@click.option("--checkpoint-every", type=count(1), default=200, show_default=True)
@click.option(
    "--memory-bound", type=MEMORY_BOUND, default=None, help=MEMORY_BOUND_HELP + "  [default: none]"
)
@click.option(
    "--activation-checkpoint", is_flag=True, help="The older form of --memory-bound chunk."
)
@click.option("--random-chunks", is_flag=True, help="Train with random chunk lengths <= L.")
@depth_loss_options
@click.option(
    "--compile/--no-compile", default=None, help="mx.compile the step (default: on with Metal)."
)
@click.option(
    "--paper", is_flag=True, help="The paper's full model/task/batch settings (for a Mac GPU)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into a directory holding other files (never "
    "replacing them); train what may not fit in memory. See docs/files.md.",
)
def train(
    task_name,
    loops,
    loops_sample,
    window,
    eviction,
    out,
    task_option,
    hidden_size,
    layers,
    heads,
    kv_heads,
    core,
    steps,
    batch_size,
    lr,
    adam_lr,
    weight_decay,
    warmup,
    grad_clip,
    seed,
    eval_every,
    eval_samples,
    checkpoint_every,
    memory_bound,
    activation_checkpoint,
    random_chunks,
    depth_losses,
    depth_losses_from,
    compile,
    paper,
    force,
):
    """Train a hybrid from scratch on a synthetic task with N sleep loops."""
    from ..tasks import get_task
    from ..train import TrainConfig, Trainer, default_compile

    if paper:
        refuse_unused(
            {"hidden_size", "layers", "heads", "batch_size", "lr", "adam_lr"},
            "with --paper (it sets the paper's model and batch)",
        )
    memory_bound = memory_bound_flag(
        memory_bound, activation_checkpoint or None, "--activation-checkpoint", "none"
    )

    def go():
        model_kw = dict(
            hidden_size=hidden_size,
            layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            core=parse_core(core),
        )
        task_kw = {}
        train_kw = dict(batch_size=batch_size, lr=lr, adam_lr=adam_lr)
        if paper:
            preset = PAPER_PRESETS[task_name]
            model_kw.update(preset["model"])
            task_kw.update(preset["task"])
            train_kw.update(preset["train"])
        task_kw.update(parse_options(task_option))
        task = get_task(task_name, **task_kw)
        sample = parse_core(loops_sample, "--loops-sample", "A:B") if loops_sample else None
        n = loops if loops is not None else (sample[1] if sample else 1)
        sleep = SleepConfig(
            loops=n,
            window=task.window if window is None else window,
            eviction=eviction or task.eviction,
        )
        model_cfg = ModelConfig(vocab_size=task.vocab_size, **model_kw)
        cfg = TrainConfig(
            steps=steps,
            weight_decay=weight_decay,
            warmup=warmup,
            grad_clip=grad_clip,
            seed=seed,
            eval_every=eval_every,
            eval_samples=eval_samples,
            checkpoint_every=checkpoint_every,
            memory_bound=memory_bound,
            random_chunks=random_chunks,
            loops_sample=sample,
            depth_losses=parse_depth_losses(depth_losses) if depth_losses else None,
            depth_losses_from=depth_losses_from,
            compile=default_compile() if compile is None else compile,
            **train_kw,
        )
        trainer = Trainer(out, model_cfg, sleep, task, cfg, force=force)
        if trainer.step:
            click.echo(f"resuming {out} at step {trainer.step}")
        trainer.run()
        click.echo(f"saved to {out}")

    run_safely(go)


def gsm_infinite_options(fn):
    """The options of `eval --task gsm-infinite` (see docs/gsm-infinite.md)."""
    options = [
        click.option(
            "--model",
            "model_path",
            type=Text(),
            default=None,
            help="gsm-infinite: a converted model directory (or Hub id).",
        ),
        click.option(
            "--task",
            "task_name",
            type=click.Choice(["gsm-infinite"]),
            default=None,
            help="Evaluate a model on a benchmark instead of a training run.",
        ),
        click.option(
            "--subset",
            type=click.Choice(["symbolic", "medium", "hard"]),
            default="medium",
            show_default=True,
        ),
        click.option(
            "--length",
            type=click.Choice(["0", "8k", "16k", "32k"]),
            default="8k",
            show_default=True,
        ),
        click.option(
            "--ops",
            type=Text(),
            default="2,4,6,8",
            show_default=True,
            help="Op counts: 2,4,6,8 or a range 2-8 (2-8:2).",
        ),
        click.option(
            "--limit",
            type=count(0),
            default=None,
            help="Problems per op (default: all in --data; from the Hub the official 100 / 200).",
        ),
        click.option(
            "--data",
            type=PathArg(dir_okay=False),
            default=None,
            help="A local JSONL in the dataset's schema instead of the Hub.",
        ),
        click.option(
            "--protocol",
            type=click.Choice(["paper", "official"]),
            default="paper",
            show_default=True,
        ),
        click.option(
            "--max-tokens",
            type=count(1),
            default=None,
            help="Generation limit (default: paper 24, symbolic 256; official 4096).",
        ),
        click.option(
            "--judge-model",
            type=Text(),
            default=None,
            help="Symbolic, official protocol: the judge model (any model `load` opens).",
        ),
        click.option(
            "--judge-max-tokens",
            type=count(1),
            default=2048,
            show_default=True,
            help="The judge's generation limit (upstream's).",
        ),
        click.option(
            "--adapter",
            default=None,
            type=PathArg(file_okay=False),
            help="A fine-tune's adapter directory.",
        ),
        click.option(
            "--out",
            default=None,
            type=PathArg(file_okay=False),
            help="Results directory (resumes the run in it).",
        ),
        click.option(
            "--score",
            "score_path",
            default=None,
            type=PathArg(dir_okay=False),
            help="Re-score a predictions JSONL (no model).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.command("eval")
@click.option("--checkpoint", type=PathArg(), default=None, help="A run directory from `train`.")
@click.option(
    "--loops",
    "-N",
    default=None,
    metavar="N[,N...]",
    help="Override the sleep loops N; several (1,2,4) evaluate each: a run's table gets a "
    "column per N and --plot draws accuracy against N; gsm-infinite sweeps them.",
)
@click.option("--window", "-L", type=count(1), default=None, help="Override the window L.")
@click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None)
@click.option(
    "--samples",
    type=count(1, 1 << 24),
    default=512,
    show_default=True,
    help="Sequences per difficulty.",
)
@click.option("--batch-size", type=BATCH, default=64, show_default=True)
@click.option("--seed", type=SEED, default=1234, show_default=True)
@click.option(
    "--tolerance",
    type=Finite(0, 1e6),
    default=None,
    help="Sleep as deep as it helps: a window's passes stop once one changes the fast weights "
    "by less than this (relative); --loops is then the most. Reports the passes run.",
)
@click.option(
    "--json", "json_path", type=PathArg(dir_okay=False), default=None, help="Write results here."
)
@click.option(
    "--plot", "plot_path", type=PathArg(dir_okay=False), default=None, help="Write a PNG plot here."
)
@gsm_infinite_options
def eval_cmd(
    checkpoint,
    loops,
    window,
    eviction,
    samples,
    batch_size,
    seed,
    tolerance,
    json_path,
    plot_path,
    task_name,
    **gsm,
):
    """Accuracy by difficulty (t for Rule 110, hops k for Depo) of a trained run, or a model on
    GSM-Infinite (--model DIR --task gsm-infinite).

    With several --loops (e.g. 1,2,3,4,6) a run is evaluated at each N: one column per N, and
    --plot draws accuracy against N, one line per difficulty."""
    from ..eval import evaluate, format_table, plot, plot_against_loops
    from ..io import WRITTEN_BY, check_output_file, write_json
    from ..train import load_run

    if gsm["score_path"]:
        refuse_unused(RUN_FLAGS | GSM_FLAGS | SLEEP_FLAGS, "with --score (it re-scores a file)")
    elif task_name == "gsm-infinite":
        refuse_unused(RUN_FLAGS, "with --task gsm-infinite (they are for --checkpoint RUN)")
    else:
        refuse_unused(
            GSM_FLAGS | SCORE_FLAGS,
            "with --checkpoint RUN (they are for --task gsm-infinite or --score)",
        )
    if task_name == "gsm-infinite" or gsm["score_path"]:
        from ..gsm_infinite import run_cli

        loops_list = parse_loops_list(loops) if loops is not None else None
        return run_safely(
            lambda: run_cli(
                loops=loops_list, window=window, eviction=eviction, echo=click.echo, **gsm
            )
        )
    if checkpoint is None:
        raise Failure("pass --checkpoint RUN (a training run), or --model DIR --task gsm-infinite")

    def go():
        loops_list = parse_loops_list(loops) if loops is not None else None
        for path in (json_path, plot_path):  # before the work, not after it
            if path:
                check_output_file(path, inputs=(checkpoint,))
        model, sleep, task, _ = load_run(checkpoint)
        window_ = sleep.window if window is None else window
        if window_ > task.seq_len:
            raise ConfigError(
                f"window L={window_} is larger than the sequence length T={task.seq_len}"
            )
        by_loops = {}
        for n in loops_list or [sleep.loops]:
            run_sleep = SleepConfig(loops=n, window=window_, eviction=eviction or sleep.eviction)
            by_loops[n] = evaluate(
                model,
                task,
                run_sleep,
                samples,
                batch_size,
                seed,
                progress=True,
                tolerance=tolerance,
            )
        dname = "t (steps)" if task.name == "rule110" else "k (hops)"
        click.echo(
            f"{task.name}, {run_sleep.eviction} eviction, L = {window_}, "
            f"{samples} sequences per row"
        )
        if tolerance is not None:
            import numpy as np

            from ..report import markdown_table

            click.echo(
                markdown_table(
                    ["at most", "mean passes per sleeping window"],
                    [
                        [f"N = {n}", f"{np.mean([r['passes'] for r in res.values()]):.2f}"]
                        for n, res in by_loops.items()
                    ],
                )
                + f"\n(tolerance {tolerance:g})"
            )
        if len(by_loops) == 1:
            ((n, results),) = by_loops.items()
            label = f"N = {n}"
            click.echo(format_table({label + " exact": results}, dname, "exact"))
            click.echo(format_table({label + " per-item": results}, dname, "token"))
            if json_path:
                write_json(
                    json_path,
                    {
                        "checkpoint": checkpoint,
                        "sleep": run_sleep.to_dict(),
                        "task": task.to_dict(),
                        "results": results,
                        "written_by": f"{WRITTEN_BY} eval",
                    },
                )
            if plot_path:
                plot({label: results}, plot_path, f"{task.name}", dname)
            return
        # Several N: the demo's schema, results["N = n"][difficulty]
        named = {f"N = {n}": r for n, r in by_loops.items()}
        click.echo("exact match\n" + format_table(named, dname, "exact"))
        click.echo("per-item accuracy\n" + format_table(named, dname, "token"))
        if json_path:
            write_json(
                json_path,
                {
                    "checkpoint": checkpoint,
                    "loops": list(by_loops),
                    "sleep": run_sleep.to_dict(),
                    "task": task.to_dict(),
                    "results": named,
                    "written_by": f"{WRITTEN_BY} eval",
                },
            )
        if plot_path:
            plot_against_loops(
                by_loops, plot_path, f"{task.name}: accuracy against test-time N", dname, "token"
            )

    run_safely(go)


@click.command()
@click.option("--out", default="demo_out", show_default=True, type=PathArg(file_okay=False))
@click.option(
    "--steps", type=STEPS, default=None, help="Training steps per run (default: the demo's)."
)
@click.option(
    "--loops",
    "-N",
    type=count(1, MAX_LOOPS),
    multiple=True,
    help="Loop counts to compare (default: the demo's).",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="First seed.")
@click.option(
    "--seeds",
    type=count(1, 1000),
    default=None,
    help="Number of seeds: SEED, SEED+1, ... (default: the demo's).",
)
@click.option(
    "--compute-matched/--no-compute-matched",
    default=None,
    help="Also train N = 1 for N_max times the steps (default: on).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into a directory holding other files (never replacing them).",
)
def demo(out, steps, loops, seed, seeds, compute_matched, force):
    """Train N = 1 and N > 1 on a small synthetic task over several seeds, evaluate, print the
    spread over seeds and plot it."""
    from ..demo import run_demo

    run_safely(
        lambda: run_demo(
            out,
            steps=steps,
            loops=tuple(loops) or None,
            seed=seed,
            seeds=seeds,
            echo=click.echo,
            force=force,
            compute_matched=compute_matched,
        )
    )
