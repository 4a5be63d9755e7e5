"""The ``export`` step: write the records' fields as sidecar files, a table, a Hugging Face imagefolder, or
(for WebDataset input) new shards with the fields as members.

It runs no model, so the pipeline calls its ``export`` directly after the earlier steps.
Sidecars go through the core's sink (skip / overwrite / append / fill-empty, collision
checks, atomic writes, the ledger that tells our files from the user's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from captionkit.core.errors import CaptionkitError
from captionkit.core.records import Record
from captionkit.core.webdataset import ShardMember, export_shards, shard_name
from captionkit.steps.registry import StepContext, register_step

FORMATS = ("sidecar", "jsonl", "json", "csv", "tsv", "parquet", "imagefolder", "webdataset")


class ExportStep:
    """Writes what earlier steps produced; returns the number of records (or files) written."""

    def __init__(self, context: StepContext, fmt: str, path: str | None, fields: list[str] | None,
                 field: str | None, ext: str, existing: str, on_collision: str, append_separator: str,
                 copy_images: bool) -> None:
        if fmt not in FORMATS:
            raise CaptionkitError(f"format '{fmt}': use one of {', '.join(FORMATS)}.")
        if fmt == "sidecar" and not field:
            raise CaptionkitError("format sidecar needs 'field': the record field to write beside each image.")
        if fmt == "webdataset" and not (fields or field):
            raise CaptionkitError("format webdataset needs 'fields' (or 'field'): the record fields to add to each "
                                  "sample as KEY.<field>.txt members.")
        from captionkit.core.sinks import CollisionPolicy, ExistingPolicy

        for key, value, policy in (("existing", existing, ExistingPolicy), ("on_collision", on_collision,
                                                                            CollisionPolicy)):
            allowed = [item.value for item in policy]
            if value not in allowed:
                raise CaptionkitError(f"{key} '{value}': use one of {', '.join(allowed)}.")
        self.context = context
        self.format = fmt
        self.path = path
        self.fields = fields
        self.field = field
        self.ext = ext
        self.existing = existing
        self.on_collision = on_collision
        self.append_separator = append_separator
        self.copy_images = copy_images
        self.staged: Path | None = None

    def _destination(self, default: str) -> Path:
        if self.staged is not None:  # a URL path: written here, then uploaded
            return self.staged
        target = Path(self.path or default).expanduser()
        return target if target.is_absolute() else self.context.save_folder / target

    def _row(self, record: Record) -> dict[str, Any]:
        fields = record.fields if self.fields is None else {key: record.fields.get(key) for key in self.fields}
        if isinstance(record.path, ShardMember):  # a WebDataset sample: keyed by shard and key (no image file)
            return {"id": record.id, "shard": shard_name(record.path.shard), "key": record.path.key, **fields}
        return {"id": record.id, **({"image": record.location} if record.has_image else {}), **fields}  # user id wins

    def export(self, records: list[Record], store: Any, pipeline: Any) -> int:
        """Write the export; a URL ``path`` (s3://bucket/out.parquet, or a prefix) is written locally, then uploaded."""
        from captionkit.core import locations

        if not (self.path and locations.is_url(self.path)):
            return self._export(records, store)
        import tempfile

        url = self.path.rstrip("/")
        with tempfile.TemporaryDirectory(prefix="captionkit-export-") as staging:
            self.staged = Path(staging) / PurePosixPath(url.split("://", 1)[1]).name
            try:
                count = self._export(records, store)
            finally:
                local, self.staged = self.staged, None
            if local.is_dir():
                locations.upload_tree(local, url)
            elif local.is_file():
                locations.write_bytes(url, local.read_bytes())
        return count

    def _export(self, records: list[Record], store: Any) -> int:
        shards = any(isinstance(record.path, ShardMember) for record in records)
        if self.format == "webdataset":
            if not shards:
                raise CaptionkitError("format webdataset writes new shards beside the input's: the input must be "
                                      "WebDataset shards. Use jsonl or parquet for a table.")
            return export_shards(records, self.fields or [str(self.field)], self._destination("shards"))
        if shards and self.format in ("sidecar", "imagefolder"):
            raise CaptionkitError(f"format {self.format}: the input is WebDataset shards, whose images are not files "
                                  "to write beside or link to. Use format webdataset (new shards with the fields as "
                                  "members) or jsonl/parquet (a table keyed by shard and key).")
        if self.format == "sidecar":
            return self._sidecars(records, store)
        if self.format == "imagefolder":
            return self._imagefolder(records)
        from captionkit.core.atomic import remove_stale_temp_files
        from captionkit.core.sinks import write_table

        target = self._destination(f"export.{self.format}")
        remove_stale_temp_files([target.parent])  # a killed export's leftovers
        write_table([self._row(record) for record in records], target, self.format)
        return len(records)

    def _sidecars(self, records: list[Record], store: Any) -> int:
        from captionkit.core.sinks import CollisionPolicy, ExistingPolicy, SidecarSink

        with_images = [record for record in records if record.has_image]
        remote = any(record.url is not None for record in with_images)  # nothing can be written beside those
        output_dir = self._destination(self.path or ".").resolve() if self.path or remote else None
        sink = SidecarSink(store, self.field, extension=self.ext, output_dir=output_dir,
                           existing=ExistingPolicy(self.existing), collisions=CollisionPolicy(self.on_collision),
                           append_separator=self.append_separator)
        sink.plan(with_images)
        texts = {record.id: str(record.fields[self.field]) for record in with_images
                 if record.fields.get(self.field) not in (None, "")}
        leave = sink.wants_model(list(texts))
        return sink.write({key: value for key, value in texts.items() if key not in leave})

    def _imagefolder(self, records: list[Record]) -> int:
        """``metadata.jsonl`` with ``file_name`` beside the images, as `datasets`' imagefolder loader reads it."""
        from captionkit.core.atomic import atomic_open, remove_stale_temp_files_under
        from captionkit.core.sinks import write_table

        folder = self._destination("imagefolder")
        remove_stale_temp_files_under(folder)  # half-copied images of a killed run
        rows = []
        for record in records:
            if not record.has_image:
                continue
            suffix = record.path.suffix if record.path is not None else PurePosixPath(str(record.url)).suffix
            name = Path(record.id).as_posix()
            if Path(name).suffix.lower() != suffix.lower():
                name = f"{name}{suffix}"
            name = name.replace("../", "").lstrip("/")  # ids of images outside the data folder
            target = folder / name
            if record.path is None:  # a remote image: its bytes are copied in (a link cannot point at a bucket)
                if not target.exists():
                    from captionkit.core.atomic import atomic_write_bytes
                    from captionkit.core.locations import read_bytes

                    atomic_write_bytes(target, record.data or read_bytes(str(record.url)), durable=False)
                rows.append({"file_name": Path(name).as_posix(), **self._folder_row(record)})
                continue
            linked = os.path.relpath(record.path, folder)
            # `datasets` reads file_name relative to the folder and refuses paths that leave it: copy those.
            copy = self.copy_images or linked.startswith("..")
            if copy and not target.exists():
                with record.path.open("rb") as source, atomic_open(target, "wb", durable=False) as stream:
                    shutil.copyfileobj(source, stream)
            file_name = name if copy else linked
            rows.append({"file_name": Path(file_name).as_posix(), **self._folder_row(record)})
        write_table(rows, folder / "metadata.jsonl", "jsonl")
        return len(rows)

    def _folder_row(self, record: Record) -> dict[str, Any]:
        row = self._row(record)
        row.pop("image", None)
        if "id" not in record.fields:
            row.pop("id", None)
        return row

    # The executor never runs an export step; these satisfy code that inspects steps generically.
    def unload(self) -> None:
        pass


@register_step(
    "export",
    description="write fields as sidecar files (core policies), jsonl/json/csv/tsv/parquet, an HF imagefolder, or "
                "new WebDataset shards (webdataset)",
    keys={"format": str, "path": str, "fields": list, "field": str, "ext": str, "existing": str,
          "on_collision": str, "append_separator": str, "copy_images": bool},
    aliases=("Export", "Exporter"),
    required=("format",),
    needs_images=False,
)
def build_export(config: dict[str, Any], context: StepContext) -> ExportStep:
    return ExportStep(
        context, str(config["format"]), config.get("path"), config.get("fields"), config.get("field"),
        str(config.get("ext", ".txt")), str(config.get("existing", "skip")), str(config.get("on_collision", "skip")),
        str(config.get("append_separator", ", ")), bool(config.get("copy_images", True)),
    )
