"""Turn a tagger's raw scores into a tag list and render it as caption text.

Why pure functions: the store keeps every raw score, so ``captionkit render`` can
re-select and re-render with new thresholds, blacklists or ordering without running a
model. Selection (:func:`select_tags`) decides *which* tags and with *what* scores;
rendering (:func:`render_tags`) only decides how they are *written*.

Fixes over the common tools (see research/captioning-tools.md): replacements really
apply to every tag (kohya's loop rebinding bug), always-first tags are added even when
the model did not predict them, and underscore→space keeps kaomoji such as ``^_^``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from captionkit.core.declare import declared_options, option

#: Danbooru / ``selected_tags.csv`` category numbers and the names options use for them.
CATEGORY_NAMES: dict[int, str] = {
    0: "general",
    1: "artist",
    3: "copyright",
    4: "character",
    5: "meta",
    9: "rating",
}
CATEGORY_IDS: dict[str, int] = {name: number for number, name in CATEGORY_NAMES.items()}

#: Kaomoji whose underscores are part of the face (SmilingWolf's list, plus the rule below).
KAOMOJI: frozenset[str] = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
        "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)
_WORD = re.compile(r"[A-Za-z0-9]{2,}")
_UNESCAPED_PARENTHESIS = re.compile(r"(?<!\\)([()])")

#: MCut on character tags never goes below this: a lone confident character would
#: otherwise drag the cut down to noise (imgutils uses the same floor).
CHARACTER_MCUT_FLOOR = 0.15


def category_name(category: int) -> str:
    """The option name of a category number (unknown numbers become their digits)."""
    return CATEGORY_NAMES.get(int(category), str(int(category)))


@dataclass
class TagOptions:
    """How scores become a tag list and how that list is written.

    Thresholds: ``general_threshold`` and ``character_threshold`` cover categories 0
    and 4; ``thresholds`` maps any category name (``artist``, ``copyright``, ``meta``,
    ``general``, ``character`` or a bare number) to its own threshold and wins over the
    two fields. Categories with no entry use ``general_threshold``. Rating tags are not
    thresholded: with ``include_rating`` the single most likely rating tag is kept.

    ``use_model_thresholds`` uses the thresholds the model ships (per-tag F1-optimal
    ones from our training, else the model's per-category defaults) instead of the
    ones above. ``mcut`` replaces the general and character thresholds by each
    category's Maximum Cut (the midpoint of the largest gap between sorted scores).

    ``max_tags`` caps model-chosen tags (highest scores kept); always-first tags and the
    rating tag do not count. ``blacklist`` and ``replacements`` match tag names with
    or without underscores; a replacement to ``""`` removes the tag. ``always_first``
    tags are written first in the given order, added even when not predicted.
    """

    general_threshold: float = option(0.35, "Threshold for general tags.", fingerprint=True)
    character_threshold: float = option(0.85, "Threshold for character tags.", fingerprint=True)
    thresholds: dict[str, float] = option(
        help="Per-category threshold, e.g. artist=0.5, copyright=0.6, meta=0.4 (repeatable).",
        default_factory=dict, flags=("--threshold",), pair_value=float, fingerprint=True)
    use_model_thresholds: bool = option(
        False, "Use the thresholds the model ships (per-tag tuned ones from captionkit training).", fingerprint=True)
    mcut: bool = option(False, "Adaptive MCut threshold for general and character tags.", fingerprint=True)
    max_tags: int | None = option(None, "Keep at most this many predicted tags (highest scores).", fingerprint=True)
    include_rating: bool = option(False, "Add the most likely rating tag.", fingerprint=True)
    blacklist: list[str] = option(help="Tags never written (repeatable or comma-separated).", default_factory=list,
                                  split_commas=True, fingerprint=True)
    replacements: dict[str, str] = option(help="Rename a tag: OLD=NEW (repeatable; NEW empty removes it).",
                                          default_factory=dict, flags=("--replace",), fingerprint=True)
    always_first: list[str] = option(
        help="Tags written first, added even when not predicted (repeatable or comma-separated).",
        default_factory=list, split_commas=True, fingerprint=True)
    underscores_to_spaces: bool = option(True, "long_hair → long hair (kaomoji like ^_^ are kept).",
                                         fingerprint=True)
    escape_parentheses: bool = option(False, "Escape parentheses: name_(series) → name_\\(series\\).",
                                      fingerprint=True)
    order: str = option("score", "score or name.", choices=("score", "name"), fingerprint=True)
    separator: str = option(", ", "Between tags.", fingerprint=True)

    def __post_init__(self) -> None:
        if self.order not in ("score", "name"):
            raise ValueError(f"TagOptions.order must be 'score' or 'name', got {self.order!r}.")
        named: dict[str, float] = {}
        for key, value in self.thresholds.items():
            name = category_name(int(key)) if str(key).isdigit() else str(key)
            if name not in CATEGORY_IDS and not name.isdigit():
                raise ValueError(
                    f"TagOptions.thresholds has unknown category {key!r}; use one of "
                    f"{', '.join(sorted(CATEGORY_IDS))} or a category number"
                )
            if name == "rating":
                raise ValueError("rating tags are not thresholded: --include-rating adds the most likely one")
            named[name] = value
        self.thresholds = named
        if self.max_tags is not None and self.max_tags < 0:
            raise ValueError(f"TagOptions.max_tags must be 0 or more, got {self.max_tags}.")
        for name, value in [("general_threshold", self.general_threshold),
                            ("character_threshold", self.character_threshold),
                            *[(f"thresholds[{key!r}]", v) for key, v in self.thresholds.items()]]:
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"TagOptions.{name} must be between 0 and 1, got {value}.")

    def category_threshold(self, category: int) -> float:
        """The configured threshold for one category number."""
        name = category_name(category)
        if name in self.thresholds:
            return float(self.thresholds[name])
        if name == "character":
            return float(self.character_threshold)
        return float(self.general_threshold)

    def fingerprint(self) -> dict:
        """What the written tags depend on (a change means a re-render): the options declared ``fingerprint=True``."""
        return {item.name: _copy(getattr(self, item.name)) for item in declared_options(TagOptions) if item.fingerprint}


def _copy(value):
    return dict(sorted(value.items())) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def _key(tag: str) -> str:
    """Comparison key: the same tag written with underscores or spaces matches."""
    return tag.strip().replace(" ", "_").lower()


def mcut_threshold(scores: np.ndarray) -> float:
    """Maximum Cut: the midpoint of the largest gap between consecutive sorted scores.

    With fewer than two scores there is no gap; 1.0 then selects nothing unless a score
    is exactly 1, and callers floor it where that is wrong.
    """
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if values.size < 2:
        return 1.0
    gaps = values[:-1] - values[1:]
    index = int(np.argmax(gaps))
    return float((values[index] + values[index + 1]) / 2.0)


def _model_threshold_vector(
    model_thresholds: Mapping | np.ndarray | None, categories: np.ndarray
) -> np.ndarray:
    """Per-tag thresholds from what a model ships (see ``TaggerModel.default_thresholds``)."""
    if model_thresholds is None:
        raise ValueError(
            "use_model_thresholds is set but this model ships no thresholds; "
            "drop the option or set the thresholds yourself."
        )
    if isinstance(model_thresholds, np.ndarray):
        vector = np.asarray(model_thresholds, dtype=np.float64)
    else:
        per_tag = model_thresholds.get("per_tag")
        if per_tag is not None:
            vector = np.asarray(per_tag, dtype=np.float64)
        else:
            named = {key: value for key, value in model_thresholds.items() if key != "per_tag"}
            if not named:
                raise ValueError(
                    "use_model_thresholds is set but this model ships no thresholds; "
                    "drop the option or set the thresholds yourself."
                )
            vector = np.array(
                [float(named.get(category_name(c), named.get("general", 0.35))) for c in categories],
                dtype=np.float64,
            )
    if vector.shape != categories.shape:
        raise ValueError(
            f"The model's per-tag thresholds have {vector.shape[0]} entries but it has "
            f"{categories.shape[0]} tags; re-export the model."
        )
    return vector


def select_tags(
    scores: np.ndarray,
    tags: Sequence[str],
    categories: Sequence[int],
    options: TagOptions,
    model_thresholds: Mapping | np.ndarray | None = None,
) -> list[tuple[str, float]]:
    """Choose tags for one image: ``[(tag, score), ...]`` in the order they are written.

    ``scores`` are the probabilities for every tag of the model (one row of
    ``TaggerModel.predict``), aligned with ``tags`` and ``categories``.
    ``model_thresholds`` is the model's ``default_thresholds`` (a mapping of category
    name → threshold with an optional ``per_tag`` array) or a per-tag array; it is only
    used with ``options.use_model_thresholds``.

    Always-first tags come first; a tag the model does not know gets score 1.0, one it
    knows keeps its score. Tag names returned are after replacements, before rendering.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    categories_array = np.asarray(categories, dtype=np.int64).reshape(-1)
    if not (scores.shape[0] == len(tags) == categories_array.shape[0]):
        raise ValueError(
            f"select_tags got {scores.shape[0]} scores for {len(tags)} tags and "
            f"{categories_array.shape[0]} categories; they must be aligned."
        )
    rating_id = CATEGORY_IDS["rating"]
    character_id = CATEGORY_IDS["character"]
    general_id = CATEGORY_IDS["general"]

    if options.use_model_thresholds:
        thresholds = _model_threshold_vector(model_thresholds, categories_array)
    else:
        thresholds = np.array([options.category_threshold(c) for c in categories_array], dtype=np.float64)
    if options.mcut:
        for category, floor in ((general_id, 0.0), (character_id, CHARACTER_MCUT_FLOOR)):
            mask = categories_array == category
            if mask.any():
                thresholds[mask] = max(floor, mcut_threshold(scores[mask]))

    chosen = (scores >= thresholds) & (categories_array != rating_id)
    indices = [int(i) for i in np.nonzero(chosen)[0]]
    indices.sort(key=lambda i: (-scores[i], tags[i]))

    blacklist = {_key(tag) for tag in options.blacklist}
    replacements = {_key(source): target for source, target in options.replacements.items()}
    always_first = [tag for tag in options.always_first if tag.strip()]
    first_keys = {_key(tag) for tag in always_first}
    index_of = {_key(tag): i for i, tag in enumerate(tags)}

    def final_name(tag: str) -> str | None:
        """The tag after replacement, or None when it is removed."""
        replaced = replacements.get(_key(tag), tag)
        replaced = replaced.strip()
        if not replaced or _key(replaced) in blacklist or _key(tag) in blacklist:
            return None
        return replaced

    picked: list[tuple[str, float]] = []
    seen: set[str] = set(first_keys)
    for i in indices:
        name = final_name(tags[i])
        if name is None or _key(name) in seen:
            continue
        seen.add(_key(name))
        picked.append((name, float(scores[i])))
    if options.max_tags is not None:
        picked = picked[: options.max_tags]

    if options.include_rating:
        rating_indices = np.nonzero(categories_array == rating_id)[0]
        if rating_indices.size:
            best = int(rating_indices[np.argmax(scores[rating_indices])])
            name = final_name(tags[best])
            if name is not None and _key(name) not in seen:
                seen.add(_key(name))
                picked.append((name, float(scores[best])))

    if options.order == "name":
        picked.sort(key=lambda item: (item[0].lower(), item[0]))
    else:
        picked.sort(key=lambda item: -item[1])

    first: list[tuple[str, float]] = []
    for tag in always_first:
        known = index_of.get(_key(tag))
        first.append((tag.strip(), float(scores[known]) if known is not None else 1.0))
    return first + picked


