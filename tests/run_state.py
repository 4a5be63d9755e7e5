"""What a captioning run leaves behind, for comparing executors (local, Ray, several devices)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from captionkit.atomic import TEMP_MARKER
from captionkit.store import Store


def state(folder: Path, step: str = "caption") -> dict:
    """Everything a run leaves: store rows (paths made relative) and sidecar texts."""
    with Store(folder) as store:
        rows = {
            result.record_id: (result.status, result.text, json.dumps(result.raw, sort_keys=True),
                               result.fingerprint, result.content_hash, result.file_signature,
                               (result.error or "").replace(str(folder), "<root>"), result.notes)
            for result in store.iter_results(step)
        }
    sidecars = {path.name: path.read_text() for path in folder.glob("*.txt")}
    leftovers = [path for path in folder.rglob("*") if TEMP_MARKER in path.name]
    return {"rows": rows, "sidecars": sidecars, "leftovers": leftovers}


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copy2)  # same mtimes: same file signatures
    return target
