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

import atexit
import hashlib
import json
import logging
import os
import tarfile
import tempfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from captionkit.core import locations
from captionkit.core.errors import ImageLoadError, SourceError, require
from captionkit.core.records import Record, Source, image_extensions

log = logging.getLogger(__name__)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")
_RE_DOWNLOAD = "Re-download or rewrite the shard (e.g. with img2dataset or webdataset.ShardWriter)."
_META_PREFIX = "webdataset_output:"


def is_shard_pattern(path: str | Path) -> bool:
    """True for a ``.tar`` (``.tar.gz``, ``.tgz``) shard or a brace pattern of them (``shard-{00000..00099}.tar``)."""
    return str(path).lower().endswith(SHARD_SUFFIXES)


def is_compressed(shard: Shard) -> bool:
    """A gzip-compressed shard (``.tar.gz``, ``.tgz``): no byte offsets into it; it is unpacked once per process."""
    return str(shard).lower().endswith(COMPRESSED_SUFFIXES)


def expand_shards(pattern: str | Path) -> list[Shard]:
    """The shards a brace pattern names, in order (``braceexpand``, as the webdataset library reads them).

    Local shards are :class:`~pathlib.Path` objects; shards in object storage stay URL strings.
    """
    require("webdataset", "reading WebDataset shards", extra="webdataset")
    from braceexpand import braceexpand

    return [item if is_url(item) else locations.local_path(item) for item in braceexpand(str(pattern))]


# ----------------------------------------------------------------------------- where shards are read
# A shard is a local path or a URL read through core.locations (s3://, gs://, ... with the run's
# --storage-options, retries on 5xx/timeouts, one clear error for 403/404). Only the functions below
# touch shard bytes. A compressed shard is unpacked once into a local temporary file (per process, the
# last UNPACKED_KEPT of them), and members are read from there by offset.
Shard = Path | str
UNPACKED_KEPT = 2
_unpacked: OrderedDict[tuple[str, str | None], tuple[Path, str | None]] = OrderedDict()
_unpack_lock = threading.Lock()


def is_url(shard: Shard) -> bool:
    """True for a shard in object storage (``file://`` is a local path)."""
    return isinstance(shard, str) and locations.is_url(shard)


def _missing(error: locations.RemoteError) -> bool:
    return "(404)" in str(error)


def _info(shard: Shard) -> tuple[int, str] | None:
    """(size, signature) of a shard: size and mtime locally, ETag/size/mtime in object storage; None: missing.

    A refused request (403) raises its one clear :class:`~captionkit.core.locations.RemoteError`.
    """
    if is_url(shard):
        url = str(shard)
        fs, path = locations.filesystem(url)
        try:
            info = locations.with_retries(url, lambda: fs.info(path))
        except locations.RemoteError as error:
            if _missing(error):
                return None
            raise
        return int(info["size"]), locations.object_signature(info)
    try:
        stat = Path(shard).stat()
    except OSError:
        return None
    return stat.st_size, f"{stat.st_size}:{stat.st_mtime_ns}"


def _open_plain(shard: Shard) -> IO[bytes]:
    """An uncompressed shard as a seekable binary file (a remote one reads byte ranges on demand)."""
    if is_url(shard):
        fs, path = locations.filesystem(str(shard))
        return locations.with_retries(str(shard), lambda: fs.open(path, "rb"))
    return open(shard, "rb")


def _unpack(shard: Shard) -> tuple[Path, str | None]:
    """Decompress a ``.tar.gz`` shard into a temporary file; a cut-off stream keeps what came before it."""
    folder = Path(tempfile.gettempdir()) / "captionkit-shards"
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(suffix=".tar", dir=folder)
    os.close(descriptor)
    target = Path(name)
    warning: list[str] = []

    def copy() -> None:
        warning.clear()
        # zlib rather than GzipFile: everything decodable before a cut is kept (GzipFile drops its last read)
        with open(target, "wb") as output, _open_plain(shard) as raw:
            decompressor = zlib.decompressobj(wbits=31)
            try:
                while chunk := raw.read(1 << 20):
                    while chunk:
                        output.write(decompressor.decompress(chunk))
                        chunk = b""
                        if decompressor.eof and decompressor.unused_data:  # a multi-member gzip file
                            chunk = decompressor.unused_data
                            decompressor = zlib.decompressobj(wbits=31)
                output.write(decompressor.flush())
                if not decompressor.eof:
                    raise EOFError("the file ends before the end-of-stream marker")
            except (EOFError, zlib.error) as error:
                warning.append(f"{shard}: the compressed stream is cut off or corrupt after {output.tell()} "
                               f"unpacked bytes ({error}); the samples before that are used. {_RE_DOWNLOAD}")
    try:
        if is_url(shard):
            locations.with_retries(str(shard), copy)
        else:
            copy()
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target, (warning[0] if warning else None)


