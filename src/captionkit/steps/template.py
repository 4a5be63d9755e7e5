"""The ``template`` step: build a field from others, e.g. ``"{trigger}, {tags}. {caption}"``; no model.

Missing fields follow a policy: ``error`` (the record fails, naming the field) or
``empty`` (the field counts as empty and the separators around it are tidied away).
"""

from __future__ import annotations

import re
import string
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.steps.base import Prepared
from captionkit.steps.registry import StepContext, register_step

MISSING_POLICIES = ("error", "empty")
_EMPTY_PARTS = re.compile(r"(?:\s*[,;]\s*){2,}")


def template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise CaptionkitError(f"template {template!r}: {error}; write fields as {{name}}, literal braces as "
                              "{{ and }}.") from error
    for name in names:
        if not name.isidentifier():
            raise CaptionkitError(f"template {template!r}: '{{{name}}}' is not a field name; write fields as "
                                  "{name} and literal braces as {{ and }}.")
    return names


def tidy(text: str) -> str:
    """Remove the separators an empty field leaves behind: 'a, , b' → 'a, b', leading/trailing ', ' or '. '."""
    text = _EMPTY_PARTS.sub(", ", text)
    text = re.sub(r"\s+([,.;])", r"\1", text)
    text = re.sub(r"\.\s*\.", ".", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,;").strip()


class TemplateStep:
    """Fills a template per record from its fields and fixed ``values``."""

    def __init__(self, field: str, template: str, missing: str = "error", values: dict[str, Any] | None = None,
                 cleanup: bool = True) -> None:
        if missing not in MISSING_POLICIES:
            raise CaptionkitError(f"missing: {missing!r}; use one of {', '.join(MISSING_POLICIES)}.")
        self.field = field
        self.template = template
        self.fields = template_fields(template)
        self.missing = missing
        self.values = {key: str(value) for key, value in (values or {}).items()}
        self.cleanup = cleanup
        self.batch_size = 256
        self._filled: dict[str, str] = {}

    def fingerprint(self) -> dict[str, Any]:
        return {"step": "template", "template": self.template, "missing": self.missing, "values": self.values,
                "cleanup": self.cleanup}

    def render_settings(self) -> dict[str, Any]:
        return {}

    def record_settings(self, records: list[Record]) -> dict[str, dict[str, Any] | str]:
        settings: dict[str, dict[str, Any] | str] = {}
        for record in records:
            known = {**{k: "" if v is None else str(v) for k, v in record.fields.items()}, **self.values}
            absent = [name for name in self.fields if name not in known]
            if absent and self.missing == "error":
                settings[record.id] = (f"{record.path or record.id}: the template uses {{{absent[0]}}}, which this "
                                       f"record does not have (set missing: empty to leave it out)")
                continue
            text = self.template.format(**{name: known.get(name, "") for name in self.fields})
            self._filled[record.id] = tidy(text) if self.cleanup else text
            settings[record.id] = {"text": self._filled[record.id]}
        return settings

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def prepare(self, record: Record) -> Prepared:
        return Prepared(record, self._filled[record.id], (0, 0), "", [])

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        return [{"text": item.payload} for item in items]

    def render(self, raw: Any) -> str:
        return str(raw.get("text", "")) if isinstance(raw, dict) else str(raw)

    def recover_from_oom(self) -> None:
        pass


@register_step(
    "template",
    description="build a field from others: '{trigger}, {tags}. {caption}' (missing fields: error or empty)",
    keys={"template": str, "missing": str, "values": dict, "cleanup": bool},
    aliases=("Template", "TextTemplate"),
    required=("template",),
    needs_images=False,
)
def build_template(config: dict[str, Any], context: StepContext) -> TemplateStep:
    return TemplateStep(context.output_field, str(config["template"]), str(config.get("missing", "error")),
                        config.get("values"), bool(config.get("cleanup", True)))
