"""Captioner that asks any OpenAI-compatible chat-completions server (vLLM, SGLang,
llama.cpp server, LM Studio, Ollama, hosted APIs) to describe each image.

The protocol is spoken by the maintained ``openai`` client (``pip install 'captionkit[openai]'``),
built with ``max_retries=0``: retries are done here, so their policy is the same for every
server and a failure after the last one becomes an :class:`ItemFailure` for that image
instead of an exception for the batch. A server that cannot be reached at all is not
transient: an unresolvable host name (DNS) or a failed TLS handshake is never retried, a
refused connection gets one short retry (none once the last requests were all refused),
and those failures are marked so the executor's circuit breaker ends the run at once.
Requests run in a thread pool owned by the backend,
at most ``concurrency`` in flight; every sample of every image is its own request (servers
such as llama.cpp ignore ``n``).

The API key is read from the environment variable named by ``api_key_env`` and never
leaves the client: it is not in the fingerprint, raw results, logs nor error messages
(servers that echo it in an error body are scrubbed).
"""

from __future__ import annotations

import base64
import dataclasses
import email.utils
import io
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from captionkit.core.errors import CaptionkitError, require
from captionkit.models import register_backend
from captionkit.models.base import (
    BACKEND_SCOPE,
    ITEM_SCOPE,
    MODEL_SCOPE,
    CaptionRequest,
    ChatSettings,
    ItemFailure,
    render_chat_texts,
)

log = logging.getLogger(__name__)

PLACEHOLDER_KEY = "EMPTY"  # local servers want no key, but the client sends one
IMAGE_FORMATS = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}
RETRY_STATUSES = {408, 409, 429}  # plus every 5xx
MAX_RETRY_AFTER_S = 60.0
REFUSED_RETRIES = 1  # a refused connection: one short retry (a server restarting), not a 10 s backoff per image
REFUSED_MAX_DELAY_S = 0.5
UNREACHABLE_STREAK = 8  # requests in a row that could not reach the server: later ones are not retried
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class _Attempt:
    """What one request ended with: a reply, or why not and whether to try again."""

    text: str | None = None
    finish_reason: str | None = None
    error: str | None = None
    retry: bool = False
    retry_after: float | None = None
    scope: str = ITEM_SCOPE  # what the failure says about other requests (see ItemFailure)
    refused: bool = False  # connection refused: retried briefly, not with the full backoff


# Hosted APIs' model names (and aisuite's "provider:model"): never a local folder or a hub id.
_API_MODEL = re.compile(r"^(?:(?P<provider>openai|anthropic|google|azure|groq|mistral|cohere|aws|xai|deepseek):)?"
                        r"(?P<name>gpt-\d[\w.-]*|chatgpt-[\w.-]+|o[1-9](?:-[\w.-]+)?|claude-[\w.-]+|gemini-[\w.-]+|"
                        r"deepseek-(?:chat|reasoner)|grok-[\w.-]+|command-r[\w.-]*)$", re.IGNORECASE)


def api_model_error(model: str, where: str) -> CaptionkitError | None:
    """The error for a hosted API's model name (``gpt-4o``, ``openai:gpt-4o``) given to a local backend.

    Why: such a name is neither a folder nor a hub id, so loading it locally only retries the hub
    and fails late; it belongs to ``backend: openai`` with a ``base_url``.
    """
    from pathlib import Path

    match = _API_MODEL.match(model.strip())
    if match is None or Path(model).expanduser().exists():
        return None
    name = match.group("name")
    return CaptionkitError(
        f"{where}: model '{model}' is a hosted API's model, not a local folder or a hub id, so it cannot run "
        f"here. Call it through an OpenAI-compatible endpoint: backend: openai, base_url: "
        f"https://api.openai.com/v1 (or your server's /v1 address), model: {name}, and the key in the "
        "environment variable named by api_key_env (default OPENAI_API_KEY)."
    )


