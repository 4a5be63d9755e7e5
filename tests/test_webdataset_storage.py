"""WebDataset shards where large datasets live: in a bucket (a real S3 server, moto, over HTTP on 127.0.0.1),
gzip-compressed (``.tar.gz``/``.tgz``), and behind a server that fails now and then (retried).

Remote shards go through ``core.locations``: the run's ``--storage-options`` credentials, retries on
5xx, one clear error for a refused (403) or a missing shard, and no credential in anything written.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import captionkit
from captionkit.testing.s3_server import moto_server
from tests.test_object_storage import _assert_no_secret, _cli_env
from tests.test_webdataset import (  # noqa: F401 - a fixture
    CLI,
    FAST,
    PER_SHARD,
    check_output,
    corpus,
    digest_captions,
    read_shards,
)

webdataset = pytest.importorskip("webdataset")
BUCKET = "shards"
PATTERN = "shard-{00000..00002}.tar"


@pytest.fixture(scope="module")
def s3(corpus):  # noqa: F811 - the fixture imported above
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    root, _, _ = corpus
    with moto_server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        server.upload_folder(root / "shards", BUCKET, "in")
        yield server


def _download(server, prefix: str, folder: Path) -> dict[str, str]:
    """Every object under ``prefix`` into ``folder``; returns name → ETag (changes when an object is rewritten)."""
    client = server.client()
    folder.mkdir(parents=True, exist_ok=True)
    tags = {}
    for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        name = item["Key"].rsplit("/", 1)[-1]
        (folder / name).write_bytes(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
        tags[name] = (item["ETag"], item["LastModified"])
    return tags


def test_s3_shards_in_and_out_with_storage_options_and_no_credential_written(s3, corpus, tiny_florence,  # noqa: F811
                                                                             tmp_path, monkeypatch):
    root, images, expected = corpus
    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    output = f"s3://{BUCKET}/out"
    summary = captionkit.caption(f"s3://{BUCKET}/in/{PATTERN}", model=str(tiny_florence), batch_size=2,
                                 output_dir=output, storage_options=json.dumps(s3.storage_options()), **FAST)
    assert (summary.processed, summary.failed, summary.files_written) == (9, 0, 3)
    first = _download(s3, "out/", tmp_path / "out")
    check_output(tmp_path / "out", images, expected)  # same keys, originals and captions as a plain folder
    _assert_no_secret(tmp_path / "cache", s3.key, s3.secret)  # store and log
    _assert_no_secret(tmp_path / "out", s3.key, s3.secret)  # the shards written to the bucket
    again = captionkit.caption(f"s3://{BUCKET}/in/{PATTERN}", model=str(tiny_florence), batch_size=2,
                               output_dir=output, storage_options=s3.storage_options(), **FAST)
    assert (again.processed, again.reused, again.files_written) == (0, 9, 0)  # resumed by shard and key
    assert _download(s3, "out/", tmp_path / "again") == first  # a finished shard is not uploaded again


def test_a_refused_shard_is_one_clear_403_and_a_missing_one_is_named(s3, tiny_florence, tmp_path):
    wrong = s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="not-the-secret-at-all")
    out = tmp_path / "out"
    result = subprocess.run([*CLI, "caption", f"s3://{BUCKET}/in/{PATTERN}", "--model", str(tiny_florence),
                             "--output-dir", str(out), "--storage-options", json.dumps(wrong), "-q"],
                            env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"s3://{BUCKET}/in: access denied (403)" in result.stderr, result.stderr  # the LIST of their prefix
    assert "--storage-options" in result.stderr and "Traceback" not in result.stderr
    assert "not-the-secret-at-all" not in result.stderr + result.stdout
    with pytest.raises(captionkit.CaptionkitError,
                       match=rf"1 of 4 shard\(s\) not found \(s3://{BUCKET}/in/shard-00003.tar\)"):
        captionkit.caption(f"s3://{BUCKET}/in/shard-{{00000..00003}}.tar", model=str(tiny_florence),
                           output_dir=tmp_path / "out2", storage_options=s3.storage_options(), **FAST)


def _gzip_shards(source: Path, folder: Path, suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number in range(3):
        data = (source / f"shard-{number:05d}.tar").read_bytes()
        (folder / f"shard-{number:05d}{suffix}").write_bytes(gzip.compress(data))


def test_tar_gz_shards_in_compressed_shards_out_and_a_cut_stream_keeps_what_came_before(corpus, tiny_florence,  # noqa: F811
                                                                                         tmp_path, caplog):
    root, images, expected = corpus
    _gzip_shards(root / "shards", tmp_path / "gz", ".tar.gz")
    output = tmp_path / "out"
    summary = captionkit.caption(str(tmp_path / "gz" / "shard-{00000..00002}.tar.gz"), model=str(tiny_florence),
                                 batch_size=2, output_dir=output, **FAST)
    assert (summary.processed, summary.failed, summary.files_written) == (9, 0, 3)
    assert sorted(path.name for path in output.glob("*.tar.gz")) == [f"shard-{n:05d}.tar.gz" for n in range(3)]
    samples = read_shards(str(output / "shard-{00000..00002}.tar.gz"))  # gzip shards, read by webdataset
    assert {key: sample["caption.txt"].decode() for key, sample in samples.items()} == expected
    assert all(sample["jpg"] == images[key] for key, sample in samples.items())
    with tarfile.open(output / "shard-00001.tar.gz", "r:gz") as archive:  # same keys, in the same order
        assert list(dict.fromkeys(name.split(".")[0] for name in archive.getnames())) == \
            [f"{index:09d}" for index in range(PER_SHARD, 2 * PER_SHARD)]

    # .tgz, with shard 2's compressed stream cut off inside its last sample's image (stored blocks: the
    # compressed offset is the plain one plus a 10-byte header and 5 bytes per 64 KiB block)
    _gzip_shards(root / "shards", tmp_path / "tgz", ".tgz")
    plain = (root / "shards" / "shard-00002.tar").read_bytes()
    with tarfile.open(root / "shards" / "shard-00002.tar") as archive:
        last = archive.getmember("000000008.jpg")
    (tmp_path / "tgz" / "shard-00002.tgz").write_bytes(
        gzip.compress(plain, compresslevel=0)[:10 + last.offset_data + last.size // 2])
    with caplog.at_level("WARNING", logger="captionkit"):
        summary = captionkit.caption(str(tmp_path / "tgz" / "shard-{00000..00002}.tgz"), model=str(tiny_florence),
                                     batch_size=2, output_dir=tmp_path / "out-tgz", **FAST)
    assert "shard-00002.tgz: the compressed stream is cut off or corrupt" in caplog.text
    assert (summary.processed, summary.failed) == (8, 1)
    assert "truncated" in summary.errors["shard-00002.tgz/000000008"]
    samples = read_shards(str(tmp_path / "out-tgz" / "shard-{00000..00002}.tgz"))
    assert sorted(samples) == sorted(set(expected) - {"000000008"})  # the cut costs only the sample it cut
    assert all(samples[key]["caption.txt"].decode() == expected[key] for key in samples)


class _FlakyShards(BaseHTTPRequestHandler):
    """Serves files (with byte ranges) and answers 503 to the first try of every distinct request."""

    files: dict[str, bytes] = {}
    seen: set[tuple[str, str, str]] = set()
    failures = 0

    def _answer(self, body: bool) -> None:
        request = (self.command, self.path, self.headers.get("Range", ""))
        if request not in self.seen:
            type(self).seen.add(request)
            type(self).failures += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(data) - 1
        wanted = self.headers.get("Range")
        if wanted:
            first, _, last = wanted.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data[start:end + 1])

    def do_GET(self):  # noqa: N802 - the http.server API
        self._answer(True)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def log_message(self, *args):
        pass


def test_5xx_answers_while_listing_and_reading_shards_are_retried(corpus):  # noqa: F811
    pytest.importorskip("aiohttp")
    from captionkit.core.webdataset import list_shard, open_shards

    root, images, _ = corpus
    plain = (root / "shards" / "shard-00000.tar").read_bytes()
    _FlakyShards.files = {"/shard-00000.tar": plain, "/shard-00001.tgz": gzip.compress(
        (root / "shards" / "shard-00001.tar").read_bytes())}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyShards)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for name, keys in (("shard-00000.tar", range(PER_SHARD)), ("shard-00001.tgz", range(PER_SHARD, 6))):
            source = open_shards(f"{base}/{name}")
            listing = list_shard(source.shards[0])
            assert not listing.warnings
            assert [record.path.read_bytes() for record in listing.records] == \
                [images[f"{index:09d}"] for index in keys]
        assert _FlakyShards.failures >= 4  # every request failed once and was tried again
        with pytest.raises(captionkit.CaptionkitError, match=r"1 of 1 shard\(s\) not found"):
            open_shards(f"{base}/gone.tar")
    finally:
        server.shutdown()


@pytest.mark.slow
def test_ray_reads_and_writes_shards_on_workers_with_the_local_results(s3, corpus, tmp_path,  # noqa: F811
                                                                        monkeypatch, shared_ray):
    """Shards in a bucket on Ray, written back to the bucket: the same output shards as a local run, and no
    credential in the store, its log or the shards (local shards on Ray, and that the driver never opens one:
    tests/test_webdataset.py). The model is the torch-free :class:`~tests.pixel_digest.PixelDigest`: a caption
    is a digest of the pixels its worker decoded from what it fetched."""
    from tests.pixel_digest import PixelDigest, send_by_value

    send_by_value()
    root, images, _ = corpus
    expected = digest_captions(root / "plain", tmp_path / "plain")
    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    remote = captionkit.caption(f"s3://{BUCKET}/in/{PATTERN}", captioner=PixelDigest(),
                                output_dir=f"s3://{BUCKET}/ray-out", storage_options=s3.storage_options(),
                                executor="ray", ray_address=shared_ray, ray_actors=1, ray_cpus_per_actor=0.5,
                                batch_size=2, progress="quiet", workers=2)
    assert (remote.processed, remote.failed, remote.files_written) == (9, 0, 3)
    _download(s3, "ray-out/", tmp_path / "from-bucket")
    check_output(tmp_path / "from-bucket", images, expected)
    _assert_no_secret(tmp_path / "cache", s3.key, s3.secret)
    _assert_no_secret(tmp_path / "from-bucket", s3.key, s3.secret)


def test_objects_named_one_by_one_get_their_signatures_from_list_pages_not_a_head_each(s3, corpus):  # noqa: F811
    """A manifest's 30 URLs under one prefix (and a missing one): one LIST request, the same signatures as HEADs."""
    from captionkit.core import locations

    root, _, _ = corpus
    client = s3.client()
    data = (root / "shards" / "shard-00000.tar").read_bytes()
    for index in range(30):
        client.put_object(Bucket=BUCKET, Key=f"rows/{index:03d}.jpg", Body=data[:100 + index])
    client.put_object(Bucket=BUCKET, Key="rows/sub/zzz.jpg", Body=b"deeper")
    urls = [f"s3://{BUCKET}/rows/{index:03d}.jpg" for index in range(30)] + [f"s3://{BUCKET}/rows/gone.jpg"]
    options = s3.storage_options()
    fs = locations.filesystem(urls[0], options)[0]
    calls: list[str] = []
    fs.connect()  # the client whose requests are counted (fsspec hands out this same cached instance)
    fs.s3.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    found = locations.signatures(urls, 8, options)
    assert calls == ["ListObjectsV2"]  # was one HeadObject per URL
    assert found[urls[-1]] is None
    calls.clear()
    for url in urls[:-1]:
        fs.invalidate_cache()
        assert found[url] == locations.signature(url, options)  # as a HEAD reads it
    assert set(calls) == {"HeadObject"}
    with pytest.raises(locations.RemoteError, match=r"access denied \(403\)"):
        locations.signatures(urls, 8, s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="wrong-secret-x"))


