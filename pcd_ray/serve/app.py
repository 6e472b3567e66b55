"""Ray Serve app: a pcd-ray export behind a small JSON API (FastAPI ingress).

    serve run serve/local.yaml                    # Serve's CLI; import_path -> build_app
    pcd-ray serve --config local                  # the same through run_serve()

Endpoints (bodies in ``schemas.py``): POST /embed, POST /difference, GET /model, GET /healthz.
Every replica loads the model once (``load_model``: an export, s3:// included, or an open_clip name) and answers
with ``torch.inference_mode``. Bad input is a 4xx that names the field, never a 500: oversize body -> 413, bad
base64 -> 400, undecodable or oversize image -> 422, schema errors -> 422 in FastAPI's format.

Encoding lives in plain helpers (``LoadedModel.encode_texts``, ``encode_images``) that the deployment calls
through its ``embed_texts`` / ``embed_images`` methods, the seam where request batching plugs in.
"""

import asyncio
import base64
import binascii
import json
import time
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from ray import serve

from pcd_ray.config import JobConfig, ModelSpec, ServeConfig, StorageConfig, apply_overrides, load_job, validate
from pcd_ray.data.images import ImageDecodeError, decode_image
from pcd_ray.model.factory import LoadedModel, load_model
from pcd_ray.runtime import init_ray
from pcd_ray.serve.schemas import (MAX_ITEMS, MAX_TEXT_CHARS, DifferenceRequest, DifferenceResponse, EmbedRequest,
                                   EmbedResponse, ErrorResponse, ModelInfo)
from pcd_ray.storage import Storage

APP_NAME = "pcd"

# Routes are declared here and bound to PCDModelServer methods by @serve.ingress; nothing runs until a replica starts.
app = FastAPI(title="pcd-ray", description="PC-CLIP embeddings and pairwise-difference scoring")


class APIError(Exception):
    """A client error rendered as ErrorResponse with this HTTP status."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=exc.error, detail=exc.detail).model_dump(), status_code=exc.status)


# --------------------------------------------------------------------------------------------- request parsing
async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes. Raises APIError(413) on a larger Content-Length or body."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, "request_too_large", f"request body is {declared} bytes, over the limit of {limit}")
    # Content-Length can be absent (chunked) or wrong: count what actually arrives and stop at the limit.
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, "request_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(body: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes -> ``model``. Raises RequestValidationError, which FastAPI renders as its usual 422."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        # No input echo: a failing field may hold megabytes of base64.
        errors = json.loads(e.json(include_url=False, include_input=False))
        raise RequestValidationError([{**err, "loc": ["body", *err["loc"]]} for err in errors]) from None


def decode_base64(text: str, field: str) -> bytes:
    """Base64 (optionally a ``data:...;base64,`` URL, line breaks allowed) -> bytes. APIError(400) naming ``field``."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, "invalid_base64", f"{field}: not valid base64 ({e})") from None


def prepare_image(text: str, field: str, preprocess, max_pixels: int):
    """Base64 image -> model input [3, H, W] float tensor. APIError 400 (base64) or 422 (image) naming ``field``.

    Decoding and resizing happen per image so a request holds at most one full-size decoded image at a time.
    """
    try:
        return preprocess(decode_image(decode_base64(text, field), max_pixels=max_pixels))
    except ImageDecodeError as e:
        raise APIError(422, "invalid_image", f"{field}: {e}") from None


