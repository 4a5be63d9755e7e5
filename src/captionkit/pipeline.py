"""YAML pipelines: read a data job, validate all of it, then run its steps on the one executor.

A pipeline file names an input (an image folder or a manifest), where intermediate and
final results go, and a list of steps. Each step is built from the step registry
(:mod:`captionkit.steps.registry`) and run by :class:`captionkit.executors.local.LocalExecutor`,
the same objects `captionkit caption` and `captionkit tag` use. Each step writes its own
field; the store in ``base_folder`` keeps every result with a per-record fingerprint
that includes the step's inputs, so a rerun does only what changed.

Dataflow-Gen files run as written: ``meta_path``, ``meta_folder``, ``base_folder``,
``save_folder``, ``image_key``, ``text_key``, ``video_key`` and steps of ``type`` / ``name`` /
``config``, with its class names (``LLaVACaptioner``, ``FLUXGenerator``, ``GPTTextGenerator`` ...)
and keys (``model_path``, ``repeat_time``, ``sys_prompt`` ...). Where relative paths start
differs: captionkit's own files resolve them from the file's folder; a Dataflow-Gen file
(one that names its input ``meta_path``) resolves them from the current folder, as
Dataflow-Gen's ``os.path.abspath`` does (``relative_to:`` chooses explicitly).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from captionkit.core import locations
from captionkit.core.errors import CaptionkitError
from captionkit.core.records import MANIFEST_SUFFIXES, Record, open_source
from captionkit.core.sinks import TABLE_FORMATS, write_table
from captionkit.core.webdataset import is_shard_pattern, open_shards
from captionkit.steps.registry import StepContext, StepType, find_step_type

log = logging.getLogger(__name__)

TOP_LEVEL_KEYS = {
    "input": "an image folder or a manifest (jsonl, json, csv, tsv, parquet)",
    "meta_path": "Dataflow-Gen spelling of input",
    "meta_folder": "the folder image paths in the manifest start from",
    "base_dir": "captionkit spelling of meta_folder",
    "base_folder": "intermediate results and the store",
    "save_folder": "final results",
    "image_key": "the manifest column with image paths",
    "text_key": "the manifest column with text (prompts, captions)",
    "video_key": "Dataflow-Gen: the manifest column with videos (video rows are skipped: captionkit reads images)",
    "relative_to": "where relative paths start: file (the pipeline file's folder) or current_folder",
    "output_format": "jsonl, json, csv, tsv or parquet for the final table",
    "steps": "the list of steps",
    "name": "a name for the pipeline",
    "recursive": "search sub-folders of an input folder",
    "storage_options": "object storage (s3://, gs://, az://, hf:// input or save_folder): fsspec filesystem options "
                       "(endpoint, profile); never stored, logged or exported",
}
STEP_KEYS = ("type", "name", "config", "output_field", "image_field", "input_field")
RELATIVE_TO = ("file", "current_folder")
_API = "an API model (backend: openai)"
# Dataflow-Gen's step types, and for each the classes its `name` picks, with the model families
# (config.json model_type, or a diffusers pipeline class) each class is written for.
DATAFLOW_GEN_CLASSES: dict[str, dict[str, tuple[str, ...]]] = {
    "ImageCaptioner": {
        "BLIPCaptioner": ("blip-2",), "LLaVACaptioner": ("llava",), "LLaVANeXTCaptioner": ("llava_next",),
        "LLaVAOneVisionCaptioner": ("llava_onevision",), "MLLamaCaptioner": ("mllama",),
        "Phi3VCaptioner": ("phi3_v",), "QwenVLCaptioner": ("qwen2_vl", "qwen2_5_vl"),
        "GPTCaptioner": (_API,), "ImageAPICaptioner": (_API,),
    },
    "ImageGenerator": {"FLUXGenerator": ("FluxPipeline",),
                       "StableDiffusionGenerator": ("StableDiffusion3Pipeline",)},
    "TextGenerator": {"GPTTextGenerator": (), "APIGenerator": (_API,), "LocalModelGenerator": ()},
    "VideoCaptioner": {}, "VideoGenerator": {},
}
OUTPUT_FORMATS = TABLE_FORMATS
_SECRET_KEYS = ("api_key", "openai_api_key", "token", "hf_token", "password")


@dataclass
class PipelineStep:
    """One validated step: its type, its config in captionkit's spelling, and where it reads and writes."""

    index: int
    name: str
    step_type: StepType
    config: dict[str, Any]
    output_field: str
    image_field: str | None = None  # read images from this field (e.g. an image_generator's output)
    dataflow_class: str | None = None  # the Dataflow-Gen class its name picks (LLaVACaptioner ...), if any

    @property
    def label(self) -> str:
        return f"step {self.index + 1} ({self.name})"


@dataclass
class Pipeline:
    """A validated pipeline file."""

    path: Path
    input: Path | str  # a URL string for an object-store prefix or manifest (s3://bucket/photos/)
    meta_folder: Path | str | None
    base_folder: Path
    save_folder: Path  # for a URL save_folder: the local folder staged there (see save_url)
    image_key: str | None
    text_key: str | None
    output_format: str
    steps: list[PipelineStep]
    recursive: bool = True
    text_only: bool = False
    columns: list[str] = field(default_factory=list)  # the manifest's columns (read once, when the file is loaded)
    video_key: str | None = None  # Dataflow-Gen: rows with a video and no image are skipped
    paths_from: Path = Path(".")  # the folder relative paths in the file start from
    path_rule: str = ""  # which rule chose paths_from, in words (shown by --dry-run)
    save_url: str | None = None  # save_folder given as a URL: files are staged in save_folder, then uploaded
    # the file's storage_options (credentials among them): memory only, never in the store, logs or tables
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class StepReport:
    """What one step did (or, in a dry run, would do)."""

    index: int
    name: str
    type: str
    output_field: str
    total: int = 0
    done: int = 0  # already in the store with the same settings and inputs
    todo: int = 0
    processed: int = 0
    failed: int = 0
    dropped: int = 0  # filter steps: records removed from later steps
    errors: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    skipped: bool = False  # left out by --from-step / --only-step

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PipelineReport:
    steps: list[StepReport]
    table: Path | None = None
    dry_run: bool = False
    interrupted: bool = False
    path_rule: str = ""  # where the file's relative paths start, and why
    stopped_early: str | None = None  # a step's circuit breaker: why the run stopped before the end


