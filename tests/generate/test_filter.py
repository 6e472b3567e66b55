"""The two output filters, rule by rule, on tables of raw outputs with exact expected results: ``paper`` (the
authors' filter script), ``strict`` (the default), where they differ, and the generate actor applying the configured
one."""

from __future__ import annotations

import numpy as np
import pytest

from pcd_ray.config import GenerateConfig
from pcd_ray.generate.actor import GenerateActor
from pcd_ray.generate.filter import (
    FILTERS,
    MIN_CHARS,
    MODE_REASONS,
    PAPER_DROPS,
    REASONS,
    FilterResult,
    filter_output,
    paper_clean,
    paper_drop_reason,
    paper_filter,
    strict_clean,
    strict_filter,
)

# A clean sentence of 92 characters that every rule of both filters leaves alone.
GOOD = "The first image shows larger shapes than the second one, and the shapes are brighter as well."
SHORT = "The first image is darker."

# (id, raw output, expected text or None, expected reason or None)
PAPER_CASES = [
    ("kept-unchanged", GOOD, GOOD, None),
    ("empty", "", None, "too_short"),
    ("blank", "  \n\t ", None, "too_short"),
    ("none", None, None, "too_short"),
    ("three-newlines-first", "\n\n\n" + GOOD, None, "leading_newlines"),
    ("space-three-newlines-first", " \n\n\n" + GOOD, None, "leading_newlines"),
    ("only-newlines", "\n\n\n", None, "leading_newlines"),
    ("two-newlines-first-kept", "\n\n" + GOOD, GOOD, None),
    ("hash-1000-first", "# 1000 words\n" + GOOD, None, "markup"),
    ("include-first", "#include <stdio.h>\n" + GOOD, None, "markup"),
    # "#include" drops only at the start; inside, its "#" goes like every "#".
    ("include-inside-kept", GOOD + " #include it", GOOD + " include it", None),
    ("hash-1000-inside-kept", GOOD + " # 1000", GOOD + " 1000", None),
    ("non-ascii", GOOD + " Caf\u00e9.", None, "non_ascii"),
    ("non-ascii-dash", GOOD.replace(",", " \u2014"), None, "non_ascii"),
    # The script checks "*" before non-ASCII: the first rule met names the reason.
    ("asterisk-before-non-ascii", GOOD + " *caf\u00e9*", None, "asterisk"),
    ("url-other-kept", GOOD + " See https://example.com/x", GOOD + " See https://example.com/x", None),
    ("www-other-kept", GOOD + " See www.example.com.", GOOD + " See www.example.com.", None),
    ("five-dots-kept", GOOD + ".....", GOOD + ".....", None),
    ("five-equals-kept", GOOD + " =====", GOOD + " =====", None),
    ("word-four-times-kept", GOOD + " very very very very big", GOOD + " very very very very big", None),
    ("truncate-q", GOOD + " Q: What else differs between them?", GOOD, None),
    ("truncate-i-hope", GOOD + " I hope this helps!", GOOD, None),
    ("truncate-hash2", "#1: " + GOOD + "\n#2: The second difference is colour.", GOOD, None),
    ("truncate-note", GOOD + " Note that the captions may not be accurate.", GOOD, None),
    ("truncate-note-is-case-sensitive", GOOD + " note this.", GOOD + " note this.", None),
    ("truncate-notebook", GOOD + " Notebooks too.", GOOD, None),
    # Q: first, then each of the others at its first occurrence in what remains.
    ("truncate-order", GOOD + " Note: x. Q: y. I hope z.", GOOD, None),
    ("truncate-q-before-hope", GOOD + " Q: I hope", GOOD, None),
    ("remove-a-colon", "A: " + GOOD, GOOD, None),
    (
        "remove-a-colon-inside",
        GOOD.replace("second one", "second one (image A: left)"),
        GOOD.replace("second one", "second one (image left)"),
        None,
    ),
    ("a-colon-without-space-kept", GOOD + " A:B", GOOD + " A:B", None),
    ("remove-hashes", "### " + GOOD, GOOD, None),
    ("remove-hash1", "#1:" + GOOD, GOOD, None),
    # The script deletes newlines: the words on either side are glued.
    ("newline-glues", GOOD.replace(", and ", ",\nand "), GOOD.replace(", and ", ",and "), None),
    ("newline-glues-sentences", GOOD + "\nIt is round.", GOOD + "It is round.", None),
    # The script leaves "\r" alone: a Windows line end keeps its "\r".
    ("crlf-keeps-cr", GOOD.replace(", and ", ",\r\nand "), GOOD.replace(", and ", ",\rand "), None),
    ("tab", GOOD.replace(" shows ", "\tshows\t"), GOOD, None),
    ("double-spaces", GOOD.replace(" ", "  "), GOOD, None),
    # One pass of "  " -> " ": three spaces leave two, four leave two.
    ("triple-spaces", GOOD.replace(" shows ", "   shows    "), GOOD.replace(" shows ", "  shows  "), None),
    ("two-tabs", GOOD.replace(" shows ", "\t\tshows "), GOOD, None),
    ("leading-dot", ". " + GOOD, GOOD, None),
    ("leading-dot-after-removal", "A: . " + GOOD, GOOD, None),
    ("leading-dot-once", ". . " + GOOD, ". " + GOOD, None),
    ("surrounding-whitespace", "  \n" + GOOD + " \n ", GOOD, None),
    ("too-short", "The two images look the same.", None, "too_short"),
    ("short-after-truncation", "The first one is larger. I hope " + GOOD, None, "too_short"),
    ("only-a-question", "Q: " + GOOD, None, "too_short"),
]

