"""Tagger training end to end: config handling, fine-tuning onto a new tag set, learning,
resume parity, export that `captionkit tag` loads, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from captionkit.train.config import ConfigError
from captionkit.train.tagger import (
    TaggerModelConfig,
    TaggerTrainingError,
    create_backbone,
    load_tagger_config,
    remap_head,
    train_tagger,
)
from captionkit.train.tagger_synthetic import TAGS, make_shapes_image, write_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """800 generated 32 px images with tag files (seeded: identical on every run). Measured: 32 px learns as
    well as 64 px (held-out mAP 0.957 vs 0.963 after 8 epochs) at well under half the CPU."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), 800, seed=1, size=(32, 32))


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("small-shapes"), 48, seed=5, size=(32, 32))


def tiny_settings(data: Path, output: Path, *extra: str) -> list[str]:
    return [f"output_dir={output}", f"data.train_dirs=[{data}]", "model.backbone=test_resnet",
            "model.image_size=32", "epochs=1", "batch_size=16", "data.num_workers=0", "report_to=none",
            "data.val_fraction=0.25", *extra]


def test_config_file_values_survive_defaults_and_overrides(tmp_path):
    path = tmp_path / "tagger.yaml"
    path.write_text(
        "output_dir: out\nepochs: 3\ndata:\n  train_dirs: [imgs]\n  separator: '|'\n"
        "optim:\n  lr: 2.0e-4\n", encoding="utf-8")
    config = load_tagger_config(path, ["optim.weight_decay=0.1", "model.backbone=resnet10t"])
    assert config.epochs == 3 and config.data.separator == "|" and config.optimizer.lr == 2e-4
    assert config.optimizer.weight_decay == 0.1 and config.model.backbone == "resnet10t"
    assert config.batch_size == 32  # a default fills only what neither gave
    with pytest.raises(ConfigError, match="unknown key 'optimizer.weight_decy'.*Did you mean 'optimizer.weight_decay'"):
        load_tagger_config(path, ["optim.weight_decy=1"])
    with pytest.raises(ConfigError, match="--set 'epochs=many'.*'epochs' must be an integer"):
        load_tagger_config(path, ["epochs=many"])
    with pytest.raises(ConfigError, match="only apply to loss.name: asl"):
        load_tagger_config(path, ["loss.gamma_neg=2"])
    with pytest.raises(ConfigError, match="train_dirs needs at least one folder"):
        load_tagger_config(None, ["output_dir=x", "data.train_dirs=[]"])
    with pytest.raises(ConfigError, match="required key 'data' is missing"):
        load_tagger_config(None, ["output_dir=x"])


def test_fine_tune_copies_head_rows_of_surviving_tags():
    config = TaggerModelConfig(backbone="test_resnet", image_size=32)
    torch.manual_seed(0)
    source, _ = create_backbone(config, 4)
    old_names = ["a", "b", "c", "d"]
    torch.manual_seed(1)
    target, _ = create_backbone(config, 3)
    fresh_new_row = target.get_classifier().weight[1].detach().clone()
    counts = remap_head(target, source.state_dict(), old_names, ["c", "new", "a"])
    assert counts == {"kept": 2, "new": 1, "dropped": 2}
    new_head, old_head = target.get_classifier(), source.get_classifier()
    assert torch.equal(new_head.weight[0], old_head.weight[2]) and torch.equal(new_head.bias[0], old_head.bias[2])
    assert torch.equal(new_head.weight[2], old_head.weight[0]) and torch.equal(new_head.bias[2], old_head.bias[0])
    assert torch.equal(new_head.weight[1], fresh_new_row)  # a new tag keeps its fresh initialisation
    body = [name for name in source.state_dict() if not name.startswith("fc.")]
    assert body and all(torch.equal(source.state_dict()[n], target.state_dict()[n]) for n in body)


