"""What a data set holds, read without changing anything: images, captions, tags, the store.

Captions and tags come from the store where it has them (``.captionkit/store.sqlite``,
opened read-only), else from sidecar files (``<stem><ext>``, or ``<name><ext>`` as
written with ``--on-collision keep-extension``), else from manifest columns. A sidecar
whose text differs from the store's (edited by hand, or written with ``--existing
append``) is read instead of the store: it is what trainers see. A sidecar the store's
ledger says the ``tags`` step wrote is read as tags, not as a caption.
"""

from __future__ import annotations

import codecs
import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionkit.core.records import FolderSource, ManifestSource, Record, RemoteFolderSource, Source
from captionkit.core.store import STORE_FILE, STORE_FOLDER

log = logging.getLogger(__name__)

CAPTION_FIELDS = ("caption", "text", "prompt")
TAG_FIELDS = ("tags", "tag_string")


@dataclass
class TextFile:
    """A sidecar's text and the encoding problems of its bytes."""

    path: Path
    text: str
    bom: bool = False
    encoding_problem: str | None = None


def read_text_file(path: Path) -> TextFile | None:
    """The file's text (decoded as best as possible) or None when there is no such file."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as error:
        return TextFile(path, "", encoding_problem=f"cannot read the file ({error.strerror or error})")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            text = data.decode("utf-16", errors="replace")
        return TextFile(path, text, encoding_problem="UTF-16 (it starts with a UTF-16 byte-order mark); "
                                                     "save it as UTF-8")
    bom = data.startswith(codecs.BOM_UTF8)
    try:
        return TextFile(path, data.decode("utf-8-sig"), bom=bom)
    except UnicodeDecodeError as error:
        guess = ""
        try:
            data.decode("cp1252")
            guess = "; it reads as Windows-1252 (Latin-1)"
        except UnicodeDecodeError:
            pass
        problem = f"not UTF-8: byte 0x{data[error.start]:02x} at offset {error.start}{guess}; save it as UTF-8"
        return TextFile(path, data.decode("utf-8-sig", errors="replace"), bom=bom, encoding_problem=problem)


def split_tags(text: str) -> list[str]:
    """'a, b,c' → ['a', 'b', 'c'] (blank items dropped)."""
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def tag_key(tag: str) -> str:
    """The same tag written with spaces or underscores, any case, compares equal."""
    return tag.strip().replace(" ", "_").lower()


@dataclass
class StoredText:
    status: str
    text: str | None
    error: str | None
    content_hash: str | None
    file_signature: str | None


class StoreView:
    """A captionkit store opened read-only: no WAL or lock files are created, nothing is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        wal = path.with_name(path.name + "-wal")
        if wal.exists():  # a run is writing (or was killed): read through the WAL, which already exists
            uri = path.resolve().as_uri() + "?mode=ro"
        else:  # a clean store: immutable means SQLite creates no -wal/-shm beside it
            uri = path.resolve().as_uri() + "?immutable=1"
        self._connection = sqlite3.connect(uri, uri=True)
        self._connection.execute("SELECT 1 FROM results LIMIT 1")  # fails early on a file that is no store

    @classmethod
    def find(cls, location: Path) -> StoreView | None:
        path = location / STORE_FOLDER / STORE_FILE
        if not path.is_file():
            return None
        try:
            return cls(path)
        except sqlite3.Error as error:
            log.warning("%s: cannot read the captionkit store (%s); using sidecar files only.", path, error)
            return None

    def close(self) -> None:
        self._connection.close()

    def texts(self, step: str) -> dict[str, StoredText]:
        rows = self._connection.execute(
            "SELECT record_id, status, text, error, content_hash, file_signature FROM results WHERE step = ?", (step,))
        return {row[0]: StoredText(*row[1:]) for row in rows}

    def hashes(self) -> dict[str, tuple[str | None, str]]:
        """record id → (file signature, content hash) from any step."""
        rows = self._connection.execute(
            "SELECT record_id, file_signature, content_hash FROM results WHERE content_hash IS NOT NULL")
        return {row[0]: (row[1], row[2]) for row in rows}

    def output_steps(self) -> dict[str, str]:
        """Sidecar path → the step that wrote it (the ledger; paths under the location are kept relative)."""
        import os
        from pathlib import PurePosixPath

        root = Path(os.path.abspath(self.path)).parent.parent
        return {(key if Path(key).is_absolute() else str(root / PurePosixPath(key))): step
                for key, step in self._connection.execute("SELECT output_path, step FROM outputs")}

    def tag_categories(self) -> dict[str, int]:
        """Normalised tag → category number, from every tagger vocabulary kept in the store."""
        import json

        categories: dict[str, int] = {}
        for (value,) in self._connection.execute("SELECT value FROM meta WHERE key LIKE 'vocabulary:%'"):
            try:
                vocabulary = json.loads(value)
                for tag, category in zip(vocabulary["tags"], vocabulary["categories"], strict=False):
                    categories.setdefault(tag_key(tag), int(category))
            except (ValueError, KeyError, TypeError):
                continue
        return categories


