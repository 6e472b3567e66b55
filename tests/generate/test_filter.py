"""The paper's output filter, rule by rule, on a table of raw outputs with exact expected results."""

from __future__ import annotations

import pytest

from pcd_ray.generate.filter import MIN_CHARS, REASONS, FilterResult, clean, paper_filter

# A clean sentence of 92 characters that every rule leaves alone.
GOOD = "The first image shows larger shapes than the second one, and the shapes are brighter as well."

# (id, raw output, expected text or None, expected reason or None)
CASES = [
    ("kept-unchanged", GOOD, GOOD, None),
    ("empty", "", None, "empty"),
    ("blank", "  \n\t ", None, "empty"),
    ("none", None, None, "empty"),
    ("non-ascii", GOOD + " Caf\u00e9.", None, "non_ascii"),
    ("non-ascii-dash", GOOD.replace(",", " \u2014"), None, "non_ascii"),
    ("asterisk", "**Differences:** " + GOOD, None, "asterisk"),
    ("include", "#include <stdio.h>\n" + GOOD, None, "markup"),
    ("define", GOOD + " #define X 1", None, "markup"),
    ("br", GOOD + "<br>", None, "markup"),
    ("p", GOOD + "</p>", None, "markup"),
    ("triple-quote", '"""' + GOOD, None, "markup"),
    ("braces", GOOD + " {{{", None, "markup"),
    ("run-letters", GOOD + " aaaaaaa", None, "repeated_chars"),
    ("run-digits", GOOD + " 11111", None, "repeated_chars"),
    ("run-dashes", "-----\n" + GOOD, None, "repeated_chars"),
    ("run-bangs", GOOD + "!!!!!", None, "repeated_chars"),
    ("run-questions", GOOD + "?????????", None, "repeated_chars"),
    ("run-dot-space", GOOD + " . . . . ", None, "repeated_chars"),
    ("run-th", GOOD + " thththth", None, "repeated_chars"),
    ("run-word", GOOD + " very very very very big", None, "repeated_chars"),
    ("description", "Description: " + GOOD, None, "meta_text"),
    ("description-of-image", "Description of the image: " + GOOD, None, "meta_text"),
    ("url", GOOD + " See https://example.com/x for more.", None, "meta_text"),
    ("www", GOOD + " See www.example.com.", None, "meta_text"),
    ("truncate-q", GOOD + " Q: What else differs between them?", GOOD, None),
    ("truncate-i-hope", GOOD + " I hope this helps!", GOOD, None),
    ("truncate-hash2", "#1: " + GOOD + "\n#2: The second difference is colour.", GOOD, None),
    ("truncate-note", GOOD + " Note that the captions may not be accurate.", GOOD, None),
    # Q: first, then the earliest of the others in what remains.
    ("truncate-order", GOOD + " Note: x. Q: y. I hope z.", GOOD, None),
    ("remove-a-colon", "A: " + GOOD, GOOD, None),
    ("remove-hashes", "### " + GOOD, GOOD, None),
    ("newline-becomes-space", GOOD.replace(", and ", ",\nand "), GOOD, None),
    ("crlf", GOOD.replace(", and ", ",\r\nand "), GOOD, None),
    ("tab", GOOD.replace(" shows ", "\tshows\t"), GOOD, None),
    ("double-spaces", GOOD.replace(" ", "   "), GOOD, None),
    ("leading-dot", ". " + GOOD, GOOD, None),
    ("leading-dot-after-removal", "A: . " + GOOD, GOOD, None),
    ("too-short", "The two images look the same.", None, "too_short"),
    ("short-after-truncation", "The first one is larger. I hope " + GOOD, None, "too_short"),
    ("only-a-question", "Q: " + GOOD, None, "too_short"),
]


@pytest.mark.parametrize("raw, text, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_paper_filter(raw, text, reason):
    result = paper_filter(raw)
    assert result == FilterResult(text, reason)
    assert result.kept == (text is not None)


def test_every_reason_is_exercised():
    reasons = {c[3] for c in CASES if c[3] is not None}
    assert reasons == set(REASONS)


def test_length_boundary():
    exactly = GOOD[:MIN_CHARS]
    assert len(exactly) == MIN_CHARS and not exactly.endswith(" ")
    assert paper_filter(exactly).text == exactly
    assert paper_filter(exactly[1:]).reason == "too_short"


def test_clean_steps_exact():
    raw = "#1: The first image is darker.\n\tThe  second\timage is brighter and larger. #2: colour"
    assert clean(raw) == "The first image is darker. The second image is brighter and larger."


def test_ordinary_text_is_not_mistaken_for_repeats():
    # Legitimate text with short runs: "..." (3 dots), "1000" (three zeros), "aa", "hahaha" (3 units).
    text = "Well... the first image has 1000 tiny dots, the second one aa shapes and a bigger hahaha."
    assert paper_filter(text) == FilterResult(text, None)
