"""What a model is, for result fingerprints: its content, never where it lives.

Stored results are reused when the fingerprint of a run matches, so a local model folder
must be identified by what decides the output (configs, tokenizer, tag list, weights)
and by nothing about its location: a folder copied, moved, renamed, ``touch``-ed or
downloaded again at the same revision is the same model; one changed tensor is not.

Every family (Florence-2, chat VLMs, vLLM, taggers, diffusers pipelines, adapters) asks
:func:`folder_identity`; hub ids keep ``id`` + revision (:func:`model_identity`).

How weight files are identified: by a full SHA-256 of their bytes. Cheaper keys were
rejected: a safetensors header (names, shapes, dtypes, offsets) plus the file size is the
same for a fine-tune and its base model, and a hash of the first and last MiB misses a
tensor changed in the middle, so either would reuse the wrong captions. A full hash costs
one read of the file, so for files of :data:`CACHED_FROM_BYTES` or more it is cached by
(real path, inode, size, mtime) in ``<cache>/captionkit/file-digests.json`` (``CAPTIONKIT_CACHE_DIR``,
else ``XDG_CACHE_HOME``, else ``~/.cache``): a folder is read once, then each run costs a
``stat`` per file. Files in a Hugging Face cache are symlinks to blobs named by their
SHA-256 (large files): those cost nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCAL_MODEL = "local"  # the "model" of a local folder in fingerprints: its place is not part of what it is
CONTENT_PREFIX = "content:"
# The files that decide a model's output: configs, tokenizers, templates, tag lists, remote code, weights.
MODEL_FILE_SUFFIXES = (
    ".json", ".txt", ".model", ".jinja", ".csv", ".py", ".tiktoken",
    ".safetensors", ".bin", ".onnx", ".pt", ".pth", ".gguf", ".msgpack", ".h5",
)
CACHED_FROM_BYTES = 64 << 20  # smaller files are hashed on every run (a few ms), larger ones once per change
_CACHE_FILE = "file-digests.json"
_HEX = frozenset("0123456789abcdef")
_memory: dict[tuple[str, int, int, int], str] = {}
_lock = threading.Lock()


def digest_cache_path() -> Path:
    """Where digests of large files are kept between runs."""
    base = os.environ.get("CAPTIONKIT_CACHE_DIR")
    if base:
        return Path(base).expanduser() / _CACHE_FILE
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "captionkit" / _CACHE_FILE


def _hub_blob_digest(path: Path) -> str | None:
    """A Hugging Face cache file is a symlink to a blob named by its SHA-256 (large files): use the name."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    name = target.name
    return name if target.parent.name == "blobs" and len(name) == 64 and set(name) <= _HEX else None


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        value = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _remember(real: str, entry: dict[str, Any]) -> None:
    """Add one digest to the cache file (merged with what other processes wrote; gone files dropped)."""
    from captionkit.core.atomic import atomic_write_json

    cache = digest_cache_path()
    try:
        entries = {key: value for key, value in _read_cache(cache).items() if os.path.exists(key)}
        entries[real] = entry
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, entries)
    except OSError as error:  # a read-only home only costs hashing again next run
        log.debug("could not keep file digests in %s: %s", cache, error)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read once per (real path, inode, size, mtime) in a process; large files once."""
    blob = _hub_blob_digest(path)
    if blob is not None:
        return blob
    info = path.stat()
    real = os.path.realpath(path)
    stamp = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}
    key = (real, info.st_size, info.st_mtime_ns, info.st_ino)
    with _lock:
        if key in _memory:
            return _memory[key]
    large = info.st_size >= CACHED_FROM_BYTES
    stored = _read_cache(digest_cache_path()).get(real) if large else None
    if isinstance(stored, dict) and {name: stored.get(name) for name in stamp} == stamp and stored.get("sha256"):
        digest = str(stored["sha256"])
    else:
        if large:
            log.info("reading %s (%.1f GB) once to identify the model by its content", path, info.st_size / 1e9)
        digest = _hash_file(path)
        if large:
            _remember(real, {**stamp, "sha256": digest})
    with _lock:
        _memory[key] = digest
    return digest


def update_with_tensors(digest: Any, named_tensors: Iterable[tuple[str, Any]]) -> None:
    """Feed each tensor's name, dtype, shape and bytes into ``digest``, in name order.

    Why tensors in memory and not the model's files: a feature cache must follow the weights
    actually loaded (a resumed fine-tune reads them from a checkpoint folder, not the model folder).
    """
    import torch

    for name, tensor in sorted(named_tensors, key=lambda pair: pair[0]):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
        if value.numel():
            digest.update(memoryview(value.reshape(-1).view(torch.uint8).numpy()))


def model_files(folder: Path, subfolders: Iterable[str] = (), names: Iterable[str] | None = None) -> list[Path]:
    """The files of a model folder that decide its output: top level, plus the named subfolders' top level.

    ``names``: only these files of the top level (a model given as one file in a shared folder).
    """
    wanted = None if names is None else set(names)
    found = []
    for place in [folder, *(folder / name for name in subfolders)]:
        for path in sorted(place.iterdir()):
            if wanted is not None and place == folder and path.name not in wanted:
                continue
            if not path.name.startswith(".") and path.suffix in MODEL_FILE_SUFFIXES and path.is_file():
                found.append(path)
    return found


def folder_identity(folder: str | Path, subfolders: Iterable[str] = (), names: Iterable[str] | None = None) -> str:
    """``content:<hash>`` of a model folder: each file's path inside the folder and SHA-256, nothing else.

    The folder's own name and place, and the files' times, are left out on purpose (see the module doc).
    """
    root = Path(folder).expanduser()
    manifest = hashlib.sha256()
    if root.is_file():  # a model given as one file: that file's content, not its name
        return CONTENT_PREFIX + hashlib.sha256(file_digest(root).encode()).hexdigest()[:20]
    for path in model_files(root, subfolders, names):
        relative = path.relative_to(root).as_posix()
        manifest.update(f"{relative}\0{file_digest(path)}\n".encode())
    return CONTENT_PREFIX + manifest.hexdigest()[:20]


def model_identity(model: str, revision: str | None) -> tuple[str, str]:
    """(model, revision) for fingerprints: a local folder is ``local`` + its content, a hub id is id + revision."""
    if Path(model).expanduser().exists():  # a local folder or file (models.is_local)
        return LOCAL_MODEL, folder_identity(model)
    return model, revision or "main"


# -- results stored before schema 3 ------------------------------------------------------------
# Those fingerprints held a local folder's absolute path and its files' sizes and mtimes. They
# are recomputed here only to recognise such a result: when the folder is still where it was
# and unchanged since (same sizes and mtimes), the result was made by the content the folder
# holds now, so it is keyed again by that content (captionkit.core.store migrates it once).


def _legacy_revision(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".json", ".safetensors", ".bin", ".model", ".txt"):
            info = path.stat()
            digest.update(f"{path.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return "local:" + digest.hexdigest()[:16]


def _legacy_pipeline(folder: Path) -> str:
    digest = hashlib.sha256(_legacy_revision(folder).encode())
    for sub in sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")):
        digest.update(f"{sub.name}:{_legacy_revision(sub)}".encode())
    return "local:" + digest.hexdigest()[:16]


def _legacy_tagger(folder: Path) -> dict[str, str]:
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".csv", ".onnx", ".safetensors", ".bin"):
            info = path.stat()
            files[path.name] = f"{info.st_size}:{info.st_mtime_ns}"
    return files


class _Changed(Exception):
    """The folder a stored result names is gone or changed since: the result cannot be re-keyed."""


def _same(stored: object, now: object) -> None:
    if stored != now:
        raise _Changed


def upgrade_stored_identity(settings: dict, memo: dict | None = None) -> dict | None:
    """Settings stored with a local folder's path + file times → the same settings keyed by its content.

    None when there is nothing to upgrade, or when the folder is gone or changed since the
    result was made (that result is then made again on the next run). ``memo`` keeps what
    was read of each folder across calls (one store holds many rows of one model).
    """
    known = {} if memo is None else memo

    def once(function: Any, folder: Path) -> Any:
        key = (function.__name__, str(folder))
        if key not in known:
            known[key] = function(folder) if folder.is_dir() else None
        return known[key]

    upgraded = dict(settings)
    model = settings.get("model")
    try:
        if isinstance(model, str) and Path(model).is_absolute():
            folder = Path(model)
            if settings.get("backend") == "tagger" and isinstance(settings.get("files"), dict):
                _same(settings["files"], once(_legacy_tagger, folder))
                upgraded.update(model=LOCAL_MODEL, revision=once(folder_identity, folder), files=None)
            elif settings.get("backend") == "diffusers":
                _same(settings.get("revision"), once(_legacy_pipeline, folder))
                upgraded.update(model=LOCAL_MODEL, revision=once(pipeline_revision, folder))
            elif str(settings.get("revision", "")).startswith("local:"):
                _same(settings["revision"], once(_legacy_revision, folder))
                upgraded.update(model=LOCAL_MODEL, revision=once(folder_identity, folder))
            vision = settings.get("vision_adapter")
            if isinstance(vision, str) and vision.startswith("local:"):
                _same(vision, once(_legacy_revision, folder / "vision-lora"))
                upgraded["vision_adapter"] = once(folder_identity, folder / "vision-lora")
        adapter = settings.get("adapter")
        if isinstance(adapter, dict) and isinstance(adapter.get("path"), str):
            place = Path(adapter["path"])
            _same(adapter.get("revision"), once(_legacy_revision, place))
            upgraded["adapter"] = {"revision": once(folder_identity, place)}
    except (_Changed, OSError):
        return None
    return upgraded if upgraded != settings else None


def pipeline_revision(folder: Path) -> str:
    """Identity of a local diffusers folder: the content of model_index.json and of each component's folder."""
    components = sorted(path.name for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
    return folder_identity(folder, components)
