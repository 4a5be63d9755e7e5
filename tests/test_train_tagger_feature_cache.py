"""Head-only tagger training and the backbone feature cache: same trajectory as without it, a frozen
backbone that stays untouched, invalidation by a changed image or backbone, damaged entries
replaced, resume, and no backbone forward on cached steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from captionkit.train.config import ConfigError
from captionkit.train.tagger import load_tagger_config, train_tagger
from captionkit.train.tagger_synthetic import write_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("cache-shapes"), 40, seed=7, size=(32, 32))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A "pretrained" backbone file, so the frozen weights are known exactly."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(11)
    source = timm.create_model("test_resnet")
    path = tmp_path_factory.mktemp("weights") / "backbone.safetensors"
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(path))
    return path


def settings(data: Path, output: Path, weights: Path, *extra: str) -> list[str]:
    return [f"output_dir={output}", f"data.train_dirs=[{data}]", "model.backbone=test_resnet",
            f"model.pretrained={weights}", "model.image_size=32", "epochs=3", "batch_size=8", "data.num_workers=0",
            "report_to=none", "data.val_fraction=0.25", "optimizer.lr=1e-2", "save_total_limit=null", *extra]


def backbone_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.startswith("fc.")}


def test_cached_head_only_training_follows_the_uncached_trajectory_and_leaves_the_backbone_alone(
        shapes, weights, tmp_path):
    from safetensors.torch import load_file

    # drop_rate: the dropout before the classifier draws from the same RNG on both paths; hflip (on by
    # default) picks the cached mirrored view with the coin the image path tosses.
    common = ["model.freeze_backbone=true", "model.drop_rate=0.2", "ema_decay=0.9"]
    plain = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "plain", weights, *common)))
    cached = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "cached", weights, *common,
                                                            "model.cache_features=true")))
    assert len(cached.history) == len(plain.history) == 3
    for with_cache, without in zip(cached.history, plain.history, strict=True):
        for key in ("train_loss", "val_loss", "map", "micro_f1"):
            assert with_cache[key] == pytest.approx(without[key], rel=1e-5, abs=1e-6), key
    assert plain.history[0]["train_loss"] != pytest.approx(plain.history[-1]["train_loss"], abs=1e-4)  # it learned
    assert cached.feature_cache["train"]["computed"] == 30 and cached.feature_cache["val"]["computed"] == 10
    assert plain.feature_cache == {}

    initial = backbone_of(load_file(str(weights)))
    for run in (plain, cached):
        final = load_file(str(run.final_dir / "model.safetensors"))
        # AdamW's weight decay would shrink any weight that got a gradient; BatchNorm in train mode
        # would move its running statistics: neither happened.
        for key, value in backbone_of(final).items():
            assert torch.equal(value, initial[key]), key
        assert not torch.equal(final["fc.weight"], load_file(str(weights))["fc.weight"][:final["fc.weight"].shape[0]])


def test_a_changed_image_or_backbone_is_computed_again_and_a_damaged_entry_replaced(shapes, weights, tmp_path):
    import timm
    from PIL import Image, ImageOps
    from safetensors.torch import save_file

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    cache = tmp_path / "cache"
    run = iter(range(100))

    def train(*extra: str) -> dict[str, dict[str, int]]:
        return train_tagger(load_tagger_config(None, settings(
            data, tmp_path / f"run{next(run)}", weights, "epochs=1", "model.freeze_backbone=true",
            "model.cache_features=true", f"model.feature_cache_dir={cache}", *extra))).feature_cache

    first = train()
    assert first["train"] == {"reused": 0, "computed": 30, "corrupt": 0, "unreadable_images": 0}
    assert train()["train"] == {"reused": 30, "computed": 0, "corrupt": 0, "unreadable_images": 0}

    image = sorted(data.rglob("*.png"))[0]
    ImageOps.invert(Image.open(image).convert("RGB")).save(image)  # same name and tags, new content
    changed = train()
    assert changed["train"]["computed"] + changed["val"]["computed"] == 1
    assert changed["train"]["reused"] + changed["val"]["reused"] == 39

    entries = sorted(cache.rglob("*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:40])  # cut short
    entries[1].write_bytes(b"not a safetensors file at all")
    damaged = train()
    assert damaged["train"]["corrupt"] + damaged["val"]["corrupt"] == 2
    assert damaged["train"]["computed"] + damaged["val"]["computed"] == 2
    assert train()["train"]["computed"] == 0  # replaced entries read back

    torch.manual_seed(12)
    other = tmp_path / "other-backbone.safetensors"
    save_file({key: value.contiguous() for key, value in timm.create_model("test_resnet").state_dict().items()},
              str(other))
    assert train(f"model.pretrained={other}")["train"] == {"reused": 0, "computed": 30, "corrupt": 0,
                                                            "unreadable_images": 0}
    assert train("model.image_size=24")["train"]["computed"] == 30  # the preprocessing is part of the key


def test_resume_with_the_cache_equals_an_uninterrupted_run_and_the_backbone_trains_after_its_frozen_epochs(
        shapes, weights, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    common = ["model.freeze_backbone_epochs=2", "model.cache_features=true", f"model.feature_cache_dir={cache}"]
    full = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "full", weights, *common)))
    resumed = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "resumed", weights, *common)),
                           resume=full.output_dir / "checkpoints" / "epoch-0001")
    assert resumed.start_epoch == 1 and len(resumed.history) == 2
    optimizer = torch.load(full.output_dir / "last" / "optimizer.pt", weights_only=False)
    assert optimizer["param_groups"][0]["fused"] is True  # torch's fused AdamW, not one tensor at a time
    assert resumed.feature_cache["train"] == {"reused": 30, "computed": 0, "corrupt": 0, "unreadable_images": 0}
    for with_resume, uninterrupted in zip(resumed.history, full.history[1:], strict=True):
        for key in ("train_loss", "val_loss", "map"):
            assert with_resume[key] == pytest.approx(uninterrupted[key], rel=1e-5, abs=1e-6), key

    initial = backbone_of(load_file(str(weights)))
    after_frozen = backbone_of(load_file(str(full.output_dir / "checkpoints" / "epoch-0002" / "model.safetensors")))
    assert all(torch.equal(value, initial[key]) for key, value in after_frozen.items())
    final = backbone_of(load_file(str(full.final_dir / "model.safetensors")))
    assert not torch.equal(final["conv1.0.weight"], initial["conv1.0.weight"])  # epoch 3 trained the whole model


def test_the_ema_follows_the_backbone_once_it_is_unfrozen(shapes, weights, tmp_path):
    """The frozen backbone's weights move to channels-last and back (new tensors): the EMA must follow
    the tensors the model trains, not the ones it gathered while the backbone was frozen."""
    from safetensors.torch import load_file

    run = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "run", weights, "epochs=2",
                                                         "model.freeze_backbone_epochs=1", "ema_decay=0.5")))
    initial = backbone_of(load_file(str(weights)))
    trained = backbone_of(load_file(str(run.output_dir / "last" / "model.safetensors")))  # the model itself
    averaged = backbone_of(load_file(str(run.final_dir / "model.safetensors")))  # the EMA's export
    assert not torch.equal(trained["conv1.0.weight"], initial["conv1.0.weight"])
    assert not torch.equal(averaged["conv1.0.weight"], initial["conv1.0.weight"])
    assert all(value.is_contiguous() for value in averaged.values())


def test_head_only_steps_send_no_gradient_to_the_backbone_and_cached_ones_never_run_it(shapes, weights, tmp_path):
    from torch.nn.modules.module import register_module_forward_hook

    cache = tmp_path / "cache"
    stem_calls = []
    backbone_gradients = []  # backbone layers whose output was recorded for backward

    def count(module, inputs, output):
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            stem_calls.append(inputs[0].shape[0])
            if output.requires_grad:
                backbone_gradients.append(type(module).__name__)

    def train(name: str, *extra: str) -> None:
        train_tagger(load_tagger_config(None, settings(shapes, tmp_path / name, weights, "epochs=2",
                                                       "model.freeze_backbone=true", *extra)))

    handle = register_module_forward_hook(count)
    try:
        train("whole", "model.freeze_backbone=false")
        assert backbone_gradients  # the hook sees the backbone in the autograd graph when it trains
        backbone_gradients.clear()
        stem_calls.clear()
        train("uncached")
        assert stem_calls  # the hook sees the backbone when it runs
        assert backbone_gradients == []  # head-only: no gradient reaches any backbone layer
        stem_calls.clear()
        train("filling", "model.cache_features=true", f"model.feature_cache_dir={cache}")
        images_through_backbone = len(stem_calls)
        assert images_through_backbone  # once per image (and view), to fill the cache
        stem_calls.clear()
        train("cached", "model.cache_features=true", f"model.feature_cache_dir={cache}")
        assert stem_calls == []  # two epochs of training and validation, all from the cache
        assert backbone_gradients == []
    finally:
        handle.remove()


def test_head_only_settings_that_cannot_work_fail_with_the_fix(tmp_path):
    base = [f"output_dir={tmp_path}", f"data.train_dirs=[{tmp_path}]", "epochs=3"]
    with pytest.raises(ConfigError, match="cache_features needs a frozen backbone"):
        load_tagger_config(None, [*base, "model.cache_features=true"])
    with pytest.raises(ConfigError, match="set only one"):
        load_tagger_config(None, [*base, "model.freeze_backbone=true", "model.freeze_backbone_epochs=1"])
    with pytest.raises(ConfigError, match="freeze_backbone_epochs \\(4\\) is more than epochs \\(3\\)"):
        load_tagger_config(None, [*base, "model.freeze_backbone_epochs=4"])
    with pytest.raises(ConfigError, match="feature_cache_dir is only read with model.cache_features"):
        load_tagger_config(None, [*base, f"model.feature_cache_dir={tmp_path}"])
    config = load_tagger_config(None, [*base, "model.freeze_backbone_epochs=2", "model.cache_features=true"])
    assert config.frozen_epochs == 2 and config.model.cache_features


def test_the_ema_updates_like_timms_also_after_loading_a_checkpoint():
    import timm
    from timm.utils import ModelEmaV3

    from captionkit.train.tagger import new_ema

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    reference, ours = ModelEmaV3(model, decay=0.9), new_ema(model, 0.9)

    def train_a_little() -> None:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
            for buffer in model.buffers():
                buffer.add_(1)

    for step in range(3):
        train_a_little()
        reference.update(model, step=step)
        ours.update(model, step=step)
    saved = {key: value.clone() for key, value in reference.state_dict().items()}
    train_a_little()
    ours.update(model, step=3)
    ours.load_state_dict(saved)  # a resume copies into the tensors the update already gathered
    reference.load_state_dict(saved)
    for step in range(3):
        train_a_little()
        reference.update(model, step=step)
        ours.update(model, step=step)
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in ours.state_dict().items())


def test_cli_trains_the_head_from_cached_features_and_reports_the_cache(shapes, weights, tmp_path):
    import typer
    from typer.testing import CliRunner

    from captionkit.train.tagger_cli import tagger_command

    app = typer.Typer()
    app.command("tagger")(tagger_command)
    app.command("other")(lambda: None)
    config = tmp_path / "tagger.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nepochs: 1\nbatch_size: 8\nreport_to: none\n"
        f"model:\n  backbone: test_resnet\n  image_size: 32\n  pretrained: {weights}\n"
        f"data:\n  train_dirs: [{shapes}]\n  num_workers: 0\n  val_fraction: 0.25\n", encoding="utf-8")
    first = CliRunner().invoke(app, ["tagger", "--config", str(config), "--set", "model.freeze_backbone=true",
                                     "--set", "model.cache_features=true"])
    assert first.exit_code == 0, first.output
    assert "feature cache (train): 0 reused, 30 computed, 0 unreadable entries replaced" in first.output
    assert list((tmp_path / "out" / "feature_cache").rglob("*.safetensors"))
    again = CliRunner().invoke(app, ["tagger", "--config", str(config), "--set", f"output_dir={tmp_path / 'again'}",
                                     "--set", "model.freeze_backbone=true", "--set", "model.cache_features=true",
                                     "--set", f"model.feature_cache_dir={tmp_path / 'out' / 'feature_cache'}"])
    assert again.exit_code == 0, again.output
    assert "feature cache (train): 30 reused, 0 computed" in again.output
    bad = CliRunner().invoke(app, ["tagger", "--config", str(config), "--set", "model.cache_features=true"])
    assert bad.exit_code == 2 and "cache_features needs a frozen backbone" in bad.output


def whole_model_validation(run_dir: Path, data: Path, checkpoint: Path) -> dict[str, float]:
    """A checkpoint's metrics from the whole model's forward on the run's validation images (no trainer code path)."""
    import timm
    from safetensors.torch import load_file

    from captionkit.train.tagger import _read_split, preprocessing_for
    from captionkit.train.tagger_data import (
        TaggerDataset,
        Vocabulary,
        collate_skipping_failures,
        encode,
        scan_tagged_folders,
    )
    from captionkit.train.tagger_metrics import compute_metrics

    vocabulary = Vocabulary.from_csv(run_dir / "selected_tags.csv")
    encoded = encode(scan_tagged_folders([data], ",", ".txt", True), vocabulary)
    _, val_idx, _ = _read_split(run_dir / "split.json", encoded.paths)
    model = timm.create_model("test_resnet", num_classes=len(vocabulary))
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    model.eval()
    dataset = TaggerDataset(encoded, val_idx, len(vocabulary), preprocessing_for(model, 32))
    logits, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(dataset), 8):
            images, batch_targets = collate_skipping_failures([dataset[i] for i in range(start, start + 8)
                                                               if i < len(dataset)])
            logits.append(model(images))
            targets.append(batch_targets)
    logits, targets = torch.cat(logits), torch.cat(targets)
    metrics = compute_metrics(torch.sigmoid(logits).numpy(), targets.numpy()).as_dict()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(targets)
    return {**metrics, "val_loss": float(loss)}


