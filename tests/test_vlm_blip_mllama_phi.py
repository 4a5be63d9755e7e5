"""BLIP-2, Mllama and Phi (4-multimodal native, 3-vision remote code) through their registered backends.

Each family runs on a tiny random-weight model built offline (``captionkit.testing.vlms``).
The parity test is the proof that batching is right: images of different sizes and prompts of
different lengths force left padding, query/image-token expansion, tile padding (Mllama) and crop
padding (Phi-4), and every row must still decode exactly what it decodes alone.
"""

from __future__ import annotations

import pytest

from captionkit.core.errors import CaptionkitError
from captionkit.models import backend_for_model_type, get_backend
from captionkit.models.base import CaptionRequest, ChatSettings
from tests.images import noise_image

SIZES = [(40, 30), (64, 64), (90, 50)]
# prompts of different lengths, so rows are padded differently (None: the default prompt)
PROMPTS = ["Describe this image.", "What is in the picture? Write a short caption for the photo.", None]
MAX_NEW_TOKENS = 8


def _build_blip2(folder):
    from captionkit.testing.vlms.blip2 import build_blip2

    return build_blip2(folder)


def _build_mllama(folder):
    from captionkit.testing.vlms.mllama import build_mllama

    return build_mllama(folder)


def _build_phi4(folder):
    from captionkit.testing.vlms.phi import build_phi4_multimodal

    return build_phi4_multimodal(folder, vision_lora=True)


FAMILIES = {
    "blip-2": ("blip2", _build_blip2),
    "mllama": ("mllama", _build_mllama),
    "phi4_multimodal": ("phi4-multimodal", _build_phi4),
}


@pytest.fixture(scope="module")
def images():
    return [noise_image(seed, size) for seed, size in enumerate(SIZES)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """model_type → (backend name, model folder, loaded greedy captioner), each built on first use."""
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            backend, build = FAMILIES[model_type]
            folder = build(tmp_path_factory.mktemp(backend))
            captioner = get_backend(backend).factory(
                str(folder), chat=ChatSettings(max_new_tokens=MAX_NEW_TOKENS), dtype="fp32", model_type=model_type,
            )
            captioner.load()
            cache[model_type] = (backend, folder, captioner)
        return cache[model_type]

    yield get
    for _, _, captioner in cache.values():
        captioner.unload()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, built):
    """(model_type, backend name, model folder, loaded greedy captioner)."""
    return (request.param, *built(request.param))


def _requests(captioner, images, prompts=PROMPTS):
    pairs = zip(images, prompts[:len(images)], strict=True)
    return [CaptionRequest(captioner.preprocess(image), image.size, prompt) for image, prompt in pairs]


def _texts(results):
    return [captioner_result["texts"] for captioner_result in results]


def test_registered_for_its_model_type(family):
    model_type, backend, _, captioner = family
    assert backend_for_model_type(model_type, "captioner").name == backend
    assert captioner.fingerprint()["backend"] == backend


def test_batched_greedy_equals_one_image_at_a_time(family, images):
    _, _, _, captioner = family
    requests = _requests(captioner, images)
    batched = _texts(captioner.caption_batch(requests))
    alone = [_texts(captioner.caption_batch([request]))[0] for request in requests]
    assert all(len(texts) == 1 and texts[0] for texts in batched), batched
    assert batched == alone
    assert len({texts[0] for texts in batched}) > 1, "captions should differ between images"


def test_same_prompt_batch_matches_too(family, images):
    """Same prompt everywhere: only the images differ (tiles/crops/query tokens)."""
    _, _, _, captioner = family
    requests = _requests(captioner, images, [None] * len(images))
    batched = _texts(captioner.caption_batch(requests))
    assert batched == [_texts(captioner.caption_batch([request]))[0] for request in requests]


