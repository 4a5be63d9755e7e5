"""Caption text cleanup, applied by captionkit, never left to the model.

Removes special tokens, location tokens, control characters (terminal escapes, C0/C1
codes), U+FFFD replacement characters and whitespace noise, joins lines into one (a
caption file is one line: kohya reads only the first), and collapses the repetition
loops small captioners fall into ("a cat a cat a cat ...").
"""

from __future__ import annotations

import re

_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>|<unk>|<mask>|<image>|<loc_\d+>|<\|[^|>]*\|>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?])")
_WORD = re.compile(r"\S+")
# A terminal escape sequence (ESC [ ... final byte, or ESC and one character): removed whole, so no "[31m" is left.
_ESCAPE_SEQUENCES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]")
# C0 and C1 control characters and DEL (tab, newline and the other line breaks are whitespace, handled apart),
# U+FFFD (a byte the decoder could not read) and U+FEFF (a byte-order mark or zero-width no-break space).
_CONTROL_CHARACTERS = r"\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f"
_CONTROL = re.compile(f"[{_CONTROL_CHARACTERS}\ufffd\ufeff]")
_CONTROL_ONLY = re.compile(f"[{_CONTROL_CHARACTERS}]")
_LINE_BREAKS = re.compile(r"[\n\x0b\x0c\r\x85\u2028\u2029]+")


def strip_special_tokens(text: str) -> str:
    """Drop tokenizer markers (<s>, </s>, <pad>, <loc_N>, <|...|>) a decoder may leave behind."""
    return _SPECIAL_TOKENS.sub(" ", text)


def strip_control_characters(text: str) -> str:
    """Drop terminal escapes, control characters, U+FFFD and U+FEFF: trainers would read them as text."""
    return _CONTROL.sub("", _ESCAPE_SEQUENCES.sub("", text))


def unclean_characters(text: str) -> dict[str, int]:
    """How many control characters, U+FFFD and line breaks ``text`` holds (outer whitespace ignored): for inspection."""
    text = text.strip()
    counts = {
        "control": len(_CONTROL_ONLY.findall(text)),
        "replacement": text.count("\ufffd"),
        "line_breaks": len(_LINE_BREAKS.findall(text)),
    }
    return {name: count for name, count in counts.items() if count}


def one_line(text: str) -> str:
    """Lines joined by one space: a caption file holds one caption (kohya reads only the first line)."""
    return _LINE_BREAKS.sub(" ", text)


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
    """Everything above, in order: one line of plain text."""
    text = normalise_whitespace(one_line(strip_control_characters(strip_special_tokens(text))))
    if collapse_loops:
        text = collapse_repetitions(text)
    return text


_FILLER_OPENERS = re.compile(
    r"^\s*(?:"
    r"(?:in|on)\s+(?:this|the)\s+(?:image|picture|photo(?:graph)?|scene)\s*,?\s*(?:we\s+(?:can\s+)?see\s+|there\s+(?:is|are)\s+)?"
    r"|(?:this|the)\s+(?:image|picture|photo(?:graph)?|scene)\s+(?:shows|depicts|features|displays|presents|captures|"
    r"showcases|is\s+of|contains)\s+"
    r"|(?:here\s+is|this\s+is)\s+(?:an?\s+)?(?:image|picture|photo(?:graph)?)\s+(?:of|showing)\s+"
    r"|the\s+image\s+is\s+an?\s+"
    r")",
    re.IGNORECASE,
)
_CANNOT = (r"(?:can(?:no|'|\u2019)?t|cannot|won(?:'|\u2019)?t|am\s+unable\s+to|(?:'|\u2019)m\s+unable\s+to"
           r"|am\s+not\s+able\s+to)")
_TASKS = r"(?:help|assist|provide|describe|caption|comply|identify|fulfil+|process|create|generate|analy[sz]e)"
_REFUSALS = re.compile(
    r"^\s*(?:"
    r"i(?:'|\u2019|\s+a)m\s+(?:sorry|afraid)\b[^.!?]{0,40}?\b(?:i\s+)?" + _CANNOT
    + r"|(?:sorry|apologies|unfortunately),?\s+(?:but\s+)?i\s+" + _CANNOT
    + r"|i\s+" + _CANNOT + r"\s+" + _TASKS + r"\s+(?:with\s+|you\s+with\s+)?(?:this|that|the|your|such|it)\b"
    + r"|as\s+an\s+ai(?:\s+language)?\s+(?:model|assistant)\b"
    + r"|i\s+apologi[sz]e,?\s+but\b"
    + r")",
    re.IGNORECASE,
)


def strip_filler_openers(text: str) -> str:
    """'The image shows a cat.' → 'A cat.': openers that every caption would share teach a model nothing."""
    stripped = _FILLER_OPENERS.sub("", text, count=1)
    if stripped == text or not stripped:
        return text
    return stripped[0].upper() + stripped[1:]


def is_refusal(text: str) -> bool:
    """True for a model's refusal ("I'm sorry, but I can't ...") rather than a caption."""
    return bool(_REFUSALS.match(text))
