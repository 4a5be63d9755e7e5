"""Florence-2 captioner training: full fine-tune, LoRA and QLoRA, with exact resume.

Why this exists beside the seed scripts (see docs/research/training.md):
- the loss is a sum over caption tokens with pads labelled ``-100``; gradient
  accumulation divides by the non-pad tokens of the whole accumulation window, so a
  long caption weighs as much in a batch of 8 as it would alone;
- every setting reaches the code (the config is typed and validated, unknown keys fail);
- checkpoints are complete (weights or adapter, optimizer, scheduler, scaler, RNG, data
  position), appear atomically, rotate without losing the best, and carry the
  effective config; a resumed run continues exactly where it stopped;
- a full fine-tune saves a folder that loads with plain ``transformers``; a LoRA run
  saves a PEFT adapter plus the processor.

The native ``transformers`` Florence-2 module tree is used throughout:
``model.model.vision_tower`` (DaViT), ``model.model.multi_modal_projector`` and
``model.model.language_model`` (BART, with ``lm_head`` tied to its shared embedding).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from captionkit.core.warnings_filter import peft_wrapping_quietly
from captionkit.train.captioner_data import (
    AugmentConfig,
    CaptionCollator,
    CaptionDataset,
    CaptionItem,
    DataReport,
    DatasetSpec,
    EpochBatchSampler,
    caption_lengths,
    check_caption_lengths,
    load_items,
    split_items,
)
from captionkit.train.checkpoints import write_folder_atomically
from captionkit.train.config import NOT_SAVED, ConfigError, config_to_dict, load_config, save_config
from captionkit.train.feature_cache import (
    CachedCaptionDataset,
    FeatureCollator,
    FeatureCounts,
    VisionFeatureCache,
    check_cache_settings,
    complete_features,
    features_as_image_input,
    florence_inner,
)
from captionkit.train.loop import BatchLoss, LoopSettings, Progress, TrainingTask, run_training, to_device
from captionkit.train.lora import LoraSettings

_log = logging.getLogger(__name__)

METRIC_NAMES = ("val_loss", "bleu4", "rouge_l", "cider", "exact_match")
CONFIG_FILE = "train_config.yaml"
STATE_DIR = "training_state"


@dataclass
class OptimizerSettings:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes). ``lr`` None: 1e-5 full, 1e-4 LoRA."""

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError("optimizer.max_grad_norm must be positive, or null to disable clipping")


