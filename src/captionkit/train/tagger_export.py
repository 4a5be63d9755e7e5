"""Export a trained tagger as a folder ``captionkit tag`` loads, plus an optional ONNX file.

Folder layout (a superset of SmilingWolf's timm WD v3 repos, so timm-based WD tools can
read the weights too):

* ``model.safetensors`` — timm state dict
* ``config.json`` — ``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``
  (input size, mean/std, interpolation) and a ``captionkit`` section (format version,
  metrics, training settings)
* ``selected_tags.csv`` — ``tag_id,name,category,count,best_threshold``
* ``thresholds.json`` — per-category thresholds and per-tag F1-optimal thresholds
* ``preprocess.json`` — exactly what :class:`captionkit.models.taggers.Preprocessing` does
* ``model.onnx`` (optional) — WD-style: NHWC, BGR, float 0-255 in, probabilities out,
  dynamic batch axis; ``load_tagger("FOLDER/model.onnx")`` reads it with the WD loader.

The folder is written under a temporary name and renamed into place, so a crash never
leaves a half-exported model where a finished one is expected.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captionkit.core.atomic import write_staged_json
from captionkit.core.tagging import category_name
from captionkit.models.taggers import (
    CONFIG_FILE,
    FORMAT_CAPTIONKIT,
    ONNX_FILE,
    PREPROCESS_FILE,
    TAGS_FILE,
    THRESHOLDS_FILE,
    Preprocessing,
)
from captionkit.train.checkpoints import link_or_copy, write_folder_atomically
from captionkit.train.tagger_data import Vocabulary

EXPORT_VERSION = 1


def classifier_name(model: Any) -> str:
    """Dotted name of the timm classifier Linear (``head.fc``, ``fc``, ``head`` ...)."""
    name = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if isinstance(name, (list, tuple)):
        name = name[0]
    modules = dict(model.named_modules())
    if not name or name not in modules:
        classifier = model.get_classifier()
        name = next((key for key, module in modules.items() if module is classifier), None)
    if not name:
        raise ValueError(f"cannot find the classifier layer of {type(model).__name__}")
    return name


def model_config(model: Any, architecture: str, model_args: dict[str, Any], preprocessing: Preprocessing,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` content (timm hub style plus a ``captionkit`` section)."""
    height, width = preprocessing.size
    return {
        "architecture": architecture,
        "num_classes": int(model.num_classes),
        "num_features": int(getattr(model, "num_features", 0)),
        "model_args": dict(model_args),
        "pretrained_cfg": {
            "input_size": [3, height, width],
            "interpolation": preprocessing.interpolation,
            "mean": list(preprocessing.mean or (0.0, 0.0, 0.0)),
            "std": list(preprocessing.std or (1.0, 1.0, 1.0)),
            "crop_pct": preprocessing.crop_pct,
            "crop_mode": "center",
            "num_classes": int(model.num_classes),
            "classifier": classifier_name(model),
        },
        "captionkit": {"format": FORMAT_CAPTIONKIT, "version": EXPORT_VERSION, **(extra or {})},
    }


