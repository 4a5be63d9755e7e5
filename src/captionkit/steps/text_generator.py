"""The ``text_generator`` step: rewrite, shorten, merge or translate record fields with a chat LM.

The prompt is a template naming the record's fields ("Shorten this caption: {caption}");
it is filled per record, and the filled prompt joins that record's fingerprint, so a
changed input field regenerates only that record. A prompt that names no field is an
instruction, and the record's text (``input_field``: in a pipeline, the latest text an
earlier step wrote, else the ``text_key`` column) follows it on the next line, as
Dataflow-Gen's generators send the prompt, a newline, then the text: every record gets its
own request. The model is either a local causal LM
(``backend: transformers``: ``AutoModelForCausalLM`` + the tokenizer's chat template,
batched generation with left padding, only the new tokens decoded) or any
OpenAI-compatible server (``backend: openai``, the same client, retries and key handling
as the caption backend). Records need no image: ``path`` may be None.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.core.text import is_refusal
from captionkit.models import free_accelerator_memory, release
from captionkit.models.base import ChatSettings, ItemFailure, render_chat_texts
from captionkit.steps.base import Prepared
from captionkit.steps.captioner import CaptionText, prompt_fields
from captionkit.steps.registry import StepContext, register_step

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "openai")
_NUMBER = (int, float)
KEYS: dict[str, Any] = {
    "backend": str,
    "model": str,
    "base_url": str,
    "api_key_env": str,
    "api_key": str,  # accepted by validation only to be refused with a pointer to api_key_env
    "prompt": str,
    "system_prompt": str,
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "max_new_tokens": int,
    "concurrency": int,
    "batch_size": int,
    "device": str,
    "dtype": str,
    "seed": int,
    "samples": int,
    "input_field": str,
    "cleanup": bool,
}
KEY_ALIASES = {"sys_prompt": "system_prompt", "max_num_seqs": "concurrency", "repeat_time": "samples",
               "model_path": "model", "max_tokens": "max_new_tokens"}


def _messages(system_prompt: str | None, prompt: str) -> list[dict[str, Any]]:
    turns: list[dict[str, Any]] = []
    if system_prompt:
        turns.append({"role": "system", "content": system_prompt})
    turns.append({"role": "user", "content": prompt})
    return turns


class TransformersTextModel:
    """A local causal LM driven through its tokenizer's chat template. ``generate`` is not thread-safe."""

    backend_name = "transformers"

    def __init__(self, model: str, chat: ChatSettings, device: str = "auto", dtype: str = "auto") -> None:
        self.model_name = model
        self.chat = chat
        self.device_name = device
        self.dtype_name = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self.device = "cpu"
        self.dtype: Any = None

    def fingerprint(self) -> dict[str, Any]:
        from captionkit.core.identity import model_identity
        from captionkit.models.florence2 import dtype_label

        model_id, revision = model_identity(self.model_name, None)
        return {
            "backend": "transformers",
            "model": model_id,
            "revision": revision,
            "dtype": dtype_label(self.dtype_name, self.device_name),
            "chat": self.chat.fingerprint(),
        }

    def load(self) -> None:
        if self.model is not None:
            return
        ensure_torchvision()
        import transformers

        from captionkit.models.florence2 import loading_error, resolve_device, resolve_dtype

        transformers.utils.logging.disable_progress_bar()
        self.device = resolve_device(self.device_name)
        self.dtype = resolve_dtype(self.dtype_name, self.device)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_name)
            model = transformers.AutoModelForCausalLM.from_pretrained(self.model_name, dtype=self.dtype)
        except (OSError, ValueError) as error:
            raise loading_error(self.model_name, "causal language model",
                                "config.json, weights and the tokenizer files", error) from error
        if not getattr(tokenizer, "chat_template", None):
            raise CaptionkitError(
                f"{self.model_name}: the tokenizer has no chat template (chat_template.jinja or "
                "tokenizer_config.json), so the prompt cannot be built. Use the model's instruct/chat release."
            )
        tokenizer.padding_side = "left"  # generation continues from the right edge of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        try:  # fail now, not on the first batch, when the template rejects a system turn
            tokenizer.apply_chat_template(_messages(self.chat.system_prompt, "test"), tokenize=False,
                                          add_generation_prompt=True)
        except Exception as error:  # jinja2 TemplateError and the template's own raise_exception
            hint = "; leave out system_prompt (put it at the start of prompt)" if self.chat.system_prompt else ""
            raise CaptionkitError(f"{self.model_name}: the chat template fails ({error}){hint}.") from error
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()

    def unload(self) -> None:
        release(self, "model", "tokenizer")

    def recover_from_oom(self) -> None:
        free_accelerator_memory()

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

    def generate(self, conversations: list[list[dict[str, Any]]]) -> list[dict[str, Any] | ItemFailure]:
        import torch

        if self.model is None or self.tokenizer is None:
            raise CaptionkitError("the text generator is not loaded; call load() first.")
        tokenizer = self.tokenizer
        texts = [tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
                 for turns in conversations]
        # The template writes BOS and the turn markers itself; the tokenizer must not add them again.
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        results: list[dict[str, Any] | ItemFailure | None] = [None] * len(texts)
        runnable = []
        for index, length in enumerate(lengths):
            if limit and length + self.chat.max_new_tokens > limit:
                results[index] = ItemFailure(
                    f"the filled prompt is {length} tokens; with max_new_tokens {self.chat.max_new_tokens} that "
                    f"exceeds the model's {limit}-token context (shorten the input or lower max_new_tokens)"
                )
            else:
                runnable.append(index)
        if runnable:
            inputs = tokenizer([texts[index] for index in runnable], padding=True, return_tensors="pt",
                               add_special_tokens=False).to(self.device)
            if self.chat.seed is not None and not self.chat.greedy:
                torch.manual_seed(self.chat.seed)
            with torch.inference_mode():
                generated = self.model.generate(**inputs, **self.generation_kwargs(),
                                                pad_token_id=tokenizer.pad_token_id)
            decoded = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            samples = self.chat.samples
            for position, index in enumerate(runnable):
                texts_of_item = decoded[position * samples:(position + 1) * samples]
                results[index] = {"texts": [text.strip() for text in texts_of_item]}
        return results  # type: ignore[return-value]

    def cpu_thread_candidates(self) -> list[int]:
        from captionkit.core.thread_tuning import torch_thread_candidates

        return torch_thread_candidates(self.device)