@dataclass
class SchedulerSettings:
    """Learning-rate schedule after a linear warmup from 0.

    ``onecycle`` ramps from ``lr / 25`` to ``lr`` over the warmup (30% of the run when no
    warmup is given) and anneals to ``lr * min_lr_ratio`` with a cosine, as torch's OneCycleLR.
    """

    name: Literal["constant", "cosine", "cosine_with_restarts", "onecycle"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    num_cycles: int = 1

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("scheduler.warmup_steps must be >= 0 and scheduler.warmup_ratio in [0, 1)")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set scheduler.warmup_steps or scheduler.warmup_ratio, not both")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"scheduler.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.min_lr_ratio and self.name == "constant":
            raise ValueError("scheduler.min_lr_ratio has no effect with the constant schedule; remove it")
        if self.num_cycles != 1 and self.name != "cosine_with_restarts":
            raise ValueError("scheduler.num_cycles is only used by cosine_with_restarts; remove it or change name")
        if self.num_cycles < 1:
            raise ValueError(f"scheduler.num_cycles must be at least 1, got {self.num_cycles}")


@dataclass
class CaptionerTrainConfig:
    """Everything a captioner training run reads; saved beside every checkpoint."""

    model: str
    output_dir: Path
    data: list[DatasetSpec]
    revision: str | None = None
    attn_implementation: Literal["eager", "sdpa"] | None = None
    mode: Literal["full", "lora", "qlora"] = "full"
    freeze_vision: bool = False
    freeze_language: bool = False
    freeze_other: bool = False
    # Train from stored vision-tower outputs (frozen tower only); see train/feature_cache.py.
    cache_vision_features: bool = False
    vision_cache_dir: Path | None = None  # default: output_dir/vision_features
    lora: LoraSettings = field(default_factory=LoraSettings)
    val_data: list[DatasetSpec] = field(default_factory=list)
    val_split: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_target_tokens: int = 256
    long_captions: Literal["truncate", "skip"] = "truncate"
    batch_size: int = 8
    # True: batch captions of similar token length together (less padding; see EpochBatchSampler)
    group_by_length: bool = False
    gradient_accumulation_steps: int = 1
    epochs: int | None = None
    max_steps: int | None = None
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    seed: int = 0
    # data-loading processes per training process; null: none on CPU (the model uses every core),
    # else up to 4 (see data_workers)
    num_workers: int | None = None
    eval_every_steps: int | None = None
    eval_max_samples: int | None = None
    eval_num_beams: int = 1
    sample_captions: int = 4
    best_metric: Literal["val_loss", "bleu4", "rouge_l", "cider", "exact_match"] = "val_loss"
    save_every_steps: int | None = None
    save_every_epochs: int | None = None
    save_total_limit: int | None = None
    log_every_steps: int = 10
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str | None = None
    # data in object storage (s3://, gs://, az://, hf:// paths or manifest rows): fsspec filesystem options over
    # the environment's credentials; never saved with the config or logged
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, metadata={NOT_SAVED: True})
    io_workers: int = 16  # objects fetched at once into the local object mirror
    # `--set mode=full` leaves a file's lora section out (load_config); the section only serves these modes
    sections_used_by: ClassVar[dict[str, tuple[str, tuple[str, ...]]]] = {"lora": ("mode", ("lora", "qlora"))}

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("data must list at least one data set, e.g. data: [{path: images/}]")
        if self.mode != "full" and (self.freeze_vision or self.freeze_language or self.freeze_other):
            raise ValueError(
                f"freeze_vision/freeze_language/freeze_other apply to mode 'full'; in mode {self.mode!r} the "
                "base model is frozen and only LoRA weights train. Remove the freeze_* keys"
            )
        if self.mode == "full" and self.lora != LoraSettings():
            raise ValueError("the lora section is only used with mode 'lora' or 'qlora'; remove it or set mode")
        if self.freeze_vision and self.freeze_language and self.freeze_other:
            raise ValueError("freezing vision, language and other leaves nothing to train; unfreeze one group")
        if self.val_data and self.val_split:
            raise ValueError("use val_data (a separate set) or val_split (hold out part of data), not both")
        if self.val_split and not 0.0 < self.val_split < 1.0:
            raise ValueError(f"val_split must be between 0 and 1, got {self.val_split}")
        has_val = bool(self.val_data) or self.val_split > 0
        if self.eval_every_steps is not None and not has_val:
            raise ValueError("eval_every_steps needs validation data: set val_split or val_data")
        if self.best_metric != "val_loss" and not has_val:
            raise ValueError(f"best_metric {self.best_metric!r} needs validation data: set val_split or val_data")
        for name in ("max_target_tokens", "batch_size", "gradient_accumulation_steps", "log_every_steps",
                     "eval_num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "eval_every_steps", "eval_max_samples", "save_every_steps",
                     "save_every_epochs", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or null), got {value}")
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set epochs or max_steps, not both (max_steps would silently win)")
        if self.io_workers < 1:
            raise ValueError(f"io_workers must be at least 1, got {self.io_workers}")
        if self.sample_captions < 0 or (self.num_workers or 0) < 0:
            raise ValueError("sample_captions and num_workers must be 0 or more")
        if self.wandb_project and "wandb" not in self.report_to:
            raise ValueError("wandb_project is set but report_to does not include 'wandb'")
        check_cache_settings(self)

    @property
    def has_validation(self) -> bool:
        return bool(self.val_data) or self.val_split > 0

    @property
    def learning_rate(self) -> float:
        if self.optimizer.lr is not None:
            return self.optimizer.lr
        return 1e-5 if self.mode == "full" else 1e-4


def load_captioner_config(path: str | Path | None, overrides: list[str] | None = None) -> CaptionerTrainConfig:
    """Read a captioner training YAML file with ``--set`` overrides (see :mod:`.config`)."""
    return load_config(CaptionerTrainConfig, path, overrides or [])


