"""Generated test images, including the bad-input corpus real folders contain."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_good_images(folder: Path, count: int, start: int = 0, suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"img{index:03d}{suffix}"
        noise_image(index).save(path)
        paths.append(path)
    return paths


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """Every kind of problem file; returns name → what the error must mention (or '' if it must load)."""
    folder.mkdir(parents=True, exist_ok=True)
    expectations: dict[str, str] = {}
    data = jpeg_bytes(noise_image(1, (256, 256)))
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expectations["truncated.jpg"] = "truncated"
    (folder / "empty.png").write_bytes(b"")
    expectations["empty.png"] = "empty file"
    (folder / "text.jpg").write_text("this is not an image")
    expectations["text.jpg"] = "not an image"
    garbage = bytearray(data)
    garbage[200:400] = bytes(200)
    (folder / "dangling.webp").symlink_to(folder / "missing-target.webp")
    expectations["dangling.webp"] = "cannot read"
    # files that must load fine
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    expectations["cmyk.jpg"] = ""
    sixteen = Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "I;16")
    sixteen.save(folder / "sixteen.png")
    expectations["sixteen.png"] = ""
    palette = Image.new("P", (30, 30), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    expectations["palette.png"] = ""
    Image.new("RGBA", (30, 30), (255, 0, 0, 0)).save(folder / "alpha.png")
    expectations["alpha.png"] = ""
    frames = [Image.new("RGB", (20, 20), colour) for colour in ("red", "green", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    expectations["animated.gif"] = ""
    rotated = Image.new("RGB", (60, 20), "green")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", exif=exif)
    expectations["rotated.jpg"] = ""
    noise_image(3, (50, 40)).save(folder / "plain_webp.webp")
    expectations["plain_webp.webp"] = ""
    noise_image(4, (50, 40)).save(folder / "plain_bmp.bmp")
    expectations["plain_bmp.bmp"] = ""
    noise_image(5, (50, 40)).save(folder / "plain.tiff")
    expectations["plain.tiff"] = ""
    os.makedirs(folder / "folder.png", exist_ok=True)  # a folder with an image name is not a file: ignored
    return expectations
