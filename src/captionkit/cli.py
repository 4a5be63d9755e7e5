"""Command line: a thin Typer layer over the library API in :mod:`captionkit.api`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from captionkit.errors import CaptionkitError

app = typer.Typer(
    name="captionkit",
    help="Caption, tag and train the labellers of image datasets for text-to-image training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

_MODEL_HELP = "Hub id or local folder (a model downloaded elsewhere, or trained with captionkit)."


def _print_summary(summary, progress: str) -> None:
    if progress == "json":
        return
    data = summary.as_dict()
    out = sys.stderr
    print(
        f"{summary.field}: {summary.processed} done, {summary.reused} already done, {summary.skipped} skipped, "
        f"{summary.failed} failed of {summary.total} in {summary.elapsed_s:.1f}s "
        f"({summary.images_per_s:.2f} images/s, model busy {summary.model_busy_fraction:.0%}, "
        f"{summary.files_written} files written)",
        file=out,
    )
    if summary.interrupted:
        print("Stopped early (Ctrl-C): everything finished so far is saved; run again to continue.", file=out)
    for record_id, reason in list(data["errors"].items())[:50]:
        print(f"  failed  {record_id}: {reason}", file=out)
    if len(data["errors"]) > 50:
        print(f"  ... and {len(data['errors']) - 50} more failures (see .captionkit/run.log)", file=out)
    if summary.skipped and progress != "quiet":
        print(f"  {summary.skipped} images kept their existing caption file (--existing overwrite|append|"
              "fill-empty to change that)", file=out)
    for target, ids in data["collisions"].items():
        print(f"  collision  {target} would be shared by {' and '.join(ids)}", file=out)


@app.command()
def caption(
    path: Annotated[Path, typer.Argument(help="Folder of images, one image, or a manifest (jsonl/json/csv/tsv/parquet).")],
    model: Annotated[str, typer.Option(help=_MODEL_HELP)] = "florence-community/Florence-2-base",
    task: Annotated[str, typer.Option(help="Florence-2 task: <CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>, <OCR>, <OD>, ...")] = "<CAPTION>",
    task_input: Annotated[str | None, typer.Option(help="Text for tasks that take one (e.g. <CAPTION_TO_PHRASE_GROUNDING>).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest caption in tokens.")] = 256,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1 = greedy, fastest).")] = 3,
    early_stopping: Annotated[bool, typer.Option(help="Stop beam search when num_beams candidates are done.")] = False,
    repetition_penalty: Annotated[float | None, typer.Option(help="Penalise repeated tokens (>1.0).")] = None,
    no_repeat_ngram_size: Annotated[int | None, typer.Option(help="Forbid repeating n-grams of this size.")] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16/fp16 on a GPU, fp32 on CPU), fp32, fp16, bf16.")] = "auto",
    attn_implementation: Annotated[str, typer.Option(help="sdpa, eager or flash_attention_2.")] = "sdpa",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="Folder for downloaded models.")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter folder from `captionkit train captioner`.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call (halved automatically on out-of-memory).")] = 8,
    workers: Annotated[int, typer.Option(help="Parallel decode/preprocess workers.")] = 4,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    include_hidden: Annotated[bool, typer.Option(help="Also take files and folders whose names start with '.'.")] = False,
    image_column: Annotated[str | None, typer.Option(help="Manifest column with the image path.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Folder that relative manifest paths start from.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="Write captions into a mirrored tree here instead of beside the images.")] = None,
    ext: Annotated[str, typer.Option(help="Caption file extension (.txt, .caption, ...).")] = ".txt",
    existing: Annotated[str, typer.Option(help="Existing caption files: skip, overwrite, append or fill-empty.")] = "skip",
    on_collision: Annotated[str, typer.Option(help="Two images, one caption file (a.png + a.jpg): skip (write neither) or keep-extension (a.png.txt).")] = "skip",
    append_separator: Annotated[str, typer.Option(help="Put between the old and new text with --existing append.")] = ", ",
    prefix: Annotated[str, typer.Option(help="Text put before every caption, verbatim (e.g. 'ohwx, ').")] = "",
    suffix: Annotated[str, typer.Option(help="Text put after every caption, verbatim.")] = "",
    cleanup: Annotated[bool, typer.Option(help="Strip special tokens and extra whitespace.")] = True,
    collapse_loops: Annotated[bool, typer.Option(help="Collapse repeated-phrase loops.")] = True,
    background: Annotated[str, typer.Option(help="Colour transparent images are composited on.")] = "white",
    max_image_pixels: Annotated[int, typer.Option(help="Refuse images with more pixels (decompression bombs).")] = 178_956_970,
    keep_results: Annotated[bool, typer.Option(help="Reuse stored captions even if made with other settings.")] = False,
    retry_errors: Annotated[bool, typer.Option(help="Retry images that failed before even if the file did not change.")] = False,
    export: Annotated[list[Path] | None, typer.Option(help="Also write all results to this .jsonl or .parquet (repeatable).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json (JSON lines on stdout) or quiet.")] = "bar",
) -> None:
    """Caption every image with Florence-2 and write caption files; safe to stop and run again."""
    from captionkit import api

    mode = "quiet" if quiet else progress
    summary = api.caption(
        path, model=model, task=task, task_input=task_input, max_new_tokens=max_new_tokens,
        num_beams=num_beams, early_stopping=early_stopping, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size, dtype=dtype, attn_implementation=attn_implementation,
        device=device, cache_dir=cache_dir, revision=revision, adapter=adapter, batch_size=batch_size,
        workers=workers, recursive=recursive, include_hidden=include_hidden, image_column=image_column,
        base_dir=base_dir, output_dir=output_dir, ext=ext, existing=existing, on_collision=on_collision,
        append_separator=append_separator, prefix=prefix, suffix=suffix, cleanup=cleanup,
        collapse_loops=collapse_loops, background=background, max_image_pixels=max_image_pixels,
        keep_results=keep_results, retry_errors=retry_errors, export=export or (), progress=mode,
    )
    _print_summary(summary, mode)
    if summary.interrupted:
        raise typer.Exit(130)


@app.command()
def models() -> None:
    """List the registered model backends."""
    from captionkit.models import list_backends

    for info in list_backends():
        default = f" (default model: {info.default_model})" if info.default_model else ""
        types = ", ".join(info.model_types)
        print(f"{info.kind:10} {info.name:12} {info.description}; model types: {types}{default}")


@app.command("export")
def export_command(
    location: Annotated[Path, typer.Argument(help="The captioned folder (or the --output-dir used).")],
    destination: Annotated[Path, typer.Argument(help="A .jsonl or .parquet file to write.")],
    step: Annotated[list[str] | None, typer.Option(help="Only these fields (caption, tags); default all.")] = None,
) -> None:
    """Export every stored result (text, raw output, errors, settings) to JSONL or Parquet."""
    from captionkit import api

    count = api.export(location, destination, step)
    print(f"wrote {count} rows to {destination}", file=sys.stderr)


def _register_training_commands() -> None:
    """Training commands live with the trainers; their modules import heavy packages lazily."""
    from captionkit.train.captioner_cli import merge_lora_command
    from captionkit.train.cli import train_app
    from captionkit.train.tagger_cli import prepare_command

    app.add_typer(train_app, name="train")
    app.command("merge-lora", help="Merge a LoRA adapter into its base model: a standalone folder.")(
        merge_lora_command
    )
    app.command("prepare", help="Build image/tag pairs and selected_tags.csv from a Danbooru-style parquet.")(
        prepare_command
    )


_register_training_commands()


def main() -> None:
    """Console entry point: user errors become one plain message, not a stack trace."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger().addHandler(console)
    for noisy in ("httpx", "httpcore", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        app()
    except CaptionkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["app", "json", "main"]
