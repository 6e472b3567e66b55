"""HTTP request and response bodies of the pcd-ray model server (``app.py``).

Every body is a strict pydantic model (``extra="forbid"``): a misspelled field is a 422 naming it, not a silently
ignored key. List lengths are bounded so one request cannot ask a replica for unbounded work; the byte size of a
request is bounded separately by ``serve.max_request_bytes`` (413) and each image by ``serve.max_image_pixels``.

Images travel as base64 strings of encoded image bytes (PNG, JPEG, ...); a ``data:image/...;base64,`` prefix is
accepted. Embeddings are L2-normalised float lists of length ``dim``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_ITEMS = 256
"""Most texts or images in one request."""
MAX_TEXT_CHARS = 2000
"""Longest accepted text; the tokenizer truncates far earlier (77 tokens), this only bounds tokenizer work."""

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Base64Image = Annotated[str, StringConstraints(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Body):
    """Texts and/or images to embed; at least one non-empty list."""

    texts: list[Text] | None = Field(None, max_length=MAX_ITEMS)
    """Texts to embed with the text tower f."""
    images: list[Base64Image] | None = Field(None, max_length=MAX_ITEMS)
    """Base64-encoded image bytes to embed with the image tower g."""

    @model_validator(mode="after")
    def _something_to_embed(self) -> "EmbedRequest":
        if not self.texts and not self.images:
            raise ValueError("nothing to embed: give a non-empty 'texts' and/or 'images' list")
        return self


class EmbedResponse(_Body):
    model: str
    """Where the served weights came from (LoadedModel.source)."""
    dim: int
    """Embedding dimension D."""
    text_embeddings: list[list[float]] = Field(default_factory=list)
    """[len(texts), D], L2-normalised, in request order; empty when no texts were sent."""
    image_embeddings: list[list[float]] = Field(default_factory=list)
    """[len(images), D], L2-normalised, in request order; empty when no images were sent."""


class DifferenceRequest(_Body):
    """Which candidate text best describes how image A differs from image B (the order matters)."""

    image_a: Base64Image
    image_b: Base64Image
    texts: list[Text] = Field(..., min_length=1, max_length=MAX_ITEMS)
    """Candidate difference sentences ("The first image shows a larger animal ...")."""


class DifferenceResponse(_Body):
    model: str
    scores: list[float]
    """cos(f(text_k), d) per text, d = normalise(g(a)/|g(a)| - g(b)/|g(b)|) (PAPER.md section 4); in [-1, 1].
    All 0 when the two images embed identically (d is the zero vector)."""
    best_index: int
    """argmax of scores (the first one on ties)."""
    best_text: str


class ModelInfo(_Body):
    """GET /model: what this replica serves and the limits it enforces."""

    source: str
    embed_dim: int
    model_cfg: dict[str, Any]
    """open_clip model config (embed_dim, vision_cfg, text_cfg)."""
    meta: dict[str, Any]
    """pcd_ray.json of the export (base model, run, step); empty for a non-export model."""
    limits: dict[str, int]
    """max_request_bytes, max_image_pixels, max_items, max_text_chars."""


class ErrorResponse(_Body):
    """Body of every 4xx this server produces itself (schema errors keep FastAPI's {"detail": [...]} format)."""

    error: str
    """Short machine-readable code: request_too_large, invalid_base64, invalid_image, ..."""
    detail: str
    """Human-readable message naming the offending field (``images[3]``, ``image_b``)."""
