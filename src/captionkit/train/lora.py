"""LoRA on native Florence-2: target presets that match real module names, and merging.

Why: the anchor scripts targeted names that do not exist in Florence-2 (``o_proj``,
``linear``) or every Linear in both towers (``fc1``/``fc2`` also match the DaViT FFN),
so "language-model LoRA" silently trained the vision tower too or nothing at all. Here
targets are a preset, a regex matched against full module paths, or a list of module
names; a target that matches nothing is an error that lists real module names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captionkit.core.warnings_filter import peft_wrapping_quietly
from captionkit.train.checkpoints import write_folder_atomically

_LANGUAGE_LAYERS = r"model\.language_model\.(encoder|decoder)\.layers\.\d+\."
TARGET_PRESETS: dict[str, str] = {
    # Attention projections and FFN of the BART encoder and decoder (the default).
    "language": _LANGUAGE_LAYERS + r"((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)",
    "language_attention": _LANGUAGE_LAYERS + r"(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)",
    # DaViT attention/FFN, the image projection and the language model.
    "all_linear": (
        r"model\.(vision_tower\..*\.(qkv|proj|fc1|fc2)|multi_modal_projector\.image_projection|"
        r"language_model\.(encoder|decoder)\.layers\.\d+\.((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)"
        r"|fc1|fc2))"
    ),
}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (used when ``mode`` is ``lora`` or ``qlora``).

    ``target_modules``: a preset name (``language``, ``language_attention``,
    ``all_linear``), a regex matched against full module paths (e.g.
    ``model\\.language_model\\.decoder\\..*\\.(q_proj|v_proj)``), or a list of module
    names matched as suffixes (PEFT's convention, e.g. ``[q_proj, v_proj]``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    rslora: bool = False
    target_modules: str | list[str] = "language"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            resolve_target_modules(self.target_modules)
        elif not self.target_modules:
            raise ValueError("lora.target_modules must not be empty; use the preset 'language' for the default")


def resolve_target_modules(target: str | list[str]) -> str | list[str]:
    """Expand a preset name; check that a regex compiles."""
    if isinstance(target, list):
        return list(target)
    if target in TARGET_PRESETS:
        return TARGET_PRESETS[target]
    try:
        re.compile(target)
    except re.error as error:
        raise ValueError(
            f"lora.target_modules {target!r} is neither a preset ({', '.join(TARGET_PRESETS)}) "
            f"nor a valid regex ({error})"
        ) from error
    return target


def matching_modules(model: Any, target: str | list[str]) -> list[str]:
    """Full names of the Linear/Conv modules PEFT would wrap for ``target``."""
    import torch

    resolved = resolve_target_modules(target)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            continue
        if isinstance(resolved, str):
            matched = re.fullmatch(resolved, name) is not None
        else:
            matched = any(name == key or name.endswith("." + key) for key in resolved)
        if matched:
            names.append(name)
    return names


def apply_lora(model: Any, settings: LoraSettings, gradient_checkpointing: bool = False) -> Any:
    """Wrap ``model`` in a trainable PEFT LoRA model with ``settings``."""
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from peft import LoraConfig, get_peft_model

    matched = matching_modules(model, settings.target_modules)
    if not matched:
        import torch

        examples = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)][:8]
        raise ValueError(
            f"lora.target_modules {settings.target_modules!r} matches no Linear module of this model. "
            f"Module names look like: {', '.join(examples)}. Use a preset ({', '.join(TARGET_PRESETS)}) "
            "or a regex over such full names"
        )
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        use_rslora=settings.rslora,
        target_modules=resolve_target_modules(settings.target_modules),
        modules_to_save=list(settings.modules_to_save) or None,
        bias="none",
    )
    if gradient_checkpointing:
        # Without this, checkpointed blocks whose inputs need no grad would leave the
        # LoRA weights untrained (peft #1142).
        model.enable_input_require_grads()
    with peft_wrapping_quietly():
        return get_peft_model(model, config)


def adapter_base_model(adapter: Path) -> str | None:
    """The base model recorded in an adapter's ``adapter_config.json``."""
    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.exists():
        raise ValueError(
            f"{adapter}: no adapter_config.json; pass the folder a LoRA run saved (a checkpoint or 'final')"
        )
    return json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")


def merge_lora(base: str | Path | None, adapter: str | Path, output: str | Path,
               revision: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base and save a standalone Florence-2 folder.

    Why: an unmerged adapter costs extra matmuls at inference (roboflow/inference #885);
    the merged folder loads with plain ``transformers`` and gives the same outputs.
    ``base`` defaults to the base model recorded in the adapter. The processor is taken
    from the adapter folder when it has one (training saves it there), else the base.
    """
    from captionkit._torchvision_compat import ensure_torchvision

    ensure_torchvision()
    from peft import PeftModel
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    adapter = Path(adapter)
    output = Path(output)
    recorded = adapter_base_model(adapter)
    base_name = str(base) if base is not None else recorded
    if not base_name:
        raise ValueError(f"{adapter}: the adapter records no base model; pass --base")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ValueError(f"{output}: already exists and is not empty; choose another --output or remove it")
    try:
        model = Florence2ForConditionalGeneration.from_pretrained(base_name, revision=revision)
    except OSError as error:
        from captionkit.core.environment import broken_environment
        from captionkit.models import is_local, model_unavailable

        if (broken := broken_environment(error)) is not None:
            raise broken from error
        if is_local(base_name):
            raise ValueError(f"{base_name}: not a loadable Florence-2 folder ({error}); pass --base FOLDER") from error
        raise model_unavailable(base_name, error) from error
    with peft_wrapping_quietly():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    processor_source = adapter if (adapter / "tokenizer_config.json").exists() else base_name
    processor = AutoProcessor.from_pretrained(processor_source)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        processor.save_pretrained(folder)

    write_folder_atomically(output, write)
    return output


