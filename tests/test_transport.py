"""Prepared pixels between processes as uint8 codes: the same bits, a quarter of the bytes, or sent as they are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captionkit.core.records import Record
from captionkit.executors.transport import PackedPixels, pack, pack_prepared, payload_bytes, unpack, unpack_prepared
from captionkit.models.base import CaptionRequest
from captionkit.steps.base import Prepared


def photo(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def same_bits(left, right) -> bool:
    left, right = np.asarray(left), np.asarray(right)
    return left.dtype == right.dtype and left.shape == right.shape and left.tobytes() == right.tobytes()


def test_florence_pixels_pack_to_a_quarter_and_unpack_to_the_same_bits(tiny_florence):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_florence)
    for seed in range(3):
        pixels = processor.image_processor(images=[photo(seed)], return_tensors="pt")["pixel_values"][0]
        packed = pack(pixels)
        assert isinstance(packed, PackedPixels) and packed.codes.dtype == np.uint8
        assert packed.nbytes < pixels.numel() * 4 / 3  # 64 px here; 768 px: 3.99x smaller
        restored = unpack(packed)
        assert isinstance(restored, torch.Tensor) and same_bits(restored.numpy(), pixels.numpy())


def test_channels_last_and_numpy_arrays_round_trip():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (64, 48, 3)).astype(np.float32)
    values = (codes / 255.0 - np.float32([0.48, 0.45, 0.40])) / np.float32([0.27, 0.26, 0.28])  # per channel
    values = values.astype(np.float32)
    packed = pack(values)
    assert isinstance(packed, PackedPixels) and packed.axis == 2
    assert same_bits(unpack(packed), values)


@pytest.mark.parametrize("payload", [
    np.random.default_rng(1).random((3, 64, 64), dtype=np.float32),  # not 8-bit pixels: > 256 values
    np.zeros((3, 8, 8), np.float32),  # too small to be worth it
    torch.zeros(3, 64, 64, dtype=torch.bfloat16),  # no exact numpy form
    np.arange(3 * 64 * 64, dtype=np.int64).reshape(3, 64, 64),  # not floats
    np.float32([[-0.0, 0.0] * 2048] * 3).reshape(3, 64, 64),  # -0.0 and 0.0 share a value, not the bits
])
def test_payloads_off_the_lattice_are_sent_as_they_are(payload):
    assert pack(payload) is payload


def test_prepared_items_pack_in_place_whatever_holds_the_pixels():
    values = ((np.random.default_rng(2).integers(0, 256, (3, 96, 96)) - 127.5) / 127.5).astype(np.float32)
    request = Prepared(Record("a", None), CaptionRequest(torch.from_numpy(values.copy()), (96, 96), "p"), (96, 96), "h")
    plain = Prepared(Record("b", None), values.copy(), (96, 96), "h")
    for item in (request, plain):
        before = payload_bytes(item)
        pack_prepared(item)
        assert payload_bytes(item) < before / 3
        unpack_prepared(item)
        assert payload_bytes(item) == before
    assert same_bits(request.payload.payload.numpy(), values) and same_bits(plain.payload, values)
    image = Prepared(Record("c", None), photo(0), (300, 200), "h")  # a chat model's PIL image: already 8-bit
    assert pack_prepared(image).payload.size == (300, 200) and payload_bytes(image) == 300 * 200 * 3
