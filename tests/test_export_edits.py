"""Exports give what the user sees: a caption edited in Review (or by hand) with a flag and the model's text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as parquet

import captionkit
from captionkit.ui.dataset import Dataset
from tests.images import write_good_images

SETTINGS = {"num_beams": 1, "max_new_tokens": 6, "batch_size": 2, "progress": "quiet", "workers": 2}


def _export(location: Path, destination: Path, cli: bool = True) -> None:
    if not cli:
        captionkit.export(location, destination)
        return
    env = {**os.environ, "PYTHONPATH": str(Path(captionkit.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "captionkit.cli", "export", str(location), str(destination)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr


def _rows(path: Path) -> dict[str, dict]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    else:
        rows = parquet.read_table(path).to_pylist()
    return {row["id"]: row for row in rows}


def test_export_writes_the_edited_caption_marks_it_and_keeps_the_models(tmp_path, tiny_florence):
    folder = tmp_path / "photos"
    write_good_images(folder, 3)
    captionkit.caption(folder, model=str(tiny_florence), **SETTINGS)
    model_texts = {path.name: path.read_text() for path in folder.glob("*.txt")}
    Dataset(folder).save_caption("img001.png", "my own words about this picture")  # what Review's Save calls
    (folder / "img002.txt").write_text("edited by hand\n", encoding="utf-8")
    rerun = captionkit.caption(folder, model=str(tiny_florence), **SETTINGS)  # edits survive a rerun
    assert rerun.reused == 3
    for destination in (tmp_path / "all.jsonl", tmp_path / "all.parquet", tmp_path / "shards"):
        _export(folder, destination, cli=destination.suffix == ".jsonl")
        rows = _rows(destination / "part-00000.parquet" if destination.name == "shards" else destination)
        assert rows["img001.png"]["caption"] == "my own words about this picture"
        assert rows["img001.png"]["caption_edited"] is True
        assert rows["img001.png"]["caption_model"] == model_texts["img001.txt"]
        assert (rows["img002.png"]["caption"], rows["img002.png"]["caption_edited"]) == ("edited by hand", True)
        assert rows["img000.png"]["caption"] == rows["img000.png"]["caption_model"] == model_texts["img000.txt"]
        assert rows["img000.png"]["caption_edited"] is False


def test_export_after_undo_and_with_output_dir(tmp_path, tiny_florence):
    images = tmp_path / "photos"
    write_good_images(images, 2)
    out = tmp_path / "captions"
    captionkit.caption(images, model=str(tiny_florence), output_dir=out, **SETTINGS)
    dataset = Dataset(images, output_dir=out)
    dataset.save_caption("img000.png", "a better caption")
    _export(out, tmp_path / "edited.jsonl", cli=False)
    assert _rows(tmp_path / "edited.jsonl")["img000.png"]["caption"] == "a better caption"
    dataset.undo()
    _export(out, tmp_path / "undone.jsonl", cli=False)
    row = _rows(tmp_path / "undone.jsonl")["img000.png"]
    assert row["caption_edited"] is False and row["caption"] == row["caption_model"] == (out / "img000.txt").read_text()
