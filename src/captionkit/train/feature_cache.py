"""``cache_vision_features``: train a captioner from stored image features, not from pixels.

Why: with the vision tower frozen (LoRA on the language model, or ``freeze_vision: true``)
every epoch decodes each image, resizes it and runs DaViT again to get the same numbers;
kohya's ``cache_latents`` skips that for diffusion training. Here the first epoch computes
each image's features as the plain run does (same batch, same autocast), stores them, and
later epochs, resumed runs and new runs read them from disk: no decode, no resize, no
vision tower.

What is stored: the vision tower's output (``last_hidden_state``), before the multi-modal
projector, so the projector may still train (``freeze_vision`` alone, or the ``all_linear``
LoRA preset's ``image_projection`` if it left the tower out). Each entry is one safetensors
file, written atomically, under ``<cache>/<model fingerprint>/<xx>/<image sha256>.safetensors``:

- the image key is the SHA-256 of the file's bytes (a changed image under the same name is a
  new key; features are stored under the hash of the bytes they were computed from);
- the model fingerprint hashes the vision tower's tensors, its architecture settings, the
  image processor's settings, the mixed precision and the transformers version, so changed
  vision weights or preprocessing never read old entries (a changed language model does:
  its features are the same);
- the header records both keys and a CRC-32 of the data; a file that does not
  parse or check is recomputed and replaced, never trusted and never fatal.

Image-side randomness: captionkit augments captions only (the cache keeps caption
augmentation). The one random image-side operation is DaViT's stochastic depth
(``drop_path_rate``); a frozen tower runs in eval mode while training (the trainer's
``train_mode``) and the cache computes its features in eval mode too, so with
``drop_path_rate > 0`` both paths give the same, deterministic features.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captionkit.train.captioner_data import AugmentConfig, CaptionDataset, CaptionItem
from captionkit.train.config import ConfigError

_log = logging.getLogger(__name__)

FORMAT = "captionkit-vision-features/1"
TENSOR_NAME = "features"
DEFAULT_FOLDER = "vision_features"  # under output_dir unless vision_cache_dir is set
STALE_TEMP_SECONDS = 3600  # temp files older than this were left by a killed run (a shared folder may be in use)


# -- settings -----------------------------------------------------------------------------------------


def check_cache_settings(config: Any) -> None:
    """Refuse, at config load, a feature cache that would serve stale features (the tower would train)."""
    if config.vision_cache_dir is not None and not config.cache_vision_features:
        raise ValueError("vision_cache_dir is only used with cache_vision_features: true; set it or remove "
                         "vision_cache_dir")
    if not config.cache_vision_features:
        return
    if config.mode == "full" and not config.freeze_vision:
        raise ValueError("cache_vision_features needs a frozen vision tower: in mode 'full' set freeze_vision: "
                         "true (or use mode 'lora'), or set cache_vision_features: false")
    if config.mode in ("lora", "qlora") and config.lora.target_modules == "all_linear":
        raise ValueError("cache_vision_features needs a frozen vision tower, but lora.target_modules 'all_linear' "
                         "puts LoRA on it (DaViT qkv/proj/fc1/fc2); use 'language' (the default) or "
                         "'language_attention', or set cache_vision_features: false")


def require_frozen_vision(model: Any, mode: str) -> None:
    """After the model is built: no parameter of the vision tower may train (a regex, a list, modules_to_save)."""
    trainable = [name for name, parameter in florence_inner(model).vision_tower.named_parameters()
                 if parameter.requires_grad]
    if not trainable:
        return
    fix = ("make lora.target_modules and lora.modules_to_save leave model.vision_tower out (the preset "
           "'language' does)" if mode in ("lora", "qlora") else "set freeze_vision: true")
    raise ConfigError(f"cache_vision_features needs a frozen vision tower, but {len(trainable)} of its parameters "
                      f"would train (first: vision_tower.{trainable[0]}); {fix}, or set cache_vision_features: false")


# -- the model ----------------------------------------------------------------------------------------


def florence_inner(model: Any) -> Any:
    """The ``Florence2Model`` (vision tower, projector, BART) inside DDP, compile and PEFT wrappers."""
    from accelerate.utils import extract_model_from_parallel

    module = extract_model_from_parallel(model)
    if hasattr(module, "get_base_model"):
        module = module.get_base_model()
    return module.model


def _settings_of(config: Any) -> dict[str, Any]:
    """A config's own settings (its ``__init__`` arguments), without names, paths and versions."""
    names = [name for name, parameter in inspect.signature(type(config).__init__).parameters.items()
             if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)]
    values = config.to_dict()
    return {name: values[name] for name in names if name in values}


