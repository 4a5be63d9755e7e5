"""The UI's forms, read from the CLI commands' own signatures, and their values turned into API calls.

Why from the signatures: every option `captionkit caption` (or `tag`, `render`) has shows
up in the page with the same default and help text, and an option added to the CLI later
appears without anyone editing the UI. Values arrive as strings/numbers from widgets and
leave as the keyword arguments :mod:`captionkit.api` takes, converted the way the CLI
converts them. No gradio here.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError

# Options whose values are a fixed set (the CLI checks them as text).
CHOICES: dict[str, tuple[str, ...]] = {
    "backend": ("auto", "transformers", "openai", "vllm"),
    "existing": ("skip", "overwrite", "append", "fill-empty"),
    "on_collision": ("skip", "keep-extension"),
    "sample_choice": ("first", "longest", "all"),
    "dtype": ("auto", "fp32", "fp16", "bf16"),
    "attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "order": ("score", "name"),
    "field": ("tags", "caption"),
    "task": ("", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>", "<OCR_WITH_REGION>", "<OD>",
             "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>",
             "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>",
             "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>"),
}
# The page has its own progress view and folder field, and no exit code for --max-failures to decide.
NOT_IN_FORMS = {"path", "quiet", "progress", "print_scores", "max_failures"}
TRISTATE = ("default", "on", "off")

# Known checkpoints for the model picker; any hub id or local folder may be typed instead.
FLORENCE_MODELS = (
    "florence-community/Florence-2-base", "florence-community/Florence-2-large",
    "florence-community/Florence-2-base-ft", "florence-community/Florence-2-large-ft",
)
CHAT_MODELS = (
    "llava-hf/llava-1.5-7b-hf", "fancyfeast/llama-joycaption-beta-one-hf-llava", "llava-hf/llava-v1.6-mistral-7b-hf",
    "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct", "HuggingFaceTB/SmolVLM-Instruct", "HuggingFaceM4/Idefics3-8B-Llama3",
    "google/gemma-3-4b-it", "Salesforce/blip2-opt-2.7b", "meta-llama/Llama-3.2-11B-Vision-Instruct",
    "microsoft/Phi-3.5-vision-instruct",
)


@dataclass
class Field:
    """One option of a command as a widget: its name, kind, default, help and section."""

    name: str
    kind: str  # text, optional_text, optional_int, optional_float, int, float, bool, tristate, choice, list
    default: Any
    help: str
    group: str | None
    choices: tuple[str, ...] = ()
    flag: str = ""

    @property
    def label(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def widget_default(self) -> Any:
        """The default as the widget shows it."""
        if self.kind == "tristate":
            return {None: "default", True: "on", False: "off"}[self.default]
        if self.kind == "list":
            return ", ".join(str(item) for item in self.default or [])
        if self.kind in ("optional_text", "optional_int", "optional_float"):
            return "" if self.default is None else str(self.default)
        if self.kind == "text":
            return escape(self.default) if "separator" in self.name else self.default
        if self.kind == "choice":
            return "" if self.default is None else self.default
        return self.default


def escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def unescape(text: str) -> str:
    """``\\n`` and ``\\t`` typed in a one-line box become a newline and a tab (separators)."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            nxt = text[index + 1]
            out.append({"n": "\n", "t": "\t", "\\": "\\"}.get(nxt, "\\" + nxt))
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def _split_union(annotation: Any) -> tuple[Any, bool]:
    """(the type, whether None is allowed) for ``X | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def command_fields(command) -> list[Field]:
    """The fields of a Typer command function, in its order."""
    hints = typing.get_type_hints(command, include_extras=True)
    fields: list[Field] = []
    for name, parameter in inspect.signature(command).parameters.items():
        if name in NOT_IN_FORMS:
            continue
        annotation = hints[name]
        info = annotation.__metadata__[0] if hasattr(annotation, "__metadata__") else None
        base, optional = _split_union(annotation.__origin__ if hasattr(annotation, "__metadata__") else annotation)
        flags = [decl for decl in (getattr(info, "param_decls", None) or ()) if decl.startswith("--")]
        help_text = (getattr(info, "help", None) or "").strip()
        group = getattr(info, "rich_help_panel", None)
        default = parameter.default
        if typing.get_origin(base) is list:
            kind = "list"
        elif base is bool:
            kind = "tristate" if optional else "bool"
        elif base is int:
            kind = "optional_int" if optional else "int"
        elif base is float:
            kind = "optional_float" if optional else "float"
        elif name in CHOICES:
            kind = "choice"
        else:
            kind = "optional_text" if optional else "text"
        flag = flags[0].split("/")[0] if flags else ""
        fields.append(Field(name, kind, default, help_text, group, CHOICES.get(name, ()), flag))
    return fields


def parse_value(field: Field, raw: Any) -> Any:
    """A widget's value → the value the CLI would have passed, or a plain error naming the option."""
    if field.kind == "bool":
        return bool(raw)
    if field.kind == "tristate":
        return {"default": None, "on": True, "off": False, None: None}.get(raw, None)
    if field.kind in ("int", "float"):
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            raise CaptionkitError(f"{field.label}: give a number (default {field.default}).")
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise CaptionkitError(f"{field.label}: '{raw}' is not a number.") from None
        if field.kind == "int":
            if number != int(number):
                raise CaptionkitError(f"{field.label}: '{raw}' is not a whole number.")
            return int(number)
        return number
    if field.kind in ("optional_int", "optional_float"):
        text = "" if raw is None else str(raw).strip()
        if not text:
            return None
        try:
            return int(text) if field.kind == "optional_int" else float(text)
        except ValueError:
            kind = "a whole number" if field.kind == "optional_int" else "a number"
            raise CaptionkitError(f"{field.label}: '{text}' is not {kind}; leave it empty for the default.") from None
    if field.kind == "list":
        text = "" if raw is None else str(raw)
        items = [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]
        return items or None
    if field.kind == "optional_text":
        text = "" if raw is None else str(raw).strip()
        return text or None
    if field.kind == "choice":
        text = "" if raw is None else str(raw).strip()
        if not text:
            return None if field.default is None else field.default
        return text
    text = "" if raw is None else str(raw)
    return unescape(text) if "separator" in field.name else text


