"""The tagging step: a multi-label tagger's full score vector per image, rendered by TagOptions.

Every score is kept in the store (float32, compressed, exact), together with the model's
vocabulary and thresholds in the store's metadata, so ``captionkit render`` can choose
tags again with new thresholds, blacklists or ordering without loading the model.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from captionkit.core.images import DEFAULT_MAX_PIXELS, load_image
from captionkit.core.records import Record
from captionkit.core.store import Store
from captionkit.core.tagging import TagOptions, render_tags, select_tags
from captionkit.steps.base import Prepared


def encode_scores(scores: np.ndarray) -> str:
    """Scores → text for the store (float32, zlib, base64): exact, so re-rendering matches the first run."""
    return base64.b64encode(zlib.compress(np.asarray(scores, dtype="<f4").tobytes(), 6)).decode("ascii")


def decode_scores(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<f4").astype(np.float32)


def tagger_identity(name_or_path: str, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies a tagger's scores, read from its files without loading the weights.

    A local folder is its content (see :mod:`captionkit.core.identity`), a hub tagger its id and commit.
    """
    from captionkit.core.identity import LOCAL_MODEL, folder_identity
    from captionkit.models import taggers

    folder, revision, prefer_onnx = taggers._resolve(str(name_or_path), cache_dir)
    # one model.onnx named in a shared folder: only the files a tagger reads, not its neighbours
    names = (taggers.ONNX_FILE, taggers.TAGS_FILE, taggers.CONFIG_FILE, taggers.THRESHOLDS_FILE,
             taggers.PREPROCESS_FILE) if prefer_onnx else None
    return {
        "backend": "tagger",
        "format": taggers.detect_format(folder, prefer_onnx=prefer_onnx),
        "model": LOCAL_MODEL if revision is None else str(name_or_path),
        "revision": folder_identity(folder, names=names) if revision is None else revision,
        "onnx_file": prefer_onnx,
        "files": None,
    }


class TagRenderer:
    """Raw stored scores → selected tags → text, with the vocabulary kept in the store."""

    def __init__(self, store: Store, options: TagOptions) -> None:
        self.store = store
        self.options = options
        self._vocabularies: dict[str, dict[str, Any]] = {}

    def vocabulary(self, key: str) -> dict[str, Any]:
        if key not in self._vocabularies:
            value = self.store.get_meta(key)
            if value is None:
                from captionkit.core.errors import CaptionkitError

                raise CaptionkitError(f"{self.store.path}: the tag vocabulary {key} is missing; tag again.")
            self._vocabularies[key] = value
        return self._vocabularies[key]

    def select(self, raw: dict[str, Any]) -> list[tuple[str, float]]:
        vocabulary = self.vocabulary(raw["vocabulary"])
        thresholds = dict(vocabulary["default_thresholds"])
        if thresholds.get("per_tag") is not None:
            thresholds["per_tag"] = np.asarray(thresholds["per_tag"], dtype=np.float32)
        return select_tags(decode_scores(raw["scores"]), vocabulary["tags"], vocabulary["categories"],
                           self.options, thresholds)

    def render(self, raw: dict[str, Any]) -> str:
        return render_tags(self.select(raw), self.options)


