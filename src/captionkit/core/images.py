"""Safe image decoding: every odd file either becomes a clean RGB image or a clear error.

Handles what real dataset folders contain: truncated or corrupt files, empty files,
non-images with image extensions, CMYK, 16-bit, palette and alpha images (composited on
a background), EXIF rotation, animations (first frame), decompression bombs and
unreadable files. Large JPEGs are decoded at a reduced scale in the DCT domain when the
model needs far fewer pixels, which is several times faster than a full decode.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from captionkit.core.errors import ImageLoadError

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel limit below replaces Pillow's warning (which would be noise, not a stop).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own "decompression bomb" error threshold
_EXIF_ORIENTATION = 0x0112

try:  # optional accelerator for JPEG; Pillow does everything else
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is a dependency, but keep decoding working
    _simplejpeg = None


class ImageBytes(Protocol):
    """Where an image's bytes come from when it is not a local file (a WebDataset shard member)."""

    suffix: str

    def read_bytes(self) -> bytes:
        """The encoded image; raises :class:`ImageLoadError` naming where and why when it cannot."""
        ...


@dataclass
class LoadedImage:
    """A decoded RGB image plus facts about the file it came from."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) after EXIF rotation, before any scaled decode
    content_hash: str
    notes: list[str] = field(default_factory=list)


def parse_color(value: str | tuple[int, int, int]) -> tuple[int, int, int]:
    """'white', '#ffffff' or '255,255,255' → an RGB tuple."""
    if isinstance(value, tuple):
        return value
    from PIL import ImageColor

    text = value.strip()
    if "," in text:
        parts = [int(part) for part in text.split(",")]
        if len(parts) != 3 or not all(0 <= part <= 255 for part in parts):
            raise ValueError(f"background colour '{value}': give three numbers 0-255, e.g. 255,255,255")
        return (parts[0], parts[1], parts[2])
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError as error:
        raise ValueError(f"background colour '{value}': not a colour name or #rrggbb") from error


def load_image(
    path: str | Path | ImageBytes,
    background: tuple[int, int, int] = (255, 255, 255),
    target_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | None = None,
) -> LoadedImage:
    """Decode ``path`` (a local path or an object-store URL) to RGB, or raise :class:`ImageLoadError`.

    ``target_size`` (width, height) is the size the model will resize to; JPEGs much larger
    than it are decoded at a reduced DCT scale that is still at least that large. ``data``: the
    bytes already fetched (the executor fetches remote objects ahead, ``--io-workers`` at a time).
    """
    if not isinstance(path, (str, Path)) and hasattr(path, "read_bytes"):
        # bytes from elsewhere (a WebDataset shard member): it names itself and raises ImageLoadError itself
        data = path.read_bytes()
        try:
            return decode_image(data, str(path), path.suffix, background, target_size, max_pixels)
        except ImageLoadError as error:
            fix = getattr(path, "decode_fix", None)  # how to fix it there (rewrite the sample), not a file's fix
            if fix is None or error.fix == fix:
                raise
            raise ImageLoadError(error.path, error.cause, fix) from error

    from captionkit.core import locations

    name = str(path)
    remote = locations.is_url(name)
    path = PurePosixPath(name.split("://", 1)[1]) if remote else locations.local_path(path)
    try:
        if data is None:
            data = locations.read_bytes(name) if remote else Path(path).read_bytes()
    except locations.RemoteError as error:
        raise locations.as_image_error(name, error) from error
    except IsADirectoryError as error:
        raise ImageLoadError(name, "is a folder, not a file", "Rename it so it has no image extension.") from error
    except OSError as error:
        raise ImageLoadError(
            name, f"cannot read the file ({error.strerror or error})", "Check that it exists and is readable."
        ) from error
    return decode_image(data, name, path.suffix, background, target_size, max_pixels)


def decode_image(
    data: bytes,
    name: str,
    suffix: str = "",
    background: tuple[int, int, int] = (255, 255, 255),
    target_size: tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """:func:`load_image` on bytes already read; ``name`` and ``suffix`` say where they came from in errors."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)", "Re-download or re-export it, or delete it.")
    content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    notes: list[str] = []
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2  # let Pillow open what the user allowed
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"too many pixels ({error})", _bomb_fix(max_pixels)) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(
            name,
            f"not an image Pillow can read (its extension says {suffix or 'nothing'})",
            "Delete it, or convert it to PNG or JPEG.",
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageLoadError(name, f"corrupt image header ({error})", "Re-export or re-download it.") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(name, f"too many pixels ({width}x{height})", _bomb_fix(max_pixels))
    try:  # reading EXIF or counting frames may read (and trip over) the rest of the file, e.g. a truncated PNG
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        frames = getattr(image, "n_frames", 1)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
        raise _truncated(name, error) from error
    original_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if frames > 1:
        notes.append(f"animated ({frames} frames): first frame used")
    decoded = None
    if (
        _simplejpeg is not None
        and image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and target_size is not None
    ):
        decoded = _scaled_jpeg_decode(data, image.size, orientation, target_size)
    try:
        if decoded is None:
            image.seek(0)
            image.load()
            decoded = _to_rgb(ImageOps.exif_transpose(image), background)
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:
        raise _truncated(name, error) from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(name, f"too many pixels ({error})", _bomb_fix(max_pixels)) from error
    return LoadedImage(image=decoded, original_size=original_size, content_hash=content_hash, notes=notes)


def _truncated(name: str, error: BaseException) -> ImageLoadError:
    return ImageLoadError(
        name, f"truncated or corrupt image data ({error})", "Re-export or re-download it; it is incomplete."
    )


def _bomb_fix(max_pixels: int) -> str:
    return f"It may be a decompression bomb; if you trust it, raise --max-image-pixels (now {max_pixels})."


def _scaled_jpeg_decode(
    data: bytes, size: tuple[int, int], orientation: int, target_size: tuple[int, int]
) -> Image.Image | None:
    """Decode a JPEG at the smallest DCT scale that still covers ``target_size``; None if no gain."""
    target_width, target_height = target_size
    if orientation in (5, 6, 7, 8):  # the stored image is rotated 90°: swap the needs
        target_width, target_height = target_height, target_width
    width, height = size
    if width < 2 * target_width or height < 2 * target_height:
        return None
    try:
        array = _simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=target_width, min_height=target_height)
    except ValueError:
        return None  # let Pillow decode it and report exactly what is wrong
    image = Image.fromarray(array)
    transpose = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation)
    return image.transpose(transpose) if transpose is not None else image


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is composited onto ``background``."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image)
        if mode == "I":
            peak = max(int(array.max()), 1)
            scale = 255.0 / (65535.0 if peak > 255 else 255.0)
            array = np.clip(array * scale, 0, 255)
        else:
            array = array.astype(np.uint32) >> 8
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low or 1.0) * 255.0
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def fit_within(image: Any, side: int | None) -> Any:
    """``image`` downscaled (a copy, LANCZOS) so its longest side is at most ``side``; unchanged when it fits."""
    if side and max(image.size) > side:
        from PIL import Image

        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image