def vision_fingerprint(model: Any, processor: Any, mixed_precision: str) -> str:
    """What decides the stored features: vision weights and settings, preprocessing, precision, code version.

    Why hash the tensors in memory rather than the model folder (core.identity): a full
    fine-tune resumes from its checkpoint folder, whose vision tower is unchanged.
    """
    import transformers

    from captionkit.core.identity import update_with_tensors

    inner = florence_inner(model)
    digest = hashlib.sha256()
    described = {
        "format": FORMAT,
        "transformers": transformers.__version__,
        "mixed_precision": mixed_precision,
        "image_processor": _settings_of_processor(processor.image_processor),
        "vision_config": _settings_of(inner.config.vision_config),
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode("utf-8"))
    update_with_tensors(digest, inner.vision_tower.state_dict().items())
    return digest.hexdigest()


def _settings_of_processor(image_processor: Any) -> dict[str, Any]:
    values = dict(image_processor.to_dict())
    return {key: value for key, value in values.items() if not key.startswith("_") and key != "processor_class"}


@contextmanager
def features_as_image_input(model: Any) -> Iterator[None]:
    """Within the block, ``pixel_values`` given to ``model`` are stored vision features: the tower is skipped.

    Why this way: the forward still goes through ``model`` (DDP's hooks, accelerate's autocast,
    PEFT), and only Florence-2's ``get_image_features`` is replaced on the instance, by the
    projector applied to the given features. Validation and ``generate`` outside the block see
    the unchanged model.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = florence_inner(model)

    def get_image_features(pixel_values: Any, **_: Any) -> Any:
        return BaseModelOutputWithPooling(last_hidden_state=pixel_values,
                                          pooler_output=inner.multi_modal_projector(pixel_values))

    inner.get_image_features = get_image_features
    try:
        yield
    finally:
        del inner.get_image_features


# -- the store ----------------------------------------------------------------------------------------


def _data_checksum(data: bytes | memoryview) -> str:
    """CRC-32 of the tensor bytes: it catches damage, not tampering, at a few times the speed of a hash
    (it is checked on every read, every epoch)."""
    return f"{zlib.crc32(data):08x}"


@dataclass
class VisionFeatureCache:
    """Feature files of one model fingerprint in ``root``; safe to share between runs and processes."""

    root: Path
    fingerprint: str

    @property
    def folder(self) -> Path:
        return self.root / self.fingerprint[:24]

    def path_for(self, image_digest: str) -> Path:
        return self.folder / image_digest[:2] / f"{image_digest}.safetensors"

    def prepare(self, about: dict[str, Any]) -> None:
        """Create the folder, describe it for people, and remove temp files a killed run left."""
        from captionkit.core.atomic import atomic_write_json, is_temp_file

        self.folder.mkdir(parents=True, exist_ok=True)
        description = self.folder / "about.json"
        if not description.exists():
            atomic_write_json(description, {"format": FORMAT, "fingerprint": self.fingerprint, **about})
        now = time.time()
        for folder, _, files in os.walk(self.folder):
            for name in files:
                path = Path(folder) / name
                try:
                    if is_temp_file(name) and now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                        path.unlink()
                except OSError:
                    pass

    def load(self, image_digest: str) -> Any | None:
        """The stored features of an image, or None (absent, or unreadable: then it is recomputed)."""
        path = self.path_for(image_digest)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            _log.warning("vision feature cache: cannot read %s (%s); recomputing it", path, error)
            return None
        try:
            from safetensors.torch import load

            size = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + size])
            about = header.get("__metadata__") or {}
            if about.get("format") != FORMAT or about.get("fingerprint") != self.fingerprint:
                raise ValueError("written for another model or format")
            if about.get("image_sha256") != image_digest:
                raise ValueError("written for another image")
            if about.get("data_crc32") != _data_checksum(memoryview(raw)[8 + size :]):
                raise ValueError("the data does not match its checksum")
            return load(raw)[TENSOR_NAME]
        except Exception as error:  # noqa: BLE001 - a damaged entry is recomputed, whatever the damage
            _log.warning("vision feature cache: %s is damaged (%s); recomputing it", path, error)
            return None

    def store(self, image_digest: str, features: Any) -> None:
        """Write one image's features (a CPU tensor) atomically; a failed write only costs recomputing later."""
        import torch
        from safetensors.torch import save

        from captionkit.core.atomic import atomic_write_bytes

        features = features.detach().to("cpu").contiguous().clone()
        metadata = {"format": FORMAT, "fingerprint": self.fingerprint, "image_sha256": image_digest,
                    "data_crc32": _data_checksum(memoryview(features.reshape(-1).view(torch.uint8).numpy()))}
        try:
            # durable=False: a file lost to a power cut fails its checksum or is absent, and is recomputed.
            atomic_write_bytes(self.path_for(image_digest), save({TENSOR_NAME: features}, metadata), durable=False)
        except OSError as error:
            _log.warning("vision feature cache: cannot write %s (%s); training goes on without it",
                         self.path_for(image_digest), error)

    def cached_count(self, digests: list[str | None]) -> int:
        return sum(1 for digest in set(digests) if digest is not None and self.path_for(digest).is_file())


# -- data ---------------------------------------------------------------------------------------------