def test_init_from_a_trained_folder_keeps_surviving_rows(small_shapes, tmp_path):
    first = train_tagger(load_tagger_config(None, tiny_settings(small_shapes, tmp_path / "first")))
    source_names = (first.best_dir / "selected_tags.csv").read_text().splitlines()[1:]
    source_names = [line.split(",")[1] for line in source_names]
    vocabulary = tmp_path / "changed.csv"
    vocabulary.write_text("name,count\ncircle,5\nhexagon,5\nred,5\n", encoding="utf-8")
    (small_shapes.parent / "unused").mkdir(exist_ok=True)
    second = train_tagger(load_tagger_config(None, tiny_settings(
        small_shapes, tmp_path / "second", f"model.init_from={first.best_dir}", f"data.selected_tags={vocabulary}",
        "optim.lr=1e-12", "optim.weight_decay=0")))
    from safetensors.torch import load_file

    before = load_file(str(first.best_dir / "model.safetensors"))
    after = load_file(str(second.final_dir / "model.safetensors"))
    assert after["fc.weight"].shape[0] == 3
    for row, name in [(0, "circle"), (2, "red")]:
        torch.testing.assert_close(after["fc.weight"][row], before["fc.weight"][source_names.index(name)])
    assert second.vocabulary_size == 3


@pytest.mark.slow
def test_tiny_tagger_learns_shapes_and_a_resumed_run_ends_the_same(shapes, tmp_path):
    settings = [f"data.train_dirs=[{shapes}]", "model.backbone=test_resnet", "model.image_size=32",
                "epochs=8", "batch_size=32", "optim.lr=5e-3", "data.num_workers=0", "data.val_fraction=0.2",
                "save_total_limit=null", "export_onnx=true"]
    full = train_tagger(load_tagger_config(None, [*settings, f"output_dir={tmp_path / 'full'}"]))
    assert full.split_method == "stratified"
    assert full.final_metrics["map"] >= 0.9, full.history
    assert full.best_metric >= full.final_metrics["map"]
    out = full.output_dir
    assert (out / "last" / "training_state.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("epoch-")) == [
        f"epoch-{n:04d}" for n in range(1, 9)]
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard logs are written by default"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 8

    resumed = train_tagger(load_tagger_config(None, [*settings, "export_onnx=false",
                                                     f"output_dir={tmp_path / 'resumed'}"]),
                           resume=out / "checkpoints" / "epoch-0006")  # two epochs on: RNG, order, schedule
    assert resumed.start_epoch == 6 and len(resumed.history) == 2
    for key in ("map", "micro_f1", "macro_f1", "val_loss"):
        assert resumed.final_metrics[key] == pytest.approx(full.final_metrics[key], abs=1e-4), key

    # The exported best model tags new images through the public loader, timm and ONNX alike.
    from captionkit.core.tagging import TagOptions, select_tags
    from captionkit.models.taggers import TaggerLoadError, load_tagger

    with pytest.raises(TaggerLoadError, match="training run, not a model; pass --model .*best"):
        load_tagger(str(out), device="cpu")
    tagger = load_tagger(str(full.best_dir), device="cpu")
    onnx_tagger = load_tagger(str(full.best_dir / "model.onnx"), device="cpu")
    rng = __import__("random").Random(99)
    samples = [make_shapes_image(rng, (32, 32)) for _ in range(48)]
    scores = tagger.predict(np.stack([tagger.preprocess(image) for image, _ in samples]))
    onnx_scores = onnx_tagger.predict(np.stack([onnx_tagger.preprocess(image) for image, _ in samples]))
    np.testing.assert_allclose(onnx_scores, scores, atol=1e-4)
    options = TagOptions(use_model_thresholds=True)
    true_positives = false_positives = false_negatives = 0
    for row, (_, expected) in zip(scores, samples, strict=True):
        chosen = {tag for tag, _ in select_tags(row, tagger.tags, tagger.categories, options,
                                                tagger.default_thresholds)}
        true_positives += len(chosen & set(expected))
        false_positives += len(chosen - set(expected))
        false_negatives += len(set(expected) - chosen)
    f1 = 2 * true_positives / (2 * true_positives + false_positives + false_negatives)
    assert set(tagger.tags) == set(TAGS)
    print(f"held-out mAP {full.final_metrics['map']:.4f}, micro F1 {full.final_metrics['micro_f1']:.4f}; "
          f"resumed mAP {resumed.final_metrics['map']:.4f}; F1 of selected tags on new images {f1:.3f}")
    assert f1 >= 0.8, f"tags chosen with the shipped thresholds reach only F1 {f1:.3f} on new images"


