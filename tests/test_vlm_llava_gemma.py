"""LLaVA (1.5 and JoyCaption-shaped), LLaVA-NeXT, LLaVA-OneVision and Gemma 3 through their backends.

Every family runs for real on a tiny random-weight folder built offline: load, batched
captions of images of different sizes with different prompts (so rows are left-padded),
parity with one-image-at-a-time, seeded sampling, the system prompt, unload/reload.
"""

from __future__ import annotations

import pytest

from captionkit.core.errors import CaptionkitError
from captionkit.models import backend_for_model_type, get_backend, read_model_config
from captionkit.models.base import CaptionRequest, ChatSettings
from tests.images import noise_image

# variant -> (backend name, builder module, builder function)
VARIANTS = {
    "llava": ("llava", "llava", "build_llava"),
    "joycaption": ("llava", "llava", "build_joycaption"),
    "llava_next": ("llava_next", "llava", "build_llava_next"),
    "llava_onevision": ("llava_onevision", "llava", "build_llava_onevision"),
    "gemma3": ("gemma3", "gemma3", "build_gemma3"),
}
SIZES = [(40, 30), (64, 64), (90, 50), (30, 70)]
PROMPTS = [None, "Write a long descriptive caption for this image in a formal tone.", "What is shown?", None]
SYSTEM = "You are a helpful image captioner."

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only waits


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, object]:
    import importlib

    built = {}
    for variant, (_, module, function) in VARIANTS.items():
        builder = getattr(importlib.import_module(f"captionkit.testing.vlms.{module}"), function)
        built[variant] = builder(tmp_path_factory.mktemp(f"tiny-{variant}"))
    return built


@pytest.fixture(scope="module")
def images():
    return [noise_image(seed, size) for seed, size in enumerate(SIZES, start=11)]


def make(folders, variant: str, **chat_options):
    chat_options.setdefault("max_new_tokens", 10)
    backend = get_backend(VARIANTS[variant][0])
    captioner = backend.factory(str(folders[variant]), chat=ChatSettings(**chat_options), device="cpu")
    captioner.load()
    return captioner


def requests_for(captioner, images, prompts=PROMPTS):
    pairs = zip(images, prompts[:len(images)], strict=True)
    return [CaptionRequest(captioner.preprocess(image), image.size, prompt) for image, prompt in pairs]


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_greedy_equals_one_at_a_time(folders, images, variant):
    captioner = make(folders, variant)
    requests = requests_for(captioner, images)
    texts = [captioner.prompt_text(request.prompt or captioner.chat.prompt) for request in requests]
    inputs = captioner.processor_inputs(texts, [request.payload for request in requests])
    assert not bool(inputs["attention_mask"].all()), "rows must be padded, or parity proves nothing"
    assert bool(inputs["attention_mask"][:, -1].all()), "padding must be on the left"

    batched = captioner.caption_batch(requests)
    single = [captioner.caption_batch([request])[0] for request in requests]

    assert batched == single
    captions = [captioner.render_texts(raw) for raw in batched]
    assert all(len(texts) == 1 and texts[0] for texts in captions), captions
    assert len({texts[0] for texts in captions}) > 1, "captions should depend on the image"


@pytest.mark.parametrize("variant", VARIANTS)
def test_seeded_sampling(folders, images, variant):
    def sample(seed):
        captioner = make(folders, variant, temperature=0.8, samples=2, seed=seed)
        return [captioner.render_texts(raw) for raw in captioner.caption_batch(requests_for(captioner, images[:3]))]

    first, again, other = sample(1), sample(1), sample(2)
    assert all(len(texts) == 2 for texts in first)
    assert first == again
    assert first != other


@pytest.mark.parametrize("variant", VARIANTS)
def test_system_prompt_in_rendered_prompt_and_reload(folders, images, variant):
    captioner = make(folders, variant, system_prompt=SYSTEM)
    rendered = captioner.prompt_text("Describe this image.")
    assert SYSTEM in rendered and "Describe this image." in rendered
    requests = requests_for(captioner, images[:2])
    before = captioner.caption_batch(requests)
    captioner.unload()
    assert captioner.model is None and captioner.processor is None
    captioner.load()
    assert captioner.caption_batch(requests) == before


@pytest.mark.parametrize("variant", ["joycaption", "gemma3", "llava"])
def test_one_bos_token(folders, images, variant):
    """Templates that write BOS themselves must not get a second one from the tokenizer."""
    captioner = make(folders, variant)
    tokenizer = captioner.processor.tokenizer
    requests = requests_for(captioner, images[:2])
    texts = [captioner.prompt_text(request.prompt or captioner.chat.prompt) for request in requests]
    inputs = captioner.processor_inputs(texts, [request.payload for request in requests])
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
        real = ids[mask.bool()].tolist()
        assert real[0] == tokenizer.bos_token_id and real.count(tokenizer.bos_token_id) == 1


def test_template_that_drops_the_system_turn_is_an_error(folders):
    captioner = make(folders, "llava", system_prompt=SYSTEM)
    captioner.processor.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: <image>\n"
        "{{ m['content'][1]['text'] }}{% endif %}{% endfor %}ASSISTANT:"
    )
    with pytest.raises(CaptionkitError, match="system"):
        captioner.prompt_text("Describe this image.")


@pytest.mark.parametrize("variant", ["llava_next", "llava_onevision"])
def test_anyres_off_uses_two_tiles(folders, images, variant):
    backend = get_backend(variant)
    captioner = backend.factory(str(folders[variant]), chat=ChatSettings(max_new_tokens=6), device="cpu",
                                anyres=False)
    assert captioner.fingerprint()["family_options"] == {"anyres": False}
    captioner.load()
    requests = requests_for(captioner, images)
    inputs = captioner.processor_inputs([captioner.prompt_text(captioner.chat.prompt)] * len(requests),
                                        [request.payload for request in requests])
    assert inputs["pixel_values"].shape[1] == 2  # overview + one tile, whatever the image size
    assert all(captioner.render_texts(raw)[0] for raw in captioner.caption_batch(requests))
    with pytest.raises(CaptionkitError, match="anyres"):
        backend.factory(str(folders[variant]), anyres="sometimes")
    with pytest.raises(CaptionkitError, match="--image-grid"):
        backend.factory(str(folders[variant]), image_grid=3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_family_comes_from_config_model_type(folders, variant):
    model_type = read_model_config(str(folders[variant]))["model_type"]
    assert model_type == VARIANTS[variant][0]
    assert backend_for_model_type(model_type, "captioner").name == VARIANTS[variant][0]


def test_gemma3_pan_and_scan_crops_keep_batch_parity(folders):
    captioner = get_backend("gemma3").factory(
        str(folders["gemma3"]), chat=ChatSettings(max_new_tokens=6), device="cpu", pan_and_scan=True,
    )
    assert captioner.fingerprint()["family_options"] == {"pan_and_scan": True}
    captioner.load()
    wide = [noise_image(21, (800, 300)), noise_image(22, (64, 64)), noise_image(23, (300, 900))]
    requests = requests_for(captioner, wide, [None] * 3)
    inputs = captioner.processor_inputs([captioner.prompt_text(captioner.chat.prompt)] * 3, wide)
    assert inputs["pixel_values"].shape[0] > 3  # the elongated images got crops, the small one none
    assert captioner.caption_batch(requests) == [captioner.caption_batch([request])[0] for request in requests]
    with pytest.raises(CaptionkitError, match="pan-and-scan"):
        get_backend("gemma3").factory(str(folders["gemma3"]), pan_and_scan="yes")