@dataclass
class TrainResult:
    """What a run produced, for callers of the library API and for the CLI summary."""

    output_dir: Path
    final_path: Path
    best_checkpoint: Path | None
    global_step: int
    epochs_completed: int
    train_loss: float | None
    metrics: dict[str, float]
    samples_per_second: float
    data_report: DataReport
    sample_captions: list[tuple[str, str]] = field(default_factory=list)
    images_used: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files left out
    log_file: Path | None = None  # OUTPUT/train.log: the run's log, with every skipped file
    stopped: bool = False  # ended early by ``stop``: final_path is the checkpoint to resume from
    vision_features: dict[str, int] = field(default_factory=dict)  # cache_vision_features: from_cache, computed


# -- model set-up -------------------------------------------------------------------------


def _require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes, which is not installed: pip install bitsandbytes "
                          "(CUDA GPUs only); or choose another setting")


def freeze_groups(model: Any) -> dict[str, list[Any]]:
    """Parameters of Florence-2's three groups on the native module tree.

    ``language`` includes ``lm_head`` (tied to the shared embedding); ``other`` is the
    multi-modal projector (image projection, its norm, position and temporal embeddings).
    """
    inner = getattr(model, "model", None)
    needed = ("vision_tower", "multi_modal_projector", "language_model")
    if inner is None or not all(hasattr(inner, name) for name in needed):
        raise ConfigError(
            f"{type(model).__name__} does not have the native Florence-2 layout (model.vision_tower, "
            "model.multi_modal_projector, model.language_model). Use a checkpoint converted for "
            "transformers' Florence2ForConditionalGeneration, e.g. florence-community/Florence-2-base"
        )
    groups = {
        "vision": list(inner.vision_tower.parameters()),
        "other": list(inner.multi_modal_projector.parameters()),
        "language": list(inner.language_model.parameters()),
    }
    seen = {id(parameter) for group in groups.values() for parameter in group}
    groups["language"] += [parameter for parameter in model.lm_head.parameters() if id(parameter) not in seen]
    seen |= {id(parameter) for parameter in model.lm_head.parameters()}
    leftover = [parameter for parameter in model.parameters() if id(parameter) not in seen]
    groups["other"] += leftover
    return groups


def enable_vision_checkpointing(model: Any) -> int:
    """Checkpoint each DaViT block (the native code only checkpoints the BART layers).

    The forward is replaced on the instances, so parameter names and saved weights do
    not change. Returns the number of wrapped blocks.
    """
    import torch.utils.checkpoint

    tower = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    wrapped = 0
    for stage in tower.blocks:
        for block in stage:
            if getattr(block, "_captionkit_checkpointed", False):
                continue
            original = block.forward

            def forward(hidden_states, _original=original, _block=block):
                if _block.training and torch.is_grad_enabled():
                    return torch.utils.checkpoint.checkpoint(_original, hidden_states, use_reentrant=False)
                return _original(hidden_states)

            block.forward = forward
            block._captionkit_checkpointed = True
            wrapped += 1
    return wrapped


def _load_model(config: CaptionerTrainConfig, accelerator: Any, resume_from: Path | None,
                offline: bool = False) -> tuple[Any, Any]:
    """The processor and the model to train (LoRA-wrapped when asked), on CPU.

    ``offline``: the Hub is out of reach (see :func:`.preflight.check_hub_model`), so only
    cached files are used instead of waiting on download retries.
    """
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    from captionkit.train.preflight import model_load_failed

    kwargs: dict[str, Any] = {"revision": config.revision}
    if offline:
        kwargs["local_files_only"] = True
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    if config.mode == "qlora":
        if not torch.cuda.is_available() or config.cpu:
            raise ConfigError("mode 'qlora' loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU; "
                              "use mode 'lora' on CPU")
        _require_bitsandbytes("mode 'qlora'")
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": accelerator.device}
    source = str(resume_from) if (resume_from is not None and config.mode == "full") else config.model
    try:
        model = Florence2ForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(config.model, revision=config.revision,
                                                  local_files_only=offline)
    except OSError as error:
        raise model_load_failed(source, error) from None
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5 renamed it
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_vision_checkpointing(model)
    if config.mode == "full":
        groups = freeze_groups(model)
        for name, frozen in (("vision", config.freeze_vision), ("language", config.freeze_language),
                             ("other", config.freeze_other)):
            for parameter in groups[name]:
                parameter.requires_grad_(not frozen)
        return processor, model
    if config.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if resume_from is not None:
        from peft import PeftModel

        with peft_wrapping_quietly():
            model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()
        return processor, model
    from captionkit.train.lora import apply_lora

    try:
        return processor, apply_lora(model, config.lora, config.gradient_checkpointing)
    except ValueError as error:
        raise ConfigError(str(error)) from error


