"""One exit-code contract for every command, and the circuit breaker that ends a run whose backend is down.

0 every item done or skipped as asked (or failures within --max-failures); 1 some failed;
2 usage or configuration error; 3 none succeeded, or stopped early; 130 Ctrl-C.

The commands run in this process through the console entry point (``captionkit.cli.main``, whose
``sys.exit`` code is the process's exit status): a fresh interpreter costs seconds of imports per
run. A real process proves that status once (the usage-error test below).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from captionkit.core.errors import CaptionkitError
from captionkit.core.exit_codes import FailureAllowance, parse_max_failures, run_exit_code
from captionkit.core.records import Record
from captionkit.core.store import Store
from captionkit.executors.local import LocalExecutor, RunOptions
from captionkit.steps.base import Prepared
from tests.images import write_good_images
from tests.in_process import run_cli
from tests.test_tag_pipeline import tagger_folder  # noqa: F401 - a fixture

CLI = [sys.executable, "-m", "captionkit.cli"]


def _env() -> dict[str, str]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        environment.pop(name, None)
    return environment


def _process(*arguments: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """The command line in a fresh interpreter, as users run it."""
    return subprocess.run([*CLI, *arguments], env=_env(), capture_output=True, text=True, timeout=timeout)


def _cli(*arguments: str) -> subprocess.CompletedProcess:
    """``captionkit ARGUMENTS`` through the console entry point in this process: its exit code and output."""
    return run_cli(*arguments, env=_env())


def _florence(folder: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli("caption", str(folder), "--model", str(model), "--num-beams", "1", "--max-new-tokens", "6",
                "--batch-size", "2", "--workers", "2", "-q", *extra)


def _mixed(folder: Path, good: int = 2) -> Path:
    """``good`` images and one corrupt file."""
    write_good_images(folder, good)
    (folder / "broken.png").write_bytes(b"not an image at all")
    return folder


def _all_bad(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index in range(2):
        (folder / f"bad{index}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def _closed_port() -> int:
    """A port nothing listens on (bound, then closed again)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _store_rows(folder: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(folder / ".captionkit" / "store.sqlite") as connection:
        return connection.execute("SELECT record_id, status, notes FROM results").fetchall()


# caption -----------------------------------------------------------------------------------
def test_caption_exit_codes(tmp_path, tiny_florence):
    good = tmp_path / "good"
    write_good_images(good, 2)
    assert _florence(good, tiny_florence).returncode == 0

    mixed = _mixed(tmp_path / "mixed")
    some = _florence(mixed, tiny_florence)
    assert some.returncode == 1, some.stderr
    assert "2 done" in some.stderr and "1 failed" in some.stderr and len(list(mixed.glob("img*.txt"))) == 2
    allowed = _florence(mixed, tiny_florence, "--max-failures", "1")  # the broken file failed before: 1 failure
    assert allowed.returncode == 0, allowed.stderr
    assert _florence(mixed, tiny_florence, "--max-failures", "50%").returncode == 0  # 1 of 3 tried

    none = _florence(_all_bad(tmp_path / "bad"), tiny_florence)
    assert none.returncode == 3, none.stderr
    assert "2 failed of 2" in none.stderr


@pytest.mark.parametrize("value", ["abc", "-1", "150%", "x%", "1.5", "", "nan%"])
def test_max_failures_values_are_checked(value):
    with pytest.raises(CaptionkitError, match=f"--max-failures {re.escape(repr(value))}: write a number"):
        parse_max_failures(value)


def test_max_failures_counts_and_percentages_of_the_items_tried():
    assert parse_max_failures("3") == FailureAllowance(count=3)
    half = parse_max_failures("50%")
    assert half.allows(1, 3) and half.allows(2, 4) and not half.allows(3, 4)
    assert run_exit_code(succeeded=2, failed=1, allowance=parse_max_failures("10%")) == 1
    assert run_exit_code(succeeded=2, failed=1, allowance=parse_max_failures("34%")) == 0
    assert run_exit_code(succeeded=0, failed=2, allowance=FailureAllowance()) == 3
    assert run_exit_code(succeeded=0, failed=0, allowance=FailureAllowance()) == 0  # all skipped as asked
    assert run_exit_code(succeeded=5, failed=0, allowance=FailureAllowance(), stopped_early=True) == 3
    assert run_exit_code(succeeded=5, failed=0, allowance=FailureAllowance(), interrupted=True) == 130


def test_a_bad_max_failures_value_is_a_usage_error_before_anything_runs(tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 1)
    for command in ("caption", "tag"):
        result = _process(command, str(folder), "--model", str(tmp_path / "no-model"), "--max-failures", "5 images")
        assert result.returncode == 2
        assert result.stderr.strip().startswith("error: --max-failures '5 images'"), result.stderr
    assert not (folder / ".captionkit").exists()


# the circuit breaker ---------------------------------------------------------------------------
def test_a_dead_port_stops_a_1000_image_run_early_in_one_sentence(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(1000):
        Image.new("RGB", (16, 12), (index % 256, 40, 90)).save(folder / f"img{index:04d}.png")
    port = _closed_port()
    result = _cli("caption", str(folder), "--backend", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                  "--model", "x", "-q")
    assert result.returncode == 3, result.stderr
    sentences = [line for line in result.stderr.splitlines() if line.startswith("Stopped early")]
    assert len(sentences) == 1, result.stderr
    assert "connection refused" in sentences[0] and f"127.0.0.1 port {port}" in sentences[0]
    assert "--base-url" in sentences[0]
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith("failed")]
    rows = _store_rows(folder)
    assert 8 <= len(rows) <= 64  # a batch or two, not 1,000 images tried one by one
    assert all(status == "error" and "model-error" in json.loads(notes) for _, status, notes in rows)
    # recorded as the run's failure, not the files': the next run tries them again
    again = _cli("caption", str(folder), "--backend", "openai", "--base-url",
                 f"http://127.0.0.1:{port}/v1", "--model", "x", "--progress", "json")
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert again.returncode == 3 and summary["failed_earlier"] == 0 and summary["stopped_early"]


def test_an_unresolvable_host_stops_the_run_early(tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 40)
    result = _cli("caption", str(folder), "--backend", "openai", "--base-url",
                  "http://captionkit-no-such-host.invalid:8000/v1", "--model", "x", "-q")
    assert result.returncode == 3, result.stderr
    sentences = [line for line in result.stderr.splitlines() if line.startswith("Stopped early")]
    assert len(sentences) == 1 and "cannot resolve the host name 'captionkit-no-such-host.invalid'" in sentences[0]
    assert len(_store_rows(folder)) < 40


class _BrokenModelStep:
    """A local model that raises the same error on every batch (a broken install, a wrong config)."""

    field = "caption"

    def __init__(self, batch_size: int = 4, fail_first: int | None = None) -> None:
        self.batch_size = batch_size
        self.calls = 0
        self.fail_first = fail_first  # fail only the first N calls, then work

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "broken"}

    def render_settings(self) -> dict[str, Any]:
        return {}

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def prepare(self, record: Record) -> Prepared:
        return Prepared(record, record.id, (1, 1), record.id)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        self.calls += 1
        if self.fail_first is None or self.calls <= self.fail_first:
            raise RuntimeError("CUDA error: device-side assert triggered")
        return [f"text of {item.record.id}" for item in items]

    def render(self, raw: Any) -> str:
        return str(raw)

    def recover_from_oom(self) -> None: ...

    def use_device(self, device: str) -> None:
        """Runs anywhere: it is the executor under test, not the model."""


