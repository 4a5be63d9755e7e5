"""Sinks render stored results: sidecar caption files, JSONL and Parquet exports.

Sidecars go beside the images or into a mirrored tree under an output folder. Two
images that would share one caption file (``a.png`` and ``a.jpg``) are detected before
anything is written and handled visibly. Existing files follow a policy, and the store's
ledger tells captionkit's own files from the user's, so hand-written captions are never
clobbered by ``skip``/``fill-empty`` and ``append`` never appends twice.
"""

from __future__ import annotations

import io
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

from captionkit.core.atomic import atomic_write_bytes, atomic_write_lines, atomic_write_text, remove_stale_temp_files
from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.core.store import OutputRecord, Result, Store, text_hash

log = logging.getLogger(__name__)
UNREADABLE = "\x00unreadable"  # an existing file we may not read: never "empty", never ours


class ExistingPolicy(str, Enum):
    """What to do when a caption file is already there and was not written by captionkit."""

    skip = "skip"  # leave it; do not run the model for that image
    overwrite = "overwrite"
    append = "append"  # keep the user's text, add ours after a separator
    fill_empty = "fill-empty"  # write only where the file is missing or blank


class CollisionPolicy(str, Enum):
    """What to do when two images map to one caption file."""

    skip = "skip"  # caption both (results in the store/exports) but write neither sidecar; warn
    keep_extension = "keep-extension"  # write a.png.txt and a.jpg.txt instead


@dataclass
class SidecarPlan:
    """Where each record's sidecar goes, and the collisions found."""

    targets: dict[str, Path]  # record id → caption file (absent: no sidecar for it)
    collisions: dict[Path, list[str]] = field(default_factory=dict)


