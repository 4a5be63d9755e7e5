"""Object storage for `run`, `inspect` and the trainers (issue 18 item 1) against moto's S3 server over HTTP.

The server and its bucket are test_object_storage's fixture (``set/`` holds IMAGES images).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from captionkit.core.store import Store
from tests import test_object_storage
from tests.test_object_storage import BUCKET, IMAGES, _assert_no_secret, _cli_env

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

CLI = [sys.executable, "-m", "captionkit.cli"]
s3 = test_object_storage.s3  # the module-scoped server fixture (one moto server for this module)


def _florence(model: Path) -> dict:
    return {"type": "captioner", "name": "florence",
            "config": {"model": str(model), "num_beams": 1, "max_new_tokens": 6}}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stored(folder: Path, field: str) -> dict[str, str]:
    with Store(folder) as store:
        return {result.record_id: result.text for result in store.iter_results(field) if result.status == "ok"}


# ---------------------------------------------------------------------------------------------- run
def test_a_pipeline_over_a_bucket_prefix_writes_like_the_local_folder_and_uploads_its_outputs(
        s3, tiny_florence, tmp_path, monkeypatch):
    from captionkit.pipeline import run_pipeline

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    steps = [_florence(tiny_florence),
             {"type": "template", "name": "final", "config": {"template": "ohwx, {florence}", "cleanup": False}},
             {"type": "export", "name": "rows", "config": {"format": "jsonl", "path": f"s3://{BUCKET}/exp/rows.jsonl"}}]
    local = run_pipeline(_write(tmp_path / "local.yaml", {
        "input": str(s3.local / "set"), "base_folder": "local-work", "save_folder": "local-out", "steps": steps[:2]}))
    expected = {row["image"]: row["final"] for row in map(json.loads, local.table.read_text().splitlines())}
    assert len(expected) == IMAGES

    options = s3.storage_options()  # credentials in the file (storage_options:), as the brief allows
    pipeline = _write(tmp_path / "remote.yaml", {
        "input": f"s3://{BUCKET}/set/", "base_folder": "work", "save_folder": f"s3://{BUCKET}/pipeline-out",
        "storage_options": options, "steps": steps})
    plan = run_pipeline(pipeline, dry_run=True)
    assert (plan.steps[0].total, plan.steps[0].todo) == (IMAGES, IMAGES)
    report = run_pipeline(pipeline, io_workers=3)
    assert [step.failed for step in report.steps] == [0, 0, 0]
    assert [step.processed for step in report.steps] == [IMAGES, IMAGES, IMAGES]
    client = s3.client()
    table = client.get_object(Bucket=BUCKET, Key="pipeline-out/result.jsonl")["Body"].read().decode()
    assert {row["image"]: row["final"] for row in map(json.loads, table.splitlines())} == expected
    exported = client.get_object(Bucket=BUCKET, Key="exp/rows.jsonl")["Body"].read().decode()
    assert {json.loads(line)["image"] for line in exported.splitlines()} == \
        {f"s3://{BUCKET}/set/{name}" for name in expected}
    assert _stored(tmp_path / "work", "florence") == _stored(tmp_path / "local-work", "florence")
    for folder in (tmp_path / "work", tmp_path / "cache"):  # store, run log, step results, staged table
        _assert_no_secret(folder, s3.key, s3.secret)
    assert s3.secret not in table + exported

    again = run_pipeline(pipeline)  # resume by ETag: nothing is captioned again
    assert (again.steps[0].processed, again.steps[0].done) == (0, IMAGES)


def test_a_pipeline_over_a_manifest_of_urls_fails_the_missing_key_once_and_runs_the_rest(s3, tiny_florence,
                                                                                        tmp_path):
    from captionkit.pipeline import run_pipeline

    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps({"url": url, "source": "web"}) + "\n" for url in
                                (f"s3://{BUCKET}/set/img000.png", f"s3://{BUCKET}/set/gone.png")))
    report = run_pipeline(_write(tmp_path / "p.yaml", {
        "input": str(manifest), "image_key": "url", "base_folder": "work", "save_folder": "out",
        "steps": [_florence(tiny_florence)]}), storage_options=json.dumps(s3.storage_options()))
    (step,) = report.steps
    assert (step.processed, step.failed) == (1, 1)
    (error,) = step.errors.values()
    assert "no such object (404)" in error and f"s3://{BUCKET}/set/gone.png" in error
    rows = [json.loads(line) for line in report.table.read_text().splitlines()]
    assert [row["url"] for row in rows] == [f"s3://{BUCKET}/set/img000.png", f"s3://{BUCKET}/set/gone.png"]
    assert rows[0]["florence"] and rows[1]["florence"] is None


def test_run_with_wrong_credentials_is_one_clear_403_error(s3, tiny_florence, tmp_path):
    pipeline = _write(tmp_path / "p.yaml", {
        "input": f"s3://{BUCKET}/set", "base_folder": "work", "save_folder": "out",
        "storage_options": {"client_kwargs": s3.storage_options()["client_kwargs"]},
        "steps": [_florence(tiny_florence)]})
    wrong = {"key": "AKIAWRONGWRONGWRONG", "secret": "not-the-secret-at-all"}
    result = subprocess.run([*CLI, "run", str(pipeline), "--storage-options", json.dumps(wrong), "-q"],
                            env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "access denied (403)" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "not-the-secret-at-all" not in result.stderr + result.stdout
    assert "not-the-secret-at-all" not in "".join(
        path.read_text(errors="replace") for path in (tmp_path / "work").rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------- inspect
def _kohya_folder(folder: Path) -> Path:
    """Images with caption files beside them; one without a caption, one that is not an image."""
    from tests.images import write_good_images

    write_good_images(folder, 4)
    for index in range(3):
        (folder / f"img00{index}.txt").write_text("ohwx, a photo of a thing" if index else "a photo")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


def _comparable(report) -> list[tuple[str, str]]:
    return sorted((finding.kind, finding.file) for finding in report.findings)


def test_inspect_a_bucket_prefix_finds_what_the_local_folder_shows_and_names_the_urls(s3, tmp_path, monkeypatch):
    from captionkit import api

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    folder = _kohya_folder(tmp_path / "kohya")
    s3.upload_folder(folder, BUCKET, "kohya")
    small = {"resolution": "64", "min_bucket": 32, "max_bucket": 128, "bucket_step": 32, "trigger": "ohwx"}
    local = api.inspect(folder, **small)
    reports = tmp_path / "reports"
    remote = api.inspect(f"s3://{BUCKET}/kohya/", storage_options=s3.storage_options(), io_workers=2,
                         report=reports / "r.html", json_report=reports / "r.json", **small)
    assert remote.counts == local.counts and remote.counts["with_caption"] == 3
    assert _comparable(remote) == _comparable(local) and {kind for kind, _ in _comparable(remote)} >= {
        "caption_missing", "image_unreadable", "trigger_missing"}
    paths = {finding.path for finding in remote.findings if finding.path}
    assert paths and all(path.startswith(f"s3://{BUCKET}/kohya/") for path in paths)
    assert remote.source == "prefix"
    assert str(tmp_path / "cache" / "objects" / "s3") not in (reports / "r.json").read_text()  # URLs, not copies
    _assert_no_secret(reports, s3.key, s3.secret)
    _assert_no_secret(tmp_path / "cache", s3.key, s3.secret)


def test_inspect_a_manifest_of_urls_reports_the_missing_key_as_one_unreadable_image(s3, tmp_path, monkeypatch):
    from captionkit import api

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"url": url, "caption": "a photo"}) + "\n" for url in (
        f"s3://{BUCKET}/set/img000.png", f"s3://{BUCKET}/set/img001.png", f"s3://{BUCKET}/set/gone.png")))
    report = api.inspect(manifest, image_column="url", storage_options=json.dumps(s3.storage_options()),
                         resolution="64", min_bucket=32, max_bucket=128, bucket_step=32)
    assert (report.counts["images"], report.counts["unreadable_images"], report.counts["with_caption"]) == (3, 1, 3)
    (unreadable,) = report.by_kind("image_unreadable")
    assert "no such object (404)" in unreadable.message + json.dumps(unreadable.details)
    assert unreadable.path == f"s3://{BUCKET}/set/gone.png"


def test_inspect_with_wrong_credentials_is_one_clear_403_error(s3, tmp_path):
    wrong = s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="not-the-secret-at-all")
    result = subprocess.run([*CLI, "inspect", f"s3://{BUCKET}/set/", "--storage-options", json.dumps(wrong),
                             "--json", str(tmp_path / "r.json"), "-q"], env=_cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "access denied (403)" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "not-the-secret-at-all" not in result.stderr + result.stdout
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def bucket_shapes(s3, tmp_path_factory):
    """4 shape images with captions, as a local folder and under s3://photos/shapes/."""
    from captionkit.train.captioner_data import write_shapes_dataset

    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(folder, 4, seed=4, size=32)
    s3.upload_folder(folder, BUCKET, "shapes")
    return folder


