"""The Gradio page: Caption, Tag, Train, Pipeline and Review tabs over one background job manager.

Every button calls :mod:`captionkit.ui.tasks` (the library API) or :mod:`captionkit.ui.dataset`;
long work is a job on the :class:`~captionkit.ui.jobs.JobManager`, and a timer shows the
current job to every open page. Errors become one plain sentence in the page (the
library's own message, or what happened and where the full report is), never a stack
trace.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import gradio as gr

from captionkit.core.errors import CaptionkitError
from captionkit.ui import forms, tasks
from captionkit.ui.dataset import Dataset, make_thumbnail
from captionkit.ui.jobs import JobManager, plain_error

log = logging.getLogger("captionkit.ui")

CSS = """
.ck-job {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 10px 14px;}
.ck-job .ck-title {font-weight: 600; margin-bottom: 6px;}
.ck-bar {height: 14px; background: var(--background-fill-secondary); border-radius: 7px; overflow: hidden;}
.ck-fill {height: 100%; background: var(--color-accent);}
.ck-stats {margin-top: 6px; font-variant-numeric: tabular-nums;}
.ck-message {margin-top: 6px;}
.ck-state-failed .ck-message, .ck-error {color: #c0392b; font-weight: 600;}
.ck-empty {color: var(--body-text-color-subdued); font-style: italic; padding: 12px;}
#review-gallery .grid-container {--grid-cols: 6 !important;}
#caption-preview-gallery .grid-container {--grid-cols: 4 !important;}
"""
# Gradio sets a gallery's columns to min(columns, items): one search hit would fill the whole width.
PAGE_SIZES = ["24", "48", "96"]
GROUP_ORDER = ["Florence-2 options", "Chat model options", "OpenAI-compatible server", "vLLM engine"]
CAPTION_MAIN = ("model", "backend", "existing", "prefix", "suffix")
CAPTION_OUTPUT = ("ext", "output_dir", "on_collision", "append_separator", "export", "cleanup", "collapse_loops")
LOADING = ("max_new_tokens", "repetition_penalty", "dtype", "attn_implementation", "device", "cache_dir", "revision")
TRAIN_FORM = ("model", "data", "output_dir", "mode", "steps", "batch_size", "lr", "val_split", "extra")


def _eta(seconds: Any) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_html(snapshot: dict[str, Any] | None, resident: str = "", queued: int = 0) -> str:
    """The job panel: title and state, a progress bar, images/s, ETA, current file, the last message."""
    if snapshot is None:
        return ('<div class="ck-job" data-state="idle"><div class="ck-title">No job yet</div>'
                f'<div class="ck-stats">Start one from a tab below. {html.escape(resident)}</div></div>')
    progress = snapshot["progress"]
    state = snapshot["state"]
    total = progress.get("total") or 0
    finished = (progress.get("done") or 0) + (progress.get("failed") or 0)
    if state == "done" and snapshot.get("summary") and not total:
        percent = 100.0
    else:
        percent = 100.0 * finished / total if total else (100.0 if state == "done" else 0.0)
    if total:
        stats = (f"{progress.get('done') or 0} / {total} images · {progress.get('failed') or 0} failed · "
                 f"{float(progress.get('images_per_s') or 0):.2f} images/s")
        if state == "running":  # a stopping or finished job has no time left to estimate
            stats += f" · ETA {_eta(progress.get('eta_s'))}"
        if progress.get("current") and state == "running":
            stats += f" · current: {html.escape(str(progress['current']))}"
    elif "step" in progress:
        loss = progress.get("loss")
        stats = f"step {progress['step']}" + (f" · loss {float(loss):.4f}" if isinstance(loss, (int, float)) else "")
    else:
        stats = html.escape(snapshot["phase"])
    extra = f" · {queued} queued" if queued else ""
    message = snapshot["message"] if snapshot["finished"] else snapshot["phase"]
    return (
        f'<div class="ck-job ck-state-{state}" data-state="{state}" data-job="{snapshot["id"]}">'
        f'<div class="ck-title">{html.escape(snapshot["title"])} — <span class="ck-state">{state}</span>'
        f' <span class="ck-elapsed">({_eta(snapshot["elapsed_s"])} elapsed{extra})</span></div>'
        f'<div class="ck-bar"><div class="ck-fill" style="width:{percent:.1f}%"></div></div>'
        f'<div class="ck-stats">{stats}</div>'
        f'<div class="ck-message">{html.escape(message)}</div>'
        f'<div class="ck-stats">{html.escape(resident)}</div></div>'
    )


STOP_IDLE = {"variant": "secondary", "interactive": False}
STOP_ACTIVE = {"variant": "stop", "interactive": True}


def stop_button(job) -> dict[str, Any]:
    """The Stop button: red and enabled only while a job runs (not queued, stopping or finished)."""
    return gr.update(**(STOP_ACTIVE if job is not None and job.state == "running" else STOP_IDLE))


def stop_message(job) -> str:
    """The line beside Stop: shown while the job stops, gone once it has ended (the panel says how)."""
    if job is None or job.state != "stopping":
        return ""
    return message_md(f"Stopping: {job.title} (ends after the current batch; finished work is kept).")


def error_text(error: BaseException, manager: JobManager) -> str:
    """The sentence the page shows; unexpected errors also leave their traceback in the UI log file."""
    if not isinstance(error, CaptionkitError):
        try:
            manager.log_file.parent.mkdir(parents=True, exist_ok=True)
            with manager.log_file.open("a", encoding="utf-8") as stream:
                stream.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} page action failed\n")
                stream.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        except OSError:
            pass
    return plain_error(error, manager.log_file)


def message_md(text: str, error: bool = False) -> str:
    if not text:
        return ""
    safe = html.escape(text)
    return f'<div class="ck-error">Error: {safe}</div>' if error else f"<div>{safe}</div>"


def widget(field: forms.Field, elem_prefix: str, **overrides):
    """A Gradio component for one CLI option, with its help text."""
    label = field.name.replace("_", " ").capitalize()
    info = (field.help + f" ({field.label})").strip()
    elem_id = f"{elem_prefix}-{field.name.replace('_', '-')}"
    value = field.widget_default()
    if field.kind == "bool":
        return gr.Checkbox(value=value, label=label, info=info, elem_id=elem_id, **overrides)
    if field.kind == "tristate":
        return gr.Dropdown(list(forms.TRISTATE), value=value, label=label, info=info, elem_id=elem_id, **overrides)
    if field.kind == "choice":
        return gr.Dropdown(list(field.choices), value=value, label=label, info=info, elem_id=elem_id,
                           allow_custom_value=field.name == "task", **overrides)
    if field.kind == "float" and field.name.endswith("threshold"):
        return gr.Slider(0.0, 1.0, value=value, step=0.01, label=label, info=info, elem_id=elem_id, **overrides)
    if field.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if field.kind == "int" else None, label=label, info=info,
                         elem_id=elem_id, **overrides)
    return gr.Textbox(value=value, label=label, info=info, elem_id=elem_id, max_lines=1, **overrides)


class App:
    """Holds the job manager and open data sets; builds the Blocks."""

    def __init__(self, manager: JobManager | None = None) -> None:
        self.manager = manager or JobManager()
        self.datasets: dict[tuple, Dataset] = {}
        self.inspections: dict[tuple, str] = {}  # data set key → HTML report path
        self.blocks: gr.Blocks | None = None
        self._placeholder: str | None = None

    # --- helpers ------------------------------------------------------------------------------------
    def guard(self, outputs: int, message_at: int = 0):
        """Turn any error of a handler into a plain message in output ``message_at``; others unchanged."""

        def wrap(fn):
            @functools.wraps(fn)
            def run(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - every error becomes a sentence in the page
                    values = [gr.update() for _ in range(outputs)]
                    values[message_at] = message_md(error_text(error, self.manager), error=True)
                    return tuple(values) if outputs > 1 else values[0]

            return run

        return wrap

    def placeholder(self) -> str:
        if self._placeholder is None or not Path(self._placeholder).exists():
            from PIL import Image

            path = Path(tempfile.gettempdir()) / "captionkit-ui-no-thumbnail.png"
            Image.new("RGB", (64, 64), (200, 200, 200)).save(path)
            self._placeholder = str(path)
        return self._placeholder

    def allow(self, folder: Path) -> None:
        """Let the page show files under ``folder`` (thumbnails); Gradio refuses others."""
        if self.blocks is not None:
            allowed = getattr(self.blocks, "allowed_paths", None)
            if isinstance(allowed, list) and str(folder) not in allowed:
                allowed.append(str(folder))

    def refresh_status(self):
        """What every open page shows each second: the job panel, its log, the Stop button and its message."""
        job = self.manager.latest()
        snapshot = job.snapshot() if job is not None else None
        queued = len(self.manager.queued())
        resident = self.manager.models.describe()
        log_text = "\n".join(snapshot["log"][-400:]) if snapshot else ""
        return status_html(snapshot, resident, queued), log_text, stop_button(job), stop_message(job)

    def stop_job(self):
        """The Stop button: the panel redrawn at once (the job shown stopping), not at the next timer tick."""
        job = self.manager.stop()
        status, log_text, button, message = self.refresh_status()
        if job is None:
            return status, log_text, button, message_md("No job is running.")
        return status, log_text, button, message

    # --- caption ------------------------------------------------------------------------------------
    def _caption_values(self, names: list[str], raw: tuple) -> tuple:
        fields = {field.name: field for field in forms.caption_fields()}
        values = forms.parse_values(list(fields.values()), dict(zip(names, raw, strict=True)))
        return forms.caption_call(values)

    def build(self) -> gr.Blocks:
        kwargs: dict[str, Any] = {"title": "captionkit", "analytics_enabled": False}
        if "delete_cache" in inspect.signature(gr.Blocks.__init__).parameters:
            kwargs["delete_cache"] = (3600, 86400)  # Gradio's copies of shown thumbnails: drop those a day old
        if "css" not in inspect.signature(gr.Blocks.launch).parameters:
            kwargs["css"] = CSS
        with gr.Blocks(**kwargs) as blocks:
            gr.Markdown("# captionkit\nCaption, tag, train and review image data sets. Jobs run in the background: "
                        "close this page and come back, or open it in a second tab, to see the same job.")
            with gr.Row(equal_height=True):
                status = gr.HTML(status_html(None), elem_id="job-status")
            with gr.Row():
                stop = gr.Button("Stop the running job", elem_id="job-stop", scale=0, **STOP_IDLE)
                stop_note = gr.Markdown(elem_id="job-stop-message")
            with gr.Accordion("Log", open=False):
                log_box = gr.Textbox(label="Job log", lines=12, max_lines=12, interactive=False, elem_id="job-log",
                                     autoscroll=True)
            timer = gr.Timer(1.0)
            panel = [status, log_box, stop, stop_note]
            timer.tick(self.refresh_status, outputs=panel, show_progress="hidden")
            blocks.load(self.refresh_status, outputs=panel, show_progress="hidden")
            stop.click(self.stop_job, outputs=panel, show_progress="hidden")

            with gr.Tabs():
                with gr.Tab("Caption", id="caption"):
                    self._caption_tab()
                with gr.Tab("Tag", id="tag"):
                    self._tag_tab()
                with gr.Tab("Train", id="train"):
                    self._train_tab(timer)
                with gr.Tab("Pipeline", id="pipeline"):
                    self._pipeline_tab()
                with gr.Tab("Review", id="review"):
                    self._review_tab()
        blocks.queue(default_concurrency_limit=8)
        self.blocks = blocks
        return blocks

    def _caption_tab(self) -> None:
        fields = forms.caption_fields()
        by_name = {field.name: field for field in fields}
        components: dict[str, Any] = {}
        folder = gr.Textbox(label="Images", placeholder="A folder of images, one image, or a manifest "
                            "(jsonl/json/csv/tsv/parquet)", elem_id="caption-folder", max_lines=1)
        with gr.Row():
            components["model"] = gr.Dropdown(
                forms.model_choices(), value=None, allow_custom_value=True, label="Model",
                info="A known checkpoint, any hub id, or a local folder (the family comes from its config.json). "
                     "Empty: Florence-2-base. For an OpenAI-compatible server pick backend openai, type the "
                     "served model name and fill the server section.", elem_id="caption-model")
            components["backend"] = widget(by_name["backend"], "caption")
        with gr.Accordion("Model families", open=False):
            gr.Markdown(forms.families_text())
        with gr.Row():
            for name in ("existing", "prefix", "suffix"):
                components[name] = widget(by_name[name], "caption")
        clean = gr.Checkbox(label="Clean old captions first",
                            info="Delete the caption files there now before the run (you confirm the list first).",
                            elem_id="caption-clean")
        groups: dict[str, list[forms.Field]] = {}
        for field in fields:
            if field.name in components:
                continue
            if field.group:
                group = next((name for name in GROUP_ORDER if field.group.startswith(name)), field.group)
            elif field.name in CAPTION_OUTPUT:
                group = "Output files and text"
            elif field.name in LOADING:
                group = "Generation and loading"
            else:
                group = "Images and run"
            groups.setdefault(group, []).append(field)
        for group, members in groups.items():
            with gr.Accordion(group, open=False):
                for start in range(0, len(members), 3):
                    with gr.Row():
                        for field in members[start:start + 3]:
                            components[field.name] = widget(field, "caption")
        names = [field.name for field in fields]
        inputs = [folder] + [components[name] for name in names]
        with gr.Row():
            preview = gr.Button("Preview 4 captions", elem_id="caption-preview")
            start = gr.Button("Start captioning", variant="primary", elem_id="caption-start")
        message = gr.Markdown(elem_id="caption-message")
        pending = gr.State(None)
        with gr.Group(visible=False, elem_id="caption-confirm") as confirm_group:
            confirm_text = gr.Markdown(elem_id="caption-confirm-list")
            with gr.Row():
                confirm = gr.Button("Delete these files and start", variant="stop", elem_id="caption-confirm-delete")
                cancel = gr.Button("Cancel", elem_id="caption-confirm-cancel")
        gallery = gr.Gallery(label="Preview: sample images and their captions", columns=4, height="auto",
                             elem_id="caption-preview-gallery", allow_preview=True, object_fit="contain")

        @self.guard(4)
        def on_start(path, clean_first, *raw):
            options, run = self._caption_values(names, raw)
            if clean_first:
                dataset = Dataset(path, ext=run["ext"], output_dir=run.get("output_dir"),
                                  recursive=run["recursive"], include_hidden=run["include_hidden"],
                                  image_column=run.get("image_column"), base_dir=run.get("base_dir"))
                files = dataset.existing_caption_files()
                if files:
                    shown = "\n".join(f"- `{file}`" for file in files[:50])
                    more = f"\n- … and {len(files) - 50} more" if len(files) > 50 else ""
                    text = (f"**Clean old captions first: {len(files)} caption files will be deleted** "
                            f"before the run starts:\n{shown}{more}")
                    pending_run = {"path": path, "raw": raw, "files": [str(file) for file in files]}
                    return "", gr.update(visible=True), text, pending_run
            job = tasks.submit_caption(self.manager, path, options, run)
            return message_md(f"Started: {job.title}."), gr.update(visible=False), "", None

        start.click(on_start, inputs=[folder, clean, *components_list(components, names)],
                    outputs=[message, confirm_group, confirm_text, pending])

        @self.guard(3)
        def on_confirm(state):
            if not state:
                return message_md("Nothing to confirm."), gr.update(visible=False), None
            options, run = self._caption_values(names, tuple(state["raw"]))
            job = tasks.submit_caption(self.manager, state["path"], options, run, clean_files=state["files"])
            return (message_md(f"Started: {job.title} (after deleting {len(state['files'])} old caption files)."),
                    gr.update(visible=False), None)

        confirm.click(on_confirm, inputs=[pending], outputs=[message, confirm_group, pending])
        cancel.click(lambda: (message_md("Cancelled: nothing was deleted."), gr.update(visible=False), None),
                     outputs=[message, confirm_group, pending])

        def on_preview(path, *raw):
            try:
                options, run = self._caption_values(names, raw)
                job = tasks.submit_preview(self.manager, path, options, run)
            except Exception as error:  # noqa: BLE001
                yield message_md(error_text(error, self.manager), error=True), gr.update()
                return
            yield message_md(f"Preview queued: {job.title}."), gr.update()
            while not self.manager.wait(job, timeout=1.0):
                snapshot = job.snapshot()
                yield message_md(f"Preview {snapshot['state']}: {snapshot['phase']}"), gr.update()
            if job.state != "done":
                yield message_md(f"Preview {job.state}: {job.message}", error=job.state == "failed"), gr.update()
                return
            scratch = Path(tempfile.gettempdir()) / "captionkit-ui-preview"
            pictures = []
            for index, (image, text) in enumerate(job.result or []):
                thumb = make_thumbnail(Path(image), scratch / f"{job.id}-{index}.jpg", side=384)
                pictures.append((str(thumb) if thumb else self.placeholder(), f"{Path(image).name}: {text}"))
            yield message_md(f"Preview: {job.message}. Start captioning to run on every image."), pictures

        preview.click(on_preview, inputs=inputs, outputs=[message, gallery])

    def _tag_tab(self) -> None:
        fields = forms.tag_fields()
        components: dict[str, Any] = {}
        folder = gr.Textbox(label="Images", placeholder="A folder of images, one image, or a manifest",
                            elem_id="tag-folder", max_lines=1)
        by_name = {field.name: field for field in fields}
        components["model"] = widget(by_name["model"], "tag")
        gr.Markdown("### Which tags are written\nChanging these updates the preview below at once (from the stored "
                    "scores, no model); **Apply** rewrites the tag files, **Start tagging** runs the tagger.")
        option_names = forms.tag_option_names()
        for start in range(0, len(option_names), 4):
            with gr.Row():
                for name in option_names[start:start + 4]:
                    components[name] = widget(by_name[name], "tag")
        with gr.Accordion("Files and run", open=False):
            rest = [field for field in fields if field.name not in components]
            for start in range(0, len(rest), 3):
                with gr.Row():
                    for field in rest[start:start + 3]:
                        components[field.name] = widget(field, "tag")
        names = [field.name for field in fields]
        with gr.Row():
            start = gr.Button("Start tagging", variant="primary", elem_id="tag-start")
            apply = gr.Button("Apply: re-render tag files from stored scores", elem_id="tag-render")
        message = gr.Markdown(elem_id="tag-message")
        preview = gr.Dataframe(headers=["image", "tag file now", "after re-render"], value=[], wrap=True,
                               label="Live preview (first images with stored scores)", elem_id="tag-preview",
                               interactive=False)

        def values(raw):
            return forms.parse_values(fields, dict(zip(names, raw, strict=True)))

        @self.guard(1)
        def on_start(path, *raw):
            job = tasks.submit_tag(self.manager, path, forms.tag_call(values(raw)))
            return message_md(f"Started: {job.title}.")

        @self.guard(1)
        def on_apply(path, *raw):
            job = tasks.submit_render(self.manager, path, forms.render_call(values(raw)))
            return message_md(f"Started: {job.title}.")

        @self.guard(2)
        def on_preview(path, *raw):
            if not str(path or "").strip():
                return "", gr.update()
            run = forms.render_call(values(raw))
            try:
                rows = tasks.tag_preview(path, run)
            except CaptionkitError as error:  # no stored scores yet: a note, not an error, while options change
                return message_md(f"Preview: {error}"), []
            changed = sum(1 for _, now, after in rows if now != after)
            return message_md(f"{changed} of {len(rows)} previewed tag files would change."), [list(r) for r in rows]

        inputs = [folder, *components_list(components, names)]
        start.click(on_start, inputs=inputs, outputs=[message])
        apply.click(on_apply, inputs=inputs, outputs=[message])
        for name in option_names:
            components[name].change(on_preview, inputs=inputs, outputs=[message, preview], show_progress="hidden")
        folder.submit(on_preview, inputs=inputs, outputs=[message, preview])

    def _train_tab(self, timer) -> None:
        gr.Markdown("Train a Florence-2 captioner or a tagger from a config file (see `examples/captioner.yaml`, "
                    "`examples/tagger.yaml`), the form, or both (the form's values override the file's). "
                    "**Stop** saves where it is; **Resume** continues from the newest checkpoint.")
        with gr.Row():
            trainer = gr.Radio(["captioner", "tagger"], value="captioner", label="Train", elem_id="train-kind")
            config = gr.Textbox(label="Config file (optional)", placeholder="examples/captioner.yaml",
                                elem_id="train-config", max_lines=1)
        with gr.Row():
            model = gr.Textbox(label="Model (captioner) or timm backbone (tagger)", elem_id="train-model",
                               max_lines=1)
            data = gr.Textbox(label="Training data folder", elem_id="train-data", max_lines=1)
            output = gr.Textbox(label="Output folder", elem_id="train-output", max_lines=1)
        with gr.Row():
            mode = gr.Dropdown(["", "full", "lora", "qlora"], value="", label="Mode (captioner)", elem_id="train-mode")
            steps = gr.Textbox(label="Max steps (captioner) / epochs (tagger)", elem_id="train-steps", max_lines=1)
            batch = gr.Textbox(label="Batch size", elem_id="train-batch", max_lines=1)
            lr = gr.Textbox(label="Learning rate", elem_id="train-lr", max_lines=1)
            val = gr.Textbox(label="Validation share (captioner val_split / tagger val_fraction)",
                             elem_id="train-val", max_lines=1)
        extra = gr.Textbox(label="More settings, one key=value per line (as --set)", lines=3, elem_id="train-extra")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            resume = gr.Button("Resume from the newest checkpoint", elem_id="train-resume")
            stop = gr.Button("Stop training", elem_id="train-stop", **STOP_IDLE)
        message = gr.Markdown(elem_id="train-message")
        curves = gr.LinePlot(x="x", y="value", color="metric", title="Loss and metrics", x_title="step (or epoch)",
                             elem_id="train-curves", height=320)
        samples = gr.Dataframe(headers=["reference", "generated"], value=[], wrap=True, interactive=False,
                               label="Sample outputs (newest validation)", elem_id="train-samples")

        def overrides(kind, model_v, data_v, output_v, mode_v, steps_v, batch_v, lr_v, val_v, extra_v) -> list[str]:
            items: list[str] = []

            def put(key, value):
                if value is not None and str(value).strip():
                    items.append(f"{key}={str(value).strip()}")

            if kind == "captioner":
                put("model", model_v)
                put("data.0.path", data_v)
                put("mode", mode_v)
                put("max_steps", steps_v)
                put("val_split", val_v)
            else:
                put("model.backbone", model_v)
                if data_v and data_v.strip():
                    items.append(f"data.train_dirs=[{data_v.strip()}]")
                put("epochs", steps_v)
                put("data.val_fraction", val_v)
            put("output_dir", output_v)
            put("batch_size", batch_v)
            put("optimizer.lr", lr_v)
            items += [line.strip() for line in (extra_v or "").splitlines() if line.strip()]
            return items

        form = [trainer, config, model, data, output, mode, steps, batch, lr, val, extra]

        def submit(resume_run: bool):
            @self.guard(1)
            def run(kind, config_v, *rest):
                job = tasks.submit_training(self.manager, kind, config_v, overrides(kind, *rest), resume=resume_run)
                return message_md(f"Started: {job.title}.")

            return run

        start.click(submit(False), inputs=form, outputs=[message])
        resume.click(submit(True), inputs=form, outputs=[message])

        def on_stop():
            job = self.manager.latest(("train-captioner", "train-tagger"))
            if job is None or job.finished_state:
                return message_md("No training is running."), stop_button(None)
            self.manager.stop(job.id)
            return message_md("Stopping: the run saves a checkpoint and ends."), stop_button(job)

        stop.click(on_stop, outputs=[message, stop])
        timer.tick(lambda: stop_button(self.manager.latest(("train-captioner", "train-tagger"))), outputs=[stop],
                   show_progress="hidden")
        cache: dict[str, Any] = {}

        def refresh():
            import pandas

            job = self.manager.latest(("train-captioner", "train-tagger"))
            if job is None or "output_dir" not in job.info:
                return gr.update(), gr.update()
            folder = job.info["output_dir"]
            points = tasks.curve_rows(tasks.read_metrics(folder))
            key = (folder, len(points), job.state)
            if cache.get("key") == key:
                return gr.update(), gr.update()
            cache["key"] = key
            frame = pandas.DataFrame(points or [], columns=["x", "metric", "value"])
            validations = (folder, sum(1 for point in points if point["metric"].startswith("val/")), job.state)
            if cache.get("validations") == validations:  # samples change only when validation ran
                return frame, gr.update()
            cache["validations"] = validations
            pairs = tasks.read_samples(folder)
            if not pairs and isinstance(job.result, dict):
                pairs = [(reference, generated) for generated, reference in job.result.get("samples") or []]
            return frame, [list(pair) for pair in pairs]

        timer.tick(refresh, outputs=[curves, samples], show_progress="hidden")

    def _pipeline_tab(self) -> None:
        gr.Markdown("Load a pipeline YAML file (captionkit's or Dataflow-Gen's spelling) to see its plan: records, "
                    "what is already done and what would run. Run it whole, or one step at a time.")
        with gr.Row():
            path = gr.Textbox(label="Pipeline file", placeholder="examples/pipeline.yaml", elem_id="pipeline-file",
                              max_lines=1)
            load = gr.Button("Load and plan", elem_id="pipeline-load", scale=0)
        message = gr.Markdown(elem_id="pipeline-message")
        plan = gr.Dataframe(headers=["step", "name", "type", "writes", "records", "done", "to run", "failed",
                                     "dropped"], value=[], interactive=False, label="Plan", elem_id="pipeline-plan")
        with gr.Row():
            step = gr.Dropdown([], label="Step", elem_id="pipeline-step")
            run_step = gr.Button("Run this step", elem_id="pipeline-run-step")
            run_all = gr.Button("Run every step", variant="primary", elem_id="pipeline-run")
        source = gr.Code(label="File", language="yaml", interactive=False, elem_id="pipeline-source")

        @self.guard(4)
        def on_load(file):
            rows = tasks.pipeline_plan(file)
            text = Path(file.strip()).expanduser().read_text(encoding="utf-8")
            names = [row["name"] for row in rows]
            todo = sum(row["to run"] for row in rows)
            return (message_md(f"{len(rows)} steps; {todo} step-records to run."),
                    [list(row.values()) for row in rows], gr.update(choices=names, value=names[0] if names else None),
                    text)

        @self.guard(1)
        def on_run(file, name=None):
            job = tasks.submit_pipeline(self.manager, file, only_step=name)
            return message_md(f"Started: {job.title}. Load the plan again when it finished to see the next step.")

        load.click(on_load, inputs=[path], outputs=[message, plan, step, source])
        run_step.click(on_run, inputs=[path, step], outputs=[message])
        run_all.click(lambda file: on_run(file), inputs=[path], outputs=[message])

    def _review_tab(self) -> None:
        with gr.Row():
            folder = gr.Textbox(label="Data set", placeholder="A captioned folder of images (or a manifest)",
                                elem_id="review-folder", max_lines=1, scale=3)
            ext = gr.Textbox(value=".txt", label="Caption extension", elem_id="review-ext", max_lines=1, scale=1)
            output_dir = gr.Textbox(label="Output folder (if captions went elsewhere)", elem_id="review-output",
                                    max_lines=1, scale=2)
            open_button = gr.Button("Open / refresh", variant="primary", elem_id="review-open", scale=0)
        with gr.Row():
            search = gr.Textbox(label="Search text (caption, stored caption, tags, file name)",
                                elem_id="review-search", max_lines=1)
            tag = gr.Textbox(label="Has tag", elem_id="review-tag", max_lines=1)
            empty = gr.Checkbox(label="Empty or missing caption", elem_id="review-empty")
            flagged = gr.Checkbox(label="Flagged by inspection", elem_id="review-flagged")
            apply = gr.Button("Filter", elem_id="review-filter", scale=0)
        with gr.Row():
            previous = gr.Button("◀ Previous", elem_id="review-prev", scale=0)
            page = gr.Number(value=1, precision=0, label="Page", elem_id="review-page", minimum=1)
            size = gr.Dropdown(PAGE_SIZES, value="24", label="Per page", elem_id="review-size")
            following = gr.Button("Next ▶", elem_id="review-next", scale=0)
            count = gr.Markdown(elem_id="review-count")
        gallery = gr.Gallery(label="Images", columns=6, height="auto", allow_preview=False, elem_id="review-gallery",
                             object_fit="cover")
        with gr.Row():
            with gr.Column(scale=1):
                picture = gr.Image(label="Selected", interactive=False, elem_id="review-image", height=320)
            with gr.Column(scale=2):
                selected = gr.Markdown(elem_id="review-file")
                caption = gr.Textbox(label="Caption file (edit and save)", lines=4, elem_id="review-caption")
                with gr.Row():
                    save = gr.Button("Save", variant="primary", elem_id="review-save")
                    undo = gr.Button("Undo last edit", elem_id="review-undo")
                details = gr.Markdown(elem_id="review-details")
        status = gr.Markdown(elem_id="review-status")
        with gr.Accordion("Inspection", open=False):
            inspect_button = gr.Button("Run inspection (reads only)", elem_id="review-inspect")
            inspection = gr.HTML(self._inspection_empty(), elem_id="review-inspection")
        state = gr.State({})

        def dataset_for(state_value: dict) -> Dataset:
            key = tuple(state_value.get("key") or ())
            dataset = self.datasets.get(key)
            if dataset is None:
                raise CaptionkitError("Open a data set first (folder, then Open / refresh).")
            return dataset

        def show_page(dataset: Dataset, ids: list[str], number: int, per_page: int, state_value: dict):
            pages = max(1, -(-len(ids) // per_page))
            number = min(max(1, int(number or 1)), pages)
            items = dataset.page(ids, number, per_page)
            state_value = {**state_value, "ids": ids, "page": number, "size": per_page,
                           "page_ids": [item.record_id for item in items]}
            pictures = []
            for item in items:
                text = (item.caption or "").strip() or "(no caption)"
                flag = "⚑ " if item.flagged else ""
                pictures.append((str(item.thumbnail) if item.thumbnail else self.placeholder(),
                                 f"{flag}{item.record_id}: {text[:120]}"))
            summary = f"{len(ids)} of {len(dataset.ids)} images · page {number} of {pages}"
            return pictures, number, summary, state_value

        @self.guard(6, message_at=5)
        def on_open(path, extension, out_dir, per_page, state_value):
            key = (str(Path(path.strip()).expanduser().resolve()) if path and path.strip() else "",
                   extension.strip() or ".txt", (out_dir or "").strip())
            dataset = Dataset(path, ext=key[1], output_dir=key[2] or None)
            self.datasets[key] = dataset
            self.allow(dataset.thumbnail_root)
            pictures, number, summary, new_state = show_page(dataset, dataset.ids, 1, int(per_page),
                                                             {"key": list(key)})
            report = self.inspections.get(key)
            frame = self._inspection_frame(report) if report else self._inspection_empty()
            return pictures, number, summary, new_state, frame, message_md(f"Opened {dataset.path}.")

        @self.guard(5, message_at=4)
        def on_filter(text, tag_v, empty_v, flagged_v, per_page, state_value):
            dataset = dataset_for(state_value)
            ids = dataset.filter(text or "", tag_v or "", bool(empty_v), bool(flagged_v))
            pictures, number, summary, new_state = show_page(dataset, ids, 1, int(per_page), state_value)
            return pictures, number, summary, new_state, ""

        @self.guard(5, message_at=4)
        def on_page(delta, number, per_page, state_value):
            dataset = dataset_for(state_value)
            ids = state_value.get("ids", dataset.ids)
            pictures, number, summary, new_state = show_page(dataset, ids, int(number or 1) + delta, int(per_page),
                                                             state_value)
            return pictures, number, summary, new_state, ""

        @self.guard(6, message_at=5)
        def on_select(state_value, evt: gr.SelectData):
            dataset = dataset_for(state_value)
            page_ids = state_value.get("page_ids") or []
            if evt.index is None or evt.index >= len(page_ids):
                return gr.update(), gr.update(), gr.update(), gr.update(), state_value, ""
            record_id = page_ids[evt.index]
            item = dataset.items([record_id], thumbnails=False)[0]
            return self._show_item(item, dataset) + ({**state_value, "selected": record_id}, "")

        @self.guard(3, message_at=2)
        def on_save(text, state_value):
            dataset = dataset_for(state_value)
            record_id = state_value.get("selected")
            if not record_id:
                raise CaptionkitError("Pick an image in the gallery first.")
            target = dataset.save_caption(record_id, text or "")
            pictures = self._page_pictures(dataset, state_value)
            return pictures, gr.update(), message_md(f"Saved {target.name} (your text: later runs leave it alone).")

        @self.guard(6, message_at=5)
        def on_undo(state_value):
            dataset = dataset_for(state_value)
            record_id = dataset.undo()
            item = dataset.items([record_id], thumbnails=False)[0]
            pictures = self._page_pictures(dataset, state_value)
            shown = (self._show_item(item, dataset) if record_id == state_value.get("selected")
                     else (gr.update(),) * 4)
            return (pictures, *shown, message_md(f"Undone: {Path(item.caption_file).name} is back as it was."))

        @self.guard(2, message_at=1)
        def on_inspect(state_value):
            dataset = dataset_for(state_value)
            if not tasks.inspection_available():
                return self._inspection_empty(), message_md("Inspection is not installed in this version yet.")
            key = tuple(state_value.get("key"))

            def done(report, html_path):
                self.inspections[key] = str(html_path)
                return dataset.set_findings(report.findings)

            job = tasks.submit_inspection(self.manager, dataset, done)
            self.manager.wait(job, timeout=600)
            if job.state != "done":
                raise CaptionkitError(job.message or f"inspection {job.state}")
            return self._inspection_frame(self.inspections[key]), message_md(f"Inspection: {job.message}.")

        open_outputs = [gallery, page, count, state, inspection, status]
        open_button.click(on_open, inputs=[folder, ext, output_dir, size, state], outputs=open_outputs)
        folder.submit(on_open, inputs=[folder, ext, output_dir, size, state], outputs=open_outputs)
        filter_inputs = [search, tag, empty, flagged, size, state]
        filter_outputs_list = [gallery, page, count, state, status]
        apply.click(on_filter, inputs=filter_inputs, outputs=filter_outputs_list)
        search.submit(on_filter, inputs=filter_inputs, outputs=filter_outputs_list)
        tag.submit(on_filter, inputs=filter_inputs, outputs=filter_outputs_list)
        previous.click(lambda n, s, st: on_page(-1, n, s, st), inputs=[page, size, state],
                       outputs=[gallery, page, count, state, status])
        following.click(lambda n, s, st: on_page(1, n, s, st), inputs=[page, size, state],
                        outputs=[gallery, page, count, state, status])
        page.submit(lambda n, s, st: on_page(0, n, s, st), inputs=[page, size, state],
                    outputs=[gallery, page, count, state, status])
        gallery.select(on_select, inputs=[state], outputs=[picture, selected, caption, details, state, status])
        save.click(on_save, inputs=[caption, state], outputs=[gallery, caption, status])
        undo.click(on_undo, inputs=[state], outputs=[gallery, picture, selected, caption, details, status])
        inspect_button.click(on_inspect, inputs=[state], outputs=[inspection, status])

    # --- review helpers -------------------------------------------------------------------------------
    def _show_item(self, item, dataset: Dataset) -> tuple:
        lines = []
        if item.stored_caption is not None and item.stored_caption != item.caption:
            lines.append(f"**Model's caption (store):** {html.escape(item.stored_caption)}")
        lines.append(f"**Tags (store):** {html.escape(item.tags) if item.tags else '—'}")
        if item.flagged:
            lines.append("**Flagged by inspection:**\n" + "\n".join(f"- {html.escape(flag)}" for flag in item.flagged))
        header = f"**{html.escape(item.record_id)}** · caption file `{item.caption_file.name}`" + (
            "" if item.caption is not None else " (not there yet)")
        # a 768 px copy in the thumbnail cache: the page may only show files from allowed folders
        preview = dataset.thumbnail(dataset.by_id[item.record_id], side=768)
        return str(preview) if preview else self.placeholder(), header, item.caption or "", "\n\n".join(lines)

    def _page_pictures(self, dataset: Dataset, state_value: dict):
        ids = state_value.get("page_ids") or []
        pictures = []
        for item in dataset.items(ids):
            text = (item.caption or "").strip() or "(no caption)"
            pictures.append((str(item.thumbnail) if item.thumbnail else self.placeholder(),
                             f"{'⚑ ' if item.flagged else ''}{item.record_id}: {text[:120]}"))
        return pictures

    def _inspection_empty(self) -> str:
        if tasks.inspection_available():
            return ('<div class="ck-empty">No inspection yet for this data set. <b>Run inspection</b> to see its '
                    'plots and findings, and to use the "Flagged by inspection" filter.</div>')
        return ('<div class="ck-empty">Inspection plots: not available in this install (the '
                '<code>captionkit.inspection</code> module is missing). The "Flagged by inspection" filter needs it '
                'too.</div>')

    @staticmethod
    def _inspection_frame(report_path: str) -> str:
        try:
            text = Path(report_path).read_text(encoding="utf-8")
        except OSError:
            return '<div class="ck-empty">The inspection report is gone; run the inspection again.</div>'
        return (f'<iframe title="inspection report" style="width:100%;height:720px;border:0" '
                f'srcdoc="{html.escape(text, quote=True)}"></iframe>')


def components_list(components: dict[str, Any], names: list[str]) -> list[Any]:
    return [components[name] for name in names]


def build_app(manager: JobManager | None = None) -> tuple[gr.Blocks, App]:
    """The Blocks and its :class:`App` (which owns the job manager)."""
    app = App(manager)
    return app.build(), app


def launch_options() -> dict[str, Any]:
    """Options ``Blocks.launch`` takes in this Gradio version (CSS moved there in Gradio 6)."""
    options: dict[str, Any] = {}
    parameters = inspect.signature(gr.Blocks.launch).parameters
    if "css" in parameters:
        options["css"] = CSS
    return options
