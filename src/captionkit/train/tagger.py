"""Train a multi-label tagger on a timm backbone: ``train_tagger(config) -> TaggerTrainResult``.

What a run does, and why:

* Data: tagged image folders + a ``selected_tags.csv`` vocabulary (or one built from the
  tags), split by iterative stratification so rare tags appear in validation too
  (:mod:`captionkit.train.tagger_data`).
* Model: any timm backbone, pretrained from the hub, a local file, or not at all;
  ``init_from`` fine-tunes an earlier tagger onto a changed tag set, copying the head
  rows of tags that survive (timm itself drops the whole head, timm #948).
* Loop: timm optimizers (AdamW and friends), linear warmup + cosine, accelerate for
  device and mixed precision, gradient accumulation, optional EMA, one seed.
* Every epoch: mAP, micro/macro F1 at ``threshold``, per-tag F1-optimal thresholds,
  logged to TensorBoard. Checkpoints (full training state): ``output_dir/last`` every
  epoch, and ``output_dir/checkpoints/epoch-NNNN`` every ``save_every_epochs`` epochs,
  rotated by ``save_total_limit`` but never deleting the best or the newest. The best
  model is exported to ``output_dir/best`` and the last to ``output_dir/final``, as
  folders ``captionkit tag`` loads.
* Resume from any checkpoint restores model, optimizer, scheduler, AMP scaler, EMA,
  RNG states, epoch, split and vocabulary; the data order of an epoch depends only on
  (seed, epoch), so a resumed run repeats what the uninterrupted one would have done.

A config (every key but ``output_dir`` and ``data.train_dirs`` has a default)::

    output_dir: runs/tagger
    data:
      train_dirs: [datasets/danbooru/images]   # a.png + a.txt ("tag1, tag2")
      selected_tags: datasets/danbooru/selected_tags.csv
      min_count: 50
      split: auto            # stratified (iterstrat) while N x tags fits, random beyond
    model: {backbone: convnext_tiny, pretrained: hub, image_size: 448, drop_path_rate: 0.1}
    loss: {name: asl, gamma_neg: 4, clip: 0.05}
    optimizer: {name: adamw, lr: 3.0e-4, weight_decay: 0.05, warmup_fraction: 0.05}
    epochs: 20
    batch_size: 64
    mixed_precision: bf16
    ema_decay: 0.9998
    metric: map
    export_onnx: true

``captionkit train tagger --config tagger.yaml --set optimizer.lr=1e-4 [--resume runs/tagger]``
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from captionkit.core.errors import CaptionkitError
from captionkit.train.accelerator import new_accelerator
from captionkit.train.checkpoints import remove_stale_temp_folders as _remove_leftovers  # noqa: F401 (tests)
from captionkit.train.config import NOT_SAVED, ConfigError, config_to_dict, load_config, save_config
from captionkit.train.loop import (
    BatchLoss,
    LoopSettings,
    Progress,
    TrainingTask,
    read_progress,
    run_training,
    to_device,
)
from captionkit.train.runlog import log_skipped

_log = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
LAST_DIR = "last"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"


# -- config ---------------------------------------------------------------------------------


@dataclass
class TaggerDataConfig:
    """Where the images and tags are, the vocabulary, and the validation split."""

    # folders, URL prefixes (s3://bucket/tagged/) or manifests (.jsonl/.parquet/.csv, local or URLs)
    train_dirs: list[Path | str] = field(default_factory=list)
    val_dirs: list[Path | str] = field(default_factory=list)  # empty: split off val_fraction of train_dirs
    selected_tags: Path | None = None  # None: vocabulary from the training tags
    min_count: int = 1
    separator: str = ","
    caption_extension: str = ".txt"
    recursive: bool = True
    val_fraction: float = 0.1
    split: Literal["auto", "stratified", "random"] = "auto"
    max_stratified_cells: int = 50_000_000
    num_workers: int = 2
    hflip: bool = True
    # data in object storage: fsspec filesystem options over the environment's credentials; never saved or logged
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, metadata={NOT_SAVED: True})
    io_workers: int = 16  # objects fetched at once into the local object mirror

    def __post_init__(self) -> None:
        if not self.train_dirs:
            raise ValueError("data.train_dirs needs at least one folder of images with tag files")
        if self.min_count < 0:
            raise ValueError(f"data.min_count must be 0 or more, got {self.min_count}")
        if not self.separator:
            raise ValueError("data.separator must not be empty")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {self.num_workers}")
        if self.io_workers < 1:
            raise ValueError(f"data.io_workers must be at least 1, got {self.io_workers}")


@dataclass
class TaggerModelConfig:
    """The timm backbone. ``pretrained``: ``none``, ``hub`` or a path to a weights file."""

    backbone: str = "convnext_atto"
    pretrained: str = "none"
    image_size: int = 224
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    init_from: Path | None = None  # an exported tagger folder or checkpoint: fine-tune onto this vocabulary
    #: Train only the classifier (linear probe): the backbone gets no gradient and stays in eval
    #: mode (BatchNorm statistics frozen) for the whole run.
    freeze_backbone: bool = False
    #: Head-only for the first N epochs, then the whole model (linear probe, then fine-tuning).
    freeze_backbone_epochs: int = 0
    #: While the backbone is frozen: compute its pooled features once per image, keep them on disk
    #: and train the head from them (with data.hflip: two views per image, as is and mirrored).
    cache_features: bool = False
    feature_cache_dir: Path | None = None  # None: OUTPUT/feature_cache; runs may share one

    def __post_init__(self) -> None:
        if self.freeze_backbone_epochs < 0:
            raise ValueError(f"model.freeze_backbone_epochs must be 0 or more, got {self.freeze_backbone_epochs}")
        if self.freeze_backbone and self.freeze_backbone_epochs:
            raise ValueError("model.freeze_backbone (every epoch) and model.freeze_backbone_epochs (the first N) "
                             "both freeze the backbone; set only one")
        if self.cache_features and not (self.freeze_backbone or self.freeze_backbone_epochs):
            raise ValueError("model.cache_features needs a frozen backbone: set model.freeze_backbone: true or "
                             "model.freeze_backbone_epochs: N (features change while the backbone trains)")
        if self.feature_cache_dir is not None and not self.cache_features:
            raise ValueError("model.feature_cache_dir is only read with model.cache_features: true")
        if self.image_size < 16:
            raise ValueError(f"model.image_size must be at least 16, got {self.image_size}")
        if not 0 <= self.drop_path_rate < 1 or not 0 <= self.drop_rate < 1:
            raise ValueError("model.drop_path_rate and model.drop_rate must be in [0, 1)")
        if self.init_from is not None and self.pretrained != "none":
            raise ValueError("model.init_from and model.pretrained both load weights; set only one")


@dataclass
class TaggerLossConfig:
    """``bce`` or ``asl`` (Asymmetric Loss; computed in float32 so fp16/bf16 stay finite)."""

    name: Literal["bce", "asl"] = "bce"
    gamma_neg: float = 4.0
    gamma_pos: float = 0.0
    clip: float = 0.05

    def __post_init__(self) -> None:
        if self.name == "bce" and (self.gamma_neg, self.gamma_pos, self.clip) != (4.0, 0.0, 0.05):
            raise ValueError("loss.gamma_neg, gamma_pos and clip only apply to loss.name: asl")


@dataclass
class TaggerOptimizerConfig:
    """Optimizer (any name ``timm.optim.create_optimizer_v2`` knows) and LR schedule.

    Spelled like the captioner's ``optimizer:`` section (``name``, ``lr``, ``weight_decay``,
    ``max_grad_norm``); the old ``optim:`` section (``optimizer``, ``grad_clip``) is still read.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"optimizer.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError("optimizer.max_grad_norm must be positive, or null (or 0) to disable clipping")