class OpenAITextModel:
    """Text-only chat requests through :class:`~captionkit.models.openai_server.OpenAICaptioner`."""

    backend_name = "openai"

    def __init__(self, model: str, base_url: str, chat: ChatSettings, api_key_env: str, concurrency: int) -> None:
        from captionkit.models.openai_server import OpenAICaptioner

        self.client = OpenAICaptioner(model, base_url, chat=chat, api_key_env=api_key_env, concurrency=concurrency)

    def fingerprint(self) -> dict[str, Any]:
        """The served model and chat settings; not the server's address (see OpenAICaptioner.fingerprint)."""
        return {
            "backend": "openai",
            "model": self.client.model_name,
            "chat": self.client.chat.fingerprint(),
        }

    def load(self) -> None:
        self.client.load()

    def unload(self) -> None:
        self.client.unload()

    def recover_from_oom(self) -> None:
        """Nothing to free: the model lives on the server."""

    def generate(self, conversations: list[list[dict[str, Any]]]) -> list[dict[str, Any] | ItemFailure]:
        return self.client.complete_texts(conversations)


class TextGeneratorStep:
    """Writes ``field`` with a chat LM's answer to the record's filled prompt."""

    def __init__(self, generator: Any, prompt: str, field: str, batch_size: int, system_prompt: str | None = None,
                 name: str = "text_generator", input_field: str | None = None, cleanup: bool = True) -> None:
        self.generator = generator
        self.prompt = prompt
        self.fields = prompt_fields(prompt)
        # A prompt without fields is an instruction: the record's text goes after it (Dataflow-Gen's way).
        self.input_field = None if self.fields else input_field
        if not self.fields and input_field is None:
            raise CaptionkitError(f"step '{name}': the prompt names no field, so every record would get the same "
                                  "answer; name one ('Shorten this caption: {caption}') or set input_field, the "
                                  "field whose text follows the prompt.")
        self.field = field
        self.batch_size = batch_size
        self.system_prompt = system_prompt
        self.name = name
        self.text = CaptionText(cleanup=cleanup)  # clean (one line, no control characters), drop refusals

    # identity ------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {"step": "text_generator", **self.generator.fingerprint()}

    def fill(self, record: Record) -> str:
        """The prompt with this record's fields; CaptionkitError naming the field and record when one is missing."""
        values: dict[str, str] = {}
        for name in self.fields or [self.input_field]:
            value = record.fields.get(name)
            text = "" if value is None else str(value)
            if not text.strip():
                what = "is empty" if name in record.fields and value is not None else "is missing"
                known = ", ".join(sorted(record.fields)) or "none"
                use = "sends its text after the prompt" if self.input_field else f"fills {{{name}}} in its prompt"
                raise CaptionkitError(
                    f"record '{record.id}': step '{self.name}' {use}, but the field "
                    f"'{name}' {what} (fields of this record: {known}); run the step that writes it first or "
                    "give it a manifest column"
                )
            values[name] = text
        if self.input_field is not None:
            return f"{self.prompt.format()}\n{values[self.input_field]}"
        return self.prompt.format(**values)

    def record_settings(self, records: list[Record]) -> dict[str, dict[str, Any] | str]:
        """Per record: the filled prompt (part of its fingerprint), or why it cannot be filled."""
        settings: dict[str, dict[str, Any] | str] = {}
        for record in records:
            try:
                settings[record.id] = {"prompt": self.fill(record)}
            except CaptionkitError as error:
                settings[record.id] = str(error)
        return settings

    def render_settings(self) -> dict[str, Any]:
        return self.text.settings()

    # lifetime ------------------------------------------------------------------------
    def load(self) -> None:
        self.generator.load()

    def unload(self) -> None:
        self.generator.unload()

    def recover_from_oom(self) -> None:
        self.generator.recover_from_oom()

    # work ----------------------------------------------------------------------------
    def prepare(self, record: Record) -> Prepared:
        filled = self.fill(record)
        digest = hashlib.sha256(filled.encode("utf-8")).hexdigest()
        return Prepared(record, _messages(self.system_prompt, filled), (0, 0), digest)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        raws = self.generator.generate([item.payload for item in items])
        return [self._refused(raw) or raw for raw in raws]

    def _refused(self, raw: Any) -> ItemFailure | None:
        """A result whose every sample is a refusal is that record's error (retried next run), never its text."""
        if isinstance(raw, ItemFailure):
            return raw
        texts = [self.text.clean(text) for text in render_chat_texts(raw)]
        if texts and all(is_refusal(text) for text in texts):
            return ItemFailure(f"the model refused ({texts[0][:80]!r}); it is tried again on the next run; "
                               "a different prompt, system_prompt or model may help")
        return None

    def render(self, raw: Any) -> str:
        return self.text.render(render_chat_texts(raw))

    def cpu_thread_candidates(self) -> list[int]:
        if not hasattr(self.generator, "cpu_thread_candidates") or self.generator.model is None:
            return []
        return self.generator.cpu_thread_candidates()

    def set_cpu_threads(self, count: int) -> None:
        from captionkit.core.thread_tuning import set_torch_threads

        set_torch_threads(count)


