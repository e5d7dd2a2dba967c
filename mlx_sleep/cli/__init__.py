"""The `mlx-sleep` command line: one module per area, one group here.

common.py   one-line errors, flag parsers, the sampling and sleep flags
train.py    train, eval, demo
models.py   convert, finetune, data, doctor
chat.py     generate, chat, sessions, consolidate, schedule
serve.py    serve
"""

from .. import _blas  # noqa: F401  (first: loads an optimized BLAS before mlx.core)

import sys

import click

from . import chat, models, serve, train


class OneLineErrors(click.Group):
    """click, except that a usage error (a bad flag value, a missing option) is one line naming
    the flag and where help is, not click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "mlx-sleep"
            message = " ".join(e.format_message().split())
            click.echo(f"Error: {message} ('{where} --help' lists the flags)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-sleep")
def main():
    """Sleep-like fast-weight consolidation for hybrid language models on MLX."""


for command in (
    train.train,
    train.eval_cmd,
    train.demo,
    models.data,
    models.doctor,
    models.convert,
    models.finetune,
    chat.generate,
    chat.chat,
    chat.sessions,
    chat.consolidate,
    chat.schedule,
    serve.serve,
):
    main.add_command(command)