# ---------------------------------------------------------------------------------------------- reading
def _fail(where: str, message: str) -> CaptionkitError:
    return CaptionkitError(f"{where}: {message}")


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


_KNOWN_FIELD_NAMES = {  # Dataflow-Gen's class names, whose mixed capitals no rule splits well
    "BLIPCaptioner": "blip_captioner", "LLaVACaptioner": "llava_captioner",
    "LLaVANeXTCaptioner": "llava_next_captioner", "LLaVAOneVisionCaptioner": "llava_onevision_captioner",
    "MLLamaCaptioner": "mllama_captioner", "Phi3VCaptioner": "phi3v_captioner", "QwenVLCaptioner": "qwen_vl_captioner",
    "FLUXGenerator": "flux_generator", "StableDiffusionGenerator": "stable_diffusion_generator",
    "GPTTextGenerator": "gpt_text_generator",
}


def snake_case(name: str) -> str:
    """'LLaVACaptioner' → 'llava_captioner', 'my step' → 'my_step': field names from step names."""
    if name in _KNOWN_FIELD_NAMES:
        return _KNOWN_FIELD_NAMES[name]
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name))
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower() or "field"


def _check_type(where: str, key: str, value: Any, expected: Any) -> None:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if value is None:
        return
    if bool in kinds or not isinstance(value, bool):
        if isinstance(value, kinds):
            return
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return
    names = " or ".join(kind.__name__ for kind in kinds)
    raise _fail(where, f"'{key}' must be {names}, not {type(value).__name__} ({value!r}).")


def _refuse_secrets(where: str, config: dict[str, Any]) -> None:
    for key in config:
        if key.lower() in _SECRET_KEYS:
            raise _fail(where, f"'{key}' holds a secret, and a pipeline file is no place for one (files get "
                               "committed and shared). Put it in an environment variable and name that variable "
                               "with 'api_key_env' (default OPENAI_API_KEY).")


def load_pipeline(path: str | Path, storage_options: dict[str, Any] | str | None = None) -> Pipeline:
    """Read and validate a whole pipeline file before anything runs; errors name the step, the key and the fix.

    ``storage_options`` (``--storage-options``) are laid over the file's ``storage_options:``; with them
    an object-store input (a prefix or a manifest, maybe of URLs) is read, and a URL ``save_folder``
    written (staged locally, then uploaded).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CaptionkitError(f"{path}: no such pipeline file.")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CaptionkitError(yaml_error_message(path, text, error)) from error
    if not isinstance(data, dict):
        raise CaptionkitError(f"{path}: the top level must be a mapping (input:, steps: ...).")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _fail(str(path), f"unknown key '{key}'.{_did_you_mean(str(key), list(TOP_LEVEL_KEYS))} "
                                   f"Allowed: {', '.join(TOP_LEVEL_KEYS)}.")
    here, path_rule = _paths_from(path, data)
    file_options = data.get("storage_options")
    if file_options is not None and not isinstance(file_options, dict):
        raise _fail(str(path), "'storage_options' must be a mapping of fsspec filesystem options, e.g. "
                               "{client_kwargs: {endpoint_url: 'http://minio:9000'}}.")
    given_options = locations.parse_storage_options(storage_options) if isinstance(storage_options, str) \
        else dict(storage_options or {})
    options = {**(file_options or {}), **given_options}

    def location(*names: str, default: str | None = None, url: bool = True) -> Path | str | None:
        given = [name for name in names if data.get(name) not in (None, "")]
        if len(given) > 1:
            raise _fail(str(path), f"'{given[0]}' and '{given[1]}' mean the same thing; keep one.")
        value = data[given[0]] if given else default
        if value is None:
            return None
        if locations.is_url(str(value)):
            if not url:
                raise _fail(str(path), f"{given[0]} {value}: this folder holds the store (SQLite), which needs a "
                                       "local disk; give a local folder (save_folder may be a URL).")
            return str(value).rstrip("/") if not PurePosixPath(str(value)).suffix else str(value)
        folder = locations.local_path(str(value))
        return folder if folder.is_absolute() else (here / folder)

    source = location("input", "meta_path")
    if source is None:
        raise _fail(str(path), "no input: set 'input' (or Dataflow-Gen's 'meta_path') to an image folder or a "
                               "manifest.")
    if is_shard_pattern(source):  # WebDataset shards (a brace pattern): each must be there
        try:
            with locations.storage_options_set(options):
                open_shards(source)
        except CaptionkitError as error:
            raise _fail(str(path), f"input: {error}") from None
    elif isinstance(source, Path) and not source.exists():
        raise _fail(str(path), f"input {source} does not exist.")
    suffix = PurePosixPath(str(source)).suffix.lower()
    output_format = data.get("output_format")
    if output_format is None:
        output_format = suffix.lstrip(".") if suffix in MANIFEST_SUFFIXES else "jsonl"
    if output_format not in OUTPUT_FORMATS:
        raise _fail(str(path), f"output_format '{output_format}': use one of {', '.join(OUTPUT_FORMATS)}.")
    steps_data = data.get("steps")
    if not isinstance(steps_data, list) or not steps_data:
        raise _fail(str(path), "'steps' must be a non-empty list of steps (each with 'type').")
    save_folder = location("save_folder", default=f"{path.stem}-output")
    save_url = save_folder if isinstance(save_folder, str) else None
    if save_url is not None:  # staged on the local disk, uploaded after each run
        save_folder = locations.output_cache(save_url) / "files"
    base_folder = location("base_folder", default=f"{path.stem}-work", url=False)  # per file: two never mix
    assert isinstance(base_folder, Path) and isinstance(save_folder, Path)
    pipeline = Pipeline(
        path=path, input=source, meta_folder=location("meta_folder", "base_dir"), base_folder=base_folder,
        save_folder=save_folder, image_key=data.get("image_key"), text_key=data.get("text_key"),
        output_format=output_format, steps=[], recursive=bool(data.get("recursive", True)),
        video_key=data.get("video_key"), paths_from=here, path_rule=path_rule, save_url=save_url,
        storage_options=options,
    )
    with locations.storage_options_set(options):  # a manifest in object storage is read now, for its columns
        pipeline.columns = available = _manifest_columns(pipeline)
    pipeline.text_only = _is_text_only(pipeline)
    if pipeline.text_key is not None and _is_manifest(pipeline) and pipeline.text_key not in available:
        raise _fail(str(path), f"text_key '{pipeline.text_key}' is not a column of {pipeline.input}."
                               f"{_did_you_mean(pipeline.text_key, available)} Columns: {', '.join(available)}.")
    used_names: set[str] = set()
    used_fields: set[str] = set(available)
    image_column = _image_column(pipeline, available)
    if image_column is not None:
        used_fields.add(image_column)
    for index, raw in enumerate(steps_data):
        step = _read_step(path, index, raw, used_names, used_fields, available, pipeline)
        pipeline.steps.append(step)
    for step in pipeline.steps:  # build each step now (no model loads): value errors surface before any run
        where = f"{path}: {step.label}"
        _check_device(where, step.config)
        try:
            built = step.step_type.builder(dict(step.config), _context(pipeline, step, None, [], announce=True))
        except CaptionkitError as error:
            raise _fail(where, _file_spelling(str(error), step)) from None
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise _fail(where, f"invalid config ({error}).") from None
        if step.dataflow_class is not None:
            _check_family(where, step, built)
    return pipeline


def _file_spelling(message: str, step: PipelineStep) -> str:
    """The CLI's spellings in a shared error message (``--max-new-tokens``) as the file writes them."""
    def spelled(match: re.Match) -> str:
        key = match.group(1).replace("-", "_")
        return f"'{key}'" if key in step.step_type.keys else match.group(0)

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", spelled, message)


