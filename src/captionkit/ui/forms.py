"""The UI's forms, read from the declared options of each command, and their values handed to the api.

Why from the declaration (:mod:`captionkit.options`): every option `captionkit caption` (or
`tag`, `render`) has shows up in the page with the same default, help text and choices, and
an option declared later appears without anyone editing the UI. Values arrive as
strings/numbers from widgets, are parsed here into the option's declared type, and the
declaration turns them into the api's keywords. No gradio here, and no command line.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit.core.declare import Option
from captionkit.core.errors import CaptionkitError
from captionkit.core.tagging import TagOptions
from captionkit.options.commands import CAPTION, RENDER, TAG, Command
from captionkit.options.text import CaptionText

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
    kind: str  # text, optional_text, path, optional_path, optional_int, optional_float, int, float, bool, tristate,
    #            choice, list
    default: Any
    help: str
    group: str | None
    choices: tuple[str, ...] = ()
    flag: str = ""
    item_type: Any = str  # list items: str or Path

    @property
    def label(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def widget_default(self) -> Any:
        """The default as the widget shows it."""
        if self.kind == "tristate":
            return {None: "default", True: "on", False: "off"}[self.default]
        if self.kind == "list":
            return ", ".join(str(item) for item in self.default or [])
        if self.kind in ("optional_text", "optional_int", "optional_float", "path", "optional_path"):
            return "" if self.default is None else str(self.default)
        if self.kind == "text":
            return escape(self.default) if "separator" in self.name else self.default
        if self.kind == "choice":
            return "" if self.default is None else self.default
        return self.default


def field_for(item: Option) -> Field:
    """The widget of a declared option."""
    value_type = item.value_type
    item_type = str
    if value_type is dict or typing.get_origin(value_type) is list:
        kind = "list"  # NAME=VALUE pairs too: "artist=0.5, meta=0.4"
        item_type = next(iter(typing.get_args(value_type)), str)
    elif value_type is bool:
        kind = "tristate" if item.optional else "bool"
    elif value_type is int:
        kind = "optional_int" if item.optional else "int"
    elif value_type is float:
        kind = "optional_float" if item.optional else "float"
    elif item.choices:
        kind = "choice"
    elif value_type is Path:
        kind = "optional_path" if item.optional else "path"
    else:
        kind = "optional_text" if item.optional else "text"
    choices = (("",) if item.optional else ()) + item.choices if kind == "choice" else ()
    return Field(item.name, kind, item.default, item.help, item.panel, choices, item.flag, item_type)


def declared_fields(command: Command) -> list[Field]:
    """The form fields of a command: its declared options that the page shows, in order."""
    return [field_for(item) for item in command.options("ui")]


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


def parse_value(field: Field, raw: Any) -> Any:
    """A widget's value → the option's declared type, or a plain error naming the option."""
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
        if field.item_type is Path:
            return [Path(item).expanduser() for item in items] or None
        return items or None
    if field.kind in ("path", "optional_path"):
        text = "" if raw is None else str(raw).strip()
        if not text:
            return field.default
        return Path(text).expanduser()
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
    return declared_fields(CAPTION)


def tag_fields() -> list[Field]:
    return declared_fields(TAG)


def render_fields() -> list[Field]:
    return declared_fields(RENDER)


def tag_option_names() -> list[str]:
    """The tag form's "which tags are written" options: those TagOptions declares."""
    return [name for name in TAG.names("ui") if TAG.owner(name) is TagOptions]


def caption_call(values: dict[str, Any]):
    """``(ModelOptions, keyword arguments of api.caption)`` from parsed caption-form values."""
    arguments = CAPTION.api_arguments(values)
    return arguments.pop("options"), arguments


def tag_call(values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of api.tag from parsed tag-form values."""
    return TAG.api_arguments(values)


def render_call(tag_values: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of api.render (field tags) from the tag form: the same files, new options."""
    names = {name for name in RENDER.names("ui") if name != "field" and RENDER.owner(name) is not CaptionText}
    return RENDER.api_arguments({name: value for name, value in tag_values.items() if name in names})


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
