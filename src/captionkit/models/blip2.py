"""BLIP-2 (native ``Blip2ForConditionalGeneration``): Q-Former query tokens in front of an OPT or T5 LM.

How it differs from the generic chat backend:

* no chat template and no system role: the prompt is ``"Question: {prompt} Answer:"``, the
  format the BLIP-2 OPT/T5 checkpoints were tuned on;
* ``Blip2Processor`` puts the ``num_query_tokens`` image tokens in front of the *already padded*
  text, so left padding lands in the middle of a row (``<image>… <pad>… </s> Question…``). The
  OPT LM derives positions from the attention mask, so that is not wrong as such, but we move
  every pad to the very left anyway: then a batched row is a single-image row with pads in
  front, which is the layout every decoder-only generation path assumes;
* with a decoder-only LM (OPT), ``generate`` returns the prompt ids followed by the new
  tokens (5.x passes ``input_ids`` through to the LM), so the prompt is cut off as usual;
  with an encoder-decoder LM (Flan-T5) only the decoder output comes back.
"""

from __future__ import annotations

from typing import Any

from captionkit.models import register_backend
from captionkit.models.chat_vlm import ChatVLMCaptioner

PROMPT_FORMAT = "Question: {prompt} Answer:"


def pads_to_the_left(inputs: dict[str, Any]) -> dict[str, Any]:
    """Move the padding of every row to its start, keeping the order of the real tokens."""
    import torch

    mask = inputs.get("attention_mask")
    if mask is None or bool(mask.all()):
        return inputs
    # a stable sort on the mask puts the zeros (pads) first and keeps the ones in order
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    moved = dict(inputs)
    for name in ("input_ids", "attention_mask"):
        moved[name] = torch.gather(inputs[name], 1, order)
    return moved


@register_backend(
    "blip2",
    kind="captioner",
    description="BLIP-2 (native transformers classes; OPT or Flan-T5 language model), 'Question: … Answer:' prompts",
    model_types=("blip-2",),
    default_model="Salesforce/blip2-opt-2.7b",
    modules=("transformers", "torch"),
)
class Blip2Captioner(ChatVLMCaptioner):
    family = "blip-2"
    model_class = "Blip2ForConditionalGeneration"
    supports_system_prompt = False
    uses_chat_template = False

    def prompt_text(self, prompt: str) -> str:
        return PROMPT_FORMAT.format(prompt=prompt.strip())

    def processor_inputs(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        return pads_to_the_left(super().processor_inputs(texts, images))

    def new_tokens(self, generated: Any, inputs: dict[str, Any]) -> Any:
        assert self.model is not None
        if getattr(self.model.config, "use_decoder_only_language_model", True):
            return super().new_tokens(generated, inputs)  # OPT: prompt ids come back first
        return generated  # T5: the decoder output only