def image_digests(items: list[CaptionItem]) -> list[str | None]:
    """The SHA-256 of each item's image file (None when it cannot be read: the sample is skipped later)."""
    from captionkit.core.identity import file_digest

    by_path: dict[Path, str | None] = {}
    for item in items:
        if item.image not in by_path:
            try:
                by_path[item.image] = file_digest(item.image)
            except OSError:
                by_path[item.image] = None
    return [by_path[item.image] for item in items]


class CachedCaptionDataset(CaptionDataset):
    """The training set with stored features where they exist; the image (decoded from hashed bytes) where not."""

    def __init__(self, items: list[CaptionItem], cache: VisionFeatureCache, augment: AugmentConfig | None = None,
                 seed: int = 0) -> None:
        super().__init__(items, augment, seed)
        self.cache = cache
        self.digests = image_digests(items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """Sample ``key``: an index, or (epoch, index) as the training sampler hands it to kept workers."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        item = self.items[index]
        sample = {"task": item.task, "caption": self.caption_for(index, epoch), "index": index}
        digest = self.digests[index]
        features = self.cache.load(digest) if digest is not None else None
        if features is not None:
            return {**sample, "features": features}
        try:
            from PIL import Image, ImageOps

            data = item.image.read_bytes()
            with Image.open(io.BytesIO(data)) as opened:
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except Exception as error:  # noqa: BLE001 - one bad file must not stop the run
            _log.warning("skipping %s: cannot decode the image (%s)", item.image, error)
            return None
        return {**sample, "image": image, "digest": hashlib.sha256(data).hexdigest()}


class FeatureCollator:
    """Batches of prompt ids, labels and stored features; images without features go as ``pixel_values``.

    The prompt's ids (image placeholder tokens + task prompt) depend only on the task, so they
    are made once per task by the processor itself, and padded as the processor pads them.
    """

    def __init__(self, processor: Any, max_target_tokens: int) -> None:
        self.processor = processor
        self.max_target_tokens = max_target_tokens
        self.prompt_ids: dict[str, list[int]] = {}

    def _prompt(self, task: str) -> list[int]:
        if task not in self.prompt_ids:
            from PIL import Image

            inputs = self.processor(text=[task], images=[Image.new("RGB", (8, 8))], return_tensors="pt")
            self.prompt_ids[task] = inputs["input_ids"][0].tolist()
        return self.prompt_ids[task]

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        import torch

        samples = [sample for sample in samples if sample is not None]
        if not samples:
            return None
        tokenizer = self.processor.tokenizer
        prompts = tokenizer.pad({"input_ids": [self._prompt(sample["task"]) for sample in samples]},
                                padding=True, return_tensors="pt")
        labels = tokenizer([sample["caption"] for sample in samples], return_tensors="pt", padding=True,
                           truncation=True, max_length=self.max_target_tokens)
        batch: dict[str, Any] = {
            "input_ids": prompts["input_ids"],
            "attention_mask": prompts["attention_mask"],
            "labels": labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100),
            "captions": [sample["caption"] for sample in samples],
            "indices": [sample["index"] for sample in samples],
        }
        stored = [row for row, sample in enumerate(samples) if "features" in sample]
        missing = [row for row, sample in enumerate(samples) if "features" not in sample]
        if stored:
            batch["vision_features"] = torch.stack([samples[row]["features"] for row in stored])
            batch["feature_rows"] = stored
        if missing:
            images = [samples[row]["image"] for row in missing]
            batch["pixel_values"] = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            batch["missing_rows"] = missing
            batch["missing_digests"] = [samples[row]["digest"] for row in missing]
        return batch


# -- training -----------------------------------------------------------------------------------------


@dataclass
class FeatureCounts:
    """Training samples whose features came from the cache and those the vision tower computed (then stored)."""

    from_cache: int = 0
    computed: int = 0


def complete_features(model: Any, batch: dict[str, Any], cache: VisionFeatureCache,
                      counts: FeatureCounts) -> dict[str, Any]:
    """Compute the features the batch lacks (tower in eval mode, no gradient), store them, fill ``vision_features``.

    Runs inside the training step, under the loop's autocast, so the features of a first
    epoch are the ones the plain run computes in its forward.
    """
    import torch

    stored_rows = batch.get("feature_rows", [])
    counts.from_cache += len(stored_rows)
    if "pixel_values" not in batch:
        return batch
    missing_rows = batch["missing_rows"]
    tower = florence_inner(model).vision_tower
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            computed = tower(batch["pixel_values"]).last_hidden_state
    finally:
        tower.train(was_training)
    counts.computed += len(missing_rows)
    for digest, features in zip(batch["missing_digests"], computed, strict=True):
        cache.store(digest, features)
    if stored_rows:
        full = computed.new_empty((len(stored_rows) + len(missing_rows), *computed.shape[1:]))
        full[missing_rows] = computed
        full[stored_rows] = batch["vision_features"].to(full.dtype)
    else:
        full = computed
    completed = {key: value for key, value in batch.items()
                 if key not in ("pixel_values", "missing_rows", "missing_digests", "feature_rows")}
    completed["vision_features"] = full
    return completed


def default_cache_dir(output_dir: Path) -> Path:
    return Path(output_dir) / DEFAULT_FOLDER
