"""`captionkit tag` and `captionkit render` on the core pipeline: parity, stored scores, re-rendering."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import captionkit
from captionkit.core.images import load_image
from captionkit.core.store import Store
from captionkit.core.tagging import TagOptions, render_tags, select_tags
from captionkit.models.taggers import load_tagger
from captionkit.steps.tagger import decode_scores
from tests.images import write_good_images
from tests.in_process import run_cli
from tests.test_taggers_formats import SIZE, TAG_ROWS, tiny_model, write_tags_csv


@pytest.fixture(scope="module")
def tagger_folder(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("wd-timm-pipeline")
    model = tiny_model(5)
    config = {
        "architecture": "test_convnext", "num_classes": len(TAG_ROWS), "model_args": {},
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "interpolation": "bicubic", "crop_pct": 1.0,
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": len(TAG_ROWS)},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    write_tags_csv(folder / "selected_tags.csv")
    return folder


def _reference(folder, paths, options):
    """One image at a time through the loaded tagger, then the selection functions."""
    tagger = load_tagger(str(folder), device="cpu")
    texts = {}
    for path in paths:
        scores = tagger.predict(tagger.preprocess(load_image(path).image)[None])[0]
        selected = select_tags(scores, tagger.tags, tagger.categories, options, tagger.default_thresholds)
        texts[path.name] = render_tags(selected, options)
    return texts


def test_batched_tagging_matches_one_at_a_time_and_stores_every_score(tmp_path, tagger_folder):
    paths = write_good_images(tmp_path / "images", 7)
    options = TagOptions(general_threshold=0.4, character_threshold=0.4, include_rating=True)
    summary = captionkit.tag(tmp_path / "images", model=str(tagger_folder), options=options, batch_size=3,
                             device="cpu")
    assert summary.processed == 7 and summary.failed == 0
    expected = _reference(tagger_folder, paths, options)
    got = {path.name: path.with_suffix(".txt").read_text() for path in paths}
    assert got == expected
    assert any(text for text in got.values())
    with Store(tmp_path / "images") as store:
        raw = next(store.iter_results("tags")).raw
    assert decode_scores(raw["scores"]).shape == (len(TAG_ROWS),)


def test_render_rewrites_with_new_options_without_the_model(tmp_path, tagger_folder, monkeypatch):
    folder = tmp_path / "images"
    paths = write_good_images(folder, 4)
    captionkit.tag(folder, model=str(tagger_folder), device="cpu")
    again = captionkit.tag(folder, model=str(tagger_folder), device="cpu")
    assert (again.processed, again.reused, again.model_load_s) == (0, 4, 0.0)

    import captionkit.models.taggers as taggers

    monkeypatch.setattr(taggers, "load_tagger", lambda *a, **k: pytest.fail("render must not load the model"))
    options = captionkit.tag_options(general_threshold=0.0, character_threshold=0.0, order="name",
                                     always_first=["ohwx"], blacklist=["smile"], separator=" | ")
    written = captionkit.render(folder, field="tags", options=options)
    assert written == 4
    for path in paths:
        text = path.with_suffix(".txt").read_text()
        parts = text.split(" | ")
        assert parts[0] == "ohwx" and "smile" not in parts
        assert parts[1:] == sorted(parts[1:], key=str.lower)
        assert "long hair" in parts and "^_^" in parts  # every general tag passes a zero threshold


def test_print_mode_lists_image_tag_score(tmp_path, tagger_folder):
    folder = tmp_path / "images"
    write_good_images(folder, 2)
    stream = io.StringIO()
    captionkit.tag(folder, model=str(tagger_folder), device="cpu", print_scores=True, print_stream=stream,
                   write_sidecars=False, options=TagOptions(general_threshold=0.0))
    lines = stream.getvalue().splitlines()
    assert lines and all(line.count(": ") == 2 for line in lines)
    image, name, score = lines[0].split(": ")
    assert image == "img000.png" and 0.0 <= float(score) <= 1.0
    assert not list(folder.glob("*.txt"))


def test_tags_append_to_captions_from_another_step(tmp_path, tagger_folder, tiny_florence):
    folder = tmp_path / "images"
    paths = write_good_images(folder, 2)
    captionkit.caption(folder, model=str(tiny_florence), max_new_tokens=8, num_beams=1, prefix="photo: ")
    skipped = captionkit.tag(folder, model=str(tagger_folder), device="cpu")
    assert skipped.skipped == 2  # the caption step's files are not the tag step's to replace
    captionkit.tag(folder, model=str(tagger_folder), device="cpu", existing="append",
                   options=TagOptions(general_threshold=0.0))
    text = paths[0].with_suffix(".txt").read_text()
    assert text.startswith("photo: ") and "long hair" in text


def test_cli_tag_print_no_write(tmp_path, tagger_folder):
    folder = tmp_path / "images"
    write_good_images(folder, 2)
    result = run_cli("tag", str(folder), "--model", str(tagger_folder), "--print", "--no-write",  # in this process
                     "--general-threshold", "0", "--threshold", "character=0", "--replace", "long_hair=hair",
                     "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "img000.png: hair: " in result.stdout
    assert not list(folder.glob("*.txt"))
    scores = [float(line.rsplit(": ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("img000")]
    assert scores == sorted(scores, reverse=True) and np.all(np.asarray(scores) >= 0)


def test_render_never_writes_a_file_two_images_share(tmp_path, tagger_folder):
    folder = tmp_path / "images"
    write_good_images(folder, 1)
    (folder / "img000.jpg").write_bytes(b"")  # fails to decode, but still shares img000.txt
    summary = captionkit.tag(folder, model=str(tagger_folder), device="cpu")
    assert summary.failed == 1 and summary.collisions
    captionkit.render(folder, field="tags", options=TagOptions(general_threshold=0.0))
    assert not (folder / "img000.txt").exists()
