"""Tagger training data: tagged image folders, the tag vocabulary, splits, and ``prepare``.

Layout read: every image with a sidecar tag file (``a.png`` + ``a.txt``, separator
configurable). The vocabulary is a ``selected_tags.csv`` (``name`` plus optional
``count``/``category``) filtered by a count threshold, or, without one, built from the
training tags. Tag names are compared with spaces and underscores treated alike, so
``long hair`` in a caption matches ``long_hair`` in the CSV. Tags outside the
vocabulary are ignored and counted in the log.

A data entry may also be in object storage (``s3://bucket/prefix``: images with tag objects
beside them), or a manifest (.jsonl/.parquet/.csv, local or an object) with an image column
(``path``, ``file_name``, ``image``, ``url`` ...; URLs or paths) and a tags column (``tags``,
``tag_string``, ``caption``, ``text``: a list or a separator-joined string). Remote images are
fetched once into the local object mirror and trained from there (see ``train.remote_data``).

Labels are kept as one small index array per image (not a dense matrix) so a million
images with ten thousand tags fit in memory; only the stratified split builds a dense
matrix, and the ``auto`` split falls back to a random one when that would be too big.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captionkit.core.atomic import atomic_write_text
from captionkit.core.errors import CaptionkitError

_log = logging.getLogger(__name__)

RATING_TAGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
#: Column → category, in the order tags are written (rating first, then these).
DANBOORU_TAG_COLUMNS = {
    "tag_string_character": 4,
    "tag_string_copyright": 3,
    "tag_string_artist": 1,
    "tag_string_general": 0,
    "tag_string_meta": 5,
}
RATING_CATEGORY = 9


class TaggerDataError(CaptionkitError):
    """The training data cannot be used as given; the message names the file and the fix."""


def normalise_tag(tag: str) -> str:
    """Comparison form of a tag: trimmed, inner spaces as underscores (Danbooru spelling)."""
    return "_".join(tag.strip().split(" "))


# -- vocabulary -----------------------------------------------------------------------------


@dataclass
class Vocabulary:
    """Ordered tags the model predicts: row ``i`` of the head is ``names[i]``."""

    names: list[str]
    categories: list[int]
    counts: list[int]
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {}
        for position, name in enumerate(self.names):
            key = normalise_tag(name)
            if key in self._index:
                raise TaggerDataError(
                    f"tag {name!r} appears twice in the vocabulary; remove the duplicate row"
                )
            self._index[key] = position

    def __len__(self) -> int:
        return len(self.names)

    def index_of(self, tag: str) -> int | None:
        """Row of a tag (spaces and underscores alike), or None when it is not in the vocabulary."""
        return self._index.get(normalise_tag(tag))

    @classmethod
    def from_csv(cls, path: str | Path, min_count: int = 0) -> Vocabulary:
        """Read ``selected_tags.csv``; rows with a ``count`` below ``min_count`` are dropped."""
        path = Path(path)
        if not path.is_file():
            raise TaggerDataError(
                f"{path}: vocabulary file not found; check data.selected_tags in the config"
            )
        with path.open(newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            if not reader.fieldnames or "name" not in reader.fieldnames:
                raise TaggerDataError(
                    f"{path}: needs a header row with a 'name' column (optional 'count', 'category'); "
                    f"found {reader.fieldnames}"
                )
            has_count = "count" in reader.fieldnames
            if min_count > 0 and not has_count:
                raise TaggerDataError(
                    f"{path}: data.min_count={min_count} needs a 'count' column; "
                    "add counts or set min_count: 0"
                )
            names, categories, counts = [], [], []
            for line, row in enumerate(reader, start=2):
                name = (row.get("name") or "").strip()
                if not name:
                    continue
                try:
                    count = int(float(row["count"])) if has_count and row.get("count") else 0
                    category = int(row["category"]) if row.get("category") else 0
                except ValueError as error:
                    raise TaggerDataError(
                        f"{path}:{line}: {error}; count and category must be integers"
                    ) from error
                if has_count and count < min_count:
                    continue
                names.append(name)
                categories.append(category)
                counts.append(count)
        if not names:
            raise TaggerDataError(
                f"{path}: no tag has count >= {min_count}; lower data.min_count or check the file"
            )
        return cls(names, categories, counts)

    @classmethod
    def from_counts(
        cls, counts: Counter, min_count: int = 1, categories: dict[str, int] | None = None
    ) -> Vocabulary:
        """Vocabulary of every tag seen at least ``min_count`` times, most frequent first."""
        kept = [(tag, n) for tag, n in counts.items() if n >= max(1, min_count)]
        kept.sort(key=lambda item: (-item[1], item[0]))
        if not kept:
            raise TaggerDataError(
                f"no tag occurs at least {min_count} times in the training data; lower data.min_count"
            )
        categories = categories or {}
        return cls([t for t, _ in kept], [categories.get(t, 0) for t, _ in kept], [n for _, n in kept])

    def to_csv(self, best_thresholds: Sequence[float] | None = None) -> str:
        """WD-style CSV text (``tag_id,name,category,count`` [+ ``best_threshold``])."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        header = ["tag_id", "name", "category", "count"]
        if best_thresholds is not None:
            header.append("best_threshold")
        writer.writerow(header)
        rows = zip(self.names, self.categories, self.counts, strict=True)
        for i, (name, category, count) in enumerate(rows):
            row: list[Any] = [i, name, category, count]
            if best_thresholds is not None:
                row.append(f"{float(best_thresholds[i]):.6f}")
            writer.writerow(row)
        return buffer.getvalue()

    def write_csv(self, path: str | Path, best_thresholds: Sequence[float] | None = None) -> None:
        atomic_write_text(path, self.to_csv(best_thresholds))


