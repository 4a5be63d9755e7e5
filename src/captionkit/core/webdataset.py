"""WebDataset shards in and out: ``.tar`` shards of samples (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) as records.

A sample's image is not unpacked: its record points at the member inside the shard
(:class:`ShardMember`: shard, member name, byte offset and size), and the decode step reads
exactly those bytes, wherever it runs (a Ray decode task reads them itself, never through the
driver). A record's id is ``<shard file name>/<key>``, so the store keys results by shard and
key and a rerun does only what is not stored. ``.txt`` members become the field ``txt`` and a
``.json`` object's keys become fields (an img2dataset ``caption``, ``url``, ...).

Output: each input shard becomes a new shard of the same name in ``--output-dir`` with the
same keys, every original member, and one member per step, ``KEY.<step>.txt`` (``caption.txt``,
``tags.txt``), as a training loader reads a WebDataset (the shard is complete on its own; the
input shards are never changed). A sample whose step failed (a corrupt image) is left out
of the output shard and named in the run's errors. A finished output shard is not rewritten.
Key grouping, brace patterns and shard writing are the ``webdataset`` library's own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from captionkit.core.errors import ImageLoadError, SourceError, require
from captionkit.core.records import Record, Source, image_extensions

log = logging.getLogger(__name__)
SHARD_SUFFIX = ".tar"
_RE_DOWNLOAD = "Re-download or rewrite the shard (e.g. with img2dataset or webdataset.ShardWriter)."
_META_PREFIX = "webdataset_output:"


def is_shard_pattern(path: str | Path) -> bool:
    """True for a ``.tar`` shard or a brace pattern of them (``shard-{00000..00099}.tar``)."""
    return str(path).lower().endswith(SHARD_SUFFIX)


def expand_shards(pattern: str | Path) -> list[Shard]:
    """The shards a brace pattern names, in order (``braceexpand``, as the webdataset library reads them).

    Local shards are :class:`~pathlib.Path` objects; shards in object storage stay URL strings.
    """
    require("webdataset", "reading WebDataset shards", extra="webdataset")
    from braceexpand import braceexpand

    return [item if is_url(item) else _local(item) for item in braceexpand(str(pattern))]


# ----------------------------------------------------------------------------- where shards are read
# A shard is a local path or a URL read through fsspec (s3://, gs://, ... and memory:// in tests). Only
# these four functions touch the bytes; with core.locations (object storage) they become its
# filesystem() and with_retries(), so shards get its credentials, retries and 403/404 errors.
Shard = Path | str
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(shard: Shard) -> bool:
    """True for a shard in object storage (``file://`` is a local path)."""
    match = _URL.match(str(shard)) if isinstance(shard, str) else None
    return match is not None and match.group(1).lower() != "file"


def _local(text: str) -> Path:
    return Path(os.path.expanduser(text.removeprefix("file://")))


def _filesystem(url: str) -> tuple[Any, str]:
    fsspec = require("fsspec", "reading shards from object storage", extra="webdataset")
    return fsspec.core.url_to_fs(url)


def _open(shard: Shard) -> IO[bytes]:
    """The shard as a seekable binary file (an fsspec file reads byte ranges on demand)."""
    if is_url(shard):
        fs, path = _filesystem(str(shard))
        return fs.open(path, "rb")
    return open(shard, "rb")


def _info(shard: Shard) -> tuple[int, str] | None:
    """(size, signature) of a shard: size and mtime locally, size and ETag/mtime in object storage; None: missing."""
    if is_url(shard):
        fs, path = _filesystem(str(shard))
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        tag = next((info[name] for name in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(name)), "")
        return int(info["size"]), f"{info['size']}:{str(tag or '').strip(chr(34))}"
    try:
        stat = Path(shard).stat()
    except OSError:
        return None
    return stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}"


def shard_name(shard: Shard) -> str:
    return PurePosixPath(str(shard)).name


