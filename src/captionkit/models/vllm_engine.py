"""Chat VLM captioner on a vLLM engine (offline ``vllm.LLM``), for CUDA machines.

vLLM is not a dependency of captionkit and is never imported at module import: only ``load()``
imports it (with an install hint when it is missing). Everything that decides *what* is sent
to the engine is a plain function here, testable without vLLM:

* :func:`prompt_family` picks the prompt format from the model's ``config.json``
  (``model_type``, plus the language model where one type covers several formats);
* :func:`build_prompt` writes one prompt in that format (image placeholder included);
* :func:`engine_kwargs` / :func:`sampling_kwargs` are the ``LLM(...)`` / ``SamplingParams(...)``
  arguments; :func:`build_requests` / :func:`parse_outputs` convert to and from vLLM's
  request and output objects.

Prompt formats follow vLLM's ``examples/offline_inference/vision_language.py`` and the
checkpoints' chat templates, with one deliberate difference: no literal BOS token
(``<|begin_of_text|>``, ``<bos>``). vLLM tokenizes text prompts with special tokens on, so the
tokenizers of those families add BOS themselves and a literal one would be doubled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit.core.errors import CaptionkitError, MissingDependencyError, require
from captionkit.core.images import fit_within
from captionkit.models import free_accelerator_memory, is_local, read_model_config, register_backend
from captionkit.models.base import CaptionRequest, ChatSettings, ItemFailure, render_chat_texts

log = logging.getLogger(__name__)

DTYPES = {
    "auto": "auto",
    "fp32": "float32", "float32": "float32", "float": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}
# the last vLLM release line that still ran Llama-3.2-Vision (encoder-decoder models other than
# Whisper were removed from vLLM in September 2025, vllm-project/vllm#24907)
MLLAMA_LAST_VLLM = (0, 10)


# prompt formats ------------------------------------------------------------------------------
def _blip2(question: str, system: str | None) -> str:
    return f"Question: {question} Answer:"


def _llava(question: str, system: str | None) -> str:
    # llava-hf's template writes a system turn as plain text in front of "USER:"
    prefix = f"{system} " if system else ""
    return f"{prefix}USER: <image>\n{question}\nASSISTANT:"


def _llava_next_mistral(question: str, system: str | None) -> str:
    return f"[INST] <image>\n{question} [/INST]"


def _llava_onevision(question: str, system: str | None) -> str:
    # the checkpoint's template: "<|im_start|>" + role + " ", the images, then "\n" + text
    prefix = f"<|im_start|>system \n{system}<|im_end|>\n" if system else ""
    return f"{prefix}<|im_start|>user <image>\n{question}<|im_end|>\n<|im_start|>assistant\n"


def _mllama(question: str, system: str | None) -> str:
    prefix = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    return (
        f"{prefix}<|start_header_id|>user<|end_header_id|>\n\n<|image|>{question}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def _phi3_v(question: str, system: str | None) -> str:
    prefix = f"<|system|>\n{system}<|end|>\n" if system else ""
    return f"{prefix}<|user|>\n<|image_1|>\n{question}<|end|>\n<|assistant|>\n"


def _qwen_vl(question: str, system: str | None) -> str:
    # Qwen2-VL / Qwen2.5-VL templates put this default system turn in when none is given
    system_text = system or "You are a helpful assistant."
    return (
        f"<|im_start|>system\n{system_text}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _gemma3(question: str, system: str | None) -> str:
    # Gemma 3 has no system role: its template puts the system text at the top of the first user turn
    prefix = f"{system}\n\n" if system else ""
    return f"<start_of_turn>user\n{prefix}<start_of_image>{question}<end_of_turn>\n<start_of_turn>model\n"


def _idefics3(question: str, system: str | None) -> str:
    prefix = f"System: {system}<end_of_utterance>\n" if system else ""
    return f"{prefix}User:<image>{question}<end_of_utterance>\nAssistant:"


def _smolvlm(question: str, system: str | None) -> str:
    # SmolVLM's template opens with "<|im_start|>" (its tokenizer adds no BOS of its own)
    prefix = f"System: {system}<end_of_utterance>\n" if system else ""
    return f"<|im_start|>{prefix}User:<image>{question}<end_of_utterance>\nAssistant:"


@dataclass(frozen=True)
class PromptFormat:
    """How one family's prompt is written for vLLM."""

    build: Callable[[str, str | None], str]
    placeholder: str  # the image token in the prompt ("" where vLLM places the image itself)
    system: bool  # has a system role (or a documented place for system text)
    example: str  # a checkpoint of this family
    remote_code: bool = False  # vLLM needs the checkpoint's own processor code