# -- folders --------------------------------------------------------------------------------


@dataclass
class TaggedImage:
    """One training example before encoding: the image and its tags as written."""

    path: Path
    tags: list[str]


IMAGE_COLUMNS = ("path", "file_name", "image", "image_path", "file", "url")
TAG_COLUMNS = ("tags", "tag_string", "caption", "text")


def split_tag_text(text: str, separator: str) -> list[str]:
    """Tags of one text (empty entries and duplicates dropped, order kept)."""
    if separator != "\n":
        text = text.replace("\r", "").replace("\n", separator)
    seen: set[str] = set()
    tags = []
    for raw in text.split(separator):
        tag = raw.strip()
        if tag and normalise_tag(tag) not in seen:
            seen.add(normalise_tag(tag))
            tags.append(tag)
    return tags


def read_tag_file(path: Path, separator: str) -> list[str]:
    """Tags of one sidecar file (empty entries and duplicates dropped, order kept)."""
    return split_tag_text(path.read_text(encoding="utf-8", errors="replace"), separator)


@dataclass
class ScanReport:
    """Images :func:`scan_tagged_folders` left out, and why."""

    no_tag_file: list[Path | str] = field(default_factory=list)  # a URL string for an object
    empty_tags: list[Path | str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)  # manifest rows / objects that could not be fetched

    def skipped(self, caption_extension: str = ".txt") -> dict[str, list[str]]:
        """Left-out images by reason, for :func:`captionkit.train.runlog.log_skipped`."""
        skipped = {
            f"with no {caption_extension} tag file": [str(path) for path in self.no_tag_file],
            f"with an empty {caption_extension} tag file": [str(path) for path in self.empty_tags],
        }
        if self.missing_images:  # manifests and object storage only
            skipped["missing or not fetched"] = list(self.missing_images)
        return skipped