def test_a_cut_shard_in_the_bucket_fails_only_its_cut_member_as_truncated(s3, corpus, monkeypatch):  # noqa: F811
    """The cut member's last blocks start past the object's end (S3 answers 416): 'truncated', not 'refused'."""
    from captionkit.core import locations
    from captionkit.core import webdataset as shards

    root, images, _ = corpus
    data = (root / "shards" / "shard-00001.tar").read_bytes()
    with tarfile.open(root / "shards" / "shard-00001.tar") as archive:
        last = archive.getmember("000000005.jpg")
    s3.client().put_object(Bucket=BUCKET, Key="cut/shard-00001.tar", Body=data[:last.offset_data + 100])
    monkeypatch.setattr(shards, "BLOCK_BYTES", 4096)  # small blocks: the cut image spans several
    with locations.storage_options_set(s3.storage_options()):
        listing = shards.list_shard(f"s3://{BUCKET}/cut/shard-00001.tar")
        assert "truncated" in " ".join(listing.warnings)
        first, *_, cut = listing.records
        assert first.path.read_bytes() == images["000000003"]
        with pytest.raises(captionkit.CaptionkitError, match="key 000000005, member 000000005.jpg: the shard is "
                                                             "truncated"):
            cut.path.read_bytes()


def test_a_pipeline_over_shards_in_a_bucket_reads_them_with_the_files_storage_options(s3, corpus, tiny_florence,  # noqa: F811
                                                                                     tmp_path):
    """``input:`` an s3:// shard pattern, credentials in the file's ``storage_options:``: the captions of a
    local run, a table keyed by shard and key, and no credential in anything the pipeline wrote."""
    import pyarrow.parquet as parquet
    import yaml

    from captionkit.pipeline import run_pipeline

    _, _, expected = corpus
    pipeline = tmp_path / "shards.yaml"
    pipeline.write_text(yaml.safe_dump({
        "input": f"s3://{BUCKET}/in/{PATTERN}", "storage_options": s3.storage_options(),
        "base_folder": "work", "save_folder": "out",
        "steps": [{"type": "captioner", "name": "florence",
                   "config": {"model": str(tiny_florence), "num_beams": 1, "max_new_tokens": 12, "batch_size": 2}},
                  {"type": "export", "name": "table", "config": {"format": "parquet", "fields": ["florence"]}}],
    }, sort_keys=False))
    report = run_pipeline(pipeline)
    assert all(not step.errors for step in report.steps)
    rows = parquet.read_table(tmp_path / "out" / "export.parquet").to_pylist()
    assert [(row["shard"], row["key"]) for row in rows] == \
        [(f"shard-{index // PER_SHARD:05d}.tar", f"{index:09d}") for index in range(9)]
    assert {row["key"]: row["florence"] for row in rows} == expected
    _assert_no_secret(tmp_path / "work", s3.key, s3.secret)
    _assert_no_secret(tmp_path / "out", s3.key, s3.secret)