@dataclass
class SidecarSink:
    """Writes one text file per image, atomically, under an existing-file policy."""

    store: Store
    step: str
    extension: str = ".txt"
    output_dir: Path | None = None
    existing: ExistingPolicy = ExistingPolicy.skip
    collisions: CollisionPolicy = CollisionPolicy.skip
    append_separator: str = ", "

    def __post_init__(self) -> None:
        if not self.extension.startswith("."):
            self.extension = "." + self.extension
        self.existing = ExistingPolicy(self.existing)
        self.collisions = CollisionPolicy(self.collisions)
        self.plan_result = SidecarPlan(targets={})
        self.write_errors: dict[str, str] = {}  # record id → why its file could not be written

    def _target(self, record: Record, keep_extension: bool) -> Path:
        image = record.path if record.path is not None else PurePosixPath(str(record.url).split("://", 1)[-1])
        name = (image.name if keep_extension else image.stem) + self.extension
        if self.output_dir is None:
            if record.path is None:
                raise CaptionkitError(f"{record.url}: a remote image's results need --output-dir.")
            return record.path.parent / name
        relative_parent = Path(record.id).parent
        if relative_parent.is_absolute():  # a manifest row outside the root: flatten under "_external"
            relative_parent = Path("_external") / relative_parent.relative_to(relative_parent.anchor)
        return self.output_dir / relative_parent / name

    def plan(self, records: list[Record]) -> SidecarPlan:
        """Map records to caption files, detecting files two images would share.

        With ``keep-extension`` the renamed files are checked again (``a.png`` → ``a.png.txt``
        can meet ``a.png.jpg`` → ``a.png.txt``). A shared file that captionkit wrote before
        the collision appeared is removed, so no training tool pairs it with the wrong image.
        """
        def group(items: list[tuple[Record, Path]]) -> dict[Path, list[Record]]:
            grouped: dict[Path, list[Record]] = defaultdict(list)
            for record, target in items:
                grouped[target].append(record)
            return grouped

        plan = SidecarPlan(targets={})
        first = group([(record, self._target(record, keep_extension=False)) for record in records])
        renamed: list[tuple[Record, Path]] = []
        for target, members in first.items():
            if len(members) == 1:
                renamed.append((members[0], target))
                continue
            plan.collisions[target] = sorted(record.id for record in members)
            if self.collisions is CollisionPolicy.keep_extension:
                renamed.extend((record, self._target(record, keep_extension=True)) for record in members)
        for target, members in group(renamed).items():
            if len(members) == 1:
                plan.targets[members[0].id] = target
            else:  # a second-order collision: nobody gets this file
                plan.collisions[target] = sorted(record.id for record in members)
        ledger = self.store.get_outputs(str(target) for target in plan.collisions)
        for target, ids in plan.collisions.items():
            entry = ledger.get(str(target))
            if entry is not None and self._is_ours(read_sidecar(target), entry, entry.record_id):
                target.unlink(missing_ok=True)
                log.warning("%s was written for %s before %s appeared; removed, since it no longer says "
                            "which image it describes.", target, entry.record_id, " and ".join(ids))
            if self.collisions is CollisionPolicy.keep_extension and not any(
                    plan.targets.get(record_id) == target for record_id in ids):
                log.info("%s would be shared by %s: writing one file per image with its extension "
                            "kept (e.g. a.png.txt) where that name is free.", target, " and ".join(ids))
            else:
                log.info("%s would be shared by %s: no caption file written for them (results are "
                            "in the store and exports). Rename one image, or pass --on-collision "
                            "keep-extension.", target, " and ".join(ids))
        remove_stale_temp_files({path.parent for path in plan.targets.values()})
        self.plan_result = plan
        return plan

    def _is_ours(self, current: str | None, ledger: OutputRecord | None, record_id: str) -> bool:
        """True when this step wrote the file, for this image, as it is now.

        Another step's file, or one written for another image, counts as foreign.
        """
        if current is None or current is UNREADABLE or ledger is None:
            return False
        if ledger.step != self.step or ledger.record_id != record_id:
            return False
        if current == "" and ledger.pending_hash and ledger.pending_hash != ledger.written_hash:
            return True  # a write that was never confirmed (power loss): ours, write it again
        return text_hash(current) in (ledger.written_hash, ledger.pending_hash)

    def wants_model(self, record_ids: list[str]) -> dict[str, str]:
        """Records the existing-file policy says to leave alone, with the reason."""
        targets = {rid: self.plan_result.targets[rid] for rid in record_ids if rid in self.plan_result.targets}
        ledger = self.store.get_outputs(str(path) for path in targets.values())
        skipped: dict[str, str] = {}
        for record_id, target in targets.items():
            current = read_sidecar(target)
            if current is None or self._is_ours(current, ledger.get(str(target)), record_id):
                continue
            if current is UNREADABLE:
                skipped[record_id] = f"caption file exists but cannot be read ({target.name}); check permissions"
            elif self.existing is ExistingPolicy.skip:
                skipped[record_id] = f"caption file exists ({target.name}); --existing overwrite to replace"
            elif self.existing is ExistingPolicy.fill_empty and current.strip():
                skipped[record_id] = f"caption file is not empty ({target.name})"
        return skipped

    def write(self, texts: dict[str, str]) -> int:
        """Write sidecars for ``record id → text``; returns how many files changed."""
        targets = {rid: self.plan_result.targets[rid] for rid in texts if rid in self.plan_result.targets}
        if not targets:
            return 0
        ledger = self.store.get_outputs(str(path) for path in targets.values())
        pending: list[tuple[Path, str | None, OutputRecord]] = []
        for record_id, target in targets.items():
            current = read_sidecar(target)
            if current is UNREADABLE:
                self.write_errors[record_id] = (f"{target}: exists but cannot be read, so it was left alone; "
                                                "fix its permissions and run again")
                continue
            entry = ledger.get(str(target))
            ours = self._is_ours(current, entry, record_id)
            if not ours:
                if current is not None and self.existing is ExistingPolicy.skip:
                    continue
                if current is not None and self.existing is ExistingPolicy.fill_empty and current.strip():
                    continue
                base_exists, base_text, confirmed = current is not None, current, None
            else:
                assert entry is not None
                base_exists, base_text, confirmed = entry.base_exists, entry.base_text, entry.written_hash
            new_text = texts[record_id]
            user_base = base_exists and bool(base_text and base_text.strip())
            # Our file that holds the user's text and ours (an earlier --existing append): only overwrite may
            # drop the user's part; skip and fill-empty promise to leave user text alone.
            keep_base = user_base and (self.existing is ExistingPolicy.append or (
                ours and self.existing in (ExistingPolicy.skip, ExistingPolicy.fill_empty)))
            if keep_base:
                final = base_text.rstrip() + self.append_separator + new_text
            else:
                final = new_text
            intent = OutputRecord(
                output_path=str(target), step=self.step, record_id=record_id, base_exists=base_exists,
                base_text=base_text, pending_hash=text_hash(final),
                # until the new write is confirmed, the file as it is now is still recognised as ours
                written_hash=confirmed if confirmed is not None else (text_hash(current) if ours else None),
            )
            if current == final:
                if not ours or (entry is not None and entry.written_hash != intent.pending_hash):
                    pending.append((target, None, intent))
                continue
            pending.append((target, final, intent))
        if not pending:
            return 0
        # Intent first, so a crash between the write and the confirmation still knows the file is ours.
        self.store.put_outputs(entry for _, _, entry in pending)
        written = 0
        confirmed_entries = []
        for target, final, entry in pending:
            if final is not None:
                try:
                    # Not fsynced one by one: the store (SQLite) is the durable record and any
                    # sidecar can be rendered again from it; see _is_ours for power-loss leftovers.
                    atomic_write_text(target, final, durable=False)
                except OSError as error:
                    message = (f"{target}: cannot write ({error.strerror or error}); the result is in the "
                               "store: fix the folder's permissions or space, or use --output-dir, then run again")
                    self.write_errors[entry.record_id] = message
                    log.info("%s", message)  # the run's summary lists it; the log keeps it
                    continue
                written += 1
            entry.written_hash = entry.pending_hash
            confirmed_entries.append(entry)
        self.store.put_outputs(confirmed_entries)
        return written


