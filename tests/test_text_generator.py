"""The ``text_generator`` step: a tiny local chat LM built offline, and a local chat-completions server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.models.base import ItemFailure
from captionkit.steps.registry import StepContext, find_step_type
from captionkit.testing.text import build_tiny_chat_lm

KEY_ENV = "CK_TEST_TEXTGEN_KEY"
KEY = "sk-textgen-SECRET-0123456789abcdef"
CAPTIONS = {
    "a": "a red cat",
    "b": "a large dog standing next to a blue car on the street under a dark sky with a tree",
    "c": "the photo shows a small yellow flower in a green field next to a river",
    "d": "sky",
}


def context(tmp_path, name: str = "shorten", output_field: str = "short") -> StepContext:
    return StepContext(index=1, name=name, output_field=output_field, base_folder=tmp_path / "base",
                       save_folder=tmp_path / "save", input_fields=["caption"])


def build(config: dict, tmp_path, **options):
    return find_step_type("GPTTextGenerator").builder(config, context(tmp_path, **options))


def records(captions: dict[str, str] = CAPTIONS) -> list[Record]:
    return [Record(id=key, path=None, fields={"caption": text}) for key, text in captions.items()]


def generate(step, batch: list[Record]) -> list:
    settings = step.record_settings(batch)
    assert all(isinstance(value, dict) for value in settings.values()), settings
    return step.run_batch([step.prepare(record) for record in batch])


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return build_tiny_chat_lm(tmp_path_factory.mktemp("tiny-chat-lm"), seed=0)


@pytest.fixture(scope="module")
def local_step(lm_folder, tmp_path_factory):
    config = {"type": "GPTTextGenerator", "model": str(lm_folder), "prompt": "Shorten this caption: {caption}",
              "sys_prompt": "You are a careful editor.", "max_new_tokens": 12, "batch_size": 4, "device": "cpu"}
    step = build(config, tmp_path_factory.mktemp("ctx"))
    step.load()
    yield step
    step.unload()


# local transformers backend ---------------------------------------------------------------
def test_registry_entry():
    step_type = find_step_type("TextGenerator")
    assert step_type.name == "text_generator" and find_step_type("GPTTextGenerator") is step_type
    assert step_type.needs_images is False and step_type.required == ("prompt",)
    assert step_type.key_aliases["sys_prompt"] == "system_prompt"
    assert step_type.key_aliases["max_num_seqs"] == "concurrency"
    assert {"backend", "model", "base_url", "api_key_env", "prompt", "system_prompt", "temperature", "top_p",
            "max_new_tokens", "concurrency", "batch_size", "device", "dtype", "seed", "samples"} <= set(step_type.keys)


def test_generates_text_for_text_only_records(local_step):
    batch = records()
    raws = generate(local_step, batch)
    assert len(raws) == len(batch)
    texts = [raw["texts"] for raw in raws]
    assert all(len(item) == 1 and item[0] for item in texts), texts
    assert len({item[0] for item in texts}) == len(texts), "outputs should differ per prompt"
    rendered = [local_step.render(raw) for raw in raws]
    assert all(isinstance(text, str) and text for text in rendered)
    assert local_step.field == "short" and local_step.batch_size == 4
    prepared = local_step.prepare(batch[0])
    assert prepared.payload[0] == {"role": "system", "content": "You are a careful editor."}
    assert prepared.payload[1] == {"role": "user", "content": "Shorten this caption: a red cat"}


def test_batched_greedy_equals_one_at_a_time(local_step):
    batch = records()  # prompts of very different lengths share one left-padded batch
    together = [raw["texts"] for raw in generate(local_step, batch)]
    alone = [generate(local_step, [record])[0]["texts"] for record in batch]
    assert together == alone
    again = [raw["texts"] for raw in generate(local_step, list(reversed(batch)))]
    assert again == list(reversed(together))


def test_sampling_is_seeded(lm_folder, tmp_path):
    config = {"model": str(lm_folder), "prompt": "Rewrite: {caption}", "temperature": 1.0, "seed": 3,
              "repeat_time": 2, "max_new_tokens": 8, "device": "cpu"}
    step = build(config, tmp_path)
    step.load()
    try:
        first = generate(step, records({"a": "a red cat", "b": "a blue car"}))
        second = generate(step, records({"a": "a red cat", "b": "a blue car"}))
    finally:
        step.unload()
    assert [len(raw["texts"]) for raw in first] == [2, 2]
    assert first == second
    assert step.generator.model is None


def test_missing_or_empty_field_is_the_records_error(local_step):
    batch = [Record(id="x1", path=None, fields={"tags": "cat"}), Record(id="x2", path=None, fields={"caption": " "}),
             Record(id="ok", path=None, fields={"caption": "a cat"})]
    settings = local_step.record_settings(batch)
    assert isinstance(settings["x1"], str) and "'x1'" in settings["x1"] and "'caption'" in settings["x1"]
    assert "missing" in settings["x1"]
    assert isinstance(settings["x2"], str) and "'x2'" in settings["x2"] and "empty" in settings["x2"]
    assert settings["ok"] == {"prompt": "Shorten this caption: a cat"}


def test_fingerprint_follows_settings_not_record_text(lm_folder, local_step, tmp_path):
    base = {"model": str(lm_folder), "prompt": "Shorten this caption: {caption}", "max_new_tokens": 12,
            "device": "cpu"}
    plain = build(base, tmp_path)
    editor = build({**base, "system_prompt": "You are a careful editor."}, tmp_path)
    other = build({**base, "system_prompt": "Answer in German."}, tmp_path)
    assert plain.fingerprint() != editor.fingerprint() != other.fingerprint()
    assert editor.fingerprint() == local_step.fingerprint()  # sys_prompt is the same key
    fingerprint = editor.fingerprint()
    assert fingerprint["backend"] == "transformers" and fingerprint["revision"].startswith("content:")
    assert "a red cat" not in json.dumps(fingerprint)
    first = editor.record_settings(records({"a": "a red cat", "b": "a dog"}))
    changed = editor.record_settings(records({"a": "a red cat", "b": "a big dog"}))
    assert first["a"] == changed["a"] and first["b"] != changed["b"]
    assert editor.fingerprint() == fingerprint
    assert build({**base, "max_new_tokens": 20}, tmp_path).fingerprint() != plain.fingerprint()


def test_config_errors(lm_folder, tmp_path):
    base = {"model": str(lm_folder), "prompt": "Shorten: {caption}"}
    with pytest.raises(CaptionkitError) as refused:
        build({**base, "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": KEY}, tmp_path)
    message = str(refused.value)
    assert "api_key_env" in message and "environment variable" in message and KEY not in message
    with pytest.raises(CaptionkitError, match="transformers or openai"):
        build({**base, "backend": "openia"}, tmp_path)
    with pytest.raises(CaptionkitError, match="writes"):
        build({**base, "prompt": "Shorten: {short}"}, tmp_path)
    with pytest.raises(CaptionkitError, match="base_url"):
        build({**base, "backend": "openai"}, tmp_path)
    with pytest.raises(CaptionkitError, match="backend: openai"):
        build({**base, "base_url": "http://127.0.0.1:9/v1"}, tmp_path)
    with pytest.raises(CaptionkitError, match="model"):
        build({"prompt": "Shorten: {caption}"}, tmp_path)
    with pytest.raises(CaptionkitError, match="whole number"):
        build({**base, "max_new_tokens": "lots"}, tmp_path)


# OpenAI-compatible backend ----------------------------------------------------------------
class ChatServer:
    """Chat-completions server answering 'rewritten: <user text>' (a refusal when the text says REFUSE)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                owner.auth.append(self.headers.get("Authorization"))
                user = body["messages"][-1]["content"]
                text = "I'm sorry, but I can't help with that." if "REFUSE" in user else f" rewritten: {user} "
                reply = json.dumps({
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            patch.delenv(name, raising=False)
        patch.setenv(KEY_ENV, KEY)
        chat = ChatServer()
        yield chat
        chat.close()


def test_openai_backend_returns_texts_and_sends_system_prompt(server, tmp_path):
    config = {"backend": "openai", "model": "tiny-chat", "base_url": server.url, "api_key_env": KEY_ENV,
              "prompt": "Shorten this caption: {caption}", "system_prompt": "You are a careful editor.",
              "max_num_seqs": 2, "max_new_tokens": 40}
    step = build(config, tmp_path)
    assert step.batch_size == 8
    step.load()
    try:
        batch = records({"a": "a red cat", "b": "a dog", "r": "REFUSE this"})
        raws = generate(step, batch)
    finally:
        step.unload()
    assert raws[0]["texts"] == ["rewritten: Shorten this caption: a red cat"]
    assert step.render(raws[1]) == "rewritten: Shorten this caption: a dog"
    assert isinstance(raws[2], ItemFailure) and "refused" in raws[2].message
    assert len(server.bodies) == 3
    for body in server.bodies:
        assert body["model"] == "tiny-chat" and body["max_tokens"] == 40 and body["temperature"] == 0
        assert body["messages"][0] == {"role": "system", "content": "You are a careful editor."}
        assert body["messages"][1]["role"] == "user"
    assert {body["messages"][1]["content"] for body in server.bodies} == {
        "Shorten this caption: a red cat", "Shorten this caption: a dog", "Shorten this caption: REFUSE this"}
    assert set(server.auth) == {f"Bearer {KEY}"}
    fingerprint = json.dumps(step.fingerprint())
    assert KEY not in fingerprint and "tiny-chat" in fingerprint and '"backend": "openai"' in fingerprint
    with pytest.raises(CaptionkitError, match="not loaded"):
        step.run_batch([step.prepare(batch[0])])


def test_a_prompt_without_fields_is_followed_by_each_records_text(lm_folder, tmp_path):
    """Dataflow-Gen's way: an instruction, then the record's text; never one answer for every record."""
    with pytest.raises(CaptionkitError, match="names no field, so every record would get the same answer"):
        build({"model": str(lm_folder), "prompt": "Summarise the following content."}, tmp_path)
    step = build({"model": str(lm_folder), "prompt": "Summarise the following content.", "input_field": "caption",
                  "max_new_tokens": 4}, tmp_path)
    prompts = {key: value["prompt"] for key, value in step.record_settings(records()).items()}
    assert prompts == {key: f"Summarise the following content.\n{text}" for key, text in CAPTIONS.items()}
    with pytest.raises(CaptionkitError, match="input_field is for a prompt that names no field"):
        build({"model": str(lm_folder), "prompt": "Shorten: {caption}", "input_field": "caption"}, tmp_path)
    with pytest.raises(CaptionkitError, match="hosted API's model.*backend: openai"):
        build({"model": "gpt-4o", "prompt": "Shorten: {caption}"}, tmp_path)
