"""The OpenAI-compatible server backend against a real local HTTP server that misbehaves on cue."""

from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from captionkit.core.errors import CaptionkitError, MissingDependencyError
from captionkit.models.base import BACKEND_SCOPE, ITEM_SCOPE, MODEL_SCOPE, CaptionRequest, ChatSettings, ItemFailure
from captionkit.models.openai_server import (
    REFUSED_MAX_DELAY_S,
    UNREACHABLE_STREAK,
    OpenAICaptioner,
    parse_retry_after,
    public_url,
)

KEY_ENV = "CK_TEST_OPENAI_KEY"
KEY = "sk-captionkit-SECRET-0123456789abcdef"


class FakeServer:
    """Chat-completions server; ``script[prompt]`` lists what the next requests with that prompt get."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.script: dict[str, list[tuple]] = {}
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def reply(self, status: int, body: bytes, content_type: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout)
                    pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self.reply(404, b'{"error": {"message": "no such route"}}')
                    return
                owner.handle(self, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def handle(self, handler, body: dict) -> None:
        content = body["messages"][-1]["content"]  # parts (image + text), or plain text from a text generator
        prompt = content if isinstance(content, str) else next(part["text"] for part in content
                                                                if part["type"] == "text")
        with self.lock:
            self.bodies.append(body)
            self.auth.append(handler.headers.get("Authorization"))
            self.counts[prompt] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            queue = self.script.get(prompt)
            action = queue.pop(0) if queue else ("ok",)
        try:
            if self.delay:
                time.sleep(self.delay)
            kind = action[0]
            if kind == "slow":
                time.sleep(action[1])
                kind = "ok"
            if kind in ("ok", "text"):  # ("text", content): answer exactly that
                content = action[1] if kind == "text" else f" caption of {prompt} seed={body.get('seed')} "
                reply = {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": content}}],
                }
                handler.reply(200, json.dumps(reply).encode())
            elif kind == "status":
                _, status, headers, error = action
                handler.reply(status, json.dumps({"error": error}).encode(), headers=headers)
            elif kind == "malformed":
                handler.reply(200, b'{"choices": [{"message": tru')
            elif kind == "empty":
                handler.reply(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
            elif kind == "html":
                handler.reply(200, b"<html>502 Bad Gateway</html>", content_type="text/html")
        finally:
            with self.lock:
                self.in_flight -= 1

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeServer() as fake:
        yield fake


_LOADED: list[OpenAICaptioner] = []


@pytest.fixture(autouse=True)
def unload_backends():
    yield
    while _LOADED:
        _LOADED.pop().unload()


def make_backend(url: str, sleeps: list[float] | None = None, **options) -> OpenAICaptioner:
    options.setdefault("timeout_s", 5.0)
    options.setdefault("backoff_base_s", 0.001)
    backend = OpenAICaptioner(
        model="test-vlm", base_url=url, api_key_env=KEY_ENV,
        sleep=(sleeps.append if sleeps is not None else (lambda seconds: None)), **options,
    )
    backend.load()
    _LOADED.append(backend)
    return backend


def requests_for(backend: OpenAICaptioner, prompts: list[str | None], size=(96, 64)) -> list[CaptionRequest]:
    image = Image.new("RGB", size, (200, 40, 90))
    return [CaptionRequest(backend.preprocess(image), image.size, prompt) for prompt in prompts]


def test_captions_and_request_body(server):
    chat = ChatSettings(prompt="default prompt", system_prompt="be terse", temperature=0.7, top_p=0.9, top_k=40,
                        repetition_penalty=1.1, max_new_tokens=77, samples=2, seed=5)
    backend = make_backend(server.url, chat=chat)
    try:
        results = backend.caption_batch(requests_for(backend, [None, "describe img-1"]))
    finally:
        backend.unload()
    assert results[0] == {"texts": ["caption of default prompt seed=5", "caption of default prompt seed=6"],
                          "finish_reasons": ["stop", "stop"]}
    assert backend.render_texts(results[1]) == ["caption of describe img-1 seed=5", "caption of describe img-1 seed=6"]
    json.dumps(results)
    assert len(server.bodies) == 4 and set(server.auth) == {f"Bearer {KEY}"}
    body = server.bodies[0]
    assert body["model"] == "test-vlm"
    assert body["messages"][0] == {"role": "system", "content": "be terse"}
    user = body["messages"][1]
    assert user["role"] == "user"
    assert user["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 77)
    assert (body["top_k"], body["repetition_penalty"]) == (40, 1.1)  # extra_body lands at the top level
    assert "n" not in body
    assert sorted(b["seed"] for b in server.bodies) == [5, 5, 6, 6]


def test_greedy_sends_no_sampling_knobs(server):
    with pytest.raises(CaptionkitError, match="only apply when sampling"):  # refused, not silently dropped
        ChatSettings(temperature=0, top_p=0.5, top_k=3, seed=9)
    backend = make_backend(server.url, chat=ChatSettings(temperature=0, top_p=1.0))
    backend.caption_batch(requests_for(backend, ["p"]))
    body = server.bodies[0]
    assert body["temperature"] == 0 and not {"top_p", "top_k", "seed", "messages_system"} & set(body)
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_retries_recover_from_bad_replies(server):
    server.script = {
        "rate": [("status", 429, {"Retry-After": "7"}, {"message": "slow down"})],
        "five": [("status", 500, {}, {"message": "boom"}), ("status", 503, {}, {"message": "busy"})],
        "malformed": [("malformed",)],
        "empty": [("empty",)],
        "html": [("html",)],
        "slow": [("slow", 1.0)],
        "conflict": [("status", 408, {}, {}), ("status", 409, {}, {})],
        "fine": [],
    }
    sleeps: list[float] = []
    backend = make_backend(server.url, sleeps, timeout_s=0.3)
    prompts = list(server.script)
    results = backend.caption_batch(requests_for(backend, prompts))
    for prompt, result in zip(prompts, results, strict=True):
        assert result == {"texts": [f"caption of {prompt} seed=None"], "finish_reasons": ["stop"]}, prompt
    assert server.counts == Counter(rate=2, five=3, malformed=2, empty=2, html=2, slow=2, conflict=3, fine=1)
    assert 7.0 in sleeps and len(sleeps) == 9 and max(sleeps) == 7.0


def test_retry_after_date_and_cap(server):
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.script = {
        "date": [("status", 429, {"Retry-After": date}, {})],
        "long": [("status", 503, {"Retry-After": "3600"}, {})],
        "ms": [("status", 429, {"retry-after-ms": "250"}, {})],
    }
    sleeps: list[float] = []
    backend = make_backend(server.url, sleeps)
    results = backend.caption_batch(requests_for(backend, ["date", "long", "ms"]))
    assert not any(isinstance(result, ItemFailure) for result in results)
    assert sorted(sleeps)[0] == 0.25 and sorted(sleeps)[2] == 60.0 and 25 <= sorted(sleeps)[1] <= 30.5
    assert parse_retry_after("garbage") is None and parse_retry_after("-3") == 0.0


def test_gives_up_after_max_retries(server):
    server.script = {"bad": [("status", 500, {}, {"message": "model crashed"})] * 10}
    sleeps: list[float] = []
    backend = make_backend(server.url, sleeps, max_retries=2)
    failed, fine = backend.caption_batch(requests_for(backend, ["bad", "ok"]))
    assert isinstance(failed, ItemFailure) and "HTTP 500" in failed.message and "model crashed" in failed.message
    assert "3 attempts" in failed.message and "--max-retries" in failed.message
    assert fine["texts"] == ["caption of ok seed=None"]
    assert server.counts["bad"] == 3 and len(sleeps) == 2 and all(s <= 0.004 for s in sleeps)


def test_client_errors_are_not_retried(server):
    server.script = {
        "bad": [("status", 400, {}, {"message": "image too big"})],
        "missing": [("status", 404, {}, {"message": "model does not exist"})],
        "key": [("status", 401, {}, {"message": "invalid key"})],
        "forbidden": [("status", 403, {}, {})],
    }
    backend = make_backend(server.url)
    bad, missing, key, forbidden = backend.caption_batch(requests_for(backend, list(server.script)))
    assert server.counts == Counter(bad=1, missing=1, key=1, forbidden=1)
    assert isinstance(bad, ItemFailure) and "HTTP 400" in bad.message and "image too big" in bad.message
    assert "test-vlm" in missing.message and "/models" in missing.message
    assert KEY_ENV in key.message and "HTTP 401" in key.message and KEY_ENV in forbidden.message


def test_api_key_never_leaks(server, caplog, monkeypatch):
    echo = f"Incorrect API key provided: {KEY}"
    server.script = {
        "key": [("status", 401, {}, {"message": echo})],
        "bad": [("status", 400, {}, {"message": echo})],
        "busy": [("status", 500, {}, {"message": echo})] * 5,
    }
    caplog.set_level(logging.DEBUG)
    backend = make_backend(server.url, max_retries=1)
    results = backend.caption_batch(requests_for(backend, ["key", "bad", "busy", "fine"]))
    assert server.auth[0] == f"Bearer {KEY}"  # the key is used ...
    messages = [result.message for result in results if isinstance(result, ItemFailure)]
    assert len(messages) == 3 and all("***" in message for message in messages)
    backend.unload()
    seen = json.dumps(backend.fingerprint()) + json.dumps(results[3]) + " ".join(messages) + caplog.text
    assert KEY not in seen  # ... and shown nowhere
    with pytest.raises(CaptionkitError) as error:  # the key pasted where the variable's name goes
        OpenAICaptioner(model="m", base_url=server.url, api_key_env=KEY)
    assert KEY not in str(error.value) and "--api-key-env" in str(error.value)
    leaky = OpenAICaptioner(model="m", base_url=f"http://user:{KEY}@127.0.0.1:9/v1/?api_key={KEY}")
    assert "base_url" not in leaky.fingerprint() and KEY not in json.dumps(leaky.fingerprint())
    assert public_url(leaky.base_url) == "http://127.0.0.1:9/v1"
    assert public_url("https://[::1]:8000/v1/") == "https://[::1]:8000/v1"


def test_missing_key_sends_placeholder(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    server.script = {"key": [("status", 401, {}, {})]}
    backend = make_backend(server.url)
    ok, refused = backend.caption_batch(requests_for(backend, ["p", "key"]))
    assert ok["texts"] == ["caption of p seed=None"] and server.auth[0] == "Bearer EMPTY"
    assert f"${KEY_ENV} is not set" in refused.message


def test_concurrency_is_limited(server):
    server.delay = 0.05
    backend = make_backend(server.url, concurrency=3)
    results = backend.caption_batch(requests_for(backend, [f"img-{index}" for index in range(18)]))
    assert [result["texts"][0] for result in results] == [f"caption of img-{i} seed=None" for i in range(18)]
    assert server.max_in_flight == 3


def test_max_image_side_downsizes_what_the_server_gets(server):
    def received(index: int):
        url = server.bodies[index]["messages"][-1]["content"][1]["image_url"]["url"]
        header, data = url.split(",", 1)
        return header, Image.open(io.BytesIO(base64.b64decode(data)))

    backend = make_backend(server.url, max_image_side=64)
    assert backend.image_size() == (64, 64)
    backend.caption_batch(requests_for(backend, ["p"], size=(300, 150)))
    header, image = received(0)
    assert header == "data:image/jpeg;base64" and image.format == "JPEG" and image.size == (64, 32)
    backend = make_backend(server.url, image_format="png")
    assert backend.image_size() is None
    backend.caption_batch(requests_for(backend, ["p"], size=(300, 150)))
    header, image = received(1)
    assert header == "data:image/png;base64" and image.format == "PNG" and image.size == (300, 150)


def test_unreachable_server_is_an_item_failure_with_one_short_retry(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    backend = make_backend(f"http://127.0.0.1:{port}/v1", sleeps, max_retries=5, backoff_base_s=10.0,
                           concurrency=1)  # one request after another: the count below is exact
    (result,) = backend.caption_batch(requests_for(backend, ["p"]))
    assert isinstance(result, ItemFailure) and "cannot connect" in result.message and "--base-url" in result.message
    assert "connection refused" in result.message and result.scope == BACKEND_SCOPE
    assert len(sleeps) == 1 and sleeps[0] <= REFUSED_MAX_DELAY_S  # not the full backoff, whatever its base
    # once the server has refused that many requests in a row, later ones are not retried at all
    sleeps.clear()
    results = backend.caption_batch(requests_for(backend, ["p"] * (UNREACHABLE_STREAK + 4)))
    assert all(isinstance(item, ItemFailure) and item.scope == BACKEND_SCOPE for item in results)
    assert len(sleeps) == UNREACHABLE_STREAK - 1  # the first request above counted too


def test_dns_and_tls_failures_are_not_retried(server):
    sleeps: list[float] = []
    backend = make_backend("http://captionkit-no-such-host.invalid:8000/v1", sleeps, max_retries=5)
    (result,) = backend.caption_batch(requests_for(backend, ["p"]))
    assert isinstance(result, ItemFailure) and result.scope == BACKEND_SCOPE and sleeps == []
    assert "cannot resolve the host name 'captionkit-no-such-host.invalid'" in result.message
    backend = make_backend(server.url.replace("http://", "https://"), sleeps, max_retries=5)  # a plain-HTTP server
    (result,) = backend.caption_batch(requests_for(backend, ["p"]))
    assert isinstance(result, ItemFailure) and result.scope == BACKEND_SCOPE and sleeps == []
    assert "TLS (https) handshake" in result.message and "http://" in result.message


def test_after_that_many_dns_failures_in_a_row_no_more_lookups_are_made(monkeypatch):
    """A host that does not resolve: once UNREACHABLE_STREAK requests in a row failed so, the rest of the batch
    ends with the same error at once instead of each asking the resolver again (a resolver that drops queries
    makes every lookup wait its timeout, 5 s by default)."""
    import socket

    lookups: list[str] = []

    def no_such_host(host, *arguments, **options):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    backend = make_backend("http://captionkit-no-such-host.invalid:8000/v1", [], max_retries=5, concurrency=1)
    results = backend.caption_batch(requests_for(backend, ["p"] * (UNREACHABLE_STREAK + 20)))
    assert len(lookups) == UNREACHABLE_STREAK  # one request at a time: exactly the streak asked
    assert all(isinstance(item, ItemFailure) and item.scope == BACKEND_SCOPE for item in results)
    assert all("cannot resolve the host name 'captionkit-no-such-host.invalid'" in item.message for item in results)


def test_failures_say_what_they_mean_for_the_rest_of_the_run(server):
    server.script["gone"] = [("status", 404, {}, {"message": "model not found"})]
    server.script["busy"] = [("status", 503, {}, {"message": "overloaded"})] * 3
    backend = make_backend(server.url, max_retries=2)
    gone, busy = backend.caption_batch(requests_for(backend, ["gone", "busy"]))
    assert gone.scope == BACKEND_SCOPE  # the same for every image: the circuit breaker may stop the run
    assert busy.scope == MODEL_SCOPE and "gave up after 3 attempts" in busy.message


def test_a_400_naming_the_requested_model_is_the_runs_failure_not_the_images(server):
    """transformers serve answers a model it does not serve with 400, not 404 (its exact words below);
    a 400 that only contains the name inside another word stays this image's failure."""
    server.script = {
        "pinned": [("status", 400, {}, {"message": "Server is pinned to 'org/tiny'; requested 'test-vlm'."})],
        "sentence": [("status", 400, {}, {"message": "unknown model test-vlm."})],
        "longer": [("status", 400, {}, {"message": "context too long for test-vlm-2.1"})],
        "plain": [("status", 400, {}, {"message": "image too big"})],
    }
    backend = make_backend(server.url)
    pinned, sentence, longer, plain = backend.caption_batch(requests_for(backend, list(server.script)))
    assert server.counts == Counter(pinned=1, sentence=1, longer=1, plain=1)  # none retried
    assert pinned.scope == BACKEND_SCOPE and sentence.scope == BACKEND_SCOPE
    assert "refused model 'test-vlm' (HTTP 400)" in pinned.message and "pinned to 'org/tiny'" in pinned.message
    assert f"{server.url}/models" in pinned.message and "--model" in pinned.message
    assert longer.scope == ITEM_SCOPE and plain.scope == ITEM_SCOPE and "HTTP 400" in plain.message


