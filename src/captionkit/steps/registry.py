"""Pipeline step types register themselves here, so YAML pipelines, the CLI and the UI build the same objects.

A step type is one module under ``captionkit/steps/`` with a decorated builder::

    @register_step("template", aliases=("TemplateStep",), keys={"template": str, "missing": str})
    def build_template(config: dict, context: StepContext) -> Step: ...

``keys`` lists every config key the type accepts, with its type; the pipeline validates
a whole file against them (with a did-you-mean for typos) before any model loads.
``key_aliases`` maps another tool's spelling to captionkit's (``model_path`` → ``model``).
The builder returns an object meeting :class:`captionkit.steps.base.Step`; its ``field``
is the step's output field, chosen by the pipeline.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError


@dataclass
class StepContext:
    """What a step builder may use besides its own config."""

    index: int  # position in the pipeline, from 0
    name: str  # the step's name (unique in the pipeline)
    output_field: str  # the record field (and store step) this step writes
    base_folder: Path  # intermediate results and the store
    save_folder: Path  # final results (generated images, the final table)
    input_fields: list[str] = field(default_factory=list)  # fields earlier steps or the manifest provide
    store: Any = None  # the pipeline's Store
    announce: bool = True  # log notes about the config (backend chosen, keys that do nothing); once per file


@dataclass
class StepType:
    """A registered step type."""

    name: str
    builder: Callable[[dict[str, Any], StepContext], Any]
    description: str
    keys: dict[str, Any]  # accepted config keys → expected type (or a tuple of types)
    aliases: tuple[str, ...] = ()  # other tools' type names that mean this type
    key_aliases: dict[str, str] = field(default_factory=dict)  # other spelling → captionkit key
    required: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()  # captionkit extras the type needs
    needs_images: bool = True  # False: text-only records are fine (template, filter, generators)
    writes_images: bool = False  # True: the output field holds image paths later steps can read


_STEPS: dict[str, StepType] = {}
_SKIP_MODULES = {"base", "registry"}


def register_step(
    name: str,
    *,
    description: str,
    keys: dict[str, Any],
    aliases: tuple[str, ...] = (),
    key_aliases: dict[str, str] | None = None,
    required: tuple[str, ...] = (),
    extras: tuple[str, ...] = (),
    needs_images: bool = True,
    writes_images: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a step builder ``(config, context) -> Step``."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        _STEPS[name] = StepType(name, builder, description, dict(keys), tuple(aliases), dict(key_aliases or {}),
                                tuple(required), tuple(extras), needs_images, writes_images)
        return builder

    return wrap


def _load_builtins() -> None:
    """Import every module of the steps package: each registers its step types."""
    package = importlib.import_module("captionkit.steps")
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name not in _SKIP_MODULES:
            importlib.import_module(f"captionkit.steps.{module.name}")


def step_types() -> dict[str, StepType]:
    """Every registered step type by name."""
    _load_builtins()
    return dict(sorted(_STEPS.items()))


def find_step_type(name: str) -> StepType:
    """The step type called ``name`` or aliased so; an unknown name gets a did-you-mean."""
    import difflib

    types = step_types()
    if name in types:
        return types[name]
    for step_type in types.values():
        if name in step_type.aliases:
            return step_type
    every = sorted([*types, *(alias for step_type in types.values() for alias in step_type.aliases)])
    close = difflib.get_close_matches(name, every, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise CaptionkitError(f"step type '{name}' is unknown.{hint} Known: {', '.join(sorted(types))}.")