def read_sidecar(path: Path) -> str | None:
    """A sidecar's text; None when there is no file (a folder in its place is not one)."""
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except UnicodeDecodeError:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return UNREADABLE


def edited_texts(store: Store, step: str) -> dict[str, str]:
    """Record id → the text of its caption file where that is no longer what captionkit wrote.

    An edit in the web UI's Review tab (which clears the ledger's hashes), or by hand: what
    a trainer reads is the file, so exports give that text. The newest ledger entry of a
    record counts (an earlier run may have written elsewhere); a missing file is no edit.
    """
    latest: dict[str, OutputRecord] = {}
    for entry in store.iter_outputs(step):
        latest[entry.record_id] = entry
    edits: dict[str, str] = {}
    for record_id, entry in latest.items():
        current = read_sidecar(Path(entry.output_path))
        if current is None or current is UNREADABLE:
            continue
        if current == "" and entry.pending_hash and entry.pending_hash != entry.written_hash:
            continue  # our write that a power loss left empty (see SidecarSink._is_ours)
        if text_hash(current) not in (entry.written_hash, entry.pending_hash):
            edits[record_id] = current.strip()
    return edits


def _result_columns(result: Result, edits: dict[str, str]) -> dict[str, object]:
    """One step's columns of an export row: the text the user sees, whether it was edited, the model's text."""
    step = result.step
    model_text = result.text if result.status == "ok" else None
    edited = result.record_id in edits
    return {
        step: edits[result.record_id] if edited else model_text,
        f"{step}_edited": edited,
        f"{step}_model": model_text,
        f"{step}_raw": result.raw,
        f"{step}_status": result.status,
        f"{step}_error": result.error,
        f"{step}_fingerprint": result.fingerprint,
        f"{step}_settings": result.settings,
    }


def export_results(store: Store, destination: str | Path, steps: Iterable[str] | None = None) -> int:
    """Write every stored result to JSONL or Parquet (by extension), one row per image.

    A destination without an extension (or an existing folder) gets sharded Parquet instead:
    ``part-00000.parquet`` ... of :data:`ROWS_PER_SHARD` rows, streamed from the store.
    A step's column holds the text the user sees: a caption file edited since captionkit
    wrote it (in Review, or by hand) gives its text, ``<step>_edited`` says so and
    ``<step>_model`` keeps the model's text. A URL destination (``s3://bucket/out.parquet``) is
    written locally first, then uploaded (a shard folder object by object).
    """
    from captionkit.core import locations

    if locations.is_url(str(destination)):
        import tempfile

        url = str(destination).rstrip("/")
        with tempfile.TemporaryDirectory(prefix="captionkit-export-") as staging:
            local = Path(staging) / PurePosixPath(url.split("://", 1)[1]).name
            count = export_results(store, local, steps)
            if local.is_dir():
                locations.upload_tree(local, url)
            else:
                locations.write_bytes(url, local.read_bytes())
        return count
    destination = locations.local_path(destination)
    wanted = list(steps) if steps is not None else store.steps()
    if destination.is_dir() or not destination.suffix:
        return export_parquet_shards(store, destination, wanted)
    remove_stale_temp_files([destination.parent])  # a killed export's leftovers
    rows: dict[str, dict] = {}
    for step in wanted:
        edits = edited_texts(store, step)
        for result in store.iter_results(step):
            row = rows.setdefault(result.record_id, {"id": result.record_id, "path": result.path})
            row.update(_result_columns(result, edits))
            row["content_hash"] = result.content_hash
    ordered = [rows[key] for key in sorted(rows)]
    suffix = destination.suffix.lower()
    if suffix == ".jsonl":
        atomic_write_lines(destination, (json.dumps(row, ensure_ascii=False, default=str) for row in ordered))
    elif suffix == ".parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as parquet

        from captionkit.core.atomic import atomic_write_bytes

        flat = [
            {key: (json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list)) else value)
             for key, value in row.items()}
            for row in ordered
        ]
        columns = sorted({key for row in flat for key in row}, key=lambda key: (key not in ("id", "path"), key))
        table = pa.table({column: [row.get(column) for row in flat] for column in columns})
        buffer = io.BytesIO()
        parquet.write_table(table, buffer)
        atomic_write_bytes(destination, buffer.getvalue())
    else:
        from captionkit.core.errors import CaptionkitError

        raise CaptionkitError(f"{destination}: export format unknown; use a .jsonl or .parquet file name.")
    return len(ordered)


