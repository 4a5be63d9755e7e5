"""Florence-2 captioner on the native transformers classes (no remote code).

Loads ``Florence2ForConditionalGeneration`` + ``Florence2Processor`` from a hub id or a
local folder (also a folder written by ``captionkit train captioner``), optionally with a
PEFT LoRA adapter on top. ``microsoft/Florence-2-*`` ids carry remote code for the old
layout and do not load with these classes: they are mapped to the converted
``florence-community`` checkpoints, with a notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.core.errors import CaptionkitError, MissingDependencyError
from captionkit.models import is_local, model_unavailable, register_backend, release
from captionkit.models.base import CaptionRequest

log = logging.getLogger(__name__)

DEFAULT_MODEL = "florence-community/Florence-2-base"
TASKS = (
    "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>", "<OCR_WITH_REGION>", "<OD>",
    "<DENSE_REGION_CAPTION>", "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>",
    "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>",
)
TASKS_WITH_INPUT = {
    "<CAPTION_TO_PHRASE_GROUNDING>", "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>",
    "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>",
}
_MICROSOFT_TO_NATIVE = {
    f"microsoft/Florence-2-{size}": f"florence-community/Florence-2-{size}"
    for size in ("base", "large", "base-ft", "large-ft")
}


def native_model_id(model: str) -> str:
    """Map a ``microsoft/Florence-2-*`` id to the converted checkpoint the native classes load."""
    if model in _MICROSOFT_TO_NATIVE:
        target = _MICROSOFT_TO_NATIVE[model]
        log.warning("%s holds remote code for the old layout; using the converted checkpoint %s instead.",
                    model, target)
        return target
    if model.lower().startswith("microsoft/florence-2") and not is_local(model):
        raise CaptionkitError(
            f"'{model}' is a remote-code Florence-2 checkpoint that the native transformers classes cannot load; "
            "use a converted one such as florence-community/Florence-2-base or florence-community/Florence-2-large."
        )
    return model


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is usable, else 'cpu'; checks that an asked-for GPU exists."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CaptionkitError(f"--device {device} asked for a GPU, but torch sees none. Use --device cpu.")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CaptionkitError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible (cuda:0..)."
            )
    elif device not in ("cpu", "mps"):
        raise CaptionkitError(f"--device {device}: use auto, cpu, cuda or cuda:N.")
    return device


# --dtype's names for a precision, and torch's name for it (the attribute of torch, as fingerprints name it)
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
               "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_dtype(dtype: str, device: str, warn: bool = True):
    """'auto' → bf16 on a GPU that has it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise CaptionkitError(f"--dtype {dtype}: use auto, fp32, fp16 or bf16.")
    if warn and device == "cpu" and DTYPE_NAMES[dtype] != "float32":
        log.warning("--dtype %s on CPU is usually slower than fp32 (most CPUs lack half-precision units).", dtype)
    return getattr(torch, DTYPE_NAMES[dtype])


def dtype_label(dtype: str, device: str) -> str:
    """The precision a run will use, for fingerprints ('auto' on a CPU is 'float32'): it changes the output.

    On a CPU (or mps) without torch: a Ray driver computes the fingerprint its workers will see and never
    runs the model itself, so it does not pay torch's import (~2 s) for it."""
    label = "float32" if dtype == "auto" else DTYPE_NAMES.get(dtype)
    if device in ("cpu", "mps") and label is not None:
        return label
    return str(resolve_dtype(dtype, resolve_device(device), warn=False)).removeprefix("torch.")


def check_attention(attn_implementation: str, device: str, dtype) -> None:
    """flash_attention_2 needs its package, a CUDA GPU and half precision: say so before loading weights."""
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn") is None:
        raise MissingDependencyError("flash-attn", "--attn-implementation flash_attention_2")
    if not device.startswith("cuda") or dtype is torch.float32:
        raise CaptionkitError("flash_attention_2 needs a CUDA GPU and --dtype fp16 or bf16.")


def loading_error(model: str, what: str, needs: str, error: BaseException) -> CaptionkitError:
    """One plain message when from_pretrained fails: a broken environment, a broken local folder, or a hub
    model not to be had."""
    from captionkit.core.environment import broken_environment

    broken = broken_environment(error)
    if broken is not None:  # a package failing to import inside transformers: not the folder's fault
        return broken
    if is_local(model):
        return CaptionkitError(f"{model}: not a loadable {what} folder ({error}). It needs {needs} "
                               "(as saved by save_pretrained).")
    return model_unavailable(model, error)


