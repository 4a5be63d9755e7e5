"""Records and the sources that produce them (folder, single image, manifests).

A record's id is stable across runs and machines: the image path relative to the
source root, in POSIX form. The store keys everything on it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from captionkit.core import locations
from captionkit.core.errors import SourceError

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet"}
_IMAGE_COLUMN_GUESSES = ("image", "file_name", "path", "image_path", "file", "filename", "img")


@dataclass
class Record:
    """One image plus named fields written by steps (``caption``, ``tags``) or given by a manifest.

    ``path`` is None for a text-only record (a prompt to generate an image from, in a pipeline) and
    for a remote image, whose URL (``s3://bucket/key.jpg``) is ``url`` (see ``core.locations``).
    """

    id: str
    path: Path | None
    fields: dict[str, Any] = field(default_factory=dict)
    url: str | None = None
    # a remote image's bytes, fetched ahead by the executor (``--io-workers`` at a time); never stored
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def location(self) -> str | None:
        """Where the image's bytes are: the URL of a remote image, the local path, or None (text-only)."""
        return self.url if self.url is not None else (str(self.path) if self.path is not None else None)

    @property
    def image_source(self) -> Any:
        """What ``load_image`` reads: the URL, the local path, or a shard member that reads its own bytes."""
        return self.url if self.url is not None else self.path

    @property
    def has_image(self) -> bool:
        return self.path is not None or self.url is not None


def image_extensions() -> frozenset[str]:
    """Extensions of every format Pillow can open (jpg, png, webp, bmp, gif, tiff, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


@dataclass
class Source:
    """Where records come from. ``root`` is what record ids are relative to (a URL prefix for remote sources)."""

    root: Path | str
    description: str

    @property
    def remote(self) -> bool:
        """True when the source itself is an object-store URL (then results need an --output-dir)."""
        return isinstance(self.root, str)

    def __iter__(self) -> Iterator[Record]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class FolderSource(Source):
    """Every image under a folder; recursive by default, hidden entries skipped, symlink loops cut."""

    recursive: bool = True
    include_hidden: bool = False
    extensions: frozenset[str] | None = None

    def __iter__(self) -> Iterator[Record]:
        extensions = self.extensions or image_extensions()
        for listing in self.listings(self.root, extensions, set()):
            yield from listing.records

    def listings(self, folder: Path, extensions: frozenset[str], visited: set[tuple[int, int]],
                 warn: Callable[[str], None] | None = None) -> Iterator[FolderListing]:
        """Each folder's images, in walk order (pre-order, names sorted); ``warn`` receives what was skipped."""
        warn = warn or _log_warning
        listing = self.list_folder(folder, extensions, visited, warn)
        if listing is None:
            return
        yield listing
        if self.recursive:
            for subfolder in listing.subfolders:
                yield from self.listings(subfolder, extensions, visited, warn)

    def list_folder(self, folder: Path, extensions: frozenset[str], visited: set[tuple[int, int]],
                    warn: Callable[[str], None]) -> FolderListing | None:
        """One folder's images and subfolders; None when it cannot be read or was visited (a symlink loop)."""
        try:
            info = folder.stat()
        except OSError as error:
            warn(f"{folder}: cannot read folder ({error.strerror or error}); skipped.")
            return None
        key = (info.st_dev, info.st_ino)
        if key in visited:
            warn(f"{folder}: symlink loop (folder already visited); skipped.")
            return None
        visited.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            warn(f"{folder}: cannot list folder ({error.strerror or error}); skipped.")
            return FolderListing(folder, key, [], [])
        records: list[Record] = []
        subfolders: list[Path] = []
        for entry in entries:
            if entry.name.startswith(".") and not self.include_hidden:
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; loops are cut by ``visited``
                is_file = entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                subfolders.append(Path(entry.path))
            elif is_file or entry.is_symlink():
                path = Path(entry.path)
                if path.suffix.lower() in extensions:
                    records.append(Record(id=path.relative_to(self.root).as_posix(), path=path))
        return FolderListing(folder, key, records, subfolders)


@dataclass
class FolderListing:
    """One folder as a walk sees it: its key (device, inode), its images and its subfolders."""

    folder: Path
    key: tuple[int, int]
    records: list[Record]
    subfolders: list[Path]


def _log_warning(message: str) -> None:
    log.warning("%s", message)


@dataclass
class SingleImageSource(Source):
    """One image file; its folder is the root."""

    image: Path | str = Path()

    def __iter__(self) -> Iterator[Record]:
        if isinstance(self.image, str):  # a URL
            yield Record(id=PurePosixPath(self.image).name, path=None, url=self.image)
        else:
            yield Record(id=self.image.name, path=self.image)


@dataclass
class RemoteFolderSource(Source):
    """Every image under an object-store prefix (``s3://bucket/photos/``); ids are keys relative to it.

    ``signatures`` (URL → ETag/size/mtime) come with the listing, so resuming needs no request per object.
    """

    recursive: bool = True
    extensions: frozenset[str] | None = None
    signatures: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Record]:
        assert isinstance(self.root, str)
        for found in locations.list_objects(self.root, self.extensions or image_extensions(),
                                            recursive=self.recursive):
            self.signatures[found.url] = found.signature
            yield Record(id=locations.relative_key(found.url, self.root), path=None, url=found.url)


