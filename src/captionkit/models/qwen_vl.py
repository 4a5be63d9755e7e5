"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL captioners (native transformers classes).

What differs from the generic chat backend: the image processor resizes every image to a
multiple of patch x merge size (28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL) with its pixel
count between ``min_pixels`` and ``max_pixels``; one image costs pixels / (patch x merge)² tokens.
Those two limits are the family's resolution options: lower ``max_pixels`` for speed and
memory, raise ``min_pixels`` so small images still get enough tokens. They enter the
fingerprint and are set on the loaded image processor's ``size`` (``shortest_edge`` /
``longest_edge``). Not passed as ``from_pretrained`` keywords: the tokenizer keeps those
too and re-sends them on every call through a deprecated path (a FutureWarning per batch).

Batching needs nothing special: the processor pads on the left and the model computes its
3D (M-RoPE) position ids from the attention mask, so batched greedy captions equal
one-at-a-time ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.models import register_backend
from captionkit.models.chat_vlm import ChatVLMCaptioner

PIXEL_OPTIONS = ("min_pixels", "max_pixels")


def check_pixel_limits(options: dict[str, Any]) -> dict[str, int]:
    """Validated ``min_pixels`` / ``max_pixels`` (only those given)."""
    limits: dict[str, int] = {}
    for name in PIXEL_OPTIONS:
        value = options.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CaptionkitError(
                f"--{name.replace('_', '-')} {value!r}: give a whole number of pixels (width x height), "
                "e.g. 200704 for 256 image tokens of 28x28 pixels."
            )
        limits[name] = value
    if len(limits) == 2 and limits["min_pixels"] > limits["max_pixels"]:
        raise CaptionkitError(
            f"--min-pixels {limits['min_pixels']} is more than --max-pixels {limits['max_pixels']}; "
            "the smallest image size cannot exceed the largest."
        )
    return limits


@register_backend(
    "qwen_vl",
    kind="captioner",
    description="Qwen2-VL, Qwen2.5-VL and Qwen3-VL chat VLMs (native transformers); --min-pixels/--max-pixels",
    model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl"),
)
class QwenVLCaptioner(ChatVLMCaptioner):
    """Qwen2-VL family: ChatML template with a system turn, flat image list, pixel-count limits."""

    family = "qwen2_vl"
    model_class = "AutoModelForImageTextToText"
    supports_system_prompt = True
    nested_images = False

    def check_family_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = {name: value for name, value in options.items() if name not in PIXEL_OPTIONS}
        if unknown:
            super().check_family_options(unknown)  # raises, naming the unknown options
        return check_pixel_limits(options)

    def load(self) -> None:
        fresh = self.model is None
        super().load()
        if fresh and self.family_options:
            try:
                apply_pixel_limits(self.processor.image_processor, self.family_options, self.model_name)
            except CaptionkitError:
                self.unload()  # a later load() must not run with the checkpoint's limits
                raise


def apply_pixel_limits(image_processor: Any, limits: dict[str, int], model: str) -> None:
    """Set ``size.shortest_edge`` / ``size.longest_edge`` (min / max pixels); a limit not given keeps
    the checkpoint's value."""
    size = image_processor.size
    current = dict(size) if size is not None else {}
    low = limits.get("min_pixels", current.get("shortest_edge"))
    high = limits.get("max_pixels", current.get("longest_edge"))
    if low is not None and high is not None and low > high:
        raise CaptionkitError(
            f"{model}: min pixels {low} is more than max pixels {high} (one of them from the model's "
            "preprocessor config); pass both --min-pixels and --max-pixels."
        )
    values = {"shortest_edge": low, "longest_edge": high}
    if dataclasses.is_dataclass(size):
        image_processor.size = dataclasses.replace(size, **values)
    else:
        image_processor.size = {**current, **values}
    for name in PIXEL_OPTIONS:  # older image processors keep the limits as attributes as well
        if getattr(image_processor, name, None) is not None and name in limits:
            setattr(image_processor, name, limits[name])
