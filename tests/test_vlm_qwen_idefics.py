"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL and Idefics3 / SmolVLM through their registered backends,
on tiny random-weight models built offline: mixed-size batches, batched == one at a time,
seeded sampling, system prompts, resolution options, unload/reload, registry lookup."""

from __future__ import annotations

import importlib.util

import pytest

from captionkit.core.errors import CaptionkitError
from captionkit.models import backend_for_model_type
from captionkit.models.base import CaptionRequest, ChatSettings
from tests.images import noise_image

BUILDERS = {
    "qwen2_vl": ("captionkit.testing.vlms.qwen_vl", "build_qwen2_vl", "qwen_vl"),
    "qwen2_5_vl": ("captionkit.testing.vlms.qwen_vl", "build_qwen2_5_vl", "qwen_vl"),
    "qwen3_vl": ("captionkit.testing.vlms.qwen_vl", "build_qwen3_vl", "qwen_vl"),
    "idefics3": ("captionkit.testing.vlms.idefics", "build_idefics3", "idefics3"),
    "smolvlm": ("captionkit.testing.vlms.idefics", "build_smolvlm", "smolvlm"),
}
FAMILIES = list(BUILDERS)
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SIZES = [(40, 30), (64, 64), (90, 50), (30, 70)]  # (width, height): every batch is mixed
FAST = {"max_new_tokens": 8}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only waits


def needs(family: str) -> None:
    if family == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("SmolVLM's processor needs the num2words package")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a built tiny model folder, built on first use and kept for the module."""
    import importlib

    built = {}

    def get(family: str):
        needs(family)
        if family not in built:
            module, builder, _ = BUILDERS[family]
            build = getattr(importlib.import_module(module), builder)
            built[family] = build(tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="module")
def greedy(folders):
    """family -> a loaded greedy captioner (shared by the tests that do not change settings)."""
    loaded = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = make(folders(family), family, ChatSettings(**FAST))
            loaded[family].load()
        return loaded[family]

    yield get
    for captioner in loaded.values():
        captioner.unload()


def make(folder, family, chat=None, **options):
    info = backend_for_model_type(family, "captioner")
    return info.factory(model=str(folder), chat=chat or ChatSettings(**FAST), model_type=family, **options)


def requests(count: int = 3, prompt: str | None = None) -> list[CaptionRequest]:
    images = [noise_image(10 + index, SIZES[index]) for index in range(count)]
    return [CaptionRequest(payload=image, original_size=image.size, prompt=prompt) for image in images]


def texts(results) -> list[list[str]]:
    return [result["texts"] for result in results]


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_maps_the_model_type_to_the_family_backend(family):
    needs(family)
    assert backend_for_model_type(family, "captioner").name == BUILDERS[family][2]


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_size_batch_equals_one_image_at_a_time(greedy, family):
    captioner = greedy(family)
    batch = requests(4)
    batched = texts(captioner.caption_batch(batch))
    assert len(batched) == 4 and all(len(candidates) == 1 and candidates[0] for candidates in batched)
    assert len({candidates[0] for candidates in batched}) > 1, "captions should differ between images"
    single = [texts(captioner.caption_batch([request]))[0] for request in batch]
    assert batched == single


@pytest.mark.parametrize("family", FAMILIES)
def test_per_image_prompts_of_different_lengths_keep_parity(greedy, family):
    captioner = greedy(family)
    batch = requests(2, prompt="Describe.")
    batch[1].prompt = "Describe in detail what is shown in the image, with the text in the image."
    batched = texts(captioner.caption_batch(batch))
    assert batched == [texts(captioner.caption_batch([request]))[0] for request in batch]


