"""Name what went wrong: a broken Python environment, a full disk, or something else.

Why: a package that fails to import (a torchaudio or scipy built for another torch, a
library with a missing symbol) surfaces as an ``OSError`` or ``ImportError`` from deep
inside ``from_pretrained``. Reported as "not a loadable folder" or "check free space",
it sends users to their model folder or their disk, which are fine. These helpers find
the failing import in the traceback and say so, and keep the disk-space hint for errors
that are about writing.
"""

from __future__ import annotations

import errno
import os
import sys
import sysconfig
import traceback
from pathlib import Path

from captionkit.core.errors import CaptionkitError


class BrokenEnvironmentError(CaptionkitError):
    """A package of the Python environment fails to import: the fix is pip, not the user's files."""


def _exceptions(error: BaseException) -> list[BaseException]:
    """The error and its causes and contexts, outermost first, each once."""
    seen: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is known for known in seen):
            continue
        seen.append(current)
        pending.extend([current.__cause__, current.__context__])
    return seen


def _standard_library() -> list[str]:
    paths = sysconfig.get_paths()
    return [os.path.realpath(paths[key]) for key in ("stdlib", "platstdlib") if key in paths]


def _top_level_module(filename: str) -> str | None:
    """The importable top-level name a source file belongs to (``.../site-packages/scipy/x.py`` -> scipy)."""
    if filename.startswith("<"):
        return None
    real = os.path.realpath(filename)
    if any(real.startswith(root + os.sep) and "site-packages" not in real[len(root):] for root in _standard_library()):
        return None
    best: tuple[int, str] | None = None
    for entry in sys.path:
        root = os.path.realpath(entry or os.getcwd())
        if real.startswith(root + os.sep) and (best is None or len(root) > best[0]):
            best = (len(root), real[len(root) + 1:])
    if best is None:
        return None
    first = Path(best[1]).parts[0]
    return first[:-3] if first.endswith(".py") else first


def _distribution(module: str) -> str:
    """The pip name that installs ``module`` (scipy -> scipy, PIL -> pillow), else the module name."""
    try:
        from importlib.metadata import packages_distributions

        names = packages_distributions().get(module)
    except Exception:  # noqa: BLE001 - a broken metadata folder must not hide the real error
        names = None
    return names[0] if names else module


def failing_import(error: BaseException) -> tuple[str, str | None, BaseException] | None:
    """``(module, imported_by, exception)`` when ``error`` comes from a package failing to import, else None.

    A failure inside a module's top-level code (a ``<module>`` frame) is an import failure;
    so is an ``ImportError`` naming a module that is installed but does not load.
    """
    for current in _exceptions(error):
        frames = traceback.extract_tb(current.__traceback__)
        modules = [(frame, _top_level_module(frame.filename)) for frame in frames if frame.name == "<module>"]
        modules = [(frame, name) for frame, name in modules if name is not None]
        if isinstance(current, ImportError) and current.name:
            top = current.name.split(".")[0]
            if top != "captionkit" and _installed(top):
                importer = next((name for _, name in reversed(modules) if name != top), None)
                return top, importer, current
        if not modules:
            continue
        failing = modules[-1][1]
        if failing == "captionkit" or failing.startswith("transformers_modules"):
            continue  # our own bug, or a model's own code (trust_remote_code): not the environment
        importer = next((name for _, name in reversed(modules) if name != failing), None)
        return failing, importer, current
    return None


def _installed(module: str) -> bool:
    """True when ``module`` can be found (so an ImportError about it is a broken install, not a missing one)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def broken_environment(error: BaseException) -> BrokenEnvironmentError | None:
    """One message naming the package that fails to import and the pip command that fixes it, else None."""
    found = failing_import(error)
    if found is None:
        return None
    module, importer, cause = found
    package = _distribution(module)
    where = ""
    try:
        import importlib.util

        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            where = f" ({spec.origin})"
    except (ImportError, ValueError):
        pass
    via = f" (imported by {importer})" if importer and importer != module else ""
    return BrokenEnvironmentError(
        f"the Python environment is broken: importing {module}{where}{via} failed with "
        f"{type(cause).__name__}: {cause}. Your files are not the problem. Reinstall it to match this torch "
        f"(`pip install --force-reinstall {package}`), or remove it if nothing needs it (`pip uninstall {package}`)."
    )


_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
_IN_THE_WAY = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR}


def describe_os_error(error: OSError) -> str:
    """An OSError in one sentence; the free-space / --output-dir hint only where the error is about writing."""
    where = f"{error.filename}: " if error.filename else ""
    text = f"{where}{error.strerror or error}"
    if error.errno in _SPACE:
        return f"{text}. Free some space, or write elsewhere with --output-dir."
    if error.errno == errno.EROFS:
        return f"{text}. Write elsewhere with --output-dir."
    if error.errno in _ACCESS:
        return f"{text}. Check the permissions, or write elsewhere with --output-dir."
    if error.errno in _IN_THE_WAY:  # creating a file or folder where another one is
        return f"{text}. Something is in the way there: move it, or write elsewhere with --output-dir."
    return f"{text}."


def is_storage_problem(error: BaseException) -> bool:
    """SQLite's words for a full disk or a folder it may not write (not for a damaged or locked store)."""
    message = str(error).lower()
    return any(word in message for word in ("full", "readonly", "read-only", "disk i/o", "unable to open",
                                            "permission"))
