"""Checkpoint folders: atomic appearance, rotation by save_total_limit that keeps the best."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captionkit.train.checkpoints import CheckpointManager, atomic_write_json, atomic_write_text


def writer(text: str):
    def write(folder: Path) -> None:
        (folder / "weights.txt").write_text(text)

    return write


def test_save_creates_folder_and_index(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=None)
    path = manager.save("step-1", writer("a"))
    assert path == tmp_path / "step-1"
    assert (path / "weights.txt").read_text() == "a"
    index = json.loads((tmp_path / "checkpoints.json").read_text())
    assert [entry["tag"] for entry in index["checkpoints"]] == ["step-1"]
    assert manager.latest() == path and manager.best() is None


def test_rotation_never_deletes_best_lower_is_better(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=2, metric_name="val_loss")
    for step, loss in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.6), (5, 0.7)]:
        manager.save(f"step-{step}", writer(str(step)), metric=loss)
    assert manager.best() == tmp_path / "step-2"
    assert manager.all() == [tmp_path / "step-2", tmp_path / "step-5"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step-2", "step-5"]


def test_rotation_greater_is_better_and_limit_one_keeps_best_and_newest(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=1, metric_name="cider", greater_is_better=True)
    manager.save("a", writer("a"), metric=0.2)
    manager.save("b", writer("b"), metric=0.9)
    manager.save("c", writer("c"), metric=0.3)
    manager.save("d", writer("d"), metric=0.1)
    assert manager.best() == tmp_path / "b"
    assert manager.latest() == tmp_path / "d"
    assert manager.all() == [tmp_path / "b", tmp_path / "d"]


def test_unscored_checkpoints_rotate_by_age(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=2)
    for name in "abcd":
        manager.save(name, writer(name))
    assert [p.name for p in manager.all()] == ["c", "d"]


def test_failed_write_leaves_nothing_and_keeps_old(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=None)
    manager.save("step-1", writer("old"))

    def broken(folder: Path) -> None:
        (folder / "weights.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        manager.save("step-1", broken)
    assert (tmp_path / "step-1" / "weights.txt").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_resaving_a_tag_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=None)
    manager.save("final", writer("1"))
    manager.save("final", writer("2"))
    assert (tmp_path / "final" / "weights.txt").read_text() == "2"
    assert manager.all() == [tmp_path / "final"]


def test_index_survives_a_new_manager_and_stale_temps_are_removed(tmp_path):
    manager = CheckpointManager(tmp_path, save_total_limit=3, metric_name="loss")
    manager.save("s1", writer("1"), metric=0.5)
    manager.save("s2", writer("2"), metric=0.4)
    (tmp_path / ".tmp-s3-deadbeef").mkdir()
    again = CheckpointManager(tmp_path, save_total_limit=3, metric_name="loss")
    assert again.all() == manager.all()
    assert again.best() == tmp_path / "s2"
    assert not (tmp_path / ".tmp-s3-deadbeef").exists()
    again.record_metric(tmp_path / "s1", 0.1)
    assert again.best() == tmp_path / "s1"


def test_invalid_tag_and_limit(tmp_path):
    with pytest.raises(ValueError, match="save_total_limit"):
        CheckpointManager(tmp_path, save_total_limit=0)
    manager = CheckpointManager(tmp_path, save_total_limit=None)
    with pytest.raises(ValueError, match="invalid checkpoint tag"):
        manager.save("../x", writer("x"))


def test_atomic_writes(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    atomic_write_json(tmp_path / "c.json", {"x": 1})
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_resume_with_another_metric_does_not_compare_old_scores(tmp_path):
    def write(folder):
        (folder / "weights.bin").write_bytes(b"w")

    old = CheckpointManager(tmp_path, save_total_limit=2, metric_name="val_loss", greater_is_better=False)
    old.save("step-0", write, metric=2.5)
    old.save("step-1", write, metric=2.0)
    new = CheckpointManager(tmp_path, save_total_limit=2, metric_name="cider", greater_is_better=True)
    new.save("step-2", write, metric=0.9)
    new.save("step-3", write, metric=1.1)
    assert new.best() == tmp_path / "step-3"
    assert (tmp_path / "step-3").is_dir() and new.latest() == tmp_path / "step-3"


def test_a_damaged_index_is_a_clear_error(tmp_path):
    from captionkit.core.errors import CaptionkitError

    (tmp_path / "checkpoints.json").write_text('{"checkpoints": [{"no-tag": 1}]')
    with pytest.raises(CaptionkitError, match="delete"):
        CheckpointManager(tmp_path, save_total_limit=2)