def underscores_to_spaces(tag: str) -> str:
    """``long_hair`` → ``long hair``, but kaomoji like ``^_^`` or ``o_o`` stay as they are.

    A tag is treated as a kaomoji when it is in :data:`KAOMOJI` or has no run of two
    letters or digits (a face is punctuation and single letters, a tag is words).
    """
    if tag in KAOMOJI or not _WORD.search(tag):
        return tag
    return tag.replace("_", " ")


def escape_parentheses(tag: str) -> str:
    r"""``name_(series)`` → ``name_\(series\)`` so prompt parsers do not read weights."""
    return _UNESCAPED_PARENTHESIS.sub(r"\\\1", tag)


def format_tag(tag: str, options: TagOptions) -> str:
    """One tag as it is written in a caption."""
    if options.underscores_to_spaces:
        tag = underscores_to_spaces(tag)
    if options.escape_parentheses:
        tag = escape_parentheses(tag)
    return tag


def render_tags(selected: Sequence[tuple[str, float]], options: TagOptions) -> str:
    """Write selected tags as caption text, joined by ``options.separator``.

    Order is kept from :func:`select_tags`; tags that render the same are written once.
    """
    written: list[str] = []
    seen: set[str] = set()
    for tag, _score in selected:
        text = format_tag(tag, options)
        if text in seen:
            continue
        seen.add(text)
        written.append(text)
    return options.separator.join(written)


def score_lines(image: str, selected: Sequence[tuple[str, float]], options: TagOptions | None = None) -> list[str]:
    """``image: tag: score`` lines for ``captionkit tag --print`` (tags formatted as in captions)."""
    return [
        f"{image}: {format_tag(tag, options) if options is not None else tag}: {score:.4f}"
        for tag, score in selected
    ]