def test_a_local_model_failing_every_batch_for_the_same_reason_stops_the_run(tmp_path):
    records = [Record(f"r{index:03d}", None) for index in range(200)]
    with Store(tmp_path) as store:
        summary = LocalExecutor(RunOptions(workers=1)).run(_BrokenModelStep(), records, store, None)
        assert summary.stopped_early and "device-side assert" in summary.stopped_early
        assert summary.interrupted and summary.processed == 0
        assert 16 <= summary.failed < 40  # about two batches' worth, not 200
        stored = list(store.iter_results("caption"))
        assert all(result.status == "error" and "model-error" in result.notes for result in stored)


def test_the_breaker_stops_the_devices_executor_too(tmp_path):
    from captionkit.executors.devices import DeviceExecutor

    records = [Record(f"r{index:03d}", None) for index in range(400)]
    with Store(tmp_path) as store:
        runner = DeviceExecutor(RunOptions(workers=1), devices=["cpu", "cpu"])
        summary = runner.run(_BrokenModelStep(), records, store, None)
    assert summary.stopped_early and "device-side assert" in summary.stopped_early
    assert 16 <= summary.failed < 400 and summary.processed == 0


def test_the_breaker_stops_the_ray_executor_too(tmp_path, shared_ray):
    import ray

    from captionkit.executors import make_executor

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors get the test step
    runner = make_executor("ray", RunOptions(workers=1), ray_address=shared_ray,
                           ray_actors=1, ray_cpus_per_actor=0.5, ray_decode_cpus=0.5)
    records = [Record(f"r{index:03d}", None) for index in range(400)]
    with Store(tmp_path) as store:
        summary = runner.run(_BrokenModelStep(), records, store, None)
    assert summary.stopped_early and "device-side assert" in summary.stopped_early
    assert 16 <= summary.failed < 400 and summary.processed == 0