STRICT_CASES = [
    ("kept-unchanged", GOOD, GOOD, None),
    ("empty", "", None, "empty"),
    ("blank", "  \n\t ", None, "empty"),
    ("none", None, None, "empty"),
    ("only-newlines", "\n\n\n", None, "empty"),
    ("three-newlines-first", "\n\n\n" + GOOD, None, "leading_newlines"),
    ("non-ascii", GOOD + " Caf\u00e9.", None, "non_ascii"),
    ("non-ascii-before-asterisk", GOOD + " *caf\u00e9*", None, "non_ascii"),
    ("asterisk", "**Differences:** " + GOOD, None, "asterisk"),
    ("include-first", "#include <stdio.h>\n" + GOOD, None, "markup"),
    ("include-inside", GOOD + " #include it", None, "markup"),
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
    ("run-five-dots", GOOD + ".....", None, "repeated_chars"),
    ("run-five-equals", GOOD + " =====", None, "repeated_chars"),
    ("run-unit", GOOD + " ab ab ab ab ", None, "repeated_chars"),
    ("run-word", GOOD + " very very very very big", None, "repeated_chars"),
    ("description", "Description: " + GOOD, None, "meta_text"),
    ("description-of-image", "Description of the image: " + GOOD, None, "meta_text"),
    ("url", GOOD + " See https://example.com/x for more.", None, "meta_text"),
    ("www", GOOD + " See www.example.com.", None, "meta_text"),
    ("bad-phrase", GOOD + " It is bigger 100% of the time.", None, "bad_phrase"),
    ("truncate-q", GOOD + " Q: What else differs between them?", GOOD, None),
    ("truncate-i-hope", GOOD + " I hope this helps!", GOOD, None),
    ("truncate-hash2", "#1: " + GOOD + "\n#2: The second difference is colour.", GOOD, None),
    ("truncate-note", GOOD + " Note that the captions may not be accurate.", GOOD, None),
    ("truncate-order", GOOD + " Note: x. Q: y. I hope z.", GOOD, None),
    ("remove-a-colon", "A: " + GOOD, GOOD, None),
    ("remove-hashes", "### " + GOOD, GOOD, None),
    ("newline-becomes-space", GOOD.replace(", and ", ",\nand "), GOOD, None),
    ("crlf", GOOD.replace(", and ", ",\r\nand "), GOOD, None),
    ("tab", GOOD.replace(" shows ", "\tshows\t"), GOOD, None),
    ("spaces-collapse", GOOD.replace(" ", "   "), GOOD, None),
    ("leading-dot", ". " + GOOD, GOOD, None),
    ("leading-dot-after-removal", "A: . " + GOOD, GOOD, None),
    ("too-short", "The two images look the same.", None, "too_short"),
    ("short-after-truncation", "The first one is larger. I hope " + GOOD, None, "too_short"),
    ("only-a-question", "Q: " + GOOD, None, "too_short"),
]

