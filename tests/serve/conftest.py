"""Fixtures shared by the serve tests: a finetuned pcd-micro export, and one Serve app over real HTTP.

Serve takes 12-14 s to be ready, so every HTTP test in this package shares one app (with auth on and small limits).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from serve_helpers import MAX_BYTES, MAX_PIXELS, TOKEN, TOKEN_ENV, free_port, no_5xx, train_micro_export

from pcd_ray.config import JobConfig, ModelSpec, ServeConfig, StorageConfig


@pytest.fixture(scope="package")
def finetuned(tmp_path_factory):
    """(storage, export URI) of the finetuned pcd-micro."""
    from pcd_ray.storage import Storage

    storage = Storage(StorageConfig(root=str(tmp_path_factory.mktemp("serve"))))
    return SimpleNamespace(storage=storage, uri=train_micro_export(storage, "export"))


@pytest.fixture(scope="package")
def server(ray_local, finetuned):
    """The finetuned export served through run_serve with auth on and small limits; the same export loaded here.

    ``client`` sends the token and fails any test that sees a 5xx; ``anon`` sends no token.
    """
    import httpx
    from ray import serve

    from pcd_ray.model.factory import load_model
    from pcd_ray.serve.app import run_serve

    os.environ[TOKEN_ENV] = TOKEN  # passed to the replica through its runtime_env (deployment_options)
    job = JobConfig(
        storage=finetuned.storage.cfg,
        serve=ServeConfig(
            model=ModelSpec(checkpoint="export"),
            port=free_port(),
            max_request_bytes=MAX_BYTES,
            max_image_pixels=MAX_PIXELS,
            auth_token_env=TOKEN_ENV,
            max_batch_size=16,
            batch_wait_timeout_s=0.005,
        ),
    )
    url = run_serve(job, finetuned.storage, blocking=False)
    direct = load_model(ModelSpec(checkpoint=finetuned.uri))
    direct.model.eval()
    hooks = {"response": [no_5xx]}
    client = httpx.Client(base_url=url, timeout=60, event_hooks=hooks, headers={"authorization": f"Bearer {TOKEN}"})
    anon = httpx.Client(base_url=url, timeout=60, event_hooks=hooks)
    try:
        yield SimpleNamespace(url=url, uri=finetuned.uri, client=client, anon=anon, direct=direct)
    finally:
        client.close()
        anon.close()
        serve.shutdown()
        os.environ.pop(TOKEN_ENV, None)
