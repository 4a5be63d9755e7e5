"""Command line: a thin Typer layer over the library API in :mod:`captionkit.api`."""

from __future__ import annotations

import inspect
import json
import logging
import sqlite3
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from captionkit.core.declare import Option, declared_options
from captionkit.core.errors import CaptionkitError
from captionkit.core.exit_codes import CONTRACT as _EXIT_CODES
from captionkit.core.tagging import TagOptions
from captionkit.options.commands import CAPTION, RENDER, TAG, Command, ScaleOptions

app = typer.Typer(
    name="captionkit",
    help="Caption, tag and train the labellers of image datasets for text-to-image training.",
    epilog=_EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _version(value: bool) -> None:
    if value:
        from captionkit import __version__

        print(f"captionkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version,
                                          is_eager=True)] = False,
) -> None:
    """Caption, tag and train the labellers of image datasets for text-to-image training."""


def _exit_for_summary(summary, allowance) -> None:
    """Exit with the contract's code (see ``captionkit --help``) for a caption or tag run."""
    from captionkit.core.exit_codes import OK, run_exit_code

    unwritten = len(summary.write_errors)  # stored, but the caption file is missing: not done
    code = run_exit_code(succeeded=summary.processed + summary.reused - unwritten,
                         failed=summary.failed + unwritten, allowance=allowance,
                         stopped_early=summary.stopped_early is not None, interrupted=summary.interrupted)
    if code != OK:
        raise typer.Exit(code)


def _print_summary(summary, progress: str) -> None:
    if progress == "json":
        if summary.stopped_early:  # stdout is the JSON stream; the reason still reaches a person
            print(summary.stopped_early, file=sys.stderr)
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
    errors = data["errors"]
    if summary.stopped_early:
        print(summary.stopped_early, file=out)
        # the reason is said once above, not once per image
        errors = {record_id: reason for record_id, reason in errors.items()
                  if reason.partition(": ")[2].rstrip(".") not in summary.stopped_early}
        if len(errors) < len(data["errors"]):
            print(f"  {len(data['errors']) - len(errors)} images failed for that reason", file=out)
    elif summary.interrupted:
        print("Stopped early (Ctrl-C): everything finished so far is saved; run again to continue.", file=out)
    for record_id, reason in list(errors.items())[:50]:
        print(f"  failed  {_failure_line(record_id, reason)}", file=out)
    if len(errors) > 50:
        print(f"  ... and {len(errors) - 50} more failures (see .captionkit/run.log)", file=out)
    if summary.failed_earlier:
        print(f"  {summary.failed_earlier} of the failures are unchanged files that failed before and were not "
              "tried again (--retry-errors to try them)", file=out)
    if summary.skipped and progress != "quiet":
        print(f"  {summary.skipped} images kept their existing caption file (--existing overwrite|append|"
              "fill-empty to change that)", file=out)
    for target, ids in data["collisions"].items():
        print(f"  collision  {target} would be shared by {' and '.join(ids)}", file=out)
    for record_id, reason in list(data["write_errors"].items())[:20]:
        print(f"  not written  {_failure_line(record_id, reason)}", file=out)


def _failure_line(record_id: str, reason: str) -> str:
    """'img.png: reason', naming the file once: most reasons already start with the file's full path."""
    path, separator, rest = reason.partition(": ")
    if separator and (path == record_id or path.replace("\\", "/").endswith("/" + record_id)):
        return f"{record_id}: {rest}"
    return f"{record_id}: {reason}"


def _typer_option(item: Option):
    """The Typer option of a declared option: its flags, help and help panel."""
    return typer.Option(*item.flags, help=item.help, rich_help_panel=item.panel)


def _cli_type(item: Option):
    """The type Typer parses: a NAME=VALUE mapping is a repeatable text option; lists and optionals may be absent."""
    base = list[str] if item.value_type is dict else item.value_type
    if item.optional or item.value_type is dict or typing.get_origin(base) is list:
        return base | None
    return base


def _declared(command: Command):
    """Give a command function the declared options of ``command`` as its Typer parameters.

    The function keeps its own parameters (the path argument) and takes the options as ``**values``.
    """
    def wrap(body):
        hints = typing.get_type_hints(body, include_extras=True)
        own = [parameter.replace(annotation=hints[name])
               for name, parameter in inspect.signature(body).parameters.items()
               if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
        declared = [
            inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[
                _cli_type(item), _typer_option(item)],
                default=None if isinstance(item.default, list | dict) else item.default)
            for item in command.options("cli")
        ]
        body.__signature__ = inspect.Signature([*own, *declared], return_annotation=None)
        body.__annotations__ = {parameter.name: parameter.annotation for parameter in body.__signature__.parameters.values()}
        return body

    return wrap


