"""How an option is declared once: a dataclass field whose metadata says everything the surfaces need.

Why: the command line, the web UI's forms and a pipeline's YAML keys all read the same
declaration (help text, choices, default, help panel, which backends it applies to, whether
it enters the fingerprint, other tools' spellings). An option added here appears on every
surface; none of them keeps its own table. Nothing here knows Typer, Gradio or YAML.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SURFACES = frozenset({"cli", "ui", "pipeline"})
KEY = "captionkit_option"


@dataclass
class Option:
    """One option of a command, as every surface shows it."""

    name: str = ""  # the Python name: the api keyword, the YAML key and the form field
    help: str = ""
    panel: str | None = None  # the --help section (and the web form's section)
    flags: tuple[str, ...] = ()  # Typer's names when not the plain --name (e.g. "--quiet", "-q")
    choices: tuple[str, ...] = ()  # a fixed set of values (the form shows a dropdown)
    # Where the option does something: backend/family targets ("florence", "chat", "vllm", "openai");
    # empty: everywhere. ``refusals`` says, per target it does not apply to, why (``*``: any other).
    applies: frozenset[str] = frozenset()
    refusals: Mapping[str, str] = field(default_factory=dict)
    pipeline_inapplicable: str = "error"  # "warn": a pipeline warns and drops it (Dataflow-Gen files carry it)
    fingerprint: bool = False  # a change means the result is made again (or re-rendered)
    surfaces: frozenset[str] = SURFACES
    aliases: tuple[str, ...] = ()  # other tools' YAML spellings (Dataflow-Gen's model_path ...)
    api_name: str | None = None  # the api keyword when it differs from ``name`` (write → write_sidecars)
    api: bool = True  # False: the command line itself uses it (--quiet, --max-failures)
    value_type: Any = None  # str, int, float, bool, Path, list[str], list[Path] or dict (NAME=VALUE pairs)
    optional: bool = False  # None is a value (the library's own default)
    pair_value: Any = str  # for dict options: the type of VALUE in NAME=VALUE
    split_commas: bool = False  # list options: "a, b" is two items
    keep_none: bool = False  # list options: not given stays None (the library reads None as "all"), not []
    metavar: str | None = None  # the --help label when the type's own would mislead (a URL-or-path text: PATH)
    default: Any = None

    @property
    def flag(self) -> str:
        """The spelling users type: --max-new-tokens (the first of ``flags`` when given)."""
        first = self.flags[0].split("/")[0] if self.flags else ""
        return first if first.startswith("--") else "--" + self.name.replace("_", "-")

    @property
    def keyword(self) -> str:
        return self.api_name or self.name

    def applies_to(self, target: str) -> bool:
        return not self.applies or target in self.applies

    def refusal(self, target: str, **facts: str) -> str:
        return (self.refusals.get(target) or self.refusals.get("*") or f"does not apply to {target}.").format(**facts)

    def convert(self, value: Any) -> Any:
        """A surface's value (typed by that surface) → the value the library takes."""
        if self.value_type is dict:
            if value is None:
                return {}
            if isinstance(value, Mapping):
                return dict(value)
            return _pairs(self, value)
        if _is_list(self.value_type):
            if value is None:
                return None if self.keep_none else []
            items = list(value)
            if self.split_commas:
                items = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
            return items
        return value


def option(default: Any = None, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           **details: Any) -> Any:
    """A dataclass field carrying its :class:`Option` (see the module docstring)."""
    info = Option(help=help, **details)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={KEY: info})
    return field(default=default, metadata={KEY: info})


def declared_options(cls: type) -> list[Option]:
    """The options a dataclass declares, in field order, with name, type and default filled in."""
    return list(_declared(cls))


@functools.cache
def _declared(cls: type) -> tuple[Option, ...]:
    hints = typing.get_type_hints(cls)
    found = []
    for item in dataclasses.fields(cls):
        info = item.metadata.get(KEY)
        if info is None:
            continue
        value_type, optional = _value_type(hints[item.name])
        default = item.default
        if default is dataclasses.MISSING:
            default = None  # lists and mappings: empty, which the command line spells as "not given"
        found.append(dataclasses.replace(
            info, name=item.name, default=default, value_type=info.value_type or value_type,
            optional=info.optional or optional))
    return tuple(found)


def _is_list(value_type: Any) -> bool:
    return typing.get_origin(value_type) is list or value_type is list


def _value_type(annotation: Any) -> tuple[Any, bool]:
    """(the value's type, whether None is allowed) from ``X | None``; ``str | Path`` is a Path."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if Path in args:
            return Path, optional
        return (args[0] if len(args) == 1 else str), optional
    if origin is dict:
        return dict, False
    return annotation, False


def _pairs(declared: Option, values: Any) -> dict[str, Any]:
    """NAME=VALUE items (repeated --threshold artist=0.5, or a form's "artist=0.5, meta=0.4")."""
    from captionkit.core.errors import CaptionkitError

    pairs: dict[str, Any] = {}
    for value in values:
        if "=" not in str(value):
            raise CaptionkitError(f"{declared.flag} {value!r}: write it as NAME=VALUE.")
        name, _, target = str(value).partition("=")
        try:
            pairs[name.strip()] = declared.pair_value(target.strip())
        except ValueError as error:
            raise CaptionkitError(f"{declared.flag}: {error}; write it as CATEGORY=0.5") from error
    return pairs
