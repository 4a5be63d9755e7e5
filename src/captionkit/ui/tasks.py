"""What each UI job does, as functions of the library API (no gradio, no captioning loop of its own).

Each ``*_work`` function returns the callable a :class:`~captionkit.ui.jobs.JobManager`
runs on its worker thread; ``submit_*`` helpers submit it with a title.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.ui.jobs import Job, JobManager

log = logging.getLogger("captionkit.ui")
PREVIEW_COUNT = 4


def check_source(path: str, **source_options: Any):
    """The library's plain error for a missing or unreadable input, before a job is queued."""
    from captionkit.core.records import open_source

    if not str(path or "").strip():
        raise CaptionkitError("Enter a folder of images, one image, or a manifest first.")
    return open_source(Path(str(path).strip()).expanduser(), **source_options)


def _source_options(run: dict[str, Any]) -> dict[str, Any]:
    return {key: run.get(key) for key in ("recursive", "image_column", "base_dir", "include_hidden")
            if run.get(key) is not None}


# --- captioning -------------------------------------------------------------------------------------

def caption_work(manager: JobManager, path: str, options, run: dict[str, Any], clean_files: list[Path] = ()):
    """Caption ``path`` with the resident model (loaded, or swapped in, for these options)."""
    from captionkit import api

    def work(job: Job):
        if clean_files:
            removed = 0
            for file in clean_files:
                try:
                    Path(file).unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
            job.log(f"cleaned old captions: {removed} files deleted")
        job.set_phase(f"loading {options.model or 'the default model'} and reading the folder")
        model = model_arguments(manager, options, run, job)
        summary = api.caption(path, progress="quiet", listener=job.on_event, stop=job.stop, **model, **run)
        return summary.as_dict()

    return work


def model_arguments(manager: JobManager, options, run: dict[str, Any], job: Job) -> dict[str, Any]:
    """``captioner=`` the resident backend (loaded once, kept between jobs) for runs in this process.

    Runs on a Ray cluster or on several local GPUs build their own replicas from the
    options, so the resident model is freed first and ``options=`` is passed instead.
    """
    if run.get("executor", "local") != "local" or run.get("devices"):
        manager.models.release(job)
        return {"options": options}
    if run.get("batch_size") is None:  # what caption() picks from the options it is not given here
        run["batch_size"] = (options.concurrency or 8) * 4 if options.backend == "openai" else 8
    return {"captioner": manager.models.acquire(options, job)}


def submit_caption(manager: JobManager, path: str, options, run: dict[str, Any], clean_files=()) -> Job:
    check_source(path, **_source_options(run))
    title = f"caption {Path(path).name or path} with {options.model or 'the default model'}"
    return manager.submit("caption", title, caption_work(manager, path.strip(), options, run, list(clean_files)))


