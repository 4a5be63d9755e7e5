"""The Review tab's data: a paged view of a data set, lazy cached thumbnails, and caption edits.

Why it stays fast on 50,000 images: opening a data set lists file names only (no image
is decoded and no caption file read); a page reads its own caption files, asks the store
for its own ids, and makes the thumbnails it lacks (cached under
``.captionkit/thumbnails/``, keyed by path, size and modification time, so a changed
image gets a new one). Searching reads caption files once and remembers them by
modification time.

Edits are the user's text: the file is replaced atomically, and the store's sidecar
ledger stops recognising it as captionkit's, so ``--existing skip`` (the default) and
``fill-empty`` leave it alone on every later run, whatever the settings (see
:class:`captionkit.core.sinks.SidecarSink`). The last edit can be undone: the previous text
and ledger entry are kept in the store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit.api import output_location
from captionkit.core.atomic import atomic_open, atomic_write_text
from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record, no_images_message, open_source
from captionkit.core.sinks import UNREADABLE, SidecarSink, read_sidecar
from captionkit.core.store import STORE_FILE, STORE_FOLDER, OutputRecord, Store, file_signature

THUMBNAIL_SIDE = 256
THUMBNAIL_FOLDER = "thumbnails"
UNDO_KEY = "ui.last_edit"


@dataclass
class Item:
    """One image as the gallery and editor show it."""

    record_id: str
    image: Path
    caption_file: Path
    caption: str | None  # the caption file's text (None: no file)
    stored_caption: str | None  # the store's caption result (the model's text)
    tags: str | None  # the store's tags result
    thumbnail: Path | None = None
    flagged: list[str] = dataclasses.field(default_factory=list)  # inspection findings about it


def _read(path: Path) -> str | None:
    """A sidecar's text as the sinks read it; an unreadable file raises (Review shows the error)."""
    text = read_sidecar(path)
    if text is UNREADABLE:
        return path.read_text(encoding="utf-8")  # raises the OSError that made it unreadable
    return text


def make_thumbnail(image: Path, target: Path, side: int = THUMBNAIL_SIDE) -> Path | None:
    """Write a small JPEG of ``image`` to ``target`` (decoded at a reduced scale where the format allows)."""
    try:
        from captionkit.core.images import DEFAULT_MAX_PIXELS, load_image

        picture = load_image(image, (255, 255, 255), (side, side), DEFAULT_MAX_PIXELS).image
        picture.thumbnail((side, side))
        with atomic_open(target, "wb", durable=False) as stream:
            picture.convert("RGB").save(stream, format="JPEG", quality=82)
    except Exception:  # an unreadable image gets no thumbnail; the page still shows its name and text
        return None
    return target


def _normal_tag(tag: str) -> str:
    return tag.strip().lower().replace("_", " ")