def test_uncached_head_only_validation_runs_the_backbone_once_per_frozen_phase_with_the_whole_models_metrics(
        shapes, weights, tmp_path):
    """Without the feature cache, the frozen backbone's validation features are kept in memory for the frozen
    phase (each evaluation then runs only the classifier) and dropped when the backbone trains; every epoch's
    metrics still equal the whole model's forward on that epoch's checkpoint."""
    from torch.nn.modules.module import register_module_forward_hook

    validation_images = []  # images through the backbone's stem during evaluation (inference mode)

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3 and torch.is_inference_mode_enabled():
            validation_images.append(inputs[0].shape[0])

    handle = register_module_forward_hook(count)
    try:
        run = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "run", weights,
                                                             "model.freeze_backbone_epochs=2")))
    finally:
        handle.remove()
    assert sum(validation_images) == 10 + 10  # 10 validation images: frozen epochs 1-2 once, unfrozen epoch 3
    assert len(run.history) == 3
    for epoch, row in enumerate(run.history, start=1):
        whole = whole_model_validation(run.output_dir, shapes, run.output_dir / "checkpoints" / f"epoch-{epoch:04d}")
        for key in ("val_loss", "map", "micro_f1", "tuned_macro_f1"):
            assert row[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), (epoch, key)
    assert run.history[0]["val_loss"] != pytest.approx(run.history[1]["val_loss"], rel=1e-3)  # the head learned


def test_head_only_training_runs_in_mixed_precision(shapes, weights, tmp_path):
    """The split check compares float32 with float32, though accelerate wraps the model's forward in bf16 autocast."""
    run = train_tagger(load_tagger_config(None, settings(shapes, tmp_path / "run", weights, "epochs=1",
                                                         "model.freeze_backbone=true", "mixed_precision=bf16",
                                                         "model.image_size=16")))
    assert len(run.history) == 1 and run.history[0]["val_loss"] > 0
