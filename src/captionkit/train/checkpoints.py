"""Checkpoint folders that appear atomically, rotate, and never lose the best one.

Why: the seed scripts wrote checkpoints in place (a crash mid-save left a half folder
that resume then trusted) and rotated by age alone, so ``save_total_limit`` could delete
the best checkpoint (transformers #15089, #39560). Here every checkpoint is written into
a temporary folder and renamed into place, a small JSON index (also written atomically)
records the order and the validation metric of each, and rotation removes the oldest
checkpoints beyond the limit while always keeping the best and the newest.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from captionkit.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, give_plain_modes
from captionkit.core.errors import CaptionkitError

__all__ = ["CheckpointManager", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

INDEX_NAME = "checkpoints.json"
_TEMP_PREFIX = ".tmp-"


class CheckpointManager:
    """Saves checkpoints as ``root/<tag>`` folders and rotates them by ``save_total_limit``.

    ``metric_name``/``greater_is_better`` define "best"; checkpoints saved without a
    metric are never the best. With a limit of 1 and a best that is not the newest, two
    folders remain: deleting either would lose what the user asked to keep.
    """

    def __init__(
        self,
        root: Path,
        save_total_limit: int | None,
        metric_name: str | None = None,
        greater_is_better: bool = False,
    ) -> None:
        if save_total_limit is not None and save_total_limit < 1:
            raise ValueError(
                f"save_total_limit must be at least 1 or None (keep all), got {save_total_limit}"
            )
        self.root = Path(root)
        self.save_total_limit = save_total_limit
        self.metric_name = metric_name
        self.greater_is_better = greater_is_better
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: list[dict[str, Any]] = self._read_index()
        remove_stale_temp_folders(self.root)

    # -- index -------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def _read_index(self) -> list[dict[str, Any]]:
        if not self.index_path.exists():
            return []
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise CaptionkitError(
                f"{self.index_path}: cannot read the checkpoint index ({error}); "
                "delete the file to start a fresh index (checkpoint folders are kept)"
            ) from error
        if not isinstance(data, dict) or not all(
                isinstance(entry, dict) and "tag" in entry for entry in data.get("checkpoints", [])):
            raise CaptionkitError(f"{self.index_path}: not a captionkit checkpoint index; delete it to start a "
                                  "fresh one (checkpoint folders are kept)")
        entries = data.get("checkpoints", [])
        if (data.get("metric_name"), data.get("greater_is_better")) != (self.metric_name, self.greater_is_better):
            # Scores of another metric (a resume with a new best_metric) cannot be compared with
            # the new ones: keep the folders, forget their scores, so rotation cannot pick by them.
            for entry in entries:
                entry["metric"] = None
        # A folder deleted by hand simply drops out of the index.
        return [entry for entry in entries if (self.root / entry["tag"]).is_dir()]

    def _write_index(self) -> None:
        atomic_write_json(
            self.index_path,
            {
                "metric_name": self.metric_name,
                "greater_is_better": self.greater_is_better,
                "best": self._best_entry()["tag"] if self._best_entry() else None,
                "checkpoints": self._entries,
            },
        )

    # -- queries -----------------------------------------------------------------------
    def _best_entry(self) -> dict[str, Any] | None:
        scored = [entry for entry in self._entries if entry.get("metric") is not None]
        if not scored:
            return None
        # Ties go to the earliest checkpoint: a later equal score is not an improvement.
        best = scored[0]
        for entry in scored[1:]:
            if self.greater_is_better:
                better = entry["metric"] > best["metric"]
            else:
                better = entry["metric"] < best["metric"]
            if better:
                best = entry
        return best

    def best(self) -> Path | None:
        """The folder with the best metric, or None when no checkpoint has a metric."""
        entry = self._best_entry()
        return self.root / entry["tag"] if entry else None

    def latest(self) -> Path | None:
        """The most recently saved checkpoint folder."""
        return self.root / self._entries[-1]["tag"] if self._entries else None

    def all(self) -> list[Path]:
        """All kept checkpoint folders, oldest first."""
        return [self.root / entry["tag"] for entry in self._entries]

    def metric_of(self, path: Path) -> float | None:
        """The metric recorded for a checkpoint folder (None if unknown or unscored)."""
        for entry in self._entries:
            if entry["tag"] == Path(path).name:
                return entry.get("metric")
        return None

    # -- saving ------------------------------------------------------------------------
    def save(self, tag: str, write_fn: Callable[[Path], None], metric: float | None = None) -> Path:
        """Write a checkpoint with ``write_fn(folder)`` and move it to ``root/tag`` atomically.

        Saving an existing tag again replaces it (the old folder is removed only after
        the new one is complete).
        """
        if not tag or "/" in tag or "\\" in tag or tag.startswith(".") or tag == INDEX_NAME:
            raise ValueError(f"invalid checkpoint tag {tag!r}: use a plain folder name such as 'step-100'")
        final = write_folder_atomically(self.root / tag, write_fn)
        self._entries = [entry for entry in self._entries if entry["tag"] != tag]
        score = None if metric is None else float(metric)
        self._entries.append({"tag": tag, "metric": score, "time": time.time()})
        self._rotate()
        self._write_index()
        return final

    def record_metric(self, path: Path, metric: float) -> None:
        """Attach a metric to an already saved checkpoint (validation may run after saving)."""
        for entry in self._entries:
            if entry["tag"] == Path(path).name:
                entry["metric"] = float(metric)
                self._write_index()
                return
        raise KeyError(f"{path} is not a checkpoint managed under {self.root}")

    def _rotate(self) -> None:
        if self.save_total_limit is None:
            return
        best = self._best_entry()
        keep = {self._entries[-1]["tag"]}
        if best is not None:
            keep.add(best["tag"])
        while len(self._entries) > self.save_total_limit:
            victim = next((entry for entry in self._entries if entry["tag"] not in keep), None)
            if victim is None:
                break
            shutil.rmtree(self.root / victim["tag"], ignore_errors=True)
            self._entries.remove(victim)


def write_folder_atomically(path: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Build a folder with ``write_fn`` in a sibling temp folder, then rename it to ``path``.

    An existing folder at ``path`` is replaced only once the new one is complete. Its files
    get the modes a plain ``open()`` gives (third-party writers such as safetensors make 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f"{_TEMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    try:
        write_fn(temp)
        give_plain_modes(temp)
        if path.exists():
            trash = path.parent / f"{_TEMP_PREFIX}old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.replace(path, trash)
            os.replace(temp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(temp, path)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return path


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as another name of the finished file ``source``: a hard link, or a copy where the file
    system has none.

    Why: the same bytes (a checkpoint saved as ``last`` and as ``checkpoints/epoch-N`` at the same
    step, the weights of an export made then) need not be serialised and written again. Safe because
    nothing here changes a file in place: folders are replaced whole by :func:`write_folder_atomically`
    and replacing or rotating one folder only removes its names, never the bytes another folder shares.
    """
    try:
        os.link(source, target)
    except OSError:  # no hard links here (another device, a file system without them)
        shutil.copyfile(source, target)


def link_folder(source: Path, target: Path) -> None:
    """Fill the new, empty folder ``target`` with the files of the finished folder ``source`` (linked)."""
    for item in sorted(Path(source).rglob("*")):
        destination = target / item.relative_to(source)
        if item.is_dir():
            destination.mkdir(exist_ok=True)
        else:
            link_or_copy(item, destination)


def remove_stale_temp_folders(folder: str | Path) -> None:
    """Remove what a crashed save left in ``folder``: half-built and replaced folders (checkpoint-sized)."""
    for child in Path(folder).iterdir():
        name = child.name
        if name.startswith(_TEMP_PREFIX) or (name.startswith(".") and (".ck-tmp-" in name or ".ck-old-" in name)):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
