"""Silence one known third-party warning at its call site, never globally.

Why: ``peft.PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, a property
transformers 5 deprecated with a ``FutureWarning`` ("`is_gradient_checkpointing` is
deprecated and will be removed in v6"). Users of ``captionkit train captioner`` and
``captionkit caption --adapter`` cannot act on it, so it is filtered, by its message
only, around the peft calls that trigger it (``get_peft_model``,
``PeftModel.from_pretrained``). Every other warning still shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

GRADIENT_CHECKPOINTING_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def peft_wrapping_quietly() -> Iterator[None]:
    """Within the block, drop transformers' ``is_gradient_checkpointing`` FutureWarning (only that one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION, category=FutureWarning)
        yield
