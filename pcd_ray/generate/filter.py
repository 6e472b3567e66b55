"""The two filters of LLM outputs (``generate.filter``): ``paper``, the authors' filter script rule for rule, and
``strict`` (the default), the authors' drop rules plus general detectors of the same defects.

``filter_output(raw, mode)`` returns a ``FilterResult``: the cleaned text of a kept output, or a short, stable reason
code for dropping it (``REASONS``; the codes a mode can return are ``MODE_REASONS[mode]``).

**paper** does what the authors' script does, in its order:

1. drop an output that starts with three newlines (``leading_newlines``, also after one space), starts with
   ``# 1000`` or ``#include``, or contains one of the literal strings of ``PAPER_DROPS``, checked in the script's
   order; the first match names the reason (``markup``, ``repeated_chars``, ``bad_phrase`` for the authors' list of
   degenerate phrases such as ``100% of the time``, ``meta_text``, ``asterisk``, ``non_ascii``). Then drop any
   non-ASCII character (``non_ascii``). The literals are the whole rule: ``.....``, ``=====``, a word repeated four
   times or a URL other than ``www.sciencedirect.com`` are kept, ``#include`` inside an output is kept;
2. truncate at the first ``Q:``, then at the first ``I hope``, ``#2:`` and ``Note`` in what remains (case-sensitive:
   ``Notes``, ``Notebook`` cut too);
3. remove ``#1:``, ``A: `` and every ``#``; *delete* every newline, which glues the words on either side
   (``images.\\nThe`` becomes ``images.The``); a tab becomes a space; ``"  "`` becomes ``" "`` in one pass, so three
   spaces leave two; a leading ``. `` goes; the text is stripped between steps as the script strips it (``\\r``
   stays: the script does not touch it);
4. drop it if shorter than 60 characters (``too_short``): a blank output, for which the script has no rule of its
   own, is dropped here.

**strict** drops an output with any of the reasons below, checked in this order, and otherwise cleans it without
gluing words: ``empty`` (blank); ``leading_newlines``; ``non_ascii``; ``asterisk`` (any ``*``); ``markup``
(``#include`` anywhere, ``#define``, ``<br>``, ``</p>``, ``\"\"\"``, ``{{{``); ``repeated_chars`` (a visible character
5+ times in a row, a 2-4 character unit 4+ times, a word 4+ times); ``meta_text`` (``Description:``, ``Description of
the image:``, any URL); ``bad_phrase``; ``too_short``. Every drop rule of ``paper`` is also a strict rule under the
same reason, so strict keeps nothing that paper's drop rules reject. Cleanup: the same truncation and removals, but a
newline or ``\\r`` becomes a space, every run of spaces collapses to one, and a leading ``. `` is stripped.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["strict", "paper"]

MIN_CHARS = 60

REASONS = (
    "empty",
    "leading_newlines",
    "non_ascii",
    "asterisk",
    "markup",
    "repeated_chars",
    "meta_text",
    "bad_phrase",
    "too_short",
)
"""Every reason code either mode returns, in strict's order of checks."""

MODE_REASONS: dict[str, tuple[str, ...]] = {"strict": REASONS, "paper": tuple(r for r in REASONS if r != "empty")}
"""The reason codes each mode can return: paper has no blank-output rule (its length rule drops a blank output)."""

