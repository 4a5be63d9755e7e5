"""What a captioning run leaves behind, for comparing executors (local, Ray, several devices)."""

from __future__ import annotations

import shutil
from pathlib import Path

from captionkit.testing import run_state as state  # noqa: F401 - re-exported for the tests


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copy2)  # same mtimes: same file signatures
    return target