_SCALE = {item.name: _typer_option(item) for item in declared_options(ScaleOptions)}


@app.command(epilog=_EXIT_CODES)
@_declared(CAPTION)
def caption(
    path: Annotated[Path, typer.Argument(help="Folder of images, one image, a manifest (jsonl/json/csv/tsv/parquet), or WebDataset shards ('shard-{00000..00099}.tar', needs --output-dir).")],
    **values,
) -> None:
    """Caption every image (Florence-2, chat VLMs, an OpenAI-compatible server or vLLM); safe to stop and run again."""
    from captionkit import api
    from captionkit.core.exit_codes import parse_max_failures

    allowance = parse_max_failures(values["max_failures"])  # a bad value fails before the model loads
    mode = "quiet" if values["quiet"] else values["progress"]
    summary = api.caption(path, progress=mode, **CAPTION.api_arguments(values))
    _print_summary(summary, mode)
    _exit_for_summary(summary, allowance)


@app.command(epilog=_EXIT_CODES)
@_declared(TAG)
def tag(
    path: Annotated[Path, typer.Argument(help="Folder of images, one image, a manifest, or WebDataset shards ('shard-{00000..00099}.tar', needs --output-dir).")],
    **values,
) -> None:
    """Tag every image with a Danbooru-style tagger; all scores are stored for `captionkit render`."""
    from captionkit import api
    from captionkit.core.exit_codes import parse_max_failures

    allowance = parse_max_failures(values["max_failures"])  # a bad value fails before the model loads
    progress = values["progress"]
    mode = "quiet" if values["quiet"] or (values["print_scores"] and progress == "bar") else progress
    summary = api.tag(path, progress=mode, **TAG.api_arguments(values))
    _print_summary(summary, mode)
    _exit_for_summary(summary, allowance)


@app.command()
@_declared(RENDER)
def render(
    path: Annotated[Path, typer.Argument(help="The folder (or manifest) that was tagged or captioned.")],
    **values,
) -> None:
    """Rewrite tag or caption files from the stored results with new settings, without running a model."""
    from captionkit import api

    if values["field"] != "tags":  # tag options mean nothing for captions: not even checked
        values = {name: value for name, value in values.items() if RENDER.owner(name) is not TagOptions}
    written = api.render(path, **RENDER.api_arguments(values))
    print(f"{written} files rewritten", file=sys.stderr)


@app.command()
def models() -> None:
    """List the registered model backends."""
    from captionkit.models import list_backends

    for info in list_backends():
        default = f"; default model: {info.default_model}" if info.default_model else ""
        types = f"; model types: {', '.join(info.model_types)}" if info.model_types else ""
        if info.extras:
            state = "installed" if info.installed() else f"not installed: pip install 'captionkit[{','.join(info.extras)}]'"
            needs = f"; needs captionkit[{','.join(info.extras)}] ({state})"
        else:
            needs = "; included in the base install"
        print(f"{info.kind:10} {info.name:16} {info.description}{types}{default}{needs}")


@app.command("run", epilog=_EXIT_CODES.replace("every image", "every record").replace(
    "--max-failures", "--max-failures, per step"))
