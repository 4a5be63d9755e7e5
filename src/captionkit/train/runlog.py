"""The run's log file (``OUTPUT/train.log``) and the "which images were left out" report.

Why: training used to drop images without captions (or tag files) silently, printing
only "trained 2 steps". Now the console gets one line with the counts, the reasons and
the first few names, and ``OUTPUT/train.log`` gets every name. The log file receives
everything the ``captionkit`` loggers say at INFO and above while the run lasts; it is
opened only after validation passed, so a failed run leaves no output folder behind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

LOG_FILE = "train.log"
CONSOLE_NAMES = 5

_log = logging.getLogger("captionkit.train")
# Every skipped file, one line each: for the log file only, never the console.
_file_only = logging.getLogger("captionkit.train.skipped_files")
_file_only.propagate = False


@contextmanager
def run_log(output_dir: Path, enabled: bool = True) -> Iterator[Path]:
    """Append the ``captionkit`` loggers' INFO+ records to ``output_dir/train.log`` within the block."""
    path = Path(output_dir) / LOG_FILE
    if not enabled:
        yield path
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("captionkit")
    previous = package.level
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    package.addHandler(handler)
    _file_only.addHandler(handler)
    try:
        yield path
    finally:
        package.removeHandler(handler)
        _file_only.removeHandler(handler)
        package.setLevel(previous)
        handler.close()


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(str(path) for path in paths[:CONSOLE_NAMES])
    more = len(paths) - CONSOLE_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def skipped_summary(used: int, skipped: Mapping[str, Sequence[str]], log_file: Path | None,
                    what: str = "images") -> str:
    """One line: how many were used, how many skipped, why, and the first few names."""
    groups = {reason: list(paths) for reason, paths in skipped.items() if paths}
    total = sum(len(paths) for paths in groups.values())
    text = f"training data: {used} {what} used, {total} skipped"
    if not total:
        return text
    reasons = "; ".join(f"{len(paths)} {reason} ({_names(paths)})" for reason, paths in groups.items())
    where = f". Every skipped file is listed in {log_file}" if log_file is not None else ""
    return f"{text}: {reasons}{where}"


def log_skipped(used: int, skipped: Mapping[str, Sequence[str]], log_file: Path | None,
                what: str = "images") -> str:
    """Log the summary (a warning when anything was skipped) and every skipped file to the log file."""
    summary = skipped_summary(used, skipped, log_file, what)
    total = sum(len(paths) for paths in skipped.values())
    _log.log(logging.WARNING if total else logging.INFO, summary)
    for reason, paths in skipped.items():
        for path in paths:
            _file_only.info("skipped (%s): %s", reason, path)
    return summary
