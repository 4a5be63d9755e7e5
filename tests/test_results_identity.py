"""Results are keyed by what the model is, and the ledger by where files sit in the output folder.

A server reached at another address (localhost for 127.0.0.1) reuses its results; a
captioned folder copied or moved whole still knows the caption files it wrote; a store
written by an earlier captionkit keeps its results and its files.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

import captionkit
from captionkit.core.store import SCHEMA_VERSION, Store, fingerprint
from tests.images import write_good_images
from tests.in_process import run_cli
from tests.test_openai_server import KEY, KEY_ENV, FakeServer

FAST = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "workers": 2}
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "NO_PROXY",
           "no_proxy")


@pytest.fixture
def server(monkeypatch):
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeServer() as fake:
        yield fake


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in PROXIES}
    env.update({KEY_ENV: KEY, "PYTHONPATH": str(Path(captionkit.__file__).parents[1])})
    return run_cli(*args, env=env)  # in this process: the test is about the results, not the interpreter


def _server_caption(folder: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    done = _cli("caption", str(folder), "--backend", "openai", "--base-url", url, "--model", "m",
                "--api-key-env", KEY_ENV, "--prompt", "Describe it.", *extra)
    assert done.returncode == 0, done.stderr
    return done


def test_another_address_of_the_same_server_reuses_the_results(server, tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 3)
    first = _server_caption(folder, server.url)
    assert "3 done" in first.stderr
    asked = len(server.bodies)
    captions = {path.name: path.read_text() for path in folder.glob("*.txt")}
    localhost = server.url.replace("127.0.0.1", "localhost")
    again = _server_caption(folder, localhost)
    assert "0 done, 3 already done" in again.stderr, again.stderr
    assert len(server.bodies) == asked  # not one request
    assert {path.name: path.read_text() for path in folder.glob("*.txt")} == captions
    other_model = _cli("caption", str(folder), "--backend", "openai", "--base-url", localhost, "--model", "other",
                       "--api-key-env", KEY_ENV, "--prompt", "Describe it.")
    assert other_model.returncode == 0 and "3 done" in other_model.stderr  # what the model is still counts


def _caption(folder: Path, model: Path, **options):
    return captionkit.caption(folder, model=str(model), **{**FAST, **options})


def _texts(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): path.read_text() for path in sorted(folder.rglob("*.txt"))}


@pytest.mark.parametrize("how", ["copy", "move"])
def test_a_copied_or_moved_folder_still_owns_its_caption_files(tmp_path, tiny_florence, how):
    original = tmp_path / "images"
    write_good_images(original / "sub", 2)
    write_good_images(original, 2, start=2)
    assert _caption(original, tiny_florence).processed == 4
    before = _texts(original)
    elsewhere = tmp_path / "elsewhere" / "images"
    elsewhere.parent.mkdir()
    (shutil.copytree if how == "copy" else shutil.move)(original, elsewhere)
    changed = _caption(elsewhere, tiny_florence, max_new_tokens=4)
    assert (changed.processed, changed.skipped) == (4, 0), changed.skipped_reasons
    after = _texts(elsewhere)
    assert set(after) == set(before) and after != before  # our files, rewritten with the new settings
    assert _caption(elsewhere, tiny_florence, max_new_tokens=4).reused == 4
    if how == "copy":
        assert _texts(original) == before  # the original is left as it was


def test_a_copied_output_dir_still_owns_its_caption_files(tmp_path, tiny_florence):
    images = tmp_path / "images"
    write_good_images(images, 3)
    first = _caption(images, tiny_florence, output_dir=tmp_path / "out")
    assert first.processed == 3 and not list(images.glob("*.txt"))
    before = _texts(tmp_path / "out")
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    changed = _caption(images, tiny_florence, output_dir=tmp_path / "copy", max_new_tokens=4)
    assert (changed.processed, changed.skipped) == (3, 0), changed.skipped_reasons
    after = _texts(tmp_path / "copy")
    assert set(after) == set(before) and after != before
    user = tmp_path / "copy" / "img000.txt"
    user.write_text("my own words")  # still told apart from ours
    assert _caption(images, tiny_florence, output_dir=tmp_path / "copy").skipped == 1
    assert user.read_text() == "my own words"


def _make_old_store(location: Path, url: str) -> None:
    """Turn a store into what captionkit wrote before schema 2: absolute sidecar paths, the server's
    address in the settings (and so in the fingerprint), no schema version."""
    connection = sqlite3.connect(location / ".captionkit" / "store.sqlite")
    with connection:
        rows = connection.execute("SELECT output_path FROM outputs").fetchall()
        for (path,) in rows:
            connection.execute("UPDATE outputs SET output_path = ? WHERE output_path = ?",
                               (str(location.resolve() / path), path))
        for step, record_id, settings in connection.execute(
                "SELECT step, record_id, settings FROM results").fetchall():
            old = {**json.loads(settings), "base_url": url}
            connection.execute("UPDATE results SET settings = ?, fingerprint = ? WHERE step = ? AND record_id = ?",
                               (json.dumps(old, sort_keys=True), fingerprint(old), step, record_id))
        connection.execute("DELETE FROM meta WHERE key = 'schema_version'")
    connection.close()


def test_a_store_from_before_keeps_its_results_and_files(server, tmp_path):
    folder = tmp_path / "images"
    write_good_images(folder, 3)
    _server_caption(folder, server.url)
    with Store(folder) as store:
        assert all("base_url" not in result.settings for result in store.iter_results())
    connection = sqlite3.connect(folder / ".captionkit" / "store.sqlite")
    kept = sorted(row[0] for row in connection.execute("SELECT output_path FROM outputs"))
    connection.close()
    assert kept == ["img000.txt", "img001.txt", "img002.txt"]  # relative to the folder
    _make_old_store(folder, server.url)
    asked = len(server.bodies)
    again = _server_caption(folder, server.url.replace("127.0.0.1", "localhost"), "--suffix", ", done")
    assert "0 done, 3 already done" in again.stderr, again.stderr
    assert len(server.bodies) == asked
    assert all(path.read_text().endswith(", done") for path in folder.glob("*.txt"))  # still ours: re-rendered
    with Store(folder) as store:
        assert store.get_meta("schema_version") == SCHEMA_VERSION
