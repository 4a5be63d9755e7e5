"""The library API. The CLI is a thin layer over these functions (same names, same options)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from captionkit.core import locations
from captionkit.core.errors import CaptionkitError, SourceError
from captionkit.core.images import DEFAULT_MAX_PIXELS, parse_color
from captionkit.core.records import Source, no_images_message, open_source
from captionkit.core.sinks import CollisionPolicy, ExistingPolicy, SidecarSink, export_results
from captionkit.core.store import STORE_FOLDER, Store, attach_run_log
from captionkit.core.webdataset import WebDatasetSource
from captionkit.executors.local import RunOptions, RunSummary
from captionkit.executors.progress import Progress
from captionkit.options import (
    BACKENDS,
    DEFAULT_CAPTION_MODEL,
    ModelOptions,
    adapter_base_model,
    build_captioner,
    check_choice,
    tag_options,
)

log = logging.getLogger("captionkit")
# The options and the captioner they build live a layer down (captionkit.options); the api hands them on.
__all__ = [
    "BACKENDS", "DEFAULT_CAPTION_MODEL", "ModelOptions", "adapter_base_model", "attach_run_log", "build_captioner",
    "caption", "check_input_exists", "export", "inspect", "no_images_message", "output_location", "render",
    "stored_field_values", "tag", "tag_options",
]


def check_input_exists(path: str | Path) -> None:
    """Fail on a missing input path with the same sentence :func:`open_source` gives, but before any model."""
    from captionkit.core.webdataset import is_shard_pattern, open_shards

    if locations.is_url(str(path)):
        return  # an object-store URL is checked when it is opened (one request, with the run's credentials)
    if is_shard_pattern(path):  # WebDataset shards: every shard of the pattern must be there
        open_shards(path)
        return
    location = locations.local_path(path)
    if not location.exists():
        raise SourceError(f"{location}: no such file or folder. Check the path.")


def output_location(source: Source, output_dir: str | Path | None) -> Path:
    """Where the store, log and (without --output-dir) nothing else lives."""
    return Path(output_dir).expanduser().resolve() if output_dir else source.root


def _model_options(options: ModelOptions | None, values: dict) -> ModelOptions:
    """ModelOptions from an object or keyword arguments; an unknown keyword gets a did-you-mean."""
    import difflib

    known = {item.name for item in fields(ModelOptions)}
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise CaptionkitError(f"caption(): unknown option '{name}'.{hint}")
    if options is not None:
        if values:
            raise CaptionkitError("caption(): pass either options= or model keyword arguments, not both.")
        return options
    return ModelOptions(**values)


def caption(
    path: str | Path,
    *,
    options: ModelOptions | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
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
    strip_openers: bool = False,
    sample_choice: str = "first",
    sample_separator: str = "\n",
    background: str = "white",
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    keep_results: bool = False,
    retry_errors: bool = False,
    write_sidecars: bool = True,
    export: Sequence[str | Path] = (),
    progress: str = "quiet",
    captioner=None,
    listener=None,
    stop=None,
    executor: str = "local",
    ray_address: str | None = None,
    devices: str | Sequence[str] | None = None,
    ray_actors: int | None = None,
    ray_gpus_per_actor: float | None = None,
    ray_cpus_per_actor: float = 1.0,
    ray_stall_timeout: float | None = None,
    storage_options: dict | str | None = None,
    io_workers: int = 16,
    **model_options,
) -> RunSummary:
    """Caption every image under ``path`` (folder, image or manifest); resumable and safe with bad files.

    Model options are :class:`ModelOptions` fields, given as ``options=`` or as keywords
    (``model=``, ``prompt=``, ``task=``, ``backend=``, ...). ``model`` defaults to the base
    model of ``adapter`` when one is given, else to Florence-2-base. ``captioner``
    overrides the backend built from them (for library users with a model already loaded).
    A ``prompt`` may name record fields, e.g. ``"Its tags: {tags}"``, filled per image
    from the store or the manifest.

    ``executor="ray"`` runs on a Ray cluster (``ray_address``; ``ray_actors`` model replicas with
    ``ray_gpus_per_actor`` GPUs and ``ray_cpus_per_actor`` CPUs each; ``ray_stall_timeout`` seconds without
    progress end the run, default 600, 0: never); ``devices=["cuda:0", "cuda:1"]``
    runs one worker process per GPU of this machine. Results are the same as with the local executor.

    ``path`` may be an object-store URL (``s3://bucket/prefix``, a manifest object, one image) and a
    manifest's image column may hold URLs: see :func:`_run_step` for ``storage_options`` and ``io_workers``.
    """
    from captionkit.steps.captioner import CaptionStep, CaptionText

    chosen = _model_options(options, model_options)
    if captioner is not None and (model_options or options is not None):
        raise CaptionkitError("caption(): with captioner= the model is already built; pass its options to "
                              "build_captioner() instead of to caption().")
    if batch_size is None:  # a server batch waits for its slowest reply: keep several per connection in flight
        batch_size = (chosen.concurrency or 8) * 4 if chosen.backend == "openai" else 8
    text = CaptionText(prefix=prefix, suffix=suffix, cleanup=cleanup, collapse_loops=collapse_loops,
                       strip_openers=strip_openers, sample_choice=sample_choice, sample_separator=sample_separator)
    given = captioner is not None
    check_input_exists(path)  # a mistyped folder is named before a model is looked for or loaded
    if captioner is None:  # build (and validate every option) before any file or store is touched
        captioner = build_captioner(options=chosen)
    prompt = chosen.prompt if chosen.prompt is not None else getattr(getattr(captioner, "chat", None), "prompt", None)

    def make_step(store: Store):
        def field_values(records, names):
            return stored_field_values(store, records, names)

        return CaptionStep(
            captioner, text, batch_size=batch_size, background=parse_color(background), max_pixels=max_image_pixels,
            prompt=prompt, field_values=field_values,
        )

    model_name = chosen.model or chosen.adapter or DEFAULT_CAPTION_MODEL
    task = chosen.task
    if given:  # the log names what the given captioner runs, not the defaults of the empty options here
        model_name = str(getattr(captioner, "model_name", None) or type(captioner).__name__)
        if getattr(captioner, "adapter", None):
            model_name += f" with adapter {captioner.adapter}"
        task = getattr(captioner, "task", None) or task
    what = f"task {task or '<CAPTION>'}" if prompt is None else f"prompt {prompt!r}"
    return _run_step(
        path, make_step, f"model {model_name}, {what}", batch_size=batch_size,
        workers=workers,
        recursive=recursive, include_hidden=include_hidden, image_column=image_column, base_dir=base_dir,
        output_dir=output_dir, ext=ext, existing=existing, on_collision=on_collision,
        append_separator=append_separator, keep_results=keep_results, retry_errors=retry_errors,
        write_sidecars=write_sidecars, export=export, progress=progress, listener=listener, stop=stop,
        executor=executor, ray_address=ray_address, devices=devices,
        ray_options=_ray_options(ray_actors, ray_gpus_per_actor, ray_cpus_per_actor, ray_stall_timeout),
        storage_options=storage_options, io_workers=io_workers,
    )


def _ray_options(actors: int | None, gpus_per_actor: float | None, cpus_per_actor: float,
                 stall_timeout: float | None = None) -> dict:
    return {"ray_actors": actors, "ray_gpus_per_actor": gpus_per_actor, "ray_cpus_per_actor": cpus_per_actor,
            "ray_stall_timeout": stall_timeout}


def stored_field_values(store: Store, records, names: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per record id, the stored text of other steps' fields (``tags``, ``caption``) named in a prompt."""
    values: dict[str, dict[str, str]] = {}
    ids = [record.id for record in records]
    for name in names:
        if name not in store.steps():
            continue
        for record_id, result in store.get_many(name, ids).items():
            if result.status == "ok" and result.text is not None:
                values.setdefault(record_id, {})[name] = result.text
    return values


def _run_step(
    path: str | Path,
    make_step,
    description: str,
    *,
    batch_size: int,
    workers: int | None,
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
    listener=None,
    stop=None,
    executor: str = "local",
    ray_address: str | None = None,
    devices: str | Sequence[str] | None = None,
    ray_options: dict | None = None,
    storage_options: dict | str | None = None,
    io_workers: int = 16,
) -> RunSummary:
    """Shared by every step: source → store → executor → sidecars → exports.

    Object-store inputs (``s3://``, ``gs://``, ``az://``, ``hf://``; ``file://`` is local): credentials
    come from the environment and profiles as each fsspec backend reads them, plus ``storage_options``
    (a dict or JSON text: the filesystem's keyword arguments, e.g. an ``endpoint_url``); they stay in
    memory only. A remote image needs ``output_dir`` (local or a URL): the store is SQLite on a local
    disk (in ``output_dir``, or for a URL ``output_dir`` in :func:`remote_output_cache`).
    ``io_workers`` object fetches are in flight at once, each retried on 5xx and timeouts.

    ``listener`` receives progress events as dicts; setting the ``stop`` event (a
    ``threading.Event``) from another thread ends the run after the current batch.
    ``executor`` (``local`` or ``ray``, with ``ray_address`` and ``ray_options``) and ``devices``
    choose where the model runs; this process commits every result either way.
    """
    from captionkit.executors import make_executor

    if batch_size < 1:
        raise CaptionkitError("--batch-size must be at least 1.")
    check_choice("--existing", existing, [policy.value for policy in ExistingPolicy])
    check_choice("--on-collision", on_collision, [policy.value for policy in CollisionPolicy])
    if io_workers < 1:
        raise CaptionkitError("--io-workers must be at least 1.")
    if workers is not None and workers < 1:
        raise CaptionkitError("--workers must be at least 1 (or left out: chosen by measurement).")
    options = RunOptions(workers=workers, io_workers=io_workers, keep_results=keep_results,
                         retry_errors=retry_errors, stop=stop)
    reporter = Progress(progress, listener=listener)
    runner = make_executor(executor, options, reporter, ray_address=ray_address, devices=devices,
                           **(ray_options or {}))  # before any file: a missing extra is one plain sentence
    with locations.storage_options_set(storage_options):
        return _run_listed(path, make_step, description, runner, reporter, recursive=recursive,
                           image_column=image_column, base_dir=base_dir, include_hidden=include_hidden,
                           output_dir=output_dir, ext=ext, existing=existing, on_collision=on_collision,
                           append_separator=append_separator, write_sidecars=write_sidecars, export=export,
                           after=after)


def remote_output_cache(output_url: str) -> Path:
    """The local folder holding the store (and staged sidecars) of a run whose ``--output-dir`` is a URL.

    See :func:`captionkit.core.locations.output_cache`; the same URL resumes from the same store.
    """
    return locations.output_cache(output_url)


def _run_listed(path, make_step, description: str, runner, reporter, *, recursive: bool, image_column,
                base_dir, include_hidden: bool, output_dir, ext: str, existing: str, on_collision: str,
                append_separator: str, write_sidecars: bool, export, after) -> RunSummary:
    """:func:`_run_step` after the executor is made, with the run's storage options in effect."""
    source = open_source(path, recursive=recursive, image_column=image_column, base_dir=base_dir,
                         include_hidden=include_hidden)
    shards = isinstance(source, WebDatasetSource)
    if shards:
        check_shard_output(source, output_dir)
    records = runner.list_records(source)
    if not records:
        raise CaptionkitError(no_images_message(source))
    remote_output = output_dir is not None and locations.is_url(str(output_dir))
    destination_url = str(output_dir) if remote_output else None
    if output_dir is None and (source.remote or any(record.url is not None for record in records)):
        raise CaptionkitError(
            f"{source.description}: images in object storage need --output-dir (a local folder or a URL): "
            "captions cannot be written beside them. The store (SQLite) and the caption files go there.")
    if remote_output:  # the store and staged caption files live in a local cache keyed by the URL
        location = remote_output_cache(str(output_dir))
        output_dir = location / "files"
    else:
        output_dir = locations.local_path(output_dir) if output_dir is not None else None
        location = output_location(source, output_dir)
    new_store = not (location / STORE_FOLDER).exists()
    created = location  # the outermost folder this run creates, removed again if it fails before any result
    while not created.parent.exists():
        created = created.parent
    created = created if not created.exists() else None
    store = Store(location)
    handler = attach_run_log(store)
    if new_store:
        log.info("created the captionkit store %s", store.path)
    try:
        with store:
            step = make_step(store)
            log.info("%s %s: %d images, %s", step.field, source.description, len(records), description)
            sink = None
            if shards and write_sidecars:  # new shards in --output-dir, never sidecars beside the input shards
                from captionkit.core.webdataset import ShardSink

                # a URL --output-dir gets its shards uploaded one by one as they finish, nothing staged
                sink = ShardSink(store, destination_url if remote_output else Path(output_dir).expanduser())
            elif write_sidecars:
                sink = SidecarSink(
                    store, step.field, extension=ext,
                    output_dir=Path(output_dir).expanduser().resolve() if output_dir else None,
                    existing=ExistingPolicy(existing), collisions=CollisionPolicy(on_collision),
                    append_separator=append_separator,
                )
            summary = runner.run(step, records, store, sink)
            if shards and write_sidecars:
                finish_shards(sink, summary)
            if remote_output and sink is not None and not shards:
                uploaded = locations.upload_tree(output_dir, str(destination_url))
                log.info("uploaded %d caption files to %s", uploaded, destination_url)
            if after is not None:
                after(step, records, store)
            for destination in export:
                export_results(store, destination, [step.field])
            log.info("summary: %s", summary.as_dict())
            reporter.event("summary", **summary.as_dict())
            return summary
    except BaseException:
        if new_store and not store_has_results(store.path):
            remove_store_folder(store.folder, handler)  # a run that failed before its first image leaves nothing
            handler = None
            if created is not None:
                _remove_empty_tree(created)
        raise
    finally:
        if handler is not None:
            logging.getLogger("captionkit").removeHandler(handler)
            handler.close()


def check_shard_output(source: WebDatasetSource, output_dir: str | Path | None) -> None:
    """WebDataset input writes new shards of the same names: they need an --output-dir that is not the input's."""
    if not output_dir:
        raise CaptionkitError(f"{source.description}: WebDataset shards need --output-dir: new shards with the same "
                              "names and keys (and a caption/tags member per sample) are written there; the input "
                              "shards are never changed.")
    if locations.is_url(str(output_dir)):
        same = any(isinstance(shard, str) and locations.parent(shard) == str(output_dir).rstrip("/")
                   for shard in source.shards)
    else:
        target = locations.local_path(output_dir).resolve()
        same = any(isinstance(shard, Path) and shard.parent == target for shard in source.shards)
    if same:
        raise CaptionkitError(f"--output-dir {output_dir}: the input shards are in this folder and the output shards "
                              "have the same names; choose another folder.")


def finish_shards(sink, summary: RunSummary) -> None:
    """Output shards the run did not write as it went (their last samples failed), counted in ``summary``."""
    before = len(sink.report.written)
    report = sink.finish()
    summary.files_written += len(report.written) - before
    if report.left_out:  # their errors are the run's (summary.errors); the shards hold every other sample
        log.info("%d sample(s) left out of the output shards (their step failed)", len(report.left_out))
    if report.pending:
        log.info("%d shard(s) not written yet (samples without a result; a rerun finishes them): %s",
                 len(report.pending), ", ".join(Path(shard).name for shard in report.pending))
    log.info("output shards: %d written by this run, %d finished before (not rewritten)", len(report.written),
             len(report.unchanged))


def store_has_results(path: Path) -> bool:
    import sqlite3

    try:
        with sqlite3.connect(path) as connection:
            return connection.execute("SELECT 1 FROM results LIMIT 1").fetchone() is not None
    except sqlite3.Error:
        return True  # unsure: keep it


def _remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` and its sub-folders if they hold no files (an --output-dir a failed run created)."""
    import os

    for root, _, files in os.walk(folder, topdown=False):
        if files:
            return
        try:
            os.rmdir(root)
        except OSError:
            return


def remove_store_folder(folder: Path, handler: logging.Handler) -> None:
    import shutil

    logging.getLogger("captionkit").removeHandler(handler)
    handler.close()
    shutil.rmtree(folder, ignore_errors=True)


def export(location: str | Path, destination: str | Path, steps: Sequence[str] | None = None,
           storage_options: dict | str | None = None) -> int:
    """Write the results stored under ``location`` to a .jsonl or .parquet file; returns the row count.

    ``location`` may be the URL ``--output-dir`` of a run (its store is in :func:`remote_output_cache`);
    ``destination`` may be a URL too (uploaded once written).
    """
    if locations.is_url(str(location)):
        location = remote_output_cache(str(location))
    with Store.open_existing(locations.local_path(location)) as store, locations.storage_options_set(storage_options):
        return export_results(store, destination, steps)


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
    workers: int | None = None,
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
    listener=None,
    stop=None,
    executor: str = "local",
    ray_address: str | None = None,
    devices: str | Sequence[str] | None = None,
    ray_actors: int | None = None,
    ray_gpus_per_actor: float | None = None,
    ray_cpus_per_actor: float = 1.0,
    ray_stall_timeout: float | None = None,
    storage_options: dict | str | None = None,
    io_workers: int = 16,
) -> RunSummary:
    """Tag every image under ``path`` with a WD-style or captionkit-trained tagger.

    ``options`` is a :class:`captionkit.core.tagging.TagOptions` (see :func:`tag_options`). All
    scores are stored, so :func:`render` can apply other options later without the model.
    ``print_scores`` prints ``image: tag: score`` lines for the chosen tags. ``executor``,
    ``ray_address``, ``devices``, the ``ray_*`` options, ``storage_options`` and ``io_workers`` are
    :func:`caption`'s.
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
        progress=progress, after=print_lines if print_scores else None, listener=listener, stop=stop,
        executor=executor, ray_address=ray_address, devices=devices,
        ray_options=_ray_options(ray_actors, ray_gpus_per_actor, ray_cpus_per_actor, ray_stall_timeout),
        storage_options=storage_options, io_workers=io_workers,
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
    strip_openers: bool = False,
    sample_choice: str = "first",
    sample_separator: str = "\n",
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
    from captionkit.steps.captioner import CaptionText
    from captionkit.steps.tagger import TagRenderer

    check_choice("--field", field, ["tags", "caption"])
    check_choice("--existing", existing, [policy.value for policy in ExistingPolicy])
    check_choice("--on-collision", on_collision, [policy.value for policy in CollisionPolicy])
    source = open_source(path, recursive=recursive, image_column=image_column, base_dir=base_dir,
                         include_hidden=include_hidden)
    location = output_location(source, output_dir)
    with Store.open_existing(location) as store:
        if field == "tags":
            renderer = TagRenderer(store, options if options is not None else tag_options())
            render_one = renderer.render
        else:
            from captionkit.models import stored_texts

            caption_text = CaptionText(prefix=prefix, suffix=suffix, cleanup=cleanup, collapse_loops=collapse_loops,
                                       strip_openers=strip_openers, sample_choice=sample_choice,
                                       sample_separator=sample_separator)
        records = list(source)
        stored = store.get_many(field, (record.id for record in records))
        if field == "tags":
            texts = {rid: render_one(result.raw) for rid, result in stored.items() if result.status == "ok"}
        else:
            texts = {rid: caption_text.render(stored_texts(result.settings, result.raw))
                     for rid, result in stored.items() if result.status == "ok"}
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


def inspect(
    path: str | Path,
    *,
    report: str | Path | None = None,
    json_report: str | Path | None = None,
    **options,
):
    """Inspect a data set (image folder or manifest) for what would spoil a training run; changes nothing.

    Returns a :class:`captionkit.inspection.InspectionReport`; writes the self-contained HTML
    ``report`` and the ``json_report`` only where paths are given. ``options`` are those of
    :func:`captionkit.inspection.inspect_dataset` (``trigger``, ``resolution``, ``full``, ...).
    """
    from captionkit.inspection import inspect_dataset

    result = inspect_dataset(path, **options)
    if report is not None:
        result.write_html(report)
    if json_report is not None:
        result.write_json(json_report)
    return result
