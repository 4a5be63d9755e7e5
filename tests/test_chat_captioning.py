"""Chat captioning through the whole core (store, resume, prompts with fields, refusals, samples, render),
driven by a local OpenAI-compatible server so no model weights are needed."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

import captionkit
from captionkit.core.errors import CaptionkitError
from captionkit.core.store import Result, Store

KEY_ENV = "CK_CHAT_TEST_KEY"
KEY = "sk-chat-test-SECRET-abcdef0123456789"


class ColourServer:
    """Answers 'a R-G-B square (prompt: ...)' from the image's top-left pixel; refuses red images if told."""

    def __init__(self) -> None:
        self.refuse_red = False
        self.prompts: list[str] = []
        self.seeds: list[int | None] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][-1]["content"]
                prompt = next(part["text"] for part in content if part["type"] == "text")
                url = next(part["image_url"]["url"] for part in content if part["type"] == "image_url")
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                red, green, blue = image.getpixel((0, 0))
                with threading.Lock():
                    owner.prompts.append(prompt)
                    owner.seeds.append(body.get("seed"))
                if owner.refuse_red and red > 200 and green < 50:
                    text = "I'm sorry, but I can't help with that image."
                else:
                    seed = body.get("seed")
                    extra = f" take {seed}" + "!" * (seed or 0) if seed is not None else ""
                    text = f"The image shows a {red // 50}-{green // 50}-{blue // 50} square (prompt: {prompt}){extra}"
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    running = ColourServer()
    yield running
    running.close()


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _images(folder, sizes=((40, 30), (64, 64), (90, 50))):
    folder.mkdir(parents=True, exist_ok=True)
    for (name, colour), size in zip(COLOURS.items(), sizes, strict=True):
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    return folder


def _server_options(server, **extra):
    return {"backend": "openai", "base_url": server.url, "model": "tiny", "api_key_env": KEY_ENV,
            "progress": "quiet", **extra}


def _put_tags(folder, tags: dict[str, str]) -> None:
    with Store(folder) as store:
        store.put_results([
            Result(step="tags", record_id=name, path=str(folder / name), file_signature=None, content_hash=None,
                   fingerprint="test", settings={}, status="ok", raw={}, text=text, error=None, notes=[],
                   updated_at=0.0)
            for name, text in tags.items()
        ])


def test_captions_resume_and_no_key_in_the_output_folder(tmp_path, server):
    folder = _images(tmp_path / "images")
    summary = captionkit.caption(folder, prompt="Describe it.", export=[tmp_path / "images" / "all.jsonl"],
                                 **_server_options(server))
    assert (summary.processed, summary.failed) == (3, 0)
    assert (folder / "blue.txt").read_text() == "The image shows a 0-0-5 square (prompt: Describe it.)"
    again = captionkit.caption(folder, prompt="Describe it.", **_server_options(server))
    assert (again.processed, again.reused) == (0, 3)
    other = captionkit.caption(folder, prompt="Describe it briefly.", existing="overwrite", **_server_options(server))
    assert other.processed == 3  # the prompt is part of the settings
    for path in folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_prompt_fields_come_from_stored_tags_and_new_tags_recaption(tmp_path, server):
    folder = _images(tmp_path / "images")
    _put_tags(folder, {"red.png": "red, square", "green.png": "green"})
    summary = captionkit.caption(folder, prompt="Tags: {tags}", **_server_options(server))
    assert summary.processed == 2 and summary.failed == 1
    assert "{tags}" in summary.errors["blue.png"] and "blue.png" in summary.errors["blue.png"]
    assert "(prompt: Tags: red, square)" in (folder / "red.txt").read_text()
    _put_tags(folder, {"red.png": "crimson", "blue.png": "blue"})
    again = captionkit.caption(folder, prompt="Tags: {tags}", **_server_options(server))
    assert (again.processed, again.reused, again.failed) == (2, 1, 0)  # red changed, blue now has tags
    assert "(prompt: Tags: crimson)" in (folder / "red.txt").read_text()


def test_prompt_fields_from_a_manifest_column(tmp_path, server):
    _images(tmp_path / "images")
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"images/{name}.png", "style": f"{name} style"}) + "\n"
                                for name in COLOURS))
    summary = captionkit.caption(manifest, prompt="Style: {style}", output_dir=tmp_path / "out",
                                 **_server_options(server))
    assert summary.processed == 3
    assert "(prompt: Style: green style)" in (tmp_path / "out" / "images" / "green.txt").read_text()