def parse_values(fields: list[Field], raw_values: dict[str, Any]) -> dict[str, Any]:
    return {field.name: parse_value(field, raw_values.get(field.name, field.widget_default())) for field in fields}


# --- the commands ---------------------------------------------------------------------------------

def caption_fields() -> list[Field]:
    from captionkit import cli

    return command_fields(cli.caption)


def tag_fields() -> list[Field]:
    from captionkit import cli

    return command_fields(cli.tag)


def render_fields() -> list[Field]:
    from captionkit import cli

    return command_fields(cli.render)


TAG_OPTION_NAMES = ("general_threshold", "character_threshold", "threshold", "use_model_thresholds", "mcut",
                    "max_tags", "include_rating", "blacklist", "replace", "always_first", "underscores_to_spaces",
                    "escape_parentheses", "order", "separator")


def caption_call(values: dict[str, Any]):
    """``(ModelOptions, keyword arguments of api.caption)`` from parsed caption-form values, as the CLI builds them."""
    from captionkit.api import ModelOptions

    defaults = {item.name: item.default for item in dataclasses.fields(ModelOptions)}
    # An empty box is the library's default (a field that is not None by default keeps its own).
    model_values = {name: value for name, value in values.items()
                    if name in defaults and not (value is None and defaults[name] is not None)}
    names = set(defaults)
    if model_values.get("early_stopping") is False:
        model_values["early_stopping"] = None  # the CLI passes `early_stopping or None`
    for name in ("adapter", "cache_dir"):
        if model_values.get(name) is not None:
            model_values[name] = Path(str(model_values[name])).expanduser()
    for name in ("task",):
        if not model_values.get(name):
            model_values[name] = None
    options = ModelOptions(**model_values)
    run = {name: value for name, value in values.items() if name not in names}
    run["write_sidecars"] = run.pop("write", True)  # the CLI's --write/--no-write
    for name in ("base_dir", "output_dir"):
        if run.get(name) is not None:
            run[name] = Path(str(run[name])).expanduser()
    run["export"] = [Path(item).expanduser() for item in run.get("export") or []]
    return options, run


def tag_options_from(values: dict[str, Any]):
    """TagOptions from parsed tag-form values (the CLI's own conversion)."""
    from captionkit import cli

    return cli._tag_options(*(values[name] for name in TAG_OPTION_NAMES))


def tag_call(values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of api.tag from parsed tag-form values."""
    options = tag_options_from(values)
    run = {name: value for name, value in values.items() if name not in TAG_OPTION_NAMES}
    run["write_sidecars"] = run.pop("write", True)
    for name in ("base_dir", "output_dir", "cache_dir"):
        if run.get(name) is not None:
            run[name] = Path(str(run[name])).expanduser()
    run["export"] = [Path(item).expanduser() for item in run.get("export") or []]
    run["options"] = options
    return run


def render_call(tag_values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of api.render (field tags) from the tag form: the same files, new options."""
    names = {field.name for field in render_fields()}
    run = {name: value for name, value in tag_values.items()
           if name in names and name not in TAG_OPTION_NAMES and name != "field"}
    for name in ("base_dir", "output_dir"):
        if run.get(name) is not None:
            run[name] = Path(str(run[name])).expanduser()
    for caption_only in ("prefix", "suffix", "cleanup", "collapse_loops", "strip_openers", "sample_choice",
                         "sample_separator"):
        run.pop(caption_only, None)
    run["options"] = tag_options_from(tag_values)
    return run


def model_choices() -> list[str]:
    """The picker's list: known Florence-2 checkpoints, then one model per chat family."""
    from captionkit.models import list_backends

    seen: list[str] = list(FLORENCE_MODELS)
    for model in CHAT_MODELS:
        if model not in seen:
            seen.append(model)
    for info in list_backends():
        if info.kind == "captioner" and info.default_model and info.default_model not in seen:
            seen.append(info.default_model)
    return seen


def families_text() -> str:
    """One line per captioner family (for the picker's help): name, model types, extra needed."""
    from captionkit.models import list_backends

    lines = []
    for info in list_backends():
        if info.kind != "captioner":
            continue
        extra = ""
        if info.extras and not info.installed():
            extra = f" (needs `pip install 'captionkit[{','.join(info.extras)}]'`)"
        lines.append(f"- **{info.name}**: {info.description}{extra}")
    return "\n".join(lines)
