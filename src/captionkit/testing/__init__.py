"""Tiny models with random weights, built offline from configs, for tests and benchmarks.

Why: model hubs are unreachable in development and CI, yet the loading, batching,
generation, training and saving code must run for real. These builders create complete
model folders (weights, config, processor, tokenizer) that load with the same
``from_pretrained`` calls a user's downloaded checkpoint goes through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision

FLORENCE_TASK_TOKENS = [
    "<OCR>", "<OCR_WITH_REGION>", "<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>",
    "<OD>", "<DENSE_REGION_CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>",
    "<REFERRING_EXPRESSION_SEGMENTATION>", "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>",
    "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>", "<REGION_TO_OCR>", "<REGION_PROPOSAL>",
]

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "grey"]
_SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "line", "dot"]

POST_PROCESSOR_CONFIG = {
    "ocr": {"pattern": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "area_threshold": 0.0},
    "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def _training_sentences() -> list[str]:
    """Sentences covering the vocabulary tests and benchmarks caption with."""
    sentences = [
        "What does the image describe?",
        "Describe in detail what is shown in the image.",
        "Describe with a paragraph what is shown in the image.",
        "What is the text in the image?",
        "What is the text in the image, with regions?",
        "Locate the objects with category name in the image.",
        "Locate the objects in the image, with their descriptions.",
        "Locate the region proposals in the image.",
        "Locate the phrases in the caption:",
        "What is the polygon mask of region",
        "What does the region describe? What text is in the region?",
        "The image shows a photo of a cat sitting on a table next to a window.",
    ]
    for first in _COLOURS:
        for shape in _SHAPES:
            sentences.append(f"a {first} {shape}")
            sentences.append(f"a {first} {shape} and a {_COLOURS[(len(shape)) % len(_COLOURS)]} square")
    return sentences * 2


def build_tiny_tokenizer(vocab_size: int = 600):
    """A byte-level BPE BartTokenizer trained in well under a second, with Florence's tokens."""
    ensure_torchvision()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BartTokenizer

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_sentences(), trainer=trainer)
    model = tokenizer.model
    vocab = tokenizer.get_vocab()
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        merges = []
        for line in Path(folder, "merges.txt").read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#"):
                left, right = line.split(" ")
                merges.append((left, right))
        vocab = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
    bart = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"})
    bart.add_tokens(FLORENCE_TASK_TOKENS + [f"<loc_{index}>" for index in range(1000)], special_tokens=True)
    return bart


def build_tiny_florence2(
    folder: str | Path,
    image_size: int = 64,
    seed: int = 0,
    vision_dims: tuple[int, int, int, int] = (16, 24, 32, 48),
    d_model: int = 32,
    layers: int = 1,
    init_std: float | None = 0.3,
) -> Path:
    """Save a complete random-weight Florence-2 (model + processor) to ``folder``.

    The sizes default to a ~0.4M-parameter model that builds in under a second; a
    Florence-2-base-sized model is ``vision_dims=(128, 256, 512, 1024), d_model=768,
    layers=6`` with ``image_size=768`` (see :func:`build_florence2_base_sized`).

    ``init_std`` re-draws every weight matrix with that standard deviation: the default
    initialisation makes every caption empty, which would let batching bugs hide; 0.3
    gives varied captions of varied lengths. Pass ``None`` for the stock initialisation
    (better as a starting point for training tests).
    """
    ensure_torchvision()
    import torch
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    vocab_size = len(tokenizer)
    heads = [max(1, dim // 8) for dim in vision_dims]
    vision = Florence2VisionConfig(
        depths=(1, 1, 1, 1) if layers <= 1 else (1, 1, 9, 1),
        embed_dim=list(vision_dims),
        num_heads=heads,
        num_groups=heads,
        window_size=max(1, min(12, image_size // 32)),
        projection_dim=d_model,
        drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=max(1, d_model // 16),
        decoder_attention_heads=max(1, d_model // 16),
        encoder_ffn_dim=d_model * 4,
        decoder_ffn_dim=d_model * 4,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    config = Florence2Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=tokenizer.image_token_id,
    )
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    if init_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, init_std)
    model.generation_config.num_beams = 1
    model.generation_config.max_new_tokens = 20
    image_processor = CLIPImageProcessor(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        do_resize=True,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    image_processor.image_seq_length = (image_size // 32) ** 2 + 1
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        post_processor_config=POST_PROCESSOR_CONFIG,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_florence2_base_sized(folder: str | Path, seed: int = 0) -> Path:
    """A random model with Florence-2-base's shapes (≈231M parameters, 768² input)."""
    return build_tiny_florence2(
        folder, image_size=768, seed=seed, vision_dims=(128, 256, 512, 1024), d_model=768, layers=6,
        init_std=None,
    )


def run_state(folder: Path, step: str = "caption") -> dict[str, Any]:
    """Everything a run leaves, for comparing executors: store rows (paths made relative) and sidecar texts.

    Two runs over copies of the same images (local, Ray, several devices) must leave equal states.
    """
    import json

    from captionkit.core.atomic import TEMP_MARKER
    from captionkit.core.store import Store

    with Store(folder) as store:
        rows = {
            result.record_id: (result.status, result.text, json.dumps(result.raw, sort_keys=True),
                               result.fingerprint, result.content_hash, result.file_signature,
                               (result.error or "").replace(str(folder), "<root>"), result.notes)
            for result in store.iter_results(step)
        }
    sidecars = {path.name: path.read_text() for path in folder.glob("*.txt")}
    leftovers = [str(path) for path in folder.rglob("*") if TEMP_MARKER in path.name]
    return {"rows": rows, "sidecars": sidecars, "leftovers": leftovers}

