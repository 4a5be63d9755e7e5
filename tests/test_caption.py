"""End to end with a tiny random Florence-2: parity, resume, settings changes, bad input, OOM, exports."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as parquet
import pytest

import captionkit
from captionkit.core.store import Store
from tests.images import write_bad_corpus, write_good_images

FAST = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "workers": 2}


def reference_captions(model_folder, paths, task="<CAPTION>", **generate_options):
    """The plain seed-script loop: one image at a time through processor + generate."""
    from PIL import Image
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_folder)
    model = Florence2ForConditionalGeneration.from_pretrained(model_folder).eval()
    texts = {}
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs = processor(text=task, images=image, return_tensors="pt")
        output = model.generate(**inputs, do_sample=False, **generate_options)
        texts[path.name] = processor.batch_decode(output, skip_special_tokens=False)[0]
    return texts


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_results_equal_one_at_a_time_reference(tmp_path, tiny_florence, num_beams):
    paths = write_good_images(tmp_path / "images", 7)
    options = {**FAST, "num_beams": num_beams}
    summary = captionkit.caption(tmp_path / "images", model=str(tiny_florence), batch_size=3, **options)
    assert summary.processed == 7 and summary.failed == 0
    expected = reference_captions(tiny_florence, paths, max_new_tokens=12, num_beams=num_beams)
    with Store(tmp_path / "images") as store:
        got = {result.record_id: result.raw["text"] for result in store.iter_results("caption")}
    assert got == expected
    assert len(set(expected.values())) > 1  # the tiny model really says different things


def test_rerun_does_no_model_work_and_settings_changes_recaption(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 5)
    first = captionkit.caption(folder, model=str(tiny_florence), **FAST)
    assert (first.processed, first.reused) == (5, 0)
    captions = {p.name: p.read_text() for p in folder.glob("*.txt")}
    assert len(captions) == 5

    again = captionkit.caption(folder, model=str(tiny_florence), **FAST)
    assert (again.processed, again.reused, again.model_load_s) == (0, 5, 0.0)

    changed = captionkit.caption(folder, model=str(tiny_florence), **{**FAST, "max_new_tokens": 4})
    assert changed.processed == 5
    kept = captionkit.caption(folder, model=str(tiny_florence), keep_results=True, **FAST)
    assert (kept.processed, kept.reused) == (0, 5)

    prefixed = captionkit.caption(folder, model=str(tiny_florence), prefix="ohwx, ", suffix=" END",
                                  **{**FAST, "max_new_tokens": 4})
    assert prefixed.processed == 0 and prefixed.files_written == 5
    for path in folder.glob("*.txt"):
        text = path.read_text()
        assert text.startswith("ohwx, ") and text.endswith(" END")


def test_changed_image_is_captioned_again(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    paths = write_good_images(folder, 3)
    captionkit.caption(folder, model=str(tiny_florence), **FAST)
    write_good_images(folder, 1, start=9)[0].replace(paths[0])
    again = captionkit.caption(folder, model=str(tiny_florence), **FAST)
    assert (again.processed, again.reused) == (1, 2)


def test_bad_input_is_reported_per_file_and_the_rest_is_captioned(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    expectations = write_bad_corpus(folder)
    summary = captionkit.caption(folder, model=str(tiny_florence), batch_size=4, **FAST)
    bad = {name for name, expected in expectations.items() if expected}
    good = set(expectations) - bad
    assert set(summary.errors) == bad
    for name in bad:
        assert expectations[name] in summary.errors[name] and name in summary.errors[name]
    assert summary.processed == len(good)
    for name in good:
        assert (folder / name).with_suffix(".txt").exists(), name
    with Store(folder) as store:
        stored = {r.record_id: r for r in store.iter_results("caption")}
    assert {rid for rid, r in stored.items() if r.status == "error"} == bad
    assert any("first frame" in note for note in stored["animated.gif"].notes)
    # unchanged bad files are not retried (no model load), fixed ones are
    again = captionkit.caption(folder, model=str(tiny_florence), batch_size=4, **FAST)
    assert again.model_load_s == 0.0 and again.failed == again.failed_earlier == len(bad)
    write_good_images(folder, 1)[0].replace(folder / "text.jpg")
    fixed = captionkit.caption(folder, model=str(tiny_florence), batch_size=4, **FAST)
    assert fixed.processed == 1 and "text.jpg" not in fixed.errors


def test_out_of_memory_halves_the_batch_and_loses_nothing(tmp_path, tiny_florence, caplog):
    import torch

    folder = tmp_path / "images"
    write_good_images(folder, 9)
    captioner = captionkit.build_captioner(str(tiny_florence), max_new_tokens=12, num_beams=1)
    real = captioner.caption_batch
    sizes = []

    def limited(requests):
        sizes.append(len(requests))
        if len(requests) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(requests)

    captioner.caption_batch = limited
    with caplog.at_level(logging.WARNING, logger="captionkit"):
        summary = captionkit.caption(folder, captioner=captioner, batch_size=8, progress="quiet")
    assert summary.processed == 9 and summary.failed == 0
    assert summary.batch_size_final == 2
    assert max(sizes[1:]) <= 4 and sizes[-1] <= 2
    assert "Out of memory" in caplog.text


def test_a_model_failure_on_one_image_costs_only_that_image(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 6)
    captioner = captionkit.build_captioner(str(tiny_florence), max_new_tokens=12, num_beams=1)
    real = captioner.caption_batch
    poisoned = {}

    def fragile(requests):
        if any(float(request.payload.sum()) == poisoned["sum"] for request in requests):
            raise RuntimeError("kernel failed")
        return real(requests)

    captioner.load()
    from PIL import Image

    poisoned["sum"] = float(captioner.preprocess(Image.open(folder / "img003.png").convert("RGB")).sum())
    captioner.caption_batch = fragile
    summary = captionkit.caption(folder, captioner=captioner, batch_size=6, progress="quiet")
    assert summary.processed == 5 and list(summary.errors) == ["img003.png"]
    assert "kernel failed" in summary.errors["img003.png"]
    captioner.caption_batch = real  # a model failure is about the run, not the file: retried next time
    again = captionkit.caption(folder, captioner=captioner, batch_size=6, progress="quiet")
    assert (again.processed, again.reused, again.failed) == (1, 5, 0)


def test_exports_jsonl_and_parquet(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 3)
    (folder / "broken.png").write_bytes(b"")
    captionkit.caption(folder, model=str(tiny_florence), export=[tmp_path / "all.jsonl", tmp_path / "all.parquet"],
                       **FAST)
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["broken.png", "img000.png", "img001.png", "img002.png"]
    assert rows[0]["caption_status"] == "error" and "empty file" in rows[0]["caption_error"]
    assert rows[1]["caption"] == (folder / "img000.txt").read_text()
    assert rows[1]["caption_settings"]["task"] == "<CAPTION>"
    table = parquet.read_table(tmp_path / "all.parquet").to_pylist()
    assert [row["id"] for row in table] == [row["id"] for row in rows]
    assert table[1]["caption"] == rows[1]["caption"]
    assert captionkit.export(folder, tmp_path / "again.jsonl") == 4


def test_mirrored_output_dir_holds_captions_and_store(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder / "x", 1)
    write_good_images(folder / "y", 1)
    out = tmp_path / "out"
    captionkit.caption(folder, model=str(tiny_florence), output_dir=out, ext=".caption", **FAST)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.caption")) == [
        "x/img000.caption", "y/img000.caption"]
    assert (out / ".captionkit" / "store.sqlite").exists()
    assert (out / ".captionkit" / "run.log").read_text().count("summary") == 1
    assert not list(folder.rglob("*.caption"))


def test_detection_task_renders_labels_and_keeps_structure(tmp_path, tiny_florence):
    folder = tmp_path / "images"
    write_good_images(folder, 2)
    captionkit.caption(folder, model=str(tiny_florence), task="<OD>", **FAST)
    with Store(folder) as store:
        raws = [r.raw for r in store.iter_results("caption")]
    assert all(isinstance(raw["parsed"], dict) and "bboxes" in raw["parsed"] for raw in raws)


def test_task_options_are_validated(tiny_florence):
    with pytest.raises(captionkit.CaptionkitError, match="not a Florence-2 task"):
        captionkit.build_captioner(str(tiny_florence), task="<NOPE>")
    with pytest.raises(captionkit.CaptionkitError, match="needs --task-input"):
        captionkit.build_captioner(str(tiny_florence), task="<CAPTION_TO_PHRASE_GROUNDING>")
    grounding = captionkit.build_captioner(str(tiny_florence), task="<CAPTION_TO_PHRASE_GROUNDING>",
                                           task_input="a cat")
    assert grounding.fingerprint()["task_input"] == "a cat"


def test_render_captions_with_new_prefix_without_the_model(tmp_path, tiny_florence, monkeypatch):
    folder = tmp_path / "images"
    paths = write_good_images(folder, 3)
    captionkit.caption(folder, model=str(tiny_florence), **FAST)
    before = {p.name: p.with_suffix(".txt").read_text() for p in paths}
    import captionkit.models.florence2 as florence2

    monkeypatch.setattr(florence2.Florence2Captioner, "load", lambda self: pytest.fail("no model for render"))
    assert captionkit.render(folder, field="caption", prefix="ohwx, ") == 3
    for path in paths:
        assert path.with_suffix(".txt").read_text() == "ohwx, " + before[path.name]
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(captionkit.CaptionkitError, match="no captionkit store"):
        captionkit.render(tmp_path / "elsewhere")