def _check_device(where: str, config: dict[str, Any]) -> None:
    """``device: cuda`` on a machine without CUDA fails here, in the file's spelling, not at model load."""
    device = config.get("device")
    if device in (None, "", "auto"):
        return
    from captionkit.models.florence2 import resolve_device

    try:
        resolve_device(str(device))
    except CaptionkitError as error:
        import torch

        if str(device).startswith("cuda") and not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else \
                f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, but no GPU is visible"
            raise _fail(where, f"device: {device} asks for a CUDA GPU, and there is none here ({build}). "
                               "Set device: cpu, or device: auto (a GPU where there is one).") from None
        raise _fail(where, str(error).replace("--device", "device:")) from None


def _model_family(built: Any) -> str | None:
    """What a built step's model is: a config.json model_type, a diffusers pipeline class, or an API model."""
    model = getattr(built, "captioner", None)
    if model is not None:
        if getattr(model, "backend_name", None) == "openai" or type(model).__name__ == "OpenAICaptioner":
            return _API
        return getattr(model, "model_type", None) or ("florence2" if "Florence" in type(model).__name__ else None)
    generator = getattr(built, "generator", None)
    if generator is not None:  # text generators
        return _API if getattr(generator, "backend_name", None) == "openai" else "local causal LM"
    model_name = getattr(built, "model_name", None)  # image generators: a diffusers folder's pipeline class
    if model_name and Path(str(model_name)).expanduser().is_dir():
        from captionkit.steps.image_generator import pipeline_class_name

        return pipeline_class_name(Path(str(model_name)).expanduser())
    return None


def _check_family(where: str, step: PipelineStep, built: Any) -> None:
    """A Dataflow-Gen class name and the model it is given should agree (QwenVLCaptioner with a Qwen2-VL model)."""
    assert step.dataflow_class is not None
    wanted = next(table[step.dataflow_class] for table in DATAFLOW_GEN_CLASSES.values() if step.dataflow_class in table)
    family = _model_family(built)
    if not wanted or family is None or family in wanted:
        return
    if _API in wanted:
        raise _fail(where, f"{step.dataflow_class} calls an API model; add backend: openai and base_url (the "
                           "server's /v1 address), and name the key's environment variable with api_key_env.")
    if family == _API:
        return  # a server may serve any model; its family is the server's business
    known = {kind: name for table in DATAFLOW_GEN_CLASSES.values() for name, kinds in table.items()
             for kind in kinds if kind != _API}
    fitting = f" (Dataflow-Gen's class for it is {known[family]})" if family in known else ""
    log.warning("%s: %s is Dataflow-Gen's class for %s models, but the model given is a %s model%s; captionkit "
                "runs it as %s, read from the model's config. Rename the step to match, or check model_path.",
                where, step.dataflow_class, " / ".join(wanted), family, fitting, family)


def is_dataflow_gen_file(data: dict[str, Any]) -> bool:
    """A file written for Dataflow-Gen: it names its input ``meta_path`` (captionkit's own files say ``input``)."""
    return "meta_path" in data and "input" not in data


