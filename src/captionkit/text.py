"""Caption text cleanup, applied by captionkit, never left to the model.

Removes special tokens, location tokens and whitespace noise, and collapses the
repetition loops small captioners fall into ("a cat a cat a cat ...").
"""

from __future__ import annotations

import re

_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>|<unk>|<mask>|<image>|<loc_\d+>|<\|[^|>]*\|>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?])")
_WORD = re.compile(r"\S+")


def strip_special_tokens(text: str) -> str:
    """Drop tokenizer markers (<s>, </s>, <pad>, <loc_N>, <|...|>) a decoder may leave behind."""
    return _SPECIAL_TOKENS.sub(" ", text)


def normalise_whitespace(text: str) -> str:
    """One space between words, no space before punctuation, trimmed lines, no blank runs."""
    lines = [_SPACE_BEFORE_PUNCTUATION.sub(r"\1", _SPACES.sub(" ", line)).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def collapse_repetitions(text: str, max_phrase_words: int = 12, min_repeats: int = 3) -> str:
    """Keep one copy of any phrase repeated back to back ``min_repeats`` or more times.

    Single words need one more repeat than phrases, so "very very" survives.
    """
    words = _WORD.findall(text)
    if len(words) < min_repeats:
        return text
    changed = False
    for size in range(max_phrase_words, 0, -1):
        needed = min_repeats + (1 if size == 1 else 0)
        index = 0
        kept: list[str] = []
        while index < len(words):
            phrase = words[index : index + size]
            repeats = 1
            while (
                len(phrase) == size
                and words[index + repeats * size : index + (repeats + 1) * size] == phrase
            ):
                repeats += 1
            if len(phrase) == size and repeats >= needed:
                kept.extend(phrase)
                index += repeats * size
                changed = True
            else:
                kept.append(words[index])
                index += 1
        words = kept
    return " ".join(words) if changed else text


def clean_caption(text: str, collapse_loops: bool = True) -> str:
    """Everything above, in order."""
    text = normalise_whitespace(strip_special_tokens(text))
    if collapse_loops:
        text = collapse_repetitions(text)
    return text