# ------------------------------------------------------------------------------------------------ model helpers
def encode_images(loaded: LoadedModel, pixels: Sequence[Any]) -> np.ndarray:
    """Preprocessed images ([3, H, W] tensors) -> L2-normalised image embeddings, float32 [n, D]."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        return F.normalize(loaded.model.encode_image(torch.stack(list(pixels))).float(), dim=-1).numpy()


def difference_scores(text_emb: np.ndarray, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """cos(t_k, normalise(a - b)) for normalised text [n, D] and image [D] embeddings -> [n].

    Identical images give d = 0 and scores 0 (the eps keeps NaN out of the JSON).
    """
    d = emb_a - emb_b
    d = d / max(float(np.linalg.norm(d)), 1e-12)
    return text_emb @ d


# ------------------------------------------------------------------------------------------------- deployment
@serve.deployment
@serve.ingress(app)
class PCDModelServer:
    """One replica: the model in eval mode, plus the request limits it enforces."""

    def __init__(self, spec: ModelSpec, storage_cfg: StorageConfig, *, max_request_bytes: int,
                 max_image_pixels: int):
        self.loaded = load_model(spec, Storage(storage_cfg))
        self.loaded.model.eval()
        self.max_request_bytes = max_request_bytes
        self.max_image_pixels = max_image_pixels

    async def embed_texts(self, texts: list[str]) -> np.ndarray:
        # A worker thread keeps the replica's event loop free for /healthz and body reads while torch computes.
        return await asyncio.to_thread(self.loaded.encode_texts, texts, normalize=True)

    async def embed_images(self, pixels: list[Any]) -> np.ndarray:
        return await asyncio.to_thread(encode_images, self.loaded, pixels)

    async def _prepare_images(self, named: list[tuple[str, str]]) -> list[Any]:
        """[(field, base64)] -> preprocessed tensors, decoded off the event loop."""
        preprocess, limit = self.loaded.preprocess, self.max_image_pixels
        return await asyncio.to_thread(lambda: [prepare_image(t, f, preprocess, limit) for f, t in named])

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model", response_model=ModelInfo)
    async def model_info(self) -> ModelInfo:
        return ModelInfo(source=self.loaded.source, embed_dim=self.loaded.embed_dim, model_cfg=self.loaded.model_cfg,
                         meta=self.loaded.meta,
                         limits={"max_request_bytes": self.max_request_bytes,
                                 "max_image_pixels": self.max_image_pixels,
                                 "max_items": MAX_ITEMS, "max_text_chars": MAX_TEXT_CHARS})

    @app.post("/embed", response_model=EmbedResponse, responses={400: {"model": ErrorResponse},
                                                                 413: {"model": ErrorResponse}})
    async def embed(self, request: Request) -> EmbedResponse:
        req: EmbedRequest = parse_body(await read_body(request, self.max_request_bytes), EmbedRequest)
        pixels = await self._prepare_images([(f"images[{i}]", t) for i, t in enumerate(req.images or [])])
        out = EmbedResponse(model=self.loaded.source, dim=self.loaded.embed_dim)
        if req.texts:
            out.text_embeddings = (await self.embed_texts(req.texts)).tolist()
        if pixels:
            out.image_embeddings = (await self.embed_images(pixels)).tolist()
        return out

    @app.post("/difference", response_model=DifferenceResponse, responses={400: {"model": ErrorResponse},
                                                                           413: {"model": ErrorResponse}})
    async def difference(self, request: Request) -> DifferenceResponse:
        req: DifferenceRequest = parse_body(await read_body(request, self.max_request_bytes), DifferenceRequest)
        pixels = await self._prepare_images([("image_a", req.image_a), ("image_b", req.image_b)])
        emb_a, emb_b = await self.embed_images(pixels)
        scores = difference_scores(await self.embed_texts(req.texts), emb_a, emb_b)
        best = int(np.argmax(scores))
        return DifferenceResponse(model=self.loaded.source, scores=scores.tolist(), best_index=best,
                                  best_text=req.texts[best])


# ------------------------------------------------------------------------------------------- building, running
class AppArgs(BaseModel):
    """``args`` of the Serve YAML: a job config (name or path) with overrides, and/or an export URI to serve."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = None
    """Job file path or shipped job name (``local``); its ``serve`` and ``storage`` sections are used."""
    overrides: list[str] = []
    """``a.b=value`` overrides applied to the job config (``serve.num_replicas=2``)."""
    checkpoint: str | None = None
    """Export URI to serve instead of the config's serve.model (relative URIs resolve against storage.root)."""

    @model_validator(mode="after")
    def _something_to_serve(self) -> "AppArgs":
        if self.config is None and self.checkpoint is None:
            raise ValueError("give 'config' (a job file or name) and/or 'checkpoint' (an export URI)")
        return self


def bind_app(cfg: ServeConfig, storage_cfg: StorageConfig) -> serve.Application:
    """The deployment bound to a serve config: replicas, CPUs and limits from ``cfg``."""
    return PCDModelServer.options(
        num_replicas=cfg.num_replicas, ray_actor_options={"num_cpus": cfg.cpus_per_replica},
    ).bind(cfg.model, storage_cfg, max_request_bytes=cfg.max_request_bytes, max_image_pixels=cfg.max_image_pixels)


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """Application builder for ``import_path: pcd_ray.serve.app:build_app``.

    ``args``: {"config": NAME_OR_PATH, "overrides": [...]} and/or {"checkpoint": EXPORT_URI}. Raises
    pydantic.ValidationError for bad args and ConfigError for a bad job file or override.
    """
    args = AppArgs.model_validate(args) if isinstance(args, dict) else args
    if args.config:
        job = load_job(args.config, args.overrides)
    else:  # an export alone: defaults for everything else, no job file needed where the app is built
        job = validate(JobConfig, apply_overrides({}, args.overrides), f"serve args overrides {args.overrides}")
    if args.checkpoint:
        job.serve.model = ModelSpec(checkpoint=args.checkpoint)
    return bind_app(job.serve, job.storage)


def run_serve(job: JobConfig, storage: Storage, *, blocking: bool = True) -> str:
    """Start Serve on the job's Ray (host/port from job.serve) and deploy the app; returns the base URL.

    With ``blocking`` it then waits until Ctrl-C (and re-raises KeyboardInterrupt), as ``serve run`` does.
    """
    init_ray(job.ray)
    cfg = job.serve
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(bind_app(cfg, storage.portable_cfg()), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"pcd-ray serving {storage.resolve(cfg.model.checkpoint) if cfg.model.checkpoint else cfg.model.name} "
          f"at {url}\n  curl -s {url}/embed -H 'content-type: application/json' -d '{{\"texts\": [\"a red circle\"]}}'",
          flush=True)
    while blocking:  # Serve runs in Ray's processes; this driver only has to stay alive until Ctrl-C
        time.sleep(3600)
    return url