def _unpacked_copy(shard: Shard, signature: str | None) -> tuple[Path, str | None]:
    """The local unpacked copy of a compressed shard (made once per process and shard version)."""
    key = (str(shard), signature)
    with _unpack_lock:
        if key in _unpacked and _unpacked[key][0].exists():
            _unpacked.move_to_end(key)
            return _unpacked[key]
        _unpacked[key] = _unpack(shard)
        while len(_unpacked) > UNPACKED_KEPT:
            _unpacked.popitem(last=False)[1][0].unlink(missing_ok=True)
        return _unpacked[key]


# Remote members are read in aligned blocks (one ranged GET each, retried), kept per process: samples lie one
# after the other, so the decode threads (or a Ray decode task's block of records) read a block once for all
# the images in it, not one request per image. BLOCKS_KEPT x BLOCK_BYTES bounds the memory.
BLOCK_BYTES = 8 << 20
BLOCKS_KEPT = 8
_blocks: OrderedDict[tuple[str, str | None, int], Future] = OrderedDict()
_blocks_lock = threading.Lock()


def _block(url: str, signature: str | None, index: int) -> bytes:
    """Block ``index`` of a remote shard, fetched by the first thread that asks while the others wait for it."""
    key = (url, signature, index)
    with _blocks_lock:
        pending = _blocks.get(key)
        owner = pending is None
        if pending is None:
            pending = _blocks[key] = Future()
            while len(_blocks) > BLOCKS_KEPT:
                _blocks.popitem(last=False)
        else:
            _blocks.move_to_end(key)
    if owner:
        fs, path = locations.filesystem(url)
        start = index * BLOCK_BYTES
        try:
            pending.set_result(locations.with_retries(
                url, lambda: fs.cat_file(path, start=start, end=start + BLOCK_BYTES)))
        except BaseException as error:
            pending.set_exception(error)
            with _blocks_lock:
                if _blocks.get(key) is pending:
                    del _blocks[key]  # the next read tries again
    return pending.result()


@atexit.register
def _remove_unpacked() -> None:
    for path, _ in _unpacked.values():
        path.unlink(missing_ok=True)


def _readable(shard: Shard, signature: str | None, warnings: list[str] | None = None) -> tuple[Shard, int]:
    """(a plain tar to read by offset, its size): the shard itself, or a compressed shard's unpacked copy."""
    if is_compressed(shard):
        path, warning = _unpacked_copy(shard, signature)
        if warning and warnings is not None:
            warnings.append(warning)
        return path, path.stat().st_size
    info = _info(shard)
    if info is None:
        raise FileNotFoundError(f"no such shard: {shard}")
    return shard, info[0]


