"""The FastAPI app of the model API (OpenAPI schema at /openapi.json, docs at /docs).

    POST /v1/embed        texts and/or images -> unit embeddings
    POST /v1/difference   two images + candidate difference texts -> scores, best match
    POST /v1/rank         images + an attribute ("larger") -> images ordered along it, with scores
    POST /v1/classify     image + labels (+ comparatives, alpha) -> comparative-prompted prediction and scores
    GET  /v1/model        model name, export id, embedding dim, limits
    GET  /healthz         liveness (never needs a token)

:func:`create_api` builds the app around a :class:`ModelBackend` (the Serve deployment in ``app.py``, which
batches model calls across requests); the routes only parse, call the backend and score (``scoring.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request

from pcd_ray.serve import scoring
from pcd_ray.serve.http import BodyLimit, check_bearer, install_error_handlers, openapi_errors, prepare_image
from pcd_ray.serve.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    DifferenceRequest,
    DifferenceResponse,
    EmbedRequest,
    EmbedResponse,
    ModelInfo,
    RankRequest,
    RankResponse,
)


class ModelBackend(Protocol):
    """What the routes need from a replica. Embeddings are float32 [n, D] with unit rows."""

    source: str
    """The model every response names (ModelInfo.name)."""
    embed_dim: int
    max_image_pixels: int

    def preprocess(self, image: Any) -> Any: ...

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    async def embed_images(self, pixels: Sequence[Any]) -> np.ndarray: ...

    def info(self) -> ModelInfo: ...


async def _images(backend: ModelBackend, named: list[tuple[str, str]]) -> np.ndarray:
    """[(field, base64)] -> image embeddings; decoding runs in a worker thread, off the replica's event loop."""
    limit = backend.max_image_pixels
    pixels = await asyncio.to_thread(lambda: [prepare_image(t, f, backend.preprocess, limit) for f, t in named])
    return await backend.embed_images(pixels)


def create_api(backend: ModelBackend, *, max_request_bytes: int, token: str | None = None) -> FastAPI:
    """The app for one replica. ``token``: when set, every /v1 route requires ``Authorization: Bearer <token>``."""
    app = FastAPI(
        title="pcd-ray",
        version="1",
        description="PC-CLIP: embeddings, and scoring, ranking and classification by described "
        "differences between images.",
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=max_request_bytes)

    def require_token(request: Request) -> None:
        check_bearer(request, token)

    errors = (400, 401, 413) if token else (400, 413)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_token)] if token else [])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @v1.get("/model", response_model=ModelInfo, responses=openapi_errors(*((401,) if token else ())))
    async def model_info() -> ModelInfo:
        return backend.info()

    @v1.post("/embed", response_model=EmbedResponse, responses=openapi_errors(*errors))
    async def embed(req: EmbedRequest) -> EmbedResponse:
        out = EmbedResponse(model=backend.source, dim=backend.embed_dim)
        texts = req.texts or []
        images = [(f"images[{i}]", t) for i, t in enumerate(req.images or [])]
        # Images are decoded first: a bad image fails the request before any model work is queued.
        if images:
            out.image_embeddings = (await _images(backend, images)).tolist()
        if texts:
            out.text_embeddings = (await backend.embed_texts(texts)).tolist()
        return out

    @v1.post("/difference", response_model=DifferenceResponse, responses=openapi_errors(*errors))
    async def difference(req: DifferenceRequest) -> DifferenceResponse:
        emb_a, emb_b = await _images(backend, [("image_a", req.image_a), ("image_b", req.image_b)])
        scores = scoring.difference_scores(await backend.embed_texts(req.texts), emb_a, emb_b)
        best = int(np.argmax(scores))
        return DifferenceResponse(
            model=backend.source, scores=scores.tolist(), best_index=best, best_text=req.texts[best]
        )

    @v1.post("/rank", response_model=RankResponse, responses=openapi_errors(*errors))
    async def rank(req: RankRequest) -> RankResponse:
        image_emb = await _images(backend, [(f"images[{i}]", t) for i, t in enumerate(req.images)])
        # str.replace, not str.format: a user template with other braces must not become a server error.
        text = req.template.replace("{attribute}", req.attribute)
        (text_emb,) = await backend.embed_texts([text])
        order, scores = scoring.rank_scores(text_emb, image_emb)
        return RankResponse(model=backend.source, text=text, order=order.tolist(), scores=scores.tolist())

    @v1.post("/classify", response_model=ClassifyResponse, responses=openapi_errors(*errors))
    async def classify(req: ClassifyRequest) -> ClassifyResponse:
        (image_emb,) = await _images(backend, [("image", req.image)])
        prompts = [req.template.replace("{label}", label) for label in req.labels]
        index = {label: k for k, label in enumerate(req.labels)}
        pairs = [(index[c.first], index[c.second]) for c in req.comparatives]
        emb = await backend.embed_texts(prompts + [c.text for c in req.comparatives])
        class_emb, comp_emb = emb[: len(prompts)], emb[len(prompts) :]
        plain = scoring.classify_scores(image_emb, class_emb)
        h = scoring.comparative_class_embeddings(class_emb, pairs, comp_emb, req.alpha) if pairs else class_emb
        scores = scoring.classify_scores(image_emb, h)
        best = int(np.argmax(scores))
        return ClassifyResponse(
            model=backend.source,
            label=req.labels[best],
            index=best,
            scores=scores.tolist(),
            zero_shot_scores=plain.tolist(),
        )

    app.include_router(v1)
    return app