def spread(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items`` (first, ..., last)."""
    if len(items) <= count:
        return list(items)
    step = (len(items) - 1) / (count - 1) if count > 1 else 0
    return [items[round(index * step)] for index in range(count)]


_preview_folders: list[Path] = []


def preview_work(manager: JobManager, path: str, options, run: dict[str, Any], count: int = PREVIEW_COUNT):
    """Caption a few images of ``path`` through :func:`captionkit.api.caption` into a scratch store.

    The sample is a small manifest (with the images' fields and stored results, so a prompt
    naming ``{tags}`` is filled as in the real run); nothing is written beside the images.
    Result: ``[(image path, caption or error), ...]``.
    """
    from captionkit import api
    from captionkit.core.records import open_source
    from captionkit.core.store import STORE_FILE, STORE_FOLDER, Store

    def work(job: Job):
        source = open_source(path, **_source_options(run))
        records = [record for record in source if record.path is not None]
        if not records:
            raise CaptionkitError(api.no_images_message(source))
        picks = spread(records, count)
        location = api.output_location(source, run.get("output_dir"))
        stored: dict[str, dict[str, str]] = {}
        if (location / STORE_FOLDER / STORE_FILE).exists():
            with Store(location) as store:
                stored = api.stored_field_values(store, picks, [name for name in store.steps() if name != "caption"])
        while _preview_folders:  # the previous preview's scratch folder
            shutil.rmtree(_preview_folders.pop(), ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(prefix="captionkit-preview-"))
        _preview_folders.append(scratch)
        manifest = scratch / "sample.jsonl"
        with manifest.open("w", encoding="utf-8") as stream:
            for record in picks:
                row = {**{key: value for key, value in record.fields.items() if key != "image"},
                       **stored.get(record.id, {}), "image": str(Path(record.path).resolve())}
                stream.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        job.set_phase(f"loading {options.model or 'the default model'}")
        settings = {key: value for key, value in run.items()
                    if key not in ("recursive", "image_column", "base_dir", "include_hidden", "output_dir", "export",
                                   "existing", "on_collision", "append_separator", "ext", "keep_results",
                                   "retry_errors", "write_sidecars", "executor", "ray_address", "devices",
                                   "ray_actors", "ray_gpus_per_actor", "ray_cpus_per_actor", "ray_stall_timeout")}
        model = model_arguments(manager, options, settings, job)
        summary = api.caption(manifest, progress="quiet", image_column="image", output_dir=scratch / "out",
                              write_sidecars=False, listener=job.on_event, stop=job.stop, **model, **settings)
        results: list[tuple[str, str]] = []
        with Store(scratch / "out") as store:
            by_path = {result.path: result for result in store.iter_results("caption")}
        for record in picks:
            result = by_path.get(str(Path(record.path).resolve()))
            if result is None:
                results.append((str(record.path), "(not captioned: stopped)"))
            elif result.status == "ok":
                results.append((str(record.path), result.text or ""))
            else:
                results.append((str(record.path), f"(failed: {result.error})"))
        job.message = f"preview of {len(results)} images in {summary.elapsed_s:.1f}s"
        return results

    return work


def submit_preview(manager: JobManager, path: str, options, run: dict[str, Any], count: int = PREVIEW_COUNT) -> Job:
    check_source(path, **_source_options(run))
    title = f"preview {count} captions of {Path(path).name or path} with {options.model or 'the default model'}"
    return manager.submit("preview", title, preview_work(manager, path.strip(), options, run, count))


# --- tagging ----------------------------------------------------------------------------------------

def submit_tag(manager: JobManager, path: str, run: dict[str, Any]) -> Job:
    from captionkit import api

    check_source(path, **_source_options(run))

    def work(job: Job):
        job.set_phase(f"loading tagger {run.get('model')} and reading the folder")
        summary = api.tag(path.strip(), progress="quiet", listener=job.on_event, stop=job.stop, **run)
        return summary.as_dict()

    return manager.submit("tag", f"tag {Path(path).name or path} with {run.get('model')}", work, loads_own_model=True)


def submit_render(manager: JobManager, path: str, run: dict[str, Any]) -> Job:
    from captionkit import api

    check_source(path, **_source_options(run))

    def work(job: Job):
        job.set_phase("re-rendering tag files from the stored scores (no model)")
        written = api.render(path.strip(), field="tags", **run)
        job.message = f"{written} tag files rewritten from the stored scores"
        return written

    return manager.submit("render", f"re-render tags of {Path(path).name or path}", work)


def tag_preview(path: str, run: dict[str, Any], limit: int = 8) -> list[tuple[str, str, str]]:
    """``(image, tag file now, tag file after re-render)`` for a few images with stored scores; writes nothing."""
    from captionkit.api import output_location
    from captionkit.core.records import open_source
    from captionkit.core.sinks import SidecarSink
    from captionkit.core.store import Store
    from captionkit.steps.tagger import TagRenderer

    source = check_source(path, **_source_options(run))
    location = output_location(source, run.get("output_dir"))
    with Store.open_existing(location) as store:
        if "tags" not in store.steps():
            raise CaptionkitError(f"{location}: no stored tag scores yet; run a tag job first.")
        renderer = TagRenderer(store, run["options"])
        names = SidecarSink(store=None, step="tags", extension=run.get("ext") or ".txt",
                            output_dir=Path(run["output_dir"]).resolve() if run.get("output_dir") else None)
        rows: list[tuple[str, str, str]] = []
        records = open_source(Path(path.strip()).expanduser(), **_source_options(run))
        batch = []
        for record in records:
            batch.append(record)
            if len(batch) >= 200:
                break
        stored = store.get_many("tags", [record.id for record in batch])
        for record in batch:
            result = stored.get(record.id)
            if result is None or result.status != "ok":
                continue
            target = names._target(record, keep_extension=False)
            try:
                now = target.read_text(encoding="utf-8")
            except OSError:
                now = "(no file)"
            rows.append((record.id, now, renderer.render(result.raw)))
            if len(rows) >= limit:
                break
    return rows


# --- pipelines --------------------------------------------------------------------------------------

def pipeline_plan(path: str, workers: int | None = None) -> list[dict[str, Any]]:
    """The dry run of a pipeline file: one row per step (records, done, to run, failed before)."""
    from captionkit.pipeline import run_pipeline

    if not str(path or "").strip():
        raise CaptionkitError("Enter the path of a pipeline YAML file first.")
    report = run_pipeline(Path(path.strip()).expanduser(), dry_run=True, progress="quiet", workers=workers)
    return [{"step": step.index, "name": step.name, "type": step.type, "writes": step.output_field,
             "records": step.total, "done": step.done, "to run": step.todo, "failed": step.failed,
             "dropped": step.dropped} for step in report.steps]


def submit_pipeline(manager: JobManager, path: str, only_step: str | None = None, workers: int | None = None) -> Job:
    from captionkit.pipeline import load_pipeline, run_pipeline

    if not str(path or "").strip():
        raise CaptionkitError("Enter the path of a pipeline YAML file first.")
    file = Path(path.strip()).expanduser()
    load_pipeline(file)  # validation errors show now, not from the queue

    def work(job: Job):
        report = run_pipeline(file, only_step=only_step or None, progress="quiet", workers=workers,
                              listener=job.on_event, stop=job.stop)
        ran = [step for step in report.steps if not step.skipped]
        job.message = "; ".join(f"step {step.index} {step.name}: {step.processed} done, {step.done} already done, "
                                f"{step.failed} failed" for step in ran) or "no step ran"
        if report.interrupted:
            job.message += "; stopped: finished work is kept, run again to continue"
        if report.table is not None:
            job.message += f"; final table {report.table}"
        return [step.as_dict() for step in report.steps]

    what = f"step {only_step} of " if only_step else ""
    return manager.submit("pipeline", f"pipeline {what}{file.name}", work, loads_own_model=True)


# --- training ---------------------------------------------------------------------------------------

def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of OUTPUT/metrics.jsonl (both trainers append one per logged step or epoch)."""
    path = Path(output_dir).expanduser() / "metrics.jsonl"
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return rows


def curve_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Long-format points (x, metric, value) for loss and metric plots."""
    points = []
    for number, row in enumerate(rows, 1):
        x = row.get("step", row.get("epoch", number))
        for key, value in row.items():
            if key in ("step", "epoch", "epoch_seconds") or not isinstance(value, (int, float)):
                continue
            if "lr" in key.split("/")[-1] or "samples_per_second" in key or "grad_norm" in key:
                continue
            points.append({"x": float(x), "metric": key, "value": float(value)})
    return points


def read_samples(output_dir: str | Path, limit: int = 8) -> list[tuple[str, str]]:
    """The newest ``val/samples`` table a captioner run wrote to TensorBoard: ``(reference, generated)``."""
    logs = Path(output_dir).expanduser() / "logs"
    if not logs.is_dir():
        return []
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return []
    try:
        events = EventAccumulator(str(logs), size_guidance={"tensors": 0})
        events.Reload()
        tag = next((name for name in events.Tags().get("tensors", []) if name.startswith("val/samples")), None)
        if tag is None:
            return []
        newest = events.Tensors(tag)[-1]
        text = newest.tensor_proto.string_val[0].decode("utf-8")
    except Exception:  # a file being written, or another TensorBoard layout
        return []
    pairs = []
    for line in text.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2:
            pairs.append((cells[0], cells[1]))
    return pairs[:limit]


def load_training_config(trainer: str, config_file: str | None, overrides: list[str]):
    """The validated settings for ``captioner`` or ``tagger`` from a file and/or ``key=value`` overrides."""
    if trainer == "captioner":
        from captionkit.train.captioner import load_captioner_config as load
    elif trainer == "tagger":
        from captionkit.train.tagger import load_tagger_config as load
    else:
        raise CaptionkitError(f"trainer {trainer!r}: use captioner or tagger.")
    file = Path(config_file.strip()).expanduser() if config_file and config_file.strip() else None
    if file is not None and not file.is_file():
        raise CaptionkitError(f"{file}: no such config file. Check the path, or leave it empty and use the form.")
    if file is None and not overrides:
        raise CaptionkitError("Give a config file or fill the form (model, data folder and output folder).")
    return load(file, overrides)


def submit_training(manager: JobManager, trainer: str, config_file: str | None, overrides: list[str],
                    resume: bool = False) -> Job:
    """Start (or resume from the newest checkpoint) a captioner or tagger training run."""
    settings = load_training_config(trainer, config_file, overrides)
    output = Path(settings.output_dir)
    resume_from = None
    if resume:
        if trainer == "captioner":
            from captionkit.train.checkpoints import CheckpointManager

            checkpoints = output / "checkpoints"
            latest = CheckpointManager(checkpoints, None).latest() if checkpoints.is_dir() else None
            if latest is None:
                raise CaptionkitError(f"{checkpoints}: no checkpoint to resume from yet; start without resume.")
            resume_from = latest
        else:
            if not (output / "last").is_dir():
                raise CaptionkitError(f"{output / 'last'}: no finished epoch to resume from yet; start without resume.")
            resume_from = output

    def work(job: Job):
        watcher = threading.Event()

        def watch() -> None:  # the status panel's "step N, loss x" from the run's metrics log
            while not watcher.wait(2.0):
                rows = read_metrics(output)
                if rows:
                    last = rows[-1]
                    loss = last.get("train/loss", last.get("train_loss"))
                    with job._lock:
                        job.progress = {"step": last.get("step", last.get("epoch")), "loss": loss}

        thread = threading.Thread(target=watch, daemon=True, name="captionkit-ui-train-watch")
        thread.start()
        try:
            job.set_phase(f"training ({'resuming from ' + str(resume_from) if resume_from else 'from the start'})")
            if trainer == "captioner":
                from captionkit.train.captioner import train_captioner

                result = train_captioner(settings, resume_from=resume_from, stop=job.stop)
                if result.stopped:
                    job.message = (f"stopped at step {result.global_step}; checkpoint {result.final_path} "
                                   "(Resume continues from it)")
                else:
                    job.message = f"trained {result.global_step} steps; final model {result.final_path}"
                job.result = {"samples": result.sample_captions, "metrics": result.metrics}
            else:
                from captionkit.train.tagger import train_tagger

                result = train_tagger(settings, resume=resume_from, stop=job.stop)
                if result.stopped:
                    job.message = "stopped; Resume continues from the last finished epoch (OUTPUT/last)"
                else:
                    job.message = f"trained {result.epochs} epochs; final model {result.final_dir}"
            return job.result
        finally:
            watcher.set()
            thread.join(5)

    title = f"train {trainer} → {output}" + (" (resume)" if resume else "")
    job = manager.submit(f"train-{trainer}", title, work, loads_own_model=True)
    job.info["output_dir"] = str(output)
    return job


# --- inspection -------------------------------------------------------------------------------------

def inspection_available() -> bool:
    """True once ``captionkit.inspection`` (built separately) and ``api.inspect`` are installed."""
    from captionkit import api

    try:
        import captionkit.inspection  # noqa: F401
    except ImportError:
        return False
    return hasattr(api, "inspect")


def submit_inspection(manager: JobManager, dataset, on_done) -> Job:
    """Inspect the data set (reads only) and hand the report to ``on_done(report, html_path)``."""
    from captionkit import api

    def work(job: Job):
        job.set_phase("inspecting captions, images and tags (reads only)")
        report_dir = Path(tempfile.mkdtemp(prefix="captionkit-inspection-"))
        html = report_dir / "inspection.html"
        report = api.inspect(dataset.path, report=html, caption_ext=dataset.ext, output_dir=dataset.output_dir,
                             progress="quiet")
        flagged = on_done(report, html)
        job.message = f"{len(report.findings)} findings on {flagged} images"
        return str(html)

    return manager.submit("inspect", f"inspect {dataset.path.name}", work)