TaggerOptimConfig = TaggerOptimizerConfig  # the former name


@dataclass
class TaggerTrainConfig:
    """Everything a tagger training run needs; load with :func:`load_tagger_config`."""

    output_dir: Path
    data: TaggerDataConfig
    model: TaggerModelConfig = field(default_factory=TaggerModelConfig)
    loss: TaggerLossConfig = field(default_factory=TaggerLossConfig)
    optimizer: TaggerOptimizerConfig = field(default_factory=TaggerOptimizerConfig)
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    device: Literal["auto", "cpu"] = "auto"
    ema_decay: float | None = None
    seed: int = 0
    threshold: float = 0.5
    metric: Literal["map", "micro_f1", "macro_f1", "tuned_macro_f1", "val_loss"] = "map"
    save_every_epochs: int = 1
    save_total_limit: int | None = 3
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    export_onnx: bool = False

    #: Old spellings still read (with a logged note): one learning-rate key for both trainers.
    renamed_keys: ClassVar[dict[str, str]] = {
        "optim": "optimizer",
        "optim.optimizer": "optimizer.name",
        "optim.grad_clip": "optimizer.max_grad_norm",
    }

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
            raise ValueError("batch_size and eval_batch_size must be at least 1")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be at least 1, got {self.gradient_accumulation_steps}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be between 0 and 1 (e.g. 0.999), got {self.ema_decay}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.save_every_epochs < 0:
            raise ValueError("save_every_epochs must be 0 (only last/best) or more")
        if self.model.freeze_backbone_epochs > self.epochs:
            raise ValueError(f"model.freeze_backbone_epochs ({self.model.freeze_backbone_epochs}) is more than epochs "
                             f"({self.epochs}); for a head-only run set model.freeze_backbone: true")

    @property
    def frozen_epochs(self) -> int:
        """How many epochs (from the first) train only the head."""
        return self.epochs if self.model.freeze_backbone else self.model.freeze_backbone_epochs


def load_tagger_config(path: str | Path | None, overrides: list[str] | None = None) -> TaggerTrainConfig:
    """YAML file + ``--set key=value`` overrides → a validated config (defaults fill only gaps)."""
    return load_config(TaggerTrainConfig, path, overrides or [])


@dataclass
class TaggerTrainResult:
    """What a run produced. ``history`` has one metrics dict per epoch run in this process."""

    output_dir: Path
    best_dir: Path | None
    final_dir: Path
    metric_name: str
    best_metric: float | None
    final_metrics: dict[str, float]
    history: list[dict[str, float]]
    vocabulary_size: int
    split_method: str
    start_epoch: int
    epochs: int
    images_used: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> images left out
    log_file: Path | None = None  # OUTPUT/train.log: the run's log, with every skipped image
    stopped: bool = False  # ended early by ``stop``: resume from OUTPUT/last (the last finished epoch)
    #: model.cache_features: entries reused / computed / replaced as unreadable, per data part ("train", "val").
    feature_cache: dict[str, dict[str, int]] = field(default_factory=dict)


class TaggerTrainingError(CaptionkitError):
    """The run cannot start or continue; the message names the file and the fix."""


# -- model helpers --------------------------------------------------------------------------