def scan_tagged_folders(
    roots: Iterable[str | Path], separator: str = ",", caption_extension: str = ".txt", recursive: bool = True,
    report: ScanReport | None = None, io_workers: int = 16,
) -> list[TaggedImage]:
    """Every image under ``roots`` that has a non-empty tag file, sorted by path (deterministic order).

    Images without a tag file, or with one that holds no tag, are left out: recorded in
    ``report`` when given (the caller reports them), else counted in a log warning. A root may
    be a URL prefix or a manifest (see the module docstring); ``io_workers`` objects are fetched at once.
    """
    from captionkit.core.records import image_extensions
    from captionkit.train import remote_data

    extensions = image_extensions()
    items: list[TaggedImage] = []
    found = ScanReport()
    for root in roots:
        if remote_data.is_remote(root) or str(root).lower().endswith(remote_data.TABLE_SUFFIXES):
            items += _remote_or_manifest_items(root, separator, caption_extension, recursive, extensions, found,
                                               io_workers)
            continue
        root = Path(root)
        if not root.is_dir():
            raise TaggerDataError(f"{root}: training folder not found; check data.train_dirs in the config")
        if not os.access(root, os.R_OK | os.X_OK):
            raise TaggerDataError(f"{root}: the folder cannot be read (permission denied); check its permissions")
        walker = sorted(root.rglob("*") if recursive else root.iterdir())
        for path in walker:
            if not path.is_file() or path.suffix.lower() not in extensions:
                continue
            tag_file = path.with_suffix(caption_extension)
            if not tag_file.is_file():
                found.no_tag_file.append(path)
                continue
            try:
                tags = read_tag_file(tag_file, separator)
            except OSError as error:
                raise TaggerDataError(f"{tag_file}: cannot be read ({error.strerror or error}); check its "
                                      "permissions") from error
            if not tags:
                found.empty_tags.append(path)
                continue
            items.append(TaggedImage(path, tags))
    if report is not None:
        report.no_tag_file += found.no_tag_file
        report.empty_tags += found.empty_tags
        report.missing_images += found.missing_images
    else:
        if found.no_tag_file:
            _log.warning("%d images have no %s tag file and were skipped", len(found.no_tag_file), caption_extension)
        if found.empty_tags:
            _log.warning("%d images have an empty %s tag file and were skipped", len(found.empty_tags),
                         caption_extension)
        if found.missing_images:
            _log.warning("%d images are missing or could not be fetched and were skipped", len(found.missing_images))
    if not items:
        raise TaggerDataError(
            f"no image with a non-empty {caption_extension} tag file under {[str(r) for r in roots]} "
            f"({len(found.no_tag_file)} images without one, {len(found.empty_tags)} with an empty one); "
            "put tags in a file next to each image (a.png + a.txt)"
        )
    return items


def _remote_or_manifest_items(root: str | Path, separator: str, caption_extension: str, recursive: bool,
                              extensions: frozenset[str], found: ScanReport, io_workers: int) -> list[TaggedImage]:
    """A URL prefix (images + tag objects) or a manifest (local or an object) as tagged images in local files."""
    from captionkit.core import locations
    from captionkit.train import remote_data

    name = str(root)
    if not name.lower().endswith(remote_data.TABLE_SUFFIXES):
        try:
            kind = locations.kind(name)
        except locations.RemoteError as error:
            raise TaggerDataError(f"{error} Check data.train_dirs / data.val_dirs in the config.") from error
        if kind != "directory":
            raise TaggerDataError(f"{name}: not a prefix (folder) or a .jsonl/.parquet/.csv manifest; check "
                                  "data.train_dirs in the config")
        try:
            pairs = remote_data.list_pairs(name.rstrip("/"), caption_extension, extensions, recursive)
        except ValueError as error:
            raise TaggerDataError(str(error)) from error
        tagged = [image for image in pairs.images if pairs.sidecars[image] is not None]
        found.no_tag_file += [image for image in pairs.images if pairs.sidecars[image] is None]
        local, failed = remote_data.fetch([url for image in tagged for url in (image, pairs.sidecars[image]) if url],
                                          io_workers, pairs.signatures)
        items = []
        for image in tagged:
            sidecar = str(pairs.sidecars[image])
            if image not in local or sidecar not in local:
                found.missing_images.append(image)
                continue
            tags = read_tag_file(local[sidecar], separator)
            if tags:
                items.append(TaggedImage(local[image], tags))
            else:
                found.empty_tags.append(image)
        return items
    try:
        rows = remote_data.read_table(root if remote_data.is_remote(root) else Path(root))
    except ValueError as error:
        raise TaggerDataError(str(error)) from error
    columns = list(rows[0]) if rows else []
    image_column = next((column for column in IMAGE_COLUMNS if column in columns), None)
    tag_column = next((column for column in TAG_COLUMNS if column in columns), None)
    if image_column is None or tag_column is None:
        raise TaggerDataError(f"{name}: a tagger manifest needs an image column ({', '.join(IMAGE_COLUMNS)}) and a "
                              f"tags column ({', '.join(TAG_COLUMNS)}); its columns are {columns}")
    wanted: list[tuple[str | Path, list[str]]] = []
    for row in rows:
        value, text = row.get(image_column), row.get(tag_column)
        if not value:
            continue
        image = remote_data.resolve(str(value), root if remote_data.is_remote(root) else Path(root))
        tags = [str(tag) for tag in text] if isinstance(text, list) else split_tag_text(str(text or ""), separator)
        if not tags:
            found.empty_tags.append(image)
        elif isinstance(image, Path) and not image.is_file():
            found.missing_images.append(str(image))
        else:
            wanted.append((image, tags))
    urls = [image for image, _ in wanted if isinstance(image, str)]
    local, failed = remote_data.fetch(urls, io_workers) if urls else ({}, {})
    found.missing_images += list(failed)
    return [TaggedImage(local[image] if isinstance(image, str) else image, tags) for image, tags in wanted
            if not isinstance(image, str) or image in local]


