"""LLaVA (1.5 and JoyCaption), LLaVA-NeXT (1.6) and LLaVA-OneVision on native transformers classes.

How they differ from the generic chat backend:

* JoyCaption checkpoints are plain ``llava`` (SigLIP tower, ``vision_feature_select_strategy
  "full"``, a Llama-3 template): nothing JoyCaption-specific is needed, the processor reads
  patch size and feature selection from the checkpoint;
* templates that write the BOS token themselves (Llama-3/JoyCaption) meet tokenizers that add it
  again: the prompt is then tokenized without the tokenizer's own special tokens, so the model sees
  one BOS as it was trained (``processor.apply_chat_template(tokenize=True)`` does the same);
* a system prompt must reach the model: the rendered prompt is checked for it, since some chat
  templates drop turns they do not know instead of failing;
* LLaVA-NeXT and OneVision split a large image into any-res tiles (up to 5x the tokens of one
  tile); ``anyres=False`` keeps only the base resolution in the grid for processor and model alike,
  so each image costs two tiles (overview + one) whatever its size.

``vision_feature_select_strategy`` is not an option: it is fixed by how the checkpoint was
trained, and processor and model both read it from the checkpoint.
"""

from __future__ import annotations

from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.models import register_backend
from captionkit.models.chat_vlm import ChatVLMCaptioner


class _LlavaFamily(ChatVLMCaptioner):
    """What every LLaVA variant shares (one-BOS tokenization and the system-turn check are in the base)."""


@register_backend(
    "llava",
    kind="captioner",
    description="LLaVA-1.5 and JoyCaption (native LlavaForConditionalGeneration, chat template)",
    model_types=("llava",),
    default_model="llava-hf/llava-1.5-7b-hf",
    modules=("transformers", "torch"),
)
class LlavaCaptioner(_LlavaFamily):
    family = "llava"


class _AnyResFamily(_LlavaFamily):
    """LLaVA-NeXT / OneVision: the any-res tile grid can be limited to the base resolution."""

    def check_family_options(self, options: dict[str, Any]) -> dict[str, Any]:
        options = dict(options)
        anyres = options.pop("anyres", None)
        checked = super().check_family_options(options)
        if anyres is None:
            return checked
        if not isinstance(anyres, bool):
            raise CaptionkitError(f"--anyres {anyres!r}: use true or false.")
        return {**checked, "anyres": anyres}

    def load(self) -> None:
        already = self.model is not None
        super().load()
        if not already and self.family_options.get("anyres") is False:
            self._base_resolution_only()

    def _base_resolution_only(self) -> None:
        """One grid point, the tower's own input size: processor and model must agree on the grid."""
        assert self.model is not None and self.processor is not None
        side = int(self.model.config.vision_config.image_size)
        grid = [[side, side]]
        self.processor.image_processor.image_grid_pinpoints = grid
        self.model.config.image_grid_pinpoints = grid
        inner = getattr(self.model, "model", None)  # the base model reads its own config object
        if inner is not None:
            inner.config.image_grid_pinpoints = grid


@register_backend(
    "llava_next",
    kind="captioner",
    description="LLaVA-NeXT / LLaVA-1.6 (native, any-res tiles; anyres=False for one tile per image)",
    model_types=("llava_next",),
    default_model="llava-hf/llava-v1.6-mistral-7b-hf",
    modules=("transformers", "torch"),
)
class LlavaNextCaptioner(_AnyResFamily):
    family = "llava_next"


@register_backend(
    "llava_onevision",
    kind="captioner",
    description="LLaVA-OneVision (native, SigLIP + Qwen2, any-res tiles; anyres=False for one tile per image)",
    model_types=("llava_onevision",),
    default_model="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
    modules=("transformers", "torch"),
)
class LlavaOnevisionCaptioner(_AnyResFamily):
    family = "llava_onevision"