def _number(config: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "a whole number" if kind is int else "a number"
        raise CaptionkitError(f"text_generator: `{key}` must be {wanted}, not {value!r}.")
    return value


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    """Apply other tools' key spellings (the pipeline does this too; builders may be called directly)."""
    config = dict(config)
    for alias, key in KEY_ALIASES.items():
        if alias in config:
            if key in config:
                raise CaptionkitError(f"text_generator: give `{key}` or `{alias}`, not both.")
            config[key] = config.pop(alias)
    return config


@register_step(
    "text_generator",
    description="rewrite, shorten, merge or translate record fields with a chat LM (local transformers or an "
                "OpenAI-compatible server); the prompt names fields: 'Shorten this caption: {caption}'",
    aliases=("TextGenerator", "GPTTextGenerator"),
    keys=KEYS,
    key_aliases=KEY_ALIASES,
    required=("prompt",),
    needs_images=False,
)
def build_text_generator(config: dict[str, Any], context: StepContext) -> TextGeneratorStep:
    config = _normalise(config)
    if "api_key" in config:  # never echo the value
        raise CaptionkitError(
            f"step '{context.name}': `api_key` is not accepted, so the key never lands in a pipeline file, "
            "the store or logs. Put the key in an environment variable and name it with `api_key_env` "
            "(e.g. `api_key_env: OPENAI_API_KEY`)."
        )
    backend = str(config.get("backend", "transformers")).strip().lower()
    if backend not in BACKENDS:
        close = difflib.get_close_matches(backend, BACKENDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CaptionkitError(f"step '{context.name}': backend '{backend}' is unknown; use transformers or "
                              f"openai.{hint}")
    prompt = config.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CaptionkitError(f"step '{context.name}': `prompt` is required, a template naming fields, e.g. "
                              "'Shorten this caption: {caption}'.")
    fields = prompt_fields(prompt)
    for name in fields:
        if not name.isidentifier():
            raise CaptionkitError(f"step '{context.name}': '{{{name}}}' in the prompt is not a field name; "
                                  "write fields like {caption}, and {{ }} for literal braces.")
    if context.output_field in fields:
        raise CaptionkitError(
            f"step '{context.name}': the prompt reads {{{context.output_field}}}, the field this step writes; "
            "give the step another output field so its input is not its own result."
        )
    if context.input_fields:
        for name in fields:
            if name not in context.input_fields:
                close = difflib.get_close_matches(name, context.input_fields, n=1)
                log.warning("step '%s': the prompt uses {%s}, which no earlier step or manifest column is known "
                            "to provide%s", context.name, name, f" (did you mean {{{close[0]}}}?)" if close else "")
    model = config.get("model")
    if not isinstance(model, str) or not model.strip():
        what = ("the model name the server knows (see BASE_URL/models)" if backend == "openai"
                else "a hub id or local folder of an instruct/chat causal LM (e.g. Qwen/Qwen2.5-1.5B-Instruct)")
        raise CaptionkitError(f"step '{context.name}': `model` is required: {what}.")
    if backend != "openai":
        from captionkit.models.openai_server import api_model_error

        error = api_model_error(model, f"step '{context.name}'")
        if error is not None:
            raise error
    system_prompt = config.get("system_prompt") or None
    chat = ChatSettings(
        prompt=prompt,
        system_prompt=system_prompt,
        temperature=float(_number(config, "temperature", _NUMBER, 0.0)),
        top_p=_number(config, "top_p", _NUMBER, None),
        max_new_tokens=_number(config, "max_new_tokens", int, 256),
        samples=_number(config, "samples", int, 1),
        seed=_number(config, "seed", int, None),
    )
    concurrency = _number(config, "concurrency", int, 8)
    if backend == "openai":
        if not config.get("base_url"):
            raise CaptionkitError(f"step '{context.name}': backend openai needs `base_url`, the server's API "
                                  "address, e.g. http://localhost:8000/v1.")
        for key in ("device", "dtype"):
            if key in config and context.announce:
                log.warning("step '%s': `%s` does nothing with backend openai (the server chooses).",
                            context.name, key)
        generator: Any = OpenAITextModel(model.strip(), str(config["base_url"]), chat,
                                         str(config.get("api_key_env", "OPENAI_API_KEY")), concurrency)
        default_batch = max(8, 2 * concurrency)
    else:
        for key in ("base_url", "api_key_env"):
            if key in config:
                raise CaptionkitError(f"step '{context.name}': `{key}` is for a server; add `backend: openai` "
                                      "(or leave it out to run the model locally with transformers).")
        if "concurrency" in config and context.announce:
            log.warning("step '%s': `concurrency` (Dataflow-Gen: max_num_seqs) is the number of requests in flight "
                        "to a server; it does nothing with backend transformers, where batch_size sets the batch.",
                        context.name)
        generator = TransformersTextModel(model.strip(), chat, str(config.get("device", "auto")),
                                          str(config.get("dtype", "auto")))
        default_batch = 8
    batch_size = _number(config, "batch_size", int, default_batch)
    if batch_size < 1:
        raise CaptionkitError(f"step '{context.name}': `batch_size` must be 1 or more.")
    input_field = config.get("input_field")
    if input_field is not None and fields:
        raise CaptionkitError(f"step '{context.name}': input_field is for a prompt that names no field; this prompt "
                              f"names {{{fields[0]}}}. Leave input_field out, or the fields out of the prompt.")
    cleanup = config.get("cleanup", True)
    if not isinstance(cleanup, bool):
        raise CaptionkitError(f"step '{context.name}': `cleanup` must be true or false, not {cleanup!r}.")
    return TextGeneratorStep(generator, prompt, context.output_field, batch_size, system_prompt, context.name,
                             input_field, cleanup=cleanup)