def _paths_from(path: Path, data: dict[str, Any]) -> tuple[Path, str]:
    """The folder relative paths start from, and the rule that chose it (in words, for --dry-run)."""
    rule = data.get("relative_to")
    if rule is not None and rule not in RELATIVE_TO:
        raise _fail(str(path), f"relative_to '{rule}': use file (the pipeline file's folder) or current_folder.")
    dataflow_gen = is_dataflow_gen_file(data)
    if rule is None:
        rule = "current_folder" if dataflow_gen else "file"
    if rule == "current_folder":
        why = ("a Dataflow-Gen file: it names its input meta_path; Dataflow-Gen resolves paths so"
               if dataflow_gen and "relative_to" not in data else "relative_to: current_folder")
        return Path.cwd(), f"relative paths start from the current folder {Path.cwd()} ({why})"
    why = "relative_to: file" if "relative_to" in data else "captionkit's rule for its own files"
    return path.resolve().parent, f"relative paths start from the pipeline file's folder {path.resolve().parent} " \
                                  f"({why})"


def yaml_error_message(path: Path, text: str, error: yaml.YAMLError) -> str:
    """Where the YAML breaks (line, column, the line itself) and, for indentation slips, how to fix them.

    Why: Dataflow-Gen's documentation has step blocks whose keys sit one space left of ``type``;
    PyYAML's own message ("expected <block end>, but found ...") does not say that.
    """
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return f"{path}: not valid YAML ({problem})."
    lines = text.splitlines()
    number = mark.line + 1
    line = lines[mark.line] if mark.line < len(lines) else ""
    message = f"{path}:{number}:{mark.column + 1}: not valid YAML ({problem}):\n    {line}"
    indent = len(line) - len(line.lstrip(" "))
    for earlier in range(mark.line - 1, -1, -1):  # the list item this line belongs to (or follows)
        item = re.match(r"^( *)- +(\S)", lines[earlier])
        if item is None:
            continue
        item_indent, key_column = len(item.group(1)), item.start(2)
        if line.lstrip().startswith("- ") and indent != item_indent:
            return (f"{message}\nIndentation: items of one list start in the same column; the item on line "
                    f"{earlier + 1} starts at column {item_indent + 1}, this one at column {indent + 1}.")
        if item_indent < indent != key_column:
            return (f"{message}\nIndentation: the keys of one list item line up with the first key after "
                    f"'- ' (column {key_column + 1} on line {earlier + 1}); this line starts at column "
                    f"{indent + 1}. Indent it by {key_column - indent} space(s)"
                    + (" (Dataflow-Gen's documentation indents these blocks one space short)."
                       if key_column - indent == 1 else "."))
        break
    if "found character '\\t'" in problem:
        return f"{message}\nIndentation: YAML indents with spaces only; replace the tab."
    return f"{message}\nCheck the indentation of this line and the one before it (YAML nests by indentation)."


def _image_column(pipeline: Pipeline, columns: list[str]) -> str | None:
    """The manifest column holding images ('image' for a folder), so no step may overwrite it."""
    if pipeline.text_only:
        return None
    if not _is_manifest(pipeline):
        return pipeline.image_key or "image"
    if pipeline.image_key:
        return pipeline.image_key
    from captionkit.core.records import _IMAGE_COLUMN_GUESSES

    return next((name for name in _IMAGE_COLUMN_GUESSES if name in columns), None)


def _context(pipeline: Pipeline, step: PipelineStep, store, records: list[Record],
             announce: bool = False) -> StepContext:
    return StepContext(
        index=step.index, name=step.name, output_field=step.output_field, base_folder=pipeline.base_folder,
        save_folder=pipeline.save_folder, input_fields=sorted({key for record in records for key in record.fields}),
        store=store, announce=announce,
    )


def _prompt_fields(where: str, template: str) -> list[str]:
    from captionkit.steps.template import template_fields

    try:
        return template_fields(template)
    except CaptionkitError as error:
        raise _fail(where, str(error)) from None


def _check_dataflow_gen_class(where: str, type_name: str, class_name: Any) -> None:
    """Under a Dataflow-Gen step type the name picks a class, as in Dataflow-Gen: an unknown one is an error."""
    classes = DATAFLOW_GEN_CLASSES[type_name]
    if not classes:
        raise _fail(where, f"Dataflow-Gen's {type_name} steps handle videos; captionkit reads images, so it cannot "
                           "run this step. Remove it (video rows of the manifest are skipped).")
    if class_name is None:
        raise _fail(where, f"a {type_name} step needs 'name', the Dataflow-Gen class to run: "
                           f"{', '.join(classes)}.")
    if str(class_name) not in classes:
        every = [name for table in DATAFLOW_GEN_CLASSES.values() for name in table]
        other = next((kind for kind, table in DATAFLOW_GEN_CLASSES.items() if str(class_name) in table), None)
        why = (f"'{class_name}' is a {other} class, not a {type_name} one" if other else
               f"'{class_name}' is not a Dataflow-Gen {type_name} class.{_did_you_mean(str(class_name), every)}")
        raise _fail(where, f"under type {type_name} the name picks the class, as in Dataflow-Gen; {why} "
                           f"{type_name} classes: {', '.join(classes)}. For a free step name use captionkit's "
                           "type (captioner, image_generator, text_generator).")