class Dataset:
    """An image folder or manifest, its caption files (one extension) and its store."""

    def __init__(self, path: str | Path, ext: str = ".txt", output_dir: str | Path | None = None,
                 recursive: bool = True, include_hidden: bool = False, image_column: str | None = None,
                 base_dir: str | Path | None = None) -> None:
        if not str(path).strip():
            raise CaptionkitError("Enter a folder of images (or a manifest) first.")
        self.path = Path(path).expanduser()
        source = open_source(self.path, recursive=recursive, image_column=image_column, base_dir=base_dir,
                             include_hidden=include_hidden)
        self.records: list[Record] = [record for record in source if record.path is not None]
        if not self.records:
            raise CaptionkitError(no_images_message(source))
        self.by_id = {record.id: record for record in self.records}
        self.ids = [record.id for record in self.records]
        self.location = output_location(source, output_dir)
        self.ext = ext if ext.startswith(".") else "." + ext
        self.output_dir = Path(output_dir).expanduser().resolve() if output_dir else None
        # Only its file-naming rule is used (no store): the same names `caption` writes.
        self._names = SidecarSink(store=None, step="caption", extension=self.ext, output_dir=self.output_dir)
        self._texts: dict[str, tuple[int, str | None]] = {}  # caption file → (mtime, text)
        self._sidecars: dict[str, tuple[str, str, str]] | None = None  # id → (folder, name, kept-extension name)
        self._stored: dict[str, tuple[tuple, dict[str, str]]] = {}
        self.thumbnail_root = self._thumbnail_root()
        self.flags: dict[str, list[str]] | None = None  # record id → inspection findings, once inspected

    # --- files ------------------------------------------------------------------------------------
    def caption_file(self, record: Record) -> Path:
        """The caption file a run writes for ``record`` (``a.png.txt`` where a collision made one)."""
        plain = self._names._target(record, keep_extension=False)
        kept = self._names._target(record, keep_extension=True)
        return kept if kept.is_file() and not plain.is_file() else plain

    def caption_text(self, record: Record) -> str | None:
        path = self.caption_file(record)
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            self._texts.pop(str(path), None)
            return None
        cached = self._texts.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        text = _read(path)
        self._texts[str(path)] = (stamp, text)
        return text

    def caption_texts(self, ids: list[str]) -> dict[str, str | None]:
        """Caption texts of many records: one directory scan per folder, files read only when they changed."""
        if self._sidecars is None:  # computed once: path arithmetic for 50,000 records costs a second
            self._sidecars = {}
            for record in self.records:
                plain = self._names._target(record, keep_extension=False)
                self._sidecars[record.id] = (str(plain.parent), plain.name, Path(record.path).name + self.ext)
        listings: dict[str, dict[str, int]] = {}
        texts: dict[str, str | None] = {}
        for record_id in ids:
            folder, plain, kept = self._sidecars[record_id]
            names = listings.get(folder)
            if names is None:
                names = listings[folder] = {}
                try:
                    with os.scandir(folder) as entries:
                        for entry in entries:
                            if entry.name.endswith(self.ext) and entry.is_file():
                                names[entry.name] = entry.stat().st_mtime_ns
                except OSError:
                    pass
            name = plain if plain in names or kept not in names else kept
            stamp = names.get(name)
            if stamp is None:
                texts[record_id] = None
                continue
            key = os.path.join(folder, name)
            cached = self._texts.get(key)
            if cached is None or cached[0] != stamp:
                cached = self._texts[key] = (stamp, _read(Path(key)))
            texts[record_id] = cached[1]
        return texts

    def existing_caption_files(self) -> list[Path]:
        """Caption files that are there now (what 'clean old captions first' deletes)."""
        found: list[Path] = []
        for record in self.records:
            for keep in (False, True):
                target = self._names._target(record, keep_extension=keep)
                if target.is_file() and target not in found:
                    found.append(target)
        return found

    # --- the store (read-only unless editing) ----------------------------------------------------
    @property
    def store_path(self) -> Path:
        return self.location / STORE_FOLDER / STORE_FILE

    def _store_stamp(self) -> tuple:
        stamps = []
        for suffix in ("", "-wal"):
            try:
                stamps.append(Path(str(self.store_path) + suffix).stat().st_mtime_ns)
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    def stored_texts(self, field: str, ids: list[str] | None = None) -> dict[str, str]:
        """The store's text per record for ``field`` (only ``ids`` when given; all, cached, otherwise)."""
        if not self.store_path.exists():
            return {}
        if ids is None:
            stamp = self._store_stamp()
            cached = self._stored.get(field)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        with Store(self.location) as store:
            if field not in store.steps():
                texts: dict[str, str] = {}
            else:
                wanted = self.ids if ids is None else ids
                texts = {record_id: result.text for record_id, result in store.get_many(field, wanted).items()
                         if result.status == "ok" and result.text is not None}
        if ids is None:
            self._stored[field] = (self._store_stamp(), texts)
        return texts

    # --- listing ----------------------------------------------------------------------------------
    def filter(self, text: str = "", tag: str = "", empty_only: bool = False, flagged_only: bool = False) -> list[str]:
        """Record ids matching every filter given, in folder order."""
        ids = self.ids
        if flagged_only:
            if self.flags is None:
                raise CaptionkitError("Run the inspection first (Inspection panel below): the flagged filter "
                                      "shows the images it found problems with.")
            ids = [record_id for record_id in ids if record_id in self.flags]
        text = text.strip().lower()
        tag = _normal_tag(tag) if tag.strip() else ""
        files = self.caption_texts(ids) if (empty_only or text or tag) else {}
        if empty_only:
            ids = [record_id for record_id in ids if not (files[record_id] or "").strip()]
        if text or tag:
            captions = self.stored_texts("caption")
            tags = self.stored_texts("tags")
            kept = []
            for record_id in ids:
                own = files[record_id] or ""
                if text and not any(text in value.lower() for value in
                                    (own, captions.get(record_id, ""), tags.get(record_id, ""), record_id)):
                    continue
                if tag:
                    parts = {_normal_tag(part) for value in (own, tags.get(record_id, "")) for part in value.split(",")}
                    if tag not in parts:
                        continue
                kept.append(record_id)
            ids = kept
        return list(ids)

    def page(self, ids: list[str], number: int, size: int, thumbnails: bool = True) -> list[Item]:
        """Page ``number`` (from 1) of ``ids``: texts, stored results and thumbnails for those only."""
        size = max(1, int(size))
        start = (max(1, int(number)) - 1) * size
        chosen = ids[start:start + size]
        return self.items(chosen, thumbnails)

    def items(self, ids: list[str], thumbnails: bool = True) -> list[Item]:
        captions = self.stored_texts("caption", ids)
        tags = self.stored_texts("tags", ids)
        records = [self.by_id[record_id] for record_id in ids]
        pictures: list[Path | None] = [None] * len(records)
        if thumbnails and records:
            with ThreadPoolExecutor(min(8, len(records))) as pool:
                pictures = list(pool.map(self.thumbnail, records))
        return [
            Item(record.id, record.path, self.caption_file(record), self.caption_text(record),
                 captions.get(record.id), tags.get(record.id), picture, list((self.flags or {}).get(record.id, [])))
            for record, picture in zip(records, pictures, strict=True)
        ]

    # --- thumbnails -------------------------------------------------------------------------------
    def _thumbnail_root(self) -> Path:
        """``.captionkit/thumbnails`` in the output location; a temp folder when that is read-only."""
        preferred = self.location / STORE_FOLDER / THUMBNAIL_FOLDER
        try:
            preferred.mkdir(parents=True, exist_ok=True)
            if os.access(preferred, os.W_OK):
                return preferred
        except OSError:
            pass
        digest = hashlib.blake2b(str(self.location).encode(), digest_size=8).hexdigest()
        fallback = Path(tempfile.gettempdir()) / "captionkit-thumbnails" / digest
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    def thumbnail(self, record: Record, side: int = THUMBNAIL_SIDE) -> Path | None:
        """A small JPEG of the image, made on first request and cached by path, size and modification time."""
        signature = file_signature(record.path)
        if signature is None:
            return None
        identity = f"{Path(record.path).resolve()}\0{signature}" + ("" if side == THUMBNAIL_SIDE else f"\0{side}")
        key = hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()
        target = self.thumbnail_root / key[:2] / f"{key}.jpg"
        if target.is_file():
            return target
        return make_thumbnail(Path(record.path), target, side)

    # --- editing ----------------------------------------------------------------------------------
    def save_caption(self, record_id: str, text: str) -> Path:
        """Write the caption file atomically as the user's text; the previous state is kept for :meth:`undo`."""
        record = self.by_id.get(record_id)
        if record is None:
            raise CaptionkitError(f"{record_id}: not in this data set (reload it).")
        target = self.caption_file(record)
        before = _read(target)
        with Store(self.location) as store:
            entry = store.get_outputs([str(target)]).get(str(target))
            atomic_write_text(target, text)
            if entry is not None:
                # Hashes cleared: the ledger no longer takes the file for captionkit's, so the default
                # --existing skip (and fill-empty) leave it alone, and append keeps it as the base text.
                store.put_outputs([OutputRecord(
                    output_path=str(target), step=entry.step, record_id=entry.record_id, base_exists=True,
                    base_text=text, pending_hash=None, written_hash=None,
                )])
            store.put_meta(UNDO_KEY, {
                "record_id": record_id, "file": str(target), "before": before, "after": text,
                "ledger": dataclasses.asdict(entry) if entry is not None else None, "time": time.time(),
            })
        self._texts.pop(str(target), None)
        return target

    def last_edit(self) -> dict[str, Any] | None:
        if not self.store_path.exists():
            return None
        with Store(self.location) as store:
            return store.get_meta(UNDO_KEY)

    def undo(self) -> str:
        """Put back the file (and ledger entry) as they were before the last edit; returns its record id."""
        edit = self.last_edit()
        if not edit:
            raise CaptionkitError("Nothing to undo: no caption was edited here since the last undo.")
        target = Path(edit["file"])
        if _read(target) != edit["after"]:
            raise CaptionkitError(f"{target.name} changed after the edit (another run or editor wrote it); "
                                  "not undone, to keep that change.")
        with Store(self.location) as store:
            if edit["before"] is None:
                target.unlink(missing_ok=True)
            else:
                atomic_write_text(target, edit["before"])
            if edit["ledger"] is not None:
                store.put_outputs([OutputRecord(**edit["ledger"])])
            store.put_meta(UNDO_KEY, None)
        self._texts.pop(str(target), None)
        return str(edit["record_id"])

    # --- inspection -------------------------------------------------------------------------------
    def set_findings(self, findings) -> int:
        """Remember which images an inspection flagged (``Finding`` objects); returns how many."""
        by_path = {str(Path(record.path).resolve()): record.id for record in self.records}
        flags: dict[str, list[str]] = {}
        for finding in findings:
            names = [finding.file, *getattr(finding, "files", [])]
            for name in names:
                record_id = name if name in self.by_id else None
                if record_id is None and getattr(finding, "path", None) and name == finding.file:
                    record_id = by_path.get(str(Path(finding.path).resolve()))
                if record_id is not None:
                    flags.setdefault(record_id, []).append(f"{finding.kind}: {finding.message}")
        self.flags = flags
        return len(flags)