def read_selected_tags(path: Path) -> dict[str, int]:
    """Normalised tag → category from a WD-style ``selected_tags.csv`` (name, category columns)."""
    import csv

    categories: dict[str, int] = {}
    with path.open(encoding="utf-8-sig", newline="") as stream:
        for row in csv.DictReader(stream):
            name = row.get("name")
            if name:
                try:
                    categories[tag_key(name)] = int(row.get("category") or 0)
                except ValueError:
                    categories[tag_key(name)] = 0
    return categories


@dataclass
class Entry:
    """One image and what the data set says about it."""

    id: str
    path: Path | None
    caption: str | None = None
    caption_source: str | None = None  # store, file or manifest
    caption_file: Path | None = None
    caption_failed: str | None = None  # the store's error when captioning this image failed
    caption_undecodable: bool = False  # read from a file that is not UTF-8 (U+FFFD there is the reader's)
    tags: list[str] | None = None
    tags_source: str | None = None
    tag_file: Path | None = None
    same_file: bool = False  # caption and tags are one file
    stored_hash: str | None = None  # the store's content hash, valid for the file as it is now
    signature: str | None = None
    # filled by the image scan
    width: int | None = None
    height: int | None = None
    format: str | None = None
    content_hash: str | None = None
    phash: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _signature(path: Path) -> str | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return f"{info.st_size}:{info.st_mtime_ns}"


def sidecar_candidates(record: Record, extension: str, output_dir: Path | None) -> tuple[Path, Path]:
    """``<stem><ext>`` and ``<name><ext>`` where captionkit (and trainers) look for a record's text."""
    assert record.path is not None
    if output_dir is None:
        folder = record.path.parent
    else:
        relative = Path(record.id).parent
        if relative.is_absolute():
            relative = Path("_external") / relative.relative_to(relative.anchor)
        folder = output_dir / relative
    return folder / (record.path.stem + extension), folder / (record.path.name + extension)


def _field_text(fields: dict[str, Any], names: Iterable[str]) -> str | None:
    for name in names:
        value = fields.get(name)
        if value is not None and not (isinstance(value, float) and value != value):  # NaN from parquet
            return value if isinstance(value, str) else ", ".join(map(str, value)) if isinstance(value, list) \
                else str(value)
    return None


@dataclass
class Collected:
    entries: list[Entry]
    text_files: list[tuple[str, TextFile]]  # (owner id, file) for every sidecar read
    orphans: list[tuple[str, Path]]  # (id relative to the sidecar root, path)
    sidecar_root: Path | None
    store_path: Path | None
    tag_categories: dict[str, int]
    diverged: int = 0