def _read_step(path: Path, index: int, raw: Any, used_names: set[str], used_fields: set[str],
               available: list[str], pipeline: Pipeline) -> PipelineStep:
    where = f"{path}: step {index + 1}"
    if not isinstance(raw, dict):
        raise _fail(where, "each step must be a mapping with 'type' (and 'name', 'config').")
    if "type" not in raw:
        raise _fail(where, "no 'type'. Give a step type such as captioner, tagger, template, filter, "
                           "text_generator, image_generator or export.")
    type_name, given_name = str(raw["type"]), raw.get("name")
    # Dataflow-Gen: `type: ImageCaptioner, name: LLaVACaptioner` — the name picks the class.
    if type_name in DATAFLOW_GEN_CLASSES:
        _check_dataflow_gen_class(where, type_name, given_name)
    try:
        by_type = find_step_type(type_name)
    except CaptionkitError as error:
        raise _fail(where, str(error)) from None
    step_type = by_type
    if given_name is not None:
        try:
            by_name = find_step_type(str(given_name))
        except CaptionkitError:
            by_name = None
        if by_name is not None and by_name is not by_type:
            raise _fail(where, f"type '{type_name}' and name '{given_name}' name different step types "
                               f"({by_type.name} and {by_name.name}); give the step another name.")
    name = str(given_name) if given_name else step_type.name
    unique = name
    counter = 2
    while unique in used_names:
        unique, counter = f"{name}_{counter}", counter + 1
    used_names.add(unique)
    where = f"{path}: step {index + 1} ({unique})"
    inline = {key: value for key, value in raw.items() if key not in STEP_KEYS}
    config = raw.get("config") or {}
    if not isinstance(config, dict):
        raise _fail(where, "'config' must be a mapping of keys to values.")
    _refuse_secrets(where, {**inline, **config})
    merged: dict[str, Any] = {}
    for key, value in {**inline, **config}.items():
        target = step_type.key_aliases.get(key, key)
        if target in merged:
            raise _fail(where, f"'{key}' and '{target}' set the same thing; keep one.")
        merged[target] = value
    for key in ("input_field",):
        if raw.get(key) is not None:
            merged[key] = raw[key]
    allowed = sorted(step_type.keys)
    spellings = sorted({*allowed, *step_type.key_aliases})  # Dataflow-Gen's spellings are suggested too
    for key, value in merged.items():
        if key not in step_type.keys:
            raise _fail(where, f"unknown key '{key}' for a {step_type.name} step.{_did_you_mean(key, spellings)} "
                               f"Allowed: {', '.join(allowed)} (or {', '.join(sorted(step_type.key_aliases))}).")
        _check_type(where, key, value, step_type.keys[key])
    for key in step_type.required:
        if merged.get(key) in (None, ""):
            raise _fail(where, f"'{key}' is required for a {step_type.name} step.")
    output_field = str(raw.get("output_field") or snake_case(unique))
    if output_field in used_fields:
        raise _fail(where, f"output_field '{output_field}' is already a manifest column or another step's output; "
                           "each step writes its own field (set output_field).")
    image_field = raw.get("image_field")
    earlier_images = [step.output_field for step in pipeline.steps if step.step_type.writes_images]
    if step_type.needs_images:
        if image_field is None and pipeline.text_only:
            if not earlier_images:
                raise _fail(where, f"a {step_type.name} step needs images, but the input has no image column "
                                   f"('{pipeline.image_key or 'image'}') and no earlier step generates images.")
            image_field = earlier_images[-1]  # generate → caption round trip
        if image_field is not None and image_field not in earlier_images:
            raise _fail(where, f"image_field '{image_field}' is not written by an earlier image_generator step"
                               f"{_did_you_mean(str(image_field), earlier_images)}.")
    if image_field is not None and not step_type.needs_images:
        raise _fail(where, f"image_field: a {step_type.name} step reads no images.")
    known = sorted(used_fields)

    def check_field(key: str, name: str) -> None:
        if name not in used_fields:
            raise _fail(where, f"{key} '{name}' is neither a column of the input nor an earlier step's output."
                               f"{_did_you_mean(name, known)} Known: {', '.join(known) or 'none'}.")

    # A text generator reads input_field only when its prompt names no field (the record's text follows it).
    prompt_names_fields = step_type.name == "text_generator" and isinstance(merged.get("prompt"), str) \
        and bool(_prompt_fields(where, merged["prompt"]))
    if "input_field" in step_type.keys and not prompt_names_fields:
        if not merged.get("input_field"):
            texts = [step.output_field for step in pipeline.steps
                     if step.step_type.name in ("captioner", "text_generator", "template")]
            default = texts[-1] if texts else (pipeline.text_key or ("caption" if "caption" in available else None))
            if default is None:
                why = ("the prompt names no field, so the record's text follows it (as in Dataflow-Gen), but "
                       if step_type.name == "text_generator" else "")
                raise _fail(where, f"set input_field: {why}no earlier step writes text and the input has no "
                                   f"text_key or caption column. Known fields: {', '.join(known) or 'none'}.")
            merged["input_field"] = default
        check_field("input_field", str(merged["input_field"]))
    values = merged.get("values") if isinstance(merged.get("values"), dict) else {}
    for key in ("template", "prompt", "prompt_template"):
        if isinstance(merged.get(key), str) and key in step_type.keys:
            from captionkit.steps.template import template_fields

            try:
                names = template_fields(merged[key])
            except CaptionkitError as error:
                raise _fail(where, str(error)) from None
            for name in names:
                if not name.isidentifier():
                    raise _fail(where, f"{key}: '{{{name}}}' is not a field name; write fields as {{name}} and "
                                       "literal braces as {{ and }}.")
                if name not in values and not (step_type.name == "captioner" and name == output_field):
                    check_field(f"{key} field", name)
    if step_type.name == "filter" and (merged.get("contains_tag") or merged.get("lacks_tag")):
        check_field("tags_field", str(merged.get("tags_field", "tags")))
    if step_type.name == "export":
        for name in ([merged["field"]] if merged.get("field") else []) + list(merged.get("fields") or []):
            check_field("export field", str(name))
    used_fields.add(output_field)
    dataflow_class = str(given_name) if any(str(given_name) in table for table in DATAFLOW_GEN_CLASSES.values()) \
        else None
    return PipelineStep(index, unique, step_type, merged, output_field, image_field, dataflow_class)


def _is_manifest(pipeline: Pipeline) -> bool:
    """Whether the input is a manifest file (local or an object), not a folder, a prefix or one image."""
    if isinstance(pipeline.input, Path) and pipeline.input.is_dir():
        return False
    return PurePosixPath(str(pipeline.input)).suffix.lower() in MANIFEST_SUFFIXES