class WDStyleWrapper:
    """Builds the ONNX graph's module: NHWC BGR 0-255 → normalised NCHW RGB → sigmoid."""

    @staticmethod
    def build(model: Any, preprocessing: Preprocessing) -> Any:
        import torch
        from torch import nn

        class _Wrapper(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model
                mean = preprocessing.mean or (0.0, 0.0, 0.0)
                std = preprocessing.std or (1.0, 1.0, 1.0)
                self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
                self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
                self.scale = float(preprocessing.scale)
                self.bgr_to_rgb = preprocessing.channel_order == "RGB"

            def forward(self, image: torch.Tensor) -> torch.Tensor:
                x = image.permute(0, 3, 1, 2)
                if self.bgr_to_rgb:
                    x = torch.cat([x[:, 2:3], x[:, 1:2], x[:, 0:1]], dim=1)
                x = (x * self.scale - self.mean) / self.std
                return torch.sigmoid(self.model(x).float())

        return _Wrapper().eval()


def export_onnx(model: Any, preprocessing: Preprocessing, path: str | Path, opset: int = 18) -> Path:
    """Write a WD-style ONNX file (dynamic batch) atomically; returns its path."""
    import torch

    path = Path(path)
    wrapper = WDStyleWrapper.build(model, preprocessing)
    height, width = preprocessing.size
    example = torch.rand(2, height, width, 3) * 255.0
    temp = path.with_name(f".{path.name}.ck-tmp-{uuid.uuid4().hex[:8]}")
    was_training = model.training
    model.eval()
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        with warnings.catch_warnings():  # torch.export's own deprecation chatter, not ours to fix
            warnings.simplefilter("ignore", FutureWarning)
            _onnx_export(torch, wrapper, example, temp, batch, opset)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
        model.train(was_training)
    return path


def _onnx_export(torch: Any, wrapper: Any, example: Any, temp: Path, batch: Any, opset: int) -> None:
    torch.onnx.export(
        wrapper,
        (example,),
        str(temp),
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes={"image": {0: batch}},
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def export_tagger(
    model: Any,
    destination: str | Path,
    *,
    architecture: str,
    model_args: dict[str, Any],
    vocabulary: Vocabulary,
    preprocessing: Preprocessing,
    threshold: float = 0.5,
    per_tag_thresholds: Sequence[float] | np.ndarray | None = None,
    metrics: dict[str, float] | None = None,
    training: dict[str, Any] | None = None,
    onnx: bool = False,
    weights_from: Path | None = None,
) -> Path:
    """Write the model folder described in the module docstring; returns the folder.

    ``threshold`` becomes every category's default; ``per_tag_thresholds`` (tuned on
    validation) ship in ``thresholds.json`` and the CSV's ``best_threshold`` column.
    ``weights_from``: a finished ``model.safetensors`` of these very weights (a checkpoint saved
    at the same step), linked instead of serialised again.
    """
    from safetensors.torch import save_file

    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if model.num_classes != len(vocabulary):
        raise ValueError(f"the model has {model.num_classes} outputs but the vocabulary {len(vocabulary)} tags")

    def build(temp: Path) -> None:
        if weights_from is not None:
            link_or_copy(weights_from, temp / "model.safetensors")
        else:
            state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
            save_file(state, str(temp / "model.safetensors"), metadata={"format": "pt"})
        extra = {"metrics": metrics or {}, "training": training or {}}
        write_staged_json(temp / CONFIG_FILE, model_config(model, architecture, model_args, preprocessing, extra))
        per_tag = None if per_tag_thresholds is None else [float(v) for v in per_tag_thresholds]
        (temp / TAGS_FILE).write_bytes(vocabulary.to_csv(per_tag).encode("utf-8"))
        categories = sorted({category_name(c) for c in vocabulary.categories} | {"general", "character"})
        write_staged_json(
            temp / THRESHOLDS_FILE,
            {
                "categories": {name: float(threshold) for name in categories},
                "per_tag": per_tag,
                "per_tag_source": "F1-optimal on the validation split" if per_tag is not None else None,
            },
        )
        write_staged_json(temp / PREPROCESS_FILE, preprocessing.to_dict())
        if onnx:
            export_onnx(model, preprocessing, temp / ONNX_FILE)

    return write_folder_atomically(destination, build)


def add_onnx_to_folder(folder: str | Path) -> Path:
    """Add ``model.onnx`` to an exported tagger folder (used for the best model at the end)."""
    from captionkit.models.taggers import load_tagger

    folder = Path(folder)
    tagger = load_tagger(str(folder), device="cpu")
    model = tagger._runner.model
    path = export_onnx(model, tagger.preprocessing, folder / ONNX_FILE)
    tagger.unload()
    return path


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of an exported folder."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