# Where the two differ on the same raw output: (id, raw, paper's (text, reason), strict's (text, reason)).
DIFFERENT = [
    ("five-dots", GOOD + ".....", (GOOD + ".....", None), (None, "repeated_chars")),
    ("five-equals", GOOD + " =====", (GOOD + " =====", None), (None, "repeated_chars")),
    ("url", GOOD + " See https://example.com/x", (GOOD + " See https://example.com/x", None), (None, "meta_text")),
    ("word-four-times", GOOD + " very very very very", (GOOD + " very very very very", None), (None, "repeated_chars")),
    ("include-inside", GOOD + " #include it", (GOOD + " include it", None), (None, "markup")),
    ("newline", GOOD + "\nIt is round.", (GOOD + "It is round.", None), (GOOD + " It is round.", None)),
    # Gluing the lines makes the text shorter: 60 characters with the space strict puts back, 59 without.
    ("newline-at-the-limit", GOOD[:60].replace(" larger ", " larger\n"), (None, "too_short"), (GOOD[:60], None)),
]

# Outputs with one of the authors' listed phrases and runs: both filters drop them, for the same reason.
BOTH_DROP = [
    ("100%-of-the-time", GOOD + " It is bigger 100% of the time.", "bad_phrase"),
    ("timestamp", GOOD + " 0:00:00", "repeated_chars"),
    ("lamalamalama", GOOD + " lamalamalama", "repeated_chars"),
    ("t-comma", GOOD + " t,t,t,", "repeated_chars"),
]


@pytest.mark.parametrize("raw, text, reason", [c[1:] for c in PAPER_CASES], ids=[c[0] for c in PAPER_CASES])
def test_paper_filter(raw, text, reason):
    result = paper_filter(raw)
    assert result == FilterResult(text, reason) == filter_output(raw, "paper")
    assert result.kept == (text is not None)


@pytest.mark.parametrize("raw, text, reason", [c[1:] for c in STRICT_CASES], ids=[c[0] for c in STRICT_CASES])
def test_strict_filter(raw, text, reason):
    result = strict_filter(raw)
    assert result == FilterResult(text, reason) == filter_output(raw, "strict") == filter_output(raw)
    assert result.kept == (text is not None)


@pytest.mark.parametrize("where, literal, reason", PAPER_DROPS, ids=[repr(lit)[1:-1] for _, lit, _ in PAPER_DROPS])
def test_every_paper_literal_drops_in_both_modes(where, literal, reason):
    raw = literal + GOOD if where == "start" else GOOD + " " + literal + " " + GOOD
    assert paper_filter(raw) == FilterResult(None, reason)
    assert strict_filter(raw) == FilterResult(None, reason)


def test_paper_literals_are_the_authors_in_their_order():
    assert len(PAPER_DROPS) == 56 and len({lit for _, lit, _ in PAPER_DROPS}) == 56
    assert [lit for w, lit, _ in PAPER_DROPS if w == "start"] == ["\n\n\n", " \n\n\n", "# 1000", "#include"]
    assert PAPER_DROPS[5][1] == "0" * 58
    assert paper_filter(GOOD + " " + "0" * 57).kept  # one zero short of the literal
    assert {r for _, _, r in PAPER_DROPS} | {"too_short"} == set(MODE_REASONS["paper"])


@pytest.mark.parametrize("raw, paper, strict", [c[1:] for c in DIFFERENT], ids=[c[0] for c in DIFFERENT])
def test_where_the_modes_differ(raw, paper, strict):
    assert paper_filter(raw) == FilterResult(*paper)
    assert strict_filter(raw) == FilterResult(*strict)


@pytest.mark.parametrize("raw, reason", [c[1:] for c in BOTH_DROP], ids=[c[0] for c in BOTH_DROP])
def test_authors_listed_defects_drop_in_both(raw, reason):
    assert paper_filter(raw) == FilterResult(None, reason)
    assert strict_filter(raw) == FilterResult(None, reason)


