"""Tiny random-weight LLaVA, LLaVA-NeXT and LLaVA-OneVision folders, built offline.

Each builder saves what a downloaded checkpoint holds (config, weights, tokenizer,
image processor, the family's processor with its chat template) so the backends load
it through the same ``from_pretrained`` calls. The shapes follow the real releases at
toy scale: llava-1.5 (CLIP tower, "default" feature selection that drops CLS, a
``USER: ... ASSISTANT:`` template), JoyCaption (plain ``llava``: SigLIP tower, "full"
selection, a Llama-3 template with a system turn), llava-v1.6-mistral (any-res tiles,
``[INST] ... [/INST]``) and llava-onevision-qwen2 (SigLIP + Qwen2, ChatML).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision

CAPTION_WORDS = [
    "a", "the", "photo", "of", "red", "green", "blue", "yellow", "cat", "dog", "tree", "house", "car", "sky",
    "sitting", "standing", "on", "under", "next", "to", "with", "and", "small", "large", "bright", "dark",
    "image", "shows", "picture", "field", "river", "street", "table", "window", "person", "flower",
]

# llava-hf/llava-1.5-*-hf: images first, then text; a system turn is plain text before the first USER.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + '\n' }}{% endfor %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# JoyCaption (fancyfeast/llama-joycaption-*): Llama-3.1 headers, the image inline in the user turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf (with a generation prompt and a <<SYS>> block for system text).
MISTRAL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' }}{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] }}{% endfor %}{{ '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf: ChatML, images before the text of a turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + part['text'] }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_sentences() -> list[str]:
    """Prompts and caption-like sentences the tiny BPE vocabulary is trained on."""
    sentences = [
        "Describe this image in one detailed sentence.",
        "Write a long descriptive caption for this image in a formal tone.",
        "You are a helpful image captioner.",
        "What is shown in the image? Describe it briefly.",
        "USER: ASSISTANT: system user assistant model",
    ]
    for index, word in enumerate(CAPTION_WORDS):
        other = CAPTION_WORDS[(index * 7 + 3) % len(CAPTION_WORDS)]
        sentences.append(f"a {word} {other} in the image")
        sentences.append(f"The photo shows a {other} and a {word}.")
    return sentences * 2


def build_bpe_tokenizer(
    special_tokens: list[str],
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    unk_token: str,
    add_bos: bool = False,
    extra_special_tokens: dict[str, str] | None = None,
    vocab_size: int = 500,
):
    """A byte-level BPE fast tokenizer trained here in well under a second.

    ``special_tokens`` get the first ids (atomic, never split); ``add_bos`` makes the
    tokenizer prepend BOS by itself, as Llama and Gemma tokenizers do.
    """
    ensure_torchvision()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_sentences(), trainer=trainer)
    if add_bos and bos_token:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A",
            pair=f"{bos_token} $A {bos_token} $B",
            special_tokens=[(bos_token, tokenizer.token_to_id(bos_token))],
        )
    options: dict[str, Any] = {"eos_token": eos_token, "pad_token": pad_token, "unk_token": unk_token}
    if bos_token:
        options["bos_token"] = bos_token
    if extra_special_tokens:
        options["extra_special_tokens"] = extra_special_tokens
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **options)


def redraw_weights(model: Any, init_std: float | None) -> None:
    """Re-draw every weight matrix with ``init_std``: the stock init gives empty or constant captions."""
    if init_std is None:
        return
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, init_std)


def _tiny_text_config(kind: str, tokenizer: Any, hidden: int, layers: int) -> dict[str, Any]:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    config = classes[kind](
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return config.to_dict()


def _vision_config(kind: str, image_size: int, patch_size: int, hidden: int) -> dict[str, Any]:
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    options = dict(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size,
    )
    if kind == "clip":
        return CLIPVisionConfig(projection_dim=hidden, **options).to_dict()
    return SiglipVisionConfig(vision_use_head=False, **options).to_dict()


def save_model_folder(folder: Path, model: Any, processor: Any, eos_ids: list[int], max_new_tokens: int = 20) -> Path:
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = processor.tokenizer.bos_token_id
    model.generation_config.max_new_tokens = max_new_tokens
    model.generation_config.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_llava(
    folder: str | Path,
    seed: int = 0,
    vision: str = "clip",
    image_size: int = 56,
    patch_size: int = 14,
    hidden: int = 48,
    layers: int = 2,
    init_std: float | None = 0.3,
) -> Path:
    """A plain ``llava`` folder. ``vision="clip"``: llava-1.5 shape (CLIP, CLS dropped, USER/ASSISTANT
    template, Llama-2 tokenizer adding BOS). ``vision="siglip"``: JoyCaption shape (SigLIP, every
    patch kept, Llama-3 template with its own ``<|begin_of_text|>`` and a system turn)."""
    ensure_torchvision()
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessor,
    )

    folder = Path(folder)
    if vision not in ("clip", "siglip"):
        raise ValueError("vision must be 'clip' (llava-1.5) or 'siglip' (JoyCaption)")
    if vision == "clip":
        tokenizer = build_bpe_tokenizer(
            ["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>", "<unk>", add_bos=True,
            extra_special_tokens={"image_token": "<image>"},
        )
        eos_ids = [tokenizer.eos_token_id]
        template, strategy, extra_tokens, feature_layer = LLAVA_15_TEMPLATE, "default", 1, -2
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            do_center_crop=True, resample=3,
        )
    else:
        tokenizer = build_bpe_tokenizer(
            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|finetune_right_pad_id|>", "<unk>", "<image>"],
            "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<unk>", add_bos=True,
            extra_special_tokens={"image_token": "<image>"},
        )
        eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
        template, strategy, extra_tokens, feature_layer = LLAMA3_TEMPLATE, "full", 0, -2
        image_processor = SiglipImageProcessor(
            size={"height": image_size, "width": image_size}, resample=3,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )
    patches = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=_vision_config(vision, image_size, patch_size, hidden),
        text_config=_tiny_text_config("llama", tokenizer, hidden, layers),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=patches + extra_tokens - (1 if strategy == "default" else 0),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,
        chat_template=template,
    )
    return save_model_folder(folder, model, processor, eos_ids)


def build_joycaption(folder: str | Path, seed: int = 0, **options: Any) -> Path:
    """A JoyCaption-shaped plain ``llava`` folder (SigLIP tower, Llama-3 template with system turn)."""
    return build_llava(folder, seed=seed, vision="siglip", **options)


def build_llava_next(
    folder: str | Path,
    seed: int = 0,
    image_size: int = 28,
    patch_size: int = 14,
    hidden: int = 48,
    layers: int = 2,
    init_std: float | None = 0.3,
) -> Path:
    """A llava-v1.6-mistral-shaped ``llava_next`` folder: CLIP tower, any-res tiles on a
    grid of 1x2, 2x1 and 2x2 base tiles, Mistral text model, ``[INST]`` template."""
    ensure_torchvision()
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    folder = Path(folder)
    tokenizer = build_bpe_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>", "<unk>", add_bos=True,
        extra_special_tokens={"image_token": "<image>"},
    )
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    config = LlavaNextConfig(
        vision_config=_vision_config("clip", image_size, patch_size, hidden),
        text_config=_tiny_text_config("mistral", tokenizer, hidden, layers),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints, do_center_crop=True, do_pad=True, resample=3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_TEMPLATE,
    )
    return save_model_folder(folder, model, processor, [tokenizer.eos_token_id])


def build_llava_onevision(
    folder: str | Path,
    seed: int = 0,
    image_size: int = 28,
    patch_size: int = 14,
    hidden: int = 48,
    layers: int = 2,
    init_std: float | None = 0.3,
) -> Path:
    """A llava-onevision-qwen2-shaped folder: SigLIP tower (all patches kept), any-res tiles,
    Qwen2 text model, ChatML template; Qwen tokenizers add no BOS."""
    ensure_torchvision()
    import torch
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    folder = Path(folder)
    tokenizer = build_bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        None, "<|im_end|>", "<|endoftext|>", "<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    side = image_size
    pinpoints = [[side, side], [side, side * 2], [side * 2, side], [side * 2, side * 2]]
    config = LlavaOnevisionConfig(
        vision_config=_vision_config("siglip", image_size, patch_size, hidden),
        text_config=_tiny_text_config("qwen2", tokenizer, hidden, layers),
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    mean_std = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=pinpoints, do_pad=True, resample=3, **mean_std,
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side}, **mean_std)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHATML_TEMPLATE,
    )
    return save_model_folder(folder, model, processor, [tokenizer.eos_token_id])
