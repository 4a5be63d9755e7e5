"""Llama 3.2 Vision (native ``MllamaForConditionalGeneration``): images enter through cross-attention.

How it differs from the generic chat backend:

* ``MllamaProcessor`` wants one list of images per prompt (``nested_images``); each prompt
  carries one ``<|image|>`` token (the chat template puts it there), and the processor
  builds the cross-attention mask and the tile/aspect-ratio inputs from it;
* the chat template already starts with ``<|begin_of_text|>`` and the Llama 3 tokenizer adds
  BOS again unless told not to, so the text is tokenized without special tokens when it
  already starts with BOS (what ``processor.apply_chat_template(tokenize=True)`` does too).
"""

from __future__ import annotations

from captionkit.models import register_backend
from captionkit.models.chat_vlm import ChatVLMCaptioner


@register_backend(
    "mllama",
    kind="captioner",
    description="Llama 3.2 Vision (native transformers classes; cross-attention images, tiles)",
    model_types=("mllama",),
    default_model="meta-llama/Llama-3.2-11B-Vision-Instruct",
    modules=("transformers", "torch"),
)
class MllamaCaptioner(ChatVLMCaptioner):
    family = "mllama"
    model_class = "MllamaForConditionalGeneration"
    nested_images = True