def _is_text_only(pipeline: Pipeline) -> bool:
    """A manifest without an image column holds prompts (text-only records)."""
    if not _is_manifest(pipeline):
        return False
    columns = pipeline.columns
    key = pipeline.image_key
    if key is not None:
        return key not in columns
    from captionkit.core.records import _IMAGE_COLUMN_GUESSES

    return not any(name in columns for name in _IMAGE_COLUMN_GUESSES)


def _manifest_columns(pipeline: Pipeline) -> list[str]:
    if is_shard_pattern(pipeline.input):  # a WebDataset sample's fields: its .txt member and .json keys
        from captionkit.core.webdataset import list_shard

        shards = open_shards(pipeline.input).shards
        return list(dict.fromkeys(name for record in list_shard(shards[0]).records for name in record.fields))
    if not _is_manifest(pipeline):
        return []
    source = open_source(pipeline.input, image_column=pipeline.image_key, base_dir=pipeline.meta_folder,
                         text_only=True)
    columns: dict[str, None] = {}
    for row in source._rows():
        columns.update(dict.fromkeys(map(str, row)))
    return list(columns)


# ---------------------------------------------------------------------------------------------- running
def _records(pipeline: Pipeline, lister=None) -> list[Record]:
    """The pipeline's input records; ``lister`` (an executor) lists them where it runs (Ray: in parallel)."""
    from captionkit.core.records import ManifestSource

    source = open_source(pipeline.input, recursive=pipeline.recursive, image_column=pipeline.image_key,
                         base_dir=pipeline.meta_folder, text_only=pipeline.text_only)
    if isinstance(source, ManifestSource):
        source.video_column = pipeline.video_key
    records = lister.list_records(source) if lister is not None else list(source)
    if not records:
        from captionkit.core.records import no_images_message

        raise CaptionkitError(no_images_message(source))
    return records


def _step_records(step: PipelineStep, base: list[Record], outputs: dict[str, dict[str, Any]],
                  dropped: set[str]) -> tuple[list[Record], dict[str, str]]:
    """Records as this step sees them: manifest columns plus earlier steps' outputs; images from image_field."""
    records: list[Record] = []
    missing: dict[str, str] = {}
    for record in base:
        if record.id in dropped:
            continue
        fields = dict(record.fields)
        fields.update(outputs.get(record.id, {}))
        path, url = record.path, record.url
        if step.image_field is not None:
            value = fields.get(step.image_field)
            if not value:
                missing[record.id] = f"{record.id}: no image in '{step.image_field}' (its generation failed?)"
                continue
            path, url = Path(str(value)), None
        records.append(Record(record.id, path, fields, url=url))
    return records, missing


def _collect_outputs(store, steps: list[PipelineStep], records: list[Record]) -> tuple[dict[str, dict], set[str]]:
    """Earlier steps' stored outputs per record, and the records a drop filter removed."""
    outputs: dict[str, dict[str, Any]] = {}
    dropped: set[str] = set()
    ids = [record.id for record in records]
    for step in steps:
        for record_id, result in store.get_many(step.output_field, ids).items():
            if result.status != "ok":
                continue
            outputs.setdefault(record_id, {})[step.output_field] = result.text
            raw = result.raw if isinstance(result.raw, dict) else {}
            if step.step_type.name == "filter" and raw.get("action") == "drop" and not raw.get("keep", True):
                dropped.add(record_id)
    return outputs, dropped


def run_pipeline(
    pipeline: Pipeline | str | Path,
    *,
    dry_run: bool = False,
    from_step: int | None = None,
    only_step: str | None = None,
    progress: str = "quiet",
    workers: int | None = None,
    listener=None,
    stop=None,
    executor: str = "local",
    ray_address: str | None = None,
    devices: str | list[str] | None = None,
    ray_actors: int | None = None,
    ray_gpus_per_actor: float | None = None,
    ray_cpus_per_actor: float = 1.0,
    ray_stall_timeout: float | None = None,
    storage_options: dict[str, Any] | str | None = None,
    io_workers: int = 16,
) -> PipelineReport:
    """Run (or, with ``dry_run``, plan) every step in order; one model is resident at a time.

    ``executor="ray"`` (``ray_address``, ``ray_*``) or ``devices`` run the model steps (captioner,
    tagger, text and image generators) on a Ray cluster or on several GPUs; this process commits
    every result, and template, filter and export steps run here.

    Object storage: ``storage_options`` (a dict or ``--storage-options`` JSON) over the file's own;
    ``io_workers`` remote images fetched at once. A URL ``save_folder`` is uploaded after the run.
    """
    import contextlib
    import sys

    from captionkit.executors import make_executor

    if io_workers < 1:
        raise CaptionkitError("--io-workers must be at least 1.")
    given = locations.parse_storage_options(storage_options) if isinstance(storage_options, str) \
        else dict(storage_options or {})
    if not isinstance(pipeline, Pipeline):
        pipeline = load_pipeline(pipeline, given)
    options = {**pipeline.storage_options, **given}
    scale = {"ray_address": ray_address, "devices": devices, "ray_actors": ray_actors,
             "ray_gpus_per_actor": ray_gpus_per_actor, "ray_cpus_per_actor": ray_cpus_per_actor,
             "ray_stall_timeout": ray_stall_timeout}
    make_executor(executor, **scale)  # a missing extra or a bad --devices fails before anything runs
    session, stream = contextlib.nullcontext(), sys.stdout  # JSON progress stays on stdout (Ray's notes go to stderr)
    if executor == "ray" and not dry_run:
        from captionkit.executors.ray_executor import ray_session

        session = ray_session(ray_address)  # one connection for every step
    with session, locations.storage_options_set(options):
        report = _run_pipeline(pipeline, dry_run=dry_run, from_step=from_step, only_step=only_step,
                               progress=progress, workers=workers, listener=listener, stop=stop, executor=executor,
                               scale=scale, stream=stream, io_workers=io_workers)
        if pipeline.save_url is not None and not dry_run and pipeline.save_folder.is_dir():
            uploaded = locations.upload_tree(pipeline.save_folder, pipeline.save_url)
            log.info("pipeline %s: uploaded %d files to %s", pipeline.path, uploaded, pipeline.save_url)
        return report


