"""The contract every captioner backend meets, and the settings chat backends share.

Why one contract: the caption step, the executor, pipelines and the UI drive Florence-2,
chat VLMs on transformers, vLLM engines and OpenAI-compatible servers the same way.
A backend only knows its model; batching, resume, files and errors live elsewhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from captionkit.core.errors import CaptionkitError

DEFAULT_CHAT_PROMPT = "Describe this image in one detailed sentence."


@dataclass
class CaptionRequest:
    """One image for ``caption_batch``: what ``preprocess`` made of it, and its filled prompt."""

    payload: Any
    original_size: tuple[int, int]  # (width, height) of the decoded image before any resize
    prompt: str | None = None  # the prompt with the record's fields filled in; None: the backend's own
    key: str | None = None  # the record id: seeds per image, so sampling does not depend on the batch


@dataclass
class ItemFailure:
    """Returned in place of a raw result when one image failed but the batch did not.

    The executor records ``message`` as that image's error and retries it on the next
    run (a server error or a refusal says nothing about the file). ``scope`` tells the
    executor's circuit breaker what the failure says about the rest of the run.
    """

    message: str
    scope: str = "item"  # ITEM_SCOPE, MODEL_SCOPE or BACKEND_SCOPE


ITEM_SCOPE = "item"  # this image only (a refusal, a rejected request): never stops a run
MODEL_SCOPE = "model"  # the model raised: the same message image after image means the model, not the images
BACKEND_SCOPE = "backend"  # the backend cannot serve anything (unreachable server, DNS, TLS, key refused)


class CaptionerBackend(Protocol):
    """What the caption step needs from a model family."""

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able settings that determine the raw result (model, revision, prompt, sampling, dtype)."""

    def load(self) -> None: ...

    def unload(self) -> None:
        """Free the model and its accelerator memory; ``load`` may be called again later."""

    def image_size(self) -> tuple[int, int] | None:
        """(width, height) the model resizes to, so JPEGs can be decoded at a smaller scale; None: full size."""

    def preprocess(self, image: Any) -> Any:
        """One RGB PIL image → the payload ``caption_batch`` takes. Runs in decode threads: thread-safe."""

    def caption_batch(self, requests: list[CaptionRequest]) -> list[Any]:
        """One JSON-able raw result (or :class:`ItemFailure`) per request, in order."""

    def render_texts(self, raw: Any) -> list[str]:
        """The candidate caption texts in a raw result (several with ``samples`` > 1)."""

    def recover_from_oom(self) -> None: ...


@dataclass
class ChatSettings:
    """Prompting and decoding options shared by every chat backend; all are in the fingerprint."""

    prompt: str = DEFAULT_CHAT_PROMPT
    system_prompt: str | None = None
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = 256
    samples: int = 1  # captions per image
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise CaptionkitError("--temperature must be 0 (greedy) or more.")
        if self.samples < 1:
            raise CaptionkitError("--samples must be at least 1.")
        if self.max_new_tokens < 1:
            raise CaptionkitError("--max-new-tokens must be at least 1.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise CaptionkitError("--top-p must be in (0, 1].")
        if self.top_k is not None and self.top_k < 1:
            raise CaptionkitError("--top-k must be at least 1.")
        if self.samples > 1 and self.temperature == 0:
            raise CaptionkitError(
                "--samples > 1 with --temperature 0 gives the same caption N times; set --temperature (e.g. 0.7)."
            )
        if self.temperature == 0:  # greedy: sampling knobs would be accepted and do nothing
            unused = [name for name, value in (("--top-k", self.top_k), ("--seed", self.seed)) if value is not None]
            if self.top_p is not None and self.top_p < 1:
                unused.insert(0, "--top-p")
            if unused:
                raise CaptionkitError(f"{', '.join(unused)} only apply when sampling; set --temperature above 0 "
                                      "(0 is greedy decoding).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def fingerprint(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("prompt")  # the filled prompt is per image and joins the fingerprint there
        if self.greedy:  # sampling knobs do nothing without sampling
            for name in ("top_p", "top_k", "seed"):
                values.pop(name)
        return values


def sample_seed(seed: int, key: str | None, sample: int = 0) -> int:
    """A seed per (run seed, image, sample): the same captions whatever the batch an image lands in."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\x00{key or ''}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def render_chat_texts(raw: Any) -> list[str]:
    """Candidate texts of a chat backend's raw result: ``{"texts": [...]}``."""
    if isinstance(raw, dict):
        texts = raw.get("texts")
        if isinstance(texts, list):
            return [str(text) for text in texts]
        if "text" in raw:
            return [str(raw["text"])]
    return [str(raw)] if raw is not None else []