@dataclass(frozen=True)
class ShardMember:
    """Where one image's bytes come from: a member of a tar shard, read by offset without unpacking the shard."""

    shard: str
    key: str
    member: str
    offset: int
    size: int
    shard_signature: str | None = None

    decode_fix = ("Rewrite that sample in the shard or re-download the shard; the other samples are not "
                  "affected.")

    @property
    def name(self) -> str:
        return self.member

    @property
    def suffix(self) -> str:
        return Path(self.member).suffix

    def __str__(self) -> str:
        return f"{self.shard}: key {self.key}, member {self.member}"

    def signature(self) -> str | None:
        """The shard's size and mtime plus where the member lies: evidence the image did not change."""
        if self.shard_signature is None:
            return None
        return f"{self.shard_signature}@{self.offset}+{self.size}"

    def read_bytes(self) -> bytes:
        """The member's bytes, or :class:`ImageLoadError` naming shard, key, member, cause and fix."""
        try:
            with _open(self.shard) as stream:
                stream.seek(self.offset)
                data = stream.read(self.size)
        except OSError as error:
            raise ImageLoadError(str(self), f"cannot read the shard ({error.strerror or error})",
                                 "Check that the shard exists and is readable.") from error
        if len(data) < self.size:
            raise ImageLoadError(str(self), f"the shard is truncated: this member needs {self.size} bytes, "
                                 f"{len(data)} are there", _RE_DOWNLOAD)
        return data


@dataclass
class ShardListing:
    """One shard as listed: its samples' records (in shard order) and what was wrong with it."""

    shard: Shard
    records: list[Record]
    warnings: list[str] = field(default_factory=list)


