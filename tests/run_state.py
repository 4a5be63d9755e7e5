"""What a captioning run leaves behind, for comparing executors (local, Ray, several devices)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from captionkit.models.florence2 import Florence2Captioner
from captionkit.testing import run_state as state  # noqa: F401 - re-exported for the tests


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, copy_function=shutil.copy2)  # same mtimes: same file signatures
    return target


def committed(folder: Path, step: str | None = None, status: str | None = "ok") -> int:
    """Results committed to the folder's store so far (read while a run writes to it, from another process)."""
    import sqlite3

    database = folder / ".captionkit" / "store.sqlite"
    if not database.exists():
        return 0
    where = " AND ".join(clause for clause, value in (("status = ?", status), ("step = ?", step)) if value)
    values = [value for value in (status, step) if value]
    try:
        with sqlite3.connect(database, timeout=5) as connection:
            return connection.execute("SELECT COUNT(*) FROM results" + (f" WHERE {where}" if where else ""),
                                      values).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


class ExitOnce(Florence2Captioner):
    """A Florence-2 captioner whose worker process ends (as if killed) in its second batch, once per marker file."""

    def __init__(self, marker: Path, **options) -> None:
        super().__init__(**options)
        self.marker = str(marker)
        self.calls = 0

    def caption_batch(self, requests):
        self.calls += 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os._exit(1)
        return super().caption_batch(requests)


def wait_while_running(process, ready, timeout_s: float = 180, waiting_for: str = "progress") -> None:
    """Wait until ``ready()`` while ``process`` (a CLI run about to be killed or interrupted) still runs."""
    import time

    deadline = time.time() + timeout_s
    while not ready():
        assert process.poll() is None, "the run finished before it could be stopped; use more images"
        assert time.time() < deadline, f"no {waiting_for} within {timeout_s:.0f} s"
        time.sleep(0.01)
