"""Images in object storage (issue 18 items 1, 2, 5) against a real S3 server (moto, over HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import captionkit
from captionkit.core.errors import CaptionkitError
from captionkit.core.store import Store
from captionkit.testing.s3_server import moto_server
from tests.images import write_good_images
from tests.in_process import run_cli
from tests.run_state import committed as committed_results
from tests.run_state import wait_while_running

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

FAST = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "workers": 2}
BUCKET = "photos"
IMAGES = 5
KILL_IMAGES = 20  # the kill -9 run: 10 batches of 2, more than twice the few committed before the signal
CLI = [sys.executable, "-m", "captionkit.cli"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """One server per module; the bucket holds ``set/`` (IMAGES images) and ``big/`` (KILL_IMAGES)."""
    folder = tmp_path_factory.mktemp("local-images")
    with moto_server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        write_good_images(folder / "set", IMAGES)
        write_good_images(folder / "big", KILL_IMAGES)
        server.upload_folder(folder / "set", BUCKET, "set")
        server.upload_folder(folder / "big", BUCKET, "big")
        server.upload_folder(folder / "set", BUCKET, "tree/a")  # sub-prefixes: Ray lists them in parallel
        server.upload_folder(folder / "set", BUCKET, "tree/b/deeper")
        server.client().put_object(Bucket=BUCKET, Key="tree/top.png", Body=(folder / "set/img001.png").read_bytes())
        server.local = folder  # type: ignore[attr-defined]
        yield server


def _texts(location: Path) -> dict[str, str]:
    with Store(location) as store:
        return {Path(result.record_id).name: result.text for result in store.iter_results("caption")
                if result.status == "ok"}


def _assert_no_secret(folder: Path, *secrets: str) -> None:
    """Every file under ``folder`` (store, log, sidecars, exports) is free of every secret."""
    scanned = 0
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            scanned += 1
            for secret in secrets:
                assert secret.encode() not in data, f"{path} holds a credential"
    assert scanned > 0


def test_bucket_prefix_and_url_manifest_caption_like_the_local_folder(s3, tiny_florence, tmp_path):
    local = tmp_path / "local"
    captionkit.caption(s3.local / "set", model=str(tiny_florence), output_dir=local, **FAST)
    expected = _texts(local)
    assert len(expected) == IMAGES

    out = tmp_path / "from-prefix"
    summary = captionkit.caption(f"s3://{BUCKET}/set/", model=str(tiny_florence), output_dir=out,
                                 storage_options=s3.storage_options(), export=[out / "all.jsonl"], **FAST)
    assert (summary.processed, summary.failed) == (IMAGES, 0)
    assert _texts(out) == expected
    for name, text in expected.items():  # caption files mirror the keys under the prefix
        assert (out / name).with_suffix(".txt").read_text() == text

    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps({"url": f"s3://{BUCKET}/set/{name}", "source": "web"}) + "\n"
                                for name in sorted(expected)))
    by_rows = tmp_path / "from-manifest"
    summary = captionkit.caption(manifest, model=str(tiny_florence), image_column="url", output_dir=by_rows,
                                 storage_options=json.dumps(s3.storage_options()), **FAST)
    assert (summary.processed, summary.failed) == (IMAGES, 0)
    assert _texts(by_rows) == expected

    # the same manifest as an object in the bucket (a CSV of relative keys, resolved against its prefix)
    s3.client().put_object(Bucket=BUCKET, Key="set/index.csv",
                           Body=("file_name\n" + "".join(f"{name}\n" for name in sorted(expected))).encode())
    remote_manifest = tmp_path / "from-remote-manifest"
    captionkit.caption(f"s3://{BUCKET}/set/index.csv", model=str(tiny_florence), output_dir=remote_manifest,
                       storage_options=s3.storage_options(), **FAST)
    assert _texts(remote_manifest) == expected
    for folder in (out, by_rows, remote_manifest):
        _assert_no_secret(folder, s3.key, s3.secret)

    again = captionkit.caption(f"s3://{BUCKET}/set/", model=str(tiny_florence), output_dir=out,
                               storage_options=s3.storage_options(), **FAST)
    assert (again.processed, again.reused) == (0, IMAGES)  # resume by ETag/size/mtime: nothing fetched again


def test_remote_input_without_output_dir_is_one_clear_error(s3, tiny_florence):
    with pytest.raises(CaptionkitError, match="need --output-dir"):
        captionkit.caption(f"s3://{BUCKET}/set/", model=str(tiny_florence), storage_options=s3.storage_options(),
                           **FAST)


def _cli_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _caption_cli(url: str, model: Path, out: Path, options: dict, *extra: str) -> list[str]:
    return [*CLI, "caption", url, "--model", str(model), "--num-beams", "1", "--max-new-tokens", "12",
            "--batch-size", "2", "--workers", "2", "--output-dir", str(out), "--storage-options", json.dumps(options),
            *extra]


@pytest.mark.slow
def test_kill_minus_nine_then_rerun_fetches_and_captions_only_the_unfinished(s3, tiny_florence, tmp_path):
    out = tmp_path / "out"
    command = _caption_cli(f"s3://{BUCKET}/big", tiny_florence, out, s3.storage_options())
    process = subprocess.Popen([*command, "-q"], env=_cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_while_running(process, lambda: committed_results(out) >= 4)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = committed_results(out)
    assert 4 <= committed < KILL_IMAGES
    rerun = run_cli(*command[len(CLI):], "--progress", "json", env=_cli_env())  # the kill is the process's part
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["processed"], summary["reused"]) == (KILL_IMAGES - committed, committed)
    assert len(list(out.glob("*.txt"))) == KILL_IMAGES
    _assert_no_secret(out, s3.key, s3.secret)


def test_wrong_credentials_are_one_clear_403_error(s3, tiny_florence, tmp_path):
    out = tmp_path / "out"
    wrong = s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="not-the-secret-at-all")
    result = subprocess.run(_caption_cli(f"s3://{BUCKET}/set", tiny_florence, out, wrong, "-q"), env=_cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "access denied (403)" in result.stderr and "--storage-options" in result.stderr
    assert "Traceback" not in result.stderr
    assert "not-the-secret-at-all" not in result.stderr + result.stdout
    assert not (out / ".captionkit").exists()


def test_a_missing_key_in_a_manifest_is_one_clear_error_and_the_rest_are_captioned(s3, tiny_florence, tmp_path):
    manifest = tmp_path / "urls.csv"
    manifest.write_text(f"image\ns3://{BUCKET}/set/img000.png\ns3://{BUCKET}/set/gone.png\n")
    out = tmp_path / "out"
    summary = captionkit.caption(manifest, model=str(tiny_florence), output_dir=out,
                                 storage_options=s3.storage_options(), **FAST)
    assert (summary.processed, summary.failed) == (1, 1)
    (error,) = summary.errors.values()
    assert "no such object (404)" in error and f"s3://{BUCKET}/set/gone.png" in error


def test_a_url_output_dir_gets_the_caption_files_and_the_store_stays_in_a_local_cache(s3, tiny_florence, tmp_path,
                                                                                      monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CAPTIONKIT_CACHE", str(cache))
    local = tmp_path / "local"
    captionkit.caption(s3.local / "set", model=str(tiny_florence), output_dir=local, **FAST)
    expected = _texts(local)
    output = f"s3://{BUCKET}/captions/run1"
    summary = captionkit.caption(f"s3://{BUCKET}/set", model=str(tiny_florence), output_dir=output,
                                 storage_options=s3.storage_options(),
                                 export=[f"s3://{BUCKET}/exports/all.jsonl"], **FAST)
    assert summary.processed == IMAGES
    client = s3.client()
    for name, text in expected.items():
        key = f"captions/run1/{Path(name).with_suffix('.txt')}"
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode() == text
    exported = client.get_object(Bucket=BUCKET, Key="exports/all.jsonl")["Body"].read().decode()
    assert {Path(json.loads(line)["id"]).name: json.loads(line)["caption"] for line in exported.splitlines()} \
        == expected
    assert captionkit.export(output, f"s3://{BUCKET}/exports/shards", storage_options=s3.storage_options()) == IMAGES
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="exports/shards/part-")["KeyCount"] >= 1
    (database,) = cache.rglob("store.sqlite")  # the store: local SQLite, keyed by the output URL
    assert _texts(database.parent.parent) == expected
    _assert_no_secret(cache, s3.key, s3.secret)
    again = captionkit.caption(f"s3://{BUCKET}/set", model=str(tiny_florence), output_dir=output,
                               storage_options=s3.storage_options(), **FAST)
    assert (again.processed, again.reused) == (0, IMAGES)


@pytest.mark.slow
def test_ray_lists_sub_prefixes_in_tasks_and_fetches_on_workers_with_the_local_results(s3, tmp_path, shared_ray):
    """The model is the torch-free :class:`~tests.pixel_digest.PixelDigest`: a caption is a digest of the pixels a
    worker decoded from what it fetched."""
    from tests.pixel_digest import PixelDigest, send_by_value

    send_by_value()
    local = tmp_path / "local"
    url = f"s3://{BUCKET}/tree"
    quiet = {"progress": "quiet", "workers": 2}
    reference = captionkit.caption(url, captioner=PixelDigest(), output_dir=local,
                                   storage_options=s3.storage_options(), batch_size=4, **quiet)
    assert reference.processed == 2 * IMAGES + 1
    on_ray = tmp_path / "ray"
    summary = captionkit.caption(url, captioner=PixelDigest(), output_dir=on_ray,
                                 storage_options=s3.storage_options(), batch_size=4, executor="ray",
                                 ray_address=shared_ray, ray_actors=1, ray_cpus_per_actor=0.5, **quiet)
    assert (summary.processed, summary.failed) == (2 * IMAGES + 1, 0)
    with Store(local) as first, Store(on_ray) as second:
        expected = {result.record_id: result.text for result in first.iter_results("caption")}
        assert {result.record_id: result.text for result in second.iter_results("caption")} == expected
    assert sorted(expected) == sorted(["top.png", *(f"a/img00{i}.png" for i in range(IMAGES)),
                                       *(f"b/deeper/img00{i}.png" for i in range(IMAGES))])
    for record_id, text in expected.items():
        assert (on_ray / record_id).with_suffix(".txt").read_text() == text
    _assert_no_secret(on_ray, s3.key, s3.secret)


def test_5xx_answers_are_retried_and_a_404_is_not(tmp_path):
    """A real HTTP server (fsspec's http:// filesystem) answers 503 twice, then the bytes; a missing path 404s."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from captionkit.core import locations

    hits: dict[str, int] = {}

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            hits[self.path] = hits.get(self.path, 0) + 1
            if self.path == "/flaky.png" and hits[self.path] <= 2:
                self.send_response(503)
                self.end_headers()
                return
            if self.path != "/flaky.png":
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"bytes")

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert locations.read_bytes(f"{base}/flaky.png", {}) == b"bytes"
        assert hits["/flaky.png"] == 3
        with pytest.raises(locations.RemoteError, match=r"no such object \(404\)"):
            locations.read_bytes(f"{base}/gone.png", {})
        assert hits["/gone.png"] == 1  # not retried
    finally:
        server.shutdown()
