"""CLI functions for tagger training: ``captionkit train tagger`` and ``captionkit prepare``.

Plain functions with Typer-annotated parameters, so the main CLI registers them with
``app.command("tagger")(tagger_command)``. Heavy imports (torch, timm, accelerate,
pyarrow) happen inside the functions: ``captionkit --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _fail(error: Exception) -> typer.Exit:
    """Print a user-facing error (file, cause, fix are in the message) and exit non-zero (2, or 3: see --help)."""
    from captionkit.core.exit_codes import exit_code_for

    typer.echo(f"error: {error}", err=True)
    return typer.Exit(code=exit_code_for(error))


def tagger_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML training config (see docs).")],
    set: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set optimizer.lr=3e-4 (repeatable)."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="A run's output folder (continues from OUTPUT/last) or a checkpoint folder (OUTPUT/checkpoints/epoch-NNNN).",
        ),
    ] = None,
) -> None:
    """Train a multi-label tagger on a timm backbone."""
    import logging

    from captionkit.core.errors import CaptionkitError
    from captionkit.train.config import ConfigError
    from captionkit.train.tagger import load_tagger_config, train_tagger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_tagger_config(config, list(set or []))
        result = train_tagger(settings, resume=resume)
    except (CaptionkitError, ConfigError) as error:
        raise _fail(error) from error
    skipped = sum(len(paths) for paths in result.skipped.values())
    typer.echo(f"trained on {result.images_used} images"
               + (f" ({skipped} skipped: see {result.log_file})" if skipped else ""))
    best = f"{result.best_metric:.4f}" if result.best_metric is not None else "n/a"
    typer.echo(f"best {result.metric_name}: {best}  ->  {result.best_dir}")
    typer.echo(f"final model: {result.final_dir}")
    for part, stats in result.feature_cache.items():
        typer.echo(f"feature cache ({part}): {stats['reused']} reused, {stats['computed']} computed, "
                   f"{stats['corrupt']} unreadable entries replaced")


def prepare_command(
    parquet: Annotated[Path, typer.Argument(help="Danbooru-style metadata parquet.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for images/ + tag files + selected_tags.csv.")],
    image_column: Annotated[str, typer.Option(help="Column with image paths.")] = "file_path",
    image_root: Annotated[
        Path | None,
        typer.Option(help="Folder the image paths are relative to (default: the parquet's folder)."),
    ] = None,
    tag_column: Annotated[
        list[str] | None,
        typer.Option(help="Column of space-separated tags (repeatable; default: every tag_string_* column)."),
    ] = None,
    rating_column: Annotated[str, typer.Option(help="Rating column (g/s/q/e); '' for none.")] = "rating",
    min_count: Annotated[int, typer.Option(help="Keep tags seen at least this often in selected_tags.csv.")] = 1,
    separator: Annotated[str, typer.Option(help="Separator written between tags in the tag files.")] = ", ",
    link: Annotated[str, typer.Option(help="How images are placed: symlink, hardlink or copy.")] = "symlink",
) -> None:
    """Build image/tag pairs and selected_tags.csv from Danbooru-style metadata."""
    from captionkit.core.errors import CaptionkitError
    from captionkit.train.tagger_data import prepare_from_parquet

    try:
        result = prepare_from_parquet(
            parquet, output, image_column=image_column, image_root=image_root,
            tag_columns=tag_column or None, rating_column=rating_column or None, min_count=min_count,
            separator=separator, link=link,
        )
    except CaptionkitError as error:
        raise _fail(error) from error
    typer.echo(
        f"{result.images} images with tag files in {result.output / 'images'}; "
        f"{result.skipped_missing} rows skipped (image missing); "
        f"selected_tags.csv: {result.vocabulary_size} of {result.tags} tags (min count {min_count})"
    )
