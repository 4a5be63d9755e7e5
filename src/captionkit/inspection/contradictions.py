"""Tag-versus-caption contradictions found with word lists, no model.

Each rule pairs tags with caption words that cannot both be true of one picture (a
``1boy`` tag beside a caption about a woman). A rule fires only when the caption has
words of the contradicting side and none of the tag's own side, so "a man and a woman"
never contradicts ``1boy``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORDS = re.compile(r"[a-z]+(?:'[a-z]+)?")

FEMALE_TAGS = frozenset({"1girl", "2girls", "3girls", "4girls", "5girls", "6+girls", "multiple_girls", "female_focus"})
MALE_TAGS = frozenset({"1boy", "2boys", "3boys", "4boys", "5boys", "6+boys", "multiple_boys", "male_focus"})
FEMALE_WORDS = frozenset({
    "woman", "women", "girl", "girls", "lady", "ladies", "she", "her", "hers", "herself", "female", "females",
    "mother", "daughter", "sister", "queen", "princess", "actress", "bride", "wife", "girlfriend", "businesswoman",
    "schoolgirl", "maid", "waitress", "heroine", "grandmother", "aunt", "niece",
})
MALE_WORDS = frozenset({
    "man", "men", "boy", "boys", "he", "him", "his", "himself", "male", "males", "gentleman", "gentlemen",
    "father", "son", "brother", "king", "prince", "actor", "groom", "husband", "boyfriend", "businessman",
    "schoolboy", "guy", "guys", "waiter", "hero", "grandfather", "uncle", "nephew",
})
PERSON_WORDS = FEMALE_WORDS | MALE_WORDS | frozenset({"person", "people", "child", "children", "kid", "kids",
                                                     "human", "humans", "crowd", "someone", "figure"})
GROUP_WORDS = frozenset({"women", "men", "girls", "boys", "people", "crowd", "couple", "group", "ladies",
                         "gentlemen", "children", "kids"})
HAIR_COLOURS = {
    "black": "black", "blonde": "blonde", "blond": "blonde", "brown": "brown", "red": "red", "orange": "orange",
    "blue": "blue", "green": "green", "purple": "purple", "pink": "pink", "white": "white", "grey": "grey",
    "gray": "grey", "silver": "silver", "aqua": "aqua",
}
_HAIR_PHRASE = re.compile(r"\b(" + "|".join(HAIR_COLOURS) + r")(?:[\s-]+(?:haired|hair))", re.IGNORECASE)


@dataclass(frozen=True)
class Contradiction:
    tag: str
    caption_words: tuple[str, ...]
    rule: str

    def describe(self) -> str:
        return f"tag '{self.tag}' vs caption '{', '.join(self.caption_words)}' ({self.rule})"


def _opposed(tag_keys: set[str], caption_words: set[str], tags: frozenset[str], own_words: frozenset[str],
             other_words: frozenset[str], rule: str, other_tags: frozenset[str] = frozenset()) -> list[Contradiction]:
    present = sorted(tag_keys & tags)
    if not present or tag_keys & other_tags:
        return []
    hits = caption_words & other_words
    if not hits or caption_words & own_words:
        return []
    return [Contradiction(present[0], tuple(sorted(hits)), rule)]


def find_contradictions(tag_keys: set[str], caption: str) -> list[Contradiction]:
    """Contradictions between normalised tags (``long_hair``) and a caption."""
    lowered = caption.lower()
    words = set(_WORDS.findall(lowered))
    found: list[Contradiction] = []
    found += _opposed(tag_keys, words, MALE_TAGS, MALE_WORDS, FEMALE_WORDS, "male tag, caption about a female",
                      FEMALE_TAGS)
    found += _opposed(tag_keys, words, FEMALE_TAGS, FEMALE_WORDS, MALE_WORDS, "female tag, caption about a male",
                      MALE_TAGS)
    if "no_humans" in tag_keys and words & PERSON_WORDS:
        found.append(Contradiction("no_humans", tuple(sorted(words & PERSON_WORDS)), "no humans tagged, caption "
                                   "names a person"))
    if "solo" in tag_keys and words & GROUP_WORDS:
        found.append(Contradiction("solo", tuple(sorted(words & GROUP_WORDS)), "solo tag, caption about several"))
    found += _opposed(tag_keys, words, frozenset({"indoors"}), frozenset({"indoors", "indoor", "inside"}),
                      frozenset({"outdoors", "outdoor", "outside"}), "indoors tag, caption outdoors")
    found += _opposed(tag_keys, words, frozenset({"outdoors"}), frozenset({"outdoors", "outdoor", "outside"}),
                      frozenset({"indoors", "indoor"}), "outdoors tag, caption indoors")
    found += _opposed(tag_keys, words, frozenset({"night"}), frozenset({"night", "nighttime", "moon", "moonlight"}),
                      frozenset({"daytime", "midday", "noon", "sunny"}), "night tag, caption in daytime")
    found += _opposed(tag_keys, words, frozenset({"day"}), frozenset({"day", "daytime", "sunny"}),
                      frozenset({"night", "nighttime", "midnight"}), "day tag, caption at night")
    tagged_colours = {HAIR_COLOURS[key[: -len("_hair")]]: key for key in sorted(tag_keys)
                      if key.endswith("_hair") and key[: -len("_hair")] in HAIR_COLOURS}
    if tagged_colours:
        said = {HAIR_COLOURS[match.group(1).lower()] for match in _HAIR_PHRASE.finditer(lowered)}
        if said and not said & set(tagged_colours):
            tag = tagged_colours[sorted(tagged_colours)[0]]
            found.append(Contradiction(tag, tuple(f"{colour} hair" for colour in sorted(said)),
                                       "hair colour differs"))
    return found