def check_backbone(config: TaggerModelConfig, init_from: bool = True) -> None:
    """Fail in one sentence, before anything is built or written, unless the model can be had.

    The backbone must be a timm model; ``pretrained`` a weights file, ``none``, or ``hub``
    with the weights in the local cache or the Hugging Face Hub reachable (an offline
    machine gets the answer at once instead of after download retries); ``init_from`` (when
    ``init_from`` is True: a fresh run, not a resume) a folder with weights and tags.
    """
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import timm

    if not timm.is_model(config.backbone):
        close = timm.list_models(f"*{config.backbone.split('_')[0]}*")[:8]
        raise TaggerTrainingError(
            f"model.backbone {config.backbone!r} is not a timm model; similar names: {close or 'none'}"
        )
    pretrained = config.pretrained
    if pretrained not in ("none", "hub"):
        weights = Path(pretrained).expanduser()
        if not weights.is_file():
            raise TaggerTrainingError(
                f"model.pretrained: {weights} is not a file; give 'none', 'hub' or a .safetensors/.pth path"
            )
    if pretrained == "hub":
        _check_hub_weights(config.backbone)
    if init_from and config.init_from is not None:
        folder = Path(config.init_from)
        if not (folder / "model.safetensors").is_file() or not (folder / "selected_tags.csv").is_file():
            raise TaggerTrainingError(
                f"model.init_from: {folder} needs model.safetensors and selected_tags.csv "
                "(an exported tagger folder such as OUTPUT/best, or a checkpoint folder)"
            )


def _check_hub_weights(backbone: str) -> None:
    """Hub weights of ``backbone`` are cached, or the Hub is reachable; else one plain sentence."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise TaggerTrainingError(
            f"model.pretrained: hub: timm has no pretrained weights for {backbone!r}; use model.pretrained: none "
            "or a weights file"
        )
    if not cfg.hf_hub_id:
        return  # weights from a plain URL (torch.hub cache): timm reports its own errors
    from huggingface_hub import hf_hub_download

    from captionkit.models import hub_reachable

    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:
        try:
            hf_hub_download(repo_id, name, revision=revision or None, local_files_only=True)
            return
        except Exception:  # noqa: BLE001 - not cached (the error types vary between hub versions)
            continue
    if not hub_reachable():
        raise TaggerTrainingError(
            f"model.pretrained: hub weights for {backbone!r} could not be downloaded: they are not in the local "
            "cache and the Hugging Face Hub cannot be reached from this machine; download them where you have "
            f"internet (timm.create_model({backbone!r}, pretrained=True)) and set model.pretrained to the weights "
            "file, or use model.pretrained: none"
        )


def create_backbone(config: TaggerModelConfig, num_classes: int) -> tuple[Any, dict[str, Any]]:
    """timm model with ``num_classes`` outputs, and the model_args needed to rebuild it."""
    check_backbone(config, init_from=False)
    import timm

    pretrained = config.pretrained
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    if config.drop_rate:
        kwargs["drop_rate"] = config.drop_rate
    use_pretrained = pretrained != "none"
    if use_pretrained and pretrained != "hub":
        kwargs["pretrained_cfg_overlay"] = {"file": str(Path(pretrained).expanduser())}
    model_args: dict[str, Any] = {}
    try:
        try:
            model = timm.create_model(config.backbone, pretrained=use_pretrained, img_size=config.image_size,
                                      **kwargs)
            model_args["img_size"] = config.image_size
        except TypeError:
            model = timm.create_model(config.backbone, pretrained=use_pretrained, **kwargs)
    except TaggerTrainingError:
        raise
    except Exception as error:
        if pretrained == "hub":
            raise TaggerTrainingError(
                f"model.pretrained: hub weights for {config.backbone!r} could not be downloaded "
                f"({type(error).__name__}: {error}); download them and set model.pretrained to the file, "
                "or use model.pretrained: none"
            ) from error
        raise TaggerTrainingError(f"timm could not build {config.backbone!r}: {error}") from error
    return model, model_args


def preprocessing_for(model: Any, image_size: int) -> Any:
    """RGB NCHW preprocessing with the backbone's mean/std (pad to square on white, bicubic)."""
    from captionkit.models.taggers import Preprocessing

    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return Preprocessing(
        size=(image_size, image_size),
        layout="NCHW",
        channel_order="RGB",
        scale=1.0 / 255.0,
        mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        interpolation="bicubic",
    )


def remap_head(
    model: Any, state: dict[str, Any], old_names: list[str], new_names: list[str]
) -> dict[str, int]:
    """Load ``state`` (from a model over ``old_names``) into ``model`` (over ``new_names``).

    Every non-head weight is copied; head rows of tags in both vocabularies are copied
    by name; new tags keep the model's fresh initialisation. Returns counts of kept,
    new and dropped tags.
    """
    import torch

    from captionkit.train.tagger_export import classifier_name

    head = classifier_name(model)
    target = model.state_dict()
    head_keys = {f"{head}.weight", f"{head}.bias"}
    body = {key: value for key, value in state.items() if key not in head_keys}
    missing, unexpected = model.load_state_dict({**target, **body}, strict=False)[0:2]
    body_mismatch = [key for key in body if key in target and body[key].shape != target[key].shape]
    if unexpected or body_mismatch:
        raise TaggerTrainingError(
            f"model.init_from weights do not fit the backbone (unexpected {list(unexpected)[:4]}, "
            f"shape mismatch {body_mismatch[:4]}); use the same model.backbone as the source model"
        )
    old_index = {name: i for i, name in enumerate(old_names)}
    kept = 0
    with torch.no_grad():
        for key in head_keys:
            if key not in state:
                continue
            source = state[key]
            destination = dict(model.named_parameters()).get(key)
            if destination is None or source.shape[0] != len(old_names):
                raise TaggerTrainingError(
                    f"model.init_from head {key} has {source.shape[0]} rows for {len(old_names)} tags; "
                    "its selected_tags.csv does not belong to its weights"
                )
            if source.shape[1:] != destination.shape[1:]:
                raise TaggerTrainingError(f"model.init_from head {key} has feature size {source.shape[1:]} "
                                          f"but the backbone has {destination.shape[1:]}; same backbone needed")
            for row, name in enumerate(new_names):
                if name in old_index:
                    destination[row].copy_(source[old_index[name]])
        kept = sum(1 for name in new_names if name in old_index)
    return {"kept": kept, "new": len(new_names) - kept, "dropped": len(old_names) - kept}


