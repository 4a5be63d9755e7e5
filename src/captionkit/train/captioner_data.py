"""Image/caption pairs for captioner training: sources, caption augmentation, batching.

Why this shape: the seed scripts read one layout each, padded every caption to 1024
tokens and counted the pads in the loss, and parsed augmentation flags that never
reached the data set. Here every source becomes a list of :class:`CaptionItem`; the
training set applies augmentation per sample from a seed that depends only on (run
seed, epoch, index), so a resumed run sees exactly the captions an uninterrupted one
would; the collator pads to the longest caption of the batch and labels pads ``-100``.

Sources (:class:`DatasetSpec.path`):

- a folder of images with sidecar caption files (kohya layout, recursive, extension
  configurable);
- a folder with ``metadata.jsonl`` (``file_name`` + ``text``, the HF imagefolder
  convention), or that file itself;
- a ``.jsonl`` or ``.parquet`` manifest with a path column (``path``, ``file_name``,
  ``image``, ``image_path``) and a caption column (``caption``, ``text``), such as the
  JSONL/Parquet exports captionkit writes. Relative paths are resolved against the
  manifest's folder.

Each may be in object storage (``s3://bucket/prefix``, ``gs://``, ``az://``, ``hf://``: a prefix
of images with caption objects beside them, or a manifest object), and a manifest's path column
may hold URLs. Those images are fetched once into the local object mirror and read from there
(:mod:`captionkit.train.remote_data`); an item's ``image`` is then the local copy.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jxl", ".avif"}
PATH_COLUMNS = ("path", "file_name", "image", "image_path", "file")
CAPTION_COLUMNS = ("caption", "text")


@dataclass
class DatasetSpec:
    """One data source and the task prompt its captions answer."""

    path: Path | str  # a URL string for data in object storage
    task: str = "<CAPTION>"
    caption_extension: str = ".txt"
    recursive: bool = True
    path_column: str | None = None
    caption_column: str | None = None
    repeats: int = 1

    def __post_init__(self) -> None:
        if not self.caption_extension.startswith("."):
            raise ValueError(f"caption_extension must start with a dot, e.g. '.txt', got {self.caption_extension!r}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if not self.task.strip():
            raise ValueError("task must be a non-empty prompt such as '<CAPTION>'")


@dataclass
class AugmentConfig:
    """Caption augmentation for training samples (never applied to validation).

    Captions are split into parts on ``separator``; the first ``keep_first_parts`` stay in
    place (e.g. a trigger word or the subject), the rest may be shuffled and dropped.
    """

    shuffle_parts: bool = False
    keep_first_parts: int = 0
    part_dropout: float = 0.0
    caption_dropout: float = 0.0
    separator: str = ","

    def __post_init__(self) -> None:
        for name in ("part_dropout", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if self.keep_first_parts < 0:
            raise ValueError(f"keep_first_parts must be 0 or more, got {self.keep_first_parts}")
        if not self.separator:
            raise ValueError("separator must not be empty")

    @property
    def active(self) -> bool:
        return self.shuffle_parts or self.part_dropout > 0 or self.caption_dropout > 0


@dataclass
class CaptionItem:
    """One training pair."""

    image: Path
    caption: str
    task: str


@dataclass
class DataReport:
    """What loading found, so users see skipped files instead of silently smaller data."""

    items: int = 0
    missing_captions: list[str] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)
    long_captions: list[str] = field(default_factory=list)
    long_captions_skipped: int = 0


def _pick_column(rows: list[dict[str, Any]], wanted: str | None, candidates: Sequence[str], path: Path | str,
                 what: str, setting: str) -> str:
    columns = list(rows[0]) if rows else []
    if wanted is not None:
        if rows and wanted not in rows[0]:
            raise ValueError(f"{path}: no column {wanted!r} for the {what}; columns are {columns}. "
                             f"Fix {setting} in the data set entry")
        return wanted
    for name in candidates:
        if rows and name in rows[0]:
            return name
    raise ValueError(f"{path}: found no {what} column (looked for {', '.join(candidates)}); columns are "
                     f"{columns}. Set {setting} in the data set entry")


def _items_from_table(spec: DatasetSpec, table: Path | str, report: DataReport,
                      io_workers: int = 16) -> list[CaptionItem]:
    from captionkit.train import remote_data

    rows = remote_data.read_table(table)  # .jsonl/.parquet/.csv, a local file or an object
    if not rows:
        return []
    path_column = _pick_column(rows, spec.path_column, PATH_COLUMNS + ("url",), table, "image path", "path_column")
    caption_column = _pick_column(rows, spec.caption_column, CAPTION_COLUMNS, table, "caption", "caption_column")
    pairs: list[tuple[Path | str, str]] = []
    for row in rows:
        raw_path, caption = row.get(path_column), row.get(caption_column)
        if not raw_path:
            continue
        image = remote_data.resolve(str(raw_path), table)
        if caption is None or not str(caption).strip():
            report.missing_captions.append(str(image))
            continue
        if isinstance(image, Path) and not image.exists():
            report.missing_images.append(str(image))
            continue
        pairs.append((image, str(caption).strip()))
    urls = [image for image, _ in pairs if isinstance(image, str)]
    local, failed = remote_data.fetch(urls, io_workers) if urls else ({}, {})
    report.missing_images.extend(failed)
    return [CaptionItem(image=local[image] if isinstance(image, str) else image, caption=caption, task=spec.task)
            for image, caption in pairs if not isinstance(image, str) or image in local]


def _items_from_prefix(spec: DatasetSpec, prefix: str, report: DataReport, io_workers: int) -> list[CaptionItem]:
    """A prefix of images with caption objects beside them (``a.png`` + ``a.txt``), fetched into the mirror."""
    from captionkit.train import remote_data

    found = remote_data.list_pairs(prefix, spec.caption_extension, frozenset(IMAGE_EXTENSIONS), spec.recursive)
    for image in found.images:
        if found.sidecars[image] is None:
            report.missing_captions.append(image)
    paired = [image for image in found.images if found.sidecars[image] is not None]
    wanted = [url for image in paired for url in (image, found.sidecars[image])]
    local, failed = remote_data.fetch([url for url in wanted if url], io_workers, found.signatures)
    items = []
    for image in paired:
        sidecar = found.sidecars[image]
        if image not in local or sidecar not in local:
            report.missing_images.append(image)  # its 403/404/5xx was logged by fetch
            continue
        caption = local[str(sidecar)].read_text(encoding="utf-8").strip()
        if not caption:
            report.missing_captions.append(image)
            continue
        items.append(CaptionItem(image=local[image], caption=caption, task=spec.task))
    return items


def _remote_items(spec: DatasetSpec, url: str, report: DataReport, io_workers: int) -> list[CaptionItem]:
    from captionkit.core import locations

    try:
        found = locations.kind(url)
    except locations.RemoteError as error:
        raise ValueError(str(error)) from error  # the URL, the cause (403/404) and the fix
    if found == "directory":
        metadata = url.rstrip("/") + "/metadata.jsonl"
        try:
            has_metadata = locations.kind(metadata) == "file"
        except locations.RemoteError:
            has_metadata = False
        if has_metadata:
            return _items_from_table(spec, metadata, report, io_workers)
        return _items_from_prefix(spec, url.rstrip("/"), report, io_workers)
    if url.lower().endswith((".jsonl", ".parquet")):
        return _items_from_table(spec, url, report, io_workers)
    raise ValueError(f"{url}: unsupported data set object; use a prefix (folder), a .jsonl or a .parquet manifest")


def _items_from_folder(spec: DatasetSpec, folder: Path, report: DataReport) -> list[CaptionItem]:
    pattern = "**/*" if spec.recursive else "*"
    items = []
    for image in sorted(folder.glob(pattern)):
        if image.suffix.lower() not in IMAGE_EXTENSIONS or not image.is_file():
            continue
        caption_file = image.with_suffix(spec.caption_extension)
        if not caption_file.exists():
            report.missing_captions.append(str(image))
            continue
        caption = caption_file.read_text(encoding="utf-8").strip()
        if not caption:
            report.missing_captions.append(str(image))
            continue
        items.append(CaptionItem(image=image, caption=caption, task=spec.task))
    return items


def load_items(spec: DatasetSpec, report: DataReport | None = None, io_workers: int = 16) -> list[CaptionItem]:
    """Read one data source into caption items (repeated ``spec.repeats`` times).

    ``io_workers``: objects fetched at once when the source (or a manifest's rows) is in object storage.
    """
    from captionkit.train import remote_data

    report = report if report is not None else DataReport()
    if remote_data.is_remote(spec.path):
        items = _remote_items(spec, str(spec.path), report, io_workers)
        path: Path | str = str(spec.path)
    else:
        path = Path(spec.path)
        items = _local_items(spec, path, report, io_workers)
    if not items:
        raise ValueError(
            f"{path}: no image/caption pairs found (images without captions: {len(report.missing_captions)}, "
            f"missing images: {len(report.missing_images)}); check caption_extension and the columns"
        )
    items = items * spec.repeats
    report.items += len(items)
    return items


def _local_items(spec: DatasetSpec, path: Path, report: DataReport, io_workers: int) -> list[CaptionItem]:
    if not path.exists():
        raise ValueError(f"{path}: data set path not found; fix 'path' in the data set entry")
    if path.is_dir():
        metadata = path / "metadata.jsonl"
        if metadata.exists():
            return _items_from_table(spec, metadata, report, io_workers)
        return _items_from_folder(spec, path, report)
    if path.suffix.lower() in (".jsonl", ".parquet"):
        return _items_from_table(spec, path, report, io_workers)
    raise ValueError(f"{path}: unsupported data set file; use a folder, a .jsonl or a .parquet manifest")


def split_items(items: list[CaptionItem], ratio: float, seed: int) -> tuple[list[CaptionItem], list[CaptionItem]]:
    """Hold out ``ratio`` of the distinct images for validation, deterministically by seed.

    Splitting by image (not by item) keeps repeats of one image on the same side.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"val_split must be between 0 and 1 (exclusive), got {ratio}")
    images = sorted({str(item.image) for item in items})
    random.Random(seed).shuffle(images)
    count = max(1, round(len(images) * ratio))
    if count >= len(images):
        raise ValueError(f"val_split {ratio} leaves no training images out of {len(images)}; lower it")
    held = set(images[:count])
    train = [item for item in items if str(item.image) not in held]
    val = []
    seen: set[str] = set()
    for item in items:
        if str(item.image) in held and str(item.image) not in seen:
            seen.add(str(item.image))
            val.append(item)
    return train, val


