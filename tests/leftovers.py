"""Processes a test run started that outlived it (a Ray worker stuck at exit, a server never stopped, a browser).

Why: a process left behind keeps its memory and some CPU, and every later run on the machine is slower for it;
nobody sees it in a green run. One was found by hand: a Florence-2 Ray actor, 600 MB resident, a quarter of an
hour after its pool ended (see ``_leave_before_exit_handlers`` in captionkit/executors/ray_executor.py). The run
marks its environment (``RUN_MARKER``); every process a test starts inherits it, Ray's workers too (their raylet
was started by a test process), so the run's own processes are told apart from anything else on the machine.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

RUN_MARKER = "CAPTIONKIT_TEST_RUN"


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds nothing but its exit status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def processes_of_run(run: str, exclude: set[int]) -> dict[int, str]:
    """``{pid: command line}`` of the live processes whose environment carries ``RUN_MARKER=run``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        pid = int(entry.name)
        try:
            if not alive(pid) or _environment(pid).get(RUN_MARKER) != run:
                continue
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone meanwhile, or not ours to read
        found[pid] = command.strip()[:160]
    return found


def _waited(find, grace_s: float):
    """``find()`` until it finds nothing or ``grace_s`` has passed (a server or a fork server may take seconds)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = find()
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def outlived(run: str, exclude: set[int], grace_s: float = 15.0) -> dict[int, str]:
    """The run's processes still alive after ``grace_s``."""
    return _waited(lambda: processes_of_run(run, exclude), grace_s)


def survivors(pids: list[int], grace_s: float) -> list[int]:
    """Those of ``pids`` still alive after ``grace_s``."""
    return _waited(lambda: [pid for pid in pids if alive(pid)], grace_s)


def end(pids: list[int]) -> None:
    """SIGKILL what outlived the run, so the next run on this machine does not share the cores with it."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