MODEL_STEP_TYPES = ("captioner", "tagger", "text_generator", "image_generator")  # what --executor/--devices move


def executor_for(step, executor: str, scale: dict) -> bool:
    """Whether a model step goes to --executor ray / --devices, or (a server client, say) stays here."""
    from captionkit.executors import portable, runs_on_device

    if executor != "ray" and not (scale["devices"] and runs_on_device(step)):
        if scale["devices"]:
            log.info("step %s runs in this process (--devices is for models on this machine's devices)", step.field)
        return False
    try:
        portable(step)
    except CaptionkitError as error:
        log.info("step %s runs in this process: %s", step.field, error)
        return False
    return True


def _run_pipeline(pipeline: Pipeline, *, dry_run: bool, from_step: int | None, only_step: str | None,
                  progress: str, workers: int | None, listener, stop, executor: str, scale: dict,
                  stream, io_workers: int = 16) -> PipelineReport:
    from captionkit.core.store import Store, attach_run_log
    from captionkit.executors import make_executor
    from captionkit.executors.local import LocalExecutor, RunOptions
    from captionkit.executors.progress import Progress

    count = len(pipeline.steps)
    if from_step is not None and not 1 <= from_step <= count:
        raise CaptionkitError(f"--from-step {from_step}: the pipeline has steps 1 to {count}.")
    names = [step.name for step in pipeline.steps]
    if only_step is not None and only_step not in names:
        raise CaptionkitError(f"--only-step {only_step}: no such step.{_did_you_mean(only_step, names)} "
                              f"Steps: {', '.join(names)}.")
    lister = make_executor(executor, **scale) if executor == "ray" and not dry_run else None
    base = _records(pipeline, lister)
    pipeline.base_folder.mkdir(parents=True, exist_ok=True)
    if not dry_run:  # temp files a killed run left in the folders the pipeline writes (generated images too)
        from captionkit.core.atomic import remove_stale_temp_files, remove_stale_temp_files_under
        from captionkit.steps.image_generator import OUTPUT_FOLDER

        remove_stale_temp_files_under(pipeline.base_folder)
        remove_stale_temp_files([pipeline.save_folder])
        remove_stale_temp_files_under(pipeline.save_folder / OUTPUT_FOLDER)
    report = PipelineReport(steps=[], dry_run=dry_run, path_rule=pipeline.path_rule)
    current: PipelineStep | None = None
    with Store(pipeline.base_folder) as store:
        handler = attach_run_log(store)
        try:
            log.info("pipeline %s: %d records, %d steps%s; %s", pipeline.path, len(base), count,
                     " (dry run)" if dry_run else "", pipeline.path_rule)
            if not dry_run:
                _migrate_step_folders(pipeline)
            pending: set[str] = set()  # dry run: records earlier steps would still (re)compute
            for step in pipeline.steps:
                current = step
                step_report = StepReport(step.index + 1, step.name, step.step_type.name, step.output_field)
                report.steps.append(step_report)
                wanted = (from_step is None or step.index + 1 >= from_step) and (only_step in (None, step.name))
                outputs, dropped = _collect_outputs(store, pipeline.steps[: step.index], base)
                records, missing = _step_records(step, base, outputs, dropped)
                step_report.total = len(records) + len(missing)
                step_report.errors.update(missing)
                context = _context(pipeline, step, store, records)
                if not wanted:
                    step_report.skipped = True
                    continue
                if step.step_type.name == "export":
                    built = step.step_type.builder(dict(step.config), context)
                    if not dry_run:
                        if listener is not None:  # every step is announced with its own number, exports too
                            listener({"event": "step", "index": step.index + 1, "name": step.name,
                                      "total": len(records)})
                        step_report.processed = built.export(records, store, pipeline)
                        log.info("%s: %s", step.label, step_report.as_dict())
                    continue
                built = step.step_type.builder(dict(step.config), context)
                built.field = step.output_field  # each step writes its own field, whatever its class default
                if stop is not None and stop.is_set():
                    report.interrupted = True
                    return report
                if listener is not None:
                    listener({"event": "step", "index": step.index + 1, "name": step.name, "total": len(records)})
                options = RunOptions(workers=workers, io_workers=io_workers, stop=stop)
                reporter = Progress(progress, stream, listener)
                runner = LocalExecutor(options, reporter)
                if step.step_type.name in MODEL_STEP_TYPES and not dry_run and executor_for(built, executor, scale):
                    runner = make_executor(executor, options, reporter, **scale)
                    if lister is not None:
                        runner.known_signatures = lister.known_signatures  # read while listing, in parallel
                if dry_run:
                    plan = runner.classify(built, records, store)
                    # What earlier steps will recompute may change this step's inputs: count it as to run.
                    waiting = {record.id for record in records} & pending
                    step_report.done = len(set(plan.reuse) - waiting)
                    step_report.todo = len({record.id for record in plan.todo} | waiting)
                    failed = {key: value for key, value in {**plan.failed_earlier, **plan.unfillable}.items()
                              if key not in waiting}
                    step_report.failed = len(failed)
                    step_report.errors.update(failed)
                    pending |= {record.id for record in plan.todo} | waiting
                    continue
                try:
                    summary = runner.run(built, records, store, None)
                finally:
                    built.unload()  # one model resident at a time
                step_report.done, step_report.processed = summary.reused, summary.processed
                step_report.failed = summary.failed + len(missing)
                step_report.errors.update(summary.errors)
                step_report.elapsed_s = summary.elapsed_s
                if step.step_type.name == "filter":
                    step_report.dropped = len(_collect_outputs(store, [step], records)[1])
                log.info("%s: %s", step.label, step_report.as_dict())
                _write_step_results(pipeline, step, store, records)
                if summary.interrupted:
                    report.interrupted = True
                    report.stopped_early = summary.stopped_early
                    return report
            if not dry_run:
                report.table = write_final_table(pipeline, store, base)
            return report
        except CaptionkitError as error:
            if current is None or str(error).startswith(f"{pipeline.path}:"):
                raise
            raise CaptionkitError(f"{pipeline.path}: {current.label}: {error}") from error
        finally:
            import logging as logging_module

            logging_module.getLogger("captionkit").removeHandler(handler)
            handler.close()