def _captioner_config(base_model: Path, data: str | Path, output: Path, **extra):
    from captionkit.train.captioner import CaptionerTrainConfig
    from captionkit.train.captioner_data import DatasetSpec

    return CaptionerTrainConfig(model=str(base_model), output_dir=output, data=[DatasetSpec(path=data)],
                                batch_size=4, epochs=2, max_target_tokens=32, report_to=[], log_every_steps=1,
                                cpu=True, **extra)


def test_a_captioner_trains_from_a_bucket_prefix_with_the_loss_of_the_local_folder(
        s3, bucket_shapes, base_model, tmp_path, monkeypatch, caplog):
    from captionkit.train.captioner import train_captioner

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    local = train_captioner(_captioner_config(base_model, bucket_shapes, tmp_path / "local"))
    with caplog.at_level("INFO", logger="captionkit.core.object_cache"):
        remote = train_captioner(_captioner_config(base_model, f"s3://{BUCKET}/shapes/", tmp_path / "remote",
                                                   storage_options=s3.storage_options(), io_workers=4))
    assert remote.global_step == local.global_step == 2  # two epochs of one batch
    assert remote.train_loss == pytest.approx(local.train_loss, rel=1e-5)
    fetches = [record.getMessage() for record in caplog.records if "object mirror" in record.getMessage()]
    assert fetches == [f"object mirror: 8 fetched, 0 unchanged in the local cache {tmp_path / 'cache' / 'objects'}"]
    saved = (tmp_path / "remote" / "train_config.yaml").read_text()
    assert "storage_options" not in saved and f"s3://{BUCKET}/shapes/" in saved
    _assert_no_secret(tmp_path / "remote", s3.key, s3.secret)
    _assert_no_secret(tmp_path / "cache", s3.key, s3.secret)

    from captionkit.core.locations import storage_options_set
    from captionkit.train.captioner_data import DataReport, DatasetSpec, load_items

    caplog.clear()
    with caplog.at_level("INFO", logger="captionkit.core.object_cache"), storage_options_set(s3.storage_options()):
        items = load_items(DatasetSpec(path=f"s3://{BUCKET}/shapes"), DataReport())
    assert "8 unchanged" in caplog.text and "0 fetched" in caplog.text  # the next run fetches nothing either
    assert all(str(item.image).startswith(str(tmp_path / "cache")) for item in items)