class TagStep:
    """Writes the ``tags`` field with a WD-style or captionkit-trained tagger."""

    field = "tags"

    def __init__(
        self,
        model: str,
        store: Store | None,
        options: TagOptions | None = None,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        batch_size: int = 32,
        background: tuple[int, int, int] = (255, 255, 255),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.model_name = model
        self.device = device
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.background = background
        self.max_pixels = max_pixels
        self.renderer = TagRenderer(store, options or TagOptions())
        self.store = store
        self.tagger: Any = None
        self._identity = tagger_identity(model, cache_dir)
        self._vocabulary_key = "vocabulary:" + hashlib.sha256(
            repr(sorted(self._identity.items())).encode()).hexdigest()[:20]
        self._target_size: tuple[int, int] | None = None
        self._preprocessing: Any = None  # decode workers elsewhere: the preprocessing without the model

    def fingerprint(self) -> dict[str, Any]:
        return self._identity

    def render_settings(self) -> dict[str, Any]:
        return self.renderer.options.fingerprint()

    def load(self) -> None:
        from captionkit.models.taggers import load_tagger

        if self.tagger is not None:
            return
        self.tagger = load_tagger(self.model_name, device=self.device, cache_dir=self.cache_dir)
        if self.store is not None:  # a worker elsewhere has none: its executor commits shared_meta() instead
            for key, value in self.shared_meta().items():
                self.store.put_meta(key, value)
        height, width = self.tagger.preprocessing.size
        self._target_size = (int(width), int(height))

    def shared_meta(self) -> dict[str, Any]:
        """Store metadata rendering needs (vocabulary, thresholds): the loaded model's, or read from its files."""
        if self.tagger is not None:
            tags, categories, thresholds = self.tagger.tags, self.tagger.categories, self.tagger.default_thresholds
        else:  # an executor elsewhere asks before any worker loads the weights
            from captionkit.models.taggers import load_vocabulary

            vocabulary, thresholds = load_vocabulary(self.model_name, self.cache_dir)
            tags, categories = vocabulary.names, vocabulary.categories
        thresholds = dict(thresholds)
        if thresholds.get("per_tag") is not None:
            thresholds["per_tag"] = [float(v) for v in np.asarray(thresholds["per_tag"]).reshape(-1)]
        return {self._vocabulary_key: {
            "tags": list(tags), "categories": [int(c) for c in categories], "default_thresholds": thresholds,
        }}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for workers before they load: no store (one writer: the driver), renderer or loaded model."""
        state = dict(self.__dict__)
        state.update(store=None, renderer=None, tagger=None)
        return state

    def use_device(self, device: str) -> None:
        """Run the tagger on ``device`` when it loads; before ``load``."""
        self.device = device

    def unload(self) -> None:
        if self.tagger is not None:
            self.tagger.unload()
            self.tagger = None

    prepares_apart = True  # decode workers elsewhere need only the preprocessing (load_preprocessing)

    def load_preprocessing(self) -> None:
        """What ``prepare`` needs, read from the tagger's files without loading its weights."""
        from captionkit.models.taggers import load_preprocessing

        self._preprocessing = load_preprocessing(self.model_name, self.cache_dir)
        height, width = self._preprocessing.size
        self._target_size = (int(width), int(height))

    def prepare(self, record: Record) -> Prepared:
        loaded = load_image(record.image_source or record.id, self.background, self._target_size, self.max_pixels,
                            data=record.data)
        preprocess = self.tagger.preprocess if self.tagger is not None else self._preprocessing
        return Prepared(record, preprocess(loaded.image), loaded.original_size, loaded.content_hash, loaded.notes)

    def run_batch(self, items: list[Prepared]) -> list[Any]:
        scores = self.tagger.predict(np.stack([item.payload for item in items]))
        return [{"scores": encode_scores(row), "vocabulary": self._vocabulary_key} for row in scores]

    def render(self, raw: Any) -> str:
        return self.renderer.render(raw)

    def cpu_thread_candidates(self) -> list[int]:
        """Thread counts the executor may measure when the model runs on the CPU (after load)."""
        from captionkit.core.thread_tuning import torch_thread_candidates

        if self.tagger is None or self.tagger.format == "wd-onnx":
            return []  # onnxruntime schedules its own threads
        return torch_thread_candidates(self.tagger.device)

    def set_cpu_threads(self, count: int) -> None:
        from captionkit.core.thread_tuning import set_torch_threads

        set_torch_threads(count)

    def recover_from_oom(self) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def build_pipeline_tagger(config: dict[str, Any], context: Any) -> TagStep:
    """A pipeline ``tagger`` step: everything `captionkit tag` does; all scores kept for re-rendering."""
    from captionkit.core.images import parse_color
    from captionkit.options.commands import TAG, TagRun

    keys = set(TAG.names("pipeline"))
    arguments = TAG.api_arguments({key: value for key, value in config.items() if key in keys})
    run = TagRun(**{key: value for key, value in arguments.items() if key != "options"})
    return TagStep(
        str(run.model), context.store, arguments["options"], device=run.device, cache_dir=run.cache_dir,
        batch_size=int(run.batch_size), background=parse_color(run.background), max_pixels=int(run.max_image_pixels),
    )


def _register() -> None:
    from captionkit.options.commands import TAG
    from captionkit.steps.registry import register_step

    register_step(
        "tagger",
        description="tag images with a WD-style or captionkit-trained tagger (thresholds, lists, rating)",
        keys=TAG.pipeline_keys(),
        aliases=("ImageTagger", "WDTagger"),
        key_aliases=TAG.pipeline_aliases(),
    )(build_pipeline_tagger)


_register()
