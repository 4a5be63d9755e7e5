"""What a new user hit first: file modes, truncated PNGs, empty folders, noisy output, help, precision."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import captionkit
from captionkit.core.atomic import atomic_write_text, current_umask
from captionkit.core.errors import CaptionkitError, ImageLoadError
from captionkit.core.images import load_image
from tests.images import write_good_images
from tests.in_process import run_cli

CLI = [sys.executable, "-m", "captionkit.cli"]
FAST = {"max_new_tokens": 8, "num_beams": 1, "progress": "quiet"}


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_new_files_get_the_mode_open_would_give(tmp_path):
    target = tmp_path / "new.txt"
    atomic_write_text(target, "hello")
    with open(tmp_path / "plain.txt", "w") as stream:
        stream.write("hello")
    assert _mode(target) == _mode(tmp_path / "plain.txt") == 0o666 & ~current_umask()


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "user.txt"
    target.write_text("mine")
    os.chmod(target, 0o640)
    atomic_write_text(target, "ours")
    assert _mode(target) == 0o640 and target.read_text() == "ours"


def test_append_keeps_the_users_caption_file_mode(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 2)
    caption_file = folder / "img000.txt"
    caption_file.write_text("my words")
    os.chmod(caption_file, 0o644)
    captionkit.caption(folder, model=str(tiny_florence), existing="append", **FAST)
    assert caption_file.read_text().startswith("my words, ")
    assert _mode(caption_file) == 0o644
    assert _mode(folder / "img001.txt") == 0o666 & ~current_umask()


def test_a_truncated_png_gets_the_plain_truncated_message(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    message = str(caught.value)
    assert "truncated or corrupt image data" in message and "Re-export or re-download" in message
    assert "captionkit developers" not in message


def test_an_empty_folder_is_an_error_and_leaves_no_store(tmp_path, tiny_florence):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / ".hidden.png").write_bytes(b"x")
    with pytest.raises(CaptionkitError) as caught:
        captionkit.caption(folder, model=str(tiny_florence), **FAST)
    message = str(caught.value)
    assert "no images found" in message and ".png" in message and "--include-hidden" in message
    assert not (folder / ".captionkit").exists()


def test_the_cli_exits_non_zero_on_an_empty_folder(tmp_path, tiny_florence):
    folder = tmp_path / "empty"
    folder.mkdir()
    done = run_cli("caption", str(folder), "--model", str(tiny_florence), env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert "no images found" in done.stderr and "Traceback" not in done.stderr
    assert not (folder / ".captionkit").exists()


def test_a_run_that_fails_before_its_first_image_leaves_no_store(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 2)
    captioner = captionkit.build_captioner(str(tiny_florence), num_beams=1, max_new_tokens=8)

    def broken_load():
        raise CaptionkitError("the model cannot be loaded")

    captioner.load = broken_load
    with pytest.raises(CaptionkitError):
        captionkit.caption(folder, captioner=captioner, progress="quiet")
    assert not (folder / ".captionkit").exists()


def test_every_run_that_creates_a_store_says_so_in_its_log(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 1)
    captionkit.caption(folder, model=str(tiny_florence), **FAST)
    log = (folder / ".captionkit" / "run.log").read_text()
    assert "created the captionkit store" in log


def test_dtype_is_part_of_the_fingerprint(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 2)
    first = captionkit.caption(folder, model=str(tiny_florence), dtype="fp32", **FAST)
    assert first.processed == 2
    same = captionkit.caption(folder, model=str(tiny_florence), dtype="auto", **FAST)  # auto is fp32 on a CPU
    assert same.reused == 2 and same.processed == 0
    other = captionkit.caption(folder, model=str(tiny_florence), dtype="bf16", **FAST)
    assert other.processed == 2 and other.reused == 0


def test_summary_names_each_failed_file_once_and_collisions_once(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 1)
    Image.new("RGB", (20, 20)).save(folder / "pair.png")
    Image.new("RGB", (20, 20)).save(folder / "pair.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    done = run_cli("caption", str(folder), "--model", str(tiny_florence), "--num-beams", "1", "--max-new-tokens", "8",
                   "--quiet", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, done.stderr  # broken.png failed: some failed
    failure_lines = [line for line in done.stderr.splitlines() if "broken.png" in line]
    assert len(failure_lines) == 1 and failure_lines[0].count("broken.png") == 1
    assert sum("pair.txt" in line for line in done.stderr.splitlines()) == 1


def test_version_and_help_without_type_labels():
    version = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"captionkit {captionkit.__version__}"
    helped = subprocess.run([*CLI, "caption", "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "200"})
    assert helped.returncode == 0
    assert "<bool>" not in helped.stdout and "<int>" not in helped.stdout and "<str>" not in helped.stdout
    assert "--batch-size" in helped.stdout and "INTEGER" in helped.stdout


@pytest.mark.parametrize("later", ["skip", "fill-empty"])
def test_text_appended_to_a_users_file_survives_later_runs(tmp_path, tiny_florence, later):
    folder = tmp_path / "images"
    write_good_images(folder, 1)
    caption_file = folder / "img000.txt"
    caption_file.write_text("my hand-written caption")
    captionkit.caption(folder, model=str(tiny_florence), existing="append", **FAST)
    appended = caption_file.read_text()
    assert appended.startswith("my hand-written caption, ")
    captionkit.caption(folder, model=str(tiny_florence), existing=later, **FAST)
    assert caption_file.read_text() == appended
    captionkit.caption(folder, model=str(tiny_florence), existing=later, prefix="ohwx ", **FAST)
    assert caption_file.read_text().startswith("my hand-written caption, ohwx ")
    captionkit.caption(folder, model=str(tiny_florence), existing="overwrite", **FAST)
    assert "hand-written" not in caption_file.read_text()


def test_a_failed_first_run_removes_the_output_dir_it_created(tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 1)
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "florence2"}')
    with pytest.raises(CaptionkitError):
        captionkit.caption(folder, model=str(broken), output_dir=tmp_path / "new" / "out", **FAST)
    assert not (tmp_path / "new").exists()