def test_a_captioner_manifest_of_urls_and_its_403_and_404(s3, bucket_shapes, tmp_path, monkeypatch):
    from captionkit.core.locations import storage_options_set
    from captionkit.train.captioner_data import DataReport, DatasetSpec, load_items

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    manifest = tmp_path / "pairs.parquet"
    import pyarrow as pa
    import pyarrow.parquet as parquet

    names = sorted(path.name for path in bucket_shapes.glob("*.png"))[:3]
    parquet.write_table(pa.Table.from_pylist(
        [{"url": f"s3://{BUCKET}/shapes/{name}", "caption": f"caption {name}"} for name in names]
        + [{"url": f"s3://{BUCKET}/shapes/gone.png", "caption": "lost"}]), manifest)
    report = DataReport()
    with storage_options_set(s3.storage_options()):
        items = load_items(DatasetSpec(path=manifest), report, io_workers=2)
    assert [item.caption for item in items] == [f"caption {name}" for name in names]
    assert [item.image.read_bytes() for item in items] == [(bucket_shapes / name).read_bytes() for name in names]
    assert report.missing_images == [f"s3://{BUCKET}/shapes/gone.png"]

    missing = r"no such object or prefix \(404\)"
    with storage_options_set(s3.storage_options()), pytest.raises(ValueError, match=missing):
        load_items(DatasetSpec(path=f"s3://{BUCKET}/nothing-here/"), DataReport())
    wrong = s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="not-the-secret-at-all")
    with storage_options_set(wrong), pytest.raises(ValueError, match=r"access denied \(403\)") as caught:
        load_items(DatasetSpec(path=f"s3://{BUCKET}/shapes/"), DataReport())
    assert "not-the-secret-at-all" not in str(caught.value)