# -- optimisation -------------------------------------------------------------------------


def _build_optimizer(config: CaptionerTrainConfig, model: Any, device: Any = "cpu") -> Any:
    """AdamW over the trainable parameters (no weight decay on biases and norms), with the
    fastest kernel for ``device``, where the parameters train."""
    import torch

    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not named:
        raise ConfigError("no trainable parameters: check the freeze_* settings and lora.target_modules")
    decay = [parameter for name, parameter in named if parameter.dim() >= 2]
    no_decay = [parameter for name, parameter in named if parameter.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.optimizer.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]
    settings = config.optimizer
    if settings.name == "adamw8bit":
        _require_bitsandbytes("optimizer 'adamw8bit'")
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, lr=config.learning_rate, betas=settings.betas, eps=settings.eps)
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=settings.betas, eps=settings.eps,
                             **adamw_kernel(device))


def adamw_kernel(device: Any) -> dict[str, bool]:
    """AdamW's fused kernel on CUDA and CPU (one kernel per step instead of several per
    parameter; about 6x less optimizer time for Florence-2's 198 tensors on a CPU), else
    the multi-tensor one."""
    kind = getattr(device, "type", str(device))
    return {"fused": True} if kind in ("cuda", "cpu") else {"foreach": True}


def lr_multiplier(settings: SchedulerSettings, total_steps: int):
    """The schedule as a function of the step (for LambdaLR): warmup, then the decay shape."""
    warmup = settings.warmup_steps or int(round(settings.warmup_ratio * total_steps))
    if settings.name == "onecycle" and not warmup:
        warmup = max(1, int(round(0.3 * total_steps)))
    floor = settings.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            if settings.name == "onecycle":
                start = 1 / 25
                return start + (1 - start) * step / warmup
            return (step + 1) / (warmup + 1)
        if settings.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if settings.name == "cosine_with_restarts":
            progress = (settings.num_cycles * progress) % 1.0 if progress < 1.0 else 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


# -- loss ---------------------------------------------------------------------------------


def decoder_inputs(labels: Any, model_config: Any) -> Any:
    """Teacher-forcing decoder inputs: labels shifted right behind the decoder start token."""
    text = model_config.text_config
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = text.decoder_start_token_id
    return shifted.masked_fill(shifted == -100, text.pad_token_id)


def target_tokens(batch: dict[str, Any]) -> int:
    """The batch's caption tokens (labels not ``-100``): the collator's host-side count when it has one."""
    count = batch.get("target_tokens")
    return int(count) if count is not None else int((batch["labels"] != -100).sum())


def token_losses(model: Any, batch: dict[str, Any]) -> Any:
    """Cross-entropy per caption token (0 at pad positions), shape (batch, target length)."""
    import torch.nn.functional as functional

    labels = batch["labels"]
    config = model.config if hasattr(model, "config") else model.module.config
    features = batch.get("vision_features")  # cache_vision_features: the tower's stored output
    with features_as_image_input(model) if features is not None else nullcontext():
        outputs = model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"] if features is None else features,
            attention_mask=batch["attention_mask"],
            decoder_input_ids=decoder_inputs(labels, config),
            use_cache=False,
        )
    logits = outputs.logits.float()
    losses = functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.view(labels.shape)


# -- the run ------------------------------------------------------------------------------


SKIPPED_NO_CAPTION = "with no caption file or an empty caption"
SKIPPED_NO_IMAGE = "listed in a manifest whose image file is missing"
SKIPPED_LONG = "with a caption over max_target_tokens (long_captions: skip)"


