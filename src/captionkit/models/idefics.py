"""Idefics3 and SmolVLM captioners (native transformers classes).

What differs from the generic chat backend: the processor takes one list of images per
prompt (``nested_images``), resizes each image so its longest edge is ``size.longest_edge``
and cuts it into square tiles of the vision encoder's size plus a global view, each tile
costing ``image_seq_len`` tokens. ``longest_edge`` is the family's resolution option (set on
the loaded image processor's ``size``): lower it for fewer tiles (faster, less memory),
raise it for detail. SmolVLM's processor also
needs the ``num2words`` package.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from captionkit.core.errors import CaptionkitError, MissingDependencyError
from captionkit.models import register_backend
from captionkit.models.chat_vlm import ChatVLMCaptioner


class IdeficsCaptioner(ChatVLMCaptioner):
    """Idefics3 family: "User:<image>prompt<end_of_utterance>\\nAssistant:", images nested per prompt."""

    family = "idefics3"
    model_class = "AutoModelForImageTextToText"
    supports_system_prompt = True  # the template renders any role as "Role: text"
    nested_images = True

    def check_family_options(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = {name: value for name, value in options.items() if name != "longest_edge"}
        if unknown:
            super().check_family_options(unknown)  # raises, naming the unknown options
        value = options.get("longest_edge")
        if value is None:
            return {}
        if isinstance(value, bool) or not isinstance(value, int) or value < 16:
            raise CaptionkitError(
                f"longest_edge {value!r}: give the longest image side in pixels (at least 16), e.g. 1456 "
                "(4 tiles of 364) for Idefics3/SmolVLM."
            )
        return {"longest_edge": value}

    def load(self) -> None:
        fresh = self.model is None
        super().load()
        if fresh and "longest_edge" in self.family_options:
            # set on the loaded image processor, not as from_pretrained keywords: the tokenizer
            # would keep those and re-send them on every call
            image_processor = self.processor.image_processor
            size = image_processor.size
            if dataclasses.is_dataclass(size):
                image_processor.size = dataclasses.replace(size, longest_edge=self.family_options["longest_edge"])
            else:
                image_processor.size = {"longest_edge": self.family_options["longest_edge"]}


@register_backend(
    "idefics3",
    kind="captioner",
    description="Idefics3 chat VLMs (native transformers); longest_edge resolution option",
    model_types=("idefics3",),
)
class Idefics3Captioner(IdeficsCaptioner):
    family = "idefics3"


@register_backend(
    "smolvlm",
    kind="captioner",
    description="SmolVLM / SmolVLM2 chat VLMs (native transformers); longest_edge resolution option",
    model_types=("smolvlm",),
    modules=("num2words",),
)
class SmolVLMCaptioner(IdeficsCaptioner):
    family = "smolvlm"

    def load(self) -> None:
        import importlib.util

        if self.model is None and importlib.util.find_spec("num2words") is None:
            raise MissingDependencyError("num2words", "SmolVLM captioning (its processor)")
        super().load()
