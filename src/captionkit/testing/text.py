"""A tiny random-weight chat LM (Qwen2 shape, ChatML template), built offline, for text-step tests.

The folder holds what a downloaded instruct checkpoint holds (config, safetensors weights,
generation config, a fast tokenizer with its chat template and pad token), so the
``text_generator`` step loads it through the same ``AutoTokenizer`` / ``AutoModelForCausalLM``
calls. Weights are re-drawn with a larger std than the stock init, so greedy outputs are
long, non-empty and differ from prompt to prompt.
"""

from __future__ import annotations

from pathlib import Path

from captionkit._torchvision_compat import ensure_torchvision

# Qwen2/Qwen2.5-Instruct ChatML, for plain-string message contents (text-only LMs).
CHATML_TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_chat_lm(
    folder: str | Path,
    seed: int = 0,
    hidden: int = 48,
    layers: int = 2,
    context: int = 512,
    init_std: float | None = 0.3,
    max_new_tokens: int = 20,
) -> Path:
    """A ``qwen2`` causal-LM folder with a ChatML tokenizer trained here (no BOS, pad ``<|endoftext|>``,
    EOS ``<|im_end|>``); loads with ``AutoModelForCausalLM`` and ``AutoTokenizer``."""
    ensure_torchvision()
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from captionkit.testing.vlms.llava import build_bpe_tokenizer, redraw_weights

    folder = Path(folder)
    tokenizer = build_bpe_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>", "<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEXT_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    redraw_weights(model, init_std)
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = None
    generation.max_new_tokens = max_new_tokens
    generation.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
