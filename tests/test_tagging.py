"""Tag selection and rendering: every TagOptions field changes the output as documented."""

from __future__ import annotations

import numpy as np
import pytest

from captionkit.core.tagging import (
    TagOptions,
    escape_parentheses,
    mcut_threshold,
    render_tags,
    select_tags,
    underscores_to_spaces,
)

TAGS = ["long_hair", "smile", "blue_eyes", "hatsune_miku", "vocaloid", "some_artist", "highres",
        "general", "sensitive", "explicit", "^_^", "cat_(animal)"]
CATS = [0, 0, 0, 4, 3, 1, 5, 9, 9, 9, 0, 0]
SCORES = np.array([0.9, 0.6, 0.3, 0.95, 0.5, 0.7, 0.4, 0.2, 0.7, 0.1, 0.8, 0.55], dtype=np.float32)


def names(selected: list[tuple[str, float]]) -> list[str]:
    return [tag for tag, _ in selected]


def test_default_thresholds_select_by_category_and_order_by_score():
    selected = select_tags(SCORES, TAGS, CATS, TagOptions())
    # general 0.35: long_hair .9, ^_^ .8, smile .6, cat .55; character 0.85: miku .95;
    # copyright/artist/meta fall back to the general threshold; rating excluded by default.
    assert names(selected) == ["hatsune_miku", "long_hair", "^_^", "some_artist", "smile", "cat_(animal)",
                               "vocaloid", "highres"]
    assert selected[0][1] == pytest.approx(0.95)


def test_per_category_thresholds_by_name():
    options = TagOptions(thresholds={"artist": 0.75, "copyright": 0.45, "meta": 0.9})
    selected = names(select_tags(SCORES, TAGS, CATS, options))
    assert "some_artist" not in selected
    assert "vocaloid" in selected
    assert "highres" not in selected
    options = TagOptions(character_threshold=0.99)
    assert "hatsune_miku" not in names(select_tags(SCORES, TAGS, CATS, options))


def test_include_rating_adds_only_the_most_likely_rating():
    selected = names(select_tags(SCORES, TAGS, CATS, TagOptions(include_rating=True)))
    assert "sensitive" in selected
    assert "general" not in selected and "explicit" not in selected


def test_mcut_cuts_at_the_largest_gap_per_category():
    scores = np.array([0.9, 0.85, 0.2, 0.1, 0.3, 0.28], dtype=np.float32)
    tags = ["a", "b", "c", "d", "char_x", "char_y"]
    cats = [0, 0, 0, 0, 4, 4]
    assert mcut_threshold(scores[:4]) == pytest.approx((0.85 + 0.2) / 2)
    without = names(select_tags(scores, tags, cats, TagOptions(general_threshold=0.05)))
    assert without == ["a", "b", "c", "d"]
    with_mcut = names(select_tags(scores, tags, cats, TagOptions(general_threshold=0.05, mcut=True)))
    # general cut between .85 and .2; characters cut at the floor-limited midpoint .29.
    assert with_mcut == ["a", "b", "char_x"]


def test_max_tags_keeps_the_highest_scores():
    selected = names(select_tags(SCORES, TAGS, CATS, TagOptions(max_tags=2, order="name")))
    assert selected == ["hatsune_miku", "long_hair"]


def test_blacklist_matches_with_or_without_underscores():
    options = TagOptions(blacklist=["long hair", "^_^"])
    selected = names(select_tags(SCORES, TAGS, CATS, options))
    assert "long_hair" not in selected and "^_^" not in selected
    assert "smile" in selected


def test_replacements_apply_to_every_tag_not_just_the_last_pair():
    # kohya's loop rebound the list, so only one (or no) replacement took effect.
    options = TagOptions(replacements={"long_hair": "very_long_hair", "smile": "grin", "highres": ""})
    selected = names(select_tags(SCORES, TAGS, CATS, options))
    assert "very_long_hair" in selected and "grin" in selected
    assert "long_hair" not in selected and "smile" not in selected
    assert "highres" not in selected  # replaced by nothing = removed


