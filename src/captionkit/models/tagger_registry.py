"""Registry entries for the tagger formats (the loaders live in :mod:`captionkit.models.taggers`)."""

from __future__ import annotations

from typing import Any

from captionkit.models import register_backend

DEFAULT_TAGGER = "SmilingWolf/wd-swinv2-tagger-v3"


def _load(name_or_path: str, **options: Any):
    from captionkit.models.taggers import load_tagger

    return load_tagger(name_or_path, **options)


for _name, _description, _extras, _modules in (
    ("wd-onnx", "WD-style ONNX tagger: model.onnx + selected_tags.csv (onnxruntime; GPU asked for = GPU or error)",
     ("onnx",), ("onnxruntime",)),
    ("wd-timm", "WD v3 timm tagger: config.json (architecture, pretrained_cfg) + model.safetensors + tag list",
     (), ()),
    ("captionkit-timm", "tagger folder from `captionkit train tagger` (timm weights, tuned per-tag thresholds)",
     (), ()),
):
    register_backend(_name, kind="tagger", description=_description, model_types=(_name,),
                     default_model=DEFAULT_TAGGER if _name != "captionkit-timm" else None, extras=_extras,
                     modules=_modules, style="tagger")(_load)