def test_sampling_gives_n_texts_and_is_seeded(family, images):
    model_type, backend, folder, _ = family
    chat = ChatSettings(temperature=0.8, samples=2, seed=1, max_new_tokens=MAX_NEW_TOKENS)
    sampler = get_backend(backend).factory(str(folder), chat=chat, dtype="fp32", model_type=model_type)
    sampler.load()
    try:
        requests = _requests(sampler, images)
        first = sampler.caption_batch(requests)
        second = sampler.caption_batch(requests)
    finally:
        sampler.unload()
    assert len(first) == len(images)
    assert all(len(texts) == 2 for texts in _texts(first))
    assert first == second
    assert sampler.render_texts(first[0]) == first[0]["texts"]


def test_unload_then_load_again(family, images):
    _, _, _, captioner = family
    requests = _requests(captioner, images[:2])
    before = captioner.caption_batch(requests)
    captioner.unload()
    assert captioner.model is None
    captioner.load()
    assert captioner.caption_batch(requests) == before


def test_blip2_prompt_format_and_no_system_prompt(built):
    backend, folder, captioner = built("blip-2")
    assert captioner.prompt_text("What is it?") == "Question: What is it? Answer:"
    with pytest.raises(CaptionkitError, match="system-prompt") as caught:
        get_backend(backend).factory(str(folder), chat=ChatSettings(system_prompt="Be brief."))
    assert type(caught.value) is CaptionkitError


def test_blip2_padding_moved_to_the_left(built, images):
    _, _, captioner = built("blip-2")
    texts = [captioner.prompt_text(prompt or captioner.chat.prompt) for prompt in PROMPTS]
    inputs = captioner.processor_inputs(texts, images)
    mask = inputs["attention_mask"]
    assert not bool(mask.all())  # the prompts differ in length
    # every row: pads first, then the query tokens, then the text
    assert bool((mask.cummax(dim=1).values == mask).all())
    image_id = captioner.model.config.image_token_id
    for row, row_mask in zip(inputs["input_ids"], mask, strict=True):
        first_real = int(row_mask.argmax())
        assert (row[first_real:first_real + captioner.model.config.num_query_tokens] == image_id).all()


def test_mllama_system_prompt_and_single_bos(built, images):
    backend, folder, _ = built("mllama")
    captioner = get_backend(backend).factory(
        str(folder), chat=ChatSettings(system_prompt="Be brief.", max_new_tokens=4), dtype="fp32",
    )
    captioner.load()
    try:
        text = captioner.prompt_text("Describe it.")
        assert "<|start_header_id|>system<|end_header_id|>" in text and "<|image|>" in text
        inputs = captioner.processor_inputs([text], images[:1])
        bos = captioner.processor.tokenizer.bos_token_id
        assert int((inputs["input_ids"][0] == bos).sum()) == 1  # the template's BOS, not a second one
        assert captioner.caption_batch(_requests(captioner, images[:1]))[0]["texts"][0]
    finally:
        captioner.unload()


def test_phi4_vision_adapter_and_bidirectional_tower(built):
    _, _, captioner = built("phi4_multimodal")
    assert captioner.adapter_loaded
    assert "vision_adapter" in captioner.fingerprint()
    tower = captioner.model.model.embed_tokens_extend.image_embed.img_processor
    assert not any(getattr(module, "is_causal", False) for module in tower.modules())
    assert captioner.prompt_text("Hi.") == "<|user|><|image|>Hi.<|end|><|assistant|>"


def test_phi3_v_needs_trust_remote_code():
    info = backend_for_model_type("phi3_v", "captioner")
    assert info.name == "phi3-v"
    with pytest.raises(CaptionkitError) as caught:
        info.factory("microsoft/Phi-3.5-vision-instruct", model_type="phi3_v")
    message = str(caught.value)
    assert "--trust-remote-code" in message and "phi3_v" in message and "\n" not in message
    captioner = info.factory("microsoft/Phi-3.5-vision-instruct", trust_remote_code=True, model_type="phi3_v")
    assert captioner.attn_implementation == "eager"
    assert captioner.prompt_text("Describe it.") == "<|user|>\n<|image_1|>\nDescribe it.<|end|>\n<|assistant|>\n"