def run_command(
    pipeline: Annotated[Path | None, typer.Argument(help="A pipeline YAML file (captionkit's or Dataflow-Gen's spelling).")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="The pipeline file, given as an option (as Dataflow-Gen's run_pipeline.py and the trainers take it).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Validate and show the plan: steps, records, what is already done.")] = False,
    from_step: Annotated[int | None, typer.Option(help="Start at this step (1-based); earlier steps' stored results are used.")] = None,
    only_step: Annotated[str | None, typer.Option(help="Run only the step with this name.")] = None,
    workers: Annotated[int, typer.Option(help="Parallel decode/preprocess workers.")] = 4,
    executor: Annotated[str, _SCALE["executor"]] = "local",
    ray_address: Annotated[str | None, _SCALE["ray_address"]] = None,
    ray_actors: Annotated[int | None, _SCALE["ray_actors"]] = None,
    ray_gpus_per_actor: Annotated[float | None, _SCALE["ray_gpus_per_actor"]] = None,
    ray_cpus_per_actor: Annotated[float, _SCALE["ray_cpus_per_actor"]] = 1.0,
    ray_stall_timeout: Annotated[float, _SCALE["ray_stall_timeout"]] = 600.0,
    devices: Annotated[str | None, _SCALE["devices"]] = None,
    max_failures: Annotated[str | None, typer.Option(help="Still exit 0 when at most this many records fail in each step: a number (5) or a percentage of the records the step tried (2%). Default 0.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json or quiet.")] = "bar",
) -> None:
    """Run a multi-step pipeline (caption, tag, template, filter, generate, export); resumable per step and record."""
    from captionkit.core.exit_codes import OK, parse_max_failures, run_exit_code
    from captionkit.pipeline import run_pipeline

    if config is not None and pipeline is not None and config != pipeline:
        raise typer.BadParameter(f"two pipeline files ({pipeline} and --config {config}); give one.")
    pipeline = pipeline or config
    if pipeline is None:
        raise typer.BadParameter("give the pipeline file: captionkit run PIPELINE.yaml (or --config PIPELINE.yaml).")
    allowance = parse_max_failures(max_failures)  # a bad value fails before any model loads
    report = run_pipeline(pipeline, dry_run=dry_run, from_step=from_step, only_step=only_step,
                          progress="quiet" if quiet else progress, workers=workers, executor=executor,
                          ray_address=ray_address, devices=devices, ray_actors=ray_actors,
                          ray_gpus_per_actor=ray_gpus_per_actor, ray_cpus_per_actor=ray_cpus_per_actor,
                          ray_stall_timeout=ray_stall_timeout)
    stopped_early = report.stopped_early
    out = sys.stderr
    if report.path_rule:
        print(f"paths: {report.path_rule}", file=out)
    for step in report.steps:
        head = f"step {step.index} {step.name} ({step.type} -> {step.output_field})"
        if step.skipped:
            print(f"{head}: not run (--from-step/--only-step)", file=out)
        elif report.dry_run:
            print(f"{head}: {step.total} records, {step.done} done, {step.todo} to run, {step.failed} failed before"
                  + (f", {step.dropped} dropped by a filter" if step.dropped else ""), file=out)
        else:
            print(f"{head}: {step.processed} done, {step.done} already done, {step.failed} failed of {step.total} "
                  f"in {step.elapsed_s:.1f}s" + (f" ({step.dropped} dropped by a filter)" if step.dropped else ""),
                  file=out)
        errors = step.errors
        if stopped_early:  # its reason is said once, below, not once per record
            errors = {record_id: reason for record_id, reason in errors.items()
                      if reason.partition(": ")[2].rstrip(".") not in stopped_early}
        for record_id, reason in list(errors.items())[:20]:
            print(f"  failed  {_failure_line(record_id, reason)}", file=out)
        if len(errors) > 20:
            print(f"  ... and {len(errors) - 20} more (see the run log in base_folder/.captionkit)", file=out)
    if report.table is not None:
        print(f"final table: {report.table}", file=out)
    if stopped_early:
        print(stopped_early, file=out)
    codes = [run_exit_code(succeeded=step.processed + step.done, failed=step.failed, allowance=allowance)
             for step in report.steps if not step.skipped and not report.dry_run]
    code = run_exit_code(succeeded=1, failed=0, allowance=allowance, stopped_early=bool(stopped_early),
                         interrupted=report.interrupted)
    if code == OK and codes:
        code = max(codes)  # 3 (a step where nothing succeeded) outranks 1 (some failed)
    if code != OK:
        raise typer.Exit(code)


_INSPECT_EXIT_CODES = ("Exit codes: 0 inspected (findings are in the reports); 1 findings named by --fail-on; "
                       "2 usage error, or no images found; 3 no image could be read; 130 Ctrl-C.")