def _tagger_settings(data: str, output: Path, *extra: str) -> list[str]:
    return [f"output_dir={output}", f"data.train_dirs=[{data}]", "model.backbone=test_resnet", "model.image_size=32",
            "epochs=1", "batch_size=4", "data.num_workers=0", "report_to=none", "data.val_fraction=0.25",
            "data.split=random", *extra]


@pytest.fixture(scope="module")
def bucket_tagged(s3, tmp_path_factory):
    """8 tagged shape images (a.png + a.txt), as a local folder and under s3://photos/tagged/."""
    from captionkit.train.tagger_synthetic import write_shapes_dataset

    folder = write_shapes_dataset(tmp_path_factory.mktemp("tagged"), 8, seed=5, size=(32, 32))
    s3.upload_folder(folder, BUCKET, "tagged")
    return folder


def test_a_tagger_trains_from_a_bucket_prefix_like_from_the_local_folder(s3, bucket_tagged, tmp_path, monkeypatch,
                                                                        caplog):
    from captionkit.train.tagger import load_tagger_config, train_tagger

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    local = train_tagger(load_tagger_config(None, _tagger_settings(str(bucket_tagged), tmp_path / "local")))
    options = f"data.storage_options={json.dumps(s3.storage_options())}"
    with caplog.at_level("INFO", logger="captionkit.core.object_cache"):
        remote = train_tagger(load_tagger_config(None, _tagger_settings(
            f"s3://{BUCKET}/tagged/", tmp_path / "remote", options, "data.io_workers=4")))
    assert remote.images_used == local.images_used == 8
    assert len(remote.history) == len(local.history) == 1
    for ours, theirs in zip(remote.history, local.history, strict=True):  # same losses and metrics (not seconds)
        ours.pop("epoch_seconds"), theirs.pop("epoch_seconds")
        assert ours == pytest.approx(theirs, rel=1e-5) and "train_loss" in ours
    assert caplog.text.count("object mirror: 16 fetched, 0 unchanged") == 1  # images + tag files, once
    saved = (remote.output_dir / "config.yaml").read_text()
    assert "storage_options" not in saved and f"s3://{BUCKET}/tagged/" in saved
    _assert_no_secret(tmp_path / "remote", s3.key, s3.secret)
    _assert_no_secret(tmp_path / "cache", s3.key, s3.secret)