def step_folder_name(step: PipelineStep, number: int | None = None) -> str:
    """``step_<n>_<type>_<name>``, ``n`` counted from 1 like the console and ``--from-step`` (and Dataflow-Gen,
    whose step 0 is its own preprocessing)."""
    return f"step_{step.index + 1 if number is None else number}_{step.step_type.name}_{snake_case(step.name)}"


def _migrate_step_folders(pipeline: Pipeline) -> None:
    """Rename folders of the earlier layout (``step_0_…`` for step 1) to the one numbering used everywhere."""
    current = {step_folder_name(step) for step in pipeline.steps}
    for step in reversed(pipeline.steps):
        old = pipeline.base_folder / step_folder_name(step, step.index)
        new = pipeline.base_folder / step_folder_name(step)
        if old.name in current or not old.is_dir():
            continue
        if new.exists():  # the current layout already has this step's results: drop the stale copy
            (old / "result.jsonl").unlink(missing_ok=True)
            try:
                old.rmdir()
            except OSError:  # something else is in there: leave it to the user
                log.warning("%s: %s holds files captionkit did not write; left in place", step.label, old)
                continue
        else:
            old.rename(new)
        log.info("%s: renamed %s to %s (steps are numbered from 1 everywhere)", step.label, old.name, new.name)


def _write_step_results(pipeline: Pipeline, step: PipelineStep, store, records: list[Record]) -> Path:
    """``<base_folder>/step_<n>_<type>_<name>/result.jsonl``: this step's results, as the seed lays them out."""
    from captionkit.core.atomic import atomic_write_lines

    folder = pipeline.base_folder / step_folder_name(step)
    stored = store.get_many(step.output_field, [record.id for record in records])
    rows = []
    for record in records:
        result = stored.get(record.id)
        if result is None:
            continue
        rows.append({"id": record.id, "path": record.location, **record.fields,
                     step.output_field: result.text if result.status == "ok" else None,
                     f"{step.output_field}_raw": result.raw, f"{step.output_field}_error": result.error})
    target = folder / "result.jsonl"
    atomic_write_lines(target, (json.dumps(row, ensure_ascii=False, default=str) for row in rows))
    return target


def final_rows(pipeline: Pipeline, store, base: list[Record]) -> list[dict[str, Any]]:
    """Every record that was not dropped: the user's columns, then each step's field (and all samples)."""
    outputs, dropped = _collect_outputs(store, pipeline.steps, base)
    image_column = _image_column(pipeline, pipeline.columns) or "image"
    rows = []
    ids = [record.id for record in base]
    samples: dict[str, dict[str, list]] = {}
    for step in pipeline.steps:
        for record_id, result in store.get_many(step.output_field, ids).items():
            raw = result.raw if isinstance(result.raw, dict) else {}
            many = raw.get("texts") or raw.get("images")
            if result.status == "ok" and isinstance(many, list) and len(many) > 1:
                samples.setdefault(record_id, {})[f"{step.output_field}_all"] = many
    for record in base:
        if record.id in dropped:
            continue
        row = dict(record.fields)
        if not pipeline.text_only:  # the image column first, as the user's manifest had it
            row = {image_column: _image_value(pipeline, record), **row}
        for step in pipeline.steps:
            if step.step_type.name != "export":
                row[step.output_field] = outputs.get(record.id, {}).get(step.output_field)
        row.update(samples.get(record.id, {}))
        rows.append(row)
    return rows


def _image_value(pipeline: Pipeline, record: Record) -> str:
    """The image as the user's manifest named it (relative to meta_folder), or relative to the input folder.

    A remote image: its key relative to an input prefix, else its URL.
    """
    import os

    if record.url is not None:
        return record.id if not _is_manifest(pipeline) and isinstance(pipeline.input, str) else record.url
    if record.path is not None and not isinstance(record.path, Path):  # a WebDataset sample: <shard name>/<key>
        return record.id
    if record.path is None or not isinstance(pipeline.input, Path):
        return str(record.path or "")
    meta = pipeline.meta_folder if isinstance(pipeline.meta_folder, Path) else None
    root = meta or (pipeline.input if pipeline.input.is_dir() else pipeline.input.parent)
    return Path(os.path.relpath(record.path.resolve(), root.resolve())).as_posix()


def write_final_table(pipeline: Pipeline, store, base: list[Record]) -> Path:
    target = pipeline.save_folder / f"result.{pipeline.output_format}"
    rows = final_rows(pipeline, store, base)
    if pipeline.save_url is not None:  # generated images are named where they are uploaded, not where staged
        staged = str(pipeline.save_folder) + "/"
        rows = [{key: pipeline.save_url.rstrip("/") + "/" + value[len(staged):]
                 if isinstance(value, str) and value.startswith(staged) else value for key, value in row.items()}
                for row in rows]
    return write_table(rows, target, pipeline.output_format)
