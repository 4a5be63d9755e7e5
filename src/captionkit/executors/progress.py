"""Progress reporting: a bar with images/s and ETA, JSON lines for machines, or nothing."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class Progress:
    """``mode`` is "bar", "json" or "quiet". JSON lines go to ``stream`` (stdout by default).

    ``listener``, when given, receives every event as a dict in any mode (the web UI's live view).
    """

    def __init__(self, mode: str = "bar", stream: TextIO | None = None,
                 listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        if mode not in ("bar", "json", "quiet"):
            raise ValueError(f"progress mode '{mode}': use bar, json or quiet")
        self.mode = mode
        self.stream = stream or sys.stdout
        self.listener = listener
        self._bar = None
        self._start = time.perf_counter()
        self.total = 0

    def start(self, total: int, description: str) -> None:
        self.total = total
        self._start = time.perf_counter()
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="img", dynamic_ncols=True, file=sys.stderr)
        elif self.mode == "json" or self.listener is not None:
            self.event("start", total=total, description=description)

    def advance(self, done: int, failed: int, count: int, current: str | None = None) -> None:
        """``count`` more images finished (``done`` and ``failed`` are running totals; ``current`` the last one)."""
        if self._bar is not None:
            self._bar.update(count)
            self._bar.set_postfix(failed=failed, refresh=False)
        if self.mode == "json" or self.listener is not None:
            elapsed = time.perf_counter() - self._start
            finished = done + failed
            rate = finished / elapsed if elapsed > 0 else 0.0
            remaining = (self.total - finished) / rate if rate > 0 else None
            self.event("progress", done=done, failed=failed, total=self.total, current=current,
                       images_per_s=round(rate, 3), eta_s=round(remaining, 1) if remaining is not None else None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def event(self, kind: str, **values: Any) -> None:
        if self.listener is not None:
            self.listener({"event": kind, **values})
        if self.mode == "json":
            self.stream.write(json.dumps({"event": kind, **values}, default=str) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A human line (not in JSON or quiet mode)."""
        if self.mode == "bar":
            if self._bar is not None:
                self._bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)
