"""cache_vision_features: same training as without it, invalidated by a changed image or model, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from captionkit.train.captioner import (
    CaptionerTrainConfig,
    OptimizerSettings,
    load_captioner_config,
    train_captioner,
)
from captionkit.train.captioner_data import AugmentConfig, CaptionCollator, DatasetSpec, write_shapes_dataset
from captionkit.train.config import ConfigError
from captionkit.train.feature_cache import FeatureCollator
from captionkit.train.lora import LoraSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(base_model: Path, data: Path, output: Path, **overrides) -> CaptionerTrainConfig:
    settings = dict(model=str(base_model), output_dir=output, data=[DatasetSpec(path=data)], batch_size=4,
                    max_target_tokens=32, report_to=[], log_every_steps=1, optimizer=OptimizerSettings(lr=1e-3),
                    mode="lora", lora=LoraSettings(rank=4, dropout=0.1), seed=2)
    settings.update(overrides)
    return CaptionerTrainConfig(**settings)


def logged_losses(output: Path) -> list[float]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


class TowerCalls:
    """Counts forward calls of every Florence-2 vision tower while the block runs (a real forward hook)."""

    def __enter__(self) -> TowerCalls:
        from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

        self.count = 0

        def hook(module, inputs, output):
            if isinstance(module, Florence2VisionBackbone):
                self.count += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.remove()


def entries(cache: Path) -> list[Path]:
    return sorted(path for path in cache.rglob("*.safetensors"))


def read_entry(path: Path) -> torch.Tensor:
    """An entry's features, copied (load_file maps the file: an in-place write would show through)."""
    from safetensors.torch import load_file

    return load_file(path)["features"].clone()


