"""Rough edges of `captionkit train captioner|tagger`: offline models, checks before loading,
skipped images reported, nothing written by a failed run, list-index overrides, one
learning-rate spelling, and no peft/transformers FutureWarning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from captionkit.train.captioner import load_captioner_config
from captionkit.train.captioner_data import write_shapes_dataset as write_caption_shapes
from captionkit.train.cli import train_app
from captionkit.train.config import ConfigError
from captionkit.train.tagger import load_tagger_config, train_tagger
from captionkit.train.tagger_synthetic import write_shapes_dataset as write_tag_shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOT_CACHED = "captionkit-tests/not-a-cached-model"


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (conftest) and an empty hub cache: no model id is available."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def caption_folder(folder: Path, count: int = 5) -> Path:
    write_caption_shapes(folder, count, seed=3)
    return folder


def captioner_yaml(path: Path, model: str, data: str, output: Path, **extra) -> Path:
    settings = {"model": model, "output_dir": str(output), "mode": "full", "data": [{"path": data}],
                "batch_size": 3, "max_steps": 1, "max_target_tokens": 32, "report_to": [], **extra}
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def tagger_settings(data: Path, output: Path, *extra: str) -> list[str]:
    return [f"output_dir={output}", f"data.train_dirs=[{data}]", "model.backbone=test_resnet",
            "model.image_size=32", "epochs=1", "batch_size=4", "data.num_workers=0", "report_to=none",
            "data.val_fraction=0.25", *extra]


# -- 2 and 6: offline hub models fail in one sentence, data is checked first, nothing is written ----


def test_offline_hub_model_fails_in_one_line_and_writes_nothing(tmp_path, empty_hub_cache, monkeypatch):
    import captionkit.train.captioner as captioner

    monkeypatch.setattr(captioner, "_load_model", lambda *a, **k: pytest.fail("the model must not be loaded"))
    data = caption_folder(tmp_path / "images")
    config = captioner_yaml(tmp_path / "c.yaml", NOT_CACHED, str(data), tmp_path / "runs" / "out")
    result = CliRunner().invoke(train_app, ["captioner", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: Model 'captionkit-tests/not-a-cached-model' is not in the local cache")
    assert "--set model=LOCAL_FOLDER" in lines[0] and "--model" not in lines[0]
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "runs").exists()


def test_offline_tagger_hub_weights_fail_in_one_line_and_write_nothing(tmp_path, empty_hub_cache):
    import typer

    from captionkit.train.tagger_cli import tagger_command

    app = typer.Typer()
    app.command("tagger")(tagger_command)
    app.command("other")(lambda: None)
    data = write_tag_shapes(tmp_path / "tagged", 8, seed=2, size=(32, 32))
    output = tmp_path / "runs" / "tagger"
    config = tmp_path / "tagger.yaml"
    config.write_text(f"output_dir: {output}\ndata: {{train_dirs: [{data}]}}\n"
                      "model: {backbone: test_resnet, pretrained: hub}\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["tagger", "--config", str(config)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "not in the local cache and the Hugging Face Hub cannot be reached" in lines[0]
    assert "model.pretrained: none" in lines[0] and "Traceback" not in result.output
    assert not output.exists() and not (tmp_path / "runs").exists()


def test_data_paths_are_checked_before_any_model_loads(tmp_path, empty_hub_cache, monkeypatch):
    import captionkit.train.captioner as captioner
    import captionkit.train.preflight as preflight
    import captionkit.train.tagger as tagger

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was looked up before the data paths were checked")

    monkeypatch.setattr(captioner, "_load_model", must_not_load)
    monkeypatch.setattr(preflight, "check_hub_model", must_not_load)
    monkeypatch.setattr(tagger, "create_backbone", must_not_load)
    monkeypatch.setattr(tagger, "check_backbone", must_not_load)

    output = tmp_path / "runs" / "captioner"
    config = captioner_yaml(tmp_path / "c.yaml", NOT_CACHED, str(tmp_path / "no-such-folder"), output)
    result = CliRunner().invoke(train_app, ["captioner", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "no-such-folder: data set path not found" in result.output
    assert not output.exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"")  # an image without caption: no pairs at all
    result = CliRunner().invoke(train_app, ["captioner", "--config", str(config), "--set", f"data.0.path={empty}"])
    assert result.exit_code == 2 and "no image/caption pairs found" in result.output, result.output
    assert not output.exists()

    from captionkit.train.tagger_data import TaggerDataError

    tagger_output = tmp_path / "runs" / "tagger"
    with pytest.raises(TaggerDataError, match="training folder not found"):
        train_tagger(load_tagger_config(None, tagger_settings(tmp_path / "no-such-folder", tagger_output,
                                                              "model.pretrained=hub")))
    assert not tagger_output.exists() and not (tmp_path / "runs").exists()


def test_a_config_error_found_at_run_time_leaves_no_output_folder(tmp_path, tiny_florence):
    data = caption_folder(tmp_path / "images")
    output = tmp_path / "out"
    config = captioner_yaml(tmp_path / "c.yaml", str(tiny_florence), str(data), output,
                            val_split=0.99)  # leaves no training image
    result = CliRunner().invoke(train_app, ["captioner", "--config", str(config)])
    assert result.exit_code == 2 and "leaves no training images" in result.output, result.output
    assert not output.exists()


# -- 3: skipped images are counted, named and logged -------------------------------------------------


def test_captioner_reports_used_and_skipped_images(tmp_path, tiny_florence, caplog):
    data = caption_folder(tmp_path / "images", 5)
    (data / "00003.txt").unlink()
    (data / "00004.txt").write_text("  \n", encoding="utf-8")
    output = tmp_path / "out"
    config = captioner_yaml(tmp_path / "c.yaml", str(tiny_florence), "placeholder", output)
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        result = CliRunner().invoke(train_app, ["captioner", "-c", str(config), "--set", f"data.0.path={data}"])
    assert result.exit_code == 0, result.output
    log_file = output / "train.log"
    assert "trained 1 steps" in result.output and f"on 3 images (2 skipped: see {log_file})" in result.output
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training data:")]
    assert len(summary) == 1
    assert summary[0].startswith("training data: 3 images used, 2 skipped: 2 with no caption file or an empty "
                                 f"caption ({data / '00003.png'}, {data / '00004.png'})")
    assert str(log_file) in summary[0]
    logged = log_file.read_text(encoding="utf-8")
    assert "training data: 3 images used, 2 skipped" in logged
    for name in ("00003.png", "00004.png"):
        assert f"skipped (with no caption file or an empty caption): {data / name}" in logged


def test_console_shows_five_names_and_the_log_lists_all(tmp_path):
    from captionkit.train.runlog import log_skipped, run_log

    names = [f"img{i}.png" for i in range(7)]
    with run_log(tmp_path) as log_file:
        summary = log_skipped(10, {"with no caption": names}, log_file)
    assert "img0.png, img1.png, img2.png, img3.png, img4.png and 2 more" in summary
    logged = log_file.read_text(encoding="utf-8")
    assert all(f"skipped (with no caption): {name}" in logged for name in names)
    assert not logging.getLogger("captionkit").handlers  # the file handler is removed afterwards


def test_tagger_reports_used_and_skipped_images(tmp_path, caplog):
    data = write_tag_shapes(tmp_path / "tagged", 10, seed=2, size=(32, 32))
    images = sorted(data.glob("*.png"))
    images[1].with_suffix(".txt").unlink()
    images[2].with_suffix(".txt").write_text(" , ,\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        result = train_tagger(load_tagger_config(None, tagger_settings(data, tmp_path / "out")))
    assert result.images_used == 8
    assert result.skipped == {"with no .txt tag file": [str(images[1])],
                              "with an empty .txt tag file": [str(images[2])]}
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training data:")]
    assert len(summary) == 1 and summary[0].startswith(
        f"training data: 8 images used, 2 skipped: 1 with no .txt tag file ({images[1]}); "
        f"1 with an empty .txt tag file ({images[2]})")
    logged = result.log_file.read_text(encoding="utf-8")
    assert result.log_file == tmp_path / "out" / "train.log"
    assert f"skipped (with no .txt tag file): {images[1]}" in logged
    assert f"skipped (with an empty .txt tag file): {images[2]}" in logged


# -- 10: list indices in --set, and one learning-rate spelling ---------------------------------------


def test_set_indexes_lists_and_appends_at_the_end(tmp_path):
    config = captioner_yaml(tmp_path / "c.yaml", "m", "first", tmp_path / "out")
    loaded = load_captioner_config(config, ["data.0.path=changed", "data.0.repeats=2", "data.1.path=second"])
    assert [(spec.path, spec.repeats) for spec in loaded.data] == [(Path("changed"), 2), (Path("second"), 1)]
    loaded = load_captioner_config(None, ["model=m", "output_dir=o", "data.0.path=x", "val_data.0.path=v"])
    assert loaded.data[0].path == Path("x") and loaded.val_data[0].path == Path("v")
    with pytest.raises(ConfigError, match=r"'data' is a list with 1 entry; .*give an index: 0 to change an entry, "
                                          r"or 1 to append one"):
        load_captioner_config(config, ["data.3.path=x"])
    with pytest.raises(ConfigError, match=r"--set 'data.0.pth=x': unknown key 'data\[0\].pth'.*'data\[0\].path'"):
        load_captioner_config(config, ["data.0.pth=x"])
    with pytest.raises(ConfigError, match="'data' is a list"):
        load_captioner_config(config, ["data.path=x"])
    # YAML reads a bare `no` as false; for a choice that includes "no" it means "no"
    assert load_captioner_config(config, ["mixed_precision=no"]).mixed_precision == "no"


def test_tagger_reads_the_captioner_spelling_and_the_old_one(tmp_path, caplog):
    new = tmp_path / "new.yaml"
    new.write_text("output_dir: out\ndata: {train_dirs: [imgs]}\n"
                   "optimizer: {name: sgd, lr: 2.0e-4, weight_decay: 0.1, max_grad_norm: 2.0}\n", encoding="utf-8")
    old = tmp_path / "old.yaml"
    old.write_text("output_dir: out\ndata: {train_dirs: [imgs]}\n"
                   "optim: {optimizer: sgd, lr: 2.0e-4, weight_decay: 0.1, grad_clip: 2.0}\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        from_new = load_tagger_config(new)
    assert "now spelled" not in caplog.text
    with caplog.at_level(logging.WARNING):
        from_old = load_tagger_config(old)
    assert from_old == from_new
    assert from_new.optimizer.name == "sgd" and from_new.optimizer.lr == 2e-4
    assert "'optim' is now spelled 'optimizer'" in caplog.text
    assert "'optim.grad_clip' is now spelled 'optimizer.max_grad_norm'" in caplog.text
    assert load_tagger_config(new, ["optim.lr=1e-3"]) == load_tagger_config(old, ["optimizer.lr=1e-3"])
    assert load_tagger_config(new, ["optimizer.lr=1e-3"]).optimizer.lr == 1e-3
    both = tmp_path / "both.yaml"
    both.write_text("output_dir: out\ndata: {train_dirs: [imgs]}\noptimizer: {lr: 1.0e-3}\noptim: {lr: 2.0e-3}\n",
                    encoding="utf-8")
    with pytest.raises(ConfigError, match="both set 'optimizer.lr'.*keep only 'optimizer.lr'"):
        load_tagger_config(both)


# -- 8: no `is_gradient_checkpointing` FutureWarning from peft ---------------------------------------


def test_lora_training_and_adapter_loading_emit_no_checkpointing_future_warning(tmp_path, tiny_florence, recwarn):
    from captionkit.train.captioner import train_captioner

    data = caption_folder(tmp_path / "images", 4)
    config = load_captioner_config(captioner_yaml(
        tmp_path / "c.yaml", str(tiny_florence), str(data), tmp_path / "out", mode="lora",
        gradient_checkpointing=True, lora={"rank": 2, "alpha": 4}))
    result = train_captioner(config)
    import captionkit

    captionkit.build_captioner(str(tiny_florence), adapter=result.final_path).load()
    noisy = [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)
             and "checkpointing" in str(w.message)]
    assert noisy == []