@app.command("inspect", epilog=_INSPECT_EXIT_CODES)
def inspect_command(
    dataset: Annotated[Path, typer.Argument(help="Image folder (with sidecar captions/tags) or a manifest (jsonl/json/csv/tsv/parquet).")],
    report: Annotated[Path | None, typer.Option(help="Write the self-contained HTML report (plots, tables linking to files) here.")] = None,
    json_report: Annotated[Path | None, typer.Option("--json", help="Write the findings as JSON here (for scripts and CI).")] = None,
    fail_on: Annotated[list[str] | None, typer.Option(help="Exit 1 when any of these are found: finding kinds, a severity (error, warning, info: that or worse) or any (repeatable or comma-separated).")] = None,
    trigger: Annotated[str | None, typer.Option(help="Trigger word every caption must contain.")] = None,
    resolution: Annotated[str, typer.Option(help="Training resolution for buckets: 1024 or WIDTHxHEIGHT.")] = "1024",
    min_bucket: Annotated[int, typer.Option(help="Smallest bucket side (kohya min_bucket_reso).")] = 256,
    max_bucket: Annotated[int, typer.Option(help="Largest bucket side (kohya max_bucket_reso).")] = 2048,
    bucket_step: Annotated[int, typer.Option(help="Bucket side step (kohya bucket_reso_steps).")] = 64,
    min_side: Annotated[int | None, typer.Option(help="Images whose shorter side is below this are tiny (default: --min-bucket).")] = None,
    max_crop: Annotated[float, typer.Option(help="Odd aspect ratio: more than this share of the image cropped to fit its bucket.")] = 0.10,
    full: Annotated[bool, typer.Option("--full", help="Decode every image (finds truncated data; slower).")] = False,
    near_duplicates: Annotated[bool, typer.Option(help="Perceptual hashes for near-duplicates (a reduced decode); --no-near-duplicates reads headers only.")] = True,
    near_duplicate_distance: Annotated[int, typer.Option(help="Near-duplicate threshold: Hamming distance of the 64-bit perceptual hashes.")] = 6,
    min_count: Annotated[int, typer.Option(help="Tags on fewer images than this are the long tail.")] = 3,
    common_fraction: Annotated[float, typer.Option(help="Tags on at least this share of the tagged images are reported.")] = 0.95,
    caption_ext: Annotated[str, typer.Option(help="Caption file extension.")] = ".txt",
    tag_ext: Annotated[str | None, typer.Option(help="Tag file extension (may equal --caption-ext); tags in the store are used where there are some.")] = None,
    selected_tags: Annotated[Path | None, typer.Option(help="A selected_tags.csv giving tag categories (the store's tagger vocabulary is used too).")] = None,
    t5_tokenizer: Annotated[Path | None, typer.Option(help="A T5 tokenizer (folder, tokenizer.json or spiece.model) for T5 token counts; default: the hub cache, if it has one.")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="The --output-dir the captions were written to (store and sidecars there).")] = None,
    recursive: Annotated[bool, typer.Option(help="Descend into sub-folders.")] = True,
    include_hidden: Annotated[bool, typer.Option(help="Also take files and folders whose names start with '.'.")] = False,
    image_column: Annotated[str | None, typer.Option(help="Manifest column with the image path.")] = None,
    base_dir: Annotated[Path | None, typer.Option(help="Folder that relative manifest paths start from.")] = None,
    workers: Annotated[int, typer.Option(help="Parallel image readers.")] = 4,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    progress: Annotated[str, typer.Option(help="bar, json (JSON lines on stdout) or quiet.")] = "bar",
) -> None:
    """Find what would spoil a training run (captions, images, tags) without changing the data set; HTML and JSON reports."""
    from captionkit import api
    from captionkit.inspection import KINDS, resolve_fail_on

    try:
        resolve_fail_on(fail_on or [])  # a typo fails before the inspection, not after
    except ValueError as error:
        raise CaptionkitError(str(error)) from error
    result = api.inspect(
        dataset, trigger=trigger, resolution=resolution,
        min_bucket=min_bucket, max_bucket=max_bucket, bucket_step=bucket_step, min_side=min_side, max_crop=max_crop,
        full=full, near_duplicates=near_duplicates, near_duplicate_distance=near_duplicate_distance,
        min_count=min_count, common_fraction=common_fraction, caption_ext=caption_ext, tag_ext=tag_ext,
        selected_tags=selected_tags, t5_tokenizer=t5_tokenizer, output_dir=output_dir, recursive=recursive,
        include_hidden=include_hidden, image_column=image_column, base_dir=base_dir, workers=workers,
        progress="quiet" if quiet else progress,
    )
    if not result.counts["images"]:  # as caption and tag say it: one sentence, exit 2
        from captionkit.core.records import open_source

        source = open_source(dataset, recursive=recursive, image_column=image_column, base_dir=base_dir,
                             include_hidden=include_hidden)
        raise CaptionkitError(api.no_images_message(source))
    if report is not None:
        result.write_html(report)
    if json_report is not None:
        result.write_json(json_report)
    out = sys.stderr
    counts = result.counts
    print(f"{counts['images']} images ({counts['unreadable_images']} unreadable), {counts['with_caption']} captioned, "
          f"{counts['tagged']} tagged; {len(result.findings)} findings in {result.elapsed_s:.1f}s", file=out)
    for name, found in result.summary().items():
        if found:
            print(f"  {KINDS[name].severity:8} {name:26} {found:6}  {KINDS[name].title}", file=out)
    for path in (report, json_report):
        if path is not None:
            print(f"wrote {path}", file=out)
    failures = result.failures(fail_on or [])
    if failures:
        kinds = sorted({finding.kind for finding in failures})
        print(f"failing (--fail-on): {len(failures)} findings of {', '.join(kinds)}", file=out)
        raise typer.Exit(1)
    if counts["unreadable_images"] >= counts["images"]:
        print(f"none of the {counts['images']} images could be read: nothing was inspected", file=out)
        raise typer.Exit(3)


