"""Tiny text-to-image pipelines (FLUX.1, Stable Diffusion 3) with random weights, built offline.

Why: the image_generator step loads real diffusers pipeline folders with the same
``from_pretrained`` call a downloaded FLUX.1-dev or SD3.5 checkpoint goes through, but
the hub is unreachable in development and CI. These builders assemble every component
from configs (transformer, VAE, scheduler, CLIP and T5 text encoders), train their
tokenizers here with the ``tokenizers`` library, and save the whole pipeline with
``save_pretrained``. Each builds in about a second and makes a 32×32 image in well under
a second on a CPU. Random weights make noise-like images, which is all tests need:
sizes, files, and that a seed reproduces the same pixels.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from captionkit._torchvision_compat import ensure_torchvision
from captionkit.testing import _training_sentences

CLIP_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
T5_SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's fixed ids: pad 0, eos 1, unk 2
_EXTRA_WORDS = "high quality detailed photo painting of a cat dog on the beach at night with light and shadow"


def _sentences() -> list[str]:
    return [*_training_sentences(), _EXTRA_WORDS, _EXTRA_WORDS.upper()]


def build_clip_tokenizer(vocab_size: int = 400, model_max_length: int = 77):
    """A CLIPTokenizer (lower-cased byte-level BPE with ``</w>`` word ends) trained on a few sentences."""
    ensure_torchvision()
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tokenizer = Tokenizer(models.BPE(unk_token=CLIP_SPECIAL[1], end_of_word_suffix="</w>"))
    # Split text the way CLIPTokenizer does, so every merge learned here is one it can apply.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CLIP_SPECIAL, end_of_word_suffix="</w>",
        initial_alphabet=alphabet, show_progress=False,
    )
    tokenizer.train_from_iterator(_sentences(), trainer=trainer)
    vocab, merges = _bpe_files(tokenizer)
    # Every byte must exist as a word end too, or an unseen one-letter word has no token.
    for symbol in alphabet:
        vocab.setdefault(f"{symbol}</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _bpe_files(tokenizer: Any) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json and merges.txt of a trained BPE model, as a dict and a list of pairs."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.model.save(folder)
        vocab = json.loads(Path(folder, "vocab.json").read_text(encoding="utf-8"))
        lines = Path(folder, "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
    return vocab, merges


def build_t5_tokenizer(vocab_size: int = 300, model_max_length: int = 512):
    """A T5TokenizerFast (Unigram over ``▁``-marked words) trained on a few sentences."""
    ensure_torchvision()
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=T5_SPECIAL, unk_token="<unk>", show_progress=False,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"),
    )
    tokenizer.train_from_iterator(_sentences(), trainer=trainer)
    pieces = json.loads(tokenizer.to_str())["model"]["vocab"]
    vocab = [(piece, float(score)) for piece, score in pieces]
    if [piece for piece, _ in vocab[:3]] != T5_SPECIAL:
        raise RuntimeError(f"unexpected T5 special token order: {vocab[:3]}")
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip_config(tokenizer: Any, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, projection_dim=projection,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _t5_encoder(tokenizer: Any, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=d_model * 2, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        is_encoder_decoder=False, use_cache=False,
    )
    return T5EncoderModel(config).eval()


def _vae(latent_channels: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    # Two blocks: the VAE halves the image once (vae_scale_factor 2), like the real 8× VAE but cheaper.
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor,
    ).eval()


def _save(pipeline: Any, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(folder)
    return folder


def build_tiny_flux(folder: str | Path, seed: int = 0) -> Path:
    """Save a random-weight FluxPipeline (FLUX.1-dev's layout, guidance-distilled) to ``folder``."""
    ensure_torchvision()
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(clip_tokenizer)).eval()
    text_encoder_2 = _t5_encoder(t5_tokenizer, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * 4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).eval()
    vae = _vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    return _save(pipeline, folder)


def build_tiny_sd3(folder: str | Path, seed: int = 0) -> Path:
    """Save a random-weight StableDiffusion3Pipeline (SD3/SD3.5's layout) to ``folder``."""
    ensure_torchvision()
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    clip_tokenizer = build_clip_tokenizer()
    clip_tokenizer_2 = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    # The two CLIP embeddings are concatenated (32 + 32) and padded to the T5 width, so T5 is 64 wide.
    text_encoder = CLIPTextModelWithProjection(_clip_config(clip_tokenizer)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(clip_tokenizer_2)).eval()
    text_encoder_3 = _t5_encoder(t5_tokenizer, d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32,
    ).eval()
    vae = _vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5305)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipeline = StableDiffusion3Pipeline(
        scheduler=scheduler, vae=vae, transformer=transformer,
        text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
    )
    return _save(pipeline, folder)