def augment_caption(caption: str, config: AugmentConfig, rng: random.Random) -> str:
    """Apply whole-caption dropout, then part shuffle and part dropout past the frozen prefix."""
    if config.caption_dropout > 0 and rng.random() < config.caption_dropout:
        return ""
    if not (config.shuffle_parts or config.part_dropout > 0):
        return caption
    parts = [part.strip() for part in caption.split(config.separator)]
    parts = [part for part in parts if part]
    frozen, movable = parts[: config.keep_first_parts], parts[config.keep_first_parts :]
    if config.part_dropout > 0:
        movable = [part for part in movable if rng.random() >= config.part_dropout]
    if config.shuffle_parts:
        rng.shuffle(movable)
    joiner = config.separator + " " if config.separator.strip() else config.separator
    return joiner.join(frozen + movable)


class CaptionDataset:
    """Map-style data set of (image, task, caption) with per-(epoch, index) augmentation."""

    def __init__(self, items: list[CaptionItem], augment: AugmentConfig | None = None, seed: int = 0) -> None:
        self.items = items
        self.augment = augment if augment is not None and augment.active else None
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_for(self, index: int, epoch: int | None = None) -> str:
        item = self.items[index]
        if self.augment is None:
            return item.caption
        # String seeds hash with SHA-512 in ``random``: stable across processes and runs.
        rng = random.Random(f"{self.seed}/{self.epoch if epoch is None else epoch}/{index}")
        return augment_caption(item.caption, self.augment, rng)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """Sample ``key``: an index (augmented for :meth:`set_epoch`'s epoch) or (epoch, index), the
        form that reaches DataLoader workers kept across epochs with the right epoch."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        item = self.items[index]
        try:
            from PIL import Image, ImageOps

            with Image.open(item.image) as opened:
                image = ImageOps.exif_transpose(opened)
                image = image.convert("RGB")
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the run
            _log.warning("skipping %s: cannot decode the image (%s)", item.image, error)
            return None
        return {"image": image, "task": item.task, "caption": self.caption_for(index, epoch), "index": index}


#: Batches sorted together by :class:`EpochBatchSampler` with ``lengths``: larger groups pad less,
#: smaller ones keep batches more random (transformers' LengthGroupedSampler uses 50).
LENGTH_GROUP_BATCHES = 50


class EpochBatchSampler:
    """Deterministic batches per epoch that can start part-way through an epoch.

    Why not a DataLoader with ``shuffle=True``: resume must continue with the exact
    batch an uninterrupted run would see next, without decoding the skipped images.
    The order is a permutation seeded by (seed, epoch); each process takes every
    ``num_processes``-th batch.

    With ``lengths`` (each sample's caption length in tokens), batches are grouped by
    length, as ``group_by_length`` in transformers: the shuffled order is cut into groups of
    :data:`LENGTH_GROUP_BATCHES` batches, each group is sorted by length (longest first, ties
    in shuffled order) and cut into batches, and the batches are shuffled, the one with the
    longest caption first (an out-of-memory error then shows at the first step). Samples of
    a batch then have similar lengths, so less of the batch is padding; the batches still
    change every epoch and depend only on (seed, epoch).

    ``with_epoch`` yields (epoch, index) pairs instead of indices, for a data set that reads
    the epoch from its keys (:class:`CaptionDataset`): DataLoader workers kept across epochs
    hold their own copy of the data set, which :meth:`CaptionDataset.set_epoch` cannot reach.
    """

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool = True,
                 process_index: int = 0, num_processes: int = 1, drop_last: bool = False,
                 lengths: Sequence[int] | None = None, with_epoch: bool = False) -> None:
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"lengths has {len(lengths)} entries for {size} samples")
        self.size = size
        self.lengths = lengths
        self.with_epoch = with_epoch
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.process_index = process_index
        self.num_processes = num_processes
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def batches_per_epoch(self) -> int:
        total = self.size // self.batch_size if self.drop_last else math.ceil(self.size / self.batch_size)
        return total // self.num_processes if self.num_processes > 1 else total

    def _all_batches(self) -> list[list[int]]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(f"{self.seed}/order/{self.epoch}").shuffle(order)
        if self.lengths is not None:
            order = self._grouped_by_length(order)
        batches = [order[start : start + self.batch_size] for start in range(0, self.size, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.lengths is not None and self.shuffle and batches:
            lengths = self.lengths
            random.Random(f"{self.seed}/length-groups/{self.epoch}").shuffle(batches)
            longest = max(range(len(batches)), key=lambda number: max(lengths[index] for index in batches[number]))
            batches.insert(0, batches.pop(longest))
        per_process = len(batches) // self.num_processes if self.num_processes > 1 else len(batches)
        return batches[self.process_index :: self.num_processes][:per_process]

    def _grouped_by_length(self, order: list[int]) -> list[int]:
        """``order`` with each group of :data:`LENGTH_GROUP_BATCHES` batches sorted longest first."""
        lengths = self.lengths
        assert lengths is not None
        group = self.batch_size * LENGTH_GROUP_BATCHES
        grouped: list[int] = []
        for start in range(0, len(order), group):
            grouped += sorted(order[start : start + group], key=lambda index: -lengths[index])
        return grouped

    def __iter__(self):
        for batch in self._all_batches()[self.start_batch :]:
            yield [(self.epoch, index) for index in batch] if self.with_epoch else batch

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start_batch)


class CaptionCollator:
    """Turns samples into model inputs; caption pads become ``-100`` so they carry no loss.

    Why truncation here too: augmentation never lengthens a caption by much, but BPE
    merges can shift by a token after shuffling; the limit must hold for every batch.
    """

    def __init__(self, processor: Any, max_target_tokens: int) -> None:
        self.processor = processor
        self.max_target_tokens = max_target_tokens

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return None
        tokenizer = self.processor.tokenizer
        inputs = self.processor(
            text=[sample["task"] for sample in samples],
            images=[sample["image"] for sample in samples],
            return_tensors="pt",
            padding=True,
        )
        labels = tokenizer(
            [sample["caption"] for sample in samples],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_target_tokens,
        )
        target = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        return {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"],
            "labels": target,
            "captions": [sample["caption"] for sample in samples],
            "indices": [sample["index"] for sample in samples],
            # Counted here, on the host: counting on the GPU would make every step wait for it.
            "target_tokens": int(labels["attention_mask"].sum()),
        }


def caption_lengths(items: list[CaptionItem], tokenizer: Any) -> dict[str, int]:
    """Each distinct caption's length in tokens (each caption tokenized once)."""
    unique = sorted({item.caption for item in items})
    return dict(zip(unique, (len(ids) for ids in tokenizer(unique)["input_ids"]), strict=True)) if unique else {}


def check_caption_lengths(items: list[CaptionItem], tokenizer: Any, max_target_tokens: int,
                          policy: Literal["truncate", "skip"], report: DataReport) -> list[CaptionItem]:
    """Report captions over the token limit, then truncate them (in the collator) or drop them."""
    if not items:
        return items
    lengths = caption_lengths(items, tokenizer)
    long = {caption for caption, length in lengths.items() if length > max_target_tokens}
    if not long:
        return items
    long_items = [item for item in items if item.caption in long]
    report.long_captions.extend(sorted({str(item.image) for item in long_items}))
    action = "truncated to" if policy == "truncate" else "skipped; over"
    _log.warning(
        "%d captions exceed max_target_tokens=%d and are %s the limit (first: %s, %d tokens). "
        "Raise max_target_tokens or set long_captions: %s to change this.",
        len(long_items), max_target_tokens, action, long_items[0].image, lengths[long_items[0].caption],
        "skip" if policy == "truncate" else "truncate",
    )
    if policy == "skip":
        report.long_captions_skipped += len(long_items)
        return [item for item in items if item.caption not in long]
    return items


# -- a generated data set with known captions, for smoke tests and benchmarks -----------------

SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30)}
SHAPE_NAMES = ("circle", "square", "triangle")