@dataclass
class ManifestSource(Source):
    """Rows of a jsonl/json/csv/tsv/parquet file; one column names the image, others become fields."""

    manifest: Path | str = Path()  # a URL string for a manifest in object storage
    image_column: str | None = None
    base_dir: Path | str | None = None
    text_only: bool = False  # rows without images: ids from an `id` column or the row number
    video_column: str | None = None  # Dataflow-Gen's video_key: rows with a video and no image are skipped

    @property
    def suffix(self) -> str:
        return PurePosixPath(str(self.manifest)).suffix.lower()

    def _text(self, raw: bytes) -> str:
        return raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark (Excel writes one)

    def _rows(self) -> list[dict[str, Any]]:
        suffix = self.suffix
        if suffix not in MANIFEST_SUFFIXES:
            raise SourceError(f"{self.manifest}: unknown manifest type; use one of {sorted(MANIFEST_SUFFIXES)}.")
        try:
            raw = locations.read_bytes(self.manifest)
            if suffix == ".jsonl":
                rows = []
                for number, line in enumerate(self._text(raw).splitlines(), 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as error:
                            raise SourceError(
                                f"{self.manifest}:{number}: not valid JSON ({error.msg}). "
                                "Fix that line: each line must be one JSON object."
                            ) from error
                return rows
            if suffix == ".json":
                data = json.loads(self._text(raw))
                if isinstance(data, dict):
                    data = next((value for value in data.values() if isinstance(value, list)), None)
                if not isinstance(data, list):
                    raise SourceError(
                        f"{self.manifest}: expected a list of objects (or an object holding one). "
                        "Write the manifest as [{\"image\": ...}, ...]."
                    )
                return data
            if suffix in (".csv", ".tsv"):
                stream = io.StringIO(self._text(raw), newline="")
                return list(csv.DictReader(stream, delimiter="\t" if suffix == ".tsv" else ","))
            import pyarrow.parquet as parquet

            return parquet.read_table(io.BytesIO(raw)).to_pylist()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SourceError(f"{self.manifest}: cannot read manifest ({error}).") from error

    def __iter__(self) -> Iterator[Record]:
        rows = self._rows()
        if not rows:
            return
        if self.text_only:
            yield from self._text_records(rows)
            return
        # With videos mixed in, the first row may be a video's: look at every row's columns.
        columns = list(dict.fromkeys(key for row in rows for key in row)) if self.video_column else list(rows[0])
        column = self.choose_image_column(columns)
        base = self.base_dir or (locations.parent(self.manifest) if isinstance(self.manifest, str)
                                 else self.manifest.parent)
        if self.video_column:
            videos = [row for row in rows if row.get(self.video_column) and not row.get(column)]
            if videos:  # one warning for all of them: a video data set would otherwise print one per row
                log.warning("%s: %d row(s) with a video ('%s') and no image skipped; captionkit reads images only.",
                            self.manifest, len(videos), self.video_column)
                rows = [row for row in rows if not (row.get(self.video_column) and not row.get(column))]
        yield from self.unique_records(row_record(row, column, base, self.root) for row in rows)

    def choose_image_column(self, columns: list[str]) -> str:
        """``--image-column``, or the first usual name among the manifest's columns (also kept on the source)."""
        column = self.image_column
        if column is None:
            column = next((name for name in _IMAGE_COLUMN_GUESSES if name in columns), None)
            if column is None:
                raise SourceError(
                    f"{self.manifest}: no image column found (looked for {', '.join(_IMAGE_COLUMN_GUESSES)}; "
                    f"columns are {', '.join(map(str, columns))}). Pass --image-column NAME."
                )
        elif column not in columns:
            raise SourceError(
                f"{self.manifest}: column '{column}' not found; columns are {', '.join(map(str, columns))}."
            )
        self.image_column_used = column
        return column

    def unique_records(self, records: Iterable[Record | None]) -> Iterator[Record]:
        """Rows' records in order, without rows that have no image or repeat one (each named in a warning)."""
        seen: set[str] = set()
        for number, record in enumerate(records, 1):
            if record is None:
                log.warning("%s: row %d has no value in column '%s'; skipped.", self.manifest, number,
                            self.image_column_used)
                continue
            if record.id in seen:
                log.warning("%s: row %d repeats image %s; skipped.", self.manifest, number, record.id)
                continue
            seen.add(record.id)
            yield record

    def _text_records(self, rows: list[dict[str, Any]]) -> Iterator[Record]:
        width = len(str(len(rows)))
        seen: set[str] = set()
        for number, row in enumerate(rows, 1):
            record_id = str(row["id"]) if row.get("id") not in (None, "") else f"row-{number:0{width}d}"
            if record_id in seen:
                raise SourceError(f"{self.manifest}: row {number} repeats id '{record_id}'; ids must be unique.")
            seen.add(record_id)
            yield Record(id=record_id, path=None, fields=dict(row))


def row_record(row: dict[str, Any], column: str, base: Path | str, root: Path | str) -> Record | None:
    """One manifest row's record (its image resolved against ``base``, its id relative to ``root``); None: no image.

    A URL value (``s3://bucket/a.jpg``) or a relative value under a URL ``base`` makes a remote record;
    its id is the key relative to a URL ``root``, else the URL without its scheme (``bucket/a.jpg``).
    """
    value = row.get(column)
    if not value:
        return None
    fields = {key: item for key, item in row.items() if key != column}
    text = str(value)
    if locations.is_url(text) or (isinstance(base, str) and not locations.scheme(text)
                                  and not Path(text).is_absolute()):
        url = text if locations.is_url(text) else locations.join(str(base), text)
        record_id = locations.relative_key(url, root) if isinstance(root, str) else url.split("://", 1)[1]
        return Record(id=record_id, path=None, fields=fields, url=url)
    path = locations.local_path(text)
    if not path.is_absolute():
        path = Path(base) / path
    try:
        record_id = path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        record_id = path.resolve().as_posix()
    return Record(id=record_id, path=path, fields=fields)


def open_source(
    path: str | Path,
    recursive: bool = True,
    image_column: str | None = None,
    base_dir: str | Path | None = None,
    include_hidden: bool = False,
    text_only: bool = False,
) -> Source:
    """A source for a folder, one image, a manifest file, or WebDataset shards (``.tar``, ``.tar.gz``; brace patterns).

    ``path`` may be an object-store URL (``s3://bucket/prefix/``, ``gs://...``, ``hf://...``: a prefix,
    one image or a manifest); ``file://`` URLs are local paths. Credentials: see ``core.locations``.
    ``text_only``: a manifest whose rows have no image (prompts for image generation).
    """
    from captionkit.core.webdataset import is_shard_pattern, open_shards

    if is_shard_pattern(path):  # WebDataset shards (.tar, .tar.gz, .tgz), a brace pattern included
        return open_shards(path)
    if locations.is_url(str(path)):
        return _open_remote_source(str(path), recursive, image_column, base_dir, text_only)
    path = locations.local_path(path)
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder. Check the path.")
    if path.is_dir():
        root = path.resolve()
        return FolderSource(root=root, description=str(path), recursive=recursive, include_hidden=include_hidden)
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        base = Path(base_dir).expanduser().resolve() if base_dir else path.resolve().parent
        return ManifestSource(
            root=base, description=str(path), manifest=path, image_column=image_column, base_dir=base,
            text_only=text_only,
        )
    return SingleImageSource(root=path.resolve().parent, description=str(path), image=path.resolve())


def no_images_message(source: Source) -> str:
    """Why a source gave no records, with what was looked for."""
    if isinstance(source, FolderSource):
        extensions = set(source.extensions or image_extensions())
        common = [ext for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")
                  if ext in extensions]
        rest = len(extensions) - len(common)
        shown = ", ".join(common) + (f" and {rest} more formats Pillow reads" if rest else "")
        hidden = ("hidden files and folders (names starting with '.') were skipped; --include-hidden takes them"
                  if not source.include_hidden else "hidden files were included")
        depth = "sub-folders included" if source.recursive else "sub-folders not searched (--recursive to search)"
        return f"{source.root}: no images found (looked for {shown}; {depth}; {hidden})."
    if isinstance(source, ManifestSource):
        return f"{source.manifest}: the manifest has no rows."
    return f"{source.description}: no images found."


def _open_remote_source(url: str, recursive: bool, image_column: str | None, base_dir: str | Path | None,
                        text_only: bool) -> Source:
    """The source for an object-store URL: a prefix (every image under it), a manifest object or one image."""
    try:
        found = locations.kind(url)
    except locations.RemoteError as error:
        raise SourceError(str(error)) from error
    if found == "directory":
        prefix = url.rstrip("/")
        return RemoteFolderSource(root=prefix, description=url, recursive=recursive)
    if PurePosixPath(url).suffix.lower() in MANIFEST_SUFFIXES:
        base: Path | str = str(base_dir) if base_dir and locations.is_url(str(base_dir)) else \
            (Path(base_dir).expanduser().resolve() if base_dir else locations.parent(url))
        return ManifestSource(root=base, description=url, manifest=url, image_column=image_column, base_dir=base,
                              text_only=text_only)
    return SingleImageSource(root=locations.parent(url), description=url, image=url)