@dataclass
class EncodedData:
    """Images with their labels as index arrays into the vocabulary."""

    paths: list[Path]
    labels: list[np.ndarray]
    unknown: Counter

    def dense(self, num_tags: int, indices: Sequence[int] | None = None) -> np.ndarray:
        """A dense uint8 [N, tags] matrix (for metrics and the stratified split only)."""
        rows = range(len(self.labels)) if indices is None else indices
        matrix = np.zeros((len(rows), num_tags), dtype=np.uint8)
        for out, i in enumerate(rows):
            matrix[out, self.labels[i]] = 1
        return matrix


def encode(items: Sequence[TaggedImage], vocabulary: Vocabulary, what: str = "training") -> EncodedData:
    """Map tags to vocabulary rows; tags outside it are ignored and reported once in the log."""
    unknown: Counter = Counter()
    labels = []
    for item in items:
        rows = []
        for tag in item.tags:
            row = vocabulary.index_of(tag)
            if row is None:
                unknown[normalise_tag(tag)] += 1
            else:
                rows.append(row)
        labels.append(np.array(sorted(set(rows)), dtype=np.int32))
    if unknown:
        _log.info(
            "%s data: %d tag occurrences (%d distinct tags) are not in the vocabulary and were ignored; "
            "most common: %s",
            what, sum(unknown.values()), len(unknown),
            ", ".join(f"{tag} ({n})" for tag, n in unknown.most_common(8)),
        )
    return EncodedData([item.path for item in items], labels, unknown)


# -- splits ---------------------------------------------------------------------------------


