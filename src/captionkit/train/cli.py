"""The ``captionkit train`` sub-app; each trainer appends one registration line below."""

from __future__ import annotations

import typer

from captionkit.train.captioner_cli import captioner_command

train_app = typer.Typer(
    help="Train the models that label images.", no_args_is_help=True,
    epilog="Exit codes: 0 trained; 2 usage, configuration or data error; 3 no training image could be "
           "read; 130 Ctrl-C; 1 (with a traceback) a failure inside training itself.",
)
train_app.command("captioner")(captioner_command)
from captionkit.train.tagger_cli import tagger_command  # noqa: E402

train_app.command("tagger")(tagger_command)