def collect(source: Source, records: list[Record], caption_ext: str, tag_ext: str | None,
            output_dir: Path | None, store: StoreView | None, categories: dict[str, int]) -> Collected:
    """Entries for every record, with texts from the store, sidecars or manifest columns."""
    stored_captions = store.texts("caption") if store else {}
    stored_tags = store.texts("tags") if store else {}
    stored_hashes = store.hashes() if store else {}
    ledger = store.output_steps() if store else {}
    if store:
        categories = {**store.tag_categories(), **categories}
    entries: list[Entry] = []
    text_files: list[tuple[str, TextFile]] = []
    expected: set[Path] = set()
    same_ext = tag_ext is not None and tag_ext == caption_ext
    diverged = 0  # sidecars whose text differs from the store's
    for record in records:
        entry = Entry(id=record.id, path=record.path)
        entries.append(entry)
        if record.path is None:
            continue
        entry.signature = _signature(record.path)
        known = stored_hashes.get(record.id)
        if known and entry.signature and known[0] == entry.signature:
            entry.stored_hash = known[1]
        caption_paths = sidecar_candidates(record, caption_ext, output_dir)
        expected.update(caption_paths)
        caption_file = _first_existing(caption_paths)
        tag_file = None
        if tag_ext is not None:
            tag_paths = sidecar_candidates(record, tag_ext, output_dir)
            expected.update(tag_paths)
            tag_file = _first_existing(tag_paths)
        if caption_file is not None and not same_ext and ledger.get(str(caption_file)) == "tags":
            tag_file, caption_file = tag_file or caption_file, None  # `captionkit tag` wrote it: it holds tags
        caption_text = tag_text = None
        if caption_file is not None:
            caption_text = read_text_file(caption_file)
            if caption_text is not None:
                text_files.append((record.id, caption_text))
        if tag_file is not None:
            tag_text = caption_text if tag_file == caption_file else read_text_file(tag_file)
            if tag_text is not None and tag_file != caption_file:
                text_files.append((record.id, tag_text))
        # captions: store, then sidecar, then manifest; a sidecar edited since (or appended to) wins, since
        # it is what trainers read
        stored = stored_captions.get(record.id)
        stored_ok = stored is not None and stored.status == "ok" and stored.text is not None
        if stored_ok and (caption_text is None or caption_text.text.strip() == stored.text.strip()):
            entry.caption, entry.caption_source = stored.text, "store"
        elif caption_text is not None:
            entry.caption, entry.caption_source, entry.caption_file = caption_text.text, "file", caption_file
            entry.caption_undecodable = caption_text.encoding_problem is not None
            diverged += stored_ok
        elif (manifest_caption := _field_text(record.fields, CAPTION_FIELDS)) is not None:
            entry.caption, entry.caption_source = manifest_caption, "manifest"
        elif stored is not None and stored.status != "ok":
            entry.caption_failed = stored.error or "failed"
        if entry.caption_source != "file" and caption_text is not None:
            entry.caption_file = caption_file
        # tags: store, then sidecar, then manifest
        stored = stored_tags.get(record.id)
        stored_ok = stored is not None and stored.status == "ok" and stored.text is not None
        if stored_ok and (tag_text is None or split_tags(tag_text.text) == split_tags(stored.text)):
            entry.tags, entry.tags_source = split_tags(stored.text), "store"
        elif tag_text is not None:
            entry.tags, entry.tags_source, entry.tag_file = split_tags(tag_text.text), "file", tag_file
            entry.same_file = tag_file == caption_file and entry.caption_source == "file"
            diverged += stored_ok
        elif (manifest_tags := _field_text(record.fields, TAG_FIELDS)) is not None:
            entry.tags, entry.tags_source = split_tags(manifest_tags), "manifest"
    sidecar_root = None
    orphans: list[tuple[str, Path]] = []
    if isinstance(source, FolderSource):
        sidecar_root = output_dir or source.root
        extensions = {caption_ext} | ({tag_ext} if tag_ext else set())
        for path in _walk_files(sidecar_root, extensions, source.recursive, source.include_hidden):
            if path not in expected:
                orphans.append((path.relative_to(sidecar_root).as_posix(), path))
    store_path = store.path if store else None
    return Collected(entries, text_files, orphans, sidecar_root, store_path, categories, diverged)


def _first_existing(paths: Iterable[Path]) -> Path | None:
    for path in paths:
        if path.is_file():
            return path
    return None


def _walk_files(root: Path, extensions: set[str], recursive: bool, include_hidden: bool) -> list[Path]:
    """Files under ``root`` ending in one of ``extensions`` (FolderSource's rules: hidden skipped, loops cut)."""
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in visited:
                continue
            visited.add((info.st_dev, info.st_ino))
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for item in entries:
            if item.name.startswith(".") and not include_hidden:
                continue
            try:
                if item.is_dir():
                    if recursive:
                        pending.append(Path(item.path))
                elif item.is_file() and any(item.name.endswith(ext) for ext in extensions):
                    found.append(Path(item.path))
            except OSError:
                continue
    return sorted(found)


def source_kind(source: Source) -> str:
    if isinstance(source, FolderSource):
        return "folder"
    if isinstance(source, ManifestSource):
        return "manifest"
    if isinstance(source, RemoteFolderSource):
        return "prefix"  # a folder in object storage
    return "image"
