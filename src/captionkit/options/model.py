"""The captioner's options, declared once, and the captioner built from them.

Each field says where it does something: ``florence`` (Florence-2), ``chat`` (chat VLMs in
this process), ``vllm`` (a vLLM engine) or ``openai`` (an OpenAI-compatible server). An
option given where it would do nothing is refused with the field's own reason, by
:func:`refuse_inapplicable`: the one place the rule lives (the CLI, the UI and the pipeline
all build captioners here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from captionkit.core.declare import Option, declared_options, option
from captionkit.core.errors import CaptionkitError
from captionkit.models.florence2 import TASKS

DEFAULT_CAPTION_MODEL = "florence-community/Florence-2-base"
BACKENDS = ("auto", "transformers", "openai", "vllm")
TARGETS = ("florence", "chat", "vllm", "openai")

FLORENCE_PANEL = "Florence-2 options"
CHAT_PANEL = "Chat model options (BLIP-2, LLaVA, Qwen2-VL, ...; also servers and vLLM)"
SERVER_PANEL = "OpenAI-compatible server (--backend openai)"
VLLM_PANEL = "vLLM engine (--backend vllm)"
_MODEL_HELP = "Hub id or local folder (a model downloaded elsewhere, or trained with captionkit)."

# Why an option is refused where it does nothing, by the target it was given to.
_FLORENCE_ONLY = {
    "applies": frozenset({"florence"}), "panel": FLORENCE_PANEL,
    "refusals": {"openai": "Florence-2 options do not apply to a chat server; use --prompt.",
                 "vllm": "Florence-2 options do not apply to the vLLM backend; use --prompt.",
                 "chat": "Florence-2 options do not apply to {model_type} models; use --prompt."},
}
_NOT_FLORENCE = "Florence-2 takes a --task, not a chat prompt or sampling options."
_CHAT = {
    "applies": frozenset({"chat", "vllm", "openai"}), "panel": CHAT_PANEL,
    "refusals": {"florence": _NOT_FLORENCE},
}
_FAMILY = {  # processor options of one chat family, passed to transformers only
    "applies": frozenset({"chat"}), "panel": CHAT_PANEL,
    "refusals": {"florence": _NOT_FLORENCE, "openai": "the server decides these.",
                 "vllm": "not passed to vLLM engines; use --max-image-side."},
}
_LOCAL = {"applies": frozenset({"florence", "chat", "vllm"}), "refusals": {"openai": "the server decides these."}}
_IN_PROCESS = {"applies": frozenset({"florence", "chat", "vllm"}),
               "refusals": {"openai": "the server decides these; they do not apply to --backend openai."}}
_SERVER = {"applies": frozenset({"openai"}), "panel": SERVER_PANEL,
           "refusals": {"*": "these are for --backend openai (an OpenAI-compatible server)."}}
_VLLM = {"applies": frozenset({"vllm"}), "panel": VLLM_PANEL, "pipeline_inapplicable": "warn",
         "refusals": {"*": "these are vLLM engine options; add --backend vllm."}}


@dataclass
class ModelOptions:
    """Everything that picks and configures a captioner; one object so CLI, pipelines and UI share it.

    Options a family does not use are left as ``None``; giving one to a family that
    would ignore it is an error, never silently dropped.
    """

    model: str | None = option(
        None, _MODEL_HELP + " The family comes from its config.json. Default: florence-community/Florence-2-base, "
        "or the base of --adapter.", aliases=("model_path",), fingerprint=True)
    backend: str = option("auto", "auto (transformers, in this process), openai (an OpenAI-compatible server) or "
                          "vllm (a vLLM engine).", choices=BACKENDS, fingerprint=True)
    # Florence-2
    task: str | None = option(None, "Florence-2 task: <CAPTION> (default), <DETAILED_CAPTION>, "
                              "<MORE_DETAILED_CAPTION>, <OCR>, <OD>, ...", choices=TASKS, fingerprint=True,
                              **_FLORENCE_ONLY)
    task_input: str | None = option(None, "Text for tasks that take one (e.g. <CAPTION_TO_PHRASE_GROUNDING>).",
                                    fingerprint=True, **_FLORENCE_ONLY)
    num_beams: int | None = option(None, "Beam search width (default 3; 1 = greedy, fastest).", fingerprint=True,
                                   **_FLORENCE_ONLY)
    early_stopping: bool = option(False, "Stop beam search when num_beams candidates are done.", fingerprint=True,
                                  **_FLORENCE_ONLY)
    no_repeat_ngram_size: int | None = option(None, "Forbid repeating n-grams of this size.", fingerprint=True,
                                              **_FLORENCE_ONLY)
    adapter: str | Path | None = option(None, "LoRA adapter folder from `captionkit train captioner`.",
                                        fingerprint=True, **_FLORENCE_ONLY)
    # chat models (transformers, vLLM, servers)
    prompt: str | None = option(
        None, "What to ask the model. May name fields of the image: 'Its tags: {tags}' (filled from `captionkit "
        "tag` results or manifest columns).", fingerprint=True, **_CHAT)
    system_prompt: str | None = option(None, "System instructions, for families that have a system role.",
                                       aliases=("sys_prompt",), fingerprint=True, **_CHAT)
    temperature: float | None = option(None, "0 = greedy (default); above 0 samples.", fingerprint=True, **_CHAT)
    top_p: float | None = option(None, "Nucleus sampling (with --temperature > 0).", fingerprint=True, **_CHAT)
    top_k: int | None = option(None, "Top-k sampling (with --temperature > 0).", fingerprint=True, **_CHAT)
    samples: int | None = option(None, "Captions per image, all kept in the store (see --sample-choice).",
                                 aliases=("repeat_time",), fingerprint=True, **_CHAT)
    seed: int | None = option(None, "Sampling seed: the same command with the same seed gives the same captions.",
                              fingerprint=True, **_CHAT)
    max_image_side: int | None = option(
        None, "Downscale images so the longest side is at most this (also for servers).", fingerprint=True, **_CHAT)
    min_pixels: int | None = option(None, "Qwen2-VL family: smallest image area the processor resizes to.",
                                    fingerprint=True, **_FAMILY)
    max_pixels: int | None = option(None, "Qwen2-VL family: largest image area (fewer image tokens, faster).",
                                    fingerprint=True, **_FAMILY)
    anyres: bool | None = option(
        None, "LLaVA-NeXT/OneVision: tile large images (default: as the model ships); --no-anyres = one tile, "
        "faster.", flags=("--anyres/--no-anyres",), fingerprint=True, **_FAMILY)
    pan_and_scan: bool | None = option(None, "Gemma 3: add crops of wide or tall images.",
                                       flags=("--pan-and-scan/--no-pan-and-scan",), fingerprint=True, **_FAMILY)
    longest_edge: int | None = option(None, "Idefics3/SmolVLM: longest image side the processor resizes to.",
                                      fingerprint=True, **_FAMILY)
    trust_remote_code: bool = option(
        False, "Run the model's own Python code (Phi-3-vision); only for models you trust. Recorded in the "
        "results.", fingerprint=True, applies=frozenset({"chat", "vllm"}), panel=CHAT_PANEL,
        refusals={"florence": _NOT_FLORENCE, "openai": "the server decides these."})
    # both
    max_new_tokens: int | None = option(None, "Longest caption in tokens (default 256).", aliases=("max_tokens",),
                                        fingerprint=True)
    repetition_penalty: float | None = option(None, "Penalise repeated tokens (>1.0).", fingerprint=True)
    dtype: str = option("auto", "auto (bf16/fp16 on a GPU, fp32 on CPU), fp32, fp16, bf16. Part of the settings: "
                        "a change re-captions.", choices=("auto", "fp32", "fp16", "bf16"), fingerprint=True,
                        **_IN_PROCESS)
    attn_implementation: str = option("sdpa", "sdpa, eager or flash_attention_2.",
                                      choices=("sdpa", "eager", "flash_attention_2"), **_IN_PROCESS)
    device: str = option("auto", "auto, cpu, cuda or cuda:N.", **_IN_PROCESS)
    cache_dir: str | Path | None = option(None, "Folder for downloaded models.", **_LOCAL)
    revision: str | None = option(None, "Hub revision (branch, tag or commit).", fingerprint=True, **_LOCAL)
    # OpenAI-compatible servers
    base_url: str | None = option(None, "Server address, e.g. http://127.0.0.1:8000/v1.", **_SERVER)
    api_key_env: str | None = option(  # default OPENAI_API_KEY
        None, "Environment variable that holds the API key (default OPENAI_API_KEY; never stored or logged).",
        **_SERVER)
    concurrency: int | None = option(None, "Requests in flight at once (default 8).", **_SERVER)
    request_timeout: float | None = option(None, "Seconds per request before it is retried (default 120).",
                                           **_SERVER)
    max_retries: int | None = option(
        None, "Retries per request on 429, 5xx, timeouts and dropped connections (default 5).", **_SERVER)
    # vLLM engines
    tensor_parallel_size: int | None = option(None, "GPUs per engine.", **_VLLM)
    max_model_len: int | None = option(None, "Context length of the engine.", **_VLLM)
    max_num_seqs: int | None = option(None, "Sequences the engine runs at once.", **_VLLM)
    gpu_memory_utilization: float | None = option(
        None, "Fraction of GPU memory the engine may take (default 0.9).", **_VLLM)

    def chat_settings(self):
        from captionkit.models.base import DEFAULT_CHAT_PROMPT, ChatSettings

        return ChatSettings(
            prompt=self.prompt if self.prompt is not None else DEFAULT_CHAT_PROMPT,
            system_prompt=self.system_prompt, temperature=self.temperature or 0.0, top_p=self.top_p,
            top_k=self.top_k, repetition_penalty=self.repetition_penalty,
            max_new_tokens=self.max_new_tokens or 256, samples=self.samples or 1, seed=self.seed,
        )


def model_options() -> list[Option]:
    """The declared captioner options, in order."""
    return declared_options(ModelOptions)


def names_for(target: str) -> tuple[str, ...]:
    """The options that do something only on ``target`` (e.g. the vLLM engine's)."""
    return tuple(item.name for item in model_options() if item.applies == frozenset({target}))


def _is_given(item: Option, value) -> bool:
    """Set by the user: not None, not False, not its default (``--device auto`` is no choice)."""
    return value is not None and value is not False and value != item.default


def inapplicable(options: ModelOptions, targets: tuple[str, ...]) -> list[Option]:
    """The options given that apply to none of ``targets``."""
    return [item for item in model_options()
            if item.applies and not any(item.applies_to(target) for target in targets)
            and _is_given(item, getattr(options, item.name))]


def refuse_inapplicable(options: ModelOptions, target: str, *, within: tuple[str, ...] | None = None,
                        **facts: str) -> None:
    """Raise, in the options' own words, when one was given that would do nothing on ``target``.

    ``within`` checks before the family is known: refused are only options that apply to none of them.
    """
    refused = inapplicable(options, within or (target,))
    if not refused:
        return
    reason = refused[0].refusal(target, **facts)
    flags = [item.flag for item in refused if item.refusal(target, **facts) == reason]
    raise CaptionkitError(f"{', '.join(flags)}: {reason}")


def check_choice(flag: str, value: str, choices: list[str] | tuple[str, ...]) -> None:
    if value not in choices:
        raise CaptionkitError(f"{flag} {value}: use one of {', '.join(choices)}.")


def adapter_base_model(adapter: str | Path | None) -> str | None:
    """The base model recorded in a PEFT adapter folder, if any."""
    if adapter is None:
        return None
    config = Path(adapter).expanduser() / "adapter_config.json"
    if not config.is_file():
        return None
    import json

    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or None


def build_captioner(model: str | None = None, options: ModelOptions | None = None, **option_values):
    """A captioner backend for ``model``; the family is read from the model's config, never its name.

    ``options`` (or keyword arguments named like :class:`ModelOptions` fields) pick the
    backend (``auto``/``transformers`` local, ``openai`` server, ``vllm`` engine) and its settings.
    """
    from captionkit.models import backend_for_model_type, get_backend, read_model_config
    from captionkit.models.florence2 import GenerationSettings, native_model_id

    if options is None:
        options = ModelOptions(model=model, **option_values)
    elif model is not None or option_values:
        raise CaptionkitError("build_captioner: pass either options or keyword arguments, not both.")
    check_choice("--backend", options.backend, BACKENDS)
    if options.backend == "openai":
        refuse_inapplicable(options, "openai")
        if not options.model:
            raise CaptionkitError("--backend openai needs --model NAME (the model name the server serves).")
        if not options.base_url:
            raise CaptionkitError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1).")
        factory = get_backend("openai").factory
        return factory(
            model=options.model, base_url=options.base_url, chat=options.chat_settings(),
            api_key_env=options.api_key_env or "OPENAI_API_KEY",
            concurrency=options.concurrency if options.concurrency is not None else 8,
            timeout_s=options.request_timeout if options.request_timeout is not None else 120.0,
            max_retries=options.max_retries if options.max_retries is not None else 5,
            max_image_side=options.max_image_side,
        )
    if options.backend == "vllm":
        refuse_inapplicable(options, "vllm")
    else:  # the family is not known yet: refuse only what no local family takes (server, vLLM engine)
        refuse_inapplicable(options, "chat", within=("florence", "chat"))
    name = native_model_id(str(options.model or adapter_base_model(options.adapter) or DEFAULT_CAPTION_MODEL))
    config = read_model_config(name, cache_dir=options.cache_dir, revision=options.revision)
    model_type = str(config.get("model_type", ""))
    if options.backend == "vllm":
        engine = {key: getattr(options, key) for key in names_for("vllm") if getattr(options, key) is not None}
        return get_backend("vllm").factory(
            model=name, chat=options.chat_settings(), dtype=options.dtype, trust_remote_code=options.trust_remote_code,
            cache_dir=options.cache_dir, revision=options.revision, max_image_side=options.max_image_side, **engine,
        )
    try:
        info = backend_for_model_type(model_type, "captioner")
    except CaptionkitError:
        if config.get("auto_map") and not options.trust_remote_code:
            from captionkit.models.chat_vlm import remote_code_error

            raise remote_code_error(name, model_type) from None
        raise
    if info.style == "florence":
        refuse_inapplicable(options, "florence")
        if options.early_stopping and options.num_beams is not None and options.num_beams <= 1:
            raise CaptionkitError("--early-stopping only applies to beam search; use --num-beams 2 or more.")
        return info.factory(
            model=name, task=options.task or "<CAPTION>", task_input=options.task_input,
            generation=GenerationSettings(
                max_new_tokens=options.max_new_tokens or 256,
                num_beams=options.num_beams if options.num_beams is not None else 3,
                early_stopping=bool(options.early_stopping), repetition_penalty=options.repetition_penalty,
                no_repeat_ngram_size=options.no_repeat_ngram_size,
            ),
            dtype=options.dtype, attn_implementation=options.attn_implementation, device=options.device,
            cache_dir=options.cache_dir, revision=options.revision, adapter=options.adapter,
        )
    refuse_inapplicable(options, "chat", model_type=model_type)
    family_options = {key: getattr(options, key) for key in names_for("chat") if getattr(options, key) is not None}
    return info.factory(
        model=name, chat=options.chat_settings(), dtype=options.dtype,
        attn_implementation=options.attn_implementation, device=options.device, cache_dir=options.cache_dir,
        revision=options.revision, trust_remote_code=options.trust_remote_code,
        max_image_side=options.max_image_side, model_type=model_type, **family_options,
    )
