"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every file captionkit writes goes through here: the bytes land in a temp file in the
destination folder, are flushed to disk, then renamed over the destination in one step.
Temp files carry a fixed marker so a run can remove those a killed run left behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_MARKER = ".ck-tmp-"


_umask_lock = threading.Lock()
_umask: int | None = None


def current_umask() -> int:
    """The process umask (read once; reading it means setting it, so under a lock)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
        return _umask


def file_mode(path: Path) -> int:
    """The mode a replaced file keeps, or the mode ``open()`` would give a new one (0666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def plain_mode(is_dir: bool = False, executable: bool = False) -> int:
    """The mode ``open()`` (0666) or ``mkdir()`` (0777) gives a new file or folder under the process umask."""
    return (0o777 if is_dir or executable else 0o666) & ~current_umask()


def give_plain_modes(root: str | Path) -> None:
    """Set every file and folder under ``root`` (a freshly built folder) to the mode a plain ``open()`` gives.

    Why: writers captionkit does not control (safetensors' ``save_file``, so every
    ``save_pretrained``) create files 0600 whatever the umask, which locks a shared
    training output away from the group and from other users.
    """
    root = Path(root)
    for folder, folders, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            executable = bool(os.stat(path).st_mode & 0o111)
            os.chmod(path, plain_mode(executable=executable))
        for name in folders:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, plain_mode(is_dir=True))
    os.chmod(root, plain_mode(is_dir=True))


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it is flushed (synced if ``durable``) and renamed over ``path``.

    The rename alone protects against crashes of the process; ``durable`` also waits for
    the disk, which protects against power loss and costs a millisecond or more per file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent)
    try:
        os.chmod(temp_name, file_mode(path))  # mkstemp makes 0600; the result must look like a plain open()
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as stream:
            yield stream
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` via temp file (+ fsync when ``durable``) + rename."""
    with atomic_open(path, "wb", durable) as stream:
        stream.write(data)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n"


def atomic_write_json(path: str | Path, value: Any) -> None:
    """Write JSON atomically (pretty-printed, UTF-8)."""
    atomic_write_text(path, _json_text(value))


def write_staged_json(path: str | Path, value: Any) -> None:
    """JSON as :func:`atomic_write_json` formats it, written plainly, for a file inside a temp folder that
    appears whole by one rename (an export, a checkpoint): a per-file temp, rename and fsync (a millisecond
    or more each, every epoch) would protect nothing more."""
    Path(path).write_text(_json_text(value), encoding="utf-8")


def atomic_write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Write lines (each gets a newline) atomically, streaming into the temp file."""
    with atomic_open(path, "w") as stream:
        for line in lines:
            stream.write(line)
            stream.write("\n")


def is_temp_file(name: str) -> bool:
    """True for a temp file made by this module."""
    return name.startswith(".") and TEMP_MARKER in name


def remove_stale_temp_files(paths: Iterable[Path]) -> int:
    """Delete leftover temp files of killed runs among ``paths``' folders; returns the count."""
    removed = 0
    seen: set[Path] = set()
    for folder in paths:
        if folder in seen or not folder.is_dir():
            continue
        seen.add(folder)
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False) and is_temp_file(entry.name):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def remove_stale_temp_files_under(root: Path) -> int:
    """Delete leftover temp files of killed runs in ``root`` and every folder below it (symlinks not followed)."""
    if not root.is_dir():
        return 0
    folders = [Path(folder) for folder, _, _ in os.walk(root)]
    return remove_stale_temp_files(folders)
