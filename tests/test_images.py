"""Safe decoding: every bad file becomes a clear error; odd-but-valid files become clean RGB."""

from __future__ import annotations

import pytest
from PIL import Image

from captionkit.core.errors import ImageLoadError
from captionkit.core.images import load_image, parse_color
from tests.images import jpeg_bytes, noise_image, write_bad_corpus


def test_bad_corpus_errors_name_file_cause_and_fix(tmp_path):
    expectations = write_bad_corpus(tmp_path)
    for name, expected in expectations.items():
        path = tmp_path / name
        if expected:
            with pytest.raises(ImageLoadError) as caught:
                load_image(path)
            message = str(caught.value)
            assert str(path) in message and expected in message, message
            assert caught.value.fix
        else:
            loaded = load_image(path)
            assert loaded.image.mode == "RGB", name


def test_alpha_is_composited_on_the_background(tmp_path):
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").image.getpixel((0, 0)) == (255, 255, 255)
    black = load_image(tmp_path / "clear.png", background=parse_color("black")).image
    assert black.getpixel((0, 0)) == (0, 0, 0)
    assert parse_color("10,20,30") == (10, 20, 30)


def test_palette_transparency_and_cmyk_and_sixteen_bit(tmp_path):
    write_bad_corpus(tmp_path)
    assert load_image(tmp_path / "palette.png").image.getpixel((0, 0)) == (255, 255, 255)
    cmyk = load_image(tmp_path / "cmyk.jpg").image
    red, green, blue = cmyk.getpixel((5, 5))
    assert red > 200 and green < 60 and blue < 60
    sixteen = load_image(tmp_path / "sixteen.png").image
    assert sixteen.mode == "RGB" and sixteen.getpixel((39, 29))[0] > sixteen.getpixel((0, 0))[0]


def test_exif_rotation_is_applied(tmp_path):
    write_bad_corpus(tmp_path)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.image.size == (20, 60)
    assert loaded.original_size == (20, 60)


def test_animation_uses_first_frame(tmp_path):
    write_bad_corpus(tmp_path)
    loaded = load_image(tmp_path / "animated.gif")
    red, green, blue = loaded.image.getpixel((5, 5))
    assert red > 200 and green < 60
    assert any("first frame" in note for note in loaded.notes)


def test_decompression_bomb_is_refused(tmp_path):
    noise_image(0, (200, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="too many pixels"):
        load_image(tmp_path / "big.png", max_pixels=10_000)


def test_scaled_jpeg_decode_covers_the_target_and_keeps_orientation(tmp_path):
    image = noise_image(7, (1024, 512))
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "big.jpg").write_bytes(jpeg_bytes(image, exif=exif))
    loaded = load_image(tmp_path / "big.jpg", target_size=(128, 128))
    width, height = loaded.image.size
    assert loaded.original_size == (512, 1024)
    assert 128 <= width < 512 and 256 <= height < 1024 and height == 2 * width
    full = load_image(tmp_path / "big.jpg")
    assert full.image.size == (512, 1024)
    reduced = full.image.resize(loaded.image.size)
    pairs = zip(reduced.getpixel((10, 10)), loaded.image.getpixel((10, 10)), strict=True)
    difference = sum(abs(a - b) for a, b in pairs)
    assert difference < 120  # the same picture, not a rotated or mirrored one
