"""The captioning step: any registered captioner backend + deterministic text post-processing.

The backend renders its own raw result into candidate texts (one, or several with
``--samples``); this step cleans them, drops refusals, picks or joins samples, and adds
the verbatim prefix/suffix. Prompts may name the record's other fields (``{tags}``):
they are filled per image, and the filled prompt joins that image's fingerprint.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.core.images import DEFAULT_MAX_PIXELS, load_image
from captionkit.core.records import Record
from captionkit.core.text import is_refusal
from captionkit.models.base import CaptionRequest, ItemFailure
from captionkit.options.commands import CAPTION, CaptionRun
from captionkit.options.model import ModelOptions, build_captioner
from captionkit.options.text import CaptionText
from captionkit.steps.base import Prepared


def prompt_fields(template: str) -> list[str]:
    """Names of the ``{field}`` placeholders in a prompt; ``{{`` and ``}}`` are literal braces."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise CaptionkitError(
            f"--prompt {template!r}: {error}. Fields are written {{tags}}; write {{{{ and }}}} for literal braces."
        ) from error


class CaptionStep:
    """Writes the ``caption`` field with a captioner backend (Florence-2, chat VLMs, servers)."""

    field = "caption"

    def __init__(
        self,
        captioner: Any,
        text: CaptionText | None = None,
        batch_size: int = 8,
        background: tuple[int, int, int] = (255, 255, 255),
        max_pixels: int = DEFAULT_MAX_PIXELS,
        prompt: str | None = None,
        field_values: Callable[[list[Record], list[str]], dict[str, dict[str, str]]] | None = None,
    ) -> None:
        self.captioner = captioner
        self.text = text or CaptionText()
        self.batch_size = batch_size
        self.background = background
        self.max_pixels = max_pixels
        if prompt is None:  # a chat backend's own prompt is part of what it was asked
            prompt = getattr(getattr(captioner, "chat", None), "prompt", None)
        self.prompt = prompt
        self.fields = prompt_fields(prompt) if prompt else []
        for name in self.fields:
            if not name.isidentifier():
                raise CaptionkitError(f"--prompt: '{{{name}}}' is not a field name; write fields like {{tags}}.")
        # Without fields the prompt is still a template: '{{' means a literal '{' either way.
        self._static_prompt = prompt.format() if prompt is not None and not self.fields else None
        self._field_values = field_values
        self._prompts: dict[str, str] = {}
        self._target_size: tuple[int, int] | None = None

    def fingerprint(self) -> dict[str, Any]:
        settings = self.captioner.fingerprint()
        if self._static_prompt is not None:
            settings["prompt"] = self._static_prompt
        return settings

    def record_settings(self, records: list[Record]) -> dict[str, dict[str, Any] | str]:
        """Per image: the filled prompt (part of its fingerprint), or why it cannot be filled."""
        if not self.fields:
            return {}
        # The step's own field comes from the manifest only: its stored result would feed back into the prompt.
        wanted = [name for name in self.fields if name != self.field]
        values = self._field_values(records, wanted) if self._field_values and wanted else {}
        settings: dict[str, dict[str, Any] | str] = {}
        for record in records:
            known = {**{k: str(v) for k, v in record.fields.items() if v is not None}, **values.get(record.id, {})}
            missing = [name for name in self.fields if name not in known]
            if missing:
                settings[record.id] = (
                    f"{record.path}: the prompt uses {{{missing[0]}}}, but this image has no '{missing[0]}' "
                    f"(run the step that writes it first, e.g. `captionkit tag`, or give it a manifest column)"
                )
                continue
            filled = self.prompt.format(**{name: known[name] for name in self.fields})
            self._prompts[record.id] = filled
            settings[record.id] = {"prompt": filled}
        return settings

    def render_settings(self) -> dict[str, Any]:
        return self.text.settings()

    def load(self) -> None:
        self.captioner.load()
        self._target_size = self.captioner.image_size()

    def unload(self) -> None:
        self.captioner.unload()

    # executors whose workers live in other processes (Ray actors, one process per GPU) ------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickled for workers before they load the model: without the field lookup, which reads the store.

        The per-image prompts it filled (``record_settings`` on the driver) travel with the step.
        """
        state = dict(self.__dict__)
        state["_field_values"] = None
        return state

    def use_device(self, device: str) -> None:
        """Run the model on ``device`` (``cpu``, ``cuda``, ``cuda:N``) when it loads; before ``load``."""
        if not hasattr(self.captioner, "device_name"):
            from captionkit.core.errors import CaptionkitError

            raise CaptionkitError(f"{type(self.captioner).__name__} does not run on a local device; "
                                  "--devices is for models that run in this process.")
        self.captioner.device_name = device

    @property
    def takes_device(self) -> bool:
        """True when the model runs in this process on a device ``use_device`` can choose (not a server)."""
        return hasattr(self.captioner, "device_name")

    @property
    def prepares_apart(self) -> bool:
        """True when ``prepare`` can run in a process that never loads the model (after ``load_preprocessing``)."""
        return hasattr(self.captioner, "load_processor")

    def load_preprocessing(self) -> None:
        """What ``prepare`` needs (the processor), without the model: for decode workers."""
        self.captioner.load_processor()
        self._target_size = self.captioner.image_size()

    def prepare(self, record: Record) -> Prepared:
        loaded = load_image(record.image_source or record.id, self.background, self._target_size, self.max_pixels,
                            data=record.data)
        payload = self.captioner.preprocess(loaded.image)
        request = CaptionRequest(payload, loaded.original_size, self._prompts.get(record.id, self._static_prompt),
                                 key=record.id)
        return Prepared(record, request, loaded.original_size, loaded.content_hash, loaded.notes)

    @property
    def staging_device(self) -> str | None:
        """Where executors may copy prepared pixels ahead of ``run_batch`` (the model's device), or None."""
        if not getattr(self.captioner, "takes_device_pixels", False) or getattr(self.captioner, "model", None) is None:
            return None
        return str(self.captioner.device)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        raws = self.captioner.caption_batch([item.payload for item in items])
        return [self._refused(raw) or raw for raw in raws]

    def _refused(self, raw: Any) -> ItemFailure | None:
        """A result whose every sample is a refusal is that image's error (retried next run), never a caption."""
        if isinstance(raw, ItemFailure):
            return raw
        texts = [self.text.clean(text) for text in self.captioner.render_texts(raw)]
        if texts and all(is_refusal(text) for text in texts):
            return ItemFailure(f"the model refused to caption this image ({texts[0][:80]!r}); it is tried again on "
                               "the next run; a different --prompt or model may help")
        return None

    def render(self, raw: Any) -> str:
        return self.text.render(self.captioner.render_texts(raw))

    def cpu_thread_candidates(self) -> list[int]:
        """Thread counts the executor may measure when the model runs on the CPU (after load)."""
        from captionkit.core.thread_tuning import torch_thread_candidates

        if not hasattr(self.captioner, "model"):  # servers: nothing runs in this process
            return []
        return torch_thread_candidates(getattr(self.captioner, "device", "cpu"))

    def set_cpu_threads(self, count: int) -> None:
        from captionkit.core.thread_tuning import set_torch_threads

        set_torch_threads(count)

    def recover_from_oom(self) -> None:
        self.captioner.recover_from_oom()


def _owned_by(cls: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a step's config that ``cls`` declares (ModelOptions, CaptionText, CaptionRun)."""
    keys = CAPTION.names("pipeline")
    return {key: value for key, value in config.items() if key in keys and CAPTION.owner(key) is cls}


def choose_backend(backend: str, engine_keys: list[str], vllm_installed: bool,
                   cuda_available: bool) -> tuple[str, bool, str | None]:
    """The backend a pipeline captioner runs on: (backend, keep the vLLM engine keys, a note to announce).

    Why: Dataflow-Gen files carry vLLM engine keys (``tensor_parallel_size`` ...) on every step.
    They pick vLLM only where it can run (installed, and a CUDA GPU to run on), and the choice
    is always announced; an explicit ``backend: vllm`` without CUDA is said before the run
    (only a CPU build of vLLM runs without one), not found out as a late "out of GPU memory".
    """
    keys = ", ".join(engine_keys)
    if backend == "vllm":
        if vllm_installed and not cuda_available:
            return "vllm", True, ("backend: vllm, but torch sees no CUDA GPU here; vLLM's usual builds need one "
                                  "(only a CPU build of vLLM runs without). backend: transformers runs the same "
                                  "model without vLLM.")
        return "vllm", True, None
    if not engine_keys:
        return backend, False, None
    if backend != "auto":
        return backend, False, f"{keys} are vLLM engine options; they do nothing with backend {backend}."
    if not vllm_installed:
        return "auto", False, (f"{keys} only apply to vLLM engines, and vLLM is not installed here; running on "
                               "transformers without them (see docs/vllm.md to use vLLM).")
    if not cuda_available:
        return "auto", False, (f"{keys} only apply to vLLM engines; vLLM is installed, but there is no CUDA GPU "
                               "here for it to run on, so the step runs on transformers without them.")
    return "vllm", True, (f"running on vLLM ({keys} are set and vLLM is installed); set backend: transformers "
                          "to run without it.")


def build_pipeline_captioner(config: dict[str, Any], context: Any) -> CaptionStep:
    """A pipeline ``captioner`` step: every backend `captionkit caption` has (Florence-2, chat VLMs, vLLM, servers)."""
    import importlib.util
    import logging

    from captionkit.core.images import parse_color
    from captionkit.models.openai_server import api_model_error

    options = _owned_by(ModelOptions, config)
    backend = str(options.get("backend", "auto"))
    if backend != "openai" and isinstance(options.get("model"), str):
        error = api_model_error(options["model"], f"step '{context.name}'")
        if error is not None:
            raise error
    # Options declared to warn in a pipeline (vLLM's engine keys, on every step of a Dataflow-Gen file)
    engine = [item.name for item in CAPTION.options("pipeline")
              if item.pipeline_inapplicable == "warn" and item.name in options]
    if backend == "vllm" or engine:
        import torch

        chosen, keep, note = choose_backend(backend, engine, importlib.util.find_spec("vllm") is not None,
                                            torch.cuda.is_available())
        if chosen != backend:
            options["backend"] = chosen
        if not keep:
            for key in engine:
                options.pop(key)
        if note and getattr(context, "announce", True):
            logging.getLogger("captionkit").warning("step %s: %s", context.name, note)
    captioner = build_captioner(options=ModelOptions(**options))
    text = CaptionText(**_owned_by(CaptionText, config))
    run = CaptionRun(**_owned_by(CaptionRun, config))
    # A list of samples stays a list in the store; the field later steps read is the rendered text.
    return CaptionStep(
        captioner, text, batch_size=int(run.batch_size or 8), background=parse_color(run.background),
        max_pixels=int(run.max_image_pixels),
        prompt=options.get("prompt") or getattr(getattr(captioner, "chat", None), "prompt", None),
    )


def _register() -> None:
    from captionkit.steps.registry import register_step

    register_step(
        "captioner",
        description="caption images with Florence-2, a chat VLM (transformers or vLLM) or an OpenAI-compatible server",
        keys=CAPTION.pipeline_keys(),
        aliases=("ImageCaptioner", "BLIPCaptioner", "LLaVACaptioner", "LLaVANeXTCaptioner",
                 "LLaVAOneVisionCaptioner", "MLLamaCaptioner", "Phi3VCaptioner", "QwenVLCaptioner", "GPTCaptioner",
                 "ImageAPICaptioner"),
        key_aliases=CAPTION.pipeline_aliases(),
    )(build_pipeline_captioner)


_register()
