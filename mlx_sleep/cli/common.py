"""What every command shares: one-line errors, the parsers of flag values, the sampling and
sleep flags, and loading a model for generation."""

import json
import os
import sys
from dataclasses import replace

import click

from ..config import ConfigError


# -- one validation layer for flag values ---------------------------------------------------------
# Every numeric or text flag of every command takes one of these types, so a bad value stops at
# the door with one line naming the flag (never deep inside, never exit 0 on nonsense).

SEED_MAX = 2**31 - 1  # what config.py's seeds allow (every RNG here takes it)


def count(lo: int = 0, hi: int = None) -> click.IntRange:
    """A whole number in [lo, hi]."""
    return click.IntRange(min=lo, max=hi)


SEED = click.IntRange(0, SEED_MAX)
STEPS = click.IntRange(1, 10**9)  # train.LIMITS: a typo must not run for years
BATCH = click.IntRange(1, 1 << 20)
GRAD_ACCUM = click.IntRange(1, 1024)
MEMORY_BOUND = click.Choice(["chunk", "block", "none"])  # train.MEMORY_BOUNDS
MEMORY_BOUND_HELP = (
    "What backward holds: chunk (recompute one chunk at a time: one chunk's activations), "
    "block (one block application's, for one more forward per chunk), none (the whole "
    "sequence's graph)."
)


def memory_bound_flag(memory_bound, older, older_flag: str, default: str) -> str:
    """--memory-bound, or what an older boolean flag says (given: True is chunk, False none);
    the two disagreeing is refused in one line."""
    if older is None:
        return memory_bound or default
    implied = "chunk" if older else "none"
    if memory_bound is not None and memory_bound != implied:
        raise click.UsageError(
            f"{older_flag} is --memory-bound {implied}, not {memory_bound}: pass one of them"
        )
    return implied


class Finite(click.ParamType):
    """A finite float (nan and inf refused) within optional bounds; `above`: lo itself is out."""

    name = "number"

    def __init__(self, lo: float = None, hi: float = None, above: bool = False):
        self.lo, self.hi, self.above = lo, hi, above

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low_ok = self.lo is None or (number > self.lo if self.above else number >= self.lo)
        if not low_ok or (self.hi is not None and number > self.hi):
            self.fail(f"{number:g} is not {self.describe()}", param, ctx)
        return number

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.above else '>='} {self.lo:g}"
        return f"in {'(' if self.above else '['}{self.lo:g}, {self.hi:g}]"


class Text(click.ParamType):
    """A string that is text: valid UTF-8 (an argument of bytes that are not arrives with lone
    surrogates, which no tokenizer takes), no NUL, and not empty unless `empty` (an empty
    --json '' or --train-only '' is a mistake, not a value)."""

    name = "text"

    def __init__(self, empty: bool = False):
        self.empty = empty

    def convert(self, value, param, ctx):
        if not isinstance(value, str) or (not self.empty and not value.strip()):
            self.fail("must not be empty", param, ctx)
        if "\x00" in value:
            self.fail("must not contain a NUL character", param, ctx)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            self.fail(f"is not UTF-8 text (position {e.start})", param, ctx)
        return value


class PathArg(click.Path):
    """click.Path that also refuses an empty path or one with a NUL character."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (not value.strip() or "\x00" in value):
            self.fail("must be a non-empty path", param, ctx)
        return super().convert(value, param, ctx)


class Failure(click.ClickException):
    """A one-line error for the user (exit code 1)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).split()))


def run_safely(fn):
    """Turn expected errors (bad settings, missing files) into one clear line, not a traceback."""
    try:
        return fn()
    except BrokenPipeError:  # `mlx-sleep ... | head`: the reader left; stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what the shell reports for a command killed by it
    except (ConfigError, ValueError, FloatingPointError) as e:
        raise Failure(str(e)) from None
    except OSError as e:  # unwritable, not a directory, disk full, ...: the path and the reason
        where = f"{e.filename}: " if e.filename else ""
        raise Failure(f"{where}{e.strerror or e}") from None
    except MemoryError:
        raise Failure("out of memory; make the model, batch or window smaller") from None


def parse_options(pairs):
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


def parse_loops_list(value, hint="--loops"):
    """'1,2,4' -> [1, 2, 4]: each N a whole number in 1..MAX_LOOPS, duplicates dropped."""
    from ..config import MAX_LOOPS

    try:
        loops = [int(x) for x in value.split(",")]
    except ValueError:
        loops = []
    if not loops or not all(1 <= n <= MAX_LOOPS for n in loops):
        raise click.BadParameter(
            f"{value!r} is not a list of loop counts in 1..{MAX_LOOPS} (e.g. 1,2,4)",
            param_hint=hint,
        )
    return list(dict.fromkeys(loops))


