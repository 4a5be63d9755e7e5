"""Records for ``--executor ray``: folders and WebDataset shards listed by Ray tasks in parallel, manifests read
by Ray Data's readers.

The records, their order, the skipped rows and folders are the ones the local sources
give (the same functions run, only elsewhere): :class:`~captionkit.core.records.FolderSource`'s
``list_folder`` in tasks over disjoint subtrees, :func:`~captionkit.core.records.row_record` over
the rows Ray Data reads (``read_text`` for JSONL, ``read_csv`` with every column as text,
``read_parquet``). Each image's file signature (size, mtime) is read where it is listed, so
the driver does not stat millions of files one by one before it can ask the store what is done.

A JSON array (one document, not splittable), a text-only manifest (prompts) and a single
image are read by the driver, as locally. Paths must be readable on every node (a shared
file system), as the images must be.
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
from pathlib import Path
from typing import Any

from captionkit.core import locations
from captionkit.core.errors import SourceError
from captionkit.core.records import (
    FolderListing,
    FolderSource,
    ManifestSource,
    Record,
    RemoteFolderSource,
    Source,
    image_extensions,
    row_record,
)
from captionkit.core.store import file_signature

log = logging.getLogger(__name__)
SPLIT_DEPTH = 4  # the driver lists at most this many levels itself to find enough subtrees for the tasks


def list_records(source: Source, ray: Any) -> tuple[list[Record], dict[str, str | None]]:
    """The source's records as the local executor lists them, and their file signatures by path, read on Ray."""
    if isinstance(source, FolderSource) and source.recursive:
        return _folder_records(source, ray)
    if isinstance(source, RemoteFolderSource):
        return _remote_folder_records(source, ray)
    from captionkit.core.webdataset import WebDatasetSource

    if isinstance(source, WebDatasetSource):
        return _shard_records(source, ray)
    if isinstance(source, ManifestSource) and not source.text_only and not source.remote \
            and not locations.is_url(str(source.manifest)) and source.suffix in (".jsonl", ".csv", ".tsv", ".parquet"):
        return _manifest_records(source, ray)
    records = list(source)  # a manifest in a bucket: read here (one object), its rows' images by the workers
    return records, dict(getattr(source, "signatures", {}))


# ------------------------------------------------------------------------------------ object storage
def _list_prefix(url: str, extensions: frozenset[str], recursive: bool,
                 storage_options: dict[str, Any]) -> list[tuple[str, str]]:
    """A Ray task: (URL, signature) of every image under one sub-prefix."""
    return [(found.url, found.signature)
            for found in locations.list_objects(url, extensions, storage_options, recursive=recursive)]


def _remote_folder_records(source: RemoteFolderSource, ray: Any) -> tuple[list[Record], dict[str, str | None]]:
    """The prefix's top level listed here; each sub-prefix listed by a Ray task; merged in key order.

    The same records, in the same order, as ``list(source)`` (keys sorted); the run's storage options
    travel as task arguments (memory only).
    """
    assert isinstance(source.root, str)
    extensions = source.extensions or image_extensions()
    options = locations.default_storage_options()
    fs, path = locations.filesystem(source.root, options)
    fs.invalidate_cache(path)
    protocol = locations.scheme(source.root)
    entries = locations.with_retries(source.root, lambda: fs.ls(path, detail=True))
    found: list[tuple[str, str]] = []
    prefixes: list[str] = []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name.rsplit("/", 1)[-1].startswith("."):
            continue  # hidden, as for folders
        url = f"{protocol}://{name.lstrip('/')}"
        if entry.get("type") == "directory":
            if source.recursive:
                prefixes.append(url)
        elif Path(name).suffix.lower() in extensions:
            found.append((url, locations.object_signature(entry)))
    task = ray.remote(num_cpus=0.25)(_list_prefix)
    for listed in ray.get([task.remote(url, extensions, True, options) for url in prefixes]):
        found.extend(listed)
    found.sort()
    source.signatures.update(dict(found))
    records = [Record(id=locations.relative_key(url, source.root), path=None, url=url) for url, _ in found]
    return records, dict(found)


