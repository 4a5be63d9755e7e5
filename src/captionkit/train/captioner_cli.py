"""Command-line entry points for captioner training and LoRA merging.

Why a separate module: ``captionkit --help`` must stay fast, so this module imports
only typer; torch, transformers and peft are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def captioner_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config (see docs).")],
    set: Annotated[
        Optional[list[str]],  # noqa: UP045 - typer needs typing.Optional on Python 3.10
        typer.Option("--set", help="Override a config key, e.g. --set optimizer.lr=1e-4 or --set data.0.path=images/ (repeatable)."),
    ] = None,
    resume: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--resume", help="Checkpoint folder to resume from, or 'latest' for the newest one."),
    ] = None,
) -> None:
    """Fine-tune Florence-2 on image/caption pairs (full, LoRA or QLoRA)."""
    from captionkit.core.errors import CaptionkitError
    from captionkit.core.exit_codes import exit_code_for
    from captionkit.train.captioner import load_captioner_config, train_captioner
    from captionkit.train.config import ConfigError

    try:
        settings = load_captioner_config(config, list(set or []))
        resume_from = _resolve_resume(resume, settings.output_dir)
        result = train_captioner(settings, resume_from=resume_from)
    except (ConfigError, CaptionkitError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=exit_code_for(error)) from None
    skipped = sum(len(paths) for paths in result.skipped.values())
    typer.echo(f"trained {result.global_step} steps ({result.samples_per_second:.1f} samples/s) on "
               f"{result.images_used} images"
               + (f" ({skipped} skipped: see {result.log_file})" if skipped else ""))
    if result.vision_features:
        typer.echo(f"vision features: {result.vision_features['from_cache']} samples from the cache, "
                   f"{result.vision_features['computed']} computed and stored")
    if result.metrics:
        typer.echo("validation: " + ", ".join(f"{key}={value:.4f}" for key, value in result.metrics.items()))
    if result.best_checkpoint is not None:
        typer.echo(f"best checkpoint: {result.best_checkpoint}")
    typer.echo(f"final model: {result.final_path}")


def _resolve_resume(resume: Path | None, output_dir: Path) -> Path | None:
    from captionkit.train.config import ConfigError

    if resume is None:
        return None
    if str(resume) == "latest":
        from captionkit.train.checkpoints import CheckpointManager

        latest = CheckpointManager(output_dir / "checkpoints", None).latest()
        if latest is None:
            raise ConfigError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}; "
                              "start without --resume")
        return latest
    if not resume.is_dir():
        raise ConfigError(f"--resume {resume}: not a folder; pass a checkpoint folder or 'latest'")
    return resume


def merge_lora_command(
    adapter: Annotated[Path, typer.Option("--adapter", help="LoRA adapter folder saved by training.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the merged model.")],
    base: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--base", help="Base model (hub id or folder); default: the one recorded in the adapter."),
    ] = None,
) -> None:
    """Merge a LoRA adapter into its base model, saving a standalone Florence-2 folder."""
    from captionkit.train.lora import merge_lora

    try:
        path = merge_lora(base, adapter, output)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=2) from error
    typer.echo(f"merged model: {path}")