@pytest.mark.parametrize("family", FAMILIES)
def test_seeded_sampling_gives_n_texts_and_repeats_with_the_seed(folders, family):
    folder = folders(family)

    def sample(seed):
        captioner = make(folder, family, ChatSettings(temperature=0.8, samples=2, seed=seed, **FAST))
        captioner.load()
        return texts(captioner.caption_batch(requests(3)))

    first = sample(1)
    assert [len(candidates) for candidates in first] == [2, 2, 2]
    assert sample(1) == first
    assert sample(2) != first


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt_is_in_the_rendered_prompt(folders, family):
    captioner = make(folders(family), family, ChatSettings(system_prompt="Answer in five words.", **FAST))
    captioner.load()
    text = captioner.prompt_text("Describe this image.")
    assert "Answer in five words." in text and "Describe this image." in text
    assert text.index("Answer in five words.") < text.index("Describe this image.")
    if family == "qwen2_vl":  # the given system turn replaces the template's default one
        assert "You are a helpful assistant." not in text
    assert all(candidates[0] for candidates in texts(captioner.caption_batch(requests(2))))


def image_tokens(captioner, image) -> int:
    processor = captioner.processor
    inputs = captioner.processor_inputs([captioner.prompt_text("Describe.")], [image])
    return int((inputs["input_ids"][0] == processor.image_token_id).sum())


@pytest.mark.parametrize("family", QWEN)
def test_min_and_max_pixels_change_the_number_of_image_tokens(folders, greedy, family):
    image = noise_image(3, (90, 50))
    default = image_tokens(greedy(family), image)
    small = make(folders(family), family, max_pixels=32 * 32)
    large = make(folders(family), family, min_pixels=96 * 96, max_pixels=128 * 128)
    small.load()
    large.load()
    assert image_tokens(small, image) < default < image_tokens(large, image)
    assert small.fingerprint()["family_options"] == {"max_pixels": 1024}
    assert large.fingerprint()["family_options"] == {"min_pixels": 9216, "max_pixels": 16384}
    assert greedy(family).fingerprint()["family_options"] == {}
    assert all(candidates[0] for candidates in texts(small.caption_batch(requests(3))))
    batch = requests(3)
    assert texts(large.caption_batch(batch)) == [texts(large.caption_batch([item]))[0] for item in batch]


def test_pixel_limits_are_validated(folders):
    folder = folders("qwen2_vl")
    for options in ({"min_pixels": 0}, {"max_pixels": -5}, {"max_pixels": 12.5}, {"min_pixels": True},
                    {"min_pixels": 5000, "max_pixels": 1000}):
        with pytest.raises(CaptionkitError, match="pixels"):
            make(folder, "qwen2_vl", **options)
    with pytest.raises(CaptionkitError, match="--longest-edge"):
        make(folder, "qwen2_vl", longest_edge=64)
    alone = make(folder, "qwen2_vl", min_pixels=100_000)  # more than the checkpoint's max pixels
    with pytest.raises(CaptionkitError, match="max pixels"):
        alone.load()


def test_build_captioner_passes_pixel_limits(folders):
    from captionkit.api import build_captioner
    from captionkit.models.qwen_vl import QwenVLCaptioner

    captioner = build_captioner(model=str(folders("qwen2_vl")), max_pixels=2048, max_new_tokens=4)
    assert isinstance(captioner, QwenVLCaptioner)
    assert captioner.fingerprint()["family_options"] == {"max_pixels": 2048}


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_longest_edge_changes_the_number_of_image_tokens(folders, greedy, family):
    image = noise_image(3, (90, 50))
    default = image_tokens(greedy(family), image)
    one_tile = make(folders(family), family, longest_edge=32)
    one_tile.load()
    assert image_tokens(one_tile, image) < default
    assert one_tile.fingerprint()["family_options"] == {"longest_edge": 32}
    assert all(candidates[0] for candidates in texts(one_tile.caption_batch(requests(2))))
    with pytest.raises(CaptionkitError, match="longest_edge"):
        make(folders(family), family, longest_edge=4)
    with pytest.raises(CaptionkitError, match="--min-pixels"):
        make(folders(family), family, min_pixels=1000)


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_then_load_gives_the_same_captions(folders, family):
    captioner = make(folders(family), family)
    captioner.load()
    before = texts(captioner.caption_batch(requests(2)))
    captioner.unload()
    assert captioner.model is None and captioner.processor is None
    captioner.load()
    assert texts(captioner.caption_batch(requests(2))) == before
