"""The web UI's data layer: forms that match the CLI, the Review tab's paging, lazy thumbnails, filters,
and caption edits that later runs respect (with undo). No browser needed."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import captionkit
from captionkit import api, cli
from captionkit.core.errors import CaptionkitError
from captionkit.core.store import Store
from captionkit.ui import exposure_warning, forms, parse_auth
from captionkit.ui.dataset import Dataset
from tests.images import write_good_images

# --- forms --------------------------------------------------------------------------------------------

def test_the_caption_form_has_every_caption_option_with_the_cli_default():
    fields = {field.name: field for field in forms.caption_fields()}
    options = set(inspect.signature(cli.caption).parameters) - {"path", "quiet", "progress", "max_failures"}
    assert options == set(fields)
    for name, parameter in inspect.signature(cli.caption).parameters.items():
        if name in fields:
            assert fields[name].default == parameter.default, name
    # every form value lands in ModelOptions or in api.caption's own parameters
    options_out, run = forms.caption_call(forms.parse_values(list(fields.values()), {}))
    accepted = set(inspect.signature(api.caption).parameters)
    assert set(run) <= accepted, set(run) - accepted
    model_fields = {item.name for item in dataclasses.fields(api.ModelOptions)}
    assert set(fields) - {"write"} <= model_fields | set(run) and "write_sidecars" in run  # --write is renamed
    assert options_out == api.ModelOptions()  # an untouched form is the CLI's defaults


def test_form_values_convert_like_the_cli_and_bad_ones_get_a_plain_message():
    fields = forms.caption_fields()
    values = forms.parse_values(fields, {"model": " Qwen/Qwen2-VL-2B-Instruct ", "max_pixels": "401408",
                                         "anyres": "off", "temperature": "0.7", "sample_separator": "\\n---\\n",
                                         "prefix": "ohwx, ", "export": "a.jsonl, b.parquet", "early_stopping": False})
    options, run = forms.caption_call(values)
    assert options.model == "Qwen/Qwen2-VL-2B-Instruct" and options.max_pixels == 401408
    assert options.anyres is False and options.temperature == 0.7 and options.early_stopping is False
    assert run["sample_separator"] == "\n---\n" and run["prefix"] == "ohwx, " and len(run["export"]) == 2
    with pytest.raises(CaptionkitError, match="--num-beams: 'three' is not a whole number"):
        forms.parse_values(fields, {"num_beams": "three"})
    tag_values = forms.parse_values(forms.tag_fields(), {"thresholds": "artist=0.5, meta=0.4", "blacklist": "a, b",
                                                          "replacements": "old=new"})
    options = forms.tag_call(tag_values)["options"]
    assert options.thresholds == {"artist": 0.5, "meta": 0.4} and options.blacklist == ["a", "b"]
    assert options.replacements == {"old": "new"}


def test_auth_and_the_warning_for_a_server_others_can_reach(tmp_path):
    assert parse_auth("ann:secret") == [("ann", "secret")]
    file = tmp_path / "users"
    file.write_text("# team\nann:one\nbob:two:with-colon\n")
    assert parse_auth(str(file)) == [("ann", "one"), ("bob", "two:with-colon")]
    with pytest.raises(CaptionkitError, match="USER:PASS"):
        parse_auth("no-colon")
    assert exposure_warning("127.0.0.1", None, False) is None
    assert "without --auth" in exposure_warning("0.0.0.0", None, False)
    assert exposure_warning("0.0.0.0", [("ann", "one")], False) is None
    assert "gradio.live" in exposure_warning("127.0.0.1", None, True)


# --- review -------------------------------------------------------------------------------------------

def test_opening_and_paging_a_large_folder_decodes_only_the_page(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    tiny = Image.new("RGB", (8, 8), (10, 20, 30))
    for index in range(3000):
        tiny.save(folder / f"{index:05d}.png")
    (folder / "00007.txt").write_text("a red circle")
    decoded = []
    import captionkit.core.images

    real = captionkit.core.images.load_image

    def counting(path, *args, **kwargs):
        decoded.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(captionkit.core.images, "load_image", counting)
    dataset = Dataset(folder)
    assert len(dataset.ids) == 3000 and not decoded  # listing decodes nothing
    page = dataset.page(dataset.ids, 1, 24)
    assert len(page) == 24 and len(decoded) == 24 and all(item.thumbnail.is_file() for item in page)
    assert page[7].caption == "a red circle" and page[0].caption is None
    cached = {item.thumbnail: item.thumbnail.stat().st_mtime_ns for item in page}
    again = dataset.page(dataset.ids, 1, 24)
    assert len(decoded) == 24  # made once, then read from the cache
    assert {item.thumbnail: item.thumbnail.stat().st_mtime_ns for item in again} == cached
    last = dataset.page(dataset.ids, 125, 24)
    assert [item.record_id for item in last][-1] == "02999.png" and len(decoded) == 48
    assert str(page[0].thumbnail).startswith(str(folder / ".captionkit" / "thumbnails"))


def test_a_changed_image_gets_a_new_thumbnail(tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 2)
    dataset = Dataset(folder)
    first = dataset.page(dataset.ids, 1, 1)[0].thumbnail
    from tests.images import noise_image

    noise_image(99, (120, 60)).save(folder / "img000.png")
    second = dataset.page(dataset.ids, 1, 1)[0].thumbnail
    assert first != second and second.is_file()


def test_filters_by_text_tag_and_empty(tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 5)
    (folder / "img000.txt").write_text("a dog on a beach, sunset")
    (folder / "img001.txt").write_text("long_hair, 1girl, smile")
    (folder / "img002.txt").write_text("   ")
    dataset = Dataset(folder)
    assert dataset.filter(text="BEACH") == ["img000.png"]
    assert dataset.filter(tag="long hair") == ["img001.png"]
    assert dataset.filter(empty_only=True) == ["img002.png", "img003.png", "img004.png"]
    assert dataset.filter(text="img004") == ["img004.png"]
    with pytest.raises(CaptionkitError, match="Run the inspection first"):
        dataset.filter(flagged_only=True)


def test_an_edited_caption_is_never_overwritten_by_later_runs_and_undo_restores_it(tmp_path, tiny_florence):
    folder = tmp_path / "photos"
    write_good_images(folder, 4)
    settings = dict(model=str(tiny_florence), num_beams=1, max_new_tokens=6, batch_size=2)
    captionkit.caption(folder, **settings)
    written = (folder / "img001.txt").read_text()
    dataset = Dataset(folder)
    dataset.save_caption("img001.png", "my own words about this picture")
    assert (folder / "img001.txt").read_text() == "my own words about this picture"
    assert not list(folder.glob(".*ck-tmp*"))  # atomic: no temp file left behind
    again = captionkit.caption(folder, **settings)  # same settings: results are reused and rendered again
    changed = captionkit.caption(folder, **{**settings, "max_new_tokens": 4})  # new settings: the model runs
    assert (folder / "img001.txt").read_text() == "my own words about this picture"
    assert again.reused == 4 and again.files_written == 0
    assert "img001.png" in changed.skipped_reasons and changed.processed == 3
    assert dataset.filter(text="own words") == ["img001.png"]
    assert dataset.undo() == "img001.png"
    assert (folder / "img001.txt").read_text() == written
    with pytest.raises(CaptionkitError, match="Nothing to undo"):
        dataset.undo()
    # undone, the file is captionkit's again: a run with new settings updates it
    captionkit.caption(folder, **{**settings, "max_new_tokens": 3})
    with Store(folder) as store:
        entry = store.get_outputs([str(folder / "img001.txt")])[str(folder / "img001.txt")]
    assert entry.written_hash is not None


def test_undo_of_a_new_caption_removes_the_file_and_a_later_change_is_kept(tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 2)
    dataset = Dataset(folder)
    dataset.save_caption("img000.png", "first words")
    assert dataset.undo() == "img000.png" and not (folder / "img000.txt").exists()
    dataset.save_caption("img000.png", "second words")
    (folder / "img000.txt").write_text("changed by another editor")
    with pytest.raises(CaptionkitError, match="changed after the edit"):
        dataset.undo()
    assert (folder / "img000.txt").read_text() == "changed by another editor"


def test_clean_lists_the_caption_files_that_are_there(tmp_path):
    folder = tmp_path / "photos"
    write_good_images(folder, 3)
    (folder / "img000.txt").write_text("old")
    (folder / "img002.txt").write_text("old")
    (folder / "notes.txt").write_text("not a caption")
    dataset = Dataset(folder)
    assert [path.name for path in dataset.existing_caption_files()] == ["img000.txt", "img002.txt"]


def test_a_bad_folder_is_one_plain_sentence(tmp_path):
    with pytest.raises(CaptionkitError, match="no such file or folder"):
        Dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionkitError, match="no images found"):
        Dataset(tmp_path / "empty")