def test_resume_of_a_finished_run_says_how_to_continue(small_shapes, tmp_path):
    settings = tiny_settings(small_shapes, tmp_path / "run")
    result = train_tagger(load_tagger_config(None, settings))
    with pytest.raises(TaggerTrainingError, match="--set epochs=N"):
        train_tagger(load_tagger_config(None, settings), resume=result.output_dir)
    with pytest.raises(TaggerTrainingError, match="no training_state.json"):
        train_tagger(load_tagger_config(None, settings), resume=tmp_path)


def test_cli_trains_from_a_yaml_file_and_reports_config_errors(small_shapes, tmp_path):
    import typer
    from typer.testing import CliRunner

    from captionkit.train.tagger_cli import tagger_command

    app = typer.Typer()
    app.command("tagger")(tagger_command)
    app.command("other")(lambda: None)
    config = tmp_path / "tagger.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nepochs: 1\nbatch_size: 16\nreport_to: none\n"
        f"model:\n  backbone: test_resnet\n  image_size: 32\n"
        f"data:\n  train_dirs: [{small_shapes}]\n  num_workers: 0\n  val_fraction: 0.25\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["tagger", "--config", str(config), "--set", "seed=3"])
    assert result.exit_code == 0, result.output
    assert "best map" in result.output
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "seed: 3" in saved and "epochs: 1" in saved
    state = json.loads((tmp_path / "out" / "last" / "training_state.json").read_text())
    assert state["epoch"] == 1
    bad = CliRunner().invoke(app, ["tagger", "--config", str(config), "--set", "model.size=3"])
    assert bad.exit_code == 2 and "unknown key 'model.size'" in bad.output


def test_resume_restores_ema_accumulation_and_dropout_state(small_shapes, tmp_path):
    settings = tiny_settings(small_shapes, tmp_path / "full", "epochs=3", "ema_decay=0.9",
                             "gradient_accumulation_steps=2", "model.drop_path_rate=0.1",
                             "loss.name=asl", "save_total_limit=null")
    full = train_tagger(load_tagger_config(None, settings))
    resumed = train_tagger(load_tagger_config(None, [*settings, f"output_dir={tmp_path / 'resumed'}"]),
                           resume=full.output_dir / "checkpoints" / "epoch-0001")
    assert resumed.start_epoch == 1
    for key in ("map", "micro_f1", "val_loss", "train_loss"):
        assert resumed.final_metrics[key] == pytest.approx(full.final_metrics[key], abs=1e-4), key


def test_weights_of_one_step_are_written_once_and_linked_and_a_resume_from_them_ends_the_same(small_shapes, tmp_path):
    """At an epoch's end the best export, last, the epoch checkpoint and (after the last epoch) final hold
    the same weights (no EMA): serialised once, the others hard links. Folders replaced later keep
    what they share: a resume from epoch 1 (best then, best and last moved on since) ends the same."""
    import os

    from safetensors.torch import load_file

    settings = tiny_settings(small_shapes, tmp_path / "full", "epochs=3", "save_total_limit=null")
    full = train_tagger(load_tagger_config(None, settings))
    out, weights = full.output_dir, "model.safetensors"
    assert os.path.samefile(out / "last" / weights, out / "checkpoints" / "epoch-0003" / weights)
    assert os.path.samefile(out / "final" / weights, out / "last" / weights)  # from best or from last
    best_epoch = json.loads((out / "best" / "config.json").read_text())["captionkit"]["training"]["epoch"]
    assert os.path.samefile(out / "best" / weights, out / "last" / weights) == (best_epoch == 3)
    first = out / "checkpoints" / "epoch-0001"  # the first evaluation is always the best so far
    assert not os.path.samefile(first / weights, out / "last" / weights)
    resumed = train_tagger(load_tagger_config(None, [*settings, f"output_dir={tmp_path / 'resumed'}"]), resume=first)
    assert resumed.start_epoch == 1
    expected, actual = load_file(str(full.final_dir / weights)), load_file(str(resumed.final_dir / weights))
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    assert {key: value for key, value in resumed.final_metrics.items() if key != "epoch_seconds"} == {
        key: value for key, value in full.final_metrics.items() if key != "epoch_seconds"}


