"""Sidecar policies, collisions, mirrored output trees and atomic writes, through the store's ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from captionkit.core.atomic import TEMP_MARKER
from captionkit.core.records import Record
from captionkit.core.sinks import SidecarSink
from captionkit.core.store import Store


def _records(root: Path, names: list[str]) -> list[Record]:
    records = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        records.append(Record(id=name, path=path))
    return records


def _sink(root: Path, **options) -> tuple[SidecarSink, Store]:
    store = Store(root)
    return SidecarSink(store, "caption", **options), store


def test_skip_leaves_user_files_and_replaces_our_own(tmp_path):
    records = _records(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_text("hand written")
    sink, _ = _sink(tmp_path)
    sink.plan(records)
    assert set(sink.wants_model(["a.png", "b.png"])) == {"a.png"}
    sink.write({"a.png": "model a", "b.png": "model b"})
    assert (tmp_path / "a.txt").read_text() == "hand written"
    assert (tmp_path / "b.txt").read_text() == "model b"
    assert sink.wants_model(["b.png"]) == {}  # ours: may be replaced when settings change
    sink.write({"b.png": "model b v2"})
    assert (tmp_path / "b.txt").read_text() == "model b v2"


def test_overwrite_replaces_everything(tmp_path):
    records = _records(tmp_path, ["a.png"])
    (tmp_path / "a.txt").write_text("hand written")
    sink, _ = _sink(tmp_path, existing="overwrite")
    sink.plan(records)
    assert sink.wants_model(["a.png"]) == {}
    sink.write({"a.png": "model"})
    assert (tmp_path / "a.txt").read_text() == "model"


def test_append_is_idempotent_and_keeps_the_users_text(tmp_path):
    records = _records(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").write_text("ohwx, portrait\n")
    sink, _ = _sink(tmp_path, existing="append")
    sink.plan(records)
    sink.write({"a.png": "a man", "b.png": "a dog"})
    assert (tmp_path / "a.txt").read_text() == "ohwx, portrait, a man"
    assert (tmp_path / "b.txt").read_text() == "a dog"
    sink.write({"a.png": "a man"})  # a rerun (or a crash replay) appends nothing more
    assert (tmp_path / "a.txt").read_text() == "ohwx, portrait, a man"
    sink.write({"a.png": "a smiling man"})  # new settings replace our part, not the user's
    assert (tmp_path / "a.txt").read_text() == "ohwx, portrait, a smiling man"


def test_append_survives_a_crash_between_write_and_confirmation(tmp_path):
    records = _records(tmp_path, ["a.png"])
    (tmp_path / "a.txt").write_text("user")
    sink, store = _sink(tmp_path, existing="append")
    sink.plan(records)
    sink.write({"a.png": "model"})
    ledger = store.get_outputs([str(tmp_path / "a.txt")])[str(tmp_path / "a.txt")]
    ledger.written_hash = None  # as if killed after the rename, before the confirming commit
    store.put_outputs([ledger])
    sink.write({"a.png": "model"})
    assert (tmp_path / "a.txt").read_text() == "user, model"


def test_fill_empty_only_fills_blank_or_missing(tmp_path):
    records = _records(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "a.txt").write_text("  \n")
    (tmp_path / "b.txt").write_text("kept")
    sink, _ = _sink(tmp_path, existing="fill-empty")
    sink.plan(records)
    assert set(sink.wants_model(["a.png", "b.png", "c.png"])) == {"b.png"}
    sink.write({"a.png": "filled", "b.png": "nope", "c.png": "new"})
    assert [(tmp_path / n).read_text() for n in ("a.txt", "b.txt", "c.txt")] == ["filled", "kept", "new"]


@pytest.mark.parametrize("policy", ["skip", "keep-extension"])
def test_collisions_are_detected_and_never_overwrite(tmp_path, policy):
    records = _records(tmp_path, ["a.png", "a.jpg", "b.png"])
    sink, _ = _sink(tmp_path, collisions=policy)
    plan = sink.plan(records)
    assert plan.collisions == {tmp_path / "a.txt": ["a.jpg", "a.png"]}
    sink.write({"a.png": "from png", "a.jpg": "from jpg", "b.png": "b"})
    assert (tmp_path / "b.txt").read_text() == "b"
    if policy == "skip":
        assert not (tmp_path / "a.txt").exists()
        assert not (tmp_path / "a.png.txt").exists()
    else:
        assert (tmp_path / "a.png.txt").read_text() == "from png"
        assert (tmp_path / "a.jpg.txt").read_text() == "from jpg"


def test_mirrored_output_tree_and_extension(tmp_path):
    images = tmp_path / "images"
    out = tmp_path / "out"
    records = _records(images, ["x/a.png", "y/a.png"])
    sink, _ = _sink(out, output_dir=out, extension="caption")
    plan = sink.plan(records)
    assert not plan.collisions
    sink.write({"x/a.png": "one", "y/a.png": "two"})
    assert (out / "x" / "a.caption").read_text() == "one"
    assert (out / "y" / "a.caption").read_text() == "two"
    assert not list(images.rglob("*.caption"))


def test_stale_temp_files_are_removed_and_none_are_left(tmp_path):
    records = _records(tmp_path, ["a.png"])
    stale = tmp_path / f".a.txt{TEMP_MARKER}abc"
    stale.write_text("half")
    sink, _ = _sink(tmp_path)
    sink.plan(records)
    assert not stale.exists()
    sink.write({"a.png": "done"})
    assert [p.name for p in tmp_path.iterdir() if TEMP_MARKER in p.name] == []


def test_another_steps_file_is_foreign(tmp_path):
    records = _records(tmp_path, ["a.png"])
    store = Store(tmp_path)
    captions = SidecarSink(store, "caption")
    captions.plan(records)
    captions.write({"a.png": "a cat"})
    tags = SidecarSink(store, "tags")
    tags.plan(records)
    assert "a.png" in tags.wants_model(["a.png"])  # skip: the caption step's file is left alone
    appending = SidecarSink(store, "tags", existing="append")
    appending.plan(records)
    appending.write({"a.png": "cat, animal"})
    assert (tmp_path / "a.txt").read_text() == "a cat, cat, animal"


def test_an_unwritable_target_is_reported_and_the_rest_written(tmp_path):
    records = _records(tmp_path, ["a.png", "b.png"])
    (tmp_path / "a.txt").mkdir()  # a folder where the file should go: the write fails
    sink, store = _sink(tmp_path, existing="overwrite")
    sink.plan(records)
    assert sink.write({"a.png": "one", "b.png": "two"}) == 1
    assert "a.txt" in sink.write_errors["a.png"] and "cannot write" in sink.write_errors["a.png"]
    assert (tmp_path / "b.txt").read_text() == "two"
    assert store.get_outputs([str(tmp_path / "a.txt")])[str(tmp_path / "a.txt")].written_hash is None


def _failing_writes(monkeypatch):
    import captionkit.core.sinks as sinks

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sinks, "atomic_write_text", full_disk)


@pytest.mark.parametrize("policy, expected", [("append", "user text, cap2"), ("skip", "cap2")])
def test_a_failed_rewrite_keeps_ownership(tmp_path, monkeypatch, policy, expected):
    records = _records(tmp_path, ["a.png"])
    if policy == "append":
        (tmp_path / "a.txt").write_text("user text")
    sink, store = _sink(tmp_path, existing=policy)
    sink.plan(records)
    sink.write({"a.png": "cap1"})
    with monkeypatch.context() as patch:
        _failing_writes(patch)
        sink.write({"a.png": "cap2"})  # disk full (or kill -9 after the intent was committed)
        assert "No space left" in sink.write_errors["a.png"]
    again = SidecarSink(store, "caption", existing=policy)
    again.plan(records)
    assert again.wants_model(["a.png"]) == {}
    again.write({"a.png": "cap2"})
    assert (tmp_path / "a.txt").read_text() == expected


def test_keep_extension_rechecks_renamed_files(tmp_path):
    records = _records(tmp_path, ["a.png", "a.jpg", "a.png.jpg"])
    sink, _ = _sink(tmp_path, collisions="keep-extension")
    plan = sink.plan(records)
    assert len(set(plan.targets.values())) == len(plan.targets)
    assert tmp_path / "a.png.txt" in plan.collisions  # a.png → a.png.txt meets a.png.jpg → a.png.txt
    assert plan.targets == {"a.jpg": tmp_path / "a.jpg.txt"}


def test_a_file_the_user_emptied_is_left_empty(tmp_path):
    records = _records(tmp_path, ["a.png"])
    sink, store = _sink(tmp_path)
    sink.plan(records)
    sink.write({"a.png": "cap1"})
    (tmp_path / "a.txt").write_text("")  # blanked on purpose (caption dropout)
    again = SidecarSink(store, "caption")
    again.plan(records)
    assert "a.png" in again.wants_model(["a.png"])
    again.write({"a.png": "cap2"})
    assert (tmp_path / "a.txt").read_text() == ""


def test_an_unreadable_caption_is_never_replaced(tmp_path, monkeypatch):
    records = _records(tmp_path, ["a.png"])
    (tmp_path / "a.txt").write_text("precious user caption")
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "a.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    sink, _ = _sink(tmp_path, existing="append")
    sink.plan(records)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "read_text", denied)
        assert "cannot be read" in sink.wants_model(["a.png"])["a.png"]
        assert sink.write({"a.png": "cap"}) == 0
    assert (tmp_path / "a.txt").read_text() == "precious user caption"
    assert "cannot be read" in sink.write_errors["a.png"]


def test_a_file_written_before_a_collision_appeared_is_removed(tmp_path):
    records = _records(tmp_path, ["a.png"])
    sink, store = _sink(tmp_path)
    sink.plan(records)
    sink.write({"a.png": "caption of a.png"})
    records += _records(tmp_path, ["a.jpg"])
    again = SidecarSink(store, "caption")
    plan = again.plan(records)
    assert tmp_path / "a.txt" in plan.collisions and not (tmp_path / "a.txt").exists()