def public_url(url: str) -> str:
    """``url`` without user:password, query or fragment (where keys sometimes hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


@register_backend(
    "openai",
    kind="captioner",
    description="any OpenAI-compatible chat-completions server (vLLM, SGLang, llama.cpp, LM Studio, Ollama, APIs)",
    model_types=(),
    extras=("openai",),
    modules=("openai",),
)
class OpenAICaptioner:
    """Captions through a chat-completions server. ``preprocess`` and ``caption_batch`` are thread-safe."""

    def __init__(
        self,
        model: str,
        base_url: str,
        chat: ChatSettings | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        max_image_side: int | None = None,
        image_format: str = "jpeg",
        *,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if not model or not str(model).strip():
            raise CaptionkitError("--model must name the model as the server knows it (see BASE_URL/models).")
        base_url = str(base_url or "").strip()
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CaptionkitError(
                "--base-url must be the server's http(s) address including the API prefix, "
                "e.g. http://localhost:8000/v1."
            )
        if not api_key_env or not _ENV_NAME.fullmatch(api_key_env):
            # never echo the value: people paste the key itself here
            raise CaptionkitError(
                "--api-key-env takes the NAME of the environment variable that holds the key "
                "(e.g. OPENAI_API_KEY), not the key itself."
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise CaptionkitError("--concurrency must be a whole number of requests, 1 or more.")
        if not timeout_s or timeout_s <= 0:
            raise CaptionkitError("--timeout must be a positive number of seconds.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise CaptionkitError("--max-retries must be 0 or more.")
        if max_image_side is not None and max_image_side < 16:
            raise CaptionkitError("--max-image-side must be at least 16 pixels.")
        image_format = str(image_format).lower()
        if image_format not in IMAGE_FORMATS:
            raise CaptionkitError(f"--image-format {image_format}: use jpeg or png.")
        if backoff_base_s < 0 or backoff_max_s < 0:
            raise CaptionkitError("backoff times must be 0 or more seconds.")
        self.model_name = str(model).strip()
        self.base_url = base_url.rstrip("/")
        self.chat = chat or ChatSettings()
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.max_image_side = max_image_side
        self.image_format = "jpeg" if image_format == "jpg" else image_format
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep or time.sleep
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._api_key: str | None = None
        self._openai: Any = None
        self._auth_warned = threading.Event()
        self._unreachable_lock = threading.Lock()
        self._unreachable_streak = 0  # requests in a row that ended unable to reach the server
        self._unreachable_last: _Attempt | None = None  # how the last of them ended

    # identity ------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What decides the text: the served model, prompt, sampling and image preparation.

        Not the server's address: ``localhost`` and ``127.0.0.1`` (or a moved server) answer alike.
        """
        return {
            "backend": "openai",
            "model": self.model_name,
            "chat": self.chat.fingerprint(),
            "image": {"max_side": self.max_image_side, "format": self.image_format},
        }

    # lifetime ------------------------------------------------------------------------
    def load(self) -> None:
        """Create the client (key from the environment) and the request pool (once)."""
        if self._client is not None:
            return
        openai = require("openai", "The openai backend (--backend openai)", extra="openai")
        key = os.environ.get(self.api_key_env, "").strip()
        self._api_key = key or None
        self._openai = openai
        self._client = openai.OpenAI(
            api_key=key or PLACEHOLDER_KEY,
            base_url=self.base_url,
            timeout=self.timeout_s,
            max_retries=0,  # retried here, with one policy for every server
        )
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="captionkit-openai")
        log.info(
            "captioning with %s at %s (%d requests in flight, API key %s)",
            self.model_name, public_url(self.base_url), self.concurrency,
            f"from ${self.api_key_env}" if key else f"not set (${self.api_key_env} is empty)",
        )

    def unload(self) -> None:
        """Stop the request pool and close the client's connections; ``load`` may be called again."""
        pool, client = self._pool, self._client
        self._pool = None
        self._client = None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if client is not None:
            try:
                client.close()
            except Exception:  # closing is best effort
                pass
        self._api_key = None

    def recover_from_oom(self) -> None:
        """Nothing to free: the model lives on the server."""

    # work ----------------------------------------------------------------------------
    def image_size(self) -> tuple[int, int] | None:
        return (self.max_image_side, self.max_image_side) if self.max_image_side else None

    def preprocess(self, image: Any) -> str:
        """One RGB image → a ``data:`` URL (downscaled to --max-image-side, JPEG q95 or PNG)."""
        from PIL import Image

        if self.max_image_side and max(image.size) > self.max_image_side:
            scale = self.max_image_side / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if self.image_format == "jpeg":
            if image.mode != "RGB":
                image = image.convert("RGB")
            image.save(buffer, format="JPEG", quality=95)
        else:
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGB")
            image.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f"data:{IMAGE_FORMATS[self.image_format]};base64,{encoded}"

    def messages(self, prompt: str, data_url: str) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        if self.chat.system_prompt:
            turns.append({"role": "system", "content": self.chat.system_prompt})
        turns.append({
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        })
        return turns

    def request_options(self, sample: int) -> dict[str, Any]:
        """Sampling options of one request (sample ``sample`` of an image). Sampling knobs only when sampling,
        as in the fingerprint."""
        chat = self.chat
        options: dict[str, Any] = {"temperature": chat.temperature, "max_tokens": chat.max_new_tokens}
        extra: dict[str, Any] = {}
        if not chat.greedy:
            if chat.top_p is not None:
                options["top_p"] = chat.top_p
            if chat.seed is not None:
                options["seed"] = chat.seed + sample
            if chat.top_k is not None:
                extra["top_k"] = chat.top_k
        if chat.repetition_penalty is not None:
            extra["repetition_penalty"] = chat.repetition_penalty
        if extra:
            options["extra_body"] = extra
        return options

    def caption_batch(self, requests: list[CaptionRequest]) -> list[dict[str, Any] | ItemFailure]:
        """Send every request (× samples) concurrently; one raw result or ItemFailure per image, in order."""
        return self.complete_texts([self.messages(request.prompt or self.chat.prompt, request.payload)
                                    for request in requests])

    def complete_texts(self, conversations: list[list[dict[str, Any]]]) -> list[dict[str, Any] | ItemFailure]:
        """One whole ``messages`` list per item (× ``samples``), sent concurrently with retries; one raw result
        or ItemFailure per item, in order. Captions and the text_generator step both go through here."""
        pool = self._pool
        if pool is None or self._client is None:
            raise CaptionkitError("the openai backend is not loaded; call load() first.")
        futures = [
            [pool.submit(self._request, messages, sample) for sample in range(self.chat.samples)]
            for messages in conversations
        ]
        results: list[dict[str, Any] | ItemFailure] = []
        for item_futures in futures:
            attempts: list[_Attempt] = []
            for future in item_futures:
                try:
                    attempts.append(future.result())
                except Exception as error:  # one item's bug must not sink the batch
                    attempts.append(_Attempt(error=self._scrub(f"{type(error).__name__}: {error}")))
            failed = next((attempt for attempt in attempts if attempt.error is not None), None)
            if failed is not None:
                results.append(ItemFailure(failed.error or "request failed", scope=failed.scope))
            else:
                results.append({
                    "texts": [(attempt.text or "").strip() for attempt in attempts],
                    "finish_reasons": [attempt.finish_reason for attempt in attempts],
                })
        return results

    @staticmethod
    def render_texts(raw: Any) -> list[str]:
        return render_chat_texts(raw)

    # requests ------------------------------------------------------------------------
    def _request(self, messages: list[dict[str, Any]], sample: int) -> _Attempt:
        """One request with retries; never raises for server or network trouble."""
        with self._unreachable_lock:
            known = self._unreachable_last if self._unreachable_streak >= UNREACHABLE_STREAK else None
        if known is not None and not known.retry:
            # DNS or TLS failed for this many requests in a row: the next one would only fail the same way, after
            # another lookup (which can wait seconds for a resolver's timeout); the run is stopped early anyway
            return dataclasses.replace(known)
        options = self.request_options(sample)
        attempts = self.max_retries + 1
        result = _Attempt(error="no request was made")
        made = 0
        for attempt in range(attempts):
            result = self._attempt(messages, options)
            made += 1
            if result.error is None or not result.retry or attempt == attempts - 1:
                break
            if result.refused:
                with self._unreachable_lock:
                    hopeless = self._unreachable_streak >= UNREACHABLE_STREAK
                if hopeless or attempt >= REFUSED_RETRIES:
                    break
                delay = random.uniform(0, min(REFUSED_MAX_DELAY_S, self.backoff_base_s * 2**attempt))
            elif result.retry_after is not None:
                delay = min(result.retry_after, MAX_RETRY_AFTER_S)
            else:  # exponential backoff with full jitter
                delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
            log.debug("%s; retrying in %.2f s (attempt %d of %d)", result.error, delay, attempt + 2, attempts)
            self._sleep(delay)
        with self._unreachable_lock:
            if result.error is None:
                self._unreachable_streak = 0
            elif result.scope == BACKEND_SCOPE:
                self._unreachable_streak += 1
                self._unreachable_last = result
        if result.error is not None and result.retry and not result.refused:
            tries = "1 attempt" if made == 1 else f"{made} attempts"
            result.error = f"{result.error} (gave up after {tries}; see --max-retries)"
            result.scope = MODEL_SCOPE  # the same failure for request after request stops the run
        return result

    def _attempt(self, messages: list[dict[str, Any]], options: dict[str, Any]) -> _Attempt:
        openai, client = self._openai, self._client
        if client is None:
            return _Attempt(error="the openai backend was unloaded while requests were pending")
        try:
            completion = client.chat.completions.create(
                model=self.model_name, messages=messages, timeout=self.timeout_s, **options
            )
        except openai.APITimeoutError:
            return _Attempt(
                error=f"the server at {public_url(self.base_url)} sent no reply within {self.timeout_s:g} s "
                "(raise --timeout, or lower --concurrency if the server is overloaded)",
                retry=True,
            )
        except openai.APIConnectionError as error:
            return self._connection_failure(error)
        except openai.APIStatusError as error:
            return self._status_failure(error)
        except (openai.APIResponseValidationError, ValueError) as error:  # JSONDecodeError is a ValueError
            return _Attempt(error=f"the server sent a reply that is not valid JSON ({self._short(error)})", retry=True)
        except Exception as error:  # anything else is this image's failure, not the run's
            return _Attempt(error=f"request failed: {type(error).__name__}: {self._short(error)}")
        return self._read_completion(completion)

    def _connection_failure(self, error: BaseException) -> _Attempt:
        """Why no connection was made: DNS and TLS failures are not retried, a refusal briefly, the rest fully."""
        url = public_url(self.base_url)
        parts = urlsplit(self.base_url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        causes: list[BaseException] = []
        cause: BaseException | None = error.__cause__ or error.__context__
        while cause is not None and len(causes) < 10:
            causes.append(cause)
            cause = cause.__cause__ or cause.__context__
        root = causes[-1] if causes else None
        if any(isinstance(item, socket.gaierror) for item in causes):
            return _Attempt(
                error=f"cannot resolve the host name '{host}' of the server at {url} (DNS lookup failed: "
                f"{self._short(root)}); check the spelling of --base-url and this machine's network",
                scope=BACKEND_SCOPE,
            )
        if any(isinstance(item, ssl.SSLError) for item in causes):
            return _Attempt(
                error=f"the TLS (https) handshake with the server at {url} failed ({self._short(root)}); use "
                "http:// for a plain-HTTP server, or make its certificate trusted (SSL_CERT_FILE)",
                scope=BACKEND_SCOPE,
            )
        if any(isinstance(item, ConnectionRefusedError) for item in causes):
            return _Attempt(
                error=f"cannot connect to the server at {url}: connection refused (nothing is listening on "
                f"{host} port {port}); check --base-url and that the server is running",
                retry=True, refused=True, scope=BACKEND_SCOPE,
            )
        detail = f" ({self._short(causes[0])})" if causes else ""
        return _Attempt(
            error=f"cannot connect to the server at {url}{detail}; check --base-url and that the server is running",
            retry=True,
        )

    def _read_completion(self, completion: Any) -> _Attempt:
        if isinstance(completion, (str, bytes)):  # non-JSON content type: the client hands back the text
            return _Attempt(error="the server sent a reply that is not JSON (is --base-url the API address?)",
                            retry=True)
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices:
            return _Attempt(error="the server sent a reply without choices", retry=True)
        choice = choices[0]
        message = getattr(choice, "message", None)
        if message is None:
            return _Attempt(error="the server sent a choice without a message", retry=True)
        content = getattr(message, "content", None)
        refusal = getattr(message, "refusal", None)
        if content is None and refusal:
            return _Attempt(error=f"the model refused: {self._short(refusal)}")
        if isinstance(content, list):  # some servers send content parts
            content = "".join(str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content)
        finish = getattr(choice, "finish_reason", None)
        return _Attempt(
            text="" if content is None else str(content), finish_reason=None if finish is None else str(finish)
        )

    def _status_failure(self, error: Any) -> _Attempt:
        status = int(getattr(error, "status_code", 0) or 0)
        detail = self._server_message(error)
        if status in RETRY_STATUSES or status >= 500:
            headers = getattr(getattr(error, "response", None), "headers", None) or {}
            retry_after = None
            milliseconds = parse_retry_after(headers.get("retry-after-ms"))
            if milliseconds is not None:
                retry_after = milliseconds / 1000
            else:
                retry_after = parse_retry_after(headers.get("retry-after"))
            what = "is rate limiting requests" if status == 429 else "answered with an error"
            return _Attempt(error=f"the server {what} (HTTP {status}){detail}", retry=True, retry_after=retry_after)
        if status in (401, 403):
            if self._api_key is None:
                hint = f"${self.api_key_env} is not set; export the key in it (or pass --api-key-env NAME)"
            else:
                hint = f"check the key in ${self.api_key_env} (or pass --api-key-env NAME)"
            if not self._auth_warned.is_set():
                self._auth_warned.set()
                log.warning("the server refused the API key (HTTP %d): %s", status, hint)
            return _Attempt(error=f"the server refused the API key (HTTP {status}){detail}; {hint}",
                            scope=BACKEND_SCOPE)
        if status == 404:
            return _Attempt(
                error=f"the server does not know model '{self.model_name}' or the address (HTTP 404){detail}; "
                f"list its models at {public_url(self.base_url)}/models, and check that --base-url ends in "
                "the API prefix (usually /v1)",
                scope=BACKEND_SCOPE,
            )
        if status in (400, 422) and self._names_the_model(detail):
            # transformers serve answers a model it does not serve with 400 ("Server is pinned to 'a';
            # requested 'b'."), not 404 as vLLM does: a wrong --model, the same for every image
            return _Attempt(
                error=f"the server refused model '{self.model_name}' (HTTP {status}){detail}; list its models at "
                f"{public_url(self.base_url)}/models and pass one of them as --model",
                scope=BACKEND_SCOPE,
            )
        if status == 413:
            return _Attempt(error=f"the server refused the image as too large (HTTP 413){detail}; "
                            "set --max-image-side (e.g. 1024)")
        return _Attempt(error=f"the server rejected the request (HTTP {status}){detail}")

    def _names_the_model(self, message: str) -> bool:
        """Whether the server's message names the requested model (as a whole name, not inside a word)."""
        name = self.model_name.strip()
        if not name:
            return False
        return re.search(rf"(?<![\w./:-]){re.escape(name)}(?![\w/:-]|\.\w)", message) is not None

    def _server_message(self, error: Any) -> str:
        """': <the server's own message>' (short, key scrubbed), or ''."""
        body = getattr(error, "body", None)
        message = None
        if isinstance(body, dict):
            message = body.get("message") or body.get("detail") or body.get("error")
        elif isinstance(body, str):
            message = body
        if not message:
            return ""
        return f": {self._short(message)}"

    def _short(self, value: Any, limit: int = 300) -> str:
        text = " ".join(str(value).split())
        text = self._scrub(text)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def _scrub(self, text: str) -> str:
        key = self._api_key or os.environ.get(self.api_key_env, "").strip()
        if key and len(key) >= 4:
            text = text.replace(key, "***")
        return text