ROWS_PER_SHARD = 100_000
_SHARD_FIELDS = ("", "_edited", "_model", "_raw", "_status", "_error", "_fingerprint", "_settings")


def export_parquet_shards(store: Store, folder: str | Path, steps: Iterable[str],
                          rows_per_shard: int = ROWS_PER_SHARD) -> int:
    """Every stored result as ``folder/part-NNNNN.parquet`` (one row per image, ids in order), for very large runs.

    Streams from the store, so memory stays at one shard whatever the run's size. Every shard has
    the same string columns (raw results and settings as JSON); each is written atomically and
    shards left from a larger earlier export are removed.
    """
    import io

    import pyarrow as pa
    import pyarrow.parquet as parquet

    from captionkit.core.atomic import atomic_write_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files([folder])
    wanted = list(steps)
    columns = ["id", "path", "content_hash", *(f"{step}{suffix}" for step in wanted for suffix in _SHARD_FIELDS)]
    schema = pa.schema([(column, pa.bool_() if column.endswith("_edited") and column[:-7] in wanted else pa.string())
                        for column in columns])
    edits = {step: edited_texts(store, step) for step in wanted}
    shard: list[dict] = []
    written = total = 0

    def as_text(value):
        return json.dumps(value, ensure_ascii=False, default=str) if value is not None else None

    def flush() -> None:
        nonlocal written
        table = pa.Table.from_pylist(shard, schema=schema)
        buffer = io.BytesIO()
        parquet.write_table(table, buffer)
        atomic_write_bytes(folder / f"part-{written:05d}.parquet", buffer.getvalue())
        written += 1
        shard.clear()

    row: dict | None = None
    for result in store.iter_results():
        if result.step not in wanted:
            continue
        if row is None or row["id"] != result.record_id:
            if row is not None:
                shard.append(row)
                total += 1
                if len(shard) >= rows_per_shard:
                    flush()
            row = {"id": result.record_id, "path": result.path}
        columns_of_step = _result_columns(result, edits[result.step])
        for name in (f"{result.step}_raw", f"{result.step}_settings"):
            columns_of_step[name] = as_text(columns_of_step[name])
        row.update(columns_of_step)
        row["content_hash"] = result.content_hash
    if row is not None:
        shard.append(row)
        total += 1
    if shard or written == 0:
        flush()
    for stale in folder.glob("part-*.parquet"):
        if stale.stem[5:].isdigit() and int(stale.stem[5:]) >= written:
            stale.unlink()
    return total


TABLE_FORMATS = ("jsonl", "json", "csv", "tsv", "parquet")


def write_table(rows: list[dict[str, Any]], target: Path, fmt: str) -> Path:
    """Write rows as jsonl, json, csv, tsv or parquet, atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    if fmt == "jsonl":
        atomic_write_lines(target, (json.dumps(row, ensure_ascii=False, default=str) for row in rows))
    elif fmt == "json":
        atomic_write_text(target, json.dumps(rows, ensure_ascii=False, indent=2, default=str) + "\n")
    elif fmt in ("csv", "tsv"):
        import csv

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t" if fmt == "tsv" else ",")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
                             for key, value in row.items()})
        atomic_write_text(target, buffer.getvalue())
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as parquet

        def uniform(column: str) -> bool:
            kinds = {type(row.get(column)) for row in rows if row.get(column) is not None}
            return len(kinds) <= 1 and not kinds & {dict, list}

        # A column of mixed types (1 and "n/a") or nested values is written as text, so it still fits a schema.
        plain = {column: uniform(column) for column in columns}
        table = pa.Table.from_pylist([
            {column: row.get(column) if plain[column] or row.get(column) is None else (
                json.dumps(row[column], ensure_ascii=False, default=str) if isinstance(row[column], (dict, list))
                else str(row[column])) for column in columns}
            for row in rows
        ])
        buffer = io.BytesIO()
        parquet.write_table(table, buffer)
        atomic_write_bytes(target, buffer.getvalue())
    else:  # pragma: no cover - validated when the file is read
        raise CaptionkitError(f"output format {fmt}: use one of {', '.join(TABLE_FORMATS)}.")
    return target
