"""Errors users see: each names the file, the cause and the fix."""

from __future__ import annotations


class CaptionkitError(Exception):
    """Base class: a problem the user can act on; the CLI prints it without a stack trace."""


class ImageLoadError(CaptionkitError):
    """An image could not be decoded; the run records it and goes on with the rest."""

    def __init__(self, path: str, cause: str, fix: str) -> None:
        self.path = path
        self.cause = cause
        self.fix = fix
        super().__init__(f"{path}: {cause}. {fix}")


class NothingSucceededError(CaptionkitError):
    """Not one item succeeded (every training image unreadable): the command exits 3, not 2 (a usage error)."""


class StoppedEarlyError(NothingSucceededError):
    """The run was ended before its end (a Ray run that stopped moving); what finished is kept. Exits 3."""


class ModelNotAvailableError(CaptionkitError):
    """A model could not be found locally nor fetched from a hub."""


class SourceError(CaptionkitError):
    """The input path or manifest cannot be read."""


class MissingDependencyError(CaptionkitError):
    """An optional package is needed for the feature asked for."""

    def __init__(self, package: str, feature: str, extra: str | None = None) -> None:
        hint = f"pip install 'captionkit[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{feature} needs the package '{package}', which is not installed. Run: {hint}")


def require(module: str, feature: str, extra: str | None = None, package: str | None = None):
    """Import an optional module, or raise an error with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(package or module, feature, extra) from error