def _read_range(shard: Shard, signature: str | None, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the (unpacked) shard; a remote plain shard's come from its cached blocks."""
    if is_compressed(shard):
        shard = _unpacked_copy(shard, signature)[0]
    if is_url(shard):
        first, last = offset // BLOCK_BYTES, (offset + max(size, 1) - 1) // BLOCK_BYTES
        blocks = []
        for index in range(first, last + 1):
            try:
                blocks.append(_block(str(shard), signature, index))
            except locations.RemoteError as error:
                if "(416" not in str(error):
                    raise
                break  # the range starts past the end: the shard was cut (read_bytes says so)
        data = b"".join(blocks)
        return data[offset - first * BLOCK_BYTES:offset - first * BLOCK_BYTES + size]
    with open(shard, "rb") as stream:
        stream.seek(offset)
        return stream.read(size)


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
            data = _read_range(self.shard, self.shard_signature, self.offset, self.size)
        except locations.RemoteError as error:
            cause, _, fix = str(error).removeprefix(f"{self.shard}: ").partition(". ")
            raise ImageLoadError(str(self), cause, fix or "Check the shard's URL.") from error
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


def _members(path: Shard, signature: str | None, warnings: list[str]) -> list[tarfile.TarInfo]:
    """The shard's file members in order; a truncated shard gives those before the cut, with a warning.

    Only headers are read (the stream seeks over the data); a remote shard's scan is retried as a whole
    on a transient failure, a cut-off archive is not (it is what the object holds).
    """
    readable, size = _readable(path, signature, warnings)
    members: list[tarfile.TarInfo] = []
    broken: list[BaseException] = []

    def scan() -> None:
        members.clear()
        broken.clear()
        with _open_plain(readable) as stream:
            try:
                archive = tarfile.open(fileobj=stream, mode="r:")
                while (member := archive.next()) is not None:
                    if member.isfile():
                        members.append(member)
            except (tarfile.TarError, EOFError) as error:
                broken.append(error)

    if is_url(readable):
        locations.with_retries(str(readable), scan)
    else:
        scan()
    if broken:
        warnings.append(f"{path}: truncated or corrupt after {len(members)} members ({broken[0]}); the samples "
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
        info = _info(path)  # a refused request (403) is the run's one clear error, raised from here
        if info is None:
            raise FileNotFoundError(f"no such shard: {path}")
        signature = info[1]
        members = _members(path, signature, listing.warnings)
        readable, _ = _readable(path, signature) if is_compressed(path) else (path, 0)
    except locations.RemoteError as error:
        if not _missing(error) and "(403)" in str(error):
            raise
        listing.warnings.append(f"{error}; skipped.")
        return listing
    except OSError as error:
        listing.warnings.append(f"{path}: cannot read shard ({error.strerror or error}); skipped.")
        return listing
    images = {ext.lstrip(".") for ext in image_extensions()}
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in members:
        key, extension = base_plus_ext(member.name)
        if key is None or key.startswith("__") or not extension:
            continue
        samples.setdefault(key, {}).setdefault(extension, member)
    found = len(listing.warnings)

    def read_fields() -> None:  # the small text members; a remote shard's pass is retried as a whole
        del listing.warnings[found:]
        listing.records.clear()
        with _open_plain(readable) as stream:
            for key, parts in samples.items():
                image = next((ext for ext in parts if ext.lower() in images), None)
                if image is None:
                    listing.warnings.append(f"{path}: key {key} has no image member (members: "
                                            f"{', '.join(parts)}); skipped.")
                    continue
                fields = _fields(stream, path, key, parts, listing.warnings)
                member = parts[image]
                location = ShardMember(str(path), key, member.name, member.offset_data, member.size, signature)
                listing.records.append(Record(id=f"{shard_name(path)}/{key}", path=location, fields=fields))  # type: ignore[arg-type]

    if is_url(readable):
        locations.with_retries(str(readable), read_fields)
    else:
        read_fields()
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
    remote = locations.signatures([str(shard) for shard in shards if is_url(shard)])  # LIST pages, not a HEAD each
    missing = [str(shard) for shard in shards if (remote.get(shard) if is_url(shard) else _info(shard)) is None]
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


@dataclass(frozen=True)
class ShardJob:
    """One output shard to write: everything a worker needs (no store, no image bytes; the texts are small)."""

    source: Shard
    signature: str | None
    target: Shard
    keys: list[str]  # the samples kept, in shard order
    texts: dict[str, dict[str, str]]  # key → step → text
    digest: str  # of the source's signature and the texts: a shard written with the same digest is not rewritten

    @property
    def meta_key(self) -> str:
        return _META_PREFIX + shard_name(self.target)


def output_target(output_dir: str | Path, shard: Shard) -> Shard:
    """Where an input shard's output goes: ``output_dir/<shard name>`` (a URL when ``output_dir`` is one)."""
    if locations.is_url(str(output_dir)):
        return locations.join(str(output_dir), shard_name(shard))
    return Path(output_dir) / shard_name(shard)


def plan_output_shards(store: Any, by_shard: dict[str, list[Record]], output_dir: str | Path,
                       report: ShardReport) -> list[ShardJob]:
    """The shards of ``by_shard`` whose samples all have results, as jobs; the others go to ``report.pending``.

    One store read per step for all these shards together. Every step stored for the samples adds its
    member, so tagging and then captioning into the same ``--output-dir`` gives shards with both. A shard
    already written with the same content (its digest in the store, the file there) goes to
    ``report.unchanged``.
    """
    steps = store.steps()
    ids = [record.id for records in by_shard.values() for record in records]
    results = {step: store.get_many(step, ids) for step in steps}
    jobs: list[ShardJob] = []
    for shard, members in by_shard.items():
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
        signature = members[0].path.shard_signature  # type: ignore[union-attr]
        digest = hashlib.sha256(json.dumps([signature, [(record.id, texts[record.id]) for record in kept]],
                                           sort_keys=True).encode("utf-8")).hexdigest()
        target = output_target(output_dir, shard)
        job = ShardJob(shard, signature, target, [record.path.key for record in kept],  # type: ignore[union-attr]
                       {record.path.key: texts[record.id] for record in kept}, digest)  # type: ignore[union-attr]
        if store.get_meta(job.meta_key) == digest and _info(target) is not None:
            report.unchanged.append(str(target))
            continue
        jobs.append(job)
    return jobs


def write_output_shards(store: Any, records: list[Record], output_dir: str | Path) -> ShardReport:
    """Each input shard whose samples all have results → ``output_dir/<shard name>``: originals + ``KEY.<step>.txt``.

    Written here, one after the other (:class:`ShardSink` hands the same jobs to an executor's writer).
    """
    require("webdataset", "writing WebDataset shards", extra="webdataset")
    by_shard: dict[str, list[Record]] = {}
    for record in records:
        if isinstance(record.path, ShardMember):
            by_shard.setdefault(record.path.shard, []).append(record)
    report = ShardReport()
    for job in plan_output_shards(store, by_shard, output_dir, report):
        write_shard(job)
        store.put_meta(job.meta_key, job.digest)
        report.written.append(str(job.target))
    return report


def export_shards(records: list[Record], fields: list[str], output_dir: str | Path) -> int:
    """Records of shards → new shards in ``output_dir``: each sample's originals plus ``KEY.<field>.txt`` per field.

    A pipeline's ``export`` step with ``format: webdataset``: the values are the records' fields (what
    earlier steps wrote); a value that is not text is written as ``KEY.<field>.json``; a sample without a
    value for a field (None: its step failed) goes without that member. Samples the pipeline dropped are
    not in ``records``, so not in the shards. Returns the number of samples written.
    """
    require("webdataset", "writing WebDataset shards", extra="webdataset")
    by_shard: dict[str, list[Record]] = {}
    for record in records:
        if isinstance(record.path, ShardMember):
            by_shard.setdefault(record.path.shard, []).append(record)
    if not locations.is_url(str(output_dir)):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    count = 0
    for shard, members in by_shard.items():
        texts: dict[str, dict[str, str]] = {}
        for record in members:
            values = texts.setdefault(record.path.key, {})  # type: ignore[union-attr]
            for name in fields:
                value = record.fields.get(name)
                if value is None:
                    continue
                if isinstance(value, str):
                    values[name] = value
                else:
                    values[f"{name}@json"] = json.dumps(value, ensure_ascii=False, default=str)
        keys = [record.path.key for record in members]  # type: ignore[union-attr]
        signature = members[0].path.shard_signature  # type: ignore[union-attr]
        write_shard(ShardJob(shard, signature, output_target(output_dir, shard), keys, texts, ""))
        count += len(keys)
    return count


@dataclass
class _Placed:
    collisions: dict = field(default_factory=dict)  # shards have no file-name collisions (SidecarSink's shape)


class LocalShardWriter:
    """Writes each job as it is handed over, in this process (the local executor's writer)."""

    def __init__(self) -> None:
        self._done: list[tuple[ShardJob, str | None]] = []

    def submit(self, jobs: list[ShardJob]) -> None:
        for job in jobs:
            try:
                write_shard(job)
                self._done.append((job, None))
            except (OSError, locations.RemoteError) as error:
                self._done.append((job, str(error)))

    def collect(self, wait: bool) -> list[tuple[ShardJob, str | None]]:
        """Jobs finished since the last call: (job, None) or (job, why it failed)."""
        done, self._done = self._done, []
        return done


class ShardSink:
    """The executors' sink for WebDataset input: an output shard is written as soon as all its samples have results.

    Executors call it as they call :class:`captionkit.core.sinks.SidecarSink` (``plan``,
    ``wants_model``, ``write`` after each committed batch), so a long run's shards appear while it
    runs and a killed run leaves its finished shards in place; :meth:`finish` writes those whose
    last samples failed. Which samples are still to come is counted here, so the store is read once
    per finished shard, not after every batch. ``writer`` writes the shards: in this process
    (:class:`LocalShardWriter`), or where an executor's workers are (Ray: a task per shard, so the
    image bytes never pass through the driver).
    """

    def __init__(self, store: Any, output_dir: str | Path, writer: Any = None) -> None:
        self.store = store
        # absolute: an executor's workers write there from another working directory
        self.output_dir = output_dir if locations.is_url(str(output_dir)) else Path(output_dir).resolve()
        self.writer = writer or LocalShardWriter()
        self.write_errors: dict[str, str] = {}
        self.report = ShardReport()
        self._shard_of: dict[str, str] = {}
        self._records: dict[str, list[Record]] = {}
        self._waiting: dict[str, set[str]] = {}  # shard → ids with no result from this run yet
        self._planned: set[str] = set()  # shards handed to the writer (or found unchanged) by this run

    def plan(self, records: list[Record]) -> _Placed:
        for record in records:
            if isinstance(record.path, ShardMember):
                self._shard_of[record.id] = record.path.shard
                self._records.setdefault(record.path.shard, []).append(record)
                self._waiting.setdefault(record.path.shard, set()).add(record.id)
        return _Placed()

    def wants_model(self, record_ids: list[str]) -> dict[str, str]:
        return {}  # no existing-caption policy: the output shards are captionkit's own

    def write(self, texts: dict[str, str]) -> int:
        """After a batch is stored: hand over the shards this batch completed; returns how many were written."""
        complete = []
        for record_id in texts:
            shard = self._shard_of.get(record_id)
            if shard is None:
                continue
            waiting = self._waiting[shard]
            waiting.discard(record_id)
            if not waiting and shard not in self._planned:
                complete.append(shard)
        self._hand_over(complete)
        return self._collect(wait=False)

    def flush(self) -> int:
        """Every shard not handed over yet (its last samples failed, say), and wait for the writer; returns how
        many were written."""
        self._hand_over([shard for shard in self._records if shard not in self._planned])
        return self._collect(wait=True)

    def finish(self) -> ShardReport:
        """At the end of a run: :meth:`flush`, and what was written, left out and is still pending."""
        self.flush()
        return self.report

    def _hand_over(self, shards: list[str]) -> None:
        if not shards:
            return
        require("webdataset", "writing WebDataset shards", extra="webdataset")
        if not locations.is_url(str(self.output_dir)):
            Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        report = ShardReport()
        jobs = plan_output_shards(self.store, {shard: self._records[shard] for shard in shards}, self.output_dir,
                                  report)
        self._planned.update(shard for shard in shards if shard not in report.pending)
        self.report.left_out.update(report.left_out)
        self.report.unchanged.extend(report.unchanged)
        self.report.pending = [shard for shard in self.report.pending if shard not in shards] + report.pending
        if jobs:
            self.writer.submit(jobs)

    def _collect(self, wait: bool) -> int:
        count = 0
        for job, error in self.writer.collect(wait):
            if error is not None:
                self.write_errors[str(job.target)] = error
                log.warning("%s: could not write the output shard (%s); the next run tries again", job.target, error)
                continue
            self.store.put_meta(job.meta_key, job.digest)
            self.report.written.append(str(job.target))
            count += 1
        return count


def write_shard(job: ShardJob) -> str:
    """Copy the kept samples' original members and add one ``<step>.txt`` member each, through ``TarWriter``.

    Reads the source shard where this runs (a Ray worker for ``--executor ray``); a local target is
    written to a temporary file and renamed, a remote one is uploaded whole once built (an object store
    shows no partial object). A ``.tar.gz`` target is written compressed. Returns the target.
    """
    import webdataset
    from webdataset.tariterators import base_plus_ext

    from captionkit.core.atomic import atomic_open

    wanted = set(job.keys)
    parts: dict[str, dict[str, bytes]] = {}
    members = _members(job.source, job.signature, [])
    readable, _ = _readable(job.source, job.signature) if is_compressed(job.source) else (job.source, 0)
    with _open_plain(readable) as stream:
        for member in members:
            key, extension = base_plus_ext(member.name)
            if key not in wanted or not extension:
                continue
            stream.seek(member.offset_data)
            data = stream.read(member.size)
            if len(data) < member.size:  # a truncated side member: the sample goes without it
                continue
            parts.setdefault(key, {}).setdefault(extension, data)

    def build(handle: IO[bytes]) -> None:
        writer = webdataset.TarWriter(handle, encoder=False, compress=is_compressed(job.target))
        for key in job.keys:
            sample: dict[str, Any] = {"__key__": key, **parts.get(key, {})}
            for step, text in job.texts[key].items():  # "<field>@json": a value that is not text
                name = f"{step[:-5]}.json" if step.endswith("@json") else f"{step}.txt"
                sample[name] = text.encode("utf-8")
            writer.write(sample)
        writer.close()

    if not is_url(job.target):
        with atomic_open(Path(job.target), "wb") as handle:
            build(handle)
        return str(job.target)
    url = str(job.target)
    with tempfile.NamedTemporaryFile(suffix=".tar", prefix="captionkit-out-") as staged:
        build(staged)
        staged.flush()
        fs, path = locations.filesystem(url)
        locations.with_retries(url, lambda: fs.put_file(staged.name, path))
    return url
