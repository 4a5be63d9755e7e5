"""Token counts with the real tokenizers of text-to-image text encoders (CLIP's BPE), offline.

Why: captions longer than the encoder's window (CLIP: 77 tokens with its start and end
tokens) are cut silently during training; counting words is not the same thing.
"""

from __future__ import annotations

import functools

from captionkit.core.errors import MissingDependencyError

CLIP_LIMIT = 77  # tokens including <|startoftext|> and <|endoftext|>


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as error:
        raise MissingDependencyError("open_clip_torch", "Counting CLIP tokens", extra="inspect") from error
    return SimpleTokenizer()  # ships its BPE vocabulary: no download


def clip_token_count(text: str) -> int:
    """Tokens CLIP's text encoder sees for ``text``, start and end tokens included."""
    return len(_clip_tokenizer().encode(text)) + 2
