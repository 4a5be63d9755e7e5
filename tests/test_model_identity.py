"""A local model is keyed by its content: a folder copied, moved or touched reuses its results.

Before, a local folder was identified by its absolute path and its files' sizes and mtimes,
so any of those re-captioned everything; a changed tensor must still re-caption.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

import captionkit
from captionkit.core.store import SCHEMA_VERSION, Store, fingerprint
from tests.images import write_good_images
from tests.in_process import run_cli

FAST = {"max_new_tokens": 8, "num_beams": 1, "progress": "quiet", "workers": 2}


def _copy(source: Path, target: Path) -> Path:
    """A plain copy (new mtimes, like ``cp -r``), in a folder of another name."""
    return Path(shutil.copytree(source, target, copy_function=shutil.copy))


def _touch_all(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            info = path.stat()
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 7_000_000_000))


def _change_one_tensor(weights: Path) -> None:
    """One value of one tensor changed: same names, shapes, dtypes and file size."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(weights), "pt") as stream:
        metadata = stream.metadata()
    tensors = load_file(str(weights))
    name = sorted(name for name, tensor in tensors.items() if tensor.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    size = weights.stat().st_size
    save_file(tensors, str(weights), metadata=metadata)
    assert weights.stat().st_size == size


def test_a_copied_florence_folder_reuses_the_captions_and_a_changed_tensor_does_not(tmp_path, tiny_florence):
    images = tmp_path / "images"
    write_good_images(images, 3)
    model = _copy(tiny_florence, tmp_path / "models" / "florence")
    args = ("caption", str(images), "--max-new-tokens", "8", "--num-beams", "1", "--progress", "quiet")
    first = run_cli(*args, "--model", str(model))  # the console entry point, in this process
    assert first.returncode == 0 and "3 done" in first.stderr, first.stderr
    captions = {path.name: path.read_text() for path in images.glob("*.txt")}

    elsewhere = _copy(model, tmp_path / "somewhere" / "else" / "florence-copy")
    again = run_cli(*args, "--model", str(elsewhere))
    assert again.returncode == 0 and "0 done, 3 already done" in again.stderr, again.stderr
    assert {path.name: path.read_text() for path in images.glob("*.txt")} == captions

    _change_one_tensor(elsewhere / "model.safetensors")
    changed = captionkit.caption(images, model=str(elsewhere), **FAST)
    assert (changed.processed, changed.reused) == (3, 0)


def test_a_touched_or_moved_florence_folder_reuses_the_captions(tmp_path, tiny_florence):
    images = tmp_path / "images"
    write_good_images(images, 2)
    model = _copy(tiny_florence, tmp_path / "florence")
    assert captionkit.caption(images, model=str(model), **FAST).processed == 2
    _touch_all(model)
    touched = captionkit.caption(images, model=str(model), **FAST)
    assert (touched.processed, touched.reused) == (0, 2)
    moved = Path(shutil.move(model, tmp_path / "moved"))
    again = captionkit.caption(images, model=str(moved), **FAST)
    assert (again.processed, again.reused) == (0, 2)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "note": "edited"}))  # every config is part of it
    assert captionkit.caption(images, model=str(moved), **FAST).processed == 2


def _tagger_folder(folder: Path) -> Path:
    from safetensors.torch import save_file

    from tests.test_taggers_formats import SIZE, TAG_ROWS, tiny_model, write_tags_csv

    folder.mkdir(parents=True)
    config = {
        "architecture": "test_convnext", "num_classes": len(TAG_ROWS), "model_args": {},
        "pretrained_cfg": {"input_size": [3, SIZE, SIZE], "interpolation": "bicubic", "crop_pct": 1.0,
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": len(TAG_ROWS)},
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tiny_model(5).state_dict().items()}, str(folder / "model.safetensors"))
    write_tags_csv(folder / "selected_tags.csv")
    return folder


def test_a_copied_or_touched_tagger_reuses_the_tags_and_a_changed_one_does_not(tmp_path):
    from tests.test_taggers_formats import TAG_ROWS, write_tags_csv

    images = tmp_path / "images"
    write_good_images(images, 3)
    tagger = _tagger_folder(tmp_path / "tagger")
    assert captionkit.tag(images, model=str(tagger), device="cpu", workers=2).processed == 3
    copy = _copy(tagger, tmp_path / "other" / "tagger-copy")
    _touch_all(copy)
    again = captionkit.tag(images, model=str(copy), device="cpu", workers=2)
    assert (again.processed, again.reused) == (0, 3)
    write_tags_csv(copy / "selected_tags.csv", [(name + "_x", category) for name, category in TAG_ROWS])
    assert captionkit.tag(images, model=str(copy), device="cpu", workers=2).processed == 3
    weights = _copy(tagger, tmp_path / "third")
    _change_one_tensor(weights / "model.safetensors")
    assert captionkit.tag(images, model=str(weights), device="cpu", workers=2).processed == 3