@dataclass
class _Data:
    """The caption pairs read from ``data``/``val_data`` and what was left out of each."""

    items: list[CaptionItem]
    val: list[CaptionItem]
    report: DataReport
    val_report: DataReport
    long_captions_skipped: list[str] = field(default_factory=list)
    images_used: int = 0  # distinct images in training and validation after every check

    def skipped(self) -> dict[str, list[str]]:
        """Left-out files by reason (training and validation sources together)."""
        both = (self.report, self.val_report)
        return {
            SKIPPED_NO_CAPTION: [path for report in both for path in report.missing_captions],
            SKIPPED_NO_IMAGE: [path for report in both for path in report.missing_images],
            SKIPPED_LONG: list(self.long_captions_skipped),
        }


def data_workers(num_workers: int | None, device: Any, num_processes: int = 1) -> int:
    """Data-loading processes: ``num_workers`` when set; else none on a CPU, where the model's
    threads already use every core, and up to 4 per process on an accelerator, so decoding and
    the processor run while the model computes."""
    if num_workers is not None:
        return num_workers
    if getattr(device, "type", str(device)) == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) // (2 * max(1, num_processes))))


def _check_settings(config: CaptionerTrainConfig) -> None:
    """Settings that need the machine (a GPU, optional packages): checked before anything loads."""
    import torch

    if config.mixed_precision == "fp16" and (config.cpu or not torch.cuda.is_available()):
        raise ConfigError("mixed_precision 'fp16' needs a CUDA GPU; on CPU use 'bf16' (if the CPU supports it) "
                          "or 'no'")
    if config.mode == "qlora":
        if not torch.cuda.is_available() or config.cpu:
            raise ConfigError("mode 'qlora' loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU; "
                              "use mode 'lora' on CPU")
        _require_bitsandbytes("mode 'qlora'")
    if config.optimizer.name == "adamw8bit":
        _require_bitsandbytes("optimizer 'adamw8bit'")
    if "wandb" in config.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError("report_to includes 'wandb' but wandb is not installed: pip install wandb "
                          "(then `wandb login`), or remove it from report_to")


def _read_data(config: CaptionerTrainConfig) -> _Data:
    """Every data path read into caption pairs (a missing path or an empty source fails here)."""
    from captionkit.core.locations import storage_options_set

    report, val_report = DataReport(), DataReport()
    items: list[CaptionItem] = []
    val: list[CaptionItem] = []
    try:
        with storage_options_set(config.storage_options):
            for spec in config.data:
                items += load_items(spec, report, config.io_workers)
            if config.val_split:
                items, val = split_items(items, config.val_split, config.seed)
            for spec in config.val_data:
                val += load_items(dataclasses.replace(spec, repeats=1), val_report, config.io_workers)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    return _Data(items, val, report, val_report)


def _check_lengths(config: CaptionerTrainConfig, processor: Any,
                   data: _Data) -> tuple[list[CaptionItem], list[CaptionItem], DataReport]:
    """Apply the long-caption policy (it needs the tokenizer) to the pairs :func:`_read_data` found."""
    report = data.report
    before = {str(item.image) for item in data.items} | {str(item.image) for item in data.val}
    items = check_caption_lengths(data.items, processor.tokenizer, config.max_target_tokens,
                                  config.long_captions, report)
    val = check_caption_lengths(data.val, processor.tokenizer, config.max_target_tokens, config.long_captions,
                                data.val_report)
    after = {str(item.image) for item in items} | {str(item.image) for item in val}
    data.long_captions_skipped = sorted(before - after)
    data.images_used = len(after)
    if not items:
        raise ConfigError("no training samples left after skipping long captions; raise max_target_tokens")
    if config.eval_max_samples is not None:
        val = val[: config.eval_max_samples]
    return items, val, report


