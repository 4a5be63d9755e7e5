"""How raw model text becomes the caption written to files: declared options and the rendering itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from captionkit.core.declare import declared_options, option
from captionkit.core.errors import CaptionkitError
from captionkit.core.text import clean_caption, is_refusal, strip_filler_openers

SAMPLE_CHOICES = ("first", "longest", "all")
_CHAT_PANEL = "Chat model options (BLIP-2, LLaVA, Qwen2-VL, ...; also servers and vLLM)"


@dataclass
class CaptionText:
    """How raw model text becomes the caption written to files (a change re-renders, no model runs)."""

    prefix: str = option("", "Text put before every caption, verbatim (e.g. 'ohwx, ').", fingerprint=True)
    suffix: str = option("", "Text put after every caption, verbatim.", fingerprint=True)
    cleanup: bool = option(True, "Strip special tokens and extra whitespace.", fingerprint=True)
    collapse_loops: bool = option(True, "Collapse repeated-phrase loops.", fingerprint=True)
    strip_openers: bool = option(False, "Remove filler openers ('The image shows', 'In this image,').",
                                 panel=_CHAT_PANEL, fingerprint=True)
    sample_choice: str = option("first", "With --samples: first, longest or all (joined by --sample-separator).",
                                choices=SAMPLE_CHOICES, panel=_CHAT_PANEL, fingerprint=True)
    sample_separator: str = option("\n", "Between samples with --sample-choice all.", panel=_CHAT_PANEL,
                                   fingerprint=True)

    def __post_init__(self) -> None:
        if self.sample_choice not in SAMPLE_CHOICES:
            raise CaptionkitError(f"--sample-choice {self.sample_choice}: use one of {', '.join(SAMPLE_CHOICES)}.")

    def settings(self) -> dict[str, Any]:
        """What the written text depends on: the options declared ``fingerprint=True``."""
        return {item.name: getattr(self, item.name) for item in declared_options(CaptionText) if item.fingerprint}

    def clean(self, text: str) -> str:
        if self.cleanup:
            text = clean_caption(text, collapse_loops=self.collapse_loops)
        if self.strip_openers:
            text = strip_filler_openers(text)
        return text

    def render(self, texts: list[str]) -> str:
        """Clean every candidate, leave out refusals and empties, then choose (first, longest or all)."""
        cleaned = [self.clean(text) for text in texts]
        kept = [text for text in cleaned if text and not is_refusal(text)] or cleaned[:1]
        if not kept:
            return f"{self.prefix}{self.suffix}"
        if self.sample_choice == "all":  # every sample is a caption of its own: each gets the trigger words
            return self.sample_separator.join(f"{self.prefix}{text}{self.suffix}" for text in kept)
        body = max(kept, key=len) if self.sample_choice == "longest" else kept[0]
        return f"{self.prefix}{body}{self.suffix}"
