"""A tiny random-weight BLIP-2 (ViT + Q-Former + OPT) with an OPT-style tokenizer, built offline.

Also home of :func:`train_byte_bpe`, the byte-level BPE the other tiny chat VLMs here reuse.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_training_sentences() -> list[str]:
    """Sentences with the words prompts and captions use, so prompts tokenize into few pieces."""
    from captionkit.testing import _training_sentences

    extra = [
        "Question: Describe this image in one detailed sentence. Answer:",
        "Describe this image. What is in the picture? Write a short caption for the photo.",
        "You are a helpful assistant that writes captions.",
    ]
    return _training_sentences() + extra * 2


def train_byte_bpe(special_tokens: list[str], vocab_size: int = 500) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a GPT-2-style byte-level BPE trained in well under a second.

    ``special_tokens`` get the first ids, in order (OPT: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_training_sentences(), trainer=trainer)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.model.save(folder)
        vocab = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
        merges = [
            tuple(line.split(" "))
            for line in Path(folder, "merges.txt").read_text(encoding="utf-8").splitlines()
            if line and not line.startswith("#")
        ]
    return vocab, merges


def redraw_weights(model, init_std: float | None) -> None:
    """Re-draw every weight matrix with ``init_std``: stock init makes tiny models emit empty captions."""
    if init_std is None:
        return
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, init_std)


def build_opt_tokenizer():
    """A GPT2Tokenizer laid out like OPT's: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 (bos = eos), BOS added."""
    ensure_torchvision()
    from transformers import GPT2Tokenizer

    vocab, merges = train_byte_bpe(["<s>", "<pad>", "</s>", "<unk>"])
    return GPT2Tokenizer(
        vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True,
    )


def build_blip2(
    folder: str | Path,
    seed: int = 0,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 1,
    num_query_tokens: int = 4,
    init_std: float | None = 0.3,
) -> Path:
    """Save a complete random-weight BLIP-2 with an OPT language model (model + processor) to ``folder``."""
    ensure_torchvision()
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    folder = Path(folder)
    tokenizer = build_opt_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, do_resize=True, resample=3,
        image_mean=CLIP_MEAN, image_std=CLIP_STD,
    )
    # the processor adds the <image> token to the tokenizer; the model config needs its id
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    heads = max(1, hidden // 16)
    vision = Blip2VisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
        image_size=image_size, patch_size=8,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, cross_attention_frequency=1, encoder_hidden_size=hidden,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    text = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
        ffn_dim=hidden * 2, num_attention_heads=heads, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        dropout=0.0, attention_dropout=0.0,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=image_token_id, image_text_hidden_size=hidden,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    redraw_weights(model, init_std)
    model.generation_config.max_new_tokens = 20
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
