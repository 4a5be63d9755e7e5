"""kohya-style aspect-ratio buckets: which bucket an image trains in, and how much it is scaled.

Same rules as sd-scripts' ``make_bucket_resolutions`` and ``BucketManager.select_bucket``:
bucket sides step by 64 between a minimum and a maximum side, each bucket's area stays at
or under resolution², an image goes to the bucket with the closest aspect ratio, and is
resized so it covers the bucket (then centre-cropped). Written here, not imported: the
trainer is not a dependency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def make_bucket_resolutions(
    resolution: tuple[int, int] | int, min_size: int = 256, max_size: int = 2048, step: int = 64
) -> list[tuple[int, int]]:
    """Every (width, height) bucket for a target resolution, sorted."""
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if min_size <= 0 or step <= 0 or max_size < min_size:
        raise ValueError(f"bucket sizes: need 0 < min ({min_size}) <= max ({max_size}) and step > 0 ({step})")
    max_area = resolution[0] * resolution[1]
    buckets = set()
    side = int(math.sqrt(max_area) // step) * step
    buckets.add((side, side))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


@dataclass(frozen=True)
class BucketFit:
    """Where one image lands: its bucket, the resize factor (above 1: upscaled) and the share cropped off."""

    bucket: tuple[int, int]
    scale: float
    crop_fraction: float

    @property
    def name(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}"

    @property
    def upscaled(self) -> bool:
        return self.scale > 1.0 + 1e-9


class Buckets:
    """Bucket assignment for one target resolution."""

    def __init__(self, resolution: tuple[int, int] | int, min_size: int = 256, max_size: int = 2048,
                 step: int = 64) -> None:
        self.resolutions = make_bucket_resolutions(resolution, min_size, max_size, step)
        self._ratios = [width / height for width, height in self.resolutions]

    def fit(self, width: int, height: int) -> BucketFit:
        """The bucket with the closest aspect ratio; the image is scaled to cover it, then cropped."""
        ratio = width / height
        index = min(range(len(self._ratios)), key=lambda i: abs(self._ratios[i] - ratio))
        bucket_width, bucket_height = self.resolutions[index]
        if ratio > bucket_width / bucket_height:  # wider than the bucket: fit the height, crop the sides
            scale = bucket_height / height
        else:
            scale = bucket_width / width
        resized_area = (width * scale) * (height * scale)
        crop = max(0.0, 1.0 - (bucket_width * bucket_height) / resized_area) if resized_area else 0.0
        return BucketFit((bucket_width, bucket_height), scale, crop)


def parse_resolution(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """'1024', 1024 or '1024x768' → (width, height)."""
    if isinstance(value, tuple):
        return value
    text = str(value).strip().lower()
    try:
        if "x" in text or "," in text:
            width, height = (int(part) for part in text.replace(",", "x").split("x"))
        else:
            width = height = int(text)
    except ValueError as error:
        raise ValueError(f"resolution '{value}': give one number (1024) or WIDTHxHEIGHT (1024x768)") from error
    if width <= 0 or height <= 0:
        raise ValueError(f"resolution '{value}': must be positive")
    return (width, height)
