"""A tiny random-weight Phi-4-multimodal (native ``phi4_multimodal`` classes), built offline.

The native class always carries its audio encoder, so a tiny (unused) audio config is
included. Two shape constraints come from ``Phi4MultimodalImageProcessor``, which hard-codes
the image-token count of a 448² crop cut into 14-pixel patches (a 32×32 patch grid pooled to
16×16): the crop must be 32 patches wide, so the tiny model uses 64-pixel crops with
2-pixel patches. The ~270-550 image tokens per image that follow from that are fine for a
32-wide, 1-layer language model.

``vision_lora=True`` also saves a tiny PEFT LoRA in ``vision-lora/``, the layout of the
real checkpoint (whose converted weights keep the vision LoRA as a separate adapter).
"""

from __future__ import annotations

from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.testing.vlms.blip2 import redraw_weights, train_byte_bpe

ENDOFTEXT = "<|endoftext|>"
PHI_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
IMAGE = "<|image|>"
AUDIO = "<|audio|>"

# The layout of Phi-4-multimodal's prompts: <|role|>content<|end|>, images as <|image|> in the text.
PHI4_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'audio' %}{{- '<|audio|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- else %}{{- eos_token }}{%- endif %}"
)


def build_phi4_tokenizer():
    """A GPT2-style byte-level BPE with Phi-4-multimodal's special tokens; no BOS is added (as in Phi-4)."""
    ensure_torchvision()
    from transformers import GPT2Tokenizer

    vocab, merges = train_byte_bpe([ENDOFTEXT, *PHI_TOKENS])
    tokenizer = GPT2Tokenizer(
        vocab=vocab, merges=merges, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        pad_token=ENDOFTEXT, extra_special_tokens={"image_token": IMAGE, "audio_token": AUDIO},
    )
    tokenizer.add_tokens(PHI_TOKENS, special_tokens=True)
    tokenizer.add_tokens([IMAGE, AUDIO], special_tokens=True)
    return tokenizer


def build_phi4_multimodal(
    folder: str | Path,
    seed: int = 0,
    hidden: int = 32,
    init_std: float | None = 0.3,
    vision_lora: bool = False,
) -> Path:
    """Save a complete random-weight Phi-4-multimodal (model + processor with chat template) to ``folder``."""
    ensure_torchvision()
    import torch
    from transformers import (
        Phi4MultimodalAudioConfig,
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
        Phi4MultimodalVisionConfig,
    )

    folder = Path(folder)
    tokenizer = build_phi4_tokenizer()
    crop, patch = 64, 2  # a 32×32 patch grid, as the image processor's token count assumes
    heads = max(1, hidden // 16)
    vision = Phi4MultimodalVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=heads,
        image_size=crop, patch_size=patch, crop_size=crop, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
    )
    audio = Phi4MultimodalAudioConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_blocks=1, num_attention_heads=heads,
        ext_pw_out_channel=hidden, depthwise_separable_out_channel=hidden, nemo_conv_channels=hidden,
        audio_token_id=tokenizer.convert_tokens_to_ids(AUDIO),
    )
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    config = Phi4MultimodalConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=4096,
        original_max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, end], pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        vision_config=vision.to_dict(), audio_config=audio.to_dict(),
    )
    torch.manual_seed(seed)
    model = Phi4MultimodalForCausalLM(config).eval()
    redraw_weights(model, init_std)
    model.generation_config.max_new_tokens = 20
    image_processor = Phi4MultimodalImageProcessor(
        size={"height": crop, "width": crop}, patch_size=patch, dynamic_hd=4,
    )
    processor = Phi4MultimodalProcessor(
        image_processor=image_processor, audio_processor=Phi4MultimodalFeatureExtractor(), tokenizer=tokenizer,
        chat_template=PHI4_CHAT_TEMPLATE,
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if vision_lora:
        save_vision_lora(model, folder / "vision-lora", seed=seed)
    return folder


def save_vision_lora(model, folder: Path, seed: int = 0) -> Path:
    """A tiny random LoRA on the language model's projections, saved the way PEFT saves adapters."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    # the language model's projections only (the audio encoder has o_proj layers too)
    targets = r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj))"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():  # peft calls a transformers method 5.x deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # leave ``model`` as it was
    return folder