def _load_init_weights(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """State dict + tag names of an exported tagger folder or a training checkpoint."""
    from safetensors.torch import load_file

    from captionkit.models.taggers import read_selected_tags

    weights = folder / "model.safetensors"
    tags = folder / "selected_tags.csv"
    if not weights.is_file() or not tags.is_file():
        raise TaggerTrainingError(
            f"model.init_from: {folder} needs model.safetensors and selected_tags.csv "
            "(an exported tagger folder such as OUTPUT/best, or a checkpoint folder)"
        )
    return load_file(str(weights)), read_selected_tags(tags).names


def build_optimizer(model: Any, settings: TaggerOptimizerConfig) -> Any:
    """timm's optimizer by name; Adam and AdamW use torch's fused kernel where there is one.

    Why: torch picks the one-tensor-at-a-time AdamW for CPU parameters; the fused one took
    28 ms instead of 141 ms per step for resnet10t on this project's CPU machine, and it is
    what the field recommends on GPUs too.
    """
    from timm.optim import create_optimizer_v2

    options = {"opt": settings.name, "lr": settings.lr, "weight_decay": settings.weight_decay}
    if settings.name.lower() in ("adam", "adamw"):
        try:
            return create_optimizer_v2(model, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):
            pass  # no fused kernel for these parameters: the plain one below
    try:
        return create_optimizer_v2(model, **options)
    except (ValueError, AssertionError) as error:
        raise ConfigError(f"optimizer.name {settings.name!r}: {error}") from error


def new_ema(model: Any, decay: float) -> Any:
    """timm's ``ModelEmaV3`` (same checkpoints), updating from tensor lists gathered once.

    Why: its update builds both models' ``state_dict`` on every optimizer step (4% of a step
    for a small backbone on CPU, measured); the tensors are the same objects every time,
    since loading a checkpoint copies into them.
    """
    import torch
    from timm.utils import ModelEmaV3

    class _Ema(ModelEmaV3):
        pairs: tuple[list[Any], list[Any], list[Any], list[Any]] | None = None

        def apply_update_(self, model: Any, decay: float) -> None:
            if not self.foreach:
                super().apply_update_(model, decay)
                return
            if self.pairs is None:
                pairs: tuple[list[Any], list[Any], list[Any], list[Any]] = ([], [], [], [])
                for ema_value, model_value in zip(self.module.state_dict().values(), model.state_dict().values(),
                                                  strict=True):
                    floating = ema_value.is_floating_point()
                    pairs[0 if floating else 2].append(ema_value)
                    pairs[1 if floating else 3].append(model_value)
                self.pairs = pairs
            ema_floats, model_floats, ema_others, model_others = self.pairs
            torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
            for ema_value, model_value in zip(ema_others, model_others, strict=True):
                ema_value.copy_(model_value)

    return _Ema(model, decay=decay)


# -- schedule -------------------------------------------------------------------------------


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str, min_ratio: float):
    """Multiplier per optimizer step: linear warmup, then cosine down to ``min_ratio`` (or flat)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- the run --------------------------------------------------------------------------------


def _resolve_resume(resume: Path) -> Path:
    """A checkpoint folder, or a run's output folder (then its ``last`` checkpoint)."""
    resume = Path(resume)
    if (resume / STATE_FILE).is_file():
        return resume
    candidate = resume / LAST_DIR
    if (candidate / STATE_FILE).is_file():
        return candidate
    raise TaggerTrainingError(
        f"--resume {resume}: no {STATE_FILE} there or in {candidate}; pass a run's output folder or a "
        "checkpoint folder (OUTPUT/last or OUTPUT/checkpoints/epoch-NNNN)"
    )


def _flat_hparams(config: TaggerTrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix[:-1]] = value
        else:
            flat[prefix[:-1]] = str(value)

    walk("", config_to_dict(config))
    return flat


