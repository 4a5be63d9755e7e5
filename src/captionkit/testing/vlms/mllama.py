"""A tiny random-weight Mllama (Llama 3.2 Vision) with a Llama-3-style tokenizer and chat template, built offline."""

from __future__ import annotations

from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.testing.vlms.blip2 import redraw_weights, train_byte_bpe

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PYTHON_TAG = "<|python_tag|>"
IMAGE = "<|image|>"

# Llama 3.2 Vision's template, shortened (no tools), same layout: BOS, optional system turn,
# then one header + content + <|eot_id|> per turn, with <|image|> where the image goes.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] | trim %}{%- endif %}"
    "{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] | trim }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def build_llama3_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's special tokens; BOS is added like Llama 3's (post-processor).

    ``<|image|>`` is the last id, one past the text vocabulary, as in Llama 3.2 Vision.
    """
    ensure_torchvision()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = [BEGIN_OF_TEXT, END_OF_TEXT, PAD, START_HEADER, END_HEADER, EOT, PYTHON_TAG]
    vocab, merges = train_byte_bpe(special)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BEGIN_OF_TEXT, eos_token=EOT, pad_token=PAD, add_bos_token=True,
        extra_special_tokens={"image_token": IMAGE},
    )
    tokenizer.add_tokens([START_HEADER, END_HEADER, EOT, PYTHON_TAG, END_OF_TEXT], special_tokens=True)
    tokenizer.add_tokens([IMAGE], special_tokens=True)
    return tokenizer


def build_mllama(
    folder: str | Path,
    seed: int = 0,
    tile_size: int = 28,
    max_num_tiles: int = 2,
    hidden: int = 32,
    init_std: float | None = 0.3,
) -> Path:
    """Save a complete random-weight Mllama (model + MllamaProcessor with chat template) to ``folder``.

    Vision: 2 local layers + 1 global layer on ``tile_size``² tiles (patch 14), up to
    ``max_num_tiles`` tiles per image (so a wide image gets 2 tiles, a small one 1); text:
    2 layers, the second a cross-attention layer (Llama 3.2 Vision has one every 5 layers).
    """
    ensure_torchvision()
    import torch
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessor,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    from captionkit.testing.vlms.blip2 import CLIP_MEAN, CLIP_STD

    folder = Path(folder)
    tokenizer = build_llama3_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    aspect_ratios = [[width, height] for width in range(1, max_num_tiles + 1)
                     for height in range(1, max_num_tiles + 1) if width * height <= max_num_tiles]
    intermediate = [0]
    vision = MllamaVisionConfig(
        hidden_size=hidden, num_hidden_layers=2, num_global_layers=1, attention_heads=max(1, hidden // 16),
        intermediate_size=hidden * 2, vision_output_dim=hidden * (len(intermediate) + 1), image_size=tile_size,
        patch_size=14, max_num_tiles=max_num_tiles, intermediate_layers_indices=intermediate,
        supported_aspect_ratios=aspect_ratios,
    )
    text = MllamaTextConfig(
        vocab_size=image_token_id,  # the image token sits just past the text vocabulary (embeddings have +8 rows)
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=max(1, hidden // 16), num_key_value_heads=1,
        intermediate_size=hidden * 2, max_position_embeddings=512, cross_attention_layers=[1],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.convert_tokens_to_ids(END_OF_TEXT),
                                                          tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    config = MllamaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token_id)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    model.generation_config.max_new_tokens = 20
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = MllamaImageProcessor(
        size={"height": tile_size, "width": tile_size}, max_image_tiles=max_num_tiles,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=MLLAMA_CHAT_TEMPLATE)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
