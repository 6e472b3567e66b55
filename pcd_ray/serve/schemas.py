"""HTTP request and response bodies of the pcd-ray model API (``api.py``), version 1.

Every body is a strict pydantic model (``extra="forbid"``): a misspelled field is a 422 naming it, not a silently
ignored key. List lengths and string lengths are bounded so one request cannot ask a replica for unbounded work;
the byte size of a request is bounded separately by ``serve.max_request_bytes`` (413) and each image by
``serve.max_image_pixels`` (422).

Images travel as base64 strings of encoded image bytes (PNG, JPEG, ...); a ``data:image/...;base64,`` prefix is
accepted. Embeddings are L2-normalised float lists of length ``dim``.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_ITEMS = 256
"""Most texts or images in one request."""
MAX_LABELS = 128
"""Most labels (and most comparatives) in one /v1/classify request."""
MAX_TEXT_CHARS = 2000
"""Longest accepted text; the tokenizer truncates far earlier (77 tokens), this only bounds tokenizer work."""

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
NonEmptyText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS)]
Base64Image = Annotated[str, StringConstraints(min_length=1)]

DEFAULT_RANK_TEMPLATE = "The first image shows {attribute} objects than the second image."
"""How /v1/rank turns an attribute ("larger") into a difference sentence; ``{attribute}`` alone uses it verbatim."""
DEFAULT_LABEL_TEMPLATE = "This is a photo of a {label}"
"""The paper's zero-shot template."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_placeholder(template: str, name: str) -> None:
    if "{" + name + "}" not in template:
        raise ValueError(f"template must contain the placeholder {{{name}}}, got {template!r}")


# ------------------------------------------------------------------------------------------------------ embed
class EmbedRequest(_Body):
    """Texts and/or images to embed; at least one non-empty list."""

    texts: list[Text] | None = Field(None, max_length=MAX_ITEMS)
    """Texts to embed with the text tower f."""
    images: list[Base64Image] | None = Field(None, max_length=MAX_ITEMS)
    """Base64-encoded image bytes to embed with the image tower g."""

    @model_validator(mode="after")
    def _something_to_embed(self) -> EmbedRequest:
        if not self.texts and not self.images:
            raise ValueError("nothing to embed: give a non-empty 'texts' and/or 'images' list")
        return self


class EmbedResponse(_Body):
    model: str
    """The served model: ``name@weights_id`` as in GET /v1/model, never a server path."""
    dim: int
    """Embedding dimension D."""
    text_embeddings: list[list[float]] = Field(default_factory=list)
    """[len(texts), D], L2-normalised, in request order; empty when no texts were sent."""
    image_embeddings: list[list[float]] = Field(default_factory=list)
    """[len(images), D], L2-normalised, in request order; empty when no images were sent."""


# ------------------------------------------------------------------------------------------------- difference
class DifferenceRequest(_Body):
    """Which candidate text best describes how image A differs from image B (the order matters)."""

    image_a: Base64Image
    image_b: Base64Image
    texts: list[Text] = Field(..., min_length=1, max_length=MAX_ITEMS)
    """Candidate difference sentences ("The first image shows a larger animal ...")."""


class DifferenceResponse(_Body):
    model: str
    scores: list[float]
    """cos(f(text_k), d) per text, d = normalise(g(a)/|g(a)| - g(b)/|g(b)|) (docs/METHOD.md, "Loss"); in [-1, 1].
    All 0 when the two images embed identically (d is the zero vector)."""
    best_index: int
    """argmax of scores (the first one on ties)."""
    best_text: str


# ------------------------------------------------------------------------------------------------------- rank
class RankRequest(_Body):
    """Order images along a described attribute ("larger": the largest first)."""

    images: list[Base64Image] = Field(..., min_length=2, max_length=MAX_ITEMS)
    attribute: NonEmptyText
    """A comparative ("larger", "brighter", "more"), or a whole sentence with ``template`` = "{attribute}"."""
    template: NonEmptyText = DEFAULT_RANK_TEMPLATE
    """Difference sentence "image 1 has more of it than image 2" with an ``{attribute}`` placeholder."""

    @model_validator(mode="after")
    def _template_has_placeholder(self) -> RankRequest:
        _check_placeholder(self.template, "attribute")
        return self


