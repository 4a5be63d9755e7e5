"""The library API. The CLI is a thin layer over these functions (same names, same options)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from captionkit.errors import CaptionkitError
from captionkit.executor import LocalExecutor, RunOptions, RunSummary
from captionkit.images import DEFAULT_MAX_PIXELS, parse_color
from captionkit.progress import Progress
from captionkit.records import Source, open_source
from captionkit.sinks import CollisionPolicy, ExistingPolicy, SidecarSink, export_results
from captionkit.store import Store

log = logging.getLogger("captionkit")
DEFAULT_CAPTION_MODEL = "florence-community/Florence-2-base"


def attach_run_log(store: Store) -> logging.Handler:
    """Append this run's log to ``.captionkit/run.log`` in the output location."""
    handler = logging.FileHandler(store.folder / "run.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("captionkit")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return handler


def build_captioner(
    model: str | None = None,
    *,
    task: str = "<CAPTION>",
    task_input: str | None = None,
    max_new_tokens: int = 256,
    num_beams: int = 3,
    early_stopping: bool = False,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    adapter: str | Path | None = None,
):
    """A captioner backend for ``model``, its family read from the model's config.

    Without ``model``: the base model an ``adapter`` was trained on, else the default.
    """
    from captionkit.models import backend_for_model_type, read_model_config
    from captionkit.models.florence2 import GenerationSettings, native_model_id

    model = native_model_id(str(model or adapter_base_model(adapter) or DEFAULT_CAPTION_MODEL))
    config = read_model_config(model, cache_dir=cache_dir, revision=revision)
    backend = backend_for_model_type(str(config.get("model_type", "")), "captioner")
    return backend.factory(
        model=model, task=task, task_input=task_input,
        generation=GenerationSettings(
            max_new_tokens=max_new_tokens, num_beams=num_beams, early_stopping=early_stopping,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        ),
        dtype=dtype, attn_implementation=attn_implementation, device=device, cache_dir=cache_dir,
        revision=revision, adapter=adapter,
    )


def adapter_base_model(adapter: str | Path | None) -> str | None:
    """The base model recorded in a PEFT adapter folder, if any."""
    if adapter is None:
        return None
    config = Path(adapter).expanduser() / "adapter_config.json"
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or None


def output_location(source: Source, output_dir: str | Path | None) -> Path:
    """Where the store, log and (without --output-dir) nothing else lives."""
    return Path(output_dir).expanduser().resolve() if output_dir else source.root


def caption(
    path: str | Path,
    *,
    model: str | None = None,
    task: str = "<CAPTION>",
    task_input: str | None = None,
    max_new_tokens: int = 256,
    num_beams: int = 3,
    early_stopping: bool = False,
    repetition_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    dtype: str = "auto",
    attn_implementation: str = "sdpa",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    adapter: str | Path | None = None,
    batch_size: int = 8,
    workers: int = 4,
    recursive: bool = True,
    include_hidden: bool = False,
    image_column: str | None = None,
    base_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    ext: str = ".txt",
    existing: str = "skip",
    on_collision: str = "skip",
    append_separator: str = ", ",
    prefix: str = "",
    suffix: str = "",
    cleanup: bool = True,
    collapse_loops: bool = True,
    background: str = "white",
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    keep_results: bool = False,
    retry_errors: bool = False,
    write_sidecars: bool = True,
    export: Sequence[str | Path] = (),
    progress: str = "quiet",
    captioner=None,
) -> RunSummary:
    """Caption every image under ``path`` (folder, image or manifest); resumable and safe with bad files.

    ``model`` defaults to the base model of ``adapter`` when one is given, else to
    Florence-2-base. ``captioner`` overrides the backend built from ``model`` and the
    generation options (for library users with a model already loaded).
    """
    from captionkit.steps.captioner import CaptionStep, CaptionText

    def make_step(store: Store):
        nonlocal captioner
        if captioner is None:
            captioner = build_captioner(
                model, task=task, task_input=task_input, max_new_tokens=max_new_tokens, num_beams=num_beams,
                early_stopping=early_stopping, repetition_penalty=repetition_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size, dtype=dtype, attn_implementation=attn_implementation,
                device=device, cache_dir=cache_dir, revision=revision, adapter=adapter,
            )
        return CaptionStep(
            captioner, CaptionText(prefix=prefix, suffix=suffix, cleanup=cleanup, collapse_loops=collapse_loops),
            batch_size=batch_size, background=parse_color(background), max_pixels=max_image_pixels,
        )

    return _run_step(
        path, make_step, f"model {model or adapter or DEFAULT_CAPTION_MODEL}, task {task}", batch_size=batch_size,
        workers=workers,
        recursive=recursive, include_hidden=include_hidden, image_column=image_column, base_dir=base_dir,
        output_dir=output_dir, ext=ext, existing=existing, on_collision=on_collision,
        append_separator=append_separator, keep_results=keep_results, retry_errors=retry_errors,
        write_sidecars=write_sidecars, export=export, progress=progress,
    )


def _run_step(
    path: str | Path,
    make_step,
    description: str,
    *,
    batch_size: int,
    workers: int,
    recursive: bool,
    include_hidden: bool,
    image_column: str | None,
    base_dir: str | Path | None,
    output_dir: str | Path | None,
    ext: str,
    existing: str,
    on_collision: str,
    append_separator: str,
    keep_results: bool,
    retry_errors: bool,
    write_sidecars: bool,
    export: Sequence[str | Path],
    progress: str,
    after=None,
) -> RunSummary:
    """Shared by every step: source → store → executor → sidecars → exports."""
    if batch_size < 1:
        raise CaptionkitError("--batch-size must be at least 1.")
    _check_choice("--existing", existing, [policy.value for policy in ExistingPolicy])
    _check_choice("--on-collision", on_collision, [policy.value for policy in CollisionPolicy])
    source = open_source(path, recursive=recursive, image_column=image_column, base_dir=base_dir,
                         include_hidden=include_hidden)
    location = output_location(source, output_dir)
    reporter = Progress(progress)
    with Store(location) as store:
        handler = attach_run_log(store)
        try:
            records = list(source)
            step = make_step(store)
            log.info("%s %s: %d images, %s", step.field, source.description, len(records), description)
            sink = None
            if write_sidecars:
                sink = SidecarSink(
                    store, step.field, extension=ext,
                    output_dir=Path(output_dir).expanduser().resolve() if output_dir else None,
                    existing=ExistingPolicy(existing), collisions=CollisionPolicy(on_collision),
                    append_separator=append_separator,
                )
            options = RunOptions(workers=workers, keep_results=keep_results, retry_errors=retry_errors)
            summary = LocalExecutor(options, reporter).run(step, records, store, sink)
            if after is not None:
                after(step, records, store)
            for destination in export:
                export_results(store, destination, [step.field])
            log.info("summary: %s", summary.as_dict())
            reporter.event("summary", **summary.as_dict())
            return summary
        finally:
            logging.getLogger("captionkit").removeHandler(handler)
            handler.close()


def export(location: str | Path, destination: str | Path, steps: Sequence[str] | None = None) -> int:
    """Write the results stored under ``location`` to a .jsonl or .parquet file; returns the row count."""
    with Store.open_existing(location) as store:
        return export_results(store, destination, steps)


def _check_choice(option: str, value: str, choices: list[str]) -> None:
    if value not in choices:
        raise CaptionkitError(f"{option} {value}: use one of {', '.join(choices)}.")


def tag_options(
    *,
    general_threshold: float = 0.35,
    character_threshold: float = 0.85,
    thresholds: dict[str, float] | None = None,
    use_model_thresholds: bool = False,
    mcut: bool = False,
    max_tags: int | None = None,
    include_rating: bool = False,
    blacklist: Sequence[str] = (),
    replacements: dict[str, str] | None = None,
    always_first: Sequence[str] = (),
    underscores_to_spaces: bool = True,
    escape_parentheses: bool = False,
    order: str = "score",
    separator: str = ", ",
):
    """TagOptions from keyword arguments, with errors users can act on."""
    from captionkit.tagging import TagOptions

    try:
        return TagOptions(
            general_threshold=general_threshold, character_threshold=character_threshold,
            thresholds=dict(thresholds or {}), use_model_thresholds=use_model_thresholds, mcut=mcut,
            max_tags=max_tags, include_rating=include_rating, blacklist=list(blacklist),
            replacements=dict(replacements or {}), always_first=list(always_first),
            underscores_to_spaces=underscores_to_spaces, escape_parentheses=escape_parentheses, order=order,
            separator=separator,
        )
    except ValueError as error:
        raise CaptionkitError(str(error)) from error


def tag(
    path: str | Path,
    *,
    model: str = "SmilingWolf/wd-swinv2-tagger-v3",
    device: str = "auto",
    cache_dir: str | Path | None = None,
    options=None,
    print_scores: bool = False,
    print_stream=None,
    batch_size: int = 32,
    workers: int = 4,
    recursive: bool = True,
    include_hidden: bool = False,
    image_column: str | None = None,
    base_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    ext: str = ".txt",
    existing: str = "skip",
    on_collision: str = "skip",
    append_separator: str = ", ",
    background: str = "white",
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    keep_results: bool = False,
    retry_errors: bool = False,
    write_sidecars: bool = True,
    export: Sequence[str | Path] = (),
    progress: str = "quiet",
) -> RunSummary:
    """Tag every image under ``path`` with a WD-style or captionkit-trained tagger.

    ``options`` is a :class:`captionkit.tagging.TagOptions` (see :func:`tag_options`). All
    scores are stored, so :func:`render` can apply other options later without the model.
    ``print_scores`` prints ``image: tag: score`` lines for the chosen tags.
    """
    import sys

    from captionkit.steps.tagger import TagStep

    chosen = options if options is not None else tag_options()

    def make_step(store: Store):
        return TagStep(model, store, chosen, device=device, cache_dir=cache_dir, batch_size=batch_size,
                       background=parse_color(background), max_pixels=max_image_pixels)

    def print_lines(step, records, store: Store) -> None:
        stream = print_stream or sys.stdout
        stored = store.get_many(step.field, (record.id for record in records))
        for record in records:
            result = stored.get(record.id)
            if result is None or result.status != "ok":
                continue
            for name, score in step.renderer.select(result.raw):
                stream.write(f"{record.id}: {name}: {score:.3f}\n")
        stream.flush()

    return _run_step(
        path, make_step, f"tagger {model}", batch_size=batch_size, workers=workers, recursive=recursive,
        include_hidden=include_hidden, image_column=image_column, base_dir=base_dir, output_dir=output_dir,
        ext=ext, existing=existing, on_collision=on_collision, append_separator=append_separator,
        keep_results=keep_results, retry_errors=retry_errors, write_sidecars=write_sidecars, export=export,
        progress=progress, after=print_lines if print_scores else None,
    )


def render(
    path: str | Path,
    *,
    field: str = "tags",
    options=None,
    prefix: str = "",
    suffix: str = "",
    cleanup: bool = True,
    collapse_loops: bool = True,
    recursive: bool = True,
    include_hidden: bool = False,
    image_column: str | None = None,
    base_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    ext: str = ".txt",
    existing: str = "skip",
    on_collision: str = "skip",
    append_separator: str = ", ",
) -> int:
    """Rewrite caption files from stored results with new settings; no model runs. Returns files written."""
    from captionkit.steps.captioner import CaptionStep, CaptionText
    from captionkit.steps.tagger import TagRenderer

    _check_choice("--field", field, ["tags", "caption"])
    _check_choice("--existing", existing, [policy.value for policy in ExistingPolicy])
    _check_choice("--on-collision", on_collision, [policy.value for policy in CollisionPolicy])
    source = open_source(path, recursive=recursive, image_column=image_column, base_dir=base_dir,
                         include_hidden=include_hidden)
    location = output_location(source, output_dir)
    with Store.open_existing(location) as store:
        if field == "tags":
            renderer = TagRenderer(store, options if options is not None else tag_options())
            render_one = renderer.render
        else:
            render_one = CaptionStep(None, CaptionText(prefix=prefix, suffix=suffix, cleanup=cleanup,
                                                       collapse_loops=collapse_loops)).render
        records = list(source)
        stored = store.get_many(field, (record.id for record in records))
        texts = {rid: render_one(result.raw) for rid, result in stored.items() if result.status == "ok"}
        if not texts:
            raise CaptionkitError(f"{location}: no stored '{field}' results for these images; run that step first.")
        store.set_texts(field, texts)
        sink = SidecarSink(
            store, field, extension=ext,
            output_dir=Path(output_dir).expanduser().resolve() if output_dir else None,
            existing=ExistingPolicy(existing), collisions=CollisionPolicy(on_collision),
            append_separator=append_separator,
        )
        sink.plan(records)  # every record: a failed image still shares its file name with the others
        return sink.write(texts)
