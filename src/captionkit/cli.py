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

from captionkit.core.declare import Option
from captionkit.core.errors import CaptionkitError
from captionkit.core.exit_codes import CONTRACT as _EXIT_CODES
from captionkit.core.tagging import TagOptions
from captionkit.options.commands import CAPTION, EXPORT, INSPECT, RENDER, RUN, TAG, UI, Command

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
    return typer.Option(*item.flags, help=item.help, rich_help_panel=item.panel, metavar=item.metavar)


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


@app.command(epilog=_EXIT_CODES)
@_declared(CAPTION)
def caption(
    path: Annotated[str, typer.Argument(help="Folder of images, one image, a manifest (jsonl/json/csv/tsv/parquet), or WebDataset shards ('shard-{00000..00099}.tar', needs --output-dir); local or a URL (s3://bucket/prefix, gs://, az://, hf://).")],
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
    path: Annotated[str, typer.Argument(help="Folder of images, one image, a manifest, or WebDataset shards ('shard-{00000..00099}.tar', needs --output-dir); local or a URL (s3://bucket/prefix, gs://, az://, hf://).")],
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
@_declared(RUN)
def run_command(
    pipeline: Annotated[Path | None, typer.Argument(help="A pipeline YAML file (captionkit's or Dataflow-Gen's spelling).")] = None,
    **values,
) -> None:
    """Run a multi-step pipeline (caption, tag, template, filter, generate, export); resumable per step and record."""
    from captionkit.core.exit_codes import OK, parse_max_failures, run_exit_code
    from captionkit.pipeline import run_pipeline

    config = values["config"]
    if config is not None and pipeline is not None and config != pipeline:
        raise typer.BadParameter(f"two pipeline files ({pipeline} and --config {config}); give one.")
    pipeline = pipeline or config
    if pipeline is None:
        raise typer.BadParameter("give the pipeline file: captionkit run PIPELINE.yaml (or --config PIPELINE.yaml).")
    allowance = parse_max_failures(values["max_failures"])  # a bad value fails before any model loads
    report = run_pipeline(pipeline, progress="quiet" if values["quiet"] else values["progress"],
                          **RUN.api_arguments(values))
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
@_declared(INSPECT)
def inspect_command(
    dataset: Annotated[str, typer.Argument(help="Image folder (with sidecar captions/tags) or a manifest (jsonl/json/csv/tsv/parquet); local or a URL (s3://bucket/prefix, gs://, az://, hf://).")],
    **values,
) -> None:
    """Find what would spoil a training run (captions, images, tags) without changing the data set; HTML and JSON reports."""
    from captionkit import api
    from captionkit.inspection import KINDS, resolve_fail_on

    fail_on, report, json_report = values["fail_on"], values["report"], values["json_report"]
    try:
        resolve_fail_on(fail_on or [])  # a typo fails before the inspection, not after
    except ValueError as error:
        raise CaptionkitError(str(error)) from error
    arguments = INSPECT.api_arguments(values)
    result = api.inspect(dataset, progress="quiet" if values["quiet"] else values["progress"], **arguments)
    if not result.counts["images"]:  # as caption and tag say it: one sentence, exit 2
        from captionkit.core.locations import storage_options_set
        from captionkit.core.records import open_source

        with storage_options_set(arguments.get("storage_options")):
            source = open_source(dataset, recursive=arguments["recursive"], image_column=arguments["image_column"],
                                 base_dir=arguments["base_dir"], include_hidden=arguments["include_hidden"])
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
@_declared(UI)
def ui_command(**values) -> None:
    """Open the web UI: caption, tag, train, run pipelines and review a data set in the browser."""
    from captionkit.ui import launch

    launch(**UI.api_arguments(values))


@app.command("export")
@_declared(EXPORT)
def export_command(
    location: Annotated[str, typer.Argument(help="The captioned folder (or the --output-dir used, a URL included).")],
    destination: Annotated[str, typer.Argument(help="A .jsonl or .parquet file to write (a path or a URL such as s3://bucket/out.parquet).")],
    **values,
) -> None:
    """Export every stored result (text, raw output, errors, settings) to JSONL or Parquet."""
    from captionkit import api

    count = api.export(location, destination, **EXPORT.api_arguments(values))
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