def image_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_with_scaled_weight(model: Path, folder: Path, part: str) -> Path:
    """A copy of ``model`` whose first weight matrix under ``part`` is scaled by 1.01."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder)
    weights = load_file(folder / "model.safetensors")
    name = next(key for key in weights if part in key and key.endswith("weight"))
    weights[name] = weights[name] * 1.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture()
def small_data(tmp_path) -> Path:
    folder = tmp_path / "small"
    write_shapes_dataset(folder, 8, seed=5)
    return folder


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_cached_features_give_the_loss_trajectory_of_a_plain_run(base_model, shapes, tmp_path, mode):
    extra = {"epochs": 3, "augment": AugmentConfig(shuffle_parts=True, separator=" and ")}
    if mode == "full":  # the projector still trains: the cache holds the tower's output, before it
        extra.update(mode="full", lora=LoraSettings(), freeze_vision=True, optimizer=OptimizerSettings(lr=1e-4))
    with TowerCalls() as plain_calls:
        plain = train_captioner(make_config(base_model, shapes, tmp_path / "plain", **extra))
    with TowerCalls() as cached_calls:
        cached = train_captioner(make_config(base_model, shapes, tmp_path / "cached", cache_vision_features=True,
                                             **extra))
    # 24 images, batch 4: 6 steps per epoch; the tower runs in the first epoch only.
    assert plain.global_step == cached.global_step == 18
    assert (plain_calls.count, cached_calls.count) == (18, 6)
    assert cached.vision_features == {"from_cache": 48, "computed": 24}
    assert plain.vision_features == {}
    assert len(entries(tmp_path / "cached" / "vision_features")) == 24
    expected, actual = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "cached")
    assert len(expected) == 18 and expected[0] != expected[-1]
    assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_changed_image_or_model_recomputes_its_entries(base_model, small_data, tmp_path):
    cache = tmp_path / "cache"

    def run(name: str, model: Path = base_model) -> tuple[dict[str, int], int]:
        """(features from the cache and computed, vision tower calls) of a one-epoch run: 8 images, 2 batches."""
        with TowerCalls() as calls:
            result = train_captioner(make_config(model, small_data, tmp_path / name, epochs=1,
                                                 cache_vision_features=True, vision_cache_dir=cache))
        return result.vision_features, calls.count

    assert run("first") == ({"from_cache": 0, "computed": 8}, 2)
    first_entries = entries(cache)
    assert len(first_entries) == 8
    assert run("again") == ({"from_cache": 8, "computed": 0}, 0)  # the tower is never called

    picture = sorted(small_data.glob("*.png"))[3]
    old = read_entry(next(path for path in first_entries if path.stem == image_digest(picture)))
    Image.new("RGB", (64, 64), (200, 10, 10)).save(picture)  # same path, new pixels
    assert run("changed-image") == ({"from_cache": 7, "computed": 1}, 1)
    new_path = next(path for path in entries(cache) if path.stem == image_digest(picture))
    assert not torch.allclose(read_entry(new_path), old)
    assert len(entries(cache)) == 9  # the old image's entry is kept under its own content key

    changed_vision = copy_with_scaled_weight(base_model, tmp_path / "changed-vision", "vision_tower")
    assert run("changed-vision", changed_vision) == ({"from_cache": 0, "computed": 8}, 2)

    changed_preprocessing = tmp_path / "changed-preprocessing"
    shutil.copytree(base_model, changed_preprocessing)
    config_file = changed_preprocessing / "processor_config.json"
    settings = json.loads(config_file.read_text())
    settings["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    config_file.write_text(json.dumps(settings))
    assert run("changed-preprocessing", changed_preprocessing) == ({"from_cache": 0, "computed": 8}, 2)

    changed_language = copy_with_scaled_weight(base_model, tmp_path / "changed-language", "language_model")
    assert run("changed-language", changed_language) == ({"from_cache": 8, "computed": 0}, 0)  # same features
    assert len([folder for folder in cache.iterdir() if folder.is_dir()]) == 3


def test_damaged_entries_are_recomputed_not_fatal(base_model, small_data, tmp_path):
    cache = tmp_path / "cache"
    config = make_config(base_model, small_data, tmp_path / "first", epochs=1, cache_vision_features=True,
                         vision_cache_dir=cache)
    train_captioner(config)
    truncated, flipped, emptied, *_ = entries(cache)
    good = read_entry(flipped)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # a changed feature value with an intact header
    flipped.write_bytes(bytes(data))
    emptied.write_bytes(b"")
    result = train_captioner(make_config(base_model, small_data, tmp_path / "second", epochs=1,
                                         cache_vision_features=True, vision_cache_dir=cache))
    assert result.vision_features == {"from_cache": 5, "computed": 3}
    torch.testing.assert_close(read_entry(flipped), good)  # rewritten with the right values
    assert result.global_step == 2


def test_resume_with_the_cache_equals_an_uninterrupted_run(base_model, shapes, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    extra = dict(epochs=2, save_every_steps=8, cache_vision_features=True, vision_cache_dir=cache,
                 augment=AugmentConfig(shuffle_parts=True, separator=" and "))
    whole = train_captioner(make_config(base_model, shapes, tmp_path / "whole", **extra))
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-0000008"  # mid second epoch
    resumed = train_captioner(make_config(base_model, shapes, tmp_path / "resumed", **extra),
                              resume_from=checkpoint)
    assert resumed.global_step == whole.global_step == 12
    assert resumed.vision_features == {"from_cache": 16, "computed": 0}  # 4 batches of 4, all from the cache
    expected = load_file(whole.final_path / "adapter_model.safetensors")
    actual = load_file(resumed.final_path / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)
    assert logged_losses(tmp_path / "resumed") == pytest.approx(logged_losses(tmp_path / "whole")[8:], rel=1e-5)


def test_the_cache_is_refused_when_the_vision_tower_trains(base_model, shapes, tmp_path):
    with pytest.raises(ValueError, match="freeze_vision: true"):
        make_config(base_model, shapes, tmp_path, mode="full", lora=LoraSettings(), cache_vision_features=True)
    with pytest.raises(ValueError, match="'all_linear' puts LoRA on it"):
        make_config(base_model, shapes, tmp_path, lora=LoraSettings(target_modules="all_linear"),
                    cache_vision_features=True)
    with pytest.raises(ValueError, match="vision_cache_dir is only used with cache_vision_features"):
        make_config(base_model, shapes, tmp_path, vision_cache_dir=tmp_path / "c")
    # A list of names can reach the tower too (DaViT's qkv): known once the model is built, before training.
    config = make_config(base_model, shapes, tmp_path / "out", cache_vision_features=True,
                         lora=LoraSettings(target_modules=["qkv", "q_proj"]))
    with pytest.raises(ConfigError, match=r"vision_tower\..*qkv.*leave model.vision_tower out"):
        train_captioner(config)
    assert not (tmp_path / "out").exists()
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"model": str(base_model), "output_dir": str(tmp_path / "o"),
                                    "data": [{"path": str(shapes)}]}))
    with pytest.raises(ConfigError, match=r"c\.yaml.*set freeze_vision: true"):
        load_captioner_config(file, ["cache_vision_features=true"])
    loaded = load_captioner_config(file, ["cache_vision_features=true", "freeze_vision=true",
                                          f"vision_cache_dir={tmp_path / 'shared'}"])
    assert loaded.cache_vision_features and loaded.vision_cache_dir == tmp_path / "shared"


def test_feature_batches_carry_the_prompts_the_processor_makes(base_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base_model)
    picture = Image.new("RGB", (64, 64), "blue")
    samples = [{"image": picture, "task": "<CAPTION>", "caption": "a red circle", "index": 0, "digest": "a"},
               {"image": picture, "task": "<MORE_DETAILED_CAPTION>", "caption": "a blue square", "index": 1,
                "digest": "b"}]
    plain = CaptionCollator(processor, 32)(samples)
    cached = FeatureCollator(processor, 32)(samples)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values"):
        torch.testing.assert_close(cached[key], plain[key])
    assert cached["missing_rows"] == [0, 1] and cached["missing_digests"] == ["a", "b"]


def test_cli_sets_the_cache_and_reports_what_it_served(base_model, small_data, tmp_path):
    from typer.testing import CliRunner

    from captionkit.train.cli import train_app

    file = tmp_path / "captioner.yaml"
    file.write_text(yaml.safe_dump({
        "model": str(base_model), "output_dir": str(tmp_path / "out"), "data": [{"path": str(small_data)}],
        "batch_size": 4, "epochs": 1, "max_target_tokens": 32, "report_to": []}))
    runner = CliRunner()
    refused = runner.invoke(train_app, ["captioner", "-c", str(file), "--set", "cache_vision_features=true"])
    assert refused.exit_code == 2 and "set freeze_vision: true" in refused.output
    assert not (tmp_path / "out").exists()
    words = ["captioner", "-c", str(file), "--set", "cache_vision_features=true", "--set", "freeze_vision=true"]
    first = runner.invoke(train_app, words)
    assert first.exit_code == 0, first.output
    assert "vision features: 0 samples from the cache, 8 computed and stored" in first.output
    again = runner.invoke(train_app, words)
    assert again.exit_code == 0, again.output
    assert "vision features: 8 samples from the cache, 0 computed and stored" in again.output
    assert len(entries(tmp_path / "out" / "vision_features")) == 8


def test_a_frozen_tower_with_stochastic_depth_trains_as_its_cached_features(small_data, tmp_path):
    """A frozen tower runs in eval mode while training: DaViT's stochastic depth (drop_path_rate) would
    otherwise add noise nothing learns from, and the uncached run would differ from the cached one."""
    from captionkit.testing import build_tiny_florence2

    # weights at std 0.3: the captions depend on the image strongly enough for dropped paths to show
    noisy = build_tiny_florence2(tmp_path / "drop-path")
    config = json.loads((noisy / "config.json").read_text())
    config["vision_config"]["drop_path_rate"] = 0.5
    (noisy / "config.json").write_text(json.dumps(config))
    extra = {"epochs": 2, "mode": "full", "lora": LoraSettings(), "freeze_vision": True,
             "optimizer": OptimizerSettings(lr=1e-4)}
    train_captioner(make_config(noisy, small_data, tmp_path / "plain", **extra))
    train_captioner(make_config(noisy, small_data, tmp_path / "cached", cache_vision_features=True, **extra))
    expected, actual = logged_losses(tmp_path / "plain"), logged_losses(tmp_path / "cached")
    assert len(expected) == 4
    assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6)
