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
import random
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from captionkit._warnings import peft_wrapping_quietly
from captionkit.train.captioner_data import (
    AugmentConfig,
    CaptionCollator,
    CaptionDataset,
    CaptionItem,
    DataReport,
    DatasetSpec,
    EpochBatchSampler,
    check_caption_lengths,
    load_items,
    split_items,
)
from captionkit.train.checkpoints import (
    CheckpointManager,
    atomic_write_json,
    write_folder_atomically,
)
from captionkit.train.config import ConfigError, config_to_dict, load_config, save_config
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
    lora: LoraSettings = field(default_factory=LoraSettings)
    val_data: list[DatasetSpec] = field(default_factory=list)
    val_split: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_target_tokens: int = 256
    long_captions: Literal["truncate", "skip"] = "truncate"
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    epochs: int | None = None
    max_steps: int | None = None
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    seed: int = 0
    num_workers: int = 0
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
        if self.sample_captions < 0 or self.num_workers < 0:
            raise ValueError("sample_captions and num_workers must be 0 or more")
        if self.wandb_project and "wandb" not in self.report_to:
            raise ValueError("wandb_project is set but report_to does not include 'wandb'")

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


def _build_optimizer(config: CaptionerTrainConfig, model: Any) -> Any:
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
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=settings.betas, eps=settings.eps)


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


def token_losses(model: Any, batch: dict[str, Any]) -> Any:
    """Cross-entropy per caption token (0 at pad positions), shape (batch, target length)."""
    import torch.nn.functional as functional

    labels = batch["labels"]
    config = model.config if hasattr(model, "config") else model.module.config
    outputs = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_inputs(labels, config),
        use_cache=False,
    )
    logits = outputs.logits.float()
    losses = functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.view(labels.shape)


# -- logging ------------------------------------------------------------------------------


