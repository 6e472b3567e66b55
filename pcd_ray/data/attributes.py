"""The synthetic set's vocabulary: attributes, captions, difference sentences and evaluation prompts.

One place defines what the words mean, so the data generator, the rule engine (ground-truth differences) and the
evaluation agree. Every shape in an image shares the image's attributes; ``count`` says how many there are.

Difference sentences come in two disjoint template sets: ``train`` wordings are what the rule engine writes for
finetuning, ``eval`` wordings are held out and only used by the difference-accuracy test, so a model cannot pass it
by memorising sentences. Both sets use the same comparative words (larger/bigger, brighter/darker, more/fewer).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ["circle", "square", "triangle"]
COLOURS = {  # name -> RGB at full brightness
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 40),
    "purple": (160, 60, 220),
    "orange": (245, 140, 30),
}
SIZES = ["small", "medium", "large"]
BRIGHTNESS = ["dark", "bright"]
COUNTS = [1, 2, 3]
POSITIONS = ["left", "center", "right"]
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
WHERE = {"left": "on the left", "center": "in the middle", "right": "on the right"}
MAX_CLAUSES = 2
"""A sentence names at most this many differences (LLMs name the salient few; CLIP reads 77 tokens at most)."""

CAPTION_FRAMES = [
    "{head} {noun}{where}",
    "a photo of {head} {noun}{where}",
    "this is a photo of {head} {noun}{where}",
    "an image showing {head} {noun}{where}",
]
CAPTION_MENTION = 0.6

# Ordered attributes: the ones a "more/less" difference sentence (and the difference-accuracy test) is about.
ORDERED = {"size": SIZES, "brightness": BRIGHTNESS, "count": COUNTS}

Attributes = dict[str, Any]


def sample_attributes(rng: np.random.Generator) -> Attributes:
    return {
        "kind": KINDS[rng.integers(len(KINDS))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "size": SIZES[rng.integers(len(SIZES))],
        "brightness": BRIGHTNESS[rng.integers(len(BRIGHTNESS))],
        "count": int(COUNTS[rng.integers(len(COUNTS))]),
        "position": POSITIONS[rng.integers(len(POSITIONS))],
    }


def compare(a: Attributes, b: Attributes, attribute: str) -> int:
    """+1 if image a has more of an ordered attribute than b, -1 if less, 0 if equal."""
    order = ORDERED[attribute]
    ia, ib = order.index(a[attribute]), order.index(b[attribute])
    return (ia > ib) - (ia < ib)


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else kind + "s"


def caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A loose caption, as people write them: the count and a noun always, each other attribute only sometimes
    (size, brightness, colour, position each with probability CAPTION_MENTION), and "shape" instead of the kind a
    third of the time. Captions that name one attribute are what make a one-attribute zero-shot prompt
    ("This is a photo of a large shape") a sentence the model has learned to read."""
    n = attrs["count"]
    kind = attrs["kind"] if rng.random() >= 1 / 3 else "shape"
    adjectives = [attrs[k] for k in ("size", "brightness", "colour") if rng.random() < CAPTION_MENTION]
    noun = " ".join(adjectives + [_plural(kind, n)])
    where = (" " + WHERE[attrs["position"]]) if rng.random() < CAPTION_MENTION else ""
    head = "a" if n == 1 else COUNT_WORDS[n]
    frame = CAPTION_FRAMES[rng.integers(len(CAPTION_FRAMES))]
    return frame.format(head=head, noun=noun, where=where)


# ------------------------------------------------------------------------------------------ difference sentences
# Each ordered attribute has comparative words for "first has more" (+1) and "first has less" (-1).
COMPARATIVES = {
    "size": {+1: ["larger", "bigger"], -1: ["smaller", "tinier"]},
    "brightness": {+1: ["brighter", "lighter"], -1: ["darker", "dimmer"]},
    "count": {+1: ["more"], -1: ["fewer"]},
}

