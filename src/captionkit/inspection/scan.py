"""Image facts at three depths: header only, header plus a perceptual hash, or a full decode.

Header: ``Image.open`` reads the size and format without decoding pixels; the content
hash comes from the store when its file signature still matches, else from the bytes
(blake2b, as the core computes it). Hash: a perceptual hash from a reduced decode (JPEGs
decode at 1/8 scale in the DCT domain). Full: the core's ``load_image`` decodes every
pixel, so truncated data is found too. A file that fails anywhere is loaded once with
``load_image`` to report it with the core's message.
"""

from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from captionkit.core.errors import ImageLoadError
from captionkit.core.images import DEFAULT_MAX_PIXELS, load_image
from captionkit.inspection.dataset import Entry
from captionkit.inspection.hashing import phash

_EXIF_ORIENTATION = 0x0112
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, UnidentifiedImageError,
                Image.DecompressionBombError)


def _core_message(path: Path, max_pixels: int, fallback: BaseException | None = None) -> str:
    """The core's own words for why ``path`` cannot be used."""
    try:
        load_image(path, max_pixels=max_pixels)
    except ImageLoadError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - whatever the core did not anticipate is still a finding
        return f"{path}: {type(error).__name__}: {error}"
    return f"{path}: {fallback}" if fallback is not None else f"{path}: cannot be read"


def _orientation(image: Image.Image) -> int:
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # Pillow would decode the whole PNG looking for a trailing eXIf chunk
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except _READ_ERRORS:
        return 1


def scan_image(entry: Entry, perceptual: bool, full: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> Entry:
    """Fill ``entry``'s image facts (size, format, content hash, perceptual hash) or its error."""
    path = entry.path
    assert path is not None
    if full:
        try:
            loaded = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as error:
            entry.error = str(error)
            return entry
        entry.width, entry.height = loaded.original_size
        entry.content_hash = loaded.content_hash
        entry.notes = list(loaded.notes)
        try:
            with Image.open(path) as image:
                entry.format = image.format
        except _READ_ERRORS:
            pass
        entry.phash = phash(loaded.image)
        return entry
    try:
        if entry.stored_hash is not None:
            entry.content_hash = entry.stored_hash
            stream = path.open("rb")
        else:
            data = path.read_bytes()
            entry.content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
            stream = io.BytesIO(data)
        with stream, Image.open(stream) as image:
            width, height = image.size
            if not data_ok(width, height, max_pixels):
                raise ValueError("too many pixels")
            orientation = _orientation(image)
            entry.format = image.format
            entry.width, entry.height = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            if getattr(image, "n_frames", 1) > 1:
                entry.notes.append(f"animated ({image.n_frames} frames)")
            if perceptual:
                if image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
                    image.draft("L", (64, 64))
                image.seek(0)
                entry.phash = phash(image)
    except _READ_ERRORS as error:
        entry.error = _core_message(path, max_pixels, error)
        entry.width = entry.height = entry.phash = None
    return entry


def data_ok(width: int, height: int, max_pixels: int) -> bool:
    return width > 0 and height > 0 and width * height <= max_pixels


def safe_scan(entry: Entry, perceptual: bool, full: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> Entry:
    """``scan_image`` that turns anything unexpected into a finding instead of stopping the inspection."""
    try:
        return scan_image(entry, perceptual, full, max_pixels)
    except Exception as error:  # noqa: BLE001 - one odd file must not end an inspection of thousands
        assert entry.path is not None
        entry.error = _core_message(entry.path, max_pixels, error)
        entry.width = entry.height = entry.phash = None
        return entry