# ------------------------------------------------------------------------------------------- folders
def _walk_subtree(source: FolderSource, folder: Path, extensions: frozenset[str],
                  ancestors: frozenset) -> tuple[list[FolderListing], dict[str, str | None], list[str]]:
    """A Ray task: one subtree's listings in walk order, its images' signatures, and what it skipped."""
    warnings: list[str] = []
    listings = list(source.listings(folder, extensions, set(ancestors), warnings.append))
    signatures = {str(record.path): file_signature(record.path) for listing in listings for record in listing.records}
    return listings, signatures, warnings


def _folder_records(source: FolderSource, ray: Any) -> tuple[list[Record], dict[str, str | None]]:
    """Split the tree into subtrees (listing the top levels here), walk them in tasks, merge in walk order."""
    extensions = source.extensions or image_extensions()
    wanted = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    warn = log.warning
    root = source.list_folder(source.root, extensions, set(), warn)
    if root is None:
        return [], {}
    # The plan, in walk order: listings made here, and (folder, its ancestors' keys) for tasks.
    plan: list[FolderListing | tuple[Path, frozenset]] = [root, *[(sub, frozenset([root.key]))
                                                                  for sub in root.subfolders]]
    for _ in range(SPLIT_DEPTH - 1):
        pending = sum(1 for item in plan if isinstance(item, tuple))
        if pending == 0 or pending >= wanted:
            break
        expanded: list[FolderListing | tuple[Path, frozenset]] = []
        for item in plan:
            if isinstance(item, FolderListing):
                expanded.append(item)
                continue
            folder, ancestors = item
            listing = source.list_folder(folder, extensions, set(ancestors), warn)
            if listing is not None:
                expanded.append(listing)
                expanded.extend((sub, ancestors | {listing.key}) for sub in listing.subfolders)
        plan = expanded
    walk = ray.remote(num_cpus=0.5)(_walk_subtree)
    futures = {index: walk.remote(source, item[0], extensions, item[1])
               for index, item in enumerate(plan) if isinstance(item, tuple)}
    records: list[Record] = []
    signatures: dict[str, str | None] = {}
    visited: set[tuple[int, int]] = set()
    skipped: list[Path] = []  # a folder seen before (through a link): nothing under this path counts
    for index, item in enumerate(plan):
        if isinstance(item, FolderListing):
            listings, found = [item], {str(record.path): file_signature(record.path) for record in item.records}
        else:
            listings, found, warnings = ray.get(futures.pop(index))
            for message in warnings:
                log.warning("%s", message)
        for listing in listings:
            if any(listing.folder.is_relative_to(folder) for folder in skipped):
                continue
            if listing.key in visited:
                log.warning("%s: symlink loop (folder already visited); skipped.", listing.folder)
                skipped.append(listing.folder)
                continue
            visited.add(listing.key)
            records.extend(listing.records)
            signatures.update((str(record.path), found.get(str(record.path))) for record in listing.records)
    return records, signatures


# ------------------------------------------------------------------------------------------- shards
def _list_shard(shard: Any, storage_options: dict[str, Any]) -> Any:
    """A Ray task: one shard's listing, with the run's storage options (memory only) for a remote shard."""
    from captionkit.core.webdataset import list_shard

    locations.set_default_storage_options(storage_options)
    return list_shard(shard)


def _shard_records(source: Any, ray: Any) -> tuple[list[Record], dict[str, str | None]]:
    """WebDataset shards listed by one Ray task each (headers and text members only), merged in shard order.

    Even one shard is listed in a task: a compressed shard is unpacked to list it, which is no job for the driver.
    """
    task = ray.remote(num_cpus=0.5)(_list_shard)
    options = locations.default_storage_options()
    futures = [task.remote(shard, options) for shard in source.shards]
    records: list[Record] = []
    signatures: dict[str, str | None] = {}
    for future in futures:
        listing = ray.get(future)
        for message in listing.warnings:
            log.warning("%s", message)
        records.extend(listing.records)
        signatures.update((str(record.path), file_signature(record.path)) for record in listing.records)
    return records, signatures


