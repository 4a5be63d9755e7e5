"""Every command's options, declared once (help, choices, defaults, where they apply, the fingerprint).

The command line, the web UI's forms and the pipeline's YAML keys are all built from these
declarations; see :mod:`captionkit.options.commands`. This package sits in the steps layer:
steps use it, and the api, UI and CLI above read it.
"""

from captionkit.options.commands import CAPTION, RENDER, TAG, Command, Part, tag_options
from captionkit.options.model import (
    BACKENDS,
    DEFAULT_CAPTION_MODEL,
    ModelOptions,
    adapter_base_model,
    build_captioner,
    check_choice,
    refuse_inapplicable,
)
from captionkit.options.text import SAMPLE_CHOICES, CaptionText

__all__ = [
    "BACKENDS", "CAPTION", "DEFAULT_CAPTION_MODEL", "RENDER", "SAMPLE_CHOICES", "TAG", "CaptionText", "Command",
    "ModelOptions", "Part", "adapter_base_model", "build_captioner", "check_choice", "refuse_inapplicable",
    "tag_options",
]