class _Reporters:
    """TensorBoard (default) and W&B sinks, plus ``metrics.jsonl`` (append-only log).

    The JSONL log is appended line by line: rewriting it atomically on every step would
    cost quadratic time, and a crash can only cut its last line.
    """

    def __init__(self, config: CaptionerTrainConfig, enabled: bool) -> None:
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        self.jsonl = config.output_dir / "metrics.jsonl"
        if not enabled:
            return
        if "tensorboard" in config.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(config.output_dir / "logs"))
        if "wandb" in config.report_to:
            import wandb

            self.wandb = wandb.init(project=config.wandb_project or "captionkit", dir=str(config.output_dir),
                                    config=config_to_dict(config), resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def samples(self, pairs: list[tuple[str, str]], step: int) -> None:
        if not self.enabled or not pairs:
            return
        if self.tensorboard is not None:
            table = "\n".join(f"| {reference} | {prediction} |" for prediction, reference in pairs)
            self.tensorboard.add_text("val/samples", "| reference | generated |\n|---|---|\n" + table, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"val/samples": wandb.Table(columns=["generated", "reference"],
                                                       data=[list(pair) for pair in pairs])}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


# -- state --------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    import numpy
    import torch

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy
    import torch

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Progress:
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0
    best_metric: float | None = None


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
    report, val_report = DataReport(), DataReport()
    items: list[CaptionItem] = []
    val: list[CaptionItem] = []
    try:
        for spec in config.data:
            items += load_items(spec, report)
        if config.val_split:
            items, val = split_items(items, config.val_split, config.seed)
        for spec in config.val_data:
            val += load_items(dataclasses.replace(spec, repeats=1), val_report)
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
    from captionkit.errors import NothingSucceededError, require

    require("accelerate", "captionkit train captioner", extra="train")
    if config.mode in ("lora", "qlora"):
        require("peft", f"mode: {config.mode}", extra="train")
    if "tensorboard" in config.report_to:
        require("tensorboard", "report_to: tensorboard", extra="train")
    import torch
    from accelerate.utils import gather_object, set_seed

    from captionkit.train.accelerator import new_accelerator
    from captionkit.train.preflight import check_hub_model
    from captionkit.train.runlog import log_skipped, run_log

    _check_settings(config)
    resume_path = Path(resume_from) if resume_from is not None else None
    resume_state = _check_resume(config, resume_path) if resume_path is not None else None
    data = _read_data(config)  # the data paths, before any model is loaded
    offline = check_hub_model(config.model, config.revision)
    set_seed(config.seed)
    accelerator = new_accelerator(mixed_precision=config.mixed_precision, cpu=config.cpu)
    processor, model = _load_model(config, accelerator, resume_path, offline=offline)
    train_items, val_items, report = _check_lengths(config, processor, data)
    collator = CaptionCollator(processor, config.max_target_tokens)
    dataset = CaptionDataset(train_items, config.augment, config.seed)
    sampler = EpochBatchSampler(len(dataset), config.batch_size, config.seed, shuffle=True,
                                process_index=accelerator.process_index, num_processes=accelerator.num_processes)
    # A private generator: creating a DataLoader iterator draws a seed, and drawing it from
    # the global RNG would shift dropout masks after a resume.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                         num_workers=config.num_workers,
                                         generator=torch.Generator().manual_seed(config.seed))
    batches_per_epoch = sampler.batches_per_epoch()
    if batches_per_epoch == 0:
        raise ConfigError(f"{len(dataset)} training samples make no batch of {config.batch_size} per process")
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps or (config.epochs or 1) * steps_per_epoch
    optimizer = _build_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config.scheduler, total_steps))
    model, optimizer = accelerator.prepare(model, optimizer)

    output_dir = config.output_dir  # validation passed: from here on the run writes files
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    with run_log(output_dir, accelerator.is_main_process) as log_file:
        if accelerator.is_main_process:
            save_config(config, output_dir / CONFIG_FILE)
            log_skipped(data.images_used, data.skipped(), log_file)
        reporters = _Reporters(config, accelerator.is_main_process)

        progress = _Progress()
        if resume_path is not None and resume_state is not None:
            state_dir = resume_path / STATE_DIR
            optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=False))
            scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=False))
            scaler_file = state_dir / "scaler.pt"
            if accelerator.scaler is not None and scaler_file.exists():
                accelerator.scaler.load_state_dict(torch.load(scaler_file, weights_only=False))
            progress = _Progress(**{key: resume_state[key] for key in dataclasses.asdict(_Progress())})
            _set_rng_state(torch.load(state_dir / "rng.pt", weights_only=False))
            _log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, progress.global_step,
                      progress.epoch, progress.batch_in_epoch)

        metric_name = config.best_metric if config.has_validation else None
        greater = metric_name not in (None, "val_loss")
        manager = CheckpointManager(output_dir / "checkpoints", config.save_total_limit, metric_name, greater)
        unwrapped = accelerator.unwrap_model(model)

        def write_model(folder: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(folder, safe_serialization=True)
            processor.save_pretrained(folder)
            save_config(config, folder / CONFIG_FILE)

        def write_checkpoint(folder: Path) -> None:
            write_model(folder)
            state_dir = folder / STATE_DIR
            state_dir.mkdir()
            torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
            torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), state_dir / "scaler.pt")
            torch.save(_rng_state(), state_dir / "rng.pt")
            atomic_write_json(state_dir / "trainer_state.json",
                              {**dataclasses.asdict(progress), "mode": config.mode, "total_steps": total_steps})

        last_metrics: dict[str, float] = {}
        last_samples: list[tuple[str, str]] = []
        evaluated_at = -1

        def validate() -> dict[str, float]:
            nonlocal last_samples
            from captionkit.train.caption_metrics import caption_metrics

            model.eval()
            val_sampler = EpochBatchSampler(len(val_items), config.batch_size, 0, shuffle=False,
                                            process_index=accelerator.process_index,
                                            num_processes=accelerator.num_processes)
            val_loader = torch.utils.data.DataLoader(CaptionDataset(val_items), batch_sampler=val_sampler,
                                                     collate_fn=collator, num_workers=config.num_workers,
                                                     generator=torch.Generator().manual_seed(config.seed))
            loss_sum = torch.zeros((), device=accelerator.device)
            tokens = torch.zeros((), device=accelerator.device)
            predictions: list[str] = []
            references: list[str] = []
            with torch.no_grad():
                for batch in val_loader:
                    if batch is None:
                        continue
                    batch = _to_device(batch, accelerator.device)
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
                                    processor.batch_decode(generated, skip_special_tokens=True)]
                    references += batch["captions"]
            loss_sum = accelerator.reduce(loss_sum, "sum")
            tokens = accelerator.reduce(tokens, "sum")
            predictions = gather_object(predictions)
            references = gather_object(references)
            model.train()
            metrics = {"val_loss": float(loss_sum / tokens.clamp(min=1))}
            metrics.update(caption_metrics(predictions, references) if predictions else {})
            last_samples = list(zip(predictions, references, strict=True))[: config.sample_captions]
            return metrics

        def maybe_validate_and_save(end_of_epoch: bool) -> None:
            nonlocal last_metrics, evaluated_at
            step = progress.global_step
            run_eval = config.has_validation and (
                (config.eval_every_steps is not None and step % config.eval_every_steps == 0)
                or (config.eval_every_steps is None and end_of_epoch)
            )
            save = (config.save_every_steps is not None and step % config.save_every_steps == 0) or (
                end_of_epoch and config.save_every_epochs is not None
                and (progress.epoch + 1) % config.save_every_epochs == 0  # epoch is still 0-based here
            )
            metric = None
            # A checkpoint is always scored when there is validation data: otherwise "best"
            # would only be known for saves that happen to fall on an evaluation step.
            if run_eval or (save and config.has_validation):
                metrics = validate()
                last_metrics, evaluated_at = metrics, step
                reporters.scalars({f"val/{key}": value for key, value in metrics.items()}, step)
                reporters.samples(last_samples, step)
                metric = metrics.get(config.best_metric)
                if metric is not None:
                    better = progress.best_metric is None or (
                        metric > progress.best_metric if greater else metric < progress.best_metric)
                    if better:
                        progress.best_metric = metric
            if save:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    manager.save(f"step-{step:07d}", write_checkpoint, metric=metric)

        model.train()
        parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        start_time = time.perf_counter()
        start_samples = progress.samples_seen
        start_step = progress.global_step
        window_loss = 0.0
        window_tokens = 0
        last_train_loss: float | None = None
        stopped = False
        while progress.global_step < total_steps and not stopped:
            if progress.batch_in_epoch >= batches_per_epoch:
                progress.epoch += 1
                progress.batch_in_epoch = 0
            dataset.set_epoch(progress.epoch)
            sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
            iterator = iter(loader)
            while progress.batch_in_epoch < batches_per_epoch and progress.global_step < total_steps:
                if stop is not None and stop.is_set():
                    stopped = True
                    break
                wanted = min(config.gradient_accumulation_steps, batches_per_epoch - progress.batch_in_epoch)
                window = [next(iterator) for _ in range(wanted)]
                progress.batch_in_epoch += wanted
                window = [_to_device(batch, accelerator.device) for batch in window if batch is not None]
                local_tokens = sum(int((batch["labels"] != -100).sum()) for batch in window)
                all_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum")
                denominator = float(all_tokens) / accelerator.num_processes
                for position, batch in enumerate(window):
                    last = position == len(window) - 1
                    sync = nullcontext() if last else accelerator.no_sync(model)
                    with sync, accelerator.autocast():
                        loss_sum = token_losses(model, batch).sum()
                        accelerator.backward(loss_sum / max(denominator, 1.0))
                    window_loss += float(loss_sum.detach())
                    progress.samples_seen += len(batch["captions"])
                window_tokens += local_tokens
                grad_norm = None
                if config.optimizer.max_grad_norm is not None and window:
                    grad_norm = accelerator.clip_grad_norm_(parameters, config.optimizer.max_grad_norm)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.global_step += 1
                if progress.global_step % config.log_every_steps == 0 or progress.global_step == total_steps:
                    elapsed = max(time.perf_counter() - start_time, 1e-9)
                    last_train_loss = window_loss / max(window_tokens, 1)
                    values = {"train/loss": last_train_loss, "train/lr": scheduler.get_last_lr()[0],
                              "train/epoch": progress.epoch + progress.batch_in_epoch / batches_per_epoch,
                              "train/samples_per_second": (progress.samples_seen - start_samples) / elapsed}
                    if grad_norm is not None:
                        values["train/grad_norm"] = float(grad_norm)
                    reporters.scalars(values, progress.global_step)
                    window_loss, window_tokens = 0.0, 0
                end_of_epoch = progress.batch_in_epoch >= batches_per_epoch
                maybe_validate_and_save(end_of_epoch)
            # Release the iterator's workers before the next epoch creates new ones.
            del iterator
        if stopped:
            checkpoint = manager.root / f"step-{progress.global_step:07d}"
            if accelerator.is_main_process and progress.global_step > 0 and not checkpoint.is_dir():
                manager.save(checkpoint.name, write_checkpoint)
            reporters.close()
            _log.info("stopped at step %d of %d; resume from %s", progress.global_step, total_steps,
                      checkpoint if checkpoint.is_dir() else "the start (no step was finished)")
            return TrainResult(
                output_dir=output_dir, final_path=checkpoint, best_checkpoint=manager.best(),
                global_step=progress.global_step, epochs_completed=progress.epoch, train_loss=last_train_loss,
                metrics=last_metrics, samples_per_second=0.0, data_report=report, sample_captions=last_samples,
                images_used=data.images_used,
                skipped={reason: paths for reason, paths in data.skipped().items() if paths}, log_file=log_file,
                stopped=True,
            )
        elapsed = max(time.perf_counter() - start_time, 1e-9)
        samples_per_second = (progress.samples_seen - start_samples) / elapsed
        trained_on = accelerator.reduce(torch.tensor(float(progress.samples_seen - start_samples),
                                                     device=accelerator.device), "sum")
        if progress.global_step > start_step and float(trained_on) == 0:
            reporters.close()
            raise NothingSucceededError(
                f"no training image could be decoded in {progress.global_step - start_step} steps (each was "
                "skipped; the warnings above name them), so no model was written; fix or remove those files")
        if config.has_validation and evaluated_at != progress.global_step:
            last_metrics = validate()
            reporters.scalars({f"val/{key}": value for key, value in last_metrics.items()}, progress.global_step)
            reporters.samples(last_samples, progress.global_step)
        accelerator.wait_for_everyone()
        final_path = output_dir / "final"
        if accelerator.is_main_process:
            write_folder_atomically(final_path, write_model)
        reporters.close()
        if last_train_loss is None and window_tokens:
            last_train_loss = window_loss / window_tokens
        return TrainResult(
            output_dir=output_dir, final_path=final_path, best_checkpoint=manager.best(),
            global_step=progress.global_step, epochs_completed=progress.epoch + int(
                progress.batch_in_epoch >= batches_per_epoch),
            train_loss=last_train_loss, metrics=last_metrics, samples_per_second=samples_per_second,
            data_report=report, sample_captions=last_samples, images_used=data.images_used,
            skipped={reason: paths for reason, paths in data.skipped().items() if paths}, log_file=log_file,
        )


def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in batch.items()}