def parse_core(value, hint="--core", form="START:STOP"):
    if value is None:
        return None
    try:
        start, stop = (int(x) for x in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not {form} (e.g. 1:3)", param_hint=hint)
    return (start, stop)


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape_stops(ctx, param, values):
    r"""`--stop "\n\n"` as users type it in a shell: the two-character escapes \n, \t, \r and
    \\ become the characters (the shell passes them through as a backslash and a letter)."""
    import re

    return tuple(re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], v) for v in values)


def sampling_options(fn):
    """The generation flags `generate` and `chat` share (mlx-lm's sampler and processors)."""
    from ..config import MAX_LOOPS

    options = [
        click.option("--max-tokens", "-m", type=count(1), default=512, show_default=True),
        click.option("--temp", type=Finite(0), default=0.0, show_default=True, help="0: greedy."),
        click.option("--top-p", type=Finite(0, 1), default=0.0, help="Nucleus sampling (0: off)."),
        click.option("--top-k", type=count(0), default=0, help="Top-k sampling (0: off)."),
        click.option("--min-p", type=Finite(0, 1), default=0.0, help="Min-p sampling (0: off)."),
        click.option("--repetition-penalty", type=Finite(0, above=True), default=None),
        click.option("--seed", type=SEED, default=None, help="Random seed for sampling."),
        click.option(
            "--stop",
            type=Text(),
            multiple=True,
            callback=unescape_stops,
            help=r"Stop at this string (repeatable; \n, \t, \r and \\ as typed).",
        ),
        click.option("--system-prompt", type=Text(empty=True), default=None),
        click.option(
            "--window", "-L", type=count(1), default=None, help="Override the model's window L."
        ),
        click.option(
            "--loops",
            "-N",
            type=count(1, MAX_LOOPS),
            default=None,
            help="Override the sleep passes N.",
        ),
        click.option("--eviction", type=click.Choice(["hard", "sliding"]), default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def depth_loss_options(fn):
    """The per-depth objective `train` and `finetune` share (docs/training.md)."""
    options = [
        click.option(
            "--depth-losses",
            default=None,
            metavar="D:W,...",
            help="Take the loss at each depth D (every context window slept D passes), "
            "weighted W; LO-HI:W draws the depth per step, e.g. 3:1,4-6:0.5 (default: at N "
            "alone, Algorithm 1).",
        ),
        click.option(
            "--depth-losses-from",
            type=count(0),
            default=0,
            show_default=True,
            metavar="STEP",
            help="...from this step on (before it: at N alone).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def session_options(fn):
    """The session and idle-sleep flags `chat` and `serve` share."""
    from ..config import MAX_PENDING
    from ..session import MAX_HISTORY

    options = [
        click.option(
            "--history",
            type=count(0, MAX_HISTORY),
            default=3,
            show_default=True,
            help="Consolidations /forget can roll back.",
        ),
        click.option(
            "--idle-delay",
            type=Finite(0),
            default=60.0,
            show_default=True,
            help="Sleep after this many quiet seconds (0: never).",
        ),
        click.option(
            "--idle-fill",
            type=Finite(0, 1),
            default=0.5,
            show_default=True,
            help="...if the window is at least this full.",
        ),
        click.option(
            "--defer-sleep",
            is_flag=True,
            help="A window that fills during a reply gets its N passes at the next idle moment "
            "or /sleep, not in the reply (memory is shallow until then).",
        ),
        click.option(
            "--max-pending",
            type=count(1, MAX_PENDING),
            default=4,
            show_default=True,
            help="Deferred windows that may wait; past that the oldest sleeps in the reply.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sleep_override(model, window, loops, eviction):
    """The model's sleep settings with the flags given applied, or None when none is given."""
    if window is None and loops is None and eviction is None:
        return None
    base = model.sleep_config
    return replace(
        base,
        loops=base.loops if loops is None else loops,
        window=base.window if window is None else window,
        eviction=eviction or base.eviction,
    )


def load_for_chat(model_path):
    from transformers.utils import logging as hf_logging

    from ..loading import load_with_path

    hf_logging.set_verbosity_error()  # its "model of type hybrid" note is noise here
    return load_with_path(model_path)


def refuse_unused(names, why: str):
    """Flags the user gave that do nothing on the path the command took: refused in one line
    naming them (a flag is never silently ignored)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [
        p.opts[-1] if p.opts[-1].startswith("--") else p.opts[0]
        for p in ctx.command.params
        if p.name in names
        and ctx.get_parameter_source(p.name)
        not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(sorted(given))} {'does' if len(given) == 1 else 'do'} "
            f"nothing {why}; drop {'it' if len(given) == 1 else 'them'}"
        )