TRAIN_CLAUSES = {
    "size": [
        "the shapes in the first image are {w} than in the second image",
        "the first image shows {w} shapes than the second one",
    ],
    "brightness": [
        "the shapes in the first image are {w} than in the second image",
        "the first image shows {w} shapes than the second one",
    ],
    "count": [
        "the first image contains {w} shapes than the second image",
        "there are {w} objects in the first image than in the second one",
    ],
    "colour": ["the first image shows {a} shapes while the second shows {b} shapes"],
    "kind": ["the first image has {a}s whereas the second has {b}s"],
    "position": ["the shapes are {a} in the first image but {b} in the second"],
}

# Held out from training: only the difference-accuracy evaluation uses these frames. They are new sentences made
# of words the training text contains (a from-scratch tiny text tower has never seen words outside its captions and
# training sentences, so unseen words would test the tokenizer, not the geometry).
EVAL_TEMPLATES = {
    "size": [
        "In the first image the shapes are {w} than the shapes in the second image.",
        "The first one shows {w} objects than the second image.",
    ],
    "brightness": [
        "In the first image the shapes are {w} than the shapes in the second image.",
        "The first one shows {w} objects than the second image.",
    ],
    "count": [
        "In the first image there are {w} shapes than in the second one.",
        "The first one contains {w} objects than the second image.",
    ],
}


def _clause(attribute: str, a: Attributes, b: Attributes, rng: np.random.Generator) -> str:
    frame = TRAIN_CLAUSES[attribute][rng.integers(len(TRAIN_CLAUSES[attribute]))]
    if attribute in ORDERED:
        words = COMPARATIVES[attribute][compare(a, b, attribute)]
        return frame.format(w=words[rng.integers(len(words))])
    if attribute == "position":
        return frame.format(a=WHERE[a[attribute]], b=WHERE[b[attribute]])
    return frame.format(a=a[attribute], b=b[attribute])


def difference_sentence(a: Attributes, b: Attributes, rng: np.random.Generator) -> str:
    """A ground-truth description of how image a differs from image b, in training wordings.

    Pairs that differ in nothing get a short sentence that the paper's length filter rejects, as an LLM's
    "they look the same" would be.
    """
    differing = [k for k in ("size", "brightness", "count", "colour", "kind", "position") if a[k] != b[k]]
    if not differing:
        return "The two images look the same."
    rng.shuffle(differing)
    differing = differing[:MAX_CLAUSES]
    clauses = [_clause(k, a, b, rng) for k in differing]
    text = clauses[0][0].upper() + clauses[0][1:]
    if len(clauses) > 1:
        text += ", " + ", ".join(clauses[1:-1]) + (", and " if len(clauses) > 2 else " and ") + clauses[-1]
        text = text.replace(", , and", ", and").replace(",  and", " and")
    text += "."
    if len(text) < 60:  # one short clause: say the same thing about the second image too, as LLMs do
        text = text[:-1] + ", so the two images are clearly different in this respect."
    return text


def eval_sentence(attribute: str, direction: int, template: int) -> str:
    """Held-out wording: 'image 1 has more <attribute> than image 2' (direction +1) or less (-1)."""
    words = COMPARATIVES[attribute][direction]
    return EVAL_TEMPLATES[attribute][template % len(EVAL_TEMPLATES[attribute])].format(w=words[0])


# ------------------------------------------------------------------------------------------------- zero-shot
ZEROSHOT_TEMPLATE = "This is a photo of a {label}"  # the paper's template
ZEROSHOT_TASKS: dict[str, dict[str, str]] = {  # task -> class value -> label text
    "kind": {k: k for k in KINDS},
    "colour": {c: f"{c} shape" for c in COLOURS},
    "size": {s: f"{s} shape" for s in SIZES},
}


def zeroshot_label(attrs: Attributes, task: str) -> str:
    return str(attrs[task])