def train_tagger(config: TaggerTrainConfig, resume: str | Path | None = None,
                 stop: threading.Event | None = None) -> TaggerTrainResult:
    """Run (or resume) a tagger training run; see the module docstring for what it writes.

    ``stop`` (set from another thread, e.g. the web UI's Stop button; single-process runs)
    is checked between optimizer steps: the unfinished epoch is dropped and the run returns
    with ``stopped=True``; resuming starts again from OUTPUT/last, the last finished epoch.
    """
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from captionkit.core.errors import require

    require("accelerate", "captionkit train tagger", extra="train")
    if config.export_onnx:  # checked now, not after the last epoch
        require("onnx", "export_onnx: true", extra="onnx")
        require("onnxscript", "export_onnx: true", extra="onnx")
    import torch
    from accelerate.utils import set_seed

    from captionkit.train.losses import build_loss
    from captionkit.train.tagger_data import (
        EpochSampler,
        ScanReport,
        TaggerDataset,
        Vocabulary,
        encode,
        scan_tagged_folders,
        split_indices,
    )

    output = Path(config.output_dir)
    resume_dir = _resolve_resume(Path(resume)) if resume is not None else None
    finished = int(read_progress(resume_dir / STATE_FILE)["epoch"]) if resume_dir is not None else 0
    if finished >= config.epochs:
        raise TaggerTrainingError(
            f"--resume {resume_dir}: the checkpoint already finished {finished} of {config.epochs} "
            "epochs; raise epochs with --set epochs=N to train further"
        )

    if config.report_to == "tensorboard":
        require("tensorboard", "report_to: tensorboard", extra="train")
    elif config.report_to == "wandb":
        require("wandb", "report_to: wandb")

    try:
        accelerator = new_accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")
    except ValueError as error:
        raise TaggerTrainingError(
            f"mixed_precision={config.mixed_precision!r} is not available here ({error}); "
            "use bf16 or no on CPU, fp16/bf16 on a GPU"
        ) from error
    set_seed(config.seed)

    # -- data and vocabulary: the data paths are checked before any model is loaded --
    data_cfg = config.data
    scan = ScanReport()
    from captionkit.core.locations import storage_options_set

    with storage_options_set(data_cfg.storage_options):
        items = scan_tagged_folders(data_cfg.train_dirs, data_cfg.separator, data_cfg.caption_extension,
                                    data_cfg.recursive, report=scan, io_workers=data_cfg.io_workers)
        val_items = (scan_tagged_folders(data_cfg.val_dirs, data_cfg.separator, data_cfg.caption_extension,
                                         data_cfg.recursive, report=scan, io_workers=data_cfg.io_workers)
                     if data_cfg.val_dirs else [])
    if resume_dir is not None:
        vocabulary = Vocabulary.from_csv(resume_dir / "selected_tags.csv")
    elif data_cfg.selected_tags is not None:
        vocabulary = Vocabulary.from_csv(data_cfg.selected_tags, data_cfg.min_count)
    else:
        from collections import Counter

        from captionkit.train.tagger_data import normalise_tag

        counts: Counter = Counter(normalise_tag(tag) for item in items for tag in item.tags)
        vocabulary = Vocabulary.from_counts(counts, data_cfg.min_count)
    num_tags = len(vocabulary)
    encoded = encode(items, vocabulary, "training")
    split_path = output / SPLIT_FILE
    if data_cfg.val_dirs:
        val_encoded = encode(val_items, vocabulary, "validation")
        train_idx, val_idx, split_method = np.arange(len(items)), np.arange(len(val_items)), "folders"
    else:
        val_encoded = encoded
        saved_path = resume_dir / SPLIT_FILE if resume_dir else split_path
        saved = _read_split(saved_path, encoded.paths)
        if saved is None and saved_path.is_file():
            _log.warning("%s no longer matches the images in data.train_dirs (images were added or removed); "
                         "a new train/validation split is drawn, so metrics are not comparable with before",
                         saved_path)
        if saved is not None:
            train_idx, val_idx, split_method = saved
        else:
            train_idx, val_idx, split_method = split_indices(
                encoded.labels, num_tags, data_cfg.val_fraction, data_cfg.split, config.seed,
                data_cfg.max_stratified_cells,
            )

    # -- model: available (cached, a file, or the Hub reachable) before it is built --
    if config.frozen_epochs and accelerator.num_processes > 1:
        raise TaggerTrainingError(
            f"model.freeze_backbone{'_epochs' if not config.model.freeze_backbone else ''} trains the head outside "
            f"the distributed wrapper, so it runs in one process only ({accelerator.num_processes} were launched); "
            "start the run without accelerate launch, or train the whole model"
        )
    check_backbone(config.model, init_from=resume_dir is None)
    model, model_args = create_backbone(config.model, num_tags)
    if config.model.init_from is not None and resume_dir is None:
        state, old_names = _load_init_weights(Path(config.model.init_from))
        counts_info = remap_head(model, state, old_names, vocabulary.names)
        _log.info("init_from %s: %d head rows kept, %d new tags, %d dropped", config.model.init_from,
                  counts_info["kept"], counts_info["new"], counts_info["dropped"])
    if resume_dir is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(resume_dir / "model.safetensors")))
    preprocessing = preprocessing_for(model, config.model.image_size)
    train_set = TaggerDataset(encoded, train_idx, num_tags, preprocessing, hflip=data_cfg.hflip)
    val_set = TaggerDataset(val_encoded, val_idx, num_tags, preprocessing, hflip=False)
    sampler = EpochSampler(len(train_set), config.seed, True, accelerator.process_index, accelerator.num_processes)
    batches_per_epoch = math.ceil(len(sampler) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(total_steps * config.optimizer.warmup_fraction))

    optimizer = build_optimizer(model, config.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, config.optimizer.schedule, config.optimizer.min_lr_ratio)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if config.ema_decay is not None:
        ema = new_ema(accelerator.unwrap_model(model), config.ema_decay)
    task = _TaggerTask(config, accelerator, model, ema, train_set, val_set, sampler,
                       build_loss(config.loss.name, config.loss.gamma_neg, config.loss.gamma_pos, config.loss.clip))
    task.vocabulary, task.model_args, task.preprocessing = vocabulary, model_args, preprocessing
    task.split = (split_path, encoded.paths, train_idx, val_idx, split_method)
    used = len(items) + len(val_items)
    task.skipped = (used, scan.skipped(data_cfg.caption_extension))

    tensorboard = config.report_to == "tensorboard"
    settings = LoopSettings(
        output_dir=output, total_steps=total_steps, batches_per_epoch=batches_per_epoch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.optimizer.max_grad_norm, has_validation=True, metric=config.metric,
        greater_is_better=config.metric != "val_loss", save_every_epochs=config.save_every_epochs or None,
        save_final_epoch=True, save_total_limit=config.save_total_limit, checkpoint_names="epoch",
        last_dir=LAST_DIR, best_dir="best", stop_saves=False, state_file=STATE_FILE, epoch_rows=True,
        tensorboard_dir="tagger" if tensorboard else None, tensorboard_prefix="tagger/",
        hparams=_flat_hparams(config) if tensorboard else None,
        wandb_project="tagger" if config.report_to == "wandb" else None, wandb_config=_flat_hparams(config),
    )
    outcome = run_training(task, settings, accelerator=accelerator, model=model, optimizer=optimizer,
                           scheduler=scheduler, resume_from=resume_dir, stop=stop)
    best_dir = output / "best"
    return TaggerTrainResult(
        output_dir=output,
        best_dir=best_dir if best_dir.is_dir() else None,
        final_dir=output / "final",
        metric_name=config.metric,
        best_metric=outcome.progress.best_metric,
        final_metrics=outcome.history[-1] if outcome.history else {},
        history=outcome.history,
        vocabulary_size=num_tags,
        split_method=split_method,
        start_epoch=outcome.start.epoch,
        epochs=config.epochs,
        images_used=used,
        skipped={reason: paths for reason, paths in task.skipped[1].items() if paths},
        log_file=outcome.log_file,
        stopped=outcome.stopped,
        feature_cache=task.cache_stats,
    )