def _members(path: Shard, warnings: list[str]) -> list[tarfile.TarInfo]:
    """The shard's file members in order; a truncated shard gives those before the cut, with a warning."""
    members: list[tarfile.TarInfo] = []
    info = _info(path)
    if info is None:
        raise FileNotFoundError(f"no such shard: {path}")
    size = info[0]
    try:
        with _open(path) as stream, tarfile.open(fileobj=stream, mode="r:") as archive:
            while True:
                member = archive.next()
                if member is None:
                    break
                if member.isfile():
                    members.append(member)
    except (tarfile.TarError, EOFError, OSError) as error:
        warnings.append(f"{path}: truncated or corrupt after {len(members)} members ({error}); the samples "
                        f"before that are used, later ones are lost. {_RE_DOWNLOAD}")
        return members
    end = 0
    if members:
        last = members[-1]
        end = last.offset_data + ((last.size + 511) // 512) * 512
    if end > size or (members and size - end < 1024):  # no end-of-archive marker: cut off
        warnings.append(f"{path}: truncated (it ends at byte {size} without the end-of-archive marker); samples "
                        f"after key {_key_of(members[-1].name) if members else '(none)'} are lost and an incomplete "
                        f"last member fails on its own. {_RE_DOWNLOAD}")
    return members


def _key_of(name: str) -> str:
    from webdataset.tariterators import base_plus_ext

    key, _ = base_plus_ext(name)
    return key or name


def list_shard(path: Shard) -> ShardListing:
    """Records of one shard: one per key with an image member, its ``.txt``/``.json`` members as fields.

    Runs wherever the shard is listed (a Ray task for many shards); reads only headers and
    the small text members.
    """
    require("webdataset", "reading WebDataset shards", extra="webdataset")
    from webdataset.tariterators import base_plus_ext

    listing = ShardListing(path, [])
    try:
        members = _members(path, listing.warnings)
    except OSError as error:
        listing.warnings.append(f"{path}: cannot read shard ({error.strerror or error}); skipped.")
        return listing
    images = {ext.lstrip(".") for ext in image_extensions()}
    info = _info(path)
    signature = info[1] if info is not None else None
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        key, extension = base_plus_ext(member.name)
        if key is None or key.startswith("__") or not extension:
            continue
        samples.setdefault(key, {}).setdefault(extension, member)
    with _open(path) as stream:
        for key, parts in samples.items():
            image = next((ext for ext in parts if ext.lower() in images), None)
            if image is None:
                listing.warnings.append(f"{path}: key {key} has no image member (members: {', '.join(parts)}); "
                                        "skipped.")
                continue
            fields = _fields(stream, path, key, parts, listing.warnings)
            member = parts[image]
            location = ShardMember(str(path), key, member.name, member.offset_data, member.size, signature)
            listing.records.append(Record(id=f"{shard_name(path)}/{key}", path=location, fields=fields))  # type: ignore[arg-type]
    return listing


def _fields(stream: Any, path: Shard, key: str, parts: dict[str, tarfile.TarInfo],
            warnings: list[str]) -> dict[str, Any]:
    """``txt`` (and ``*.txt``) members as text fields, a ``json`` object's keys as fields; a bad one is named."""
    fields: dict[str, Any] = {}
    for extension, member in parts.items():
        kind = extension.lower().rsplit(".", 1)[-1]
        if kind not in ("txt", "json"):
            continue
        stream.seek(member.offset_data)
        data = stream.read(member.size)
        where = f"{path}: key {key}, member {member.name}"
        if len(data) < member.size:
            warnings.append(f"{where}: truncated; its fields are left out. {_RE_DOWNLOAD}")
            continue
        try:
            text = data.decode("utf-8")
            if kind == "txt":
                fields[extension] = text
                continue
            value = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            warnings.append(f"{where}: not valid {'UTF-8 text' if kind == 'txt' else 'JSON'} ({error}); its "
                            "fields are left out. Fix or rewrite that member.")
            continue
        if isinstance(value, dict):
            for name, item in value.items():
                fields.setdefault(str(name), item)
        else:
            fields[extension] = value
    return fields


@dataclass
class WebDatasetSource(Source):
    """Samples of one or more ``.tar`` shards (a brace pattern), in shard order then key order."""

    shards: list[Shard] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        for shard in self.shards:
            listing = list_shard(shard)
            for message in listing.warnings:
                log.warning("%s", message)
            yield from listing.records


def open_shards(pattern: str | Path) -> WebDatasetSource:
    """A source for a shard or a brace pattern; every shard must exist and shard names must be unique."""
    shards = expand_shards(pattern)
    missing = [str(shard) for shard in shards if _info(shard) is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SourceError(f"{pattern}: {len(missing)} of {len(shards)} shard(s) not found ({shown}). "
                          "Check the path and the brace range.")
    names = [shard_name(shard) for shard in shards]
    if len(set(names)) != len(names):
        raise SourceError(f"{pattern}: two shards share a file name; record ids are <shard name>/<key>, so shard "
                          "names must be unique.")
    local = [shard.resolve() for shard in shards if isinstance(shard, Path)]
    # ids are relative to no folder (<shard name>/<key>); root is where results go without --output-dir (refused)
    root = Path(os.path.commonpath([str(shard.parent) for shard in local])) if local else Path.cwd()
    return WebDatasetSource(root=root, description=str(pattern),
                            shards=[shard.resolve() if isinstance(shard, Path) else shard for shard in shards])


# ------------------------------------------------------------------------------------------- output
@dataclass
class ShardReport:
    """What writing the output shards did."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # finished before, same content: not rewritten
    pending: list[str] = field(default_factory=list)  # some samples have no result yet (an interrupted run)
    left_out: dict[str, str] = field(default_factory=dict)  # record id → why it is not in its output shard


def write_output_shards(store: Any, records: list[Record], output_dir: str | Path) -> ShardReport:
    """Each input shard whose samples all have results → ``output_dir/<shard name>``: originals + ``KEY.<step>.txt``.

    Every step stored for those samples adds its member, so tagging and then captioning into
    the same ``--output-dir`` gives shards with both. A shard already written with the same
    content is left alone; each is written to a temporary file and renamed.
    """
    require("webdataset", "writing WebDataset shards", extra="webdataset")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    by_shard: dict[str, list[Record]] = {}
    for record in records:
        location = record.path
        if isinstance(location, ShardMember):
            by_shard.setdefault(location.shard, []).append(record)
    steps = store.steps()
    report = ShardReport()
    for shard, members in by_shard.items():
        ids = [record.id for record in members]
        results = {step: store.get_many(step, ids) for step in steps}
        if any(record.id not in stored for stored in results.values() for record in members):
            report.pending.append(shard)
            continue
        texts: dict[str, dict[str, str]] = {}
        for record in members:
            for step, stored in results.items():
                result = stored[record.id]
                if result.status != "ok" or result.text is None:
                    report.left_out[record.id] = result.error or f"the {step} step failed"
                else:
                    texts.setdefault(record.id, {})[step] = result.text
        kept = [record for record in members if record.id not in report.left_out]
        digest = hashlib.sha256(json.dumps(
            [members[0].path.shard_signature, [(record.id, texts[record.id]) for record in kept]],  # type: ignore[union-attr]
            sort_keys=True).encode("utf-8")).hexdigest()
        target = output / shard_name(shard)
        meta_key = _META_PREFIX + target.name
        if target.exists() and store.get_meta(meta_key) == digest:
            report.unchanged.append(str(target))
            continue
        _write_shard(shard, target, kept, texts, report)
        store.put_meta(meta_key, digest)
        report.written.append(str(target))
    return report


@dataclass
class _Placed:
    collisions: dict = field(default_factory=dict)  # shards have no file-name collisions (SidecarSink's shape)


class ShardSink:
    """The executors' sink for WebDataset input: an output shard is written as soon as all its samples have results.

    Executors call it as they call :class:`captionkit.core.sinks.SidecarSink` (``plan``,
    ``wants_model``, ``write`` after each committed batch), so a long run's shards appear while it
    runs and a killed run leaves its finished shards in place; :meth:`finish` writes those whose
    last samples failed. Only the driver writes (the executors' one writer thread).
    """

    def __init__(self, store: Any, output_dir: str | Path) -> None:
        self.store = store
        self.output_dir = Path(output_dir)
        self.write_errors: dict[str, str] = {}
        self.report = ShardReport()
        self._shard_of: dict[str, str] = {}
        self._records: dict[str, list[Record]] = {}

    def plan(self, records: list[Record]) -> _Placed:
        for record in records:
            if isinstance(record.path, ShardMember):
                self._shard_of[record.id] = record.path.shard
                self._records.setdefault(record.path.shard, []).append(record)
        return _Placed()

    def wants_model(self, record_ids: list[str]) -> dict[str, str]:
        return {}  # no existing-caption policy: the output shards are captionkit's own

    def write(self, texts: dict[str, str]) -> int:
        """After a batch is stored: write the shards of these samples that are now complete; returns how many."""
        shards = dict.fromkeys(self._shard_of[record_id] for record_id in texts if record_id in self._shard_of)
        return self._write([record for shard in shards for record in self._records[shard]])

    def finish(self) -> ShardReport:
        """At the end of a run: every complete shard not written yet (its last samples failed, say)."""
        self._write([record for records in self._records.values() for record in records])
        return self.report

    def _write(self, records: list[Record]) -> int:
        if not records:
            return 0
        report = write_output_shards(self.store, records, self.output_dir)
        self.report.written.extend(report.written)
        self.report.left_out.update(report.left_out)
        self.report.unchanged = report.unchanged
        self.report.pending = report.pending
        return len(report.written)


def _write_shard(source: Shard, target: Path, kept: list[Record], texts: dict[str, dict[str, str]],
                 report: ShardReport) -> None:
    """Copy the kept samples' original members and add one ``<step>.txt`` member each, through ``TarWriter``."""
    import webdataset
    from webdataset.tariterators import base_plus_ext

    from captionkit.core.atomic import atomic_open

    wanted = {record.path.key: record for record in kept}  # type: ignore[union-attr]
    parts: dict[str, dict[str, bytes]] = {}
    warnings: list[str] = []
    members = _members(source, warnings)
    with _open(source) as stream:
        for member in members:
            key, extension = base_plus_ext(member.name)
            if key not in wanted or not extension:
                continue
            stream.seek(member.offset_data)
            data = stream.read(member.size)
            if len(data) < member.size:  # a truncated side member: the sample goes without it
                continue
            parts.setdefault(key, {}).setdefault(extension, data)
    with atomic_open(target, "wb") as handle:
        writer = webdataset.TarWriter(handle, encoder=False)
        for key, record in wanted.items():
            sample: dict[str, Any] = {"__key__": key, **parts.get(key, {})}
            for step, text in texts[record.id].items():
                sample[f"{step}.txt"] = text.encode("utf-8")
            writer.write(sample)
        writer.close()