# ----------------------------------------------------------------------------------------- manifests
def _rows_to_entries(table: Any, kind: str, column: str, base: Path, root: Path) -> Any:
    """A Ray Data batch of rows (or JSONL lines) → pickled entries: blank, bad line, no image, or a record."""
    import pyarrow as pa

    entries: list[bytes] = []
    for row in table.to_pylist():
        if kind == "jsonl":
            line = row["text"].lstrip("\ufeff")
            if not line.strip():
                entries.append(pickle.dumps(("blank",)))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                entries.append(pickle.dumps(("bad", error.msg)))
                continue
        record = row_record(row, column, base, root)
        signature = file_signature(record.path) if record is not None else None
        entries.append(pickle.dumps(("row", record, signature)))
    return pa.table({"entry": pa.array(entries, pa.large_binary())})


def _first_columns(source: ManifestSource, kind: str) -> list[str] | None:
    """The columns the image column is chosen from (the first row's, as locally); None: no rows."""
    path = source.manifest
    try:
        if kind == "jsonl":
            with path.open(encoding="utf-8-sig") as stream:
                for number, line in enumerate(stream, 1):
                    if line.strip():
                        try:
                            return list(json.loads(line))
                        except json.JSONDecodeError as error:
                            raise SourceError(f"{path}:{number}: not valid JSON ({error.msg}). "
                                              "Fix that line: each line must be one JSON object.") from error
            return None
        if kind == "csv":
            with path.open(encoding="utf-8-sig", newline="") as stream:
                reader = csv.reader(stream, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                return next(reader, None)
        import pyarrow.parquet as parquet

        return parquet.read_schema(path).names if parquet.read_metadata(path).num_rows else None
    except (OSError, UnicodeDecodeError) as error:
        raise SourceError(f"{path}: cannot read manifest ({error}).") from error


def _dataset(source: ManifestSource, kind: str, columns: list[str], ray: Any) -> Any:
    path = str(source.manifest)
    if kind == "jsonl":
        return ray.data.read_text(path, drop_empty_lines=False)
    if kind == "csv":
        import pyarrow as pa
        from pyarrow import csv as arrow_csv

        delimiter = "\t" if source.manifest.suffix.lower() == ".tsv" else ","
        return ray.data.read_csv(
            path, parse_options=arrow_csv.ParseOptions(delimiter=delimiter),
            # every column as text, empty cells as "", as csv.DictReader reads them
            convert_options=arrow_csv.ConvertOptions(column_types={name: pa.string() for name in columns},
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False))
    return ray.data.read_parquet(path)


def _manifest_records(source: ManifestSource, ray: Any) -> tuple[list[Record], dict[str, str | None]]:
    kind = "csv" if source.manifest.suffix.lower() in (".csv", ".tsv") else source.manifest.suffix.lower()[1:]
    columns = _first_columns(source, kind)
    if not columns:
        return [], {}
    column = source.choose_image_column(columns)
    base = source.base_dir or source.manifest.parent
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order, context.enable_progress_bars = True, False  # rows in file order
    try:
        dataset = _dataset(source, kind, columns, ray).map_batches(
            _rows_to_entries, fn_args=(kind, column, base, source.root), batch_format="pyarrow", batch_size=4096)
        entries = [pickle.loads(blob) for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
                   for blob in batch.column("entry").to_pylist()]
    except ray.exceptions.RayError as error:
        if kind == "csv":  # a row Arrow's strict CSV parser refuses (a short row, say): read it as locally
            log.info("%s: Ray Data could not parse it (%s); reading it on the driver", source.manifest,
                     str(error).splitlines()[0])
            return list(source), {}
        raise SourceError(f"{source.manifest}: cannot read manifest ({str(error).splitlines()[0]}).") from error
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
    rows: list[Record | None] = []
    signatures: dict[str, str | None] = {}
    for line, entry in enumerate(entries, 1):
        if entry[0] == "bad":
            raise SourceError(f"{source.manifest}:{line}: not valid JSON ({entry[1]}). "
                              "Fix that line: each line must be one JSON object.")
        if entry[0] == "row":
            rows.append(entry[1])
            if entry[1] is not None:
                signatures[str(entry[1].path)] = entry[2]
    return list(source.unique_records(rows)), signatures
