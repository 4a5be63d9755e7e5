"""`--devices`: one worker process per device over disjoint shards, merged into one store and one summary.

Two CPU worker processes stand in for two GPUs (``--devices cpu,cpu``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import captionkit
from captionkit.core.errors import CaptionkitError
from captionkit.models.florence2 import Florence2Captioner, GenerationSettings
from tests.images import write_good_images
from tests.in_process import run_cli
from tests.run_state import ExitOnce, copy_of, state

pytestmark = pytest.mark.slow  # left out of the quick subset (-m 'not slow')

IMAGES = 8  # two batches of 2 per worker: the second is where ExitOnce ends its worker
FAST = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "workers": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_florence):
    source = tmp_path_factory.mktemp("devices-corpus") / "images"
    write_good_images(source, IMAGES)
    (source / "broken.png").write_bytes(b"")
    local = copy_of(source, source.parent / "local")
    summary = captionkit.caption(local, model=str(tiny_florence), batch_size=2, **FAST)
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    return source, local


def test_two_workers_give_the_local_results_and_one_summary(tmp_path, corpus, tiny_florence):
    source, local = corpus
    folder = copy_of(source, tmp_path / "images")
    # The command line in this process (the worker processes are what --devices is about, not the parent's)
    result = run_cli("caption", str(folder), "--model", str(tiny_florence), "--num-beams", "1", "--max-new-tokens",
                     "12", "--batch-size", "2", "--workers", "2", "--devices", "cpu,cpu", "--progress", "json")
    assert result.returncode == 1, result.stderr  # broken.png failed: some failed
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["event"] for event in events].count("summary") == 1
    assert [event["event"] for event in events].count("start") == 1
    summary = events[-1]
    assert (summary["processed"], summary["failed"], summary["files_written"]) == (IMAGES, 1, IMAGES)
    assert summary["total"] == IMAGES + 1 and summary["batch_size_final"] == 2
    assert state(folder) == state(local)


def test_a_dead_worker_is_started_again_and_every_image_saved_once(tmp_path, corpus, tiny_florence):
    source, local = corpus
    folder = copy_of(source, tmp_path / "images")
    marker = tmp_path / "died"
    captioner = ExitOnce(marker, model=str(tiny_florence), generation=GenerationSettings(max_new_tokens=12,
                                                                                         num_beams=1))
    events = []
    summary = captionkit.caption(folder, captioner=captioner, batch_size=2, devices=["cpu", "cpu"], workers=2,
                                 listener=events.append)
    assert marker.exists()
    assert (summary.processed, summary.failed) == (IMAGES, 1)
    assert [event for event in events if event["event"] == "progress"][-1]["done"] == IMAGES
    assert state(folder) == state(local)


class NotesImports(Florence2Captioner):
    """Each worker writes which heavy packages its process had imported when its model load began."""

    def __init__(self, folder: Path, **options) -> None:
        super().__init__(**options)
        self.folder = str(folder)

    def load(self) -> None:
        imported = [name for name in ("torch", "transformers", "torchvision") if name in sys.modules]
        Path(self.folder, str(os.getpid())).write_text(json.dumps(imported))
        super().load()


def test_workers_start_at_the_model_load_not_at_import_torch(tmp_path, tiny_florence):
    """Workers are forked from a server that imported torch, transformers and torchvision once; a spawned worker
    imports them itself (3-4 s of CPU each, again for every restart)."""
    write_good_images(tmp_path / "images", 4)
    notes = tmp_path / "notes"
    notes.mkdir()
    captioner = NotesImports(notes, model=str(tiny_florence), generation=GenerationSettings(max_new_tokens=4,
                                                                                            num_beams=1))
    summary = captionkit.caption(tmp_path / "images", captioner=captioner, batch_size=2, devices=["cpu", "cpu"],
                                 workers=1, progress="quiet")
    assert summary.processed == 4
    assert [json.loads(path.read_text()) for path in notes.iterdir()] == [["torch", "transformers", "torchvision"]] * 2


def test_device_options_are_checked_before_anything_runs(tmp_path, tiny_florence):
    write_good_images(tmp_path, 1)
    with pytest.raises(CaptionkitError, match="--devices gpu0"):
        captionkit.caption(tmp_path, model=str(tiny_florence), devices="gpu0", **FAST)
    with pytest.raises(CaptionkitError, match="--devices is for one machine"):
        captionkit.caption(tmp_path, model=str(tiny_florence), devices="cpu,cpu", executor="ray", **FAST)
    with pytest.raises(CaptionkitError, match="--executor"):
        captionkit.caption(tmp_path, model=str(tiny_florence), executor="spark", **FAST)
    server = captionkit.build_captioner(backend="openai", model="m", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(CaptionkitError, match="does not run a model on this machine's devices"):
        captionkit.caption(tmp_path, captioner=server, devices="cpu,cpu", progress="quiet")
    assert not (tmp_path / ".captionkit").exists()
