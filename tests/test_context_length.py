"""A captioner whose prompt plus max_new_tokens cannot fit the model's positions says so at once.

Without the check, a Florence-2 decoder (learned positions) fails every image with IndexError
after the executor has split batch after batch, and a chat VLM runs past its context.
"""

from __future__ import annotations

import pytest
from PIL import Image

from captionkit.api import build_captioner
from captionkit.core.errors import CaptionkitError
from captionkit.models.base import CaptionRequest, ItemFailure
from captionkit.testing.vlms.llava import build_llava


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return build_llava(tmp_path_factory.mktemp("context-llava") / "llava")  # 1024 positions, 16 image tokens


def test_a_florence_caption_longer_than_its_decoder_fails_at_load(tiny_florence):
    captioner = build_captioner(str(tiny_florence), max_new_tokens=5000, num_beams=1)
    with pytest.raises(CaptionkitError, match=r"max_new_tokens 5000 exceeds the 1024 positions.*at most 1023"):
        captioner.load()
    assert captioner.model is None  # nothing left resident


def test_a_chat_prompt_that_cannot_fit_fails_at_load(tiny_llava):
    captioner = build_captioner(str(tiny_llava), max_new_tokens=1024)
    with pytest.raises(CaptionkitError, match=r"1024-token context.*lower max_new_tokens to at most \d+"):
        captioner.load()
    assert captioner.model is None


def test_an_image_whose_tokens_overflow_the_context_fails_alone_with_the_numbers(tiny_llava):
    probe = build_captioner(str(tiny_llava))
    probe.load()
    tokenizer = probe.processor.tokenizer
    prompt_tokens = len(tokenizer(probe.prompt_text(probe.chat.prompt), add_special_tokens=False)["input_ids"])
    probe.unload()
    # The prompt alone fits; with the image's 16 tokens it does not: the image fails, no generation runs.
    captioner = build_captioner(str(tiny_llava), max_new_tokens=1024 - prompt_tokens - 2)
    captioner.load()
    image = captioner.preprocess(Image.new("RGB", (56, 56), "red"))
    results = captioner.caption_batch([CaptionRequest(image, (56, 56))])
    assert isinstance(results[0], ItemFailure)
    assert "the prompt with the image's tokens is" in results[0].message and "1024-token context" in results[0].message
