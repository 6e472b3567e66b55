"""Versioned prompt templates for the difference-writing LLM.

A template is never edited in place: a new wording gets a new version name, and every diffs (and comparatives) row
records the version it was written with, so texts made under different prompts are never mixed up silently. Image
pairs are asked about with the pair versions, class pairs (``CLASS_PROMPTS``) with the class versions.
"""

from __future__ import annotations

from typing import Any

PROMPTS: dict[str, str] = {
    # The paper's prompt (LLaMA-2-13B-chat), verbatim.
    "paper-v1": (
        "What is the visual difference between an image with a description of {caption_a} and an image "
        "with a description of {caption_b}?"
    ),
    # For current instruct models, which answer paper-v1 with bullet lists and markdown the paper's filter drops
    # (asterisks, "#"): the same question, asking for the plain one-to-two-sentence form the filter keeps.
    "instruct-v1": (
        "Image A is described as: {caption_a}\nImage B is described as: {caption_b}\n"
        "In one or two plain sentences, with no lists or formatting, say how image A looks different "
        "from image B."
    ),
    # Class pairs (the comparatives stage): the paper's question about two classes, each described by the zero-shot
    # prompt "a photo of a {class}"; caption_a and caption_b are the class names.
    "class-v1": (
        "What is the visual difference between an image with a description of a photo of a {caption_a} and "
        "an image with a description of a photo of a {caption_b}?"
    ),
}

CLASS_PROMPTS = ("class-v1",)
"""The versions written for class names rather than captions: the ones ``comparatives.prompt_version`` may name."""


def build_prompt(version: str, caption_a: str, caption_b: str) -> str:
    """The prompt asking how image a (``caption_a``) differs from image b. Raises KeyError for an unknown version."""
    try:
        template = PROMPTS[version]
    except KeyError:
        raise KeyError(f"unknown prompt version {version!r}; known: {sorted(PROMPTS)}") from None
    return template.format(caption_a=caption_a, caption_b=caption_b)


# ------------------------------------------------------------------------------------------------ chat templates
def uses_chat_template(tokenizer: Any, mode: str, system_prompt: str | None) -> bool:
    """Whether prompts go through ``tokenizer``'s chat template under ``llm.chat_template`` = ``mode``.

    auto: when the tokenizer has a template (instruct/chat models); always / never: as said. Checked once, when an
    engine is built. Raises ValueError for ``always`` with a tokenizer that has no template, and for a
    ``system_prompt`` that would be dropped because no template is used (a system message only exists in a chat).
    """
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"llm.chat_template must be auto, always or never, not {mode!r}")
    if mode == "always" and not has:
        raise ValueError("llm.chat_template=always but the tokenizer has no chat template")
    use = mode == "always" or (mode == "auto" and has)
    if system_prompt is not None and not use:
        raise ValueError(
            f"llm.system_prompt is set but no chat template is applied (llm.chat_template={mode}, "
            f"tokenizer {'has' if has else 'has no'} template)"
        )
    return use


def chat_prompt(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> str:
    """``prompt`` as the user turn of a chat (after an optional system turn), rendered by the tokenizer's template
    and ending where the assistant's answer starts. The result already holds the template's special tokens
    (BOS included where the template writes one): encode it with ``add_special_tokens=False``."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
