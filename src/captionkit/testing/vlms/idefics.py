"""Tiny random-weight Idefics3 and SmolVLM folders, built offline from configs.

The real processors with a 32-pixel vision tile (8-pixel patches, pixel shuffle 2: 4 image
tokens per tile); images are resized to a 96-pixel longest edge and split into up to 3x3
tiles plus the global view, so images of different shapes get different token counts.
The tokenizer is a byte-level BPE ``GPT2Tokenizer`` trained here with the family's special
tokens (``<fake_token_around_image>``, ``<image>``, ``<global-img>``, ``<row_i_col_j>``,
``<end_of_utterance>``); the chat templates are the released ones ("User:<image>...").
"""

from __future__ import annotations

from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.testing.vlms.qwen_vl import redraw_weights, train_bpe

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)
]

# HuggingFaceM4/Idefics3-8B-Llama3's template.
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct's template.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TILE = 32  # the vision encoder's image size (max_image_size)
PATCH = 8
SCALE_FACTOR = 2
LONGEST_EDGE = 96  # images are resized to this longest edge, then cut into TILE squares
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // SCALE_FACTOR**2


def build_idefics_tokenizer(bos: str, eos: str, pad: str):
    """A ``GPT2Tokenizer`` over a BPE trained here, with the Idefics3/SmolVLM image tokens."""
    ensure_torchvision()
    from transformers import GPT2Tokenizer

    specials = [bos, pad, eos] + [token for token in IMAGE_TOKENS if token != eos]
    vocab, merges = train_bpe(list(dict.fromkeys(specials)))
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=bos, eos_token=eos,
                              pad_token=pad, add_prefix_space=False)
    tokenizer.add_tokens(IMAGE_TOKENS, special_tokens=True)
    return tokenizer


def _build(folder: str | Path, family: str, seed: int, hidden: int, layers: int, init_std: float | None) -> Path:
    ensure_torchvision()
    import torch
    import transformers

    if family == "idefics3":
        tokenizer = build_idefics_tokenizer("<|begin_of_text|>", "<end_of_utterance>", "<|end_of_text|>")
        prefix, template = "Idefics3", IDEFICS3_CHAT_TEMPLATE
    else:
        tokenizer = build_idefics_tokenizer("<|im_start|>", "<end_of_utterance>", "<|im_end|>")
        prefix, template = "SmolVLM", SMOLVLM_CHAT_TEMPLATE
    eos_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    text = {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": hidden * 2,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 2,
              "image_size": TILE, "patch_size": PATCH}
    config_class = getattr(transformers, f"{prefix}Config")
    config = config_class(
        text_config=text, vision_config=vision, scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    redraw_weights(model, init_std)
    sizes = {"size": {"longest_edge": LONGEST_EDGE}, "max_image_size": {"longest_edge": TILE},
             "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    image_processor = getattr(transformers, f"{prefix}ImageProcessor")(do_image_splitting=True, **sizes)
    components = {"image_processor": image_processor, "tokenizer": tokenizer}
    if family == "smolvlm":
        components["video_processor"] = transformers.SmolVLMVideoProcessor(**sizes)
    processor = getattr(transformers, f"{prefix}Processor")(
        **components, image_seq_len=IMAGE_SEQ_LEN, chat_template=template
    )
    model.generation_config.eos_token_id = [eos_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.max_new_tokens = 20
    model.generation_config.do_sample = False
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_idefics3(folder: str | Path, seed: int = 0, hidden: int = 64, layers: int = 1,
                   init_std: float | None = 0.3) -> Path:
    """Save a complete random-weight Idefics3 (model + processor + tokenizer + chat template)."""
    return _build(folder, "idefics3", seed, hidden, layers, init_std)


def build_smolvlm(folder: str | Path, seed: int = 0, hidden: int = 64, layers: int = 1,
                  init_std: float | None = 0.3) -> Path:
    """Save a complete random-weight SmolVLM (its processor needs the ``num2words`` package)."""
    return _build(folder, "smolvlm", seed, hidden, layers, init_std)
