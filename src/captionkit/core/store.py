"""The embedded store and ledger: what was done to which image, with which settings.

Resume and re-runs ask the store, never "does a .txt exist". One SQLite file (WAL mode,
one transaction per batch) in the output location keeps, per step and image: the file
signature, a content hash, the settings fingerprint, the raw model result, the text last
rendered from it and any error. A second table remembers every sidecar file captionkit
wrote (with the text that was there before), so user-written captions are told apart
from our own and ``append`` stays idempotent across crashes. It keeps the paths of files
under the output location relative to it, so a folder copied or moved whole (with its
``.captionkit``) still knows its own files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

STORE_FOLDER = ".captionkit"
STORE_FILE = "store.sqlite"
# Bumped when stored rows change meaning; an older store is brought up to date when it is opened.
#   2: sidecar paths relative to the location; fingerprints of server backends without the server's address.
#   3: a local model folder keyed by its content, not its path and file times (models/identity.py).
SCHEMA_VERSION = 3
_SCHEMA_KEY = "schema_version"
# Settings that say where a model is reached, not what it is: never part of a fingerprint (see migrate).
_ADDRESS_KEYS = {"openai": ("base_url",)}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    step TEXT NOT NULL,
    record_id TEXT NOT NULL,
    path TEXT NOT NULL,
    file_signature TEXT,
    content_hash TEXT,
    fingerprint TEXT,
    settings TEXT,
    status TEXT NOT NULL,
    raw TEXT,
    text TEXT,
    error TEXT,
    notes TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (step, record_id)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    output_path TEXT PRIMARY KEY,
    step TEXT NOT NULL,
    record_id TEXT NOT NULL,
    base_exists INTEGER NOT NULL,
    base_text TEXT,
    pending_hash TEXT,
    written_hash TEXT,
    updated_at REAL NOT NULL
);
"""


def fingerprint(settings: dict[str, Any]) -> str:
    """A short stable hash of settings (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:20]


def text_hash(text: str) -> str:
    """Hash of a sidecar's content, to recognise files captionkit wrote."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def file_signature(path: Path | None) -> str | None:
    """Size and modification time: cheap evidence that an image did not change since its result."""
    if path is None:  # a text-only record: its inputs are in the step's per-record settings
        return None
    if not isinstance(path, Path) and hasattr(path, "signature"):  # a shard member (core.webdataset)
        return path.signature()
    try:
        info = path.stat()
    except OSError:
        return None
    return f"{info.st_size}:{info.st_mtime_ns}"


def _without_addresses(settings: dict, memo: dict) -> dict | None:
    """Schema 2: where a server is reached is not what it is (``base_url`` leaves the settings)."""
    addresses = _ADDRESS_KEYS.get(settings.get("backend"))
    if not addresses or not any(key in settings for key in addresses):
        return None
    return {key: value for key, value in settings.items() if key not in addresses}


def _local_models_by_content(settings: dict, memo: dict) -> dict | None:
    """Schema 3: a local model folder (still there, unchanged since) keyed by its content, not its path."""
    from captionkit.core.identity import upgrade_stored_identity

    return upgrade_stored_identity(settings, memo)


@dataclass
class Result:
    """One stored result row."""

    step: str
    record_id: str
    path: str
    file_signature: str | None
    content_hash: str | None
    fingerprint: str | None
    settings: dict[str, Any] | None
    status: str  # "ok" or "error"
    raw: Any
    text: str | None
    error: str | None
    notes: list[str]
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Result:
        return cls(
            step=row["step"],
            record_id=row["record_id"],
            path=row["path"],
            file_signature=row["file_signature"],
            content_hash=row["content_hash"],
            fingerprint=row["fingerprint"],
            settings=json.loads(row["settings"]) if row["settings"] else None,
            status=row["status"],
            raw=json.loads(row["raw"]) if row["raw"] is not None else None,
            text=row["text"],
            error=row["error"],
            notes=json.loads(row["notes"]) if row["notes"] else [],
            updated_at=row["updated_at"],
        )


@dataclass
class OutputRecord:
    """Bookkeeping for one sidecar file."""

    output_path: str
    step: str
    record_id: str
    base_exists: bool
    base_text: str | None
    pending_hash: str | None
    written_hash: str | None


