"""Versioned prompt templates for the difference-writing LLM.

A template is never edited in place: a new wording gets a new version name, and every diffs row records the version
it was written with, so texts made under different prompts are never mixed up silently.
"""

from __future__ import annotations

PROMPTS: dict[str, str] = {
    # The paper's prompt (LLaMA-2-13B-chat), verbatim.
    "paper-v1": ("What is the visual difference between an image with a description of {caption_a} and an image "
                 "with a description of {caption_b}?"),
}


def build_prompt(version: str, caption_a: str, caption_b: str) -> str:
    """The prompt asking how image a (``caption_a``) differs from image b. Raises KeyError for an unknown version."""
    try:
        template = PROMPTS[version]
    except KeyError:
        raise KeyError(f"unknown prompt version {version!r}; known: {sorted(PROMPTS)}") from None
    return template.format(caption_a=caption_a, caption_b=caption_b)