class RankResponse(_Body):
    model: str
    text: str
    """The difference sentence the images were ranked by (template with the attribute filled in)."""
    order: list[int]
    """Image indices from most to least of the attribute (ties keep request order)."""
    scores: list[float]
    """Per image, in request order: mean over the other images j of f(text) . (e_i - e_j) with unit text and image
    embeddings; > 0 means "more of the attribute than the average image". Ordering by it agrees with the pairwise
    difference test cos(f(text), normalise(e_i - e_j)) > 0 for every pair."""


# --------------------------------------------------------------------------------------------------- classify
class Comparative(_Body):
    """How class ``first`` differs from class ``second`` (docs/METHOD.md, "Evaluation": comparative prompting)."""

    first: NonEmptyText
    second: NonEmptyText
    text: NonEmptyText
    """E.g. "The first image shows a bigger animal with a longer tail than the second image"."""


class ClassifyRequest(_Body):
    """Zero-shot classification of one image, optionally with comparative prompts."""

    image: Base64Image
    labels: list[NonEmptyText] = Field(..., min_length=2, max_length=MAX_LABELS)
    """Class names; each must be unique."""
    template: NonEmptyText = DEFAULT_LABEL_TEMPLATE
    """Class prompt with a ``{label}`` placeholder."""
    comparatives: list[Comparative] = Field(default_factory=list, max_length=MAX_LABELS)
    """Differences between pairs of the labels (one per ordered pair); classes named as ``second`` get comparative
    prompts."""
    alpha: float = Field(0.85, ge=0.0, le=1.0)
    """Weight of the class's own prompt against its comparatives (the paper uses 0.8-0.9)."""

    @model_validator(mode="after")
    def _consistent(self) -> ClassifyRequest:
        _check_placeholder(self.template, "label")
        dupes = sorted(label for label, n in Counter(self.labels).items() if n > 1)
        seen = set(self.labels)
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {dupes}")
        for k, c in enumerate(self.comparatives):
            unknown = [x for x in (c.first, c.second) if x not in seen]
            if unknown:
                raise ValueError(f"comparatives[{k}] names {unknown}, which are not in labels")
            if c.first == c.second:
                raise ValueError(f"comparatives[{k}] compares {c.first!r} with itself")
        pairs = Counter((c.first, c.second) for c in self.comparatives)
        repeated = sorted(pair for pair, n in pairs.items() if n > 1)
        if repeated:
            raise ValueError(f"each (first, second) pair may have one comparative; repeated: {repeated}")
        return self


class ClassifyResponse(_Body):
    model: str
    label: str
    """The predicted label: argmax of ``scores``."""
    index: int
    scores: list[float]
    """cos(g(x), h_c) per label in request order, h_c the comparative-prompted class embedding (= the plain one for
    classes without comparatives)."""
    zero_shot_scores: list[float]
    """cos(g(x), t_c) with the plain class prompts, for comparison."""


# ------------------------------------------------------------------------------------------------- model, errors
class ModelInfo(_Body):
    """GET /v1/model: what this replica serves and the limits it enforces."""

    name: str
    """What every response's ``model`` names: the export's last two path components (``train/export``) or the
    open_clip name and tag, then ``@`` and the weights id."""
    weights_id: str
    """For an export, the first 16 hex digits of its weights file's sha256: the commit id pcd-ray's provenance
    records for it. For a model loaded by name, the sha256 of its tensors (names, dtypes, shapes, bytes)."""
    provenance: dict[str, Any]
    """What the export was made from: ``stage``, ``made`` (UTC) and ``inputs`` (name -> kind and commit id); empty
    for a model loaded by name."""
    embed_dim: int
    device: str
    batching: bool
    model_cfg: dict[str, Any]
    """open_clip model config (embed_dim, vision_cfg, text_cfg)."""
    detail: dict[str, Any] | None = None
    """Only when auth is on (so only for a caller with the token): ``source`` (where the weights were loaded
    from), ``meta`` (the export's pcd_ray.json: the training config and the provenance with input URIs). None when
    auth is off, so an open server reveals no paths or configs."""
    limits: dict[str, int]
    """max_request_bytes, max_image_pixels, max_items, max_labels, max_text_chars."""
    text_cache: dict[str, int]
    """This replica's text-embedding cache: capacity, entries, hits, misses."""


class ErrorResponse(_Body):
    """Body of every 4xx this server produces itself (schema errors keep FastAPI's {"detail": [...]} format)."""

    error: str
    """Short machine-readable code: request_too_large, invalid_base64, invalid_image, unauthorized, ..."""
    detail: str
    """Human-readable message naming the offending field (``images[3]``, ``image_b``)."""