class Store:
    """Results + ledger in ``<location>/.captionkit/store.sqlite``."""

    def __init__(self, location: str | Path) -> None:
        self.folder = Path(location) / STORE_FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / STORE_FILE
        # One thread at a time uses it (the executor's writer thread while a run saves batches).
        self._connection = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self._connection.row_factory = sqlite3.Row
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.executescript(_SCHEMA)
        self._connection.commit()
        self.root = Path(os.path.abspath(location))
        self._roots = list(dict.fromkeys([self.root, self.root.resolve()]))
        self._migrate()

    # paths of written files, relative to the location ---------------------------
    def _key(self, path: str) -> str:
        """How ``path`` is kept in the ledger: relative (POSIX) under the location, absolute elsewhere."""
        candidate = Path(path)
        if not candidate.is_absolute():
            candidate = Path(os.path.abspath(candidate))
        for root in self._roots:
            try:
                return candidate.relative_to(root).as_posix()
            except ValueError:
                continue
        return str(candidate)

    def _absolute(self, key: str) -> str:
        return key if Path(key).is_absolute() else str(self.root / PurePosixPath(key))

    def _migrate(self) -> None:
        """Bring a store written by an older captionkit up to :data:`SCHEMA_VERSION` (once, in one transaction)."""
        if (self.get_meta(_SCHEMA_KEY) or 1) >= SCHEMA_VERSION:
            return
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")  # one process migrates; the others then see it done
            version = self.get_meta(_SCHEMA_KEY) or 1
            if version >= SCHEMA_VERSION:
                return
            if version < 2:
                self._migrate_to_2()
            if version < 3:
                self._rekey(_local_models_by_content)
            self._connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                     (_SCHEMA_KEY, json.dumps(SCHEMA_VERSION)))

    def _migrate_to_2(self) -> None:
        """Sidecar paths relative to the location; server addresses out of the fingerprints."""
        rows = self._connection.execute("SELECT output_path FROM outputs").fetchall()
        for (old,) in rows:
            if not Path(old).is_absolute():
                continue
            new = self._key(old)
            if new != old:
                self._connection.execute("DELETE FROM outputs WHERE output_path = ?", (new,))
                self._connection.execute("UPDATE outputs SET output_path = ? WHERE output_path = ?", (new, old))
        self._rekey(_without_addresses)

    def _rekey(self, upgrade: Callable[[dict, dict], dict | None]) -> None:
        """Give each result the settings ``upgrade`` makes of its own, and their fingerprint.

        Only rows keyed by their stored settings are touched (any other is redone anyway);
        ``upgrade`` returns None to leave a row as it is.
        """
        updates = []
        memo: dict = {}
        seen: dict[str, tuple[str, dict | None]] = {}  # settings text → (its fingerprint, upgraded); rows share them
        for step, record_id, stored, settings_text in self._connection.execute(
                "SELECT step, record_id, fingerprint, settings FROM results WHERE settings IS NOT NULL"):
            if settings_text not in seen:
                settings = json.loads(settings_text)
                seen[settings_text] = ((fingerprint(settings), upgrade(settings, memo)) if isinstance(settings, dict)
                                       else ("", None))
            keyed_by, new = seen[settings_text]
            if new is not None and keyed_by == stored:  # else not the settings it was keyed by: redone anyway
                updates.append((fingerprint(new), json.dumps(new, sort_keys=True, default=str), step, record_id))
        self._connection.executemany(
            "UPDATE results SET fingerprint = ?, settings = ? WHERE step = ? AND record_id = ?", updates)

    @classmethod
    def open_existing(cls, location: str | Path) -> Store:
        """Open a store that must already exist (for export and render)."""
        path = Path(location) / STORE_FOLDER / STORE_FILE
        if not path.exists():
            from captionkit.core.errors import CaptionkitError

            raise CaptionkitError(
                f"{location}: no captionkit store here ({path} is missing). "
                "Point at the folder you captioned, or at its --output-dir."
            )
        return cls(location)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # results -----------------------------------------------------------------
    def get_many(self, step: str, record_ids: Iterable[str]) -> dict[str, Result]:
        """Stored results of ``step`` for the given ids (missing ids are absent)."""
        wanted = list(record_ids)
        found: dict[str, Result] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._connection.execute(
                f"SELECT * FROM results WHERE step = ? AND record_id IN ({marks})", [step, *chunk]
            )
            for row in rows:
                found[row["record_id"]] = Result.from_row(row)
        return found

    def put_results(self, results: Iterable[Result]) -> None:
        """Insert or replace results in one transaction."""
        now = time.time()
        rows = [
            (
                result.step,
                result.record_id,
                result.path,
                result.file_signature,
                result.content_hash,
                result.fingerprint,
                json.dumps(result.settings, sort_keys=True, default=str) if result.settings is not None else None,
                result.status,
                json.dumps(result.raw, ensure_ascii=False, default=str) if result.raw is not None else None,
                result.text,
                result.error,
                json.dumps(result.notes) if result.notes else None,
                now,
            )
            for result in results
        ]
        with self._connection:
            self._connection.executemany(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows
            )

    def set_texts(self, step: str, texts: dict[str, str]) -> None:
        """Record the text last rendered from each result."""
        with self._connection:
            self._connection.executemany(
                "UPDATE results SET text = ? WHERE step = ? AND record_id = ?",
                [(text, step, record_id) for record_id, text in texts.items()],
            )

    def iter_results(self, step: str | None = None) -> Iterator[Result]:
        """All results (of one step, or all steps), ordered by id."""
        if step is None:
            rows = self._connection.execute("SELECT * FROM results ORDER BY record_id, step")
        else:
            rows = self._connection.execute("SELECT * FROM results WHERE step = ? ORDER BY record_id", (step,))
        for row in rows:
            yield Result.from_row(row)

    def steps(self) -> list[str]:
        """Names of the steps that have results here."""
        return [row[0] for row in self._connection.execute("SELECT DISTINCT step FROM results ORDER BY step")]

    def count(self, step: str, status: str | None = None) -> int:
        if status is None:
            query, args = "SELECT COUNT(*) FROM results WHERE step = ?", (step,)
        else:
            query, args = "SELECT COUNT(*) FROM results WHERE step = ? AND status = ?", (step, status)
        return int(self._connection.execute(query, args).fetchone()[0])

    # metadata shared by many results (e.g. a tagger's vocabulary) ------------
    def put_meta(self, key: str, value: Any) -> None:
        with self._connection:
            self._connection.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, ensure_ascii=False))
            )

    def get_meta(self, key: str) -> Any:
        row = self._connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row is not None else None

    # sidecar ledger ----------------------------------------------------------
    def get_outputs(self, paths: Iterable[str]) -> dict[str, OutputRecord]:
        """Ledger entries of these files, keyed (and ``output_path`` set) as the caller named them."""
        asked = {self._key(path): path for path in paths}
        wanted = list(asked)
        found: dict[str, OutputRecord] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._connection.execute(
                f"SELECT * FROM outputs WHERE output_path IN ({marks})", chunk
            ):
                path = asked[row["output_path"]]
                found[path] = OutputRecord(
                    output_path=path,
                    step=row["step"],
                    record_id=row["record_id"],
                    base_exists=bool(row["base_exists"]),
                    base_text=row["base_text"],
                    pending_hash=row["pending_hash"],
                    written_hash=row["written_hash"],
                )
        return found

    def put_outputs(self, outputs: Iterable[OutputRecord]) -> None:
        now = time.time()
        with self._connection:
            self._connection.executemany(
                "INSERT OR REPLACE INTO outputs VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        self._key(output.output_path),
                        output.step,
                        output.record_id,
                        int(output.base_exists),
                        output.base_text,
                        output.pending_hash,
                        output.written_hash,
                        now,
                    )
                    for output in outputs
                ],
            )

    def iter_outputs(self, step: str | None = None) -> Iterator[OutputRecord]:
        """Every ledger entry (of one step), with absolute paths, oldest first."""
        query, args = "SELECT * FROM outputs ORDER BY updated_at", ()
        if step is not None:
            query, args = "SELECT * FROM outputs WHERE step = ? ORDER BY updated_at", (step,)
        for row in self._connection.execute(query, args):
            yield OutputRecord(
                output_path=self._absolute(row["output_path"]), step=row["step"], record_id=row["record_id"],
                base_exists=bool(row["base_exists"]), base_text=row["base_text"], pending_hash=row["pending_hash"],
                written_hash=row["written_hash"],
            )


def attach_run_log(store: Store) -> logging.Handler:
    """Append this run's log to ``.captionkit/run.log`` in the output location."""
    handler = logging.FileHandler(store.folder / "run.log", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("captionkit")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    return handler
