"""Chat vision-language captioners on native transformers classes (no remote code by default).

One implementation drives every family: the processor's chat template builds the prompt,
the processor batches images of different sizes with left padding, ``generate`` decodes,
and only the new tokens are kept. A family module (``llava.py``, ``qwen_vl.py`` ...)
subclasses :class:`ChatVLMCaptioner` and overrides the few hooks where its family differs
(how images are nested, a prompt without a chat template, resolution limits), then
registers itself. Adding a family is one new file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.core.errors import CaptionkitError
from captionkit.core.identity import model_identity
from captionkit.core.images import fit_within
from captionkit.models import free_accelerator_memory, release
from captionkit.models.base import CaptionRequest, ChatSettings, ItemFailure, render_chat_texts, sample_seed

log = logging.getLogger(__name__)

ATTENTION_CHOICES = ("sdpa", "eager", "flash_attention_2")


def template_writes_bos(processor: Any, texts: list[str]) -> bool:
    """True when every prompt already starts with the BOS token (the tokenizer must not add a second)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and all(text.startswith(bos) for text in texts)


def context_limit(config: Any) -> int | None:
    """The language model's positions (``max_position_embeddings`` of the text config), if the config says."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else None


def context_error(model: str, limit: int, prompt_tokens: int, max_new_tokens: int, what: str) -> str:
    """One sentence on a prompt that cannot fit: the numbers, and the two ways out."""
    return (f"{model}: {what} is {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that exceeds the "
            f"model's {limit}-token context (shorten the prompt or lower max_new_tokens to at most "
            f"{max(limit - prompt_tokens, 0)})")


def remote_code_error(model: str, model_type: str) -> CaptionkitError:
    return CaptionkitError(
        f"{model}: model type '{model_type}' needs the model's own Python code (remote code), which captionkit "
        "does not run unless you pass --trust-remote-code (only do that for a model you trust)."
    )


class ChatVLMCaptioner:
    """Batch captioning with a chat VLM. ``preprocess`` is thread-safe; ``caption_batch`` is not."""

    backend_name = "transformers"  # replaced by the registered name of each family
    family = "chat"
    model_class: str = "AutoModelForImageTextToText"
    supports_system_prompt = True
    nested_images = False  # processors such as Mllama/Idefics3 take one list of images per prompt
    uses_chat_template = True

    def __init__(
        self,
        model: str,
        chat: ChatSettings | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_image_side: int | None = None,
        model_type: str | None = None,
        **family_options: Any,
    ) -> None:
        if attn_implementation not in ATTENTION_CHOICES:
            raise CaptionkitError(
                f"--attn-implementation {attn_implementation}: use {', '.join(ATTENTION_CHOICES)}."
            )
        if max_image_side is not None and max_image_side < 16:
            raise CaptionkitError("--max-image-side must be at least 16 pixels.")
        self.model_name = str(model)
        self.chat = chat or ChatSettings()
        if self.chat.system_prompt and not self.supports_system_prompt:
            raise CaptionkitError(
                f"{self.model_name}: this model family ({model_type or self.family}) has no system role; "
                "put the instructions in --prompt instead of --system-prompt."
            )
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.device_name = device
        self.cache_dir = cache_dir
        self.revision = revision
        self.trust_remote_code = trust_remote_code
        self.max_image_side = max_image_side
        self.model_type = model_type or self.family
        self.family_options = self.check_family_options(family_options)
        self.model = None
        self.processor = None
        self.device = "cpu"
        self.dtype = None

    # hooks for family modules -------------------------------------------------------
    def check_family_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Validate family-specific options (e.g. Qwen2-VL min/max pixels); unknown ones are an error."""
        if options:
            names = ", ".join(f"--{name.replace('_', '-')}" for name in options)
            raise CaptionkitError(f"{names}: not an option of the {self.family} family ({self.model_type}).")
        return {}

    def messages(self, prompt: str) -> list[dict[str, Any]]:
        """The chat for one image: optional system turn, then the image and the prompt."""
        turns: list[dict[str, Any]] = []
        if self.chat.system_prompt:
            turns.append({"role": "system", "content": [{"type": "text", "text": self.chat.system_prompt}]})
        turns.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
        return turns

    def prompt_text(self, prompt: str) -> str:
        """The model's input text for one image (the chat template, unless the family has none).

        Some templates drop a system turn they do not know: that is an error, not a silent loss.
        """
        assert self.processor is not None
        text = self.processor.apply_chat_template(self.messages(prompt), add_generation_prompt=True, tokenize=False)
        if self.chat.system_prompt and self.chat.system_prompt.strip() not in text:
            raise CaptionkitError(
                f"{self.model_name}: this model's chat template drops the system turn; "
                "put the instructions in --prompt instead of --system-prompt."
            )
        return text

    def processor_options(self) -> dict[str, Any]:
        """Extra keyword arguments for ``AutoProcessor.from_pretrained``."""
        return {}

    def call_options(self) -> dict[str, Any]:
        """Extra keyword arguments for each processor call (e.g. Gemma 3's pan-and-scan)."""
        return {}

    def processor_inputs(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        """Batched model inputs: left-padded texts and the images (nested per prompt where needed).

        A template that writes the BOS token itself must not get a second one from the tokenizer.
        """
        assert self.processor is not None
        batch_images = [[image] for image in images] if self.nested_images else images
        return self.processor(text=texts, images=batch_images, padding=True, return_tensors="pt",
                              add_special_tokens=not template_writes_bos(self.processor, texts),
                              **self.call_options())

    def new_tokens(self, generated: Any, inputs: dict[str, Any]) -> Any:
        """The generated continuation without the prompt (decoder-only models echo the prompt)."""
        return generated[:, inputs["input_ids"].shape[1]:]

    # identity ------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        from captionkit.models.florence2 import dtype_label

        model_id, revision = model_identity(self.model_name, self.revision)
        return {
            "backend": self.backend_name,
            "family": self.model_type,
            "model": model_id,
            "revision": revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": dtype_label(self.dtype_name, self.device_name),
            "chat": self.chat.fingerprint(),
            "max_image_side": self.max_image_side,
            "family_options": self.family_options,
        }

    # lifetime ------------------------------------------------------------------------
    def load(self) -> None:
        """Load processor and model on the chosen device and dtype (once)."""
        if self.model is not None:
            return
        ensure_torchvision()
        import transformers

        from captionkit.models.florence2 import check_attention, loading_error, resolve_device, resolve_dtype

        transformers.utils.logging.disable_progress_bar()
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        check_attention(self.attn_implementation, self.device, self.dtype)
        options = {"cache_dir": self.cache_dir, "revision": self.revision, "trust_remote_code": self.trust_remote_code}
        model_class = getattr(transformers, self.model_class)
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(
                self.model_name, **options, **self.processor_options()
            )
            model = model_class.from_pretrained(
                self.model_name, dtype=self.dtype, attn_implementation=self.attn_implementation, **options
            )
        except OSError as error:
            raise loading_error(self.model_name, self.model_type,
                                "config.json, weights and the processor and tokenizer files", error) from error
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if self.uses_chat_template and not getattr(self.processor, "chat_template", None):
            raise CaptionkitError(
                f"{self.model_name}: the processor has no chat template (chat_template.jinja or "
                "chat_template.json), so captionkit cannot build the prompt. Use the model's instruct/chat release."
            )
        self.model = model.to(self.device).eval()
        self._check_context(tokenizer)

    def _check_context(self, tokenizer: Any) -> None:
        """Fail at load, not after minutes of batches, when the prompt alone plus max_new_tokens cannot fit."""
        limit = context_limit(self.model.config)
        if not limit:
            return
        text = self.prompt_text(self.chat.prompt)
        length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if length + self.chat.max_new_tokens > limit:
            self.unload()
            raise CaptionkitError(context_error(self.model_name, limit, length, self.chat.max_new_tokens,
                                                "the prompt (before the image's tokens)") + ".")

    def load_processor(self) -> None:
        """Nothing to load for decode workers elsewhere: ``preprocess`` only downscales (the processor runs later)."""

    def unload(self) -> None:
        """Free the model, the processor and cached accelerator memory."""
        release(self, "model", "processor")

    def recover_from_oom(self) -> None:
        free_accelerator_memory()

    # work ----------------------------------------------------------------------------
    def image_size(self) -> tuple[int, int] | None:
        """Decode JPEGs at a reduced scale only when --max-image-side bounds what the model sees."""
        return (self.max_image_side, self.max_image_side) if self.max_image_side else None

    def preprocess(self, image: Any) -> Any:
        """Downscale to --max-image-side (the processor does the rest on the main thread, batched)."""
        return fit_within(image, self.max_image_side)

    def generation_kwargs(self) -> dict[str, Any]:
        chat = self.chat
        options: dict[str, Any] = {"max_new_tokens": chat.max_new_tokens, "num_return_sequences": chat.samples}
        if chat.greedy:
            options.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None)
        else:
            options.update(do_sample=True, temperature=chat.temperature, top_p=chat.top_p, top_k=chat.top_k)
        if chat.repetition_penalty is not None:
            options["repetition_penalty"] = chat.repetition_penalty
        return options

    def caption_batch(self, requests: list[CaptionRequest]) -> list[dict[str, Any] | ItemFailure]:
        """Generate for a batch of images (mixed sizes); one raw result per image."""
        import torch

        assert self.model is not None and self.processor is not None, "load() first"
        seeded = self.chat.seed is not None and not self.chat.greedy
        if seeded and len(requests) > 1:
            # One random stream per image: a batch shares one stream, so a resumed run (other batches) or
            # another batch size would sample other captions. Seeded sampling runs image by image.
            return [result for request in requests for result in self.caption_batch([request])]
        texts = [self.prompt_text(request.prompt or self.chat.prompt) for request in requests]
        inputs = self.processor_inputs(texts, [request.payload for request in requests])
        too_long = self._over_context(inputs)
        if too_long:  # those fail at once, with the numbers; the rest of the batch runs without them
            rest = [request for index, request in enumerate(requests) if index not in too_long]
            done = iter(self.caption_batch(rest) if rest else [])
            return [ItemFailure(too_long[index]) if index in too_long else next(done) for index in range(len(requests))]
        inputs = {
            name: (value.to(self.device, dtype=self.dtype) if torch.is_floating_point(value)
                   else value.to(self.device)) if hasattr(value, "to") else value
            for name, value in inputs.items()
        }
        if seeded:
            torch.manual_seed(sample_seed(self.chat.seed, requests[0].key))
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        with torch.inference_mode():
            generated = self.model.generate(
                **inputs, **self.generation_kwargs(), pad_token_id=tokenizer.pad_token_id,
            )
        continuations = self.new_tokens(generated, inputs)
        decoded = self.processor.batch_decode(continuations, skip_special_tokens=True)
        samples = self.chat.samples
        return [
            {"texts": [text.strip() for text in decoded[index * samples:(index + 1) * samples]]}
            for index in range(len(requests))
        ]

    def _over_context(self, inputs: dict[str, Any]) -> dict[int, str]:
        """Rows whose prompt (with the image's tokens) plus max_new_tokens exceed the model's positions."""
        limit = context_limit(self.model.config)
        mask = inputs.get("attention_mask")
        if not limit or mask is None:
            return {}
        lengths = [int(length) for length in mask.sum(dim=1).tolist()]
        return {index: context_error(self.model_name, limit, length, self.chat.max_new_tokens,
                                     "the prompt with the image's tokens")
                for index, length in enumerate(lengths) if length + self.chat.max_new_tokens > limit}

    @staticmethod
    def render_texts(raw: Any) -> list[str]:
        return render_chat_texts(raw)