# The authors' drop rules in their script's order: (where, literal, reason). "start": the raw output starts with it;
# "in": it occurs anywhere. Several are degenerate generations the authors met in their own outputs.
PAPER_DROPS: tuple[tuple[str, str, str], ...] = (
    ("start", "\n\n\n", "leading_newlines"),
    ("start", " \n\n\n", "leading_newlines"),
    ("start", "# 1000", "markup"),
    ("start", "#include", "markup"),
    ("in", "#define", "markup"),
    ("in", "0" * 58, "repeated_chars"),
    ("in", "100% of the time", "bad_phrase"),
    ("in", "gatsbyjs", "bad_phrase"),
    ("in", "The following are the steps to create a successful landing page:", "bad_phrase"),
    ("in", "The following are the steps to create a successful business plan for a small business", "bad_phrase"),
    ("in", "\u0450s.", "non_ascii"),
    ("in", "\u0450s,", "non_ascii"),
    ("in", "%3D" * 7 + "%", "repeated_chars"),
    ("in", "birdtalking about the weather", "bad_phrase"),
    ("in", "The cat is standing on the car seat, looking out the window.", "bad_phrase"),
    ("in", "$\\}\\}%", "markup"),
    ("in", "Description of the image:", "meta_text"),
    ("in", "Description:", "meta_text"),
    ("in", "www.sciencedirect.com", "meta_text"),
    ("in", ".. .. ..", "repeated_chars"),
    ("in", '" " "', "repeated_chars"),
    ("in", "thththth", "repeated_chars"),
    ("in", "?????????", "repeated_chars"),
    ("in", "t=t=t=t=", "repeated_chars"),
    ("in", "{{{", "markup"),
    ("in", "aaaaaaa", "repeated_chars"),
    ("in", "t:t:t:", "repeated_chars"),
    ("in", '"""', "markup"),
    ("in", "front-end-d", "bad_phrase"),
    ("in", "lamalamalama", "repeated_chars"),
    ("in", "tgthtgthtgth", "repeated_chars"),
    ("in", "t.t.t.t", "repeated_chars"),
    ("in", "t1t1t1", "repeated_chars"),
    ("in", "t=A:t=A", "repeated_chars"),
    ("in", "</p>", "markup"),
    ("in", "aiaiai", "repeated_chars"),
    ("in", ". . . . ", "repeated_chars"),
    ("in", "t-t-t-t", "repeated_chars"),
    ("in", "!!!!!", "repeated_chars"),
    ("in", "tthth", "repeated_chars"),
    ("in", "1000000", "repeated_chars"),
    ("in", "thumbthumb", "repeated_chars"),
    ("in", "****", "asterisk"),
    ("in", "11111", "repeated_chars"),
    ("in", "-----", "repeated_chars"),
    ("in", "<br>", "markup"),
    ("in", "0:00:00", "repeated_chars"),
    ("in", "55555", "repeated_chars"),
    ("in", "thttht", "repeated_chars"),
    ("in", "t,t,t,", "repeated_chars"),
    ("in", "tone:tone", "repeated_chars"),
    ("in", "sl\u00e4ktet", "non_ascii"),
    ("in", "*", "asterisk"),
    ("in", "mwm", "repeated_chars"),
    ("in", "I's a bird, I's a bird,", "repeated_chars"),
    ("in", "t_t_t_", "repeated_chars"),
)

TRUNCATE_FIRST = ("Q:",)
TRUNCATE_THEN = ("I hope", "#2:", "Note")

MARKUP = ("#include", "#define", "<br>", "</p>", '"""', "{{{")
META = ("Description:", "Description of the image:")
_URL = re.compile(r"https?://|www\.\S", re.IGNORECASE)
# A visible character 5+ times in a row: "aaaaaaa", "11111", "-----", "!!!!!", "?????????", ".....", "=====".
_CHAR_RUN = re.compile(r"(\S)\1{4,}")
# A 2-4 character unit 4+ times in a row: "thththth", ". . . . ", "ab ab ab ab " (whitespace-only units excepted).
_UNIT_RUN = re.compile(r"(?=((.{2,4}?)\2{3,}))", re.DOTALL)
# The same word 4+ times in a row, separated by whitespace: "image image image image".
_WORD_RUN = re.compile(r"\b(\w+)(?:\s+\1\b){3,}")


@dataclass(frozen=True)
class FilterResult:
    """Exactly one of the two is set: the cleaned ``text`` of a kept output, or the ``reason`` it was dropped."""

    text: str | None
    reason: str | None

    @property
    def kept(self) -> bool:
        return self.text is not None


def _matches(raw: str, where: str, literal: str) -> bool:
    return raw.startswith(literal) if where == "start" else literal in raw


def _finish(text: str) -> FilterResult:
    return FilterResult(None, "too_short") if len(text) < MIN_CHARS else FilterResult(text, None)


