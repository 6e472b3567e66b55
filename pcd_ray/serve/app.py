"""Ray Serve app: a pcd-ray export behind the v1 JSON API (``api.py``), batched and optionally autoscaled.

    serve run serve/local.yaml                    # Serve's CLI; import_path -> build_app
    serve deploy serve/gpu.yaml                   # a cluster: GPU replicas, autoscaling
    pcd-ray serve --config local                  # the same app through run_serve()

Every replica loads the model once (``ModelRunner``: an export, s3:// included, or an open_clip name; safetensors
only, no pickle) on its GPU when Ray gave it one. Model calls are batched across concurrent requests with
``@serve.batch``, texts and images in separate queues; repeated texts (labels, attributes) come from an LRU cache.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator
from ray import serve

from pcd_ray.config import JobConfig, ModelSpec, ServeConfig, StorageConfig, apply_overrides, load_job, validate
from pcd_ray.runtime import init_ray
from pcd_ray.serve.schemas import MAX_ITEMS, MAX_LABELS, MAX_TEXT_CHARS, ModelInfo
from pcd_ray.storage import Storage

APP_NAME = "pcd"
DEPLOYMENT_NAME = "PCDModelServer"


class AuthConfigError(RuntimeError):
    """auth_token_env names a variable that is unset or empty in the replica's environment."""


def read_token(env_name: str | None) -> str | None:
    """The bearer token from ``env_name``, None when auth is off. Raises AuthConfigError if it is unset or empty:
    a server configured for auth must not silently start open."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise AuthConfigError(
            f"serve.auth_token_env is {env_name!r} but that environment variable is unset or empty in the replica"
        )
    return token


# ------------------------------------------------------------------------------------------------- deployment
@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class PCDModelServer:
    """One replica: the model, the batch queues, the text cache, and the FastAPI app built around them."""

    def __init__(self, cfg: ServeConfig, storage_cfg: StorageConfig):
        from pcd_ray.serve.runner import ModelRunner, TextCache, pick_device

        self.cfg = cfg
        self.token = read_token(cfg.auth_token_env)
        self.runner = ModelRunner(cfg.model, Storage(storage_cfg), device=pick_device())
        self.cache = TextCache(cfg.text_cache_size)
        self.source, self.embed_dim = self.runner.public_name, self.runner.embed_dim
        self.max_image_pixels = cfg.max_image_pixels
        for queue in (self._text_batch, self._image_batch):
            queue.set_max_batch_size(cfg.max_batch_size)
            queue.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        from pcd_ray.serve.api import create_api

        return create_api(self, max_request_bytes=self.cfg.max_request_bytes, token=self.token)

    def preprocess(self, image: Any) -> Any:
        return self.runner.preprocess(image)

    # Batched entry points take one item per call; Serve gathers concurrent calls (from any request) into one
    # list. A worker thread runs torch so the event loop keeps accepting requests that fill the next batch.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        # Copies: a cached row must not keep its whole batch's array alive.
        return [row.copy() for row in await asyncio.to_thread(self.runner.encode_texts, texts)]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _image_batch(self, pixels: list[Any]) -> list[np.ndarray]:
        return list(await asyncio.to_thread(self.runner.encode_images, pixels))

    async def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [n, D]: cached ones from the cache, the rest through the model (batched unless disabled)."""
        found = {t: e for t in dict.fromkeys(texts) if (e := self.cache.get(t)) is not None}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        if missing:
            if self.cfg.batching:
                computed = await asyncio.gather(*(self._text_batch(t) for t in missing))
            else:
                computed = [row.copy() for row in await asyncio.to_thread(self.runner.encode_texts, missing)]
            for t, e in zip(missing, computed):
                self.cache.put(t, e)
                found[t] = e
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.embed_dim), np.float32)

    async def embed_images(self, pixels: Sequence[Any]) -> np.ndarray:
        if not pixels:
            return np.zeros((0, self.embed_dim), np.float32)
        if self.cfg.batching:
            return np.stack(await asyncio.gather(*(self._image_batch(p) for p in pixels)))
        return await asyncio.to_thread(self.runner.encode_images, pixels)

    def info(self) -> ModelInfo:
        detail = (
            {"source": self.runner.loaded.source, "meta": self.runner.loaded.meta} if self.token is not None else None
        )
        return ModelInfo(
            name=self.source,
            weights_id=self.runner.weights_id,
            provenance=self.runner.provenance(),
            embed_dim=self.embed_dim,
            device=self.runner.device,
            batching=self.cfg.batching,
            model_cfg=self.runner.loaded.model_cfg,
            detail=detail,
            limits={
                "max_request_bytes": self.cfg.max_request_bytes,
                "max_image_pixels": self.max_image_pixels,
                "max_items": MAX_ITEMS,
                "max_labels": MAX_LABELS,
                "max_text_chars": MAX_TEXT_CHARS,
            },
            text_cache={
                "capacity": self.cache.size,
                "entries": len(self.cache),
                "hits": self.cache.hits,
                "misses": self.cache.misses,
            },
        )


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
    def _something_to_serve(self) -> AppArgs:
        if self.config is None and self.checkpoint is None:
            raise ValueError("give 'config' (a job file or name) and/or 'checkpoint' (an export URI)")
        return self


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options from a serve config (a Serve YAML's ``deployments:`` entry overrides them)."""
    actor: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        actor["num_gpus"] = cfg.gpus_per_replica
    if cfg.auth_token_env and os.environ.get(cfg.auth_token_env):
        # The replica reads the token from its environment; a cluster sets it for every node, a local driver
        # passes on its own value.
        actor["runtime_env"] = {"env_vars": {cfg.auth_token_env: os.environ[cfg.auth_token_env]}}
    options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": cfg.max_ongoing_requests}
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def bind_app(cfg: ServeConfig, storage_cfg: StorageConfig) -> serve.Application:
    """The deployment bound to a serve config."""
    return PCDModelServer.options(**deployment_options(cfg)).bind(cfg, storage_cfg)


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
    return bind_app(job.serve, Storage(job.storage).portable_cfg())


def run_serve(
    job: JobConfig, storage: Storage, *, blocking: bool = True, name: str = APP_NAME, route_prefix: str = "/"
) -> str:
    """Start Serve on the job's Ray (host/port from job.serve) and deploy the app; returns the base URL.

    With ``blocking`` it then waits until Ctrl-C (and re-raises KeyboardInterrupt), as ``serve run`` does.
    """
    init_ray(job.ray)
    cfg = job.serve
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(bind_app(cfg, storage.portable_cfg()), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://{cfg.host}:{cfg.port}{route_prefix.rstrip('/')}"
    auth = f' -H "authorization: Bearer ${cfg.auth_token_env}"' if cfg.auth_token_env else ""
    print(
        f"pcd-ray serving {storage.resolve(cfg.model.checkpoint) if cfg.model.checkpoint else cfg.model.name} "
        f"at {url} (API docs: {url}/docs)\n  curl -s {url}/v1/embed -H 'content-type: application/json'{auth} "
        f'-d \'{{"texts": ["a red circle"]}}\'',
        flush=True,
    )
    while blocking:  # Serve runs in Ray's processes; this driver only has to stay alive until Ctrl-C
        time.sleep(3600)
    return url
