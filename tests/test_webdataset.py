"""WebDataset shards (written by the webdataset library, as img2dataset writes them) in, new shards out.

Captions from shards equal those of the same images in a plain folder; the output shards
have the same keys and every original member plus ``KEY.caption.txt``, read back with the
webdataset library; on the local executor, on Ray and from the CLI; a truncated shard and a
corrupt member cost only themselves; a rerun after kill -9 does only the unfinished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import captionkit
from captionkit.core.store import Store
from tests.images import jpeg_bytes, noise_image
from tests.in_process import run_cli
from tests.run_state import committed as committed_results
from tests.run_state import wait_while_running
from tests.test_tag_pipeline import tagger_folder  # noqa: F401 - a fixture

webdataset = pytest.importorskip("webdataset")

FAST = {"max_new_tokens": 12, "num_beams": 1, "progress": "quiet", "workers": 2}
CLI = [sys.executable, "-m", "captionkit.cli"]
PER_SHARD = 3


def write_shards(folder: Path, shards: int, per_shard: int = PER_SHARD) -> dict[str, bytes]:
    """img2dataset-style shards through ``webdataset.ShardWriter``; returns key → the JPEG bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    with webdataset.ShardWriter(str(folder / "shard-%05d.tar"), maxcount=per_shard, verbose=0) as writer:
        for index in range(shards * per_shard):
            key = f"{index:09d}"
            images[key] = jpeg_bytes(noise_image(index))
            writer.write({"__key__": key, "jpg": images[key], "txt": f"alt text {index}",
                          "json": {"key": key, "caption": f"alt text {index}", "url": f"https://x/{index}.jpg"}})
    return images


