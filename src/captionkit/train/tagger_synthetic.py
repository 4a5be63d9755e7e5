"""A generated multi-label data set: coloured shapes on backgrounds, tags = what is present.

Why: tests and benchmarks need a tagging problem with known answers and no downloads.
Each image holds one to three shapes (circle, square, triangle, cross) in one of four
colours on a light, randomly tinted background; its tags are the shapes and the colours
present, so a model must learn both form and colour, and several tags per image.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from captionkit.core.atomic import atomic_write_bytes, atomic_write_text

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
TAGS = (*SHAPES, *COLOURS)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple) -> None:
    """Draw one filled shape inside ``box`` (left, top, right, bottom)."""
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "cross":
        width = max(2, (right - left) // 3)
        middle_x, middle_y = (left + right) // 2, (top + bottom) // 2
        draw.rectangle((middle_x - width // 2, top, middle_x + width // 2, bottom), fill=colour)
        draw.rectangle((left, middle_y - width // 2, right, middle_y + width // 2), fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def make_shapes_image(rng: random.Random, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, list[str]]:
    """One image and its tags (shapes first, then colours, each once)."""
    width, height = size
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    shapes, colours = [], []
    for _ in range(rng.randint(1, 3)):
        shape = rng.choice(SHAPES)
        colour = rng.choice(list(COLOURS))
        side = rng.randint(min(width, height) // 4, min(width, height) // 2)
        left = rng.randint(0, width - side)
        top = rng.randint(0, height - side)
        draw_shape(draw, shape, (left, top, left + side, top + side), COLOURS[colour])
        shapes.append(shape)
        colours.append(colour)
    tags = list(dict.fromkeys(shapes)) + list(dict.fromkeys(colours))
    return image, tags


def write_shapes_dataset(
    folder: str | Path,
    count: int,
    seed: int = 0,
    size: tuple[int, int] = (64, 64),
    separator: str = ", ",
    image_format: str = "png",
) -> Path:
    """Write ``count`` images with ``.txt`` tag files to ``folder``; returns the folder.

    Not synced to disk (``durable=False``): the set is regenerated from its seed, and an fsync per file
    (two per image) cost more than drawing it."""
    import io

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        image, tags = make_shapes_image(rng, size)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format.upper())
        atomic_write_bytes(folder / f"{index:05d}.{image_format}", buffer.getvalue(), durable=False)
        atomic_write_text(folder / f"{index:05d}.txt", separator.join(tags) + "\n", durable=False)
    return folder


def write_selected_tags(path: str | Path, counts: dict[str, int] | None = None) -> Path:
    """A WD-style ``selected_tags.csv`` for the shape tags (all general, category 0)."""
    lines = ["tag_id,name,category,count"]
    for index, tag in enumerate(TAGS):
        lines.append(f"{index},{tag},0,{(counts or {}).get(tag, 100)}")
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)