@dataclass
class GenerationSettings:
    """Decoding options passed to ``generate``; all are part of the result fingerprint."""

    max_new_tokens: int = 256
    num_beams: int = 3
    early_stopping: bool = False
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None

    def kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "num_beams": self.num_beams,
            "do_sample": False,
        }
        if self.num_beams > 1:
            options["early_stopping"] = self.early_stopping
        if self.repetition_penalty is not None:
            options["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size is not None:
            options["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.length_penalty is not None:
            options["length_penalty"] = self.length_penalty
        return options


@register_backend(
    "florence2",
    kind="captioner",
    description="Florence-2 (native transformers classes): captions, OCR, detection tasks; LoRA adapters",
    model_types=("florence2",),
    default_model=DEFAULT_MODEL,
    style="florence",
)
class Florence2Captioner:
    """Batch captioning with Florence-2. ``preprocess`` is thread-safe; ``caption_batch`` is not."""

    takes_device_pixels = True  # caption_batch stacks pixels with .to(device): ones copied there ahead stay put

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        task: str = "<CAPTION>",
        task_input: str | None = None,
        generation: GenerationSettings | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        device: str = "auto",
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        adapter: str | Path | None = None,
    ) -> None:
        if task not in TASKS:
            raise CaptionkitError(f"--task {task}: not a Florence-2 task; use one of {', '.join(TASKS)}.")
        if task in TASKS_WITH_INPUT and not task_input:
            raise CaptionkitError(f"--task {task} needs --task-input TEXT (e.g. a phrase or region).")
        if task not in TASKS_WITH_INPUT and task_input:
            raise CaptionkitError(f"--task-input is only used by {', '.join(sorted(TASKS_WITH_INPUT))}.")
        if attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise CaptionkitError(
                f"--attn-implementation {attn_implementation}: use sdpa, eager or flash_attention_2."
            )
        self.model_name = native_model_id(str(model))
        self.task = task
        self.task_input = task_input
        self.generation = generation or GenerationSettings()
        self.dtype_name = dtype
        self.attn_implementation = attn_implementation
        self.device_name = device
        self.cache_dir = cache_dir
        self.revision = revision
        self.adapter = Path(adapter).expanduser() if adapter else None
        self.model = None
        self.processor = None
        self._prompt_inputs: dict[str, Any] | None = None

    # identity ----------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the raw output, precision included (fp16 captions differ from fp32 ones)."""
        from captionkit.core.identity import folder_identity, model_identity

        model_id, revision = model_identity(self.model_name, self.revision)
        adapter = None
        if self.adapter is not None:  # like the model: its content, not its place
            adapter = {"revision": folder_identity(self.adapter)}
        return {
            "backend": "florence2",
            "model": model_id,
            "revision": revision,
            "adapter": adapter,
            "task": self.task,
            "task_input": self.task_input,
            "generation": self.generation.kwargs(),
            "dtype": dtype_label(self.dtype_name, self.device_name),
        }

    # lifetime ----------------------------------------------------------------
    def load(self) -> None:
        """Load processor and model on the chosen device and dtype (once)."""
        if self.model is not None:
            return
        ensure_torchvision()
        import transformers
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        transformers.utils.logging.disable_progress_bar()  # captionkit shows its own progress

        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        check_attention(self.attn_implementation, self.device, self.dtype)
        options = {"cache_dir": self.cache_dir, "revision": self.revision}
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_name, **options)
            model = Florence2ForConditionalGeneration.from_pretrained(
                self.model_name, dtype=self.dtype, attn_implementation=self.attn_implementation, **options
            )
        except OSError as error:
            raise loading_error(self.model_name, "Florence-2", "config.json, weights and the processor files",
                                error) from error
        if self.adapter is not None:
            try:
                from peft import PeftModel
            except ImportError as error:
                raise MissingDependencyError("peft", "--adapter", extra="train") from error
            if not (self.adapter / "adapter_config.json").is_file():
                raise CaptionkitError(
                    f"{self.adapter}: no adapter_config.json; point --adapter at a LoRA adapter folder "
                    "saved by `captionkit train captioner`."
                )
            from captionkit.core.warnings_filter import peft_wrapping_quietly

            with peft_wrapping_quietly():
                model = PeftModel.from_pretrained(model, str(self.adapter))
        self.model = model.to(self.device).eval()
        prompt = self.task + (self.task_input or "")
        from PIL import Image

        size = self.image_size() or (64, 64)
        encoded = self.processor(text=[prompt], images=[Image.new("RGB", size)], return_tensors="pt")
        self._check_context()
        self._prompt_inputs = {
            "input_ids": encoded["input_ids"].to(self.device),
            "attention_mask": encoded["attention_mask"].to(self.device),
        }

    def _check_context(self) -> None:
        """The decoder has learned positions: a longer caption fails every image with IndexError. Fail at load."""
        from captionkit.models.chat_vlm import context_limit

        limit = context_limit(self.model.config)
        wanted = self.generation.max_new_tokens
        if limit and wanted + 1 > limit:  # +1: the decoder's start token
            self.unload()
            raise CaptionkitError(f"{self.model_name}: max_new_tokens {wanted} exceeds the {limit} positions of "
                                  f"this Florence-2 decoder; lower max_new_tokens to at most {limit - 1}.")

    def load_processor(self) -> None:
        """Only what ``preprocess`` needs, for decode workers that never run the model (distributed executors)."""
        if self.processor is not None:
            return
        ensure_torchvision()
        import transformers
        from transformers import AutoProcessor

        transformers.utils.logging.disable_progress_bar()
        try:
            self.processor = AutoProcessor.from_pretrained(self.model_name, cache_dir=self.cache_dir,
                                                           revision=self.revision)
        except OSError as error:
            raise loading_error(self.model_name, "Florence-2", "config.json and the processor files", error) from error

    def unload(self) -> None:
        """Free the model (and GPU memory)."""
        self._prompt_inputs = None  # a few prompt tensors in a plain dict (not weakly referenceable)
        release(self, "model")

    def recover_from_oom(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # work --------------------------------------------------------------------
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) the processor resizes to; decoders may decode JPEGs at a scale just above it."""
        if self.processor is None:
            return None
        size = self.processor.image_processor.size
        if "height" in size and "width" in size:
            return (int(size["width"]), int(size["height"]))
        if "shortest_edge" in size:
            return (int(size["shortest_edge"]), int(size["shortest_edge"]))
        return None

    def preprocess(self, image) -> Any:
        """One RGB image → its pixel tensor (runs in decode workers)."""
        assert self.processor is not None, "load() first"
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def caption_batch(self, requests: list[CaptionRequest]) -> list[dict[str, Any]]:
        """Generate for a batch of preprocessed images; one raw result per image."""
        import torch

        assert self.model is not None and self._prompt_inputs is not None, "load() first"
        image_sizes = [request.original_size for request in requests]
        batch = torch.stack([request.payload for request in requests]).to(self.device, dtype=self.dtype)
        count = batch.shape[0]
        input_ids = self._prompt_inputs["input_ids"].expand(count, -1)
        attention_mask = self._prompt_inputs["attention_mask"].expand(count, -1)
        with torch.inference_mode():
            generated = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=batch,
                **self.generation.kwargs(),
            )
        texts = self.processor.batch_decode(generated, skip_special_tokens=False)
        pad = self.processor.tokenizer.pad_token
        if pad:  # shorter sequences of a batch are padded after their end token
            texts = [text.replace(pad, "") for text in texts]
        results = []
        for text, size in zip(texts, image_sizes, strict=True):
            parsed = self.processor.post_process_generation(text, task=self.task, image_size=size)
            results.append({"text": text, "parsed": parsed.get(self.task, parsed)})
        return results

    @staticmethod
    def render_texts(raw: dict[str, Any]) -> list[str]:
        return [render_result(raw)]


def render_result(raw: dict[str, Any]) -> str:
    """Text for a caption file from a raw Florence-2 result (labels for detection tasks)."""
    parsed = raw.get("parsed")
    if isinstance(parsed, str):
        return parsed
    if isinstance(parsed, dict):
        for key in ("labels", "quad_labels", "bboxes_labels", "polygons_labels"):
            labels = parsed.get(key)
            if labels:
                seen: list[str] = []
                for label in labels:
                    label = str(label).strip()
                    if label and label not in seen:
                        seen.append(label)
                return ", ".join(seen)
        return ""
    return str(parsed) if parsed is not None else ""