PROMPT_FORMATS: dict[str, PromptFormat] = {
    "blip-2": PromptFormat(_blip2, "", False, "Salesforce/blip2-opt-2.7b"),
    "llava": PromptFormat(_llava, "<image>", True, "llava-hf/llava-1.5-7b-hf"),
    "llava_next": PromptFormat(_llava_next_mistral, "<image>", False, "llava-hf/llava-v1.6-mistral-7b-hf"),
    "llava_onevision": PromptFormat(_llava_onevision, "<image>", True, "llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    "mllama": PromptFormat(_mllama, "<|image|>", True, "meta-llama/Llama-3.2-11B-Vision-Instruct"),
    "phi3_v": PromptFormat(_phi3_v, "<|image_1|>", True, "microsoft/Phi-3.5-vision-instruct", remote_code=True),
    "qwen2_vl": PromptFormat(_qwen_vl, "<|image_pad|>", True, "Qwen/Qwen2-VL-7B-Instruct"),
    "qwen2_5_vl": PromptFormat(_qwen_vl, "<|image_pad|>", True, "Qwen/Qwen2.5-VL-7B-Instruct"),
    "gemma3": PromptFormat(_gemma3, "<start_of_image>", True, "google/gemma-3-4b-it"),
    "idefics3": PromptFormat(_idefics3, "<image>", True, "HuggingFaceM4/Idefics3-8B-Llama3"),
    "smolvlm": PromptFormat(_smolvlm, "<image>", True, "HuggingFaceTB/SmolVLM2-2.2B-Instruct"),
}


def supported_model_types() -> list[str]:
    return sorted(PROMPT_FORMATS)


def prompt_family(config: dict[str, Any], model: str = "this model") -> str:
    """The key of :data:`PROMPT_FORMATS` for a model's ``config.json``, or a plain error.

    Mostly the ``model_type``; where one type covers checkpoints with different prompt
    formats, the language model inside decides (or the checkpoint is refused rather than
    prompted in a format it was not tuned on).
    """
    model_type = str(config.get("model_type") or "")
    if model_type not in PROMPT_FORMATS:
        found = f"model type '{model_type}'" if model_type else "no model_type in its config.json"
        raise CaptionkitError(
            f"{model}: {found} has no prompt format in the vLLM backend; supported model types: "
            f"{', '.join(supported_model_types())}. Try --backend transformers, or serve the model with "
            "`vllm serve` and use --backend openai (the server applies the model's own chat template)."
        )
    text_config = config.get("text_config") or {}
    language_model = str(text_config.get("model_type") or "")
    if model_type == "blip-2" and language_model not in ("", "opt"):
        raise CaptionkitError(
            f"{model}: a BLIP-2 checkpoint with a {language_model} language model; vLLM runs BLIP-2 only with "
            "OPT language models (e.g. Salesforce/blip2-opt-2.7b). Use --backend transformers for this one."
        )
    if model_type == "llava" and language_model not in ("", "llama"):
        raise CaptionkitError(
            f"{model}: a LLaVA checkpoint on a {language_model} language model; the vLLM backend knows the "
            "LLaVA-1.5 (Vicuna) prompt format only. Use --backend transformers (the checkpoint's chat template) "
            "or --backend openai with `vllm serve`."
        )
    if model_type == "llava_next" and language_model != "mistral":
        raise CaptionkitError(
            f"{model}: a LLaVA-NeXT checkpoint on a {language_model or 'llama'} language model; the vLLM backend "
            "knows the Mistral format ([INST] … [/INST], llava-hf/llava-v1.6-mistral-7b-hf) only. Use --backend "
            "transformers (the checkpoint's chat template) or --backend openai with `vllm serve`."
        )
    if model_type == "idefics3" and int(text_config.get("vocab_size") or 128_256) < 100_000:
        return "smolvlm"  # SmolVLM (v1) checkpoints are idefics3 models with SmolLM2's template
    return model_type


def build_prompt(model_type: str, question: str, system_prompt: str | None = None) -> str:
    """One prompt in the format of a :data:`PROMPT_FORMATS` family (a model type)."""
    form = PROMPT_FORMATS.get(model_type)
    if form is None:
        raise CaptionkitError(
            f"model type '{model_type}' has no prompt format in the vLLM backend; supported model types: "
            f"{', '.join(supported_model_types())}."
        )
    if system_prompt and not form.system:
        raise CaptionkitError(
            f"{model_type} models have no system role; put the instructions in --prompt instead of --system-prompt."
        )
    return form.build(question.strip(), system_prompt or None)


# engine and request arguments ----------------------------------------------------------------
def vllm_dtype(dtype: str) -> str:
    """captionkit's --dtype spelling → vLLM's."""
    if dtype not in DTYPES:
        raise CaptionkitError(f"--dtype {dtype}: use auto, fp32, fp16 or bf16.")
    return DTYPES[dtype]


def engine_kwargs(
    model: str,
    *,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``: one image per prompt; unset options keep vLLM's defaults."""
    if tensor_parallel_size < 1:
        raise CaptionkitError("--tensor-parallel-size must be at least 1 (the number of GPUs to split the model over).")
    if not 0 < gpu_memory_utilization <= 1:
        raise CaptionkitError("--gpu-memory-utilization must be in (0, 1], e.g. 0.9.")
    if max_model_len is not None and max_model_len < 16:
        raise CaptionkitError("--max-model-len must be at least 16 tokens (prompt, image tokens and caption).")
    if max_num_seqs is not None and max_num_seqs < 1:
        raise CaptionkitError("--max-num-seqs must be at least 1.")
    options: dict[str, Any] = {
        "model": str(Path(model).expanduser().resolve()) if is_local(model) else model,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": vllm_dtype(dtype),
        "trust_remote_code": trust_remote_code,
        "limit_mm_per_prompt": {"image": 1},
    }
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    if max_num_seqs is not None:
        options["max_num_seqs"] = max_num_seqs
    if cache_dir is not None:
        options["download_dir"] = str(Path(cache_dir).expanduser())
    if revision is not None:
        options["revision"] = revision
        options["tokenizer_revision"] = revision
    if seed is not None:
        options["seed"] = seed
    return options


def sampling_kwargs(chat: ChatSettings) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``; greedy is temperature 0 (sampling knobs left out)."""
    options: dict[str, Any] = {"n": chat.samples, "max_tokens": chat.max_new_tokens}
    if chat.greedy:
        options["temperature"] = 0.0
    else:
        options["temperature"] = chat.temperature
        if chat.top_p is not None:
            options["top_p"] = chat.top_p
        if chat.top_k is not None:
            options["top_k"] = chat.top_k
        if chat.seed is not None:
            options["seed"] = chat.seed
    if chat.repetition_penalty is not None:
        options["repetition_penalty"] = chat.repetition_penalty
    return options


def build_requests(requests: list[CaptionRequest], model_type: str, chat: ChatSettings) -> list[dict[str, Any]]:
    """vLLM prompt dicts: the filled prompt in the family's format and the (PIL) image."""
    return [
        {
            "prompt": build_prompt(model_type, request.prompt or chat.prompt, chat.system_prompt),
            "multi_modal_data": {"image": request.payload},
        }
        for request in requests
    ]


def parse_outputs(outputs: list[Any]) -> list[dict[str, Any] | ItemFailure]:
    """vLLM ``RequestOutput``s → raw results ``{"texts", "finish_reasons"}``; no text at all → ItemFailure."""
    results: list[dict[str, Any] | ItemFailure] = []
    for output in outputs:
        completions = list(getattr(output, "outputs", None) or [])
        texts: list[str] = []
        reasons: list[str | None] = []
        for completion in completions:
            text = str(getattr(completion, "text", "") or "").strip()
            if text:
                texts.append(text)
                reasons.append(getattr(completion, "finish_reason", None))
        if not texts:
            seen = sorted({str(getattr(c, "finish_reason", None)) for c in completions}) or ["no output"]
            results.append(ItemFailure(
                f"the model returned no text (finish reason: {', '.join(seen)}); it is tried again on the next run"
            ))
        else:
            results.append({"texts": texts, "finish_reasons": reasons})
    return results


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def shutdown_engine(llm: Any) -> None:
    """End a ``vllm.LLM``'s engine (best effort, never raises).

    vLLM's V1 engine runs its core in a child process: ``LLM.shutdown()`` (newer releases) or
    the engine-core client's ``shutdown()`` (``llm.llm_engine.engine_core``) ends it and so
    frees that process's GPU memory.
    """
    try:
        shutdown = getattr(llm, "shutdown", None)
        if not callable(shutdown):
            engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            shutdown = getattr(engine_core, "shutdown", None)
        if callable(shutdown):
            shutdown()
    except Exception as error:  # a half-dead engine must not stop the run from going on
        log.debug("vLLM engine shutdown: %s", error)


def free_engine_memory() -> None:
    """After the last reference to the engine is gone: the recipe vLLM's maintainers give for what
    stays in this process (vllm-project/vllm#6544; ``cleanup_dist_env_and_memory`` in current
    releases): destroy the model-parallel groups and the distributed environment, collect
    garbage, empty the CUDA cache. Best effort, never raises."""
    try:
        from vllm.distributed import parallel_state
    except ImportError:
        parallel_state = None
    if parallel_state is not None:
        cleanup = getattr(parallel_state, "cleanup_dist_env_and_memory", None)
        names = ("cleanup_dist_env_and_memory",) if callable(cleanup) else (
            "destroy_model_parallel", "destroy_distributed_environment")
        for name in names:
            call = getattr(parallel_state, name, None)
            try:
                if callable(call):
                    call()
            except Exception as error:
                log.debug("vLLM %s: %s", name, error)
    free_accelerator_memory()


# the backend -------------------------------------------------------------------------------
@register_backend(
    "vllm",
    kind="captioner",
    description="chat VLMs on a vLLM engine (CUDA; tensor parallel; continuous batching): "
    + ", ".join(sorted(PROMPT_FORMATS)),
    model_types=(),
    extras=("vllm",),
    modules=("vllm",),
)
class VLLMCaptioner:
    """Captions with an offline vLLM engine. ``preprocess`` is thread-safe; ``caption_batch`` is not."""

    def __init__(
        self,
        model: str,
        chat: ChatSettings | None = None,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        max_image_side: int | None = None,
    ) -> None:
        if max_image_side is not None and max_image_side < 16:
            raise CaptionkitError("--max-image-side must be at least 16 pixels.")
        self.model_name = str(model)
        self.chat = chat or ChatSettings()
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = vllm_dtype(dtype)
        self.trust_remote_code = trust_remote_code
        self.cache_dir = cache_dir
        self.revision = revision
        self.max_image_side = max_image_side
        config = read_model_config(self.model_name, cache_dir=cache_dir, revision=revision)
        self.model_type = str(config.get("model_type") or "")
        self.prompt_format = prompt_family(config, self.model_name)
        if PROMPT_FORMATS[self.prompt_format].remote_code and not trust_remote_code:
            raise CaptionkitError(
                f"{self.model_name}: vLLM runs {self.model_type} models with the checkpoint's own processor code "
                "(remote code); pass --trust-remote-code to allow it (only for a model you trust)."
            )
        build_prompt(self.prompt_format, "", self.chat.system_prompt)  # a system prompt it cannot take: now
        self.engine_options = engine_kwargs(
            self.model_name, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
            trust_remote_code=trust_remote_code, cache_dir=cache_dir, revision=revision,
            seed=None if self.chat.greedy else self.chat.seed,
        )
        self._vllm: Any = None
        self._llm: Any = None

    # identity ------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the raw result. Not the parallelism or batch limits: they change
        speed, not text. ``max_model_len`` is in: a caption is cut where prompt + image tokens +
        caption reach it."""
        from captionkit.core.identity import model_identity

        model_id, revision = model_identity(self.model_name, self.revision)
        return {
            "backend": "vllm",
            "family": self.model_type,
            "model": model_id,
            "revision": revision,
            "template": build_prompt(self.prompt_format, "{prompt}", self.chat.system_prompt),
            "trust_remote_code": self.trust_remote_code,
            "dtype": self.dtype,
            "chat": self.chat.fingerprint(),
            "max_image_side": self.max_image_side,
            "max_model_len": self.max_model_len,
        }

    # lifetime ------------------------------------------------------------------------
    def load(self) -> None:
        """Start the engine (once): weights onto the GPU(s), KV cache reserved."""
        if self._llm is not None:
            return
        try:
            vllm = require("vllm", "--backend vllm", extra="vllm")
        except MissingDependencyError as error:
            error.args = (
                f"{error} Best in an environment of its own on a CUDA machine: vLLM pins its own torch, "
                "transformers and pillow, which captionkit's pins can fight (docs/vllm.md shows the setup).",
            )
            raise
        version = str(getattr(vllm, "__version__", ""))
        if self.model_type == "mllama" and version and _version_tuple(version) > MLLAMA_LAST_VLLM:
            raise CaptionkitError(
                f"{self.model_name}: vLLM {version} no longer runs Llama-3.2-Vision (mllama) models (dropped in "
                "0.11); use --backend transformers, or a vLLM 0.10.x environment."
            )
        try:
            self._llm = vllm.LLM(**self.engine_options)
        except Exception as error:  # vLLM raises many types here; the message is what users can act on
            import torch

            if not torch.cuda.is_available():  # not a memory problem: there is no GPU to run on
                raise CaptionkitError(
                    f"{self.model_name}: vLLM could not start the engine ({type(error).__name__}: {error}). torch "
                    "sees no CUDA GPU here, and vLLM's usual builds need one; use --backend transformers "
                    "(backend: transformers in a pipeline), or run on a GPU machine."
                ) from error
            raise CaptionkitError(
                f"{self.model_name}: vLLM could not start the engine ({type(error).__name__}: {error}). Out of "
                "GPU memory? Lower --max-model-len (e.g. 4096) or --max-num-seqs, raise --gpu-memory-utilization, "
                "or split the model with --tensor-parallel-size N."
            ) from error
        self._vllm = vllm

    def unload(self) -> None:
        """Shut the engine down and free its GPU memory; safe to call twice; ``load`` works again after."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        shutdown_engine(llm)
        del llm  # the last reference: the engine's objects can be collected below
        free_engine_memory()

    def recover_from_oom(self) -> None:
        free_accelerator_memory()

    # work ----------------------------------------------------------------------------
    def load_processor(self) -> None:
        """Nothing to load for decode workers elsewhere: ``preprocess`` only downscales (the processor runs later)."""

    def image_size(self) -> tuple[int, int] | None:
        """Decode JPEGs at a reduced scale only when --max-image-side bounds what the model sees."""
        return (self.max_image_side, self.max_image_side) if self.max_image_side else None

    def preprocess(self, image: Any) -> Any:
        """Downscale to --max-image-side; vLLM's processor does the rest inside the engine."""
        return fit_within(image, self.max_image_side)

    def caption_batch(self, requests: list[CaptionRequest]) -> list[dict[str, Any] | ItemFailure]:
        """One ``generate`` call for the batch (vLLM schedules it); one raw result per request, in order."""
        if self._llm is None:
            raise CaptionkitError("the vLLM engine is not running; call load() first.")
        params = self._vllm.SamplingParams(**sampling_kwargs(self.chat))
        prompts = build_requests(requests, self.prompt_format, self.chat)
        try:
            outputs = self._llm.generate(prompts, params, use_tqdm=False)
        except ValueError as error:  # vLLM refuses a request it cannot take (e.g. longer than max_model_len)
            if len(prompts) == 1:
                return [self._refused(error)]
            return [self._one(prompt, params) for prompt in prompts]
        if len(outputs) != len(prompts):
            raise CaptionkitError(f"vLLM returned {len(outputs)} results for {len(prompts)} images.")
        return parse_outputs(outputs)

    def _one(self, prompt: dict[str, Any], params: Any) -> dict[str, Any] | ItemFailure:
        try:
            return parse_outputs(self._llm.generate([prompt], params, use_tqdm=False))[0]
        except ValueError as error:
            return self._refused(error)

    def _refused(self, error: BaseException) -> ItemFailure:
        message = str(error)
        hint = ""
        if "maximum model length" in message or "max_model_len" in message:
            hint = "; raise --max-model-len or lower --max-image-side"
        return ItemFailure(f"vLLM refused this image's request ({message}){hint}")

    render_texts = staticmethod(render_chat_texts)