# ------------------------------------------------------------------------------------------------------------ paper
def paper_drop_reason(raw: str) -> str | None:
    """Step 1 of ``paper``: the reason of the first drop rule ``raw`` meets, or None."""
    reason = next((r for where, lit, r in PAPER_DROPS if _matches(raw, where, lit)), None)
    return reason or (None if raw.isascii() else "non_ascii")


def paper_clean(raw: str) -> str:
    """Steps 2-3 of ``paper``, with the script's strips and its cuts at the marker's first index in ``raw``."""
    text = raw.strip()
    for marker in TRUNCATE_FIRST + TRUNCATE_THEN:
        if marker in text:
            text = raw[: raw.find(marker)].strip()
    text = text.replace("#1:", "").replace("A: ", "").replace("#", "").strip()
    text = text.replace("\n", "").strip().replace("\t", " ").strip()
    text = text.replace("  ", " ").strip()
    if text.startswith(". "):
        text = text[2:].strip()
    return text


def paper_filter(raw: str | None) -> FilterResult:
    """The authors' filter on one raw output (None counts as "")."""
    raw = raw or ""
    reason = paper_drop_reason(raw)
    return FilterResult(None, reason) if reason is not None else _finish(paper_clean(raw))


# ----------------------------------------------------------------------------------------------------------- strict
def _has_repeats(raw: str) -> bool:
    if _CHAR_RUN.search(raw) or _WORD_RUN.search(raw):
        return True
    return any(m.group(2).strip() for m in _UNIT_RUN.finditer(raw))


# Strict's own detectors by reason; each reason also drops on paper's literals of that reason.
_GENERAL: dict[str, Callable[[str], bool]] = {
    "empty": lambda s: not s.strip(),
    "non_ascii": lambda s: not s.isascii(),
    "asterisk": lambda s: "*" in s,
    "markup": lambda s: any(m in s for m in MARKUP),
    "repeated_chars": _has_repeats,
    "meta_text": lambda s: any(m in s for m in META) or _URL.search(s) is not None,
}
_PAPER_BY_REASON = {reason: [(w, lit) for w, lit, r in PAPER_DROPS if r == reason] for reason in REASONS}


def strict_drop_reason(raw: str) -> str | None:
    """Strict's first reason to drop ``raw`` outright (every one but ``too_short``), or None."""
    for reason in REASONS[:-1]:
        if reason in _GENERAL and _GENERAL[reason](raw):
            return reason
        if any(_matches(raw, where, lit) for where, lit in _PAPER_BY_REASON[reason]):
            return reason
    return None


def _cut(text: str, markers: tuple[str, ...]) -> str:
    """The text before the earliest occurrence of any marker (the whole text if none occurs)."""
    cut = min((i for i in (text.find(m) for m in markers) if i >= 0), default=len(text))
    return text[:cut]


def strict_clean(raw: str) -> str:
    """Strict's truncation and cleanup of an output that passed its drop rules."""
    text = _cut(_cut(raw, TRUNCATE_FIRST), TRUNCATE_THEN)
    # "#1:" before "#": removing every "#" first would leave a stray "1:".
    text = text.replace("#1:", "").replace("A: ", "").replace("#", "")
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    text = re.sub(r" {2,}", " ", text).strip()
    if text.startswith(". "):
        text = text[2:].lstrip()
    return text


def strict_filter(raw: str | None) -> FilterResult:
    """pcd-ray's filter on one raw output (None counts as empty)."""
    raw = raw or ""
    reason = strict_drop_reason(raw)
    return FilterResult(None, reason) if reason is not None else _finish(strict_clean(raw))


FILTERS: dict[str, Callable[[str | None], FilterResult]] = {"strict": strict_filter, "paper": paper_filter}
"""``generate.filter`` name -> filter of one raw output."""


def filter_output(raw: str | None, mode: Mode = "strict") -> FilterResult:
    """Apply the ``mode`` filter to one raw LLM output. Raises ValueError for an unknown mode."""
    if mode not in FILTERS:
        raise ValueError(f"unknown filter {mode!r}: {', '.join(FILTERS)}")
    return FILTERS[mode](raw)
