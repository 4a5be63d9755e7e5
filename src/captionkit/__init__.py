"""captionkit: caption, tag and train the labellers of image datasets for text-to-image training.

Library API (the CLI is a thin layer over it)::

    from captionkit import caption
    summary = caption("photos/", model="florence-community/Florence-2-base", task="<DETAILED_CAPTION>")
"""

from captionkit import _torchvision_compat  # noqa: F401 - first: its import hook repairs any later torchvision import
from captionkit.api import ModelOptions, build_captioner, caption, export, render, tag, tag_options
from captionkit.core.errors import CaptionkitError, ImageLoadError, ModelNotAvailableError
from captionkit.core.records import Record, open_source
from captionkit.executors.local import RunSummary
from captionkit.models import list_backends

__all__ = [
    "CaptionkitError", "ImageLoadError", "ModelNotAvailableError", "ModelOptions", "Record", "RunSummary",
    "build_captioner", "caption", "export", "list_backends", "open_source", "render", "tag", "tag_options",
]
__version__ = "0.1.0"
