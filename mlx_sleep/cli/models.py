"""`mlx-sleep convert`, `finetune`, `data` and `doctor`: bringing models in and adapting them."""

import click

from ..config import ConfigError
from ..config import MAX_LOOPS, parse_depth_losses
from .common import (
    BATCH,
    GRAD_ACCUM,
    MEMORY_BOUND,
    MEMORY_BOUND_HELP,
    SEED,
    STEPS,
    Finite,
    PathArg,
    Text,
    count,
    depth_loss_options,
    memory_bound_flag,
    parse_core,
    refuse_unused,
    run_safely,
)


@click.group()
def data():
    """Build training files from benchmarks."""


@data.command("gsm-infinite")
@click.option("--out", required=True, type=PathArg(dir_okay=False), help="The JSONL to write.")
@click.option(
    "--subset",
    type=click.Choice(["symbolic", "medium", "hard"]),
    default="medium",
    show_default=True,
)
@click.option(
    "--length", type=click.Choice(["0", "8k", "16k", "32k"]), default="8k", show_default=True
)
@click.option(
    "--ops",
    type=Text(),
    default=None,
    help="Op counts: 2,4,6,8 or a range 2-8 (default: every op in --data; from the Hub, 2-8).",
)
@click.option(
    "--limit", type=count(0), default=None, help="Problems per op (default: all after --skip)."
)
@click.option(
    "--skip",
    type=count(0),
    default=None,
    help="Skip the first K of each op, the test problems (default: 200 from the Hub, 0 with --data).",
)
@click.option(
    "--data",
    "data_path",
    type=PathArg(dir_okay=False),
    default=None,
    help="A local JSONL in the dataset's schema instead of the Hub.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def data_gsm_infinite(out, subset, length, ops, limit, skip, data_path, force):
    """The paper-format fine-tuning file ({"prompt", "answer"} a line; question before context)."""
    from ..gsm_infinite import write_data

    if data_path is not None:
        refuse_unused({"subset", "length"}, "with --data (the file is the data)")

    run_safely(
        lambda: write_data(out, subset, length, ops, limit, skip, data_path, force, click.echo)
    )


@click.command()
def doctor():
    """Show the platform, MLX, the BLAS in use and each Metal kernel's status."""
    from ..doctor import report

    click.echo(report())


@click.command()
@click.option(
    "--hf-path", required=True, type=Text(), help="Checkpoint directory or Hugging Face Hub id."
)
@click.option(
    "--out",
    "--mlx-path",
    "out",
    required=True,
    type=PathArg(file_okay=False),
    help="Output MLX model directory (written only when complete).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default=None,
    help="Weight dtype (default: the checkpoint's).",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize (mlx-lm's affine quantization).")
@click.option(
    "--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True
)
@click.option(
    "--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True
)
@click.option(
    "--loops", "-N", type=count(1, MAX_LOOPS), default=None, help="Sleep passes N (default: 1)."
)
@click.option("--window", "-L", type=count(1), default=None, help="Sleep window L (default: 2000).")
@click.option(
    "--eviction", type=click.Choice(["hard", "sliding"]), default=None, help="Default: hard."
)
@click.option(
    "--core",
    default=None,
    metavar="START:STOP",
    help="Looped block range (default per architecture; see docs/models.md).",
)
@click.option(
    "--insert-jet-layers",
    type=count(0),
    default=0,
    metavar="K",
    help="Ouro: insert K MLP-free Jet layers (outputs unchanged until fine-tuned).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace OUT if it is a model converted by mlx-sleep "
    "(never the source, the current directory or a parent of either).",
)
def convert(
    hf_path,
    out,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    loops,
    window,
    eviction,
    core,
    insert_jet_layers,
    force,
):
    """Import a Jet-Nemotron, Ouro, Qwen3.5, Qwen3-Next or OLMo Hybrid checkpoint into an MLX
    model directory with sleep settings."""
    from ..convert import convert as run_convert
    from ..loading import has_tokenizer, missing_tokenizer

    if not quantize:
        refuse_unused({"q_bits", "q_group_size"}, "without -q")

    def go():
        path = run_convert(
            hf_path,
            out,
            dtype=dtype,
            quantize=quantize,
            q_bits=int(q_bits),
            q_group_size=int(q_group_size),
            loops=loops,
            window=window,
            eviction=eviction,
            core=parse_core(core),
            insert_jet_layers=insert_jet_layers,
            force=force,
        )
        click.echo(f"saved to {path}")
        if not has_tokenizer(path):
            click.echo(f"warning: {missing_tokenizer(path)}", err=True)

    run_safely(go)


@click.command()
@click.option(
    "--model", "model_dir", required=True, type=PathArg(), help="A converted model directory."
)
@click.option(
    "--data",
    required=True,
    type=PathArg(dir_okay=False),
    help='JSONL of {"prompt","answer"}, {"text"} or {"messages"} records.',
)
@click.option("--valid", type=PathArg(dir_okay=False), default=None, help="Validation JSONL.")
@click.option(
    "--out",
    required=True,
    type=PathArg(file_okay=False),
    help="Run directory (re-running the same command resumes).",
)
@click.option("--steps", type=STEPS, default=1000, show_default=True)
@click.option(
    "--batch-size",
    type=BATCH,
    default=4,
    show_default=True,
    help="Sequences per micro-batch (all processes).",
)
@click.option(
    "--grad-accum", type=GRAD_ACCUM, default=1, show_default=True, help="Micro-batches per step."
)
@click.option(
    "--lr",
    type=Finite(0, above=True),
    default=None,
    help="Learning rate (default: 1e-4 for LoRA/DoRA (AdamW), 2e-4 for --full (Muon)).",
)
@click.option(
    "--adam-lr",
    type=Finite(0, above=True),
    default=1e-5,
    show_default=True,
    help="--full: AdamW rate for non-matrix weights.",
)
@click.option("--weight-decay", type=Finite(0), default=0.0, show_default=True)
@click.option("--warmup", type=count(0), default=20, show_default=True)
@click.option("--grad-clip", type=Finite(0, above=True), default=1.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option(
    "--loops",
    "-N",
    type=count(1, MAX_LOOPS),
    default=None,
    help="Sleep passes N (default: the model's).",
)
@click.option(
    "--window", "-L", type=count(1), default=None, help="Window L (default: the model's)."
)
@click.option(
    "--eviction", type=click.Choice(["hard", "sliding"]), default=None, help="Default: the model's."
)
@click.option(
    "--core", default=None, metavar="START:STOP", help="Looped block range (default: the model's)."
)
@click.option("--full", is_flag=True, help="Train all weights instead of LoRA adapters.")
@click.option("--dora", is_flag=True, help="DoRA adapters instead of LoRA.")
@click.option("--rank", type=count(1), default=8, show_default=True, help="LoRA rank.")
@click.option(
    "--scale", type=Finite(0, 1e6, above=True), default=20.0, show_default=True, help="LoRA scale."
)
@click.option(
    "--dropout", type=Finite(0, 0.999), default=0.0, show_default=True, help="LoRA dropout."
)
@click.option(
    "--lora-layers",
    type=count(1),
    default=None,
    help="Adapters on the last K decoder layers (default: all).",
)
@click.option(
    "--train-only",
    type=Text(),
    default=None,
    metavar="KINDS",
    help="Train only these layer kinds: jet,gdn,attn,mlp.",
)
@click.option(
    "--hard-warmup",
    type=count(0),
    default=0,
    show_default=True,
    metavar="STEPS",
    help="Train the first STEPS with hard eviction, then the configured one.",
)
@click.option(
    "--memory-bound",
    type=MEMORY_BOUND,
    default=None,
    help=MEMORY_BOUND_HELP + "  [default: chunk]",
)
@click.option(
    "--memory-bounded/--no-memory-bounded",
    default=None,
    help="The older form: --memory-bound chunk / none.",
)
@depth_loss_options
@click.option(
    "--valid-every", type=count(0), default=100, show_default=True, help="0: no validation."
)
@click.option(
    "--valid-batches", type=count(0), default=0, show_default=True, help="0: the whole file."
)
@click.option("--checkpoint-every", type=count(1), default=100, show_default=True)
@click.option("--log-every", type=count(1), default=10, show_default=True)
@click.option(
    "--fuse",
    is_flag=True,
    help="Afterwards, merge the adapters into OUT/fused (a model directory).",
)
@click.option(
    "--resume-adapters",
    type=PathArg(dir_okay=True, file_okay=False),
    default=None,
    metavar="DIR",
    help="Start from another run's adapters (its OUT/checkpoint), with a fresh optimizer.",
)
@click.option(
    "--estimate",
    is_flag=True,
    help="Print the expected peak memory and time per step, with each --memory-bound and the "
    "one to run on this machine, then exit.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Write into a directory holding other files (never replacing them). See docs/files.md.",
)
def finetune(
    model_dir,
    data,
    valid,
    out,
    steps,
    batch_size,
    grad_accum,
    lr,
    adam_lr,
    weight_decay,
    warmup,
    grad_clip,
    seed,
    loops,
    window,
    eviction,
    core,
    full,
    dora,
    rank,
    scale,
    dropout,
    lora_layers,
    train_only,
    hard_warmup,
    memory_bound,
    memory_bounded,
    depth_losses,
    depth_losses_from,
    valid_every,
    valid_batches,
    checkpoint_every,
    log_every,
    fuse,
    resume_adapters,
    estimate,
    force,
):
    """Fine-tune a converted model to sleep (LoRA/DoRA or full), on one Mac or several
    (launch with `mlx.launch`; see docs/finetune.md)."""
    from ..finetune import (
        Finetune,
        FinetuneConfig,
        choose_memory_bound,
        estimate_step,
        format_choice,
        format_estimate,
    )

    if full:
        refuse_unused(
            {"dora", "rank", "scale", "dropout", "lora_layers"},
            "with --full (they shape LoRA adapters)",
        )
    else:
        refuse_unused({"adam_lr"}, "without --full (adapters train with --lr)")
    if estimate:
        refuse_unused(
            {"fuse", "valid_every", "valid_batches", "checkpoint_every", "log_every"},
            "with --estimate (it trains nothing)",
        )
    memory_bound = memory_bound_flag(
        memory_bound,
        memory_bounded,
        "--memory-bounded" if memory_bounded else "--no-memory-bounded",
        "chunk",
    )

    def go():
        if full and dora:
            raise ConfigError("--full and --dora exclude each other")
        kind = "full" if full else "dora" if dora else "lora"
        cfg = FinetuneConfig(
            steps=steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            fine_tune_type=kind,
            lr=lr if lr is not None else (2e-4 if full else 1e-4),
            adam_lr=adam_lr,
            weight_decay=weight_decay,
            warmup=warmup,
            grad_clip=grad_clip,
            seed=seed,
            rank=rank,
            scale=scale,
            dropout=dropout,
            lora_layers=lora_layers,
            train_only=train_only,
            hard_warmup=hard_warmup,
            memory_bound=memory_bound,
            depth_losses=parse_depth_losses(depth_losses) if depth_losses else None,
            depth_losses_from=depth_losses_from,
            valid_every=valid_every,
            valid_batches=valid_batches,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
        )
        sleep = dict(loops=loops, window=window, eviction=eviction)
        ft = Finetune(
            model_dir,
            data,
            out,
            cfg,
            sleep=sleep,
            core=parse_core(core),
            valid=valid,
            echo=click.echo,
            dry_run=estimate,
            force=force,
            resume_adapters=resume_adapters,
        )
        if estimate:
            choice = choose_memory_bound(ft)
            click.echo(
                format_estimate(choice["estimates"].get(cfg.memory_bound) or estimate_step(ft))
            )
            click.echo(format_choice(choice))
            return
        if ft.step and ft.step < cfg.steps and ft.is_writer:
            click.echo(f"resuming {out} at step {ft.step}")
        ft.run()
        if ft.is_writer:
            click.echo(f"saved to {out}")
        if fuse and ft.is_writer:
            click.echo(f"fused model saved to {ft.fuse()}")

    run_safely(go)
