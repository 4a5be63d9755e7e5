"""Caption cleanup: special tokens, whitespace and repetition loops."""

from captionkit.core.text import clean_caption, collapse_repetitions


def test_special_and_location_tokens_are_removed():
    assert clean_caption("</s><s>A cat<loc_12><loc_400> on a mat .<pad><pad>") == "A cat on a mat."


def test_repetition_loops_collapse_but_ordinary_text_stays():
    looped = "a dog running on the beach a dog running on the beach a dog running on the beach"
    assert collapse_repetitions(looped) == "a dog running on the beach"
    assert collapse_repetitions("the the the the cat") == "the cat"
    assert collapse_repetitions("a very very tall tree") == "a very very tall tree"
    assert collapse_repetitions("red, red, red, red, blue") == "red, blue"


def test_whitespace_is_normalised():
    assert clean_caption("  A  photo\t of \n\n a  tree ,  at night  ") == "A photo of a tree, at night"


def test_refusals_are_recognised_and_ordinary_captions_are_not():
    from captionkit.core.text import is_refusal

    refusals = ["I'm sorry, but I can't help with that image.", "I am sorry, I cannot describe this image.",
                "I cannot help with this request.", "Sorry, but I can't assist with that.",
                "As an AI language model, I cannot see images.", "I apologize, but this image violates policy.",
                "I\u2019m sorry, but I can\u2019t help with that.", "Unfortunately, I cannot identify people."]
    captions = ["Sorry, we are closed sign on a shop door", "As an AI-generated illustration of a castle",
                "I cannot help but notice a cat", "Sorry state of a rusty car", "A poster saying I am sorry"]
    assert all(is_refusal(text) for text in refusals)
    assert not any(is_refusal(text) for text in captions)


def test_filler_openers_are_removed():
    from captionkit.core.text import strip_filler_openers

    assert strip_filler_openers("The image shows a cat on a mat.") == "A cat on a mat."
    assert strip_filler_openers("In this image, we can see a red car.") == "A red car."
    assert strip_filler_openers("A cat on a mat.") == "A cat on a mat."
