"""Tiny random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL folders, built offline from configs.

Each folder holds the real processor classes (``Qwen2VLImageProcessor``, the family's video
processor and processor) with a 4-pixel patch and a 2x2 merge, so a 64x64 image is 64 image
tokens; a byte-level BPE ``Qwen2Tokenizer`` trained here with Qwen's special tokens; the
family's ChatML chat template; and a 1-layer model (hidden 64) whose weights are re-drawn
with a large standard deviation so greedy captions are non-empty and differ between images.
"""

from __future__ import annotations

from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL-Instruct's template: a default system turn when the chat has none.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template (no default system turn).
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH = 4
MERGE = 2
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4  # 16x16 at the least
MAX_PIXELS = 64 * 64  # at most 64 image tokens


def train_bpe(special_tokens: list[str], vocab_size: int = 500) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained in well under a second on caption-like sentences."""
    import json
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from captionkit.testing import _training_sentences

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_sentences(), trainer=trainer)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.model.save(folder)
        vocab = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for line in Path(folder, "merges.txt").read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#"):
                left, right = line.split(" ")
                merges.append((left, right))
    return vocab, merges


def build_qwen_tokenizer():
    """A ``Qwen2Tokenizer`` (Qwen's pre-tokenizer) over a BPE trained here, with Qwen's special tokens."""
    ensure_torchvision()
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(QWEN_SPECIAL_TOKENS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )
    tokenizer.add_tokens(QWEN_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


def redraw_weights(model, init_std: float | None) -> None:
    """Re-draw every matrix with ``init_std``: stock init gives empty or constant captions."""
    if init_std is None:
        return
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, init_std)


def _text_config(tokenizer, hidden: int, layers: int, heads: int, mrope_section: list[int], **extra) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads // 2,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
        "bos_token_id": None,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def _save(folder: Path, model, processor, tokenizer, max_new_tokens: int = 20) -> Path:
    model.generation_config.eos_token_id = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _ids(tokenizer) -> dict[str, int]:
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen2_processor(processor_class, tokenizer, chat_template: str, patch: int = PATCH):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    sizes = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=sizes, patch_size=patch, merge_size=MERGE, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=sizes, patch_size=patch, merge_size=MERGE, temporal_patch_size=2)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                           chat_template=chat_template)


def build_qwen2_vl(folder: str | Path, seed: int = 0, hidden: int = 64, layers: int = 1,
                   init_std: float | None = 0.3) -> Path:
    """Save a complete random-weight Qwen2-VL (model + processor + tokenizer + chat template)."""
    ensure_torchvision()
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tokenizer = build_qwen_tokenizer()
    heads = 4
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, hidden, layers, heads, [2, 3, 3]),
        vision_config={"depth": layers, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": 2},
        **_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    processor = _qwen2_processor(Qwen2VLProcessor, tokenizer, QWEN2_VL_CHAT_TEMPLATE)
    return _save(Path(folder), model, processor, tokenizer)


def build_qwen2_5_vl(folder: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2,
                     init_std: float | None = 0.3) -> Path:
    """Save a complete random-weight Qwen2.5-VL; two vision blocks: one windowed, one full attention."""
    ensure_torchvision()
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tokenizer = build_qwen_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, hidden, 1, 4, [2, 3, 3]),
        vision_config={"depth": layers, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": hidden, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": 2, "window_size": PATCH * MERGE * 2,
                       "fullatt_block_indexes": [layers - 1]},
        **_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    processor = _qwen2_processor(Qwen2_5_VLProcessor, tokenizer, QWEN2_VL_CHAT_TEMPLATE)
    return _save(Path(folder), model, processor, tokenizer)


def build_qwen3_vl(folder: str | Path, seed: int = 0, hidden: int = 64, layers: int = 1,
                   init_std: float | None = 0.3) -> Path:
    """Save a complete random-weight Qwen3-VL (deepstack features from the one vision block)."""
    ensure_torchvision()
    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = build_qwen_tokenizer()
    heads = 4
    text = _text_config(tokenizer, hidden, layers, heads, [4, 2, 2], head_dim=hidden // heads)
    text["rope_parameters"]["mrope_interleaved"] = True
    text.pop("bos_token_id")
    text.pop("eos_token_id")
    config = Qwen3VLConfig(
        text_config=text,
        vision_config={"depth": layers, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": hidden, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": 2, "num_position_embeddings": 64,
                       "deepstack_visual_indexes": [0]},
        **_ids(tokenizer),
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    sizes = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=sizes, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_processor = Qwen3VLVideoProcessor(size=sizes, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN3_VL_CHAT_TEMPLATE)
    return _save(Path(folder), model, processor, tokenizer)