def test_a_copied_chat_vlm_folder_reuses_the_captions(tmp_path):
    from captionkit.testing.vlms.llava import build_llava

    images = tmp_path / "images"
    write_good_images(images, 2)
    model = build_llava(tmp_path / "llava")
    options = {"max_new_tokens": 6, "progress": "quiet", "workers": 2}
    assert captionkit.caption(images, model=str(model), **options).processed == 2
    copy = _copy(model, tmp_path / "elsewhere" / "llava-copy")
    again = captionkit.caption(images, model=str(copy), **options)
    assert (again.processed, again.reused) == (0, 2)
    _change_one_tensor(next(copy.glob("*.safetensors")))
    assert captionkit.caption(images, model=str(copy), **options).processed == 2


def test_a_diffusers_folder_and_an_adapter_are_keyed_by_content(tmp_path, tiny_florence):
    from captionkit.core.identity import pipeline_revision
    from captionkit.models.florence2 import Florence2Captioner
    from captionkit.testing.diffusion import build_tiny_flux

    pipeline = build_tiny_flux(tmp_path / "flux")
    copy = _copy(pipeline, tmp_path / "copies" / "flux")
    _touch_all(copy)
    assert pipeline_revision(copy) == pipeline_revision(pipeline)
    _change_one_tensor(next((copy / "transformer").glob("*.safetensors")))  # a component's weights decide too
    assert pipeline_revision(copy) != pipeline_revision(pipeline)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    shutil.copy(tiny_florence / "model.safetensors", adapter / "adapter_model.safetensors")
    moved_adapter = _copy(adapter, tmp_path / "copies" / "adapter")
    first = Florence2Captioner(str(tiny_florence), adapter=adapter, device="cpu").fingerprint()
    second = Florence2Captioner(str(tiny_florence), adapter=moved_adapter, device="cpu").fingerprint()
    assert first == second and str(tmp_path) not in json.dumps(first)
    _change_one_tensor(moved_adapter / "adapter_model.safetensors")
    assert Florence2Captioner(str(tiny_florence), adapter=moved_adapter, device="cpu").fingerprint() != first