def write_shapes_dataset(folder: str | Path, count: int, seed: int = 0, size: int = 64,
                         objects: int = 2, *, extent: int | None = None, jitter: int | None = None,
                         colours: Sequence[str] | None = None,
                         shapes: Sequence[str] | None = None) -> list[tuple[Path, str]]:
    """Write ``count`` PNGs of coloured shapes with captions such as "a red circle and a blue square".

    Why: proving that training works needs a data set whose captions follow from the
    pixels; a user can also run it to smoke-test their setup. Objects are placed left
    to right in separate slots and described in that order.

    The defaults draw each shape at a random size anywhere in its slot. ``extent`` fixes
    the shape size in pixels; ``jitter`` centres each shape in its slot and moves it by at
    most that many pixels; ``colours`` and ``shapes`` restrict the vocabulary (names from
    :data:`SHAPE_COLOURS` and :data:`SHAPE_NAMES`). Together they give an easier set for
    learning tests on a tiny model.
    """
    from PIL import Image, ImageDraw

    palette = list(SHAPE_COLOURS) if colours is None else list(colours)
    kinds = list(SHAPE_NAMES) if shapes is None else list(shapes)
    unknown = sorted(set(palette) - set(SHAPE_COLOURS)) + sorted(set(kinds) - set(SHAPE_NAMES))
    if unknown or not palette or not kinds:
        raise ValueError(f"unknown or empty colours/shapes {unknown}; choose from {list(SHAPE_COLOURS)} and "
                         f"{list(SHAPE_NAMES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    written = []
    slot = size // objects
    if extent is not None and not 4 <= extent <= min(slot, size - 2):
        raise ValueError(f"extent must be between 4 and {min(slot, size - 2)} pixels for {objects} objects in "
                         f"{size} px, got {extent}")
    if jitter is not None and jitter < 0:
        raise ValueError(f"jitter must be 0 or more pixels, got {jitter}")
    for number in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randint(90, 140) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        parts = []
        for position in range(objects):
            colour = rng.choice(palette)
            shape = rng.choice(kinds)
            side = extent if extent is not None else rng.randint(
                max(6, slot * 7 // 16), max(7, min(slot * 13 // 16, slot - 2)))
            if jitter is None:
                left = rng.randint(position * slot, (position + 1) * slot - side)
                top = rng.randint(size // 16, size - size // 16 - side)
            else:
                low, high = position * slot, (position + 1) * slot - side
                left = min(high, max(low, (low + high) // 2 + rng.randint(-jitter, jitter)))
                top = min(size - side, max(0, (size - side) // 2 + rng.randint(-jitter, jitter)))
            box = (left, top, left + side, top + side)
            if shape == "circle":
                draw.ellipse(box, fill=SHAPE_COLOURS[colour])
            elif shape == "square":
                draw.rectangle(box, fill=SHAPE_COLOURS[colour])
            else:
                draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])],
                             fill=SHAPE_COLOURS[colour])
            parts.append(f"a {colour} {shape}")
        caption = " and ".join(parts)
        image_path = folder / f"{number:05d}.png"
        image.save(image_path)
        image_path.with_suffix(".txt").write_text(caption, encoding="utf-8")
        written.append((image_path, caption))
    return written
