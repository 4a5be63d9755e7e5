"""Training data in object storage: a prefix of images with sidecar text files, or a manifest of URLs.

Why a local mirror: a trainer reads every image once per epoch. Each object is fetched once,
``io_workers`` at a time, into the object mirror (:mod:`captionkit.core.object_cache`, keyed by URL
and ETag/size/mtime), and the data sets read the local copies: epoch 2, a resumed run and the next
run with unchanged objects fetch nothing. Credentials come from the environment and profiles plus
the config's ``storage_options`` (set as the default while the data is read); nothing about them is
kept in the mirror, the config saved beside checkpoints, or the logs.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from captionkit.core import locations, object_cache

_log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".jsonl", ".parquet", ".csv")


def is_remote(location: str | Path) -> bool:
    """True for an object-store URL (``s3://``, ``gs://`` ...); ``file://`` and paths are local."""
    return locations.is_url(str(location)) if isinstance(location, str) else False


def read_table(location: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .parquet or .csv manifest, local or an object; ValueError names the line and the fix."""
    name = str(location)
    suffix = PurePosixPath(name).suffix.lower()
    try:
        raw = locations.read_bytes(location)
    except locations.RemoteError as error:
        raise ValueError(str(error)) from error
    except OSError as error:
        raise ValueError(f"{name}: cannot read the manifest ({error.strerror or error})") from error
    if suffix == ".parquet":
        import pyarrow.parquet as parquet

        return parquet.read_table(io.BytesIO(raw)).to_pylist()
    text = raw.decode("utf-8-sig")
    if suffix == ".csv":
        import csv

        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}:{number}: not valid JSON ({error}); fix or remove that line") from error
        if not isinstance(row, dict):
            raise ValueError(f"{name}:{number}: each line must be a JSON object with image and text fields")
        rows.append(row)
    return rows


def resolve(value: str, manifest: str | Path) -> str | Path:
    """A manifest's image value as a URL or a local path: URLs as given, relative values beside the manifest."""
    if locations.is_url(value):
        return value
    if is_remote(manifest):
        return value if locations.scheme(value) else locations.join(locations.parent(str(manifest)), value)
    path = locations.local_path(value)
    return path if path.is_absolute() else Path(manifest).parent / path


@dataclass
class RemotePairs:
    """Images under a prefix and the sidecar text object of each (None: it has none)."""

    images: list[str] = field(default_factory=list)
    sidecars: dict[str, str | None] = field(default_factory=dict)
    signatures: dict[str, str] = field(default_factory=dict)


def list_pairs(prefix: str, sidecar_extension: str, extensions: frozenset[str], recursive: bool = True
               ) -> RemotePairs:
    """Every image under ``prefix`` with its ``<stem><ext>`` sidecar, from one listing (no request per file)."""
    try:
        found = list(locations.list_objects(prefix, extensions | {sidecar_extension}, recursive=recursive))
    except locations.RemoteError as error:
        raise ValueError(str(error)) from error
    pairs = RemotePairs(signatures={item.url: item.signature for item in found})
    texts = {item.url for item in found if item.url.endswith(sidecar_extension)}
    for item in found:
        if PurePosixPath(item.url).suffix.lower() in extensions and item.url not in texts:
            sidecar = item.url[: -len(PurePosixPath(item.url).suffix)] + sidecar_extension
            pairs.images.append(item.url)
            pairs.sidecars[item.url] = sidecar if sidecar in texts else None
    return pairs


def fetch(urls: list[str], io_workers: int, signatures: dict[str, str] | None = None
          ) -> tuple[dict[str, Path], dict[str, str]]:
    """Local copies of ``urls`` from the object mirror, and the failures (URL → the one clear error)."""
    report = object_cache.mirror(urls, io_workers, signatures)
    if report.errors:
        _log.warning("%d objects could not be fetched and are left out (first: %s)", len(report.errors),
                     next(iter(report.errors.values())))
    return report.paths, {url: str(error) for url, error in report.errors.items()}
