"""Each command's options, declared once: what `caption`, `tag` and `render` take, on every surface.

A :class:`Command` strings together the declaring dataclasses (:class:`ModelOptions`,
:class:`CaptionText`, :class:`TagOptions` and the run options below) in the order ``--help``
shows them. The command line builds its Typer parameters from it, the web UI its form
fields, the pipeline its YAML keys (with Dataflow-Gen's spellings), and all three hand their
values to :meth:`Command.api_arguments`, which turns them into the api's keywords.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from captionkit.core.declare import Option, declared_options, option
from captionkit.core.errors import CaptionkitError
from captionkit.core.images import DEFAULT_MAX_PIXELS
from captionkit.core.tagging import TagOptions
from captionkit.models.tagger_registry import DEFAULT_TAGGER
from captionkit.options.model import ModelOptions
from captionkit.options.text import CaptionText

CLI_AND_UI = frozenset({"cli", "ui"})
CLI_ONLY = frozenset({"cli"})
EXISTING = ("skip", "overwrite", "append", "fill-empty")
COLLISIONS = ("skip", "keep-extension")
SCALE_PANEL = "Scaling out (a Ray cluster, several GPUs; docs/scaling.md)"
WORKERS_HELP = ("Parallel decode/preprocess threads (default: as many as keep the model busy, measured during the "
                "first batches).")
MAX_FAILURES_HELP = ("Still exit 0 when at most this many images fail: a number (5) or a percentage of the "
                     "images tried (2%). Default 0.")


def _run(default: Any, help: str, **details: Any) -> Any:
    """A run option: the command line and the form have it; a pipeline sets these for the whole file."""
    details.setdefault("surfaces", CLI_AND_UI)
    return option(default, help, **details)


def _cli(default: Any, help: str, **details: Any) -> Any:
    """An option only the command line shows: the page has no form for the command (inspect, run)."""
    details.setdefault("surfaces", CLI_ONLY)
    return option(default, help, **details)


def _step(default: Any, help: str, **details: Any) -> Any:
    """A run option a pipeline step takes too (batch size, background, the pixel limit)."""
    return option(default, help, **details)


@dataclass
class CaptionRun:
    """How `caption` reads images and writes its files."""

    batch_size: int | None = _step(None, "Images per model call, halved automatically on out-of-memory (default 8; "
                                   "4 x --concurrency for servers).")
    workers: int | None = _run(None, WORKERS_HELP)
    recursive: bool = _run(True, "Descend into sub-folders.")
    include_hidden: bool = _run(False, "Also take files and folders whose names start with '.'.")
    image_column: str | None = _run(None, "Manifest column with the image path.")
    base_dir: Path | None = _run(None, "Folder that relative manifest paths start from.")
    output_dir: str | None = _run(None, "Write captions into a mirrored tree here instead of beside the images (a "
                                  "folder or a URL; required for remote images and shards).", metavar="PATH")
    ext: str = _run(".txt", "Caption file extension (.txt, .caption, ...).")
    existing: str = _run("skip", "Existing caption files: skip, overwrite, append or fill-empty.", choices=EXISTING)
    on_collision: str = _run("skip", "Two images, one caption file (a.png + a.jpg): skip (write neither) or "
                             "keep-extension (a.png.txt).", choices=COLLISIONS)
    append_separator: str = _run(", ", "Put between the old and new text with --existing append.")
    background: str = _step("white", "Colour transparent images are composited on.")
    max_image_pixels: int = _step(DEFAULT_MAX_PIXELS, "Refuse images with more pixels (decompression bombs).")
    keep_results: bool = _run(False, "Reuse stored captions even if made with other settings.")
    retry_errors: bool = _run(False, "Retry images that failed before even if the file did not change.")
    export: list[str] | None = _run(None, "Also write all results to this .jsonl or .parquet (repeatable; a path "
                                    "or a URL); a folder gets sharded Parquet (part-00000.parquet, ...).",
                                    metavar="PATH")
    write: bool = _run(True, "Write caption files (--no-write: results only in the store and --export; for very "
                       "large runs).", api_name="write_sidecars")


@dataclass
class TagRun:
    """Which tagger `tag` runs, how it reads images and writes its files."""

    model: str = _step(DEFAULT_TAGGER, "Tagger: WD-style hub repo or folder (model.onnx or timm "
                       "weights + selected_tags.csv), or a folder from `captionkit train tagger`.",
                       aliases=("model_path",), fingerprint=True)
    print_scores: bool = _run(False, "Print 'image: tag: score' lines for the chosen tags.", flags=("--print",),
                              surfaces=CLI_ONLY)
    write: bool = _run(True, "Write tag files (--no-write with --print only prints).", api_name="write_sidecars")
    device: str = _step("auto", "auto, cpu, cuda or cuda:N (a GPU asked for never falls back to CPU).")
    cache_dir: Path | None = _step(None, "Folder for downloaded models.")
    batch_size: int = _step(32, "Images per model call (halved automatically on out-of-memory).")
    workers: int | None = _run(None, WORKERS_HELP)
    recursive: bool = _run(True, "Descend into sub-folders.")
    include_hidden: bool = _run(False, "Also take files and folders whose names start with '.'.")
    image_column: str | None = _run(None, "Manifest column with the image path.")
    base_dir: Path | None = _run(None, "Folder that relative manifest paths start from.")
    output_dir: str | None = _run(None, "Write tag files into a mirrored tree here (a folder or a URL; required for "
                                  "remote images and shards).", metavar="PATH")
    ext: str = _run(".txt", "Tag file extension.")
    existing: str = _run("skip", "Existing files: skip, overwrite, append or fill-empty.", choices=EXISTING)
    on_collision: str = _run("skip", "a.png + a.jpg: skip or keep-extension.", choices=COLLISIONS)
    append_separator: str = _run(", ", "Between old and new text with --existing append.")
    background: str = _step("white", "Colour transparent images are composited on.")
    max_image_pixels: int = _step(DEFAULT_MAX_PIXELS, "Refuse images with more pixels (decompression bombs).")
    keep_results: bool = _run(False, "Reuse stored scores even if made by another model version.")
    retry_errors: bool = _run(False, "Retry images that failed before even if unchanged.")
    export: list[str] | None = _run(None, "Also write all results to .jsonl or .parquet (a path or a URL); a "
                                    "folder gets sharded Parquet.", metavar="PATH")


@dataclass
class RenderRun:
    """Which stored field `render` rewrites, and where its files are."""

    field: str = _run("tags", "tags or caption.", choices=("tags", "caption"))
    recursive: bool = _run(True, "Descend into sub-folders.")
    image_column: str | None = _run(None, "Manifest column with the image path.")
    base_dir: Path | None = _run(None, "Folder that relative manifest paths start from.")
    output_dir: Path | None = _run(None, "The --output-dir of the original run.")
    ext: str = _run(".txt", "File extension.")
    existing: str = _run("skip", "Files captionkit did not write: skip, overwrite, append or fill-empty.",
                         choices=EXISTING)
    on_collision: str = _run("skip", "a.png + a.jpg: skip or keep-extension.", choices=COLLISIONS)
    append_separator: str = _run(", ", "Between old and new text with --existing append.")


@dataclass
class ScaleOptions:
    """Where the model runs: this process, a Ray cluster, or one process per GPU (same results)."""

    executor: str = _run("local", "local (this process) or ray (a Ray cluster; pip install 'captionkit\\[ray]'). "
                         "Results are the same.", choices=("local", "ray"), panel=SCALE_PANEL)
    ray_address: str | None = _run(None, "With --executor ray: auto (the cluster this machine is in), "
                                   "ray://HOST:10001, or leave out to start Ray here.", panel=SCALE_PANEL)
    ray_actors: int | None = _run(None, "With --executor ray: model replicas (default: one per GPU of the cluster, "
                                  "or 1).", panel=SCALE_PANEL)
    ray_gpus_per_actor: float | None = _run(None, "With --executor ray: GPUs per model replica, fractions allowed "
                                            "(default: 1 when the cluster has GPUs, else 0).", panel=SCALE_PANEL)
    ray_cpus_per_actor: float = _run(1.0, "With --executor ray: CPUs per model replica.", panel=SCALE_PANEL)
    ray_stall_timeout: float = _run(600.0, "With --executor ray: end the run (keeping what finished) when nothing "
                                    "moves for this many seconds: a hung model, actors that cannot be placed. 0: "
                                    "never.", panel=SCALE_PANEL)
    devices: str | None = _run(None, "Several GPUs of this machine without Ray: cuda:0,cuda:1 runs one worker "
                               "process per device over disjoint shards.", panel=SCALE_PANEL)


@dataclass
class RemoteData:
    """How images in object storage are read (s3://, gs://, az://, hf://); nothing here is ever stored."""

    storage_options: str | None = _run(None, "Object storage (s3://, gs://, az://, hf:// inputs and outputs): JSON of "
                                       "fsspec filesystem options, e.g. '{\"client_kwargs\": {\"endpoint_url\": "
                                       "\"http://minio:9000\"}}'. Credentials also come from the environment and "
                                       "profiles; never stored or logged.", panel=SCALE_PANEL)
    io_workers: int = _run(16, "Object-store fetches in flight at once (remote images; retried on 5xx and "
                           "timeouts).", panel=SCALE_PANEL)


@dataclass
class Reporting:
    """What the command line prints and its exit code: the page shows its own progress and has no exit code."""

    max_failures: str | None = _run(None, MAX_FAILURES_HELP, surfaces=CLI_ONLY, api=False)
    quiet: bool = _run(False, "No progress bar.", flags=("--quiet", "-q"), surfaces=CLI_ONLY, api=False)
    progress: str = _run("bar", "bar, json (JSON lines on stdout) or quiet.", choices=("bar", "json", "quiet"),
                         surfaces=CLI_ONLY, api=False)


@dataclass(frozen=True)
class Part:
    """A run of one declaring class's fields (``first`` to ``last``), optionally re-worded for this command."""

    cls: type
    first: str | None = None
    last: str | None = None
    help: dict[str, str] = field(default_factory=dict, hash=False)
    panel: str | None = "keep"  # None: no help panel in this command
    surfaces: frozenset[str] | None = None  # where this command shows them, when narrower than declared

    def options(self) -> list[Option]:
        every = declared_options(self.cls)
        names = [item.name for item in every]
        start = names.index(self.first) if self.first else 0
        stop = names.index(self.last) + 1 if self.last else len(every)
        chosen = every[start:stop]
        return [replace(item, help=self.help.get(item.name, item.help),
                        panel=item.panel if self.panel == "keep" else self.panel,
                        surfaces=item.surfaces if self.surfaces is None else item.surfaces & self.surfaces)
                for item in chosen]


def tag_options(
    *,
    general_threshold: float = 0.35,
    character_threshold: float = 0.85,
    thresholds: dict[str, float] | None = None,
    use_model_thresholds: bool = False,
    mcut: bool = False,
    max_tags: int | None = None,
    include_rating: bool = False,
    blacklist: Iterable[str] = (),
    replacements: dict[str, str] | None = None,
    always_first: Iterable[str] = (),
    underscores_to_spaces: bool = True,
    escape_parentheses: bool = False,
    order: str = "score",
    separator: str = ", ",
) -> TagOptions:
    """TagOptions from keyword arguments, with errors users can act on."""
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


@dataclass
class Command:
    """One command's options, in ``--help`` order, and how their values become the api's keywords."""

    name: str
    parts: list[Part]
    builds: dict[type, tuple[str, Callable[..., Any]]] = field(default_factory=dict)  # class → (keyword, builder)

    def options(self, surface: str | None = None) -> list[Option]:
        found = [(part.cls, item) for part in self.parts for item in part.options()]
        names = [item.name for _, item in found]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:  # two declaring classes disagree about who owns an option
            raise ValueError(f"{self.name}: declared twice: {', '.join(duplicated)}")
        return [item for _, item in found if surface is None or surface in item.surfaces]

    def owner(self, name: str) -> type:
        return next(part.cls for part in self.parts for item in part.options() if item.name == name)

    def names(self, surface: str | None = None) -> list[str]:
        return [item.name for item in self.options(surface)]

    def pipeline_keys(self) -> dict[str, Any]:
        """YAML key → the type a pipeline file may give it."""
        return {item.name: yaml_type(item) for item in self.options("pipeline")}

    def pipeline_aliases(self) -> dict[str, str]:
        """Other tools' spellings (Dataflow-Gen) → captionkit's key."""
        return {alias: item.name for item in self.options("pipeline") for alias in item.aliases}

    def api_arguments(self, values: dict[str, Any]) -> dict[str, Any]:
        """The api's keywords from a surface's values (only those given); declared classes built into one object."""
        arguments: dict[str, Any] = {}
        gathered: dict[type, dict[str, Any]] = {cls: {} for cls in self.builds}
        for part in self.parts:
            for item in part.options():
                if item.name not in values or not item.api:
                    continue
                value = item.convert(values[item.name])
                if part.cls in gathered:
                    gathered[part.cls][item.name] = value
                else:
                    arguments[item.keyword] = value
        for cls, (keyword, builder) in self.builds.items():
            arguments[keyword] = builder(**gathered[cls])
        return arguments


def yaml_type(item: Option) -> Any:
    """What a YAML value of this option may be (a number for a float, a mapping for NAME=VALUE pairs)."""
    if item.value_type is dict:
        return dict
    if item.value_type is float:
        return (int, float)
    if item.value_type is Path:
        return str
    if item.value_type in (int, bool, str):
        return item.value_type
    return list


_RENDER_TEXT_HELP = {
    "prefix": "Captions only: text put before every caption.", "suffix": "Captions only: text put after every caption.",
    "cleanup": "Captions only: strip special tokens and whitespace noise.",
    "collapse_loops": "Captions only: collapse repeated-phrase loops.",
    "strip_openers": "Captions only: remove filler openers ('The image shows').",
    "sample_choice": "Captions only, with several samples: first, longest or all.",
    "sample_separator": "Captions only: between samples with --sample-choice all.",
}

CAPTION = Command("caption", [
    Part(ModelOptions, last="seed"), Part(CaptionText, first="sample_choice"),
    Part(CaptionText, first="strip_openers", last="strip_openers"), Part(ModelOptions, first="max_image_side"),
    Part(CaptionRun, last="append_separator"), Part(CaptionText, last="collapse_loops"),
    Part(CaptionRun, first="background"), Part(ScaleOptions), Part(RemoteData), Part(Reporting),
], builds={ModelOptions: ("options", ModelOptions)})

TAG = Command("tag", [
    Part(TagRun, last="model"), Part(TagOptions), Part(TagRun, first="print_scores"), Part(ScaleOptions),
    Part(RemoteData), Part(Reporting),
], builds={TagOptions: ("options", tag_options)})

RENDER = Command("render", [
    Part(RenderRun, last="field"), Part(TagOptions), Part(CaptionText, help=_RENDER_TEXT_HELP, panel=None),
    Part(RenderRun, first="recursive"),
], builds={TagOptions: ("options", tag_options)})


@dataclass
class InspectRun:
    """What `inspect` checks and where it writes its reports (it changes nothing in the data set)."""

    report: Path | None = _cli(None, "Write the self-contained HTML report (plots, tables linking to files) here.",
                               api=False)
    json_report: Path | None = _cli(None, "Write the findings as JSON here (for scripts and CI).", flags=("--json",),
                                    api=False)
    fail_on: list[str] | None = _cli(None, "Exit 1 when any of these are found: finding kinds, a severity (error, "
                                     "warning, info: that or worse) or any (repeatable or comma-separated).",
                                     surfaces=CLI_ONLY, api=False)
    trigger: str | None = _cli(None, "Trigger word every caption must contain.")
    resolution: str = _cli("1024", "Training resolution for buckets: 1024 or WIDTHxHEIGHT.")
    min_bucket: int = _cli(256, "Smallest bucket side (kohya min_bucket_reso).")
    max_bucket: int = _cli(2048, "Largest bucket side (kohya max_bucket_reso).")
    bucket_step: int = _cli(64, "Bucket side step (kohya bucket_reso_steps).")
    min_side: int | None = _cli(None, "Images whose shorter side is below this are tiny (default: --min-bucket).")
    max_crop: float = _cli(0.10, "Odd aspect ratio: more than this share of the image cropped to fit its bucket.")
    full: bool = _cli(False, "Decode every image (finds truncated data; slower).", flags=("--full",))
    near_duplicates: bool = _cli(True, "Perceptual hashes for near-duplicates (a reduced decode); "
                                 "--no-near-duplicates reads headers only.")
    near_duplicate_distance: int = _cli(6, "Near-duplicate threshold: Hamming distance of the 64-bit perceptual "
                                        "hashes.")
    min_count: int = _cli(3, "Tags on fewer images than this are the long tail.")
    common_fraction: float = _cli(0.95, "Tags on at least this share of the tagged images are reported.")
    caption_ext: str = _cli(".txt", "Caption file extension.")
    tag_ext: str | None = _cli(None, "Tag file extension (may equal --caption-ext); tags in the store are used "
                               "where there are some.")
    selected_tags: Path | None = _cli(None, "A selected_tags.csv giving tag categories (the store's tagger "
                                      "vocabulary is used too).")
    t5_tokenizer: Path | None = _cli(None, "A T5 tokenizer (folder, tokenizer.json or spiece.model) for T5 token "
                                     "counts; default: the hub cache, if it has one.")
    output_dir: str | None = _cli(None, "The --output-dir the captions were written to (store and sidecars there; a "
                                  "URL --output-dir is read from its local cache).", metavar="PATH")
    recursive: bool = _cli(True, "Descend into sub-folders.")
    include_hidden: bool = _cli(False, "Also take files and folders whose names start with '.'.")
    image_column: str | None = _cli(None, "Manifest column with the image path.")
    base_dir: Path | None = _cli(None, "Folder that relative manifest paths start from.")
    workers: int = _cli(4, "Parallel image readers.")


@dataclass
class PipelineRun:
    """Which pipeline file `run` runs, and which of its steps."""

    config: Path | None = _cli(None, "The pipeline file, given as an option (as Dataflow-Gen's run_pipeline.py and "
                               "the trainers take it).", flags=("--config",), api=False)
    dry_run: bool = _cli(False, "Validate and show the plan: steps, records, what is already done.")
    from_step: int | None = _cli(None, "Start at this step (1-based); earlier steps' stored results are used.")
    only_step: str | None = _cli(None, "Run only the step with this name.")
    workers: int | None = _cli(None, WORKERS_HELP)


@dataclass
class ExportRun:
    """Which stored fields `export` writes."""

    step: list[str] | None = _cli(None, "Only these fields (caption, tags); default all.", api_name="steps",
                                keep_none=True)
    storage_options: str | None = _cli(None, "A URL destination (s3://bucket/out.parquet): JSON of fsspec "
                                       "filesystem options; credentials also come from the environment and "
                                       "profiles; never stored or logged.")


@dataclass
class UiServe:
    """Where `ui` serves the page and who may open it."""

    host: str = _cli("127.0.0.1", "Address to listen on. 127.0.0.1 = this machine only; 0.0.0.0 = every network "
                     "(use --auth).")
    port: int | None = _cli(None, "Port (default: 7860, or the next free one).")
    auth: str | None = _cli(None, "USER:PASS, or a file with one USER:PASS per line: the page asks for them.")
    share: bool = _cli(False, "Also publish a temporary public gradio.live link (off by default; use --auth).")


EXPORT = Command("export", [Part(ExportRun)])
UI = Command("ui", [Part(UiServe)])

# The page has no form for these two: its inspection button and pipeline tab pass their own few values.
INSPECT = Command("inspect", [Part(InspectRun), Part(RemoteData, surfaces=CLI_ONLY, help={
    "storage_options": "Object storage (an s3://, gs://, az://, hf:// data set): JSON of fsspec filesystem options. "
                       "Credentials also come from the environment and profiles; never stored or logged."}),
    Part(Reporting, first="quiet")])

_RUN_STORAGE_HELP = {
    "storage_options": "Object storage (an s3://, gs://, az://, hf:// input or save_folder): JSON of fsspec "
                       "filesystem options, laid over the file's storage_options. Credentials also come from the "
                       "environment and profiles; never stored or logged."}

RUN = Command("run", [Part(PipelineRun), Part(ScaleOptions, surfaces=CLI_ONLY),
                      Part(RemoteData, surfaces=CLI_ONLY, help=_RUN_STORAGE_HELP), Part(Reporting, help={
    "max_failures": "Still exit 0 when at most this many records fail in each step: a number (5) or a percentage "
                    "of the records the step tried (2%). Default 0.",
    "quiet": "No progress bars.", "progress": "bar, json or quiet."})])
