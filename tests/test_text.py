"""Caption cleanup: special tokens, whitespace and repetition loops."""

from captionkit.text import clean_caption, collapse_repetitions


def test_special_and_location_tokens_are_removed():
    assert clean_caption("</s><s>A cat<loc_12><loc_400> on a mat .<pad><pad>") == "A cat on a mat."


def test_repetition_loops_collapse_but_ordinary_text_stays():
    looped = "a dog running on the beach a dog running on the beach a dog running on the beach"
    assert collapse_repetitions(looped) == "a dog running on the beach"
    assert collapse_repetitions("the the the the cat") == "the cat"
    assert collapse_repetitions("a very very tall tree") == "a very very tall tree"
    assert collapse_repetitions("red, red, red, red, blue") == "red, blue"


def test_whitespace_is_normalised():
    assert clean_caption("  A  photo\t of \n\n a  tree ,  at night  ") == "A photo of\na tree, at night"