def plain_folder(folder: Path, images: dict[str, bytes]) -> Path:
    """The same images as files (same bytes) for the reference run."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, data in images.items():
        (folder / f"{key}.jpg").write_bytes(data)
    return folder


def folder_captions(folder: Path, tiny_florence: Path) -> dict[str, str]:
    """key → caption text of a plain-folder run (the reference)."""
    summary = captionkit.caption(folder, model=str(tiny_florence), batch_size=2, write_sidecars=False, **FAST)
    assert summary.failed == 0
    with Store(folder) as store:
        return {result.record_id.removesuffix(".jpg"): result.text for result in store.iter_results("caption")}


def digest_captions(folder: Path, target: Path) -> dict[str, str]:
    """key → caption of :class:`~tests.pixel_digest.PixelDigest` on a copy of a plain folder, for tests about where
    shards are read and written (on Ray), not about a model."""
    from tests.pixel_digest import PixelDigest
    from tests.run_state import copy_of

    copy = copy_of(folder, target)
    summary = captionkit.caption(copy, captioner=PixelDigest(), batch_size=2, write_sidecars=False,
                                 progress="quiet", workers=2)
    assert summary.failed == 0
    with Store(copy) as store:
        return {result.record_id.removesuffix(".jpg"): result.text for result in store.iter_results("caption")}


def read_shards(pattern: str) -> dict[str, dict]:
    """key → sample, read with the webdataset library (no decoding: bytes per member)."""
    samples = {}
    for sample in webdataset.WebDataset(pattern, shardshuffle=False, empty_check=False):
        samples[sample["__key__"]] = sample
    return samples


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_florence):
    root = tmp_path_factory.mktemp("wds")
    images = write_shards(root / "shards", 3)
    expected = folder_captions(plain_folder(root / "plain", images), tiny_florence)
    assert len(set(expected.values())) > 1  # the tiny model says different things
    return root, images, expected


def check_output(output: Path, images: dict[str, bytes], expected: dict[str, str], shards: int = 3) -> None:
    assert sorted(path.name for path in output.glob("*.tar")) == [f"shard-{n:05d}.tar" for n in range(shards)]
    samples = read_shards(str(output / f"shard-{{00000..{shards - 1:05d}}}.tar"))
    assert sorted(samples) == sorted(expected)
    for key, sample in samples.items():
        assert sample["caption.txt"].decode() == expected[key]
        assert sample["jpg"] == images[key]  # the original members, unchanged
        assert sample["txt"].decode() == f"alt text {int(key)}"
        assert json.loads(sample["json"])["key"] == key
    # each output shard holds the keys its input shard held, in the same order
    for number in range(shards):
        with tarfile.open(output / f"shard-{number:05d}.tar") as archive:
            keys = list(dict.fromkeys(name.split(".")[0] for name in archive.getnames()))
        assert keys == [f"{index:09d}" for index in range(number * PER_SHARD, (number + 1) * PER_SHARD)]


def _env() -> dict[str, str]:
    source = str(Path(captionkit.__file__).resolve().parents[1])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}


def _command(pattern: str, output: Path, model: Path, *extra: str) -> list[str]:
    return [*CLI, "caption", pattern, "--output-dir", str(output), "--model", str(model), "--num-beams", "1",
            "--max-new-tokens", "12", "--batch-size", "2", "--workers", "2", *extra]


def test_cli_shards_in_shards_out_with_the_captions_of_a_plain_folder(corpus, tiny_florence, tmp_path):
    root, images, expected = corpus
    output = tmp_path / "out"
    result = subprocess.run(_command(str(root / "shards" / "shard-{00000..00002}.tar"), output, tiny_florence,
                                     "--progress", "json"),
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["processed"], summary["failed"], summary["files_written"]) == (9, 0, 3)
    check_output(output, images, expected)
    with Store(output) as store:  # keyed by shard and key; the json/txt members became record fields
        ids = sorted(result.record_id for result in store.iter_results("caption"))
    assert ids[0] == "shard-00000.tar/000000000" and len(ids) == 9
    # a rerun changes nothing: a finished output shard is not rewritten
    before = {path.name: path.stat().st_mtime_ns for path in output.glob("*.tar")}
    again = subprocess.run(_command(str(root / "shards" / "shard-{00000..00002}.tar"), output, tiny_florence,
                                    "--progress", "json"), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["processed"], summary["reused"], summary["files_written"]) == (0, 9, 0)
    assert {path.name: path.stat().st_mtime_ns for path in output.glob("*.tar")} == before


def test_record_fields_come_from_the_txt_and_json_members(corpus):
    root, _, _ = corpus
    from captionkit.core.records import open_source

    records = list(open_source(root / "shards" / "shard-{00000..00001}.tar"))
    assert [record.id for record in records][:2] == ["shard-00000.tar/000000000", "shard-00000.tar/000000001"]
    assert len(records) == 6
    assert records[4].fields["txt"] == "alt text 4"
    assert records[4].fields["caption"] == "alt text 4" and records[4].fields["url"] == "https://x/4.jpg"


def test_tagging_after_captioning_adds_its_member_to_the_same_shards(corpus, tiny_florence, tagger_folder, tmp_path):  # noqa: F811
    root, images, expected = corpus
    pattern, output = str(root / "shards" / "shard-{00000..00002}.tar"), tmp_path / "out"
    captionkit.caption(pattern, model=str(tiny_florence), batch_size=2, output_dir=output, **FAST)
    summary = captionkit.tag(pattern, model=str(tagger_folder), device="cpu", batch_size=4, output_dir=output,
                             progress="quiet")
    assert (summary.processed, summary.files_written) == (9, 3)
    with Store(output) as store:
        tags = {result.record_id.split("/")[1]: result.text for result in store.iter_results("tags")}
    samples = read_shards(str(output / "shard-{00000..00002}.tar"))
    assert {key: sample["tags.txt"].decode() for key, sample in samples.items()} == tags
    assert {key: sample["caption.txt"].decode() for key, sample in samples.items()} == expected
    assert all(sample["jpg"] == images[key] for key, sample in samples.items())


def test_shards_in_object_storage_are_read_by_byte_range_through_fsspec(corpus, tiny_florence, tmp_path):
    """fsspec's in-memory filesystem stands in for a bucket (the object-storage tests use a real S3 server)."""
    import fsspec

    root, images, expected = corpus
    memory = fsspec.filesystem("memory")
    for number in range(3):
        memory.pipe_file(f"/wds-test/shard-{number:05d}.tar",
                         (root / "shards" / f"shard-{number:05d}.tar").read_bytes())
    try:
        summary = captionkit.caption("memory://wds-test/shard-{00000..00002}.tar", model=str(tiny_florence),
                                     batch_size=2, output_dir=tmp_path / "out", **FAST)
    finally:
        memory.rm("/wds-test", recursive=True)
    assert (summary.processed, summary.failed, summary.files_written) == (9, 0, 3)
    check_output(tmp_path / "out", images, expected)


