"""Head-only (linear-probe) tagger training, and the on-disk cache of the frozen backbone's features.

Why: while the backbone is frozen (``model.freeze_backbone`` or the first
``model.freeze_backbone_epochs``) every epoch computes the same pooled features for the same
images; only the classifier learns. ``model.cache_features`` computes them once, keeps
them on disk and trains the head from them, so a cached epoch costs a linear layer per
batch instead of a backbone forward (kohya's ``cache_latents`` for taggers).

What a cached feature is: ``model.forward_head(model.forward_features(x), pre_logits=True)``
of the timm backbone in eval mode, in float32: exactly what the classifier reads; the
dropout timm applies before it (``model.drop_rate``) is applied to the cached features
while training, as the model would. With ``data.hflip`` each image keeps two views (as is
and mirrored), and each training step draws one with the same coin the image path tosses,
so a cached run sees what an uncached one sees (the same draws with ``data.num_workers: 0``;
a cached epoch loads in the main process, where the image path's workers toss their own).

Training reads the features from memory (loaded once from the entries); the entries are
what later epochs, resumed runs and other runs on the same data and backbone reuse.

Where and under what key: ``CACHE/<backbone fingerprint>/<aa>/<image sha256>.safetensors``
(``CACHE`` is ``model.feature_cache_dir``, default ``OUTPUT/feature_cache``). The fingerprint
hashes the backbone's weights and buffers (every tensor but the classifier), its name and
build arguments, the preprocessing (size, mean, std, interpolation), the precision and the
device type; the image key is the SHA-256 of the file's bytes. A changed image or changed
weights therefore miss and are computed again; an entry that cannot be read (cut short,
garbage) is computed again and replaced, never fatal. Entries are written atomically,
and several runs (a learning-rate sweep) share one cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captionkit.core.errors import CaptionkitError

_log = logging.getLogger(__name__)

FEATURE_VERSION = 1  # what a cached entry holds; bumped when that changes, so old entries miss
FEATURES_KEY = "features"


class FeatureCacheError(CaptionkitError):
    """The backbone cannot be split into features + classifier; the message says what to use instead."""


# -- the backbone, split --------------------------------------------------------------------


def classifier_of(model: Any) -> Any:
    """The classifier module timm's ``get_classifier`` names (a Linear on the pooled features)."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if classifier is None or isinstance(classifier, (tuple, list)) or not hasattr(classifier, "weight"):
        raise FeatureCacheError(
            f"{type(model).__name__} has no single classifier layer (timm get_classifier), so its head cannot be "
            "trained alone; use another model.backbone or leave model.freeze_backbone off"
        )
    return classifier


