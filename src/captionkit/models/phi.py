"""Phi vision models: Phi-4-multimodal on native transformers classes, Phi-3/3.5-vision on remote code.

``phi4_multimodal`` (``Phi4MultimodalForCausalLM``; the hub checkpoint's converted revision,
e.g. ``--revision refs/pr/94`` of ``microsoft/Phi-4-multimodal-instruct``):

* it is a causal LM, not an ``AutoModelForImageTextToText`` model, and it always carries its
  (unused here) audio encoder;
* the prompt is built here in Phi's layout, ``<|system|>…<|end|><|user|><|image|>{prompt}<|end|>
  <|assistant|>``, not through the chat template: in transformers 5.x ``Phi4MultimodalProcessor``
  drops ``chat_template.jinja`` when loading, and the original template only takes string content;
* the SigLIP vision tower's attention is made bidirectional after loading (transformers 5.x marks
  it causal, which SDPA honours whenever no crop in the batch is padded; see
  :func:`bidirectional_vision_attention`);
* the converted weights keep the vision LoRA apart in ``vision-lora/``; it is loaded and made the
  active adapter when the folder (or hub repo) has one (needs ``peft``), as the model card does.

``phi3_v`` (``microsoft/Phi-3-vision-128k-instruct``, ``Phi-3.5-vision-instruct``) exists only as
remote code: without ``--trust-remote-code`` it is refused at construction; with it the model loads
through ``AutoModelForCausalLM`` + ``AutoProcessor(trust_remote_code=True)``. Its processor takes one
prompt at a time, so batches are generated image by image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError, MissingDependencyError, ModelNotAvailableError
from captionkit.models import is_local, register_backend
from captionkit.models.base import CaptionRequest, ItemFailure
from captionkit.models.chat_vlm import ChatVLMCaptioner, remote_code_error

log = logging.getLogger(__name__)

VISION_ADAPTER = "vision-lora"
PHI3_V_PROMPT = "<|user|>\n<|image_1|>\n{prompt}<|end|>\n<|assistant|>\n"
PHI3_V_SYSTEM = "<|system|>\n{system}<|end|>\n"


def bidirectional_vision_attention(model: Any) -> int:
    """Make the SigLIP vision tower's attention bidirectional under SDPA too; returns how many were fixed.

    transformers 5.x marks ``Phi4MultimodalVisionAttention`` ``is_causal = True``. Eager attention
    ignores the flag, but SDPA applies a causal mask whenever no padding mask is passed, which is
    the case exactly when every crop in the batch is unpadded (e.g. one 448×448-fitting image).
    The same image then gives different features alone and next to a padded one, and a causal
    mask is wrong for SigLIP in any case (the original Phi-4 code runs it bidirectionally).
    """
    embed = getattr(getattr(getattr(model, "model", None), "embed_tokens_extend", None), "image_embed", None)
    tower = getattr(embed, "img_processor", None)
    fixed = 0
    for module in tower.modules() if tower is not None else ():
        if getattr(module, "is_causal", False):
            module.is_causal = False
            fixed += 1
    return fixed


@register_backend(
    "phi4-multimodal",
    kind="captioner",
    description="Phi-4-multimodal (native transformers classes, converted checkpoint; vision LoRA applied)",
    model_types=("phi4_multimodal",),
    modules=("transformers", "torch"),
)
class Phi4MultimodalCaptioner(ChatVLMCaptioner):
    family = "phi4_multimodal"
    model_class = "Phi4MultimodalForCausalLM"
    uses_chat_template = False  # see the module docstring: the prompt is built in prompt_text
    adapter_loaded = False  # whether vision-lora is active (set by load)

    def prompt_text(self, prompt: str) -> str:
        assert self.processor is not None
        image_token = getattr(self.processor, "image_token", "<|image|>")
        system = f"<|system|>{self.chat.system_prompt}<|end|>" if self.chat.system_prompt else ""
        return f"{system}<|user|>{image_token}{prompt}<|end|><|assistant|>"

    def load(self) -> None:
        if self.model is not None:
            return
        super().load()
        bidirectional_vision_attention(self.model)
        self.adapter_loaded = self._load_vision_adapter()

    def _adapter_available(self) -> bool:
        if is_local(self.model_name):
            return (Path(self.model_name).expanduser() / VISION_ADAPTER / "adapter_config.json").is_file()
        from captionkit.models import fetch_hub_file

        try:
            fetch_hub_file(self.model_name, f"{VISION_ADAPTER}/adapter_config.json", cache_dir=self.cache_dir,
                           revision=self.revision)
        except ModelNotAvailableError:
            return False
        return True

    def _load_vision_adapter(self) -> bool:
        """Load and activate ``vision-lora`` when the checkpoint has it; False when it has none."""
        assert self.model is not None
        if not self._adapter_available():
            log.warning("%s: no %s/ adapter found; captioning with the base weights only.",
                        self.model_name, VISION_ADAPTER)
            return False
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            self.unload()
            raise MissingDependencyError("peft", f"{self.model_name}: Phi-4-multimodal's vision LoRA", extra="train")
        if is_local(self.model_name):
            source, options = str(Path(self.model_name).expanduser() / VISION_ADAPTER), {}
        else:
            source = self.model_name
            options = {"subfolder": VISION_ADAPTER, "cache_dir": self.cache_dir, "revision": self.revision}
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        # 5.x prints a "LOAD REPORT" listing base weights as missing from the adapter files (they never
        # hold base weights; nothing is re-initialised), so only errors are shown while it loads
        hf_logging.set_verbosity_error()
        try:
            # the first adapter loaded is the active one (set_adapter would also demand peft >= 0.22)
            self.model.load_adapter(source, adapter_name="vision", adapter_kwargs=options)
        except (OSError, ValueError) as error:
            self.unload()
            raise CaptionkitError(f"{self.model_name}: cannot load its {VISION_ADAPTER} adapter ({error}).") from error
        finally:
            hf_logging.set_verbosity(verbosity)
        self.model.eval()
        return True

    def fingerprint(self) -> dict[str, Any]:
        values = super().fingerprint()
        adapter = Path(self.model_name).expanduser() / VISION_ADAPTER
        if is_local(self.model_name) and adapter.is_dir():  # the folder revision does not look into subfolders
            from captionkit.core.identity import folder_identity

            values["vision_adapter"] = folder_identity(adapter)
        return values


@register_backend(
    "phi3-v",
    kind="captioner",
    description="Phi-3/3.5-vision (remote code: needs --trust-remote-code), one image per generate call",
    model_types=("phi3_v",),
    default_model="microsoft/Phi-3.5-vision-instruct",
    modules=("transformers", "torch"),
)
class Phi3VisionCaptioner(ChatVLMCaptioner):
    family = "phi3_v"
    model_class = "AutoModelForCausalLM"
    uses_chat_template = False

    def __init__(self, model: str, *args: Any, trust_remote_code: bool = False, **kwargs: Any) -> None:
        if not trust_remote_code:
            raise remote_code_error(str(model), kwargs.get("model_type") or self.family)
        if kwargs.get("attn_implementation", "sdpa") == "sdpa":
            kwargs["attn_implementation"] = "eager"  # its remote code has eager and flash-attention paths only
        super().__init__(model, *args, trust_remote_code=trust_remote_code, **kwargs)

    def prompt_text(self, prompt: str) -> str:
        system = PHI3_V_SYSTEM.format(system=self.chat.system_prompt) if self.chat.system_prompt else ""
        return system + PHI3_V_PROMPT.format(prompt=prompt)

    def processor_inputs(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        assert self.processor is not None and len(texts) == 1, "Phi3VProcessor takes one prompt"
        return self.processor(texts[0], images, return_tensors="pt")

    def caption_batch(self, requests: list[CaptionRequest]) -> list[dict[str, Any] | ItemFailure]:
        results: list[dict[str, Any] | ItemFailure] = []
        for request in requests:  # the remote processor does not batch prompts
            results.extend(super().caption_batch([request]))
        return results