@pytest.mark.parametrize(
    ("options", "flag"),
    [
        ({"base_url": "localhost:8000/v1"}, "--base-url"),
        ({"base_url": ""}, "--base-url"),
        ({"model": " "}, "--model"),
        ({"concurrency": 0}, "--concurrency"),
        ({"timeout_s": 0}, "--timeout"),
        ({"max_retries": -1}, "--max-retries"),
        ({"max_image_side": 8}, "--max-image-side"),
        ({"image_format": "webp"}, "--image-format"),
        ({"api_key_env": ""}, "--api-key-env"),
    ],
)
def test_options_are_checked(options, flag):
    arguments = {"model": "m", "base_url": "http://localhost:8000/v1", **options}
    with pytest.raises(CaptionkitError, match=flag):
        OpenAICaptioner(**arguments)


def test_registry_lifetime_and_install_hint(server, monkeypatch):
    from captionkit.models import get_backend

    assert get_backend("openai").factory is OpenAICaptioner
    backend = OpenAICaptioner(model="m", base_url=server.url, api_key_env=KEY_ENV)
    with pytest.raises(CaptionkitError, match="load"):
        backend.caption_batch([])
    fingerprint = backend.fingerprint()
    assert fingerprint["backend"] == "openai" and fingerprint["model"] == "m"
    assert fingerprint["image"] == {"max_side": None, "format": "jpeg"} and "chat" in fingerprint
    backend.load()
    backend.unload()
    backend.load()  # again after unload
    assert backend.caption_batch(requests_for(backend, ["p"]))[0]["texts"] == ["caption of p seed=None"]
    backend.unload()
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(MissingDependencyError, match=r"captionkit\[openai\]"):
        OpenAICaptioner(model="m", base_url=server.url).load()
