"""A tiny random-weight Gemma 3 (vision) folder, built offline.

Shapes follow google/gemma-3-*-it at toy scale: a SigLIP tower whose patch grid is average-pooled
to ``mm_tokens_per_image`` soft tokens, a Gemma3 text model with sliding and full attention
layers, a tokenizer that adds ``<bos>`` itself while the chat template writes it too, and the
Gemma template that folds a system turn into the first user turn.
"""

from __future__ import annotations

from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.testing.vlms.llava import build_bpe_tokenizer, redraw_weights, save_model_folder

# google/gemma-3-*-it, without the role-alternation checks.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def build_gemma3(
    folder: str | Path,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    tokens_per_image: int = 4,
    hidden: int = 48,
    layers: int = 2,
    init_std: float | None = 0.1,
) -> Path:
    """Save a complete random-weight Gemma 3 (model + Gemma3Processor) to ``folder``.

    Unlike the real release the word embeddings are not tied to the output layer: with random
    tied weights every step repeats the previous token. ``init_std`` 0.1 gives varied captions
    that differ between images (0.3 lets the text swamp the image for some seeds).
    """
    ensure_torchvision()
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    folder = Path(folder)
    tokenizer = build_bpe_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
         "<end_of_image>", "<image_soft_token>"],
        "<bos>", "<eos>", "<pad>", "<unk>", add_bos=True,
        extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        },
    )
    heads = 4
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        head_dim=hidden // heads,
        query_pre_attn_scalar=hidden // heads,
        sliding_window=32,
        layer_types=["sliding_attention" if (index + 1) % 2 else "full_attention" for index in range(layers)],
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,  # tied random embeddings make every step repeat the last token
    )
    vision = SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, resample=2, do_pan_and_scan=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
    eos_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    return save_model_folder(folder, model, processor, eos_ids)