def test_shards_need_an_output_dir_and_missing_shards_are_named(corpus, tiny_florence, tmp_path):
    root, _, _ = corpus
    with pytest.raises(captionkit.CaptionkitError, match="need --output-dir"):
        captionkit.caption(root / "shards" / "shard-00000.tar", model=str(tiny_florence), **FAST)
    with pytest.raises(captionkit.CaptionkitError, match=r"1 of 4 shard\(s\) not found .*shard-00003.tar"):
        captionkit.caption(str(root / "shards" / "shard-{00000..00003}.tar"), model=str(tiny_florence),
                           output_dir=tmp_path / "out", **FAST)


def test_truncated_shard_and_corrupt_member_cost_only_themselves(corpus, tiny_florence, tmp_path, caplog):
    root, images, expected = corpus
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in range(3):
        (shards / f"shard-{number:05d}.tar").write_bytes((root / "shards" / f"shard-{number:05d}.tar").read_bytes())
    # shard 1: cut inside the image of its last sample (key 5)
    with tarfile.open(shards / "shard-00001.tar") as archive:
        member = archive.getmember("000000005.jpg")
    data = (shards / "shard-00001.tar").read_bytes()
    (shards / "shard-00001.tar").write_bytes(data[:member.offset_data + member.size // 2])
    # shard 2: the image of key 7 is garbage of the same length, the json of key 8 is not JSON
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(shards / "shard-00002.tar") as source, tarfile.open(rewritten, "w") as target:
        for info in source.getmembers():
            content = source.extractfile(info).read()
            if info.name == "000000007.jpg":
                content = b"\x00not a jpeg" * (len(content) // 11)
            if info.name == "000000008.json":
                content = b"{broken"
            info.size = len(content)
            target.addfile(info, __import__("io").BytesIO(content))
    rewritten.replace(shards / "shard-00002.tar")
    output = tmp_path / "out"
    with caplog.at_level("WARNING", logger="captionkit"):
        summary = captionkit.caption(str(shards / "shard-{00000..00002}.tar"), model=str(tiny_florence),
                                     batch_size=2, output_dir=output, **FAST)
    assert (summary.processed, summary.failed) == (7, 2)
    truncated = summary.errors["shard-00001.tar/000000005"]
    assert "shard-00001.tar: key 000000005, member 000000005.jpg" in truncated and "truncated" in truncated
    assert "Re-download or rewrite the shard" in truncated
    corrupt = summary.errors["shard-00002.tar/000000007"]
    assert "shard-00002.tar: key 000000007, member 000000007.jpg" in corrupt and "not an image" in corrupt
    assert "Rewrite that sample in the shard" in corrupt
    logged = caplog.text
    assert "shard-00001.tar: truncated or corrupt after 7 members" in logged
    assert "key 000000008, member 000000008.json: not valid JSON" in logged
    samples = read_shards(str(output / "shard-{00000..00002}.tar"))
    good = sorted(set(expected) - {"000000005", "000000007"})
    assert sorted(samples) == good  # the others keep their keys, originals and captions
    for key in good:
        assert samples[key]["caption.txt"].decode() == expected[key]
        assert samples[key]["jpg"] == images[key]
    assert samples["000000008"]["json"] == b"{broken"  # the bad json member costs only its fields


@pytest.mark.slow
def test_kill_minus_nine_then_rerun_does_only_the_unfinished(tmp_path, tiny_florence):
    per_shard, count = 8, 24
    images = write_shards(tmp_path / "shards", 3, per_shard=per_shard)
    pattern = str(tmp_path / "shards" / "shard-{00000..00002}.tar")
    output = tmp_path / "out"
    process = subprocess.Popen(_command(pattern, output, tiny_florence, "-q"), env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = output / "shard-00000.tar"  # written as soon as its samples are done, while the run goes on
    wait_while_running(process, first.exists, timeout_s=300, waiting_for="finished shard")
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = committed_results(output)
    assert per_shard <= committed < count
    finished = (first.stat().st_ino, first.stat().st_mtime_ns)
    written_before = len(list(output.glob("shard-*.tar")))
    rerun = run_cli(*_command(pattern, output, tiny_florence, "--progress", "json")[len(CLI):], env=_env())
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert (summary["processed"], summary["reused"]) == (count - committed, committed)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == finished  # a finished shard is not rewritten
    assert summary["files_written"] == 3 - written_before
    samples = read_shards(str(output / "shard-{00000..00002}.tar"))
    assert sorted(samples) == sorted(images)
    with Store(output) as store:
        texts = {result.record_id.split("/")[1]: result.text for result in store.iter_results("caption")}
    assert {key: sample["caption.txt"].decode() for key, sample in samples.items()} == texts
    assert not [path for path in output.iterdir() if ".ck-tmp-" in path.name]


@pytest.mark.slow
def test_ray_executor_writes_the_same_shards_as_the_local_one(corpus, tmp_path, shared_ray):
    """The same output shards as a local run; the driver never opens an input shard (Ray tasks list, decode
    and write them). Shards in a bucket: tests/test_webdataset_storage.py. The model is the torch-free
    :class:`~tests.pixel_digest.PixelDigest`: a caption is a digest of the pixels its worker decoded."""
    from tests.pixel_digest import PixelDigest, send_by_value

    send_by_value()
    root, images, _ = corpus
    expected = digest_captions(root / "plain", tmp_path / "plain")
    shards = root / "shards"
    opened: list[str] = []
    watching = [False]

    def audit(event: str, args: tuple) -> None:  # what this (the driver) process opens
        if watching[0] and event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(
                str(shards)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)
    try:
        watching[0] = True
        summary = captionkit.caption(str(shards / "shard-{00000..00002}.tar"), captioner=PixelDigest(),
                                     batch_size=2, output_dir=tmp_path / "out", executor="ray",
                                     ray_address=shared_ray, ray_actors=1, ray_cpus_per_actor=0.5,
                                     progress="quiet", workers=2)
    finally:
        watching[0] = False
    assert (summary.processed, summary.failed, summary.files_written) == (9, 0, 3)
    assert opened == []  # listing, decoding and writing the output shards all read the input shards elsewhere
    check_output(tmp_path / "out", images, expected)


def test_the_shard_sink_reads_a_shard_from_the_store_once_when_its_last_sample_is_stored(tmp_path):
    """Not after every batch: a 40-sample shard in batches of 4 costs one read of its 40 results, not ten."""
    from captionkit.core.records import open_source
    from captionkit.core.store import Result
    from captionkit.core.webdataset import ShardSink

    class CountingStore(Store):
        asked = 0

        def get_many(self, step, record_ids):
            record_ids = list(record_ids)
            CountingStore.asked += len(record_ids)
            return super().get_many(step, record_ids)

    write_shards(tmp_path / "shards", 1, per_shard=40)
    records = list(open_source(tmp_path / "shards" / "shard-00000.tar"))
    output = tmp_path / "out"
    with CountingStore(output) as store:
        sink = ShardSink(store, output)
        sink.plan(records)
        for start in range(0, 40, 4):
            batch = records[start:start + 4]
            store.put_results([Result("caption", record.id, str(record.path), None, None, "f", None, "ok", "x",
                                      f"caption {record.id}", None, [], 0.0) for record in batch])
            written = sink.write({record.id: f"caption {record.id}" for record in batch})
            assert written == (1 if start == 36 else 0)
            assert (output / "shard-00000.tar").exists() == (start == 36)
        assert CountingStore.asked == 40
        assert sink.finish().written == [str(output.resolve() / "shard-00000.tar")]
    samples = read_shards(str(output / "shard-00000.tar"))
    assert {key: sample["caption.txt"].decode() for key, sample in samples.items()} == \
        {record.path.key: f"caption {record.id}" for record in records}


def test_a_pipeline_over_shards_exports_a_table_keyed_by_shard_and_key_and_new_shards(corpus, tiny_florence,
                                                                                      tmp_path):
    import yaml

    from captionkit.pipeline import run_pipeline

    root, images, expected = corpus
    pipeline = tmp_path / "shards.yaml"
    pipeline.write_text(yaml.safe_dump({
        "input": str(root / "shards" / "shard-{00000..00002}.tar"), "base_folder": "work", "save_folder": "out",
        "steps": [{"type": "captioner", "name": "florence",
                   "config": {"model": str(tiny_florence), "num_beams": 1, "max_new_tokens": 12, "batch_size": 2}},
                  {"type": "template", "name": "final", "config": {"template": "photo, {florence}"}},
                  {"type": "export", "name": "table", "config": {"format": "parquet", "fields": ["florence", "url"]}},
                  {"type": "export", "name": "wds", "config": {"format": "webdataset", "path": "shards",
                                                               "fields": ["florence", "final"]}}],
    }, sort_keys=False))
    report = run_pipeline(pipeline)
    assert all(not step.errors for step in report.steps)
    import pyarrow.parquet as parquet

    rows = parquet.read_table(tmp_path / "out" / "export.parquet").to_pylist()
    assert [(row["shard"], row["key"]) for row in rows] == \
        [(f"shard-{index // PER_SHARD:05d}.tar", f"{index:09d}") for index in range(9)]
    assert {row["key"]: row["florence"] for row in rows} == expected
    assert rows[4]["url"] == "https://x/4.jpg" and "image" not in rows[0]
    final = _final_rows(report.table)  # the pipeline's own table: one row per sample, the json's fields kept
    assert [row["image"] for row in final][:2] == ["shard-00000.tar/000000000", "shard-00000.tar/000000001"]
    assert {row["image"].split("/")[1]: row["florence"] for row in final} == expected
    templated = {row["image"].split("/")[1]: row["final"] for row in final}
    assert all(text.startswith("photo") for text in templated.values())
    samples = read_shards(str(tmp_path / "out" / "shards" / "shard-{00000..00002}.tar"))
    assert sorted(samples) == sorted(expected)
    for key, sample in samples.items():  # the originals plus one member per exported field
        assert sample["florence.txt"].decode() == expected[key]
        assert sample["final.txt"].decode() == templated[key]
        assert sample["jpg"] == images[key] and sample["txt"].decode() == f"alt text {int(key)}"
    again = run_pipeline(pipeline)  # nothing to do, nothing rewritten
    assert [step.processed for step in again.steps[:2]] == [0, 0]


@pytest.mark.parametrize("fmt", ["sidecar", "imagefolder"])
def test_exports_that_need_image_files_refuse_shard_samples_in_one_sentence(corpus, tmp_path, fmt):
    from captionkit.core.records import open_source
    from captionkit.steps.export import build_export
    from captionkit.steps.registry import StepContext

    root, _, _ = corpus
    records = list(open_source(root / "shards" / "shard-00000.tar"))
    step = build_export({"format": fmt, "field": "txt"}, StepContext(0, "e", "e", tmp_path, tmp_path))
    with pytest.raises(captionkit.CaptionkitError, match=f"format {fmt}: the input is WebDataset shards.*"
                                                         "Use format webdataset"):
        step.export(records, None, None)
    assert not any(tmp_path.iterdir())


def _final_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as parquet

    return parquet.read_table(path).to_pylist()
