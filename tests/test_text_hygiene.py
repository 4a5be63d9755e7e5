"""Captions are plain one-line text whatever the backend: no control characters, U+FFFD or line breaks.

Each backend's render path is exercised as it runs: Florence-2's raw result through the
caption step, chat VLM and vLLM raw results, a real local OpenAI-compatible server (the
fake server of test_openai_server.py) through the CLI, and the pipeline text generator.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

import captionkit
from captionkit.core.text import clean_caption
from captionkit.steps.captioner import CaptionStep, CaptionText
from tests.in_process import run_cli
from tests.test_openai_server import KEY, KEY_ENV, FakeServer

DIRTY = " A red\x01 cat\x10 on a \x1b[31mmat\x1b[0m\ufffd.\r\nIt sleeps\x7f.\n\n\u2028Second\x0cline\x85end\ufeff "
CLEAN = "A red cat on a mat. It sleeps. Second line end"


def test_clean_caption_removes_control_characters_and_joins_lines():
    from captionkit.core.text import unclean_characters

    assert clean_caption(DIRTY) == CLEAN
    assert unclean_characters(DIRTY) == {"control": 5, "replacement": 1, "line_breaks": 4}
    assert unclean_characters(CLEAN) == {}
    assert unclean_characters("a caption with a trailing newline\n") == {}
    unicode = "ein Café, 東京の夜, emoji 🐈\u200d⬛"  # letters and joiners are text, not noise
    assert clean_caption(f"{unicode} and\ttabs") == f"{unicode} and tabs"


def test_no_cleanup_keeps_the_text_as_the_model_wrote_it():
    assert CaptionText(cleanup=False).render([DIRTY]) == DIRTY
    assert CaptionText().render([DIRTY]) == CLEAN
    # every sample stays one caption; the separator (a newline by default) is the user's choice
    assert CaptionText(sample_choice="all").render([DIRTY, "b\x01\nc"]) == f"{CLEAN}\nb c"


def test_florence2_render_path(tiny_florence):
    from captionkit.models.florence2 import Florence2Captioner

    step = CaptionStep(Florence2Captioner(str(tiny_florence), device="cpu"))
    assert step.render({"parsed": DIRTY}) == CLEAN
    labelled = {"parsed": {"labels": ["a\x01 cat", "a dog\ufffd"]}}  # detection tasks render their labels
    assert step.render(labelled) == "a cat, a dog"


@pytest.mark.parametrize("backend", ["chat_vlm", "vllm"])
def test_chat_vlm_and_vllm_render_paths(backend):
    if backend == "vllm":
        from captionkit.models.vllm_engine import VLLMCaptioner as captioner_class
    else:
        from captionkit.models.llava import LlavaCaptioner as captioner_class

    step = CaptionStep(captioner_class.__new__(captioner_class), prompt="Describe it.")  # render needs no model
    assert step.render({"texts": [DIRTY]}) == CLEAN


def _images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (40, 30), (index * 90, 20, 200)).save(folder / f"img{index}.png")
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, KEY_ENV: KEY, "PYTHONPATH": str(Path(captionkit.__file__).parents[1])}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    return run_cli(*args, env=env)  # in this process: the test is about the text, not the interpreter


def test_openai_server_captions_are_cleaned_and_no_cleanup_keeps_them(tmp_path, monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    folder = _images(tmp_path / "images")
    with FakeServer() as server:
        server.script = {"Describe it.": [("text", DIRTY)] * 2}
        common = ["caption", str(folder), "--backend", "openai", "--base-url", server.url, "--model", "m",
                  "--api-key-env", KEY_ENV, "--prompt", "Describe it."]
        done = _cli(*common)
        assert done.returncode == 0, done.stderr
        assert [(folder / f"img{index}.txt").read_text(encoding="utf-8") for index in range(2)] == [CLEAN] * 2
        requests = len(server.bodies)
        kept = _cli(*common, "--no-cleanup")  # a render setting: the stored raw text is rendered again
        assert kept.returncode == 0, kept.stderr
        assert len(server.bodies) == requests  # no new requests
    assert (folder / "img0.txt").read_bytes().decode("utf-8") == DIRTY.strip()  # the client trims the ends


def test_pipeline_text_generator_output_is_cleaned(tmp_path, monkeypatch):
    from captionkit.core.store import Store
    from captionkit.pipeline import run_pipeline

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"caption": "a cat"}) + "\n" + json.dumps({"caption": "a dog"})
                                            + "\n")
    with FakeServer() as server:
        server.script = {"Rewrite: a cat": [("text", DIRTY)], "Rewrite: a dog": [("text", "fine\x1b[1m text")]}
        config = {"input": "prompts.jsonl", "base_folder": "work", "save_folder": "out", "steps": [
            {"type": "text_generator", "name": "rewrite", "config": {
                "backend": "openai", "base_url": server.url, "model": "m", "api_key_env": KEY_ENV,
                "prompt": "Rewrite: {caption}"}}]}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        report = run_pipeline(tmp_path / "p.yaml")
        assert [step.failed for step in report.steps] == [0]
        with Store(tmp_path / "work") as store:
            texts = sorted(result.text for result in store.iter_results())
        assert texts == sorted([CLEAN, "fine text"])
        rows = [json.loads(line) for line in (tmp_path / "out" / "result.jsonl").read_text().splitlines()]
        assert sorted(row[report.steps[0].output_field] for row in rows) == sorted([CLEAN, "fine text"])
        requests = len(server.bodies)
        config["steps"][0]["config"]["cleanup"] = False  # kept as the server sent it, from the stored result
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        kept = run_pipeline(tmp_path / "p.yaml")
        assert (kept.steps[0].done, len(server.bodies)) == (2, requests)
    with Store(tmp_path / "work") as store:
        assert sorted(result.text for result in store.iter_results()) == sorted([DIRTY.strip(), "fine\x1b[1m text"])