def test_large_files_are_hashed_once_per_change(tmp_path, monkeypatch):
    from captionkit.core import identity

    monkeypatch.setenv("CAPTIONKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(identity, "CACHED_FROM_BYTES", 0)
    monkeypatch.setattr(identity, "_memory", {})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert identity.file_digest(weights) == real
    cache = tmp_path / "cache" / "file-digests.json"
    entries = json.loads(cache.read_text())
    assert entries[str(weights.resolve())]["sha256"] == real
    # the cached digest is what a later process reads while size and mtime agree ...
    entries[str(weights.resolve())]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    monkeypatch.setattr(identity, "_memory", {})
    assert identity.file_digest(weights) == "0" * 64
    # ... and a touched file is read again
    _touch_all(tmp_path)
    assert identity.file_digest(weights) == real


def _legacy_revision(folder: Path) -> str:
    """What captionkit before schema 3 stored as a local folder's revision (path, sizes, mtimes)."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            info = path.stat()
            digest.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return "local:" + digest.hexdigest()[:16]


def _make_schema_2_store(location: Path, model: Path) -> None:
    connection = sqlite3.connect(location / ".captionkit" / "store.sqlite")
    with connection:
        for step, record_id, settings in connection.execute(
                "SELECT step, record_id, settings FROM results").fetchall():
            old = {**json.loads(settings), "model": str(model.resolve()), "revision": _legacy_revision(model)}
            connection.execute("UPDATE results SET settings = ?, fingerprint = ? WHERE step = ? AND record_id = ?",
                               (json.dumps(old, sort_keys=True), fingerprint(old), step, record_id))
        connection.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    connection.close()


@pytest.mark.parametrize("since", ["unchanged", "touched"])
def test_a_store_keyed_by_the_folder_path_is_rekeyed_by_its_content(tmp_path, tiny_florence, since):
    images = tmp_path / "images"
    write_good_images(images, 2)
    model = _copy(tiny_florence, tmp_path / "florence")
    assert captionkit.caption(images, model=str(model), **FAST).processed == 2
    _make_schema_2_store(images, model)
    if since == "touched":  # changed since the results were made, as far as the old key can tell: redone
        _touch_all(model)
    again = captionkit.caption(images, model=str(model), **FAST)
    expected = (0, 2) if since == "unchanged" else (2, 0)
    assert (again.processed, again.reused) == expected
    with Store(images) as store:
        assert store.get_meta("schema_version") == SCHEMA_VERSION
        assert all(result.settings["model"] == "local" for result in store.iter_results())


def test_a_hub_cache_file_is_known_by_its_blob_name(tmp_path):
    """A Hugging Face snapshot links to blobs named by their SHA-256: the same digest, nothing read."""
    from captionkit.core.identity import file_digest, folder_identity

    data = b"tensor bytes" * 100
    digest = hashlib.sha256(data).hexdigest()
    blobs = tmp_path / "models--owner--name" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / digest).write_bytes(data)
    snapshot = tmp_path / "models--owner--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / digest)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(data)
    assert file_digest(snapshot / "model.safetensors") == digest == file_digest(plain / "model.safetensors")
    assert folder_identity(snapshot) == folder_identity(plain)
    (blobs / ("a" * 64)).write_bytes(data)  # the name is what counts: the blob is not read
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / ("a" * 64))
    assert file_digest(snapshot / "model.safetensors") == "a" * 64


def test_a_tagger_store_keyed_by_the_folder_path_is_rekeyed_by_its_content(tmp_path):
    images = tmp_path / "images"
    write_good_images(images, 2)
    tagger = _tagger_folder(tmp_path / "tagger")
    assert captionkit.tag(images, model=str(tagger), device="cpu", workers=2).processed == 2
    files = {}  # what captionkit before schema 3 stored for a tagger folder: its path, sizes and mtimes
    for path in sorted(tagger.iterdir()):
        if path.is_file() and path.suffix in (".json", ".csv", ".onnx", ".safetensors", ".bin"):
            files[path.name] = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    connection = sqlite3.connect(images / ".captionkit" / "store.sqlite")
    with connection:
        for step, record_id, settings in connection.execute("SELECT step, record_id, settings FROM results").fetchall():
            old = {**json.loads(settings), "model": str(tagger.resolve()), "revision": None, "files": files}
            connection.execute("UPDATE results SET settings = ?, fingerprint = ? WHERE step = ? AND record_id = ?",
                               (json.dumps(old, sort_keys=True), fingerprint(old), step, record_id))
        connection.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    connection.close()
    again = captionkit.tag(images, model=str(tagger), device="cpu", workers=2)
    assert (again.processed, again.reused) == (0, 2)
    with Store(images) as store:
        assert [result.settings["model"] for result in store.iter_results()] == ["local", "local"]


def test_rekeyed_adapter_and_diffusers_settings_are_what_a_new_run_computes(tmp_path, tiny_florence):
    from captionkit.core.identity import pipeline_revision, upgrade_stored_identity
    from captionkit.models.florence2 import Florence2Captioner
    from captionkit.testing.diffusion import build_tiny_flux

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    now = Florence2Captioner(str(tiny_florence), adapter=adapter, device="cpu").fingerprint()
    old = {**now, "model": str(tiny_florence.resolve()), "revision": _legacy_revision(tiny_florence),
           "adapter": {"path": str(adapter.resolve()), "revision": _legacy_revision(adapter)}}
    assert upgrade_stored_identity(old) == now
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))  # changed since: left to be redone
    assert upgrade_stored_identity(old) is None

    pipeline = build_tiny_flux(tmp_path / "flux")
    legacy = hashlib.sha256(_legacy_revision(pipeline).encode())
    for sub in sorted(path for path in pipeline.iterdir() if path.is_dir() and not path.name.startswith(".")):
        legacy.update(f"{sub.name}:{_legacy_revision(sub)}".encode())
    stored = {"backend": "diffusers", "model": str(pipeline.resolve()), "revision": "local:" + legacy.hexdigest()[:16]}
    assert upgrade_stored_identity(stored) == {"backend": "diffusers", "model": "local",
                                               "revision": pipeline_revision(pipeline)}