def _check_resume(config: CaptionerTrainConfig, resume_from: Path) -> dict[str, Any]:
    state_file = resume_from / STATE_DIR / "trainer_state.json"
    if not state_file.exists():
        raise ConfigError(f"{resume_from}: not a resumable checkpoint (no {STATE_DIR}/trainer_state.json); pass a "
                          "folder under output_dir/checkpoints, not the final export")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if state.get("mode") != config.mode:
        raise ConfigError(f"{resume_from}: the checkpoint was trained with mode {state.get('mode')!r} but the "
                          f"config says {config.mode!r}; resume with the same mode")
    return state


def train_captioner(config: CaptionerTrainConfig, resume_from: str | Path | None = None,
                    stop: threading.Event | None = None) -> TrainResult:
    """Train a Florence-2 captioner as ``config`` says; resume from a checkpoint folder if given.

    ``stop`` (set from another thread, e.g. the web UI's Stop button; single-process runs)
    is checked between optimizer steps: the run saves a checkpoint and returns with
    ``stopped=True`` and ``final_path`` naming that checkpoint, to resume from.

    Everything that can be checked is checked before the model loads or a file is written:
    the settings, the data paths (read into caption pairs), then the model (cached or the
    Hub reachable). A run that fails these leaves no output folder behind.
    """
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from captionkit.core.errors import require

    require("accelerate", "captionkit train captioner", extra="train")
    if config.mode in ("lora", "qlora"):
        require("peft", f"mode: {config.mode}", extra="train")
    if "tensorboard" in config.report_to:
        require("tensorboard", "report_to: tensorboard", extra="train")
    import torch
    from accelerate.utils import set_seed

    from captionkit.train.accelerator import new_accelerator
    from captionkit.train.preflight import check_hub_model

    _check_settings(config)
    resume_path = Path(resume_from) if resume_from is not None else None
    if resume_path is not None:
        _check_resume(config, resume_path)
    data = _read_data(config)  # the data paths, before any model is loaded
    offline = check_hub_model(config.model, config.revision)
    set_seed(config.seed)
    accelerator = new_accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    processor, model = _load_model(config, accelerator, resume_path, offline=offline)
    train_items, val_items, report = _check_lengths(config, processor, data)
    vision_cache = _vision_cache(config, model, processor) if config.cache_vision_features else None
    task = _CaptionerTask(config, accelerator, processor, data, train_items, val_items, vision_cache)
    batches_per_epoch = task.sampler.batches_per_epoch()
    if batches_per_epoch == 0:
        raise ConfigError(f"{len(task.dataset)} training samples make no batch of {config.batch_size} per process")
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps or (config.epochs or 1) * steps_per_epoch
    optimizer = _build_optimizer(config, model, accelerator.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config.scheduler, total_steps))
    task.model, optimizer = accelerator.prepare(model, optimizer)
    task.total_steps = total_steps

    metric_name = config.best_metric if config.has_validation else None
    settings = LoopSettings(
        output_dir=config.output_dir, total_steps=total_steps, batches_per_epoch=batches_per_epoch,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_grad_norm=config.optimizer.max_grad_norm, has_validation=config.has_validation,
        eval_every_steps=config.eval_every_steps, metric=metric_name,
        greater_is_better=metric_name not in (None, "val_loss"), save_every_steps=config.save_every_steps,
        save_every_epochs=config.save_every_epochs, save_total_limit=config.save_total_limit,
        state_dir=STATE_DIR, state_file=f"{STATE_DIR}/trainer_state.json", log_every_steps=config.log_every_steps,
        tensorboard_dir="logs" if "tensorboard" in config.report_to else None,
        wandb_project=(config.wandb_project or "captionkit") if "wandb" in config.report_to else None,
        wandb_config=config_to_dict(config),
    )
    outcome = run_training(task, settings, accelerator=accelerator, model=task.model, optimizer=optimizer,
                           scheduler=scheduler, resume_from=resume_path, stop=stop)
    return TrainResult(
        output_dir=config.output_dir, final_path=outcome.final_path, best_checkpoint=outcome.best_checkpoint,
        global_step=outcome.progress.global_step, epochs_completed=outcome.progress.epoch,
        train_loss=outcome.train_loss, metrics=outcome.metrics, samples_per_second=outcome.samples_per_second,
        data_report=report, sample_captions=task.samples, images_used=data.images_used,
        skipped={reason: paths for reason, paths in data.skipped().items() if paths}, log_file=outcome.log_file,
        stopped=outcome.stopped, vision_features=dataclasses.asdict(task.feature_counts) if vision_cache else {},
    )


