"""The `mlx-sleep` command line: one module per area, one group here.

    common.py   one-line errors, flag parsers, the sampling and sleep flags
    train.py    train, eval, demo
    models.py   convert, finetune, data, doctor
    chat.py     generate, chat, sessions, consolidate, schedule
"""

from .. import _blas  # noqa: F401  (first: loads an optimized BLAS before mlx.core)

import click

from . import chat, models, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-sleep")
def main():
    """Sleep-like fast-weight consolidation for hybrid language models on MLX."""


for command in (train.train, train.eval_cmd, train.demo, models.data, models.doctor,
                models.convert, models.finetune, chat.generate, chat.chat, chat.sessions,
                chat.consolidate, chat.schedule):
    main.add_command(command)
