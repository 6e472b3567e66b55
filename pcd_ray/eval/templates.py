"""Prompt templates and class names for zero-shot classification.

Two prompt sets per dataset:

- ``paper``: the evaluation protocol's single template (``protocol.py``): "This is a photo of a {label}", the
  authors' zero-shot and comparative prompt;
- ``ensemble``: CLIP's per-dataset template ensembles (OpenAI's prompt-engineering list, as used by open_clip's
  benchmarks); where CLIP published none (CUB, AwA2, the synthetic set) open_clip's own ImageNet ensemble
  (``open_clip.zero_shot_metadata``) is used. The class embedding is the normalised mean of the normalised
  template embeddings, as open_clip's ``build_zero_shot_classifier`` computes it.
"""

from __future__ import annotations

from collections.abc import Callable

TemplateSet = list[Callable[[str], str]]
PAPER_TEMPLATE = "This is a photo of a {label}"
"""The authors' zero-shot prompt (their eval script's ``run_zero_shot`` and ``run_comparative``)."""
GEOMETRY_TEMPLATE = "A photo of a {label}"
"""The authors' class prompt of the geometry test (their analysis script's ``test_comparative_prompts``)."""

_CIFAR = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
]
DATASET_TEMPLATES: dict[str, list[str]] = {
    "cifar100": _CIFAR,
    "flowers102": ["a photo of a {c}, a type of flower."],
    "eurosat": [
        "a centered satellite photo of {c}.",
        "a centered satellite photo of a {c}.",
        "a centered satellite photo of the {c}.",
    ],
    "sun397": ["a photo of a {c}.", "a photo of the {c}."],
    "cub": ["a photo of a {c}, a type of bird."],  # CLIP's Birdsnap ensemble
}

# CLIP's EuroSAT class names (the folder names are CamelCase codes such as "HerbaceousVegetation").
EUROSAT_CLASSNAMES = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}


def ensemble(kind: str) -> TemplateSet:
    """The template ensemble of a dataset kind, as callables label -> prompt (open_clip's convention).

    The synthetic set gets open_clip's 7-template ``SIMPLE_IMAGENET_TEMPLATES`` (the subset CLIP found best): the
    80-template list costs the CPU demo 10x the text encoding for prompts ("a tattoo of the ...") a shapes model
    has never read.
    """
    if kind in DATASET_TEMPLATES:
        return [lambda c, t=t: t.format(c=c) for t in DATASET_TEMPLATES[kind]]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(SIMPLE_IMAGENET_TEMPLATES if kind == "synthetic" else OPENAI_IMAGENET_TEMPLATES)


def paper(template: str = PAPER_TEMPLATE) -> TemplateSet:
    """One template with a ``{label}`` slot as a template set."""
    return [lambda c: template.format(label=c)]


def template_sets(kind: str, names: list[str], paper_template: str = PAPER_TEMPLATE) -> dict[str, TemplateSet]:
    """The requested template sets of a dataset kind by name ('paper': ``paper_template``, the protocol's; 'ensemble');
    ValueError for others."""
    out = {}
    for name in names:
        if name == "paper":
            out[name] = paper(paper_template)
        elif name == "ensemble":
            out[name] = ensemble(kind)
        else:
            raise ValueError(f"unknown template set {name!r} (known: paper, ensemble)")
    return out