@app.command("ui")
def ui_command(
    host: Annotated[str, typer.Option(help="Address to listen on. 127.0.0.1 = this machine only; 0.0.0.0 = every network (use --auth).")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="Port (default: 7860, or the next free one).")] = None,
    auth: Annotated[str | None, typer.Option(help="USER:PASS, or a file with one USER:PASS per line: the page asks for them.")] = None,
    share: Annotated[bool, typer.Option(help="Also publish a temporary public gradio.live link (off by default; use --auth).")] = False,
) -> None:
    """Open the web UI: caption, tag, train, run pipelines and review a data set in the browser."""
    from captionkit.ui import launch

    launch(host=host, port=port, auth=auth, share=share)


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


def _plain_metavars(command) -> None:
    """Help reads like plain Click: `--batch-size INTEGER`, bare flags, `Usage: ... PATH`, defaults on one line.

    Typer's own labels (`<int>`, `--help <bool>`, `{path}` in the usage line) and a default such
    as a newline printed raw (it breaks the option's row) are replaced here.
    """
    from typer.core import TyperArgument, TyperOption

    labels = {bool: "", int: "INTEGER", float: "NUMBER", str: "TEXT"}
    help_option = command.get_help_option(typer.Context(command))
    if help_option is not None:
        help_option.metavar = ""
    for param in command.params:
        if isinstance(param, TyperArgument):
            _plain_argument(param)
            continue
        if isinstance(param, TyperOption) and isinstance(param.default, str) and _needs_quotes(param.default):
            param._get_default_string = lambda *, ctx, show_default_is_str, default_value: repr(default_value)
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
            continue
        descriptor = getattr(param, "type_descriptor", None)
        if descriptor is None:
            continue
        annotation = descriptor.annotation
        if descriptor.is_list:  # a repeatable option takes one value each time: no '...'
            annotation = getattr(annotation, "__args__", (str,))[0]
        is_path = descriptor.is_path or (isinstance(annotation, type) and issubclass(annotation, Path))
        param.metavar = "PATH" if is_path else labels.get(annotation, "VALUE")
    for child in getattr(command, "commands", {}).values():
        _plain_metavars(child)


def _plain_argument(param) -> None:
    """`PATH` in the usage line and the Arguments panel (Typer prints `{path}`), `[PATH]` when optional."""
    name = (param.metavar or param.name or "value").upper()
    param.metavar = name
    param.display_type_rich = lambda ctx: None  # its name already says what it is
    usage = name if param.required else f"[{name}]"
    if param.nargs != 1:
        usage += "..."
    param.get_usage_pieces = lambda ctx: [usage]


def _needs_quotes(value: str) -> bool:
    """A default that prints as nothing, breaks the help row (a newline) or hides spaces is shown quoted."""
    return value != value.strip() or not value.isprintable()


def main() -> None:
    """Console entry point: user errors become one plain message, not a stack trace."""
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.getLogger().addHandler(console)
    for noisy in ("httpx", "httpcore", "huggingface_hub", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        command = typer.main.get_command(app)
        try:
            _plain_metavars(command)
        except (AttributeError, ImportError, TypeError):  # another Typer version: its own labels are fine
            pass
        command(prog_name="captionkit")
    except CaptionkitError as error:
        from captionkit.core.exit_codes import exit_code_for

        print(f"error: {error}", file=sys.stderr)
        sys.exit(exit_code_for(error))  # 2, or 3 when nothing succeeded
    except sqlite3.Error as error:  # the store: a full disk, a read-only or corrupt store.sqlite
        from captionkit.core.environment import is_storage_problem

        hint = (" Check free space and permissions, or write elsewhere with --output-dir."
                if is_storage_problem(error) else "")
        print(f"error: the captionkit store (.captionkit/store.sqlite in the output folder) failed: {error}.{hint}",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - only named causes become messages; the rest re-raise
        from captionkit.core.environment import broken_environment, describe_os_error

        broken = broken_environment(error)
        if broken is not None:  # a package that fails to import: the environment, never the user's files
            print(f"error: {broken}", file=sys.stderr)
            sys.exit(2)
        if isinstance(error, OSError):  # the disk-space hint only where the error is about writing
            print(f"error: {describe_os_error(error)}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["app", "json", "main"]
