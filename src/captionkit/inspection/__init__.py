"""Dataset inspection: find what would spoil a training run, without changing the data set.

``inspect_dataset`` reads an image folder (with sidecar captions and tags) or a manifest,
plus the captionkit store where there is one (read-only), runs the caption, image and tag
checks and returns an :class:`InspectionReport`, which writes itself as JSON (for scripts
and CI) and as one self-contained HTML file with plots. ``report.failures(["error"])``
gives what ``--fail-on`` turns into a non-zero exit.

Layout: ``dataset`` (reading), ``scan`` (image facts), ``checks`` (findings),
``buckets``, ``hashing``, ``contradictions`` (helpers), ``report`` (HTML).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from captionkit.core import locations, object_cache
from captionkit.core.errors import CaptionkitError, MissingDependencyError
from captionkit.core.images import DEFAULT_MAX_PIXELS
from captionkit.core.records import Record, open_source
from captionkit.executors.progress import Progress
from captionkit.inspection.buckets import parse_resolution
from captionkit.inspection.checks import CheckOptions, caption_checks, image_checks, tag_checks, text_file_checks
from captionkit.inspection.dataset import StoreView, collect, read_selected_tags, source_kind
from captionkit.inspection.findings import KINDS, SEVERITIES, Finding, resolve_fail_on
from captionkit.inspection.scan import safe_scan

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
T5_CANDIDATES = ("google/t5-v1_1-xxl", "google/t5-v1_1-xl", "google/t5-v1_1-large", "google/t5-v1_1-base",
                 "google-t5/t5-base")

__all__ = ["KINDS", "SEVERITIES", "Finding", "InspectionReport", "inspect_dataset", "resolve_fail_on"]


@dataclass
class InspectionReport:
    """Everything one inspection found; ``as_dict`` is the JSON report."""

    dataset: str
    source: str  # folder, manifest or image
    root: str
    settings: dict[str, Any]
    counts: dict[str, Any]
    findings: list[Finding]
    stats: dict[str, Any]
    notes: list[str]
    elapsed_s: float
    generated_at: str
    paths: dict[str, str] = field(default_factory=dict, repr=False)  # record id → absolute image path
    series: dict[str, Any] = field(default_factory=dict, repr=False)  # per-image values for the plots

    def summary(self) -> dict[str, int]:
        """Findings per kind, every kind listed (0 when none)."""
        counts = dict.fromkeys(KINDS, 0)
        for finding in self.findings:
            counts[finding.kind] += 1
        return counts

    def by_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def failures(self, fail_on: Iterable[str]) -> list[Finding]:
        """Findings of the kinds (or severities, or ``any``) named in ``fail_on``."""
        chosen = resolve_fail_on(list(fail_on))
        return [finding for finding in self.findings if finding.kind in chosen]

    def as_dict(self) -> dict[str, Any]:
        return {
            "captionkit_inspect": SCHEMA_VERSION,
            "dataset": self.dataset,
            "source": self.source,
            "root": self.root,
            "generated_at": self.generated_at,
            "elapsed_s": round(self.elapsed_s, 3),
            "settings": self.settings,
            "counts": self.counts,
            "summary": self.summary(),
            "severity": {severity: sum(1 for f in self.findings if f.severity == severity) for severity in SEVERITIES},
            "kinds": {name: {"severity": kind.severity, "group": kind.group, "title": kind.title, "why": kind.why}
                      for name, kind in KINDS.items()},
            "findings": [finding.as_dict() for finding in self.findings],
            "stats": self.stats,
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> Path:
        from captionkit.core.atomic import atomic_write_text

        path = Path(path).expanduser()
        atomic_write_text(path, json.dumps(self.as_dict(), ensure_ascii=False, indent=1, default=str) + "\n")
        return path

    def write_html(self, path: str | Path) -> Path:
        from captionkit.core.atomic import atomic_write_text
        from captionkit.inspection.report import render_html

        path = Path(path).expanduser()
        atomic_write_text(path, render_html(self, path.resolve().parent))
        return path


def _clip_counter(notes: list[str]) -> Callable[[str], int] | None:
    try:
        from captionkit._torchvision_compat import ensure_torchvision

        ensure_torchvision()  # open_clip imports torchvision
        from captionkit.core.tokens import clip_token_count

        clip_token_count("warm up")
    except MissingDependencyError as error:
        notes.append(f"CLIP token counts not checked: {error}")
        return None
    cache: dict[str, int] = {}

    def count(text: str) -> int:
        if text not in cache:
            cache[text] = clip_token_count(text)
        return cache[text]

    return count


def load_t5_tokenizer(path: str | Path | None) -> tuple[Any | None, str]:
    """A T5 tokenizer from ``path`` (folder, tokenizer.json or spiece.model) or the local hub cache; no download."""
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        return None, f"transformers is not importable ({error})"
    if path is not None:
        location = Path(path).expanduser()
        if not location.exists():
            raise CaptionkitError(f"--t5-tokenizer {location}: no such file or folder.")
        try:
            if location.is_file() and location.suffix == ".json":
                return PreTrainedTokenizerFast(tokenizer_file=str(location)), str(location)
            if location.is_file() and location.suffix == ".model":
                from transformers import T5Tokenizer

                return T5Tokenizer(vocab_file=str(location)), str(location)
            return AutoTokenizer.from_pretrained(str(location)), str(location)
        except Exception as error:  # noqa: BLE001 - any loader failure is the user's file: say so
            raise CaptionkitError(f"--t5-tokenizer {location}: cannot load a tokenizer from it ({error}).") from error
    for name in T5_CANDIDATES:
        try:
            return AutoTokenizer.from_pretrained(name, local_files_only=True), f"{name} (local cache)"
        except Exception:  # noqa: BLE001,S112 - not cached: try the next
            continue
    return None, ("no T5 tokenizer found locally (looked in the hub cache for " + ", ".join(T5_CANDIDATES)
                  + "); pass --t5-tokenizer PATH (a tokenizer folder, tokenizer.json or spiece.model)")


def _t5_counter(tokenizer: Any) -> Callable[[list[str]], list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)

    def count(texts: list[str]) -> list[int]:
        if backend is not None:  # a fast tokenizer: batch, with its special tokens (</s>), no length warnings
            return [len(encoding.ids) for encoding in backend.encode_batch(texts, add_special_tokens=True)]
        return [len(tokenizer(text)["input_ids"]) for text in texts]  # pragma: no cover - sentencepiece only

    return count


def inspect_dataset(
    path: str | Path,
    *,
    caption_ext: str = ".txt",
    tag_ext: str | None = None,
    output_dir: str | Path | None = None,
    recursive: bool = True,
    include_hidden: bool = False,
    image_column: str | None = None,
    base_dir: str | Path | None = None,
    trigger: str | None = None,
    resolution: str | int | tuple[int, int] = 1024,
    min_bucket: int = 256,
    max_bucket: int = 2048,
    bucket_step: int = 64,
    min_side: int | None = None,
    max_crop: float = 0.10,
    full: bool = False,
    near_duplicates: bool = True,
    near_duplicate_distance: int = 6,
    min_count: int = 3,
    common_fraction: float = 0.95,
    selected_tags: str | Path | None = None,
    t5_tokenizer: str | Path | None = None,
    clip_limit: int = 77,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    progress: str = "quiet",
    storage_options: dict | str | None = None,
    io_workers: int = 16,
) -> InspectionReport:
    """Inspect a data set (folder or manifest); reads only, writes nothing.

    ``path`` may be an object-store URL (a prefix, one image, a manifest) and a manifest's rows may be
    URLs: images (and the caption files beside them) are read through the local object mirror
    (:mod:`captionkit.core.object_cache`), ``io_workers`` at a time, with ``storage_options``;
    findings name the URLs.

    ``full`` decodes every image (finds truncated data); without it image checks read
    headers, and ``near_duplicates`` adds a perceptual hash from a reduced decode
    (``near_duplicates=False`` is header-only: no pixel is decoded).
    """
    started = time.perf_counter()
    try:
        resolution_pair = parse_resolution(resolution)
        options = CheckOptions(
            caption_ext=_extension(caption_ext), trigger=trigger, clip_limit=clip_limit,
            resolution=resolution_pair, min_bucket=min_bucket, max_bucket=max_bucket, bucket_step=bucket_step,
            min_side=min_side, max_crop=max_crop, near_duplicate_distance=near_duplicate_distance,
            min_count=min_count, common_fraction=common_fraction,
        )
        from captionkit.inspection.buckets import make_bucket_resolutions

        make_bucket_resolutions(resolution_pair, min_bucket, max_bucket, bucket_step)
    except ValueError as error:
        raise CaptionkitError(str(error)) from error
    if not 0 < common_fraction <= 1:
        raise CaptionkitError(f"--common-fraction {common_fraction}: give a fraction between 0 and 1.")
    tag_extension = _extension(tag_ext) if tag_ext else None
    with locations.storage_options_set(storage_options):
        source = open_source(path, recursive=recursive, image_column=image_column, base_dir=base_dir,
                             include_hidden=include_hidden)
        records = list(source)
    if output_dir is not None and locations.is_url(str(output_dir)):  # a URL --output-dir of caption/tag
        out_dir: Path | None = locations.output_cache(str(output_dir)) / "files"
        location: Path | str = locations.output_cache(str(output_dir))
    else:
        out_dir = locations.local_path(output_dir).resolve() if output_dir else None
        location = out_dir or source.root
    notes: list[str] = []
    failed_fetches: dict[str, str] = {}
    remote = any(record.url is not None for record in records)
    if remote:  # fetched into the local mirror, read from there
        with locations.storage_options_set(storage_options):
            records, failed_fetches = mirror_remote_records(source, records, options.caption_ext, tag_extension,
                                                            out_dir, io_workers)
        notes.append(f"Images in object storage were read through the local mirror {object_cache.cache_root()} "
                     "(fetched once; unchanged objects are not fetched again)"
                     + (", with the caption files beside them." if out_dir is None else "."))
    categories = read_selected_tags(Path(selected_tags).expanduser()) if selected_tags else {}
    store = StoreView.find(location) if isinstance(location, Path) else None
    try:
        collected = collect(source, records, options.caption_ext, tag_extension, out_dir, store, categories)
    finally:
        if store is not None:
            store.close()
    for entry in collected.entries:
        if entry.id in failed_fetches:
            entry.error = failed_fetches[entry.id]
    if collected.store_path is not None:
        notes.append(f"Captions and tags were read from the store ({collected.store_path}) where it has them, "
                     "else from sidecar files; image hashes come from the store where the file is unchanged.")
        if collected.diverged:
            notes.append(f"{collected.diverged} sidecar files differ from the store's text (edited, or appended "
                         "to); those files were checked, since trainers read them.")
    else:
        notes.append(f"No captionkit store at {location}: captions and tags were read from sidecar files "
                     f"({options.caption_ext}" + (f", tags {tag_extension}" if tag_extension else "")
                     + ") and manifest columns.")
    if source_kind(source) != "folder":
        notes.append("Caption files with no image are only looked for in local folders, not for manifests"
                     + (" or object-store prefixes." if remote else "."))
    entries = collected.entries
    clip_count = _clip_counter(notes)
    tokenizer, t5_where = load_t5_tokenizer(t5_tokenizer)
    if tokenizer is None:
        notes.append(f"T5 token counts not checked: {t5_where}.")
    else:
        notes.append(f"T5 token counts use the tokenizer from {t5_where}.")
    perceptual = near_duplicates or full
    if full:
        notes.append("Full check: every image was decoded (truncated data found).")
    elif perceptual:
        notes.append("Image checks read headers and hashes; near-duplicates use a perceptual hash from a reduced "
                     "decode. Truncated image data is only found with --full.")
    else:
        notes.append("Header-only check: no pixel was decoded, so near-duplicates were not looked for and "
                     "truncated image data is not found (use --full, or drop --no-near-duplicates).")
    images = [entry for entry in entries if entry.path is not None]
    reporter = Progress(progress)
    reporter.start(len(images), "inspect")
    failed = 0
    try:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            scanned = pool.map(lambda entry: entry if entry.id in failed_fetches else
                               safe_scan(entry, perceptual, full, max_image_pixels), images)
            for done, entry in enumerate(scanned, 1):
                failed += entry.error is not None
                if clip_count is not None and entry.caption and entry.caption.strip():
                    clip_count(entry.caption.strip())  # tokenise while the workers read images
                reporter.advance(done - failed, failed, 1)
    finally:
        reporter.close()
    captions = caption_checks(entries, options, clip_count, _t5_counter(tokenizer) if tokenizer else None)
    files = text_file_checks(collected)
    image = image_checks(entries, options, perceptual)
    tags = tag_checks(entries, options, collected.tag_categories)
    findings = captions.findings + files.findings + image.findings + tags.findings
    order = list(KINDS)
    findings.sort(key=lambda finding: (order.index(finding.kind), finding.file))
    counts = {
        "images": len(images),
        "readable_images": image.stats.get("readable", 0),
        "unreadable_images": failed,
        "with_caption": captions.stats.get("with_caption", 0),
        "tagged": tags.stats.get("tagged_images", 0),
        "text_files": len({text_file.path for _, text_file in collected.text_files}),
        "orphan_text_files": len(collected.orphans),
    }
    settings = {
        "caption_ext": options.caption_ext, "tag_ext": tag_extension,
        "output_dir": str(output_dir) if output_dir and locations.is_url(str(output_dir)) else
        (str(out_dir) if out_dir else None),
        "trigger": trigger, "resolution": f"{resolution_pair[0]}x{resolution_pair[1]}",
        "min_bucket": min_bucket, "max_bucket": max_bucket, "bucket_step": bucket_step,
        "min_side": options.min_side if options.min_side is not None else min_bucket, "max_crop": max_crop,
        "mode": "full" if full else ("headers+perceptual-hash" if perceptual else "header-only"),
        "near_duplicate_distance": near_duplicate_distance if perceptual else None, "min_count": min_count,
        "common_fraction": common_fraction, "clip_limit": clip_limit, "t5_tokenizer": t5_where if tokenizer else None,
        "selected_tags": str(selected_tags) if selected_tags else None,
        "store": str(collected.store_path) if collected.store_path else None,
    }
    if not images:
        notes.append("No images found.")
    if remote:  # name the objects, not their copies in the mirror
        findings = object_cache.as_urls(findings)
    report = InspectionReport(
        dataset=str(path), source=source_kind(source), root=str(source.root), settings=settings, counts=counts,
        findings=findings,
        stats={"captions": captions.stats, "images": image.stats, "tags": tags.stats},
        notes=notes, elapsed_s=time.perf_counter() - started,
        generated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        paths={entry.id: str(entry.path) for entry in images},
        series={**captions.series, **image.series, "tag_frequency": tags.series.get("frequency", []),
                "categories": tags.stats.get("categories")},
    )
    if remote:
        report.paths = object_cache.as_urls(report.paths)
    return report


def mirror_remote_records(source: Any, records: list[Record], caption_ext: str, tag_ext: str | None,
                          out_dir: Path | None, io_workers: int) -> tuple[list[Record], dict[str, str]]:
    """Remote records as local copies in the object mirror (with the caption/tag files beside them in the bucket
    when there is no ``out_dir``), and the fetch errors by record id (each becomes an unreadable-image finding)."""
    urls = [record.url for record in records if record.url is not None]
    signatures = dict(getattr(source, "signatures", {}) or {})
    texts: list[str] = []
    if out_dir is None:  # kohya layout in the bucket: a.png + a.txt; one listing per folder, not a request per file
        extensions = frozenset({caption_ext} | ({tag_ext} if tag_ext else set()))
        wanted = {locations.parent(url) + "/" + name for url in urls for ext in extensions
                  for name in (PurePosixPath(url).stem + ext, PurePosixPath(url).name + ext)}
        for prefix in sorted({locations.parent(url) for url in urls}):
            try:
                for found in locations.list_objects(prefix, extensions, recursive=False):
                    if found.url in wanted:
                        texts.append(found.url)
                        signatures[found.url] = found.signature
            except locations.RemoteError as error:
                log.warning("%s: caption files not listed (%s)", prefix, error)
    fetched = object_cache.mirror([*urls, *texts], io_workers, signatures)
    mirrored: list[Record] = []
    failed: dict[str, str] = {}
    for record in records:
        if record.url is None:
            mirrored.append(record)
            continue
        local = fetched.paths.get(record.url)
        if local is None:
            failed[record.id] = str(fetched.errors.get(record.url, f"{record.url}: not fetched."))
            local = object_cache.mirror_path(record.url)
        mirrored.append(Record(record.id, local, dict(record.fields)))
    return mirrored, failed


def _extension(value: str) -> str:
    value = value.strip()
    return value if value.startswith(".") else "." + value