def _vision_cache(config: CaptionerTrainConfig, model: Any, processor: Any) -> VisionFeatureCache:
    """The feature cache for this model, after checking that nothing in its vision tower trains."""
    from captionkit.train.feature_cache import default_cache_dir, require_frozen_vision, vision_fingerprint

    require_frozen_vision(model, config.mode)
    root = config.vision_cache_dir or default_cache_dir(config.output_dir)
    return VisionFeatureCache(root, vision_fingerprint(model, processor, config.mixed_precision))


def training_sampler(config: CaptionerTrainConfig, items: list[CaptionItem], tokenizer: Any,
                     process_index: int = 0, num_processes: int = 1) -> EpochBatchSampler:
    """The training batches: shuffled per epoch, and with ``group_by_length`` grouped by each
    caption's token length (before augmentation, at most ``max_target_tokens``)."""
    lengths = None
    if config.group_by_length:
        tokens = caption_lengths(items, tokenizer)
        lengths = [min(tokens[item.caption], config.max_target_tokens) for item in items]
    return EpochBatchSampler(len(items), config.batch_size, config.seed, shuffle=True, process_index=process_index,
                             num_processes=num_processes, lengths=lengths, with_epoch=True)


class _CaptionerTask(TrainingTask):
    """Caption pairs, the token-summed loss, caption metrics and ``save_pretrained`` folders."""

    divisor_reads_window = True  # the window's caption tokens divide its loss

    def __init__(self, config: CaptionerTrainConfig, accelerator: Any, processor: Any, data: _Data,
                 train_items: list[CaptionItem], val_items: list[CaptionItem],
                 vision_cache: VisionFeatureCache | None = None) -> None:
        self.config, self.accelerator, self.processor, self.data = config, accelerator, processor, data
        self.val_items = val_items
        self.model: Any = None
        self.total_steps = 0
        self.samples = []
        self.collator = CaptionCollator(processor, config.max_target_tokens)
        self.vision_cache, self.feature_counts = vision_cache, FeatureCounts()
        if vision_cache is None:
            self.dataset, train_collator = CaptionDataset(train_items, config.augment, config.seed), self.collator
        else:
            self.dataset = CachedCaptionDataset(train_items, vision_cache, config.augment, config.seed)
            train_collator = FeatureCollator(processor, config.max_target_tokens)
        self.sampler = training_sampler(config, train_items, processor.tokenizer, accelerator.process_index,
                                        accelerator.num_processes)
        self.workers = data_workers(config.num_workers, accelerator.device, accelerator.num_processes)
        # The training workers stay from epoch to epoch (the sampler's keys carry the epoch).
        self.loader = self._loader(self.dataset, self.sampler, train_collator, persistent=True)

    def _loader(self, dataset: Any, sampler: EpochBatchSampler, collator: Any, persistent: bool = False) -> Any:
        """Batches prepared ahead in ``self.workers`` processes, in page-locked memory for a CUDA device."""
        import torch

        workers = self.workers
        # A private generator: creating a DataLoader iterator draws a seed, and drawing it from
        # the global RNG would shift dropout masks after a resume.
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                           num_workers=workers, prefetch_factor=2 if workers else None,
                                           persistent_workers=persistent and workers > 0,
                                           pin_memory=self.accelerator.device.type == "cuda",
                                           generator=torch.Generator().manual_seed(self.config.seed))

    def begin(self, log_file: Path) -> None:
        from captionkit.train.runlog import log_skipped

        if self.accelerator.is_main_process:
            save_config(self.config, self.config.output_dir / CONFIG_FILE)
            log_skipped(self.data.images_used, self.data.skipped(), log_file)
        if self.vision_cache is not None:
            self.vision_cache.prepare({"model": self.config.model, "revision": self.config.revision,
                                       "mixed_precision": self.config.mixed_precision})
            digests = self.dataset.digests  # a CachedCaptionDataset
            _log.info("vision features: %d of %d images already in %s", self.vision_cache.cached_count(digests),
                      len(set(digests)), self.vision_cache.folder)

    def batches(self, epoch: int, start: int) -> Any:
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start)
        return iter(self.loader)

    def loss_divisor(self, window: list[dict[str, Any]]) -> Any:
        """The window's caption tokens (averaged over processes), without waiting for the device."""
        import torch

        local_tokens = float(sum(target_tokens(batch) for batch in window))
        if self.accelerator.num_processes == 1:
            return max(local_tokens, 1.0)
        # A device tensor, never read back: the division stays on the device, the step does not wait.
        all_tokens = self.accelerator.reduce(torch.tensor(local_tokens, device=self.accelerator.device), "sum")
        return (all_tokens / self.accelerator.num_processes).clamp(min=1.0)

    def loss(self, model: Any, batch: dict[str, Any]) -> BatchLoss:
        if self.vision_cache is not None:
            batch = complete_features(model, batch, self.vision_cache, self.feature_counts)
        loss_sum = token_losses(model, batch).sum()
        # The logged total stays a device tensor: the loop sums it there and reads it at logging steps.
        return BatchLoss(loss_sum, loss_sum.detach(), target_tokens(batch), len(batch["captions"]))

    def train_mode(self, model: Any) -> None:
        """Training mode, with a frozen vision tower (nothing in it trains) in eval mode.

        A frozen tower in training mode would still apply DaViT's stochastic depth
        (``drop_path_rate``): noise on features nothing learns from, and features that differ
        from the cached ones (``cache_vision_features`` computes them in eval mode, as at inference).
        """
        model.train()
        tower = florence_inner(model).vision_tower
        if not any(parameter.requires_grad for parameter in tower.parameters()):
            tower.eval()

    def evaluate(self, model: Any) -> dict[str, float]:
        import torch
        from accelerate.utils import gather_object

        from captionkit.train.caption_metrics import caption_metrics

        config, accelerator = self.config, self.accelerator
        unwrapped = accelerator.unwrap_model(model)
        model.eval()
        val_sampler = EpochBatchSampler(len(self.val_items), config.batch_size, 0, shuffle=False,
                                        process_index=accelerator.process_index,
                                        num_processes=accelerator.num_processes)
        val_loader = self._loader(CaptionDataset(self.val_items), val_sampler, self.collator)
        loss_sum = torch.zeros((), device=accelerator.device)
        tokens = torch.zeros((), device=accelerator.device)
        predictions: list[str] = []
        references: list[str] = []
        with torch.no_grad():
            for batch in val_loader:
                if batch is None:
                    continue
                batch = to_device(batch, accelerator.device)
                with accelerator.autocast():
                    losses = token_losses(model, batch)
                loss_sum += losses.sum()
                tokens += (batch["labels"] != -100).sum()
                with accelerator.autocast():
                    generated = unwrapped.generate(
                        input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                        attention_mask=batch["attention_mask"], max_new_tokens=config.max_target_tokens,
                        num_beams=config.eval_num_beams, do_sample=False,
                        # Florence's default n-gram blocking corrupts repetitive captions (tags).
                        no_repeat_ngram_size=0,
                    )
                predictions += [text.strip() for text in
                                self.processor.batch_decode(generated, skip_special_tokens=True)]
                references += batch["captions"]
        loss_sum = accelerator.reduce(loss_sum, "sum")
        tokens = accelerator.reduce(tokens, "sum")
        predictions = gather_object(predictions)
        references = gather_object(references)
        metrics = {"val_loss": float(loss_sum / tokens.clamp(min=1))}
        metrics.update(caption_metrics(predictions, references) if predictions else {})
        self.samples = list(zip(predictions, references, strict=True))[: config.sample_captions]
        return metrics

    def save_model(self, folder: Path) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(folder, safe_serialization=True)
        self.processor.save_pretrained(folder)
        save_config(self.config, folder / CONFIG_FILE)

    def export(self, folder: Path, metrics: dict[str, float], progress: Progress, final: bool) -> None:
        write_folder_atomically(folder, self.save_model)

    def checkpoint_info(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {"mode": self.config.mode, "total_steps": self.total_steps}