def test_failures_that_end_do_not_stop_the_run(tmp_path):
    records = [Record(f"r{index:03d}", None) for index in range(60)]
    with Store(tmp_path) as store:
        summary = LocalExecutor(RunOptions(workers=1)).run(_BrokenModelStep(batch_size=4, fail_first=3), records,
                                                           store, None)
    assert summary.stopped_early is None and not summary.interrupted
    assert summary.processed + summary.failed == 60 and summary.processed > 0


# tag -------------------------------------------------------------------------------------------
def test_tag_exit_codes(tmp_path, tagger_folder):  # noqa: F811 - the fixture
    def tag(folder: Path, *extra: str) -> subprocess.CompletedProcess:
        return _cli("tag", str(folder), "--model", str(tagger_folder), "--device", "cpu", "-q", *extra)

    mixed = _mixed(tmp_path / "mixed")
    some = tag(mixed)
    assert some.returncode == 1, some.stderr
    assert tag(mixed, "--max-failures", "1").returncode == 0
    none = tag(_all_bad(tmp_path / "bad"))
    assert none.returncode == 3, none.stderr


# run (pipeline) -------------------------------------------------------------------------------
def _pipeline(tmp_path: Path, model: Path, images: str) -> Path:
    data = {"input": images, "base_folder": "work", "save_folder": "out", "steps": [
        {"type": "captioner", "name": "florence", "config": {"model": str(model), "num_beams": 1, "max_new_tokens": 6}},
        {"type": "template", "name": "final", "config": {"template": "x {florence}"}},
    ]}
    path = tmp_path / f"{images}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_run_exit_codes_with_only_step(tmp_path, tiny_florence):
    """All done → 0 is proven by test_pipeline.py's command-line runs."""
    _mixed(tmp_path / "mixed")
    mixed = _pipeline(tmp_path, tiny_florence, "mixed")
    some = _cli("run", str(mixed), "--only-step", "florence", "-q")
    assert some.returncode == 1, some.stderr
    assert _cli("run", str(mixed), "--only-step", "florence", "--max-failures", "1", "-q").returncode == 0
    _all_bad(tmp_path / "bad")
    none = _cli("run", str(_pipeline(tmp_path, tiny_florence, "bad")), "--only-step", "florence", "-q")
    assert none.returncode == 3, none.stderr
    usage = _cli("run", str(mixed), "--max-failures", "many")
    assert usage.returncode == 2 and "--max-failures 'many'" in usage.stderr


