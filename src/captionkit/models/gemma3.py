"""Gemma 3 (vision sizes 4B/12B/27B) on the native ``Gemma3ForConditionalGeneration``.

How it differs from the generic chat backend:

* the chat template writes ``<bos>`` and the Gemma tokenizer adds another one; a doubled BOS
  visibly degrades Gemma's output, so a prompt that starts with BOS is tokenized without the
  tokenizer's own special tokens (as ``processor.apply_chat_template(tokenize=True)`` does);
* the template has no system role of its own: it folds the system text into the first user
  turn. That keeps it a supported system prompt; the rendered prompt is checked to contain it;
* Gemma 3 overflows in float16 (its activations exceed fp16's range and captions turn to
  garbage or NaN). With ``dtype="auto"`` on a GPU without bfloat16 it therefore runs in float32
  instead of float16; an explicit ``--dtype fp16`` is left as asked;
* ``Gemma3Processor`` nests a flat image list into one prompt's images, so images go one list
  per prompt;
* images are resized to the tower's square input, so every image costs the same
  ``mm_tokens_per_image`` tokens; ``pan_and_scan=True`` adds the processor's crops of large,
  elongated images (each crop another image's worth of tokens), ``False`` forces them off.
"""

from __future__ import annotations

import logging
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.models import register_backend
from captionkit.models.base import ChatSettings
from captionkit.models.chat_vlm import ChatVLMCaptioner

log = logging.getLogger(__name__)


@register_backend(
    "gemma3",
    kind="captioner",
    description="Gemma 3 vision models (native Gemma3ForConditionalGeneration, chat template)",
    model_types=("gemma3",),
    default_model="google/gemma-3-4b-it",
    modules=("transformers", "torch"),
)
class Gemma3Captioner(ChatVLMCaptioner):
    family = "gemma3"
    nested_images = True  # a flat list of images would be read as all images of one prompt

    def __init__(
        self,
        model: str,
        chat: ChatSettings | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        **options: Any,
    ) -> None:
        if dtype == "auto" and _auto_dtype_is_fp16(device):
            log.info("Gemma 3 overflows in float16 and this GPU has no bfloat16: running in float32.")
            dtype = "fp32"
        super().__init__(model, chat, dtype=dtype, attn_implementation=attn_implementation, device=device, **options)

    def check_family_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        pan_and_scan = options.pop("pan_and_scan", None)
        checked = super().check_family_options(options)
        if pan_and_scan is None:
            return checked
        if not isinstance(pan_and_scan, bool):
            raise CaptionkitError(f"--pan-and-scan {pan_and_scan!r}: use true or false.")
        return {**checked, "pan_and_scan": pan_and_scan}

    def call_options(self) -> dict[str, Any]:
        if "pan_and_scan" in self.family_options:
            return {"do_pan_and_scan": self.family_options["pan_and_scan"]}
        return {}


def _auto_dtype_is_fp16(device: str) -> bool:
    """Whether ``dtype="auto"`` would pick float16 on ``device`` (a CUDA GPU without bfloat16)."""
    try:
        import torch
    except ImportError:  # reported when the model loads
        return False
    from captionkit.models.florence2 import resolve_device, resolve_dtype

    return resolve_dtype("auto", resolve_device(device), warn=False) is torch.float16
