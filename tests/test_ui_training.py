"""Stop and resume for training, as the web UI's Train tab drives it: a stop hook checked between steps
(captioner: saves a checkpoint; tagger: drops the unfinished epoch), metrics to plot, samples to show."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from captionkit.train.captioner import CaptionerTrainConfig, train_captioner
from captionkit.train.captioner_data import DatasetSpec
from captionkit.train.tagger import load_tagger_config, train_tagger
from captionkit.ui import tasks
from captionkit.ui.jobs import JobManager

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class StopAfter:
    """A stop event that reads as set from its ``checks + 1``-th look on (the trainers look once per step)."""

    def __init__(self, checks: int) -> None:
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0


def captioner_config(base_model: Path, shapes: Path, output: Path, **overrides) -> CaptionerTrainConfig:
    settings = dict(model=str(base_model), output_dir=output, data=[DatasetSpec(path=shapes)], batch_size=4,
                    max_target_tokens=32, report_to=[], log_every_steps=1, max_steps=5, seed=2)
    settings.update(overrides)
    return CaptionerTrainConfig(**settings)


def test_a_stopped_captioner_run_saves_a_checkpoint_and_resuming_ends_where_an_unstopped_run_ends(
        base_model, shapes, tmp_path):
    from safetensors.torch import load_file

    whole = train_captioner(captioner_config(base_model, shapes, tmp_path / "whole"))
    stopped = train_captioner(captioner_config(base_model, shapes, tmp_path / "stopped"), stop=StopAfter(3))
    assert stopped.stopped and stopped.global_step == 3
    assert stopped.final_path == tmp_path / "stopped" / "checkpoints" / "step-0000003"
    assert (stopped.final_path / "training_state" / "trainer_state.json").is_file()
    assert not (tmp_path / "stopped" / "final").exists()
    resumed = train_captioner(captioner_config(base_model, shapes, tmp_path / "stopped"),
                              resume_from=stopped.final_path)
    assert not resumed.stopped and resumed.global_step == 5
    expected = load_file(whole.final_path / "model.safetensors")
    actual = load_file(resumed.final_path / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6)


def test_a_stopped_tagger_run_drops_the_unfinished_epoch_and_resumes_from_the_last_one(tmp_path):
    from captionkit.train.tagger_synthetic import write_shapes_dataset as write_tagged

    data = write_tagged(tmp_path / "tagged", 48, seed=5, size=(32, 32))
    settings = [f"output_dir={tmp_path / 'run'}", f"data.train_dirs=[{data}]", "model.backbone=test_resnet",
                "model.image_size=32", "epochs=2", "batch_size=16", "data.num_workers=0", "report_to=none",
                "data.val_fraction=0.25"]
    # 36 training images in batches of 16: 3 batches per epoch; the 5th look is epoch 2's second batch
    stopped = train_tagger(load_tagger_config(None, settings), stop=StopAfter(4))
    assert stopped.stopped and len(stopped.history) == 1
    assert (tmp_path / "run" / "last" / "training_state.json").is_file()
    assert not (tmp_path / "run" / "final").exists()
    resumed = train_tagger(load_tagger_config(None, settings), resume=tmp_path / "run")
    assert not resumed.stopped and resumed.start_epoch == 1 and (tmp_path / "run" / "final").is_dir()


def test_the_train_tab_job_stops_and_resumes_and_its_curves_and_samples_are_readable(base_model, shapes, tmp_path):
    manager = JobManager(log_file=tmp_path / "ui.log")
    output = tmp_path / "ui-run"
    form = [f"model={base_model}", f"data.0.path={shapes}", f"output_dir={output}", "batch_size=4",
            "max_target_tokens=32", "log_every_steps=1", "max_steps=400", "val_split=0.25", "eval_every_steps=2",
            "eval_max_samples=2", "sample_captions=2"]
    try:
        job = tasks.submit_training(manager, "captioner", None, form)
        deadline = time.monotonic() + 120
        while len(tasks.read_metrics(output)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        manager.stop(job.id)
        assert manager.wait(job, 120)
        assert job.state == "stopped" and "stopped at step" in job.message, job.message
        step = int(job.message.split("stopped at step ")[1].split(";")[0])
        assert 2 <= step < 400
        points = tasks.curve_rows(tasks.read_metrics(output))
        assert {"train/loss", "val/val_loss"} <= {point["metric"] for point in points}
        assert len(tasks.read_samples(output)) == 2  # (reference, generated) from TensorBoard
        resumed = tasks.submit_training(manager, "captioner", None, [*form, f"max_steps={step + 1}"], resume=True)
        assert manager.wait(resumed, 120) and resumed.state == "done", resumed.message
        assert f"trained {step + 1} steps" in resumed.message
    finally:
        manager.shutdown()


def test_training_form_errors_are_plain(tmp_path):
    from captionkit.core.errors import CaptionkitError
    from captionkit.train.config import ConfigError

    manager = JobManager(log_file=tmp_path / "ui.log")
    try:
        with pytest.raises(CaptionkitError, match="Give a config file or fill the form"):
            tasks.submit_training(manager, "captioner", "", [])
        with pytest.raises(CaptionkitError, match="no such config file"):
            tasks.submit_training(manager, "tagger", str(tmp_path / "missing.yaml"), [])
        with pytest.raises(ConfigError, match="batch_size"):
            tasks.submit_training(manager, "captioner", None, ["model=x", "output_dir=o", "data.0.path=d",
                                                                "batch_sise=2"])
        with pytest.raises(CaptionkitError, match="no checkpoint to resume from"):
            tasks.submit_training(manager, "captioner", None, ["model=x", f"output_dir={tmp_path}/o",
                                                                "data.0.path=d"], resume=True)
    finally:
        manager.shutdown()
