"""The paper's deterministic filter for LLM outputs (PAPER.md section 1, from the authors' filter script).

``paper_filter`` either returns the cleaned text or a short, stable reason code for dropping it. Steps, in order:

1. drop: blank output (``empty``); any non-ASCII character (``non_ascii``); any ``*`` (``asterisk``); code or markup
   (``markup``: ``#include``, ``#define``, ``<br>``, ``</p>``, ``\"\"\"``, ``{{{``); runs of repeated characters or
   tokens (``repeated_chars``: ``aaaaaaa``, ``11111``, ``-----``, ``. . . . ``, ``thththth``, ``the the the the``);
   meta text (``meta_text``: ``Description:``, ``Description of the image:``, URLs);
2. truncate at the first ``Q:`` (the model started a new question), then at the first ``I hope``, ``#2:`` or
   ``Note``;
3. remove ``#1:``, ``A: ``, every ``#`` and every newline; tabs become spaces; double spaces collapse; a leading
   ``. `` is stripped;
4. drop what is left if it is shorter than 60 characters (``too_short``).

Two choices where the description is loose, both documented here: a newline is replaced by a space rather than
deleted (deleting glues the last word of a line to the first of the next, "images.The"), and the result is stripped
of surrounding whitespace. Matching is case-sensitive, as the authors' literal substrings are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_CHARS = 60

MARKUP = ("#include", "#define", "<br>", "</p>", '"""', "{{{")
META = ("Description:", "Description of the image:")
_URL = re.compile(r"https?://|www\.\S", re.IGNORECASE)

# A visible character 5+ times in a row: "aaaaaaa", "11111", "-----", "!!!!!", "?????????".
_CHAR_RUN = re.compile(r"(\S)\1{4,}")
# A 2-4 character unit 4+ times in a row: "thththth", ". . . . ", "ab ab ab ab " (whitespace-only units excepted).
_UNIT_RUN = re.compile(r"(?=((.{2,4}?)\2{3,}))", re.DOTALL)
# The same word 4+ times in a row, separated by whitespace: "image image image image".
_WORD_RUN = re.compile(r"\b(\w+)(?:\s+\1\b){3,}")

TRUNCATE_FIRST = ("Q:",)
TRUNCATE_THEN = ("I hope", "#2:", "Note")

REASONS = ("empty", "non_ascii", "asterisk", "markup", "repeated_chars", "meta_text", "too_short")
"""Every reason code paper_filter can return, in the order the checks run."""


@dataclass(frozen=True)
class FilterResult:
    """Exactly one of the two is set: the cleaned ``text`` of a kept output, or the ``reason`` it was dropped."""

    text: str | None
    reason: str | None

    @property
    def kept(self) -> bool:
        return self.text is not None


def _has_repeats(raw: str) -> bool:
    if _CHAR_RUN.search(raw) or _WORD_RUN.search(raw):
        return True
    return any(m.group(2).strip() for m in _UNIT_RUN.finditer(raw))


def drop_reason(raw: str) -> str | None:
    """Step 1: the reason to drop a raw output outright, or None if it may be cleaned."""
    if not raw or not raw.strip():
        return "empty"
    if not raw.isascii():
        return "non_ascii"
    if "*" in raw:
        return "asterisk"
    if any(m in raw for m in MARKUP):
        return "markup"
    if _has_repeats(raw):
        return "repeated_chars"
    if any(m in raw for m in META) or _URL.search(raw):
        return "meta_text"
    return None


def _cut(text: str, markers: tuple[str, ...]) -> str:
    """The text before the earliest occurrence of any marker (the whole text if none occurs)."""
    cut = min((i for i in (text.find(m) for m in markers) if i >= 0), default=len(text))
    return text[:cut]


def clean(raw: str) -> str:
    """Steps 2-3: truncate and normalise an output that passed step 1."""
    text = _cut(_cut(raw, TRUNCATE_FIRST), TRUNCATE_THEN)
    # "#1:" before "#": removing every "#" first would leave a stray "1:".
    text = text.replace("#1:", "").replace("A: ", "").replace("#", "")
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    text = re.sub(r" {2,}", " ", text).strip()
    if text.startswith(". "):
        text = text[2:].lstrip()
    return text


def paper_filter(raw: str | None) -> FilterResult:
    """Apply the paper's filter to one raw LLM output (None counts as empty)."""
    reason = drop_reason(raw or "")
    if reason is not None:
        return FilterResult(None, reason)
    text = clean(raw)
    if len(text) < MIN_CHARS:
        return FilterResult(None, "too_short")
    return FilterResult(text, None)