def test_a_refusal_is_an_error_never_a_caption_and_is_retried(tmp_path, server):
    folder = _images(tmp_path / "images")
    server.refuse_red = True
    summary = captionkit.caption(folder, **_server_options(server))
    assert summary.processed == 2 and "refused" in summary.errors["red.png"]
    assert not (folder / "red.txt").exists()
    server.refuse_red = False
    again = captionkit.caption(folder, **_server_options(server))
    assert (again.processed, again.reused, again.failed) == (1, 2, 0)
    assert (folder / "red.txt").read_text().startswith("The image shows")


def test_samples_are_all_stored_and_render_chooses(tmp_path, server):
    folder = _images(tmp_path / "images")
    options = _server_options(server, temperature=0.7, samples=3, seed=1)
    captionkit.caption(folder, sample_choice="first", strip_openers=True, **options)
    with Store(folder) as store:
        raw = store.get_many("caption", ["green.png"])["green.png"].raw
    assert len(raw["texts"]) == 3 and sorted(server.seeds)[:3] == [1, 1, 1]
    assert (folder / "green.txt").read_text() == "A 0-5-0 square (prompt: Describe this image in one detailed " \
                                                 "sentence.) take 1!"
    written = captionkit.render(folder, field="caption", sample_choice="longest", strip_openers=True)
    assert written == 3 and (folder / "green.txt").read_text().endswith("take 3!!!")
    captionkit.render(folder, field="caption", sample_choice="all", sample_separator=" | ")
    assert (folder / "green.txt").read_text().count(" | ") == 2


def test_options_of_another_family_are_refused_not_ignored(tmp_path, server, tiny_florence):
    folder = _images(tmp_path / "images")
    with pytest.raises(CaptionkitError, match="--task"):
        captionkit.caption(folder, task="<DETAILED_CAPTION>", **_server_options(server))
    with pytest.raises(CaptionkitError, match="--prompt"):
        captionkit.caption(folder, model=str(tiny_florence), prompt="Describe it.", progress="quiet")
    with pytest.raises(CaptionkitError, match="--tensor-parallel-size"):
        captionkit.caption(folder, tensor_parallel_size=2, **_server_options(server))
    with pytest.raises(CaptionkitError, match="Did you mean 'temperature'"):
        captionkit.caption(folder, temprature=0.5, **_server_options(server))
    assert not (folder / ".captionkit").exists()


def test_options_that_would_do_nothing_are_refused(tmp_path, server, tiny_florence):
    folder = _images(tmp_path / "images")
    with pytest.raises(CaptionkitError, match="--concurrency"):
        captionkit.build_captioner(str(tiny_florence), concurrency=2)
    with pytest.raises(CaptionkitError, match="--device"):
        captionkit.caption(folder, device="cuda", **_server_options(server))
    with pytest.raises(CaptionkitError, match="--early-stopping"):
        captionkit.build_captioner(str(tiny_florence), num_beams=1, early_stopping=True)
    built = captionkit.build_captioner(str(tiny_florence), num_beams=1)
    with pytest.raises(CaptionkitError, match="build_captioner"):
        captionkit.caption(folder, captioner=built, num_beams=5)


def test_literal_braces_mean_the_same_with_or_without_fields(tmp_path, server):
    folder = _images(tmp_path / "images")
    captionkit.caption(folder, prompt="Answer as {{json}}", **_server_options(server))
    assert "(prompt: Answer as {json})" in (folder / "red.txt").read_text()


def test_a_prompt_naming_the_steps_own_field_reads_the_manifest_and_settles(tmp_path, server):
    _images(tmp_path / "images")
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"images/{name}.png", "caption": f"a {name} thing"}) + "\n"
                                for name in COLOURS))
    first = captionkit.caption(manifest, prompt="Improve: {caption}", output_dir=tmp_path / "out",
                               **_server_options(server))
    again = captionkit.caption(manifest, prompt="Improve: {caption}", output_dir=tmp_path / "out",
                               **_server_options(server))
    assert first.processed == 3 and (again.processed, again.reused) == (0, 3)
    assert "(prompt: Improve: a red thing)" in (tmp_path / "out" / "images" / "red.txt").read_text()


def test_every_sample_gets_the_prefix_with_sample_choice_all(tmp_path, server):
    folder = _images(tmp_path / "images")
    captionkit.caption(folder, prefix="ohwx, ", sample_choice="all", **_server_options(
        server, temperature=0.7, samples=2, seed=1))
    lines = (folder / "red.txt").read_text().splitlines()
    assert len(lines) == 2 and all(line.startswith("ohwx, ") for line in lines)
