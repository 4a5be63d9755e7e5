"""The ``filter`` step: drop or flag records on conditions over a field; no model.

Conditions: empty, length in words or CLIP tokens, contains or lacks a tag, a regular
expression that must (or must not) match. ``action: drop`` removes failing records
from later steps and the final table; ``action: flag`` keeps them and writes the reasons.
"""

from __future__ import annotations

import re
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.steps.base import Prepared
from captionkit.steps.registry import StepContext, register_step

ACTIONS = ("drop", "flag")


def _tags(text: str) -> set[str]:
    return {part.strip().lower().replace("_", " ") for part in re.split(r"[,\n]", text) if part.strip()}


class FilterStep:
    """Judges each record; the raw result is ``{"keep": bool, "reasons": [...]}``."""

    def __init__(self, field: str, input_field: str, *, action: str = "drop", drop_empty: bool = True,
                 min_words: int | None = None, max_words: int | None = None, max_clip_tokens: int | None = None,
                 contains_tag: list[str] | None = None, lacks_tag: list[str] | None = None,
                 tags_field: str = "tags", regex: str | None = None, not_regex: str | None = None) -> None:
        if action not in ACTIONS:
            raise CaptionkitError(f"action: {action!r}; use drop or flag.")
        for name, pattern in (("regex", regex), ("not_regex", not_regex)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise CaptionkitError(
                        f"{name}: {pattern!r} is not a valid regular expression ({error}).") from error
        if max_clip_tokens is not None:
            from captionkit.core.tokens import clip_token_count

            clip_token_count("check the tokenizer is installed")
        self.field = field
        self.input_field = input_field
        self.action = action
        self.conditions = {
            "drop_empty": drop_empty, "min_words": min_words, "max_words": max_words,
            "max_clip_tokens": max_clip_tokens,
            "contains_tag": [tag.lower().replace("_", " ") for tag in contains_tag or []],
            "lacks_tag": [tag.lower().replace("_", " ") for tag in lacks_tag or []], "tags_field": tags_field,
            "regex": regex, "not_regex": not_regex,
        }
        self.batch_size = 256
        self._verdicts: dict[str, dict[str, Any]] = {}

    def fingerprint(self) -> dict[str, Any]:
        return {"step": "filter", "input_field": self.input_field, "action": self.action, **self.conditions}

    def render_settings(self) -> dict[str, Any]:
        return {}

    def judge(self, record: Record) -> list[str]:
        """Reasons this record fails, empty when it passes."""
        conditions = self.conditions
        text = record.fields.get(self.input_field)
        text = "" if text is None else str(text)
        reasons = []
        words = len(text.split())
        if conditions["drop_empty"] and not text.strip():
            reasons.append(f"{self.input_field} is empty")
        if conditions["min_words"] is not None and words < conditions["min_words"]:
            reasons.append(f"{self.input_field} has {words} words (< {conditions['min_words']})")
        if conditions["max_words"] is not None and words > conditions["max_words"]:
            reasons.append(f"{self.input_field} has {words} words (> {conditions['max_words']})")
        if conditions["max_clip_tokens"] is not None:
            from captionkit.core.tokens import clip_token_count

            count = clip_token_count(text)
            if count > conditions["max_clip_tokens"]:
                reasons.append(f"{self.input_field} is {count} CLIP tokens (> {conditions['max_clip_tokens']})")
        if conditions["contains_tag"] or conditions["lacks_tag"]:
            tags = _tags(str(record.fields.get(conditions["tags_field"]) or ""))
            reasons += [f"lacks tag '{tag}'" for tag in conditions["contains_tag"] if tag not in tags]
            reasons += [f"has tag '{tag}'" for tag in conditions["lacks_tag"] if tag in tags]
        if conditions["regex"] is not None and not re.search(conditions["regex"], text):
            reasons.append(f"{self.input_field} does not match {conditions['regex']!r}")
        if conditions["not_regex"] is not None and re.search(conditions["not_regex"], text):
            reasons.append(f"{self.input_field} matches {conditions['not_regex']!r}")
        return reasons

    def record_settings(self, records: list[Record]) -> dict[str, dict[str, Any] | str]:
        settings: dict[str, dict[str, Any] | str] = {}
        for record in records:
            reasons = self.judge(record)
            self._verdicts[record.id] = {"keep": not reasons, "reasons": reasons}
            inputs = {self.input_field: record.fields.get(self.input_field)}
            if self.conditions["contains_tag"] or self.conditions["lacks_tag"]:
                inputs[self.conditions["tags_field"]] = record.fields.get(self.conditions["tags_field"])
            settings[record.id] = {"inputs": inputs}
        return settings

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def prepare(self, record: Record) -> Prepared:
        return Prepared(record, self._verdicts[record.id], (0, 0), "", [])

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        return [{**item.payload, "action": self.action} for item in items]

    def render(self, raw: Any) -> str:
        return "keep" if raw.get("keep") else "; ".join(raw.get("reasons", []))

    def recover_from_oom(self) -> None:
        pass


@register_step(
    "filter",
    description="drop or flag records: empty, words, CLIP tokens, contains/lacks a tag, regex",
    keys={"input_field": str, "action": str, "drop_empty": bool, "min_words": int, "max_words": int,
          "max_clip_tokens": int, "contains_tag": list, "lacks_tag": list, "tags_field": str, "regex": str,
          "not_regex": str},
    aliases=("Filter", "TextFilter"),
    needs_images=False,
)
def build_filter(config: dict[str, Any], context: StepContext) -> FilterStep:
    options = {key: value for key, value in config.items() if key != "input_field"}
    return FilterStep(context.output_field, str(config.get("input_field") or "caption"), **options)