def split_indices(
    labels: Sequence[np.ndarray],
    num_tags: int,
    val_fraction: float,
    method: str = "auto",
    seed: int = 0,
    max_stratified_cells: int = 50_000_000,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Train/validation row indices and the method used.

    ``stratified`` is iterative multi-label stratification (Sechidis et al., via
    iterstrat): every tag keeps about the same share in both parts. It needs a dense
    [N, tags] matrix, so ``auto`` uses it only while N × tags ≤ ``max_stratified_cells``
    and a seeded random split (memory O(N)) beyond that.
    """
    count = len(labels)
    if not 0 < val_fraction < 1:
        raise TaggerDataError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    val_count = max(1, int(round(count * val_fraction)))
    if count < 2 or val_count >= count:
        raise TaggerDataError(
            f"{count} images cannot be split with val_fraction={val_fraction}; "
            "add images or give data.val_dirs"
        )
    if method == "auto":
        method = "stratified" if count * num_tags <= max_stratified_cells else "random"
    if method == "random":
        order = np.random.default_rng(seed).permutation(count)
        return np.sort(order[val_count:]), np.sort(order[:val_count]), "random"
    if method != "stratified":
        raise TaggerDataError(f"data.split must be 'auto', 'stratified' or 'random', got {method!r}")
    if count * num_tags > max_stratified_cells:
        raise TaggerDataError(
            f"a stratified split of {count} images × {num_tags} tags needs a "
            f"{count * num_tags:,}-cell matrix, "
            f"over data.max_stratified_cells={max_stratified_cells:,}; use data.split: auto or random, "
            "or raise the limit if you have the memory"
        )
    try:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
    except ImportError as error:
        from captionkit.core.errors import MissingDependencyError

        raise MissingDependencyError(
            "iterative-stratification", "the stratified split", extra="train"
        ) from error
    matrix = np.zeros((count, num_tags), dtype=np.uint8)
    for i, rows in enumerate(labels):
        matrix[i, rows] = 1
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_count, random_state=seed)
    train, val = next(splitter.split(np.zeros(count), matrix))
    return np.sort(train), np.sort(val), "stratified"


# -- torch dataset --------------------------------------------------------------------------


class TaggerDataset:
    """Images → (float32 input, multi-hot target). Unreadable images yield None (the
    collate function drops them) so one bad file never stops a run."""

    def __init__(self, data: EncodedData, indices: Sequence[int], num_tags: int, preprocessing: Any,
                 hflip: bool = False) -> None:
        self.data = data
        self.indices = list(indices)
        self.num_tags = num_tags
        self.preprocessing = preprocessing
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Any, Any] | None:
        import torch

        from captionkit.core.errors import ImageLoadError
        from captionkit.core.images import load_image

        index = self.indices[position]
        size = self.preprocessing.size
        try:
            image = load_image(self.data.paths[index], target_size=(size[1], size[0])).image
        except ImageLoadError as error:
            _log.warning("skipping a training image: %s", error)
            return None
        # torch's RNG (not Python's) so worker seeds from the epoch generator make it reproducible.
        if self.hflip and torch.rand(()).item() < 0.5:  # the same draw as a tensor comparison, without one
            from PIL import Image

            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = self.preprocessing(image)
        target = torch.zeros(self.num_tags, dtype=torch.float32)
        target[torch.from_numpy(self.data.labels[index].astype(np.int64))] = 1.0
        return torch.from_numpy(array), target


def collate_skipping_failures(batch: list) -> tuple[Any, Any] | None:
    """Stack a batch, leaving out images that failed to load (None when all failed)."""
    import torch

    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return torch.stack([image for image, _ in kept]), torch.stack([target for _, target in kept])


class EpochSampler:
    """Shuffles with a generator seeded by (seed, epoch) and shards across processes.

    Why not RandomSampler: its order depends on the global RNG, so a run resumed at an
    epoch boundary would see a different order than an uninterrupted one.
    """

    def __init__(self, size: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        else:
            order = np.arange(self.size)
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


# -- prepare from a Danbooru-style parquet --------------------------------------------------


@dataclass
class PrepareResult:
    """What :func:`prepare_from_parquet` wrote."""

    output: Path
    images: int
    skipped_missing: int
    tags: int
    vocabulary_size: int


def prepare_from_parquet(
    parquet: str | Path,
    output: str | Path,
    image_column: str = "file_path",
    image_root: str | Path | None = None,
    tag_columns: Sequence[str] | None = None,
    rating_column: str | None = "rating",
    min_count: int = 1,
    separator: str = ", ",
    link: str = "symlink",
) -> PrepareResult:
    """Build image/tag pairs and ``selected_tags.csv`` from Danbooru-style metadata.

    ``tag_columns`` default to the ``tag_string_*`` columns present (space-separated,
    Danbooru style); their category comes from the column name. ``rating`` letters
    (g/s/q/e) or words become rating tags (category 9). Images are found in
    ``image_column`` (absolute, or relative to ``image_root``, default the parquet's
    folder) and placed in ``output/images`` as ``link`` (symlink, hardlink or copy)
    with a tag file beside each; rows whose image is missing are skipped and counted.
    ``selected_tags.csv`` lists tags seen at least ``min_count`` times.
    """
    import pyarrow.parquet as pq

    parquet = Path(parquet)
    output = Path(output)
    if link not in ("symlink", "hardlink", "copy"):
        raise TaggerDataError(f"link must be symlink, hardlink or copy, got {link!r}")
    if not parquet.is_file():
        raise TaggerDataError(f"{parquet}: metadata parquet not found; check the path")
    try:
        table = pq.read_table(parquet)
    except Exception as error:  # pyarrow raises several unrelated types
        raise TaggerDataError(f"{parquet}: cannot read as Parquet ({error})") from error
    columns = table.column_names
    if image_column not in columns:
        raise TaggerDataError(
            f"{parquet}: no image column {image_column!r} (columns: {', '.join(columns)}); "
            "pass --image-column with the column holding image paths"
        )
    if tag_columns is None:
        tag_columns = [name for name in DANBOORU_TAG_COLUMNS if name in columns]
    missing_columns = [name for name in tag_columns if name not in columns]
    if missing_columns or not tag_columns:
        raise TaggerDataError(
            f"{parquet}: tag columns {missing_columns or 'tag_string_*'} not found "
            f"(columns: {', '.join(columns)}); "
            "pass --tag-column for each column of space-separated tags"
        )
    if rating_column is not None and rating_column not in columns:
        _log.info("%s: no %r column; no rating tags are written", parquet, rating_column)
        rating_column = None
    root = Path(image_root) if image_root is not None else parquet.parent
    images_dir = output / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    data = table.to_pydict()
    counts: Counter = Counter()
    categories: dict[str, int] = {}
    used_names: set[str] = set()
    written = skipped = 0
    for row in range(table.num_rows):
        raw_path = data[image_column][row]
        if not raw_path:
            skipped += 1
            continue
        source = Path(raw_path)
        if not source.is_absolute():
            source = root / source
        if not source.is_file():
            skipped += 1
            continue
        tags: list[str] = []
        if rating_column is not None and data[rating_column][row]:
            value = str(data[rating_column][row]).strip().lower()
            rating = RATING_TAGS.get(value, value)
            tags.append(rating)
            categories.setdefault(rating, RATING_CATEGORY)
        for column in tag_columns:
            category = DANBOORU_TAG_COLUMNS.get(column, 0)
            for tag in str(data[column][row] or "").split():
                if tag not in tags:
                    tags.append(tag)
                    categories.setdefault(tag, category)
        counts.update(tags)
        name = source.name
        if name in used_names:
            name = f"{row}_{source.name}"
        used_names.add(name)
        target = images_dir / name
        _place(source, target, link)
        atomic_write_text(target.with_suffix(".txt"), separator.join(tags) + "\n")
        written += 1
    if skipped:
        _log.warning("%s: %d rows skipped because their image file was missing", parquet, skipped)
    if not written:
        raise TaggerDataError(
            f"{parquet}: none of the {table.num_rows} images were found under {root}; "
            "pass --image-root with the folder the paths are relative to"
        )
    vocabulary = Vocabulary.from_counts(counts, min_count=min_count, categories=categories)
    vocabulary.write_csv(output / "selected_tags.csv")
    return PrepareResult(output, written, skipped, len(counts), len(vocabulary))


def _place(source: Path, target: Path, link: str) -> None:
    """Put an image into the prepared folder; replaces an earlier run's entry atomically."""
    temp = target.with_name(f".{target.name}.ck-tmp-{os.getpid()}")
    if temp.exists() or temp.is_symlink():
        temp.unlink()
    if link == "symlink":
        temp.symlink_to(source.resolve())
    elif link == "hardlink":
        os.link(source, temp)
    else:
        shutil.copy2(source, temp)
    os.replace(temp, target)