def test_every_reason_is_exercised():
    assert {c[3] for c in PAPER_CASES if c[3]} | {r for _, _, r in PAPER_DROPS} == set(MODE_REASONS["paper"])
    assert {c[3] for c in STRICT_CASES if c[3]} == set(MODE_REASONS["strict"])
    assert set(REASONS) == set(MODE_REASONS["strict"]) | set(MODE_REASONS["paper"])


def test_strict_drops_whatever_paper_drop_rules_drop():
    raws = [c[1] for c in PAPER_CASES + STRICT_CASES + DIFFERENT] + [c[1] for c in BOTH_DROP]
    raws += [lit + GOOD for _, lit, _ in PAPER_DROPS] + [GOOD + lit for _, lit, _ in PAPER_DROPS]
    dropped = [r for r in raws if paper_drop_reason(r or "") is not None]
    assert len(dropped) > len(PAPER_DROPS)
    assert not [r for r in dropped if strict_filter(r).kept]


@pytest.mark.parametrize("mode, clean", [("paper", paper_clean), ("strict", strict_clean)])
def test_length_boundary(mode, clean):
    exactly = GOOD[:MIN_CHARS]
    assert len(exactly) == MIN_CHARS and not exactly.endswith(" ") and clean(exactly) == exactly
    assert filter_output(exactly, mode).text == exactly
    assert filter_output(exactly[1:], mode).reason == "too_short"


def test_clean_steps_exact():
    raw = "#1: The first image is darker.\n\tThe  second\timage is brighter and larger. #2: colour"
    assert strict_clean(raw) == "The first image is darker. The second image is brighter and larger."
    assert paper_clean(raw) == "The first image is darker. The second image is brighter and larger."
    raw = "A: ### The first image is darker.\nThe second\r\nis   brighter. Notes: none"
    assert strict_clean(raw) == "The first image is darker. The second is brighter."
    assert paper_clean(raw) == "The first image is darker.The second\ris  brighter."


def test_ordinary_text_is_not_mistaken_for_repeats():
    # Legitimate text with short runs: "..." (3 dots), "1000" (three zeros), "aa", "hahaha" (3 units).
    text = "Well... the first image has 1000 tiny dots, the second one aa shapes and a bigger hahaha."
    assert strict_filter(text) == FilterResult(text, None)
    assert paper_filter(text) == FilterResult(text, None)


def test_unknown_mode():
    assert set(FILTERS) == {"strict", "paper"}
    with pytest.raises(ValueError, match="unknown filter 'loose'"):
        filter_output(GOOD, "loose")


class EchoEngine:
    """Writes each pair's first caption as its raw output, so a test chooses the raw texts the filter sees."""

    name = "echo"
    requires = ("caption_a",)

    def __init__(self, cfg):
        pass

    def generate(self, batch):
        return list(batch["caption_a"])


@pytest.mark.parametrize("mode", ["strict", "paper"])
def test_the_actor_applies_the_configured_filter(mode):
    raws = [GOOD, GOOD + " =====", GOOD + "\nIt is round.", "Q: " + GOOD, GOOD + " *caf\u00e9*"]
    cfg = GenerateConfig.model_validate({"engine": f"{__name__}:EchoEngine", "filter": mode})
    col = lambda v: np.array(v, dtype=object)  # noqa: E731
    out = (
        GenerateActor(cfg)
        .run(
            {
                "pair_id": col([f"p{k}" for k in range(len(raws))]),
                "caption_a": col(raws),
                "caption_b": col(["b"] * len(raws)),
            }
        )
        .to_pydict()
    )
    expected = [filter_output(r, mode) for r in raws]
    assert out["raw"] == raws
    assert out["text"] == [e.text for e in expected] and out["reason"] == [e.reason for e in expected]
    assert out["reason"][1] == (None if mode == "paper" else "repeated_chars")
    assert out["reason"][4] == ("asterisk" if mode == "paper" else "non_ascii")
    assert out["text"][2] == GOOD + ("It is round." if mode == "paper" else " It is round.")