def test_replacement_onto_an_existing_tag_is_written_once():
    options = TagOptions(replacements={"smile": "long_hair"})
    selected = names(select_tags(SCORES, TAGS, CATS, options))
    assert selected.count("long_hair") == 1


def test_always_first_tags_are_added_even_when_not_predicted():
    options = TagOptions(always_first=["my_trigger", "blue_eyes", "smile"])
    selected = select_tags(SCORES, TAGS, CATS, options)
    assert names(selected)[:3] == ["my_trigger", "blue_eyes", "smile"]
    assert dict(selected)["blue_eyes"] == pytest.approx(0.3)  # below threshold, still added, real score
    assert dict(selected)["my_trigger"] == 1.0  # unknown to the model
    assert names(selected).count("smile") == 1


def test_order_by_name():
    selected = names(select_tags(SCORES, TAGS, CATS, TagOptions(order="name")))
    assert selected == sorted(selected, key=str.lower)


def test_model_thresholds_per_tag_and_per_category():
    per_tag = np.full(len(TAGS), 0.99, dtype=np.float32)
    per_tag[TAGS.index("blue_eyes")] = 0.25
    options = TagOptions(use_model_thresholds=True)
    assert names(select_tags(SCORES, TAGS, CATS, options, {"general": 0.5, "per_tag": per_tag})) == ["blue_eyes"]
    by_category = names(select_tags(SCORES, TAGS, CATS, options, {"general": 0.85, "character": 0.5}))
    assert by_category == ["hatsune_miku", "long_hair"]
    with pytest.raises(ValueError, match="ships no thresholds"):
        select_tags(SCORES, TAGS, CATS, options, None)


def test_underscores_to_spaces_keeps_kaomoji():
    assert underscores_to_spaces("long_hair") == "long hair"
    for face in ["^_^", ">_<", "o_o", "x_x", "0_0", "^_^;", "=_="]:
        assert underscores_to_spaces(face) == face
    assert underscores_to_spaces("cat_(animal)") == "cat (animal)"


def test_render_escapes_parentheses_and_uses_separator():
    selected = [("cat_(animal)", 0.9), ("^_^", 0.8), ("long_hair", 0.7)]
    text = render_tags(selected, TagOptions(escape_parentheses=True, separator=" | "))
    assert text == "cat \\(animal\\) | ^_^ | long hair"
    assert escape_parentheses("a_\\(b\\)") == "a_\\(b\\)"  # already escaped stays as is
    raw = render_tags(selected, TagOptions(underscores_to_spaces=False))
    assert raw == "cat_(animal), ^_^, long_hair"


def test_invalid_options_fail_with_the_field_name():
    with pytest.raises(ValueError, match="order"):
        TagOptions(order="random")
    with pytest.raises(ValueError, match="general_threshold"):
        TagOptions(general_threshold=1.5)
    with pytest.raises(ValueError, match="unknown category 'charcter'"):
        TagOptions(thresholds={"charcter": 0.5})
    assert TagOptions(thresholds={"7": 0.5}).category_threshold(7) == 0.5


def test_misaligned_inputs_fail():
    with pytest.raises(ValueError, match="aligned"):
        select_tags(SCORES[:3], TAGS, CATS, TagOptions())


def test_score_lines_for_print_mode():
    from captionkit.core.tagging import score_lines

    lines = score_lines("a/b.png", [("long_hair", 0.91234), ("^_^", 0.5)], TagOptions())
    assert lines == ["a/b.png: long hair: 0.9123", "a/b.png: ^_^: 0.5000"]


def test_threshold_keys_may_be_category_numbers_and_rating_is_refused():
    import pytest

    from captionkit.core.tagging import TagOptions

    assert TagOptions(thresholds={"4": 0.1}).category_threshold(4) == 0.1
    assert TagOptions(thresholds={"character": 0.2}).category_threshold(4) == 0.2
    with pytest.raises(ValueError, match="include-rating"):
        TagOptions(thresholds={"rating": 0.9})
