"""The captioning step: any registered captioner backend + deterministic text post-processing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from captionkit.images import DEFAULT_MAX_PIXELS, load_image
from captionkit.records import Record
from captionkit.steps.base import Prepared
from captionkit.text import clean_caption


@dataclass
class CaptionText:
    """How raw model text becomes the caption written to files."""

    prefix: str = ""
    suffix: str = ""
    cleanup: bool = True
    collapse_loops: bool = True

    def settings(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix, "suffix": self.suffix,
            "cleanup": self.cleanup, "collapse_loops": self.collapse_loops,
        }


class CaptionStep:
    """Writes the ``caption`` field with a captioner backend (e.g. Florence-2)."""

    field = "caption"

    def __init__(
        self,
        captioner: Any,
        text: CaptionText | None = None,
        batch_size: int = 8,
        background: tuple[int, int, int] = (255, 255, 255),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        render_raw: Any = None,
    ) -> None:
        from captionkit.models.florence2 import render_result

        self.captioner = captioner
        self.text = text or CaptionText()
        self.batch_size = batch_size
        self.background = background
        self.max_pixels = max_pixels
        self._render_raw = render_raw or render_result
        self._target_size: tuple[int, int] | None = None

    def fingerprint(self) -> dict[str, Any]:
        return self.captioner.fingerprint()

    def render_settings(self) -> dict[str, Any]:
        return self.text.settings()

    def load(self) -> None:
        self.captioner.load()
        self._target_size = self.captioner.image_size()

    def unload(self) -> None:
        self.captioner.unload()

    def prepare(self, record: Record) -> Prepared:
        loaded = load_image(record.path, self.background, self._target_size, self.max_pixels)
        payload = self.captioner.preprocess(loaded.image)
        return Prepared(record, payload, loaded.original_size, loaded.content_hash, loaded.notes)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        return self.captioner.caption_batch([item.payload for item in items], [item.original_size for item in items])

    def render(self, raw: Any) -> str:
        text = self._render_raw(raw)
        if self.text.cleanup:
            text = clean_caption(text, collapse_loops=self.text.collapse_loops)
        return f"{self.text.prefix}{text}{self.text.suffix}"

    def cpu_thread_candidates(self) -> list[int]:
        """Thread counts the executor may measure when the model runs on the CPU (after load)."""
        from captionkit.thread_tuning import torch_thread_candidates

        return torch_thread_candidates(getattr(self.captioner, "device", "cpu"))

    def set_cpu_threads(self, count: int) -> None:
        from captionkit.thread_tuning import set_torch_threads

        set_torch_threads(count)

    def recover_from_oom(self) -> None:
        self.captioner.recover_from_oom()