def test_a_tagger_manifest_of_urls_and_its_403_and_404(s3, bucket_tagged, tmp_path, monkeypatch):
    from captionkit.core.locations import storage_options_set
    from captionkit.train.tagger_data import ScanReport, TaggerDataError, scan_tagged_folders

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    names = sorted(path.name for path in bucket_tagged.glob("*.png"))[:3]
    manifest = tmp_path / "tags.jsonl"
    manifest.write_text("".join(json.dumps({"url": f"s3://{BUCKET}/tagged/{name}", "tags": ["red", "circle"]}) + "\n"
                                for name in [*names, "gone.png"]))
    report = ScanReport()
    with storage_options_set(s3.storage_options()):
        items = scan_tagged_folders([manifest], report=report, io_workers=2)
    assert [item.path.read_bytes() for item in items] == [(bucket_tagged / name).read_bytes() for name in names]
    assert all(item.tags == ["red", "circle"] for item in items)
    assert report.missing_images == [f"s3://{BUCKET}/tagged/gone.png"]

    with storage_options_set(s3.storage_options()), pytest.raises(TaggerDataError, match=r"\(404\)"):
        scan_tagged_folders([f"s3://{BUCKET}/no-such-prefix/"])
    wrong = s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="not-the-secret-at-all")
    with storage_options_set(wrong), pytest.raises(TaggerDataError, match=r"access denied \(403\)") as caught:
        scan_tagged_folders([f"s3://{BUCKET}/tagged/"])
    assert "not-the-secret-at-all" not in str(caught.value)


def test_both_trainers_say_403_and_404_in_one_line_on_the_command_line(s3, base_model, tmp_path):
    from typer.testing import CliRunner

    from captionkit.train.cli import train_app

    wrong = json.dumps(s3.storage_options(key="AKIAWRONGWRONGWRONG", secret="not-the-secret-at-all"))
    right = json.dumps(s3.storage_options())
    captioner = _write(tmp_path / "c.yaml", {
        "model": str(base_model), "output_dir": str(tmp_path / "c"), "data": [{"path": f"s3://{BUCKET}/set"}],
        "max_steps": 1, "report_to": [], "cpu": True})
    tagger = _write(tmp_path / "t.yaml", {
        "output_dir": str(tmp_path / "t"), "data": {"train_dirs": [f"s3://{BUCKET}/set"]}, "report_to": "none"})
    runner = CliRunner()
    for command, key, where in (("captioner", "storage_options", "data.0.path"),
                                ("tagger", "data.storage_options", "data.train_dirs.0")):
        config = str(captioner if command == "captioner" else tagger)
        denied = runner.invoke(train_app, [command, "-c", config, "--set", f"{key}={wrong}"])
        assert denied.exit_code == 2 and "access denied (403)" in denied.output, denied.output
        assert "not-the-secret-at-all" not in denied.output and "Traceback" not in denied.output
        missing = runner.invoke(train_app, [command, "-c", config, "--set", f"{key}={right}",
                                            "--set", f"{where}=s3://{BUCKET}/gone/"])
        assert missing.exit_code == 2 and "no such object or prefix (404)" in missing.output, missing.output


@pytest.mark.slow  # builds a tiny FLUX pipeline (diffusers import and build: most of its minute here)
def test_generated_images_go_to_a_url_save_folder_and_the_table_names_their_urls(s3, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from captionkit.pipeline import run_pipeline
    from captionkit.testing.diffusion import build_tiny_flux

    monkeypatch.setenv("CAPTIONKIT_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": name, "caption": f"a {name}"}) + "\n" for name in ("cat", "dog")))
    report = run_pipeline(_write(tmp_path / "p.yaml", {
        "input": str(prompts), "text_key": "caption", "base_folder": "work",
        "save_folder": f"s3://{BUCKET}/generated-run", "storage_options": s3.storage_options(),
        "steps": [{"type": "image_generator", "name": "gen", "config": {
            "model": str(build_tiny_flux(tmp_path / "flux")), "input_field": "caption", "height": 32, "width": 32,
            "num_inference_steps": 2, "device": "cpu"}}]}))
    assert report.steps[0].processed == 2
    client = s3.client()
    rows = [json.loads(line) for line in client.get_object(
        Bucket=BUCKET, Key="generated-run/result.jsonl")["Body"].read().decode().splitlines()]
    for row in rows:
        assert row["gen"].startswith(f"s3://{BUCKET}/generated-run/generated_images/")
        key = row["gen"].split(f"s3://{BUCKET}/", 1)[1]
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read()[:4] == b"\x89PNG"
    _assert_no_secret(tmp_path / "work", s3.key, s3.secret)