def pooled_features(model: Any, images: Any) -> Any:
    """What the classifier reads: timm's ``forward_features`` then ``forward_head(pre_logits=True)``."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def set_channels_last(model: Any, channels_last: bool) -> bool:
    """Lay the model's 4-D weights out channels-last (or back); True when anything moved.

    Why: a frozen backbone's forward-only convolutions run faster so on CPU (resnet10t, batch 32:
    18% at 64 px, 27% at 128 px; convnext_atto and vit_tiny no slower), with the images left as
    they come (converting them too measured slower at 64 px); a whole-model training step measured
    the same either way, so the layout changes only while the backbone is frozen. Moving replaces the weights'
    storage (the parameters stay the same objects, so optimizers keep them); anything holding the
    old tensors (the EMA's gathered lists) must gather them again.
    """
    import torch

    layout = torch.channels_last if channels_last else torch.contiguous_format
    tensors = [tensor for tensor in (*model.parameters(), *model.buffers()) if tensor.dim() == 4]
    if all(tensor.is_contiguous(memory_format=layout) for tensor in tensors):
        return False
    model.to(memory_format=layout)
    return True


def head_logits(model: Any, features: Any, drop_rate: float, training: bool) -> Any:
    """The classifier on pooled features, with the dropout timm puts in front of it while training."""
    import torch.nn.functional as functional

    if drop_rate and training:
        features = functional.dropout(features, p=drop_rate, training=True)
    return classifier_of(model)(features)


def check_split(model: Any, size: tuple[int, int]) -> None:
    """The split reproduces the model's own forward (eval mode), or a clear error before training."""
    import torch

    classifier_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = torch.randn(1, 3, size[0], size[1], generator=torch.Generator().manual_seed(0))
            probe = probe.to(next(model.parameters()).device)
            # the class's forward: accelerate wraps the instance's in autocast with mixed precision, which
            # would compare a bf16 forward with a float32 split
            whole = type(model).forward(model, probe).float()
            split = head_logits(model, pooled_features(model, probe), 0.0, False).float()
    except Exception as error:  # noqa: BLE001 - any failure of the timm API means the same thing here
        raise FeatureCacheError(
            f"{type(model).__name__} cannot be split into forward_features/forward_head ({error}); use another "
            "model.backbone or leave model.freeze_backbone off"
        ) from error
    finally:
        model.train(was_training)
    if not torch.allclose(whole, split, rtol=1e-3, atol=1e-4):
        raise FeatureCacheError(
            f"{type(model).__name__}: classifier(forward_head(pre_logits=True)) differs from the model's output, so "
            "a head trained alone would not be the model's head; use another model.backbone or leave "
            "model.freeze_backbone off"
        )


def backbone_fingerprint(model: Any, description: dict[str, Any]) -> str:
    """SHA-256 over ``description`` and every backbone tensor (weights and buffers, not the classifier)."""
    from captionkit.core.identity import update_with_tensors
    from captionkit.train.tagger_export import classifier_name

    head = classifier_name(model) + "."
    digest = hashlib.sha256(json.dumps({**description, "version": FEATURE_VERSION}, sort_keys=True).encode())
    update_with_tensors(digest, ((name, tensor) for name, tensor in model.state_dict().items()
                                 if not name.startswith(head)))
    return digest.hexdigest()


# -- the cache on disk ----------------------------------------------------------------------


@dataclass
class CacheStats:
    """What one preparation found: entries reused, computed, replaced because unreadable, images unreadable."""

    reused: int = 0
    computed: int = 0
    corrupt: int = 0
    unreadable_images: int = 0



@dataclass
class FeatureCache:
    """Entries ``root/<fingerprint>/<aa>/<image sha256>.safetensors`` of one backbone."""

    root: Path
    fingerprint: str
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.fingerprint[:24]

    def path(self, image_hash: str) -> Path:
        return self.folder / image_hash[:2] / f"{image_hash}.safetensors"

    def read(self, image_hash: str, views: int, width: int | None = None) -> Any | None:
        """The entry's [views, width] float32 features; None when missing; :class:`CorruptEntry` when unusable."""
        from safetensors import safe_open

        path = self.path(image_hash)
        try:
            with safe_open(str(path), framework="np") as stream:
                metadata = stream.metadata() or {}
                array = stream.get_tensor(FEATURES_KEY)
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001 - safetensors raises several types for a damaged file
            raise CorruptEntry(f"{path}: {error}") from error
        if (metadata.get("fingerprint") != self.fingerprint or metadata.get("image_sha256") != image_hash
                or array.ndim != 2 or array.shape[0] < views or (width is not None and array.shape[1] != width)):
            raise CorruptEntry(f"{path}: holds features of another image, backbone or shape")
        return array[:views]

    def write(self, image_hash: str, features: Any) -> None:
        """One entry ([views, width] float32), atomically (no fsync: a lost entry is computed again)."""
        from safetensors.numpy import save

        from captionkit.core.atomic import atomic_write_bytes

        data = save({FEATURES_KEY: np.ascontiguousarray(features, dtype=np.float32)},
                    metadata={"fingerprint": self.fingerprint, "image_sha256": image_hash,
                              "version": str(FEATURE_VERSION)})
        atomic_write_bytes(self.path(image_hash), data, durable=False)

    def describe(self) -> None:
        """``about.json`` beside the entries: which backbone and preprocessing they belong to (for people)."""
        from captionkit.core.atomic import atomic_write_json

        about = self.folder / "about.json"
        if not about.is_file():
            about.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(about, {"fingerprint": self.fingerprint, **self.description})


class CorruptEntry(Exception):
    """A cache entry that exists but cannot be used; it is computed again."""


def image_hashes(paths: Sequence[Path], workers: int = 8) -> list[str | None]:
    """SHA-256 of each image file (None for one that cannot be read), in a thread pool."""
    from captionkit.core.identity import file_digest

    def one(path: Path) -> str | None:
        try:
            return file_digest(Path(path))
        except OSError as error:
            _log.warning("skipping a training image: %s cannot be read (%s)", path, error.strerror or error)
            return None

    if len(paths) < 64:
        return [one(path) for path in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


class _ViewsDataset:
    """Images → [views, C, H, W] (as is, then mirrored); None for an image that cannot be decoded."""

    def __init__(self, paths: Sequence[Path], preprocessing: Any, views: int) -> None:
        self.paths, self.preprocessing, self.views = list(paths), preprocessing, views

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, Any] | None:
        import torch
        from PIL import Image

        from captionkit.core.errors import ImageLoadError
        from captionkit.core.images import load_image

        size = self.preprocessing.size
        try:
            image = load_image(self.paths[position], target_size=(size[1], size[0])).image
        except ImageLoadError as error:
            _log.warning("skipping a training image: %s", error)
            return None
        arrays = [self.preprocessing(image)]
        if self.views > 1:
            arrays.append(self.preprocessing(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
        return position, torch.from_numpy(np.stack(arrays))


def _collate_views(batch: list) -> tuple[list[int], Any] | None:
    import torch

    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return [position for position, _ in kept], torch.cat([views for _, views in kept])


def fill_cache(cache: FeatureCache, model: Any, paths: Sequence[Path], views: int, preprocessing: Any,
               accelerator: Any, batch_size: int, num_workers: int) -> tuple[Any, list[bool], CacheStats]:
    """Every image of ``paths`` gets an entry with ``views`` views; returns them as one [images, views, width]
    float32 tensor, which rows hold features (False: the image cannot be read), and what was done.

    Entries that exist are read back (which checks them) and reused; missing and unreadable
    ones are computed in batches with ``model`` in eval mode and written. Training reads the
    returned tensor, not the files: images × views × width × 4 bytes of memory (100,000
    images, two views, 768 wide: 0.6 GB) for a step that costs an index instead of a file read.
    """
    import torch

    stats = CacheStats()
    hashes = image_hashes(paths)
    found: list[Any] = [None] * len(paths)
    missing: list[int] = []
    width: int | None = None
    for position, image_hash in enumerate(hashes):
        if image_hash is None:
            stats.unreadable_images += 1
            continue
        try:
            found[position] = cache.read(image_hash, views, width)
        except CorruptEntry as error:
            _log.warning("feature cache entry replaced: %s", error)
            stats.corrupt += 1
        if found[position] is None:
            missing.append(position)
            continue
        width = int(found[position].shape[1])
        stats.reused += 1
    if missing:
        check_split(model, tuple(preprocessing.size))
        cache.describe()
        was_training = model.training
        model.eval()
        loader = torch.utils.data.DataLoader(
            _ViewsDataset([paths[i] for i in missing], preprocessing, views), batch_size=max(1, batch_size // views),
            num_workers=num_workers, collate_fn=_collate_views,
            generator=torch.Generator().manual_seed(0),  # never draws from the global RNG training uses
        )
        try:
            with torch.inference_mode():
                for batch in loader:
                    if batch is None:
                        continue
                    positions, images = batch
                    with accelerator.autocast():
                        features = pooled_features(model, images.to(accelerator.device))
                    features = features.float().reshape(len(positions), views, -1).cpu().numpy()
                    for row, local in enumerate(positions):
                        position = missing[local]
                        image_hash = hashes[position]
                        assert image_hash is not None
                        cache.write(image_hash, features[row])
                        found[position] = features[row]
                        stats.computed += 1
        finally:
            model.train(was_training)
        stats.unreadable_images += sum(1 for position in missing if found[position] is None)
    available = [item is not None for item in found]
    width = next((int(item.shape[1]) for item in found if item is not None), 0)
    table = np.zeros((len(paths), views, width), dtype=np.float32)
    for position, item in enumerate(found):
        if item is not None:
            table[position] = item
    return torch.from_numpy(table), available, stats


class CachedFeatureDataset:
    """Cached features → batches of (float32 [batch, width], multi-hot [batch, tags]).

    An item is only (row, view); :meth:`collate` gathers a batch with one indexing operation
    instead of building tensors per image. The view is drawn with the same ``torch.rand(()) < 0.5``
    :class:`~captionkit.train.tagger_data.TaggerDataset` tosses, in the same place (after a
    successful read), so a cached epoch mirrors the same images as the image path.
    """

    def __init__(self, features: Any, available: Sequence[bool], labels: Sequence[np.ndarray], num_tags: int,
                 hflip: bool) -> None:
        self.features, self.available, self.labels = features, list(available), list(labels)
        self.num_tags, self.hflip = num_tags, hflip

    def __len__(self) -> int:
        return len(self.available)

    def __getitem__(self, position: int) -> tuple[int, int] | None:
        import torch

        if not self.available[position]:
            return None
        return position, 1 if self.hflip and torch.rand(()).item() < 0.5 else 0

    def collate(self, batch: list[tuple[int, int] | None]) -> tuple[Any, Any] | None:
        import torch

        kept = [item for item in batch if item is not None]
        if not kept:
            return None
        rows = torch.tensor([row for row, _ in kept])
        views = torch.tensor([view for _, view in kept])
        labels = [self.labels[row] for row, _ in kept]
        targets = torch.zeros(len(kept), self.num_tags, dtype=torch.float32)
        owners = np.repeat(np.arange(len(kept)), [len(rows_of) for rows_of in labels])
        tags = np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, dtype=np.int64)
        targets[torch.from_numpy(owners), torch.from_numpy(tags)] = 1.0
        return self.features[rows, views], targets
