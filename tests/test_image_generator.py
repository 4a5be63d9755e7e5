"""The image_generator step on tiny FLUX and SD3 pipelines built offline (random weights, 32×48 images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from captionkit.core.atomic import TEMP_MARKER  # noqa: E402
from captionkit.core.errors import CaptionkitError  # noqa: E402
from captionkit.core.records import Record  # noqa: E402
from captionkit.models.base import ItemFailure  # noqa: E402
from captionkit.steps.image_generator import derive_seed, image_stem  # noqa: E402
from captionkit.steps.registry import StepContext, find_step_type  # noqa: E402

HEIGHT, WIDTH = 32, 48


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    from captionkit.testing.diffusion import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory) -> Path:
    from captionkit.testing.diffusion import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def make_step(config: dict, save_folder: Path, type_name: str = "FLUXGenerator"):
    context = StepContext(index=0, name="gen", output_field="image", base_folder=save_folder / "work",
                          save_folder=save_folder, input_fields=["caption"])
    defaults = {"height": HEIGHT, "width": WIDTH, "num_inference_steps": 2, "device": "cpu"}
    return find_step_type(type_name).builder({**defaults, **config}, context)


def generate(step, records: list[Record]) -> list:
    settings = step.record_settings(records)
    ready = [record for record in records if not isinstance(settings[record.id], str)]
    return step.run_batch([step.prepare(record) for record in ready])


def pixels(save_folder: Path, raw: dict, index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(save_folder / raw["images"][index]))


def no_temp_files(folder: Path) -> bool:
    return not [path for path in folder.rglob("*") if TEMP_MARKER in path.name]


RED = Record(id="r1", path=None, fields={"caption": "a red circle"})
BLUE = Record(id="r2", path=None, fields={"caption": "a blue square"})
CAT = Record(id="pets/cat 1.jpg", path=None, fields={"caption": "a cat"})


@pytest.fixture(scope="module")
def flux_step(tiny_flux, tmp_path_factory):
    save_folder = tmp_path_factory.mktemp("flux-out")
    step = make_step({"model_path": str(tiny_flux)}, save_folder)
    step.load()
    yield step
    step.unload()


def test_registered_with_aliases_and_keys():
    step_type = find_step_type("StableDiffusionGenerator")
    assert step_type.name == "image_generator" and find_step_type("ImageGenerator") is step_type
    assert step_type.key_aliases == {"model_path": "model", "repeat_time": "samples"}
    assert step_type.required == ("model",) and step_type.extras == ("diffusers",)
    assert not step_type.needs_images and step_type.writes_images


def test_flux_writes_images_of_the_requested_size(flux_step):
    raws = generate(flux_step, [RED, CAT])
    folder = flux_step.save_folder
    assert raws[0]["images"] == ["generated_images/image/r1.png"]
    assert raws[1]["images"][0].startswith("generated_images/image/pets/cat_1_jpg-")  # sub-folder kept, name made safe
    for raw in raws:
        path = Path(flux_step.render(raw))
        assert path.is_absolute() and path.is_file() and path.is_relative_to(folder / "generated_images")
        with Image.open(path) as image:
            assert image.size == (WIDTH, HEIGHT) and image.format == "PNG"
    assert raws[0]["seeds"] == [derive_seed(0, "r1", 0)]
    assert no_temp_files(folder)


def test_same_seed_same_pixels_whatever_the_batch(flux_step):
    from captionkit.steps.image_generator import BATCH_PIXEL_TOLERANCE

    folder = flux_step.save_folder
    alone = pixels(folder, generate(flux_step, [BLUE])[0])
    again = pixels(folder, generate(flux_step, [BLUE])[0])
    assert np.array_equal(alone, again)  # the same batch: the same bytes
    # Six records one at a time, then in batches of three: batched matmuls may round the last float
    # bit differently, which moves a channel value by at most the documented tolerance.
    six = [Record(id=f"n{index}", path=None, fields={"caption": f"shape number {index}"}) for index in range(6)]
    single = [pixels(folder, generate(flux_step, [record])[0]).astype(int) for record in six]
    batched = [pixels(folder, raw).astype(int) for start in (0, 3) for raw in generate(flux_step, six[start:start + 3])]
    differences = [int(np.abs(one - many).max()) for one, many in zip(single, batched, strict=True)]
    assert max(differences) <= BATCH_PIXEL_TOLERANCE, differences


def test_another_seed_gives_other_images(flux_step, tiny_flux, tmp_path):
    base = pixels(flux_step.save_folder, generate(flux_step, [RED])[0])
    other = make_step({"model": str(tiny_flux), "seed": 7}, tmp_path)
    other.load()
    raw = generate(other, [RED])[0]
    assert raw["seeds"] == [derive_seed(7, "r1", 0)] != [derive_seed(0, "r1", 0)]
    assert np.abs(pixels(tmp_path, raw).astype(int) - base.astype(int)).mean() > 5
    assert other.fingerprint()["seed"] == 7 and other.fingerprint() != flux_step.fingerprint()
    other.unload()
    assert other.pipeline is None


def test_samples_give_several_images_and_jpg(tiny_flux, tmp_path):
    step = make_step({"model": str(tiny_flux), "repeat_time": 2, "image_format": "jpg", "batch_size": 2}, tmp_path)
    step.load()
    raws = generate(step, [RED, BLUE])
    assert raws[0]["images"] == ["generated_images/image/r1_0.jpg", "generated_images/image/r1_1.jpg"]
    assert len(set(raws[0]["seeds"])) == 2
    first, second = (pixels(tmp_path, raws[0], index) for index in (0, 1))
    assert first.shape == (HEIGHT, WIDTH, 3) and not np.array_equal(first, second)
    assert step.render(raws[0]) == str(tmp_path / "generated_images/image/r1_0.jpg")
    assert no_temp_files(tmp_path)
    step.unload()


def test_record_settings_prompt_and_missing_field(tiny_flux, tmp_path):
    step = make_step({"model": str(tiny_flux), "prompt_template": "{caption}, high quality"}, tmp_path)
    empty = Record(id="rows/7", path=None, fields={"tags": "cat"})
    settings = step.record_settings([RED, empty])
    assert settings["r1"] == {"prompt": "a red circle, high quality"}
    assert isinstance(settings["rows/7"], str)
    assert "'caption'" in settings["rows/7"] and "rows/7" in settings["rows/7"]
    other_field = make_step({"model": str(tiny_flux), "input_field": "tags"}, tmp_path)
    assert other_field.record_settings([empty]) == {"rows/7": {"prompt": "cat"}}


def test_sd3_generates_and_reproduces(tiny_sd3, tmp_path):
    step = make_step({"model": str(tiny_sd3), "negative_prompt": "blurry", "guidance_scale": 4.0,
                      "max_sequence_length": 32}, tmp_path, "StableDiffusionGenerator")
    step.load()
    assert step.pipeline_class == "StableDiffusion3Pipeline"
    assert step.fingerprint()["pipeline"] == "StableDiffusion3Pipeline"
    first = generate(step, [RED])[0]
    with Image.open(tmp_path / first["images"][0]) as image:
        assert image.size == (WIDTH, HEIGHT)
    assert np.array_equal(pixels(tmp_path, first), pixels(tmp_path, generate(step, [RED])[0]))
    assert no_temp_files(tmp_path)
    step.unload()
    assert step.pipeline is None


def test_failed_write_is_that_record_failure(flux_step, tmp_path, monkeypatch):
    import captionkit.steps.image_generator as module

    def refuse(path, data, durable=True):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(module, "atomic_write_bytes", refuse)
    raw = generate(flux_step, [RED])[0]
    assert isinstance(raw, ItemFailure) and "generated_images" in raw.message


def test_config_values_are_validated(tmp_path, tiny_flux):
    for config, key in [({"height": 0}, "height"), ({"samples": "2"}, "samples"), ({"image_format": "gif"},
                        "image_format"), ({"dtype": "int8"}, "dtype"), ({"guidance_scale": True}, "guidance_scale"),
                        ({"max_sequence_length": 4096}, "max_sequence_length"),
                        ({"prompt_template": "{caption.x}"}, "prompt_template")]:
        with pytest.raises(CaptionkitError, match=key):
            make_step({"model": str(tiny_flux), **config}, tmp_path)
    step = make_step({"model": str(tiny_flux), "height": 30}, tmp_path)
    with pytest.raises(CaptionkitError, match="height 30"):
        step.load()
    with pytest.raises(CaptionkitError, match="model_index.json"):
        make_step({"model": str(tmp_path)}, tmp_path).load()


def test_known_model_names_and_safe_names():
    from captionkit.steps.image_generator import resolve_model

    assert resolve_model("FLUX.1-schnell") == ("black-forest-labs/FLUX.1-schnell", {
        "num_inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256})
    assert resolve_model("stabilityai/stable-diffusion-3.5-large")[0] == "stabilityai/stable-diffusion-3.5-large"
    assert image_stem("a/b/c.jpg") == "a/b/c_jpg" and image_stem("a/b/c.png") == "a/b/c_png"
    assert image_stem("r1") == "r1"
    escaped = image_stem("../../etc/passwd")
    assert escaped.startswith("etc/passwd-") and ".." not in escaped
    assert image_stem("/abs/x y.png") != image_stem("/abs/x_y.png")
    assert derive_seed(0, "r1", 0) == derive_seed(0, "r1", 0) != derive_seed(0, "r1", 1)


def _flux_pipeline(folder: Path, tiny_flux: Path) -> Path:
    import json

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"caption": text}) + "\n"
                                                  for text in ("a red circle", "a blue square", "a cat")))
    config = {"input": "prompts.jsonl", "base_folder": "work", "save_folder": "out", "steps": [
        {"type": "ImageGenerator", "name": "FLUXGenerator", "config": {
            "model_path": str(tiny_flux), "height": HEIGHT, "width": WIDTH, "num_inference_steps": 2,
            "device": "cpu", "batch_size": 3}}]}
    (folder / "p.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "p.yaml"


def _result_rows(folder: Path) -> list[dict]:
    import json

    (path,) = (folder / "work").glob("step_*/result.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_deleted_generated_image_is_made_again(tiny_flux, tmp_path):
    from captionkit.pipeline import run_pipeline

    config = _flux_pipeline(tmp_path, tiny_flux)
    first = run_pipeline(config).steps[0]
    assert (first.processed, first.done) == (3, 0)
    paths = [Path(row[first.output_field]) for row in _result_rows(tmp_path)]
    assert len(paths) == 3 and all(path.is_file() for path in paths)
    before = pixels(tmp_path, {"images": [paths[1].relative_to(tmp_path)]})
    paths[1].unlink()
    planned = run_pipeline(config, dry_run=True).steps[0]
    assert (planned.done, planned.todo) == (2, 1)
    again = run_pipeline(config).steps[0]
    assert (again.processed, again.done, again.failed) == (1, 2, 0)
    assert all(Path(row[again.output_field]).is_file() for row in _result_rows(tmp_path))
    remade = pixels(tmp_path, {"images": [paths[1].relative_to(tmp_path)]}).astype(int)
    from captionkit.steps.image_generator import BATCH_PIXEL_TOLERANCE

    assert np.abs(remade - before.astype(int)).max() <= BATCH_PIXEL_TOLERANCE  # the same seed, alone this time


def test_temp_files_of_a_killed_run_are_removed_from_every_folder_written(tiny_flux, tmp_path):
    import tempfile

    from captionkit.pipeline import run_pipeline

    config = _flux_pipeline(tmp_path, tiny_flux)
    run_pipeline(config)
    generated = tmp_path / "out" / "generated_images" / "flux_generator"
    (step_folder,) = (tmp_path / "work").glob("step_*")
    left = []
    for folder, name in ((generated, "row-1.png"), (generated / "sub", "x.png"), (tmp_path / "out", "result.jsonl"),
                         (step_folder, "result.jsonl")):
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{name}{TEMP_MARKER}", dir=folder)  # as atomic_open names them
        os.write(handle, b"half an image")
        os.close(handle)
        left.append(Path(temp))
    mine = tmp_path / "out" / "notes.ck-tmp-draft"  # not a captionkit temp file: no leading dot
    mine.write_text("the user's")
    again = run_pipeline(config).steps[0]
    assert again.done == 3  # nothing to generate, and still cleaned
    assert [path for path in left if path.exists()] == []
    assert mine.exists()