def test_rotation_keeps_the_best_and_the_newest_checkpoint(small_shapes, tmp_path):
    # bf16 here also checks that a second run in one process may change the precision.
    result = train_tagger(load_tagger_config(None, tiny_settings(
        small_shapes, tmp_path / "run", "epochs=4", "save_total_limit=1", "metric=val_loss",
        "model.image_size=16", "mixed_precision=bf16")))
    from captionkit.train.checkpoints import CheckpointManager

    manager = CheckpointManager(result.output_dir / "checkpoints", 1, "val_loss", greater_is_better=False)
    kept = {path.name for path in manager.all()}
    losses = {f"epoch-{i + 1:04d}": values["val_loss"] for i, values in enumerate(result.history)}
    best = min(losses, key=losses.get)
    assert kept == {best, "epoch-0004"}
    assert (result.output_dir / "last" / "training_state.json").is_file()
    best_config = json.loads((result.best_dir / "config.json").read_text())
    assert best_config["captionkit"]["training"]["epoch"] == int(best[-4:])


def test_pretrained_weights_from_a_local_file_or_a_clear_error_offline(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = timm.create_model("test_resnet")  # a 1000-class "pretrained" model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    model, _ = create_backbone(TaggerModelConfig(backbone="test_resnet", image_size=32,
                                                 pretrained=str(tmp_path / "weights.safetensors")), 5)
    assert model.num_classes == 5
    assert torch.equal(model.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    with pytest.raises(TaggerTrainingError, match="is not a file"):
        create_backbone(TaggerModelConfig(backbone="test_resnet", pretrained=str(tmp_path / "nope.pth")), 5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TaggerTrainingError, match="could not be downloaded.*model.pretrained: none"):
        create_backbone(TaggerModelConfig(backbone="resnet10t", pretrained="hub"), 5)
    with pytest.raises(TaggerTrainingError, match="not a timm model"):
        create_backbone(TaggerModelConfig(backbone="resnet_does_not_exist"), 5)


def test_missing_training_extras_give_install_hints(tmp_path, monkeypatch):
    import sys

    from captionkit.core.errors import MissingDependencyError
    from captionkit.train.captioner import CaptionerTrainConfig, train_captioner
    from captionkit.train.captioner_data import DatasetSpec

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    config = load_tagger_config(None, [f"output_dir={tmp_path / 'run'}", f"data.train_dirs=[{tmp_path}]",
                                       "export_onnx=true"])
    with pytest.raises(MissingDependencyError, match=r"captionkit\[onnx\]"):
        train_tagger(config)  # before any epoch is spent
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(MissingDependencyError, match=r"captionkit\[train\]"):
        train_captioner(CaptionerTrainConfig(model="m", output_dir=tmp_path / "c", data=[DatasetSpec(path=tmp_path)]))


def test_leftover_temp_folders_of_a_crashed_run_are_removed(tmp_path):
    from captionkit.train.tagger import _remove_leftovers

    (tmp_path / ".last.ck-tmp-1234").mkdir()
    (tmp_path / ".final.ck-old-5678").mkdir()
    (tmp_path / "best").mkdir()
    _remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