# inspect ---------------------------------------------------------------------------------------
def test_inspect_on_an_empty_folder_says_so_like_caption(tmp_path, tiny_florence):
    empty = tmp_path / "empty"
    empty.mkdir()
    inspected = _cli("inspect", str(empty), "-q", "--json", str(tmp_path / "report.json"))
    captioned = _cli("caption", str(empty), "--model", str(tiny_florence), "-q")
    assert inspected.returncode == captioned.returncode == 2
    assert inspected.stderr.strip() == captioned.stderr.strip()
    assert "no images found" in inspected.stderr and len(inspected.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "report.json").exists()


def test_inspect_of_only_unreadable_images_exits_3(tmp_path):
    """0 (findings alone) and 1 (--fail-on) are proven in test_inspection.py."""
    unreadable = _cli("inspect", str(_all_bad(tmp_path / "bad")), "-q", "--no-near-duplicates")
    assert unreadable.returncode == 3, unreadable.stderr
    assert "none of the 2 images could be read" in unreadable.stderr


def test_help_states_the_contract():
    for command in ([], ["caption"], ["tag"], ["run"]):
        shown = _cli(*command, "--help").stdout
        assert "Exit codes" in " ".join(shown.split()), command
    assert "3 no image could be read" in " ".join(_cli("inspect", "--help").stdout.split())


# train -----------------------------------------------------------------------------------------
def _spoil_images(folder: Path) -> None:
    for image in folder.glob("*.png"):
        image.write_bytes(b"not an image")


@pytest.mark.usefixtures("one_torch_thread")
def test_training_on_only_unreadable_images_exits_3_and_writes_no_model(tmp_path, tiny_florence):
    from typer.testing import CliRunner

    from captionkit.train.captioner_data import write_shapes_dataset as write_caption_shapes
    from captionkit.train.cli import train_app
    from captionkit.train.tagger_synthetic import write_shapes_dataset as write_tag_shapes

    captions = tmp_path / "captions"
    write_caption_shapes(captions, 4, seed=3)
    _spoil_images(captions)
    config = tmp_path / "captioner.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_florence), "output_dir": str(tmp_path / "captioner"), "mode": "full",
        "data": [{"path": str(captions)}], "batch_size": 2, "max_steps": 1, "max_target_tokens": 32,
        "report_to": []}))
    result = CliRunner().invoke(train_app, ["captioner", "--config", str(config)])
    assert result.exit_code == 3, result.output
    assert "no training image could be read" in result.output
    assert not (tmp_path / "captioner" / "final").exists()

    tags = tmp_path / "tags"
    write_tag_shapes(tags, 8, seed=2, size=(32, 32))
    _spoil_images(tags)
    config = tmp_path / "tagger.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "tagger"), "epochs": 1, "batch_size": 4, "report_to": "none",
        "data": {"train_dirs": [str(tags)], "num_workers": 0, "val_fraction": 0.25},
        "model": {"backbone": "test_resnet", "image_size": 32}}))
    result = CliRunner().invoke(train_app, ["tagger", "--config", str(config)])
    assert result.exit_code == 3, result.output
    assert "no training image could be read" in result.output
    assert not (tmp_path / "tagger" / "final").exists()


def test_a_ray_run_that_stopped_moving_exits_3_like_any_run_stopped_early():
    from captionkit.core.exit_codes import exit_code_for
    from captionkit.executors.local import RunSummary
    from captionkit.executors.ray_executor import RayStalledError

    assert exit_code_for(RayStalledError("no progress for 30 s", RunSummary(field="caption"))) == 3
