"""``captionkit caption --backend openai`` against Hugging Face's own OpenAI-compatible server.

One ``transformers serve`` (started through tests/transformers_serve.py, which repairs this
environment's torchvision) serves a tiny random-weight LLaVA for the whole module; every test
runs the real command line against it (in this process through tests/in_process.py, except the run
whose server is killed under it). Its log counts the chat-completion requests it got.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.images import write_good_images
from tests.in_process import run_cli

pytestmark = pytest.mark.slow  # a server start of 10-30 s (more on a busy machine), and a restart

LAUNCHER = Path(__file__).with_name("transformers_serve.py")
CLI = [sys.executable, "-m", "captionkit.cli"]
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(threads: int | None = None) -> dict[str, str]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        environment.pop(name, None)
    environment["NO_PROXY"] = environment["no_proxy"] = "127.0.0.1,localhost"
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    return environment


class TransformersServe:
    """``transformers serve MODEL`` on a port of its own, in a process group of its own (its model
    runs in a child process), so that stopping it stops all of it."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log, self.port = model, log, _free_port()
        self.process: subprocess.Popen | None = None
        self.start_seconds: list[float] = []

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/v1"

    def start(self) -> None:
        began = time.monotonic()
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(LAUNCHER), "serve", str(self.model), "--host", "127.0.0.1",
                 "--port", str(self.port), "--device", "cpu"],
                env=_env(threads=1), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        while time.monotonic() - began < START_TIMEOUT_S:
            if self.process.poll() is not None:
                pytest.fail(f"transformers serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url()}/models", timeout=2) as answer:
                    models = json.load(answer)
                assert [entry["id"] for entry in models["data"]] == [str(self.model)]
                self.start_seconds.append(time.monotonic() - began)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"transformers serve did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kills the server and its model process at once (SIGKILL: no graceful shutdown)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None

    def requests_served(self) -> int:
        return self.log.read_text(errors="replace").count('"POST /v1/chat/completions HTTP/1.1" 200')

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from captionkit.testing.vlms.llava import build_llava

    folder = tmp_path_factory.mktemp("transformers-serve")
    running = TransformersServe(build_llava(folder / "tiny-llava"), folder / "serve.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _caption(folder: Path, url: str, model: Path, *extra: str) -> list[str]:
    return [*CLI, "caption", str(folder), "--backend", "openai", "--base-url", url, "--model", str(model),
            "--max-new-tokens", "12", *extra]


def _run(arguments: list[str]) -> subprocess.CompletedProcess:
    """The command line ``arguments`` (``CLI`` + its arguments) run in this process: what it does, not a fresh
    interpreter's imports, is under test."""
    assert arguments[:len(CLI)] == CLI
    return run_cli(*arguments[len(CLI):], env=_env())


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _stored(folder: Path) -> dict[str, str]:
    with sqlite3.connect(folder / ".captionkit" / "store.sqlite") as connection:
        return dict(connection.execute("SELECT record_id, status FROM results").fetchall())


def _caption_files(folder: Path) -> dict[str, str]:
    return {path.stem: path.read_text(encoding="utf-8") for path in folder.glob("*.txt")}


def test_a_folder_is_captioned_through_transformers_serve(tmp_path, server):
    folder = tmp_path / "images"
    write_good_images(folder, 3)
    before = server.requests_served()
    result = _run(_caption(folder, server.url(), server.model, "--progress", "json"))
    assert result.returncode == 0, result.stderr + server.log_tail()
    summary = _summary(result.stdout)
    assert summary["processed"] == 3 and summary["failed"] == 0
    captions = _caption_files(folder)
    assert sorted(captions) == ["img000", "img001", "img002"]
    for text in captions.values():  # one non-empty line each, as the server wrote it
        assert text.strip() and "\n" not in text.strip()
    stored = _stored(folder)
    assert len(stored) == 3 and set(stored.values()) == {"ok"}
    assert server.requests_served() - before == 3  # one chat completion per image, each answered 200


def test_a_rerun_through_localhost_reuses_every_result(tmp_path, server):
    folder = tmp_path / "images"
    write_good_images(folder, 3)
    first = _run(_caption(folder, server.url("127.0.0.1"), server.model, "-q"))
    assert first.returncode == 0, first.stderr
    captions, served = _caption_files(folder), server.requests_served()
    again = _run(_caption(folder, server.url("localhost"), server.model))
    assert again.returncode == 0, again.stderr
    assert "caption: 0 done, 3 already done, 0 skipped, 0 failed of 3" in again.stderr, again.stderr
    assert server.requests_served() == served  # no new request reached the server
    assert _caption_files(folder) == captions


def test_a_model_the_server_does_not_serve_stops_the_run_early(tmp_path, server):
    """transformers serve answers a model it does not serve with HTTP 400 (vLLM and Ollama with 404):
    the same for every image, so the run stops after a few instead of asking once per image."""
    folder = tmp_path / "images"
    total = 40
    write_good_images(folder, total)
    result = _run([*CLI, "caption", str(folder), "--backend", "openai", "--base-url", server.url(), "--model",
                   "tiny-llava-typo", "--batch-size", "4", "--max-retries", "0", "-q"])
    assert result.returncode == 3, result.stderr
    sentences = [line for line in result.stderr.splitlines() if line.startswith("Stopped early")]
    assert len(sentences) == 1, result.stderr
    assert "'tiny-llava-typo'" in sentences[0] and "HTTP 400" in sentences[0], sentences[0]
    assert f"{server.url()}/models" in sentences[0] and "--model" in sentences[0], sentences[0]
    assert len(_stored(folder)) < total


def test_the_server_killed_mid_run_stops_it_early_and_a_rerun_does_only_the_rest(tmp_path, server):
    """Last in the module: it kills the module's server, and starts it again."""
    folder = tmp_path / "images"
    total = 24
    write_good_images(folder, total, suffix=".jpg")
    run = subprocess.Popen(
        _caption(folder, server.url(), server.model, "--progress", "json", "--batch-size", "2", "--concurrency", "1"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert run.stdout is not None
        for line in run.stdout:
            event = json.loads(line)
            if event["event"] == "progress" and event["done"] >= 2:
                server.stop()  # mid-run: the next requests find nobody listening, one may be cut off
                break
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 3, stderr
    sentences = [line for line in stderr.splitlines() if line.startswith("Stopped early")]
    assert len(sentences) == 1, stderr
    assert f"127.0.0.1 port {server.port}" in sentences[0] and "--base-url" in sentences[0], sentences[0]
    summary = _summary(stdout)
    assert summary["stopped_early"]
    stored = _stored(folder)
    finished = sorted(record for record, status in stored.items() if status == "ok")
    assert 2 <= len(finished) < total  # what finished before the kill is kept, the rest was not tried in vain
    assert len(_caption_files(folder)) == len(finished)

    server.start()
    rest = _run(_caption(folder, server.url(), server.model, "--progress", "json"))
    assert rest.returncode == 0, rest.stderr + server.log_tail()
    summary = _summary(rest.stdout)
    assert summary["reused"] == len(finished) and summary["processed"] == total - len(finished), summary
    assert len(_caption_files(folder)) == total
    assert set(_stored(folder).values()) == {"ok"}