class _TaggerTask(TrainingTask):
    """Tagged images, a multi-label loss, mAP/F1 metrics, and folders ``captionkit tag`` loads."""

    loss_in_autocast = False  # the losses compute in float32 themselves, outside autocast (as always)

    vocabulary: Any
    model_args: dict[str, Any]
    preprocessing: Any
    split: tuple[Path, list[Path], Any, Any, str]
    skipped: tuple[int, dict[str, list[str]]]

    def __init__(self, config: TaggerTrainConfig, accelerator: Any, model: Any, ema: Any, train_set: Any,
                 val_set: Any, sampler: Any, loss_fn: Any) -> None:
        self.config, self.accelerator, self.model, self.ema = config, accelerator, model, ema
        self.train_set, self.val_set, self.sampler, self.loss_fn = train_set, val_set, sampler, loss_fn
        self.thresholds: Any = None
        # unwrapped once: accelerate's unwrap_model walks every module (and probes packages) on each call
        self.net = accelerator.unwrap_model(model)
        self.frozen = False  # this epoch trains only the head
        self.cached_sets: tuple[Any, Any] | None = None  # (train, validation) features, once prepared
        #: (the module that computed them, [(pooled features, targets) per batch]) of the validation images
        #: while the backbone is frozen; dropped when it is unfrozen
        self.frozen_validation: tuple[Any, list[tuple[Any, Any]]] | None = None
        self.cache_stats: dict[str, dict[str, int]] = {}
        self.split_checked = False
        self.best_exported_at = -1  # the step of the last export to OUTPUT/best in this process
        self.step = 0  # the optimizer steps taken so far
        self.saved_at = -1  # the step of the last checkpoint's weights written in this process

    def begin(self, log_file: Path) -> None:
        output = Path(self.config.output_dir)
        split_path, paths, train_idx, val_idx, split_method = self.split
        if self.accelerator.is_main_process:
            log_skipped(*self.skipped, log_file)
            _write_split(split_path, paths, train_idx, val_idx, split_method)
            self.vocabulary.write_csv(output / "selected_tags.csv")
            save_config(self.config, output / "config.yaml")
        _log.info("tagger data: %d train / %d validation images, %d tags, split %s",
                  len(train_idx), len(val_idx), len(self.vocabulary), split_method)

    def batches(self, epoch: int, start: int) -> Any:
        """A fresh loader per epoch, seeded by (seed, epoch); tagger checkpoints fall on epoch ends (start 0)."""
        import torch

        from captionkit.train.tagger_data import collate_skipping_failures

        config = self.config
        frozen = epoch < config.frozen_epochs
        self.set_phase(frozen)
        train_set = self.cached()[0] if frozen and config.model.cache_features else self.train_set
        self.sampler.set_epoch(epoch)
        return iter(torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, sampler=self.sampler, num_workers=self.workers_for(train_set),
            collate_fn=getattr(train_set, "collate", collate_skipping_failures), drop_last=False,
            pin_memory=self.accelerator.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch), persistent_workers=False,
        ))

    def workers_for(self, dataset: Any) -> int:
        """Loader processes: none for cached features (an index into memory; starting workers would cost
        more than the epoch), so the mirror coin comes from the main process's RNG, as with
        ``data.num_workers: 0`` on images."""
        from captionkit.train.tagger_features import CachedFeatureDataset

        return 0 if isinstance(dataset, CachedFeatureDataset) else self.config.data.num_workers

    def set_phase(self, frozen: bool) -> None:
        """Head-only: the backbone in eval mode (BatchNorm statistics and dropout off), only the classifier trains.

        The backbone keeps ``requires_grad`` (its forward runs under ``no_grad`` instead), so the
        optimizer and gradient clipping see it again when a later epoch trains the whole model.
        While frozen its weights are laid out channels-last (faster forward-only convolutions),
        and back when the whole model trains.
        """
        from captionkit.train.tagger_features import check_split, classifier_of, set_channels_last

        model = self.net
        if frozen and not self.frozen:
            _log.info("training only the classifier (backbone frozen) until epoch %d", self.config.frozen_epochs)
        elif self.frozen and not frozen:
            _log.info("backbone unfrozen: training the whole model from here on")
        self.frozen = frozen
        if not frozen:
            self.frozen_validation = None  # the backbone trains from here on: its features change
        if set_channels_last(model, frozen) and self.ema is not None:
            self.ema.pairs = None  # the moved weights are new tensors: the EMA gathers them again
        if not frozen:
            model.train()
            return
        if not self.config.model.cache_features and not self.split_checked:
            check_split(model, self.preprocessing.size)
            self.split_checked = True
        model.eval()
        classifier_of(model).train()

    def cached(self) -> tuple[Any, Any]:
        """The training and validation features from the cache, computing what it lacks (once per run)."""
        if self.cached_sets is not None:
            return self.cached_sets
        from captionkit.train.tagger_features import (
            CachedFeatureDataset,
            FeatureCache,
            backbone_fingerprint,
            fill_cache,
        )

        config, model = self.config, self.net
        preprocessing = self.preprocessing
        description = {
            "backbone": config.model.backbone, "model_args": self.model_args,
            "feature": "forward_head(forward_features(x), pre_logits=True)",
            "preprocessing": {"size": list(preprocessing.size), "mean": list(preprocessing.mean),
                              "std": list(preprocessing.std), "scale": preprocessing.scale,
                              "interpolation": preprocessing.interpolation, "layout": preprocessing.layout,
                              "channel_order": preprocessing.channel_order},
            "mixed_precision": config.mixed_precision, "device": self.accelerator.device.type,
        }
        root = config.model.feature_cache_dir or Path(config.output_dir) / "feature_cache"
        cache = FeatureCache(Path(root), backbone_fingerprint(model, description), description)
        sets = []
        for part, dataset, views in (("train", self.train_set, 2 if config.data.hflip else 1),
                                     ("val", self.val_set, 1)):
            paths = [dataset.data.paths[index] for index in dataset.indices]
            labels = [dataset.data.labels[index] for index in dataset.indices]
            features, available, stats = fill_cache(cache, model, paths, views, preprocessing, self.accelerator,
                                                    config.eval_batch_size or config.batch_size,
                                                    config.data.num_workers)
            self.cache_stats[part] = dataclasses.asdict(stats)
            _log.info("feature cache %s (%s): %d reused, %d computed, %d unreadable entries replaced", cache.folder,
                      part, stats.reused, stats.computed, stats.corrupt)
            sets.append(CachedFeatureDataset(features, available, labels, dataset.num_tags,
                                             hflip=part == "train" and config.data.hflip))
        self.cached_sets = (sets[0], sets[1])
        return self.cached_sets

    def loss(self, model: Any, batch: Any) -> BatchLoss:
        inputs, targets = batch
        if self.frozen:
            import torch

            from captionkit.train.tagger_features import head_logits, pooled_features

            with self.accelerator.autocast():
                if self.config.model.cache_features:
                    features = inputs
                else:
                    with torch.no_grad():
                        features = pooled_features(self.net, inputs).float()
                logits = head_logits(self.net, features, self.config.model.drop_rate, training=True)
        else:
            logits = model(inputs)
        loss = self.loss_fn(logits, targets)
        count = inputs.shape[0]
        # the total stays on the device: a float() here would wait for every step to finish
        return BatchLoss(loss, loss.detach() * count, count, count)

    def after_step(self, step: int) -> None:
        self.step = step
        if self.ema is not None:
            self.ema.update(self.net, step=step)

    def evaluate(self, model: Any) -> dict[str, float]:
        import torch

        from captionkit.train.tagger_data import EpochSampler, collate_skipping_failures
        from captionkit.train.tagger_metrics import compute_metrics

        config, accelerator = self.config, self.accelerator
        eval_model = self.ema.module if self.ema is not None else model
        eval_model.eval()
        val_set, forward = self.val_set, eval_model
        head = self.ema.module if self.ema is not None else self.net
        if self.frozen:  # only the classifier changes: the frozen backbone's features are cached or kept
            from captionkit.train.tagger_features import head_logits

            forward = lambda features: head_logits(head, features, 0.0, training=False).float()  # noqa: E731
            if config.model.cache_features:
                val_set = self.cached()[1]
        loader = torch.utils.data.DataLoader(
            val_set, batch_size=config.eval_batch_size or config.batch_size,
            sampler=EpochSampler(len(self.val_set), config.seed, False, accelerator.process_index,
                                 accelerator.num_processes),
            num_workers=self.workers_for(val_set), collate_fn=getattr(val_set, "collate", collate_skipping_failures),
            generator=torch.Generator().manual_seed(config.seed),
        )
        uncached = self.frozen and not config.model.cache_features
        batches = self.validation_features(head, loader) if uncached else loader
        all_scores, all_targets, losses = [], [], []
        with torch.inference_mode():
            for batch in batches:
                if batch is None:
                    continue
                images, targets = to_device(batch, accelerator.device)
                with accelerator.autocast():
                    logits = forward(images)
                # weighted by images, so a short last batch counts for what it holds
                losses.append(torch.stack([self.loss_fn(logits, targets).float() * targets.shape[0],
                                           torch.tensor(float(targets.shape[0]), device=targets.device)]))
                scores, targets = accelerator.gather_for_metrics((torch.sigmoid(logits.float()), targets))
                all_scores.append(scores.cpu().numpy())
                all_targets.append(targets.cpu().numpy())
        if not all_scores:
            raise TaggerTrainingError("no validation image could be loaded; check the validation folder")
        metrics = compute_metrics(np.concatenate(all_scores), np.concatenate(all_targets), config.threshold)
        self.thresholds = metrics.thresholds
        values = metrics.as_dict()
        totals = accelerator.gather(torch.stack(losses)).reshape(-1, 2).sum(dim=0)
        values["val_loss"] = float((totals[0] / totals[1]).item())
        return values

    def validation_features(self, module: Any, loader: Any) -> list[tuple[Any, Any]]:
        """The frozen backbone's pooled features of the validation batches, with their targets.

        Why: while the backbone is frozen (in eval mode) these are the same at every evaluation;
        only the classifier changes. They are computed at the first evaluation of the frozen
        phase, kept in memory on the device (validation images × feature width), and later
        evaluations run only the classifier on them: the same batches and the same operations
        as the whole model's forward, so the same logits, without decoding the images and
        running the backbone again every epoch. ``model.cache_features`` keeps features on
        disk instead (and for the training images too).
        """
        import torch

        from captionkit.train.tagger_features import pooled_features

        if self.frozen_validation is not None and self.frozen_validation[0] is module:
            return self.frozen_validation[1]
        accelerator, kept = self.accelerator, []
        with torch.inference_mode():
            for batch in loader:
                if batch is None:
                    continue
                images, targets = to_device(batch, accelerator.device)
                with accelerator.autocast():
                    kept.append((pooled_features(module, images), targets))
        self.frozen_validation = (module, kept)
        return kept

    def save_model(self, folder: Path) -> None:
        from safetensors.torch import save_file

        from captionkit.train.checkpoints import link_or_copy

        best = Path(self.config.output_dir) / "best" / "model.safetensors"
        if self.ema is None and self.best_exported_at == self.step and best.is_file():
            # exported as the best a moment ago, from these very weights: the same bytes, linked
            link_or_copy(best, folder / "model.safetensors")
        else:
            state = self.accelerator.unwrap_model(self.model).state_dict()
            save_file({key: value.detach().cpu().contiguous() for key, value in state.items()},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
        self.saved_at = self.step
        # the run's own copies, as begin() wrote them; plain writes: the folder appears whole by one rename
        output = Path(self.config.output_dir)
        for name in ("selected_tags.csv", SPLIT_FILE, "config.yaml"):
            (folder / name).write_bytes((output / name).read_bytes())

    def export(self, folder: Path, metrics: dict[str, float], progress: Progress, final: bool) -> None:
        from captionkit.train.tagger_export import add_onnx_to_folder, export_tagger

        config = self.config
        model = self.ema.module if self.ema is not None else self.accelerator.unwrap_model(self.model)
        best = Path(config.output_dir) / "best"
        onnx = final and config.export_onnx
        if final and self.best_exported_at == progress.global_step and best.is_dir():
            self.final_from_best(folder, best, model, onnx)
            return
        last = Path(config.output_dir) / LAST_DIR
        # the final model without an EMA is the model OUTPUT/last was saved from at this very step
        same_as_last = (final and self.ema is None and self.saved_at == progress.global_step
                        and (last / STATE_FILE).is_file()
                        and read_progress(last / STATE_FILE).get("global_step") == progress.global_step)
        export_tagger(model, folder, metrics=metrics, onnx=onnx,
                      weights_from=last / "model.safetensors" if same_as_last else None,
                      architecture=config.model.backbone, model_args=self.model_args, vocabulary=self.vocabulary,
                      preprocessing=self.preprocessing, threshold=config.threshold,
                      per_tag_thresholds=self.thresholds,
                      training={"epoch": progress.epoch, "global_step": progress.global_step,
                                "config": config_to_dict(config)})
        if not final:
            self.best_exported_at = progress.global_step
        if onnx and best.is_dir():
            add_onnx_to_folder(best)

    def final_from_best(self, folder: Path, best: Path, model: Any, onnx: bool) -> None:
        """The last epoch was the best: ``best`` (exported at this very step, same weights, metrics and
        thresholds) is the final model too, so its files are linked, not serialised again, and the ONNX file
        is exported once for both instead of a second time from the reloaded best folder."""
        import shutil

        from captionkit.core.atomic import atomic_open
        from captionkit.models.taggers import ONNX_FILE
        from captionkit.train.checkpoints import link_or_copy, write_folder_atomically
        from captionkit.train.tagger_export import export_onnx

        def build(temp: Path) -> None:
            for item in best.iterdir():
                if item.is_file() and not item.name.startswith("."):
                    link_or_copy(item, temp / item.name)
            if onnx:
                export_onnx(model, self.preprocessing, temp / ONNX_FILE)

        write_folder_atomically(folder, build)
        if onnx:
            with atomic_open(best / ONNX_FILE, "wb", durable=False) as stream, \
                    (folder / ONNX_FILE).open("rb") as source:
                shutil.copyfileobj(source, stream)

    def state_objects(self) -> dict[str, Any]:
        return {"ema": self.ema} if self.ema is not None else {}

    def checkpoint_info(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"metric": self.config.metric, "metrics": metrics, "split_method": self.split[4]}



def _write_split(path: Path, paths: list[Path], train_idx: Any, val_idx: Any, method: str) -> None:
    from captionkit.core.atomic import atomic_write_json

    atomic_write_json(path, {
        "method": method,
        "count": len(paths),
        "val": [str(paths[i]) for i in val_idx] if method != "folders" else [],
    })


def _read_split(path: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """A saved split, if it still matches the data (same image list); else None."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("method") == "folders" or data.get("count") != len(paths):
        return None
    position = {str(p): i for i, p in enumerate(paths)}
    try:
        val = np.array(sorted(position[p] for p in data["val"]), dtype=np.int64)
    except KeyError:
        return None
    mask = np.ones(len(paths), dtype=bool)
    mask[val] = False
    return np.nonzero(mask)[0], val, data["method"]
