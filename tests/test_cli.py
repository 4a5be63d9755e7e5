"""The command line, run as users run it: in a subprocess, killed, interrupted, offline.

What needs a process of its own (a kill, Ctrl-C, a clean interpreter) runs in one; reruns and output checks
call the console entry point in this process (tests/in_process.py), which saves an interpreter start each."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from captionkit.core.atomic import TEMP_MARKER
from tests.images import write_good_images
from tests.in_process import run_cli
from tests.run_state import committed as committed_results
from tests.run_state import wait_while_running

CLI = [sys.executable, "-m", "captionkit.cli"]
IMAGES = 24  # for the kill/Ctrl-C runs: 12 batches of 2, twice the 4-6 committed before the signal


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _caption_command(folder: Path, model: Path, *extra: str) -> list[str]:
    return [*CLI, "caption", str(folder), "--model", str(model), "--num-beams", "1", "--max-new-tokens", "12",
            "--batch-size", "2", "--workers", "2", *extra]


def _wait_for_progress(process: subprocess.Popen, folder: Path, at_least: int) -> None:
    wait_while_running(process, lambda: committed_results(folder) >= at_least)


def _check_complete(folder: Path, count: int) -> None:
    captions = sorted(folder.glob("*.txt"))
    assert len(captions) == count
    with sqlite3.connect(folder / ".captionkit" / "store.sqlite") as connection:
        rows = dict(connection.execute("SELECT record_id, text FROM results WHERE status = 'ok'").fetchall())
    assert len(rows) == count
    for path in captions:
        assert path.read_text() == rows[path.with_suffix(".png").name]
    leftovers = [p for p in folder.rglob("*") if TEMP_MARKER in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_kill_minus_nine_then_rerun_captions_each_image_exactly_once(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, IMAGES, suffix=".png")
    process = subprocess.Popen(_caption_command(folder, tiny_florence, "-q"), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_progress(process, folder, at_least=6)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = committed_results(folder)
    assert 6 <= committed < IMAGES
    # the rerun in this process (the kill is what needs a process of its own)
    rerun = run_cli(*_caption_command(folder, tiny_florence, "--progress", "json")[len(CLI):], env=_env())
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["event"] == "summary"
    assert summary["processed"] == IMAGES - committed  # only what was not committed is redone
    assert summary["reused"] == committed
    _check_complete(folder, IMAGES)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_batch_and_a_rerun_finishes(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, IMAGES, suffix=".png")
    process = subprocess.Popen(_caption_command(folder, tiny_florence, "--progress", "json"), env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_progress(process, folder, at_least=4)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["interrupted"] is True and 0 < summary["processed"] < IMAGES
    assert summary["processed"] == committed_results(folder)
    rerun = run_cli(*_caption_command(folder, tiny_florence, "-q")[len(CLI):], env=_env())
    assert rerun.returncode == 0, rerun.stderr
    _check_complete(folder, IMAGES)


def test_json_progress_and_human_summary(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 4)
    (folder / "bad.png").write_bytes(b"")
    result = run_cli(*_caption_command(folder, tiny_florence, "--progress", "json")[len(CLI):], env=_env())
    assert result.returncode == 1, result.stderr  # bad.png failed: some failed
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["event"] == "start" and events[0]["total"] == 5
    assert any(e["event"] == "progress" and "images_per_s" in e and "eta_s" in e for e in events)
    assert events[-1]["event"] == "summary" and events[-1]["failed"] == 1
    assert "bad.png" in events[-1]["errors"]
    human = run_cli(*_caption_command(folder, tiny_florence, "--existing", "overwrite")[len(CLI):], env=_env())
    assert "failed  bad.png" in human.stderr and "images/s" in human.stderr and "model busy" in human.stderr
    assert "Traceback" not in human.stderr


def test_unreachable_default_model_is_one_plain_sentence(tmp_path):
    write_good_images(tmp_path, 1)
    result = subprocess.run([*CLI, "caption", str(tmp_path), "-q"], env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--model LOCAL_FOLDER" in lines[0]
    assert "florence-community/Florence-2-base" in lines[0]


def test_models_lists_registered_backends():
    result = subprocess.run([*CLI, "models"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "florence2" in result.stdout and "florence-community/Florence-2-base" in result.stdout


def test_an_unusable_output_location_is_a_plain_error(tmp_path, tiny_florence):
    write_good_images(tmp_path, 1)
    (tmp_path / ".captionkit").write_text("a file where the store folder should be")
    result = subprocess.run(_caption_command(tmp_path, tiny_florence, "-q"), env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--output-dir" in result.stderr and ".captionkit" in result.stderr
