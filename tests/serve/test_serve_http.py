"""The Serve app over real HTTP: a pcd-micro export served by Ray Serve on 127.0.0.1, queried with httpx.

Embeddings and difference scores must equal what the same export computes directly in this process; bad input
must be a 4xx naming the field, never a 5xx. The fast tests at the top (schemas, the Serve YAML, the application
builder) start nothing.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import free_port
from pydantic import ValidationError

from pcd_ray.config import JobConfig, ModelSpec, ServeConfig, StorageConfig, load_job
from pcd_ray.serve.schemas import MAX_ITEMS, DifferenceRequest, EmbedRequest

REPO = Path(__file__).resolve().parents[2]
MAX_BYTES = 64 * 1024  # small enough to exceed cheaply, large enough for the test images
MAX_PIXELS = 64 * 64


# ------------------------------------------------------------------------------------------ fast: no Serve
def test_request_schemas_validate():
    assert EmbedRequest(texts=["a"]).images is None
    for bad in ({}, {"texts": [], "images": []}, {"texts": ["a"] * (MAX_ITEMS + 1)}, {"texts": ["a"], "txt": 1}):
        with pytest.raises(ValidationError):
            EmbedRequest.model_validate(bad)
    with pytest.raises(ValidationError, match="texts"):
        DifferenceRequest.model_validate({"image_a": "x", "image_b": "y", "texts": []})


def test_import_loads_no_torch():
    code = "import sys, pcd_ray.serve.app; print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_yaml_is_a_valid_serve_config_and_builds():
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema
    from ray._common.utils import import_attr

    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "local.yaml").read_text()))
    (spec,) = schema.applications
    assert (spec.name, spec.route_prefix, spec.import_path) == ("pcd", "/", "pcd_ray.serve.app:build_app")
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    # The same call `serve run` makes: Ray checks the builder's signature, then builds (no model is loaded).
    app = call_user_app_builder_with_args_if_necessary(import_attr(spec.import_path), spec.args)
    local = load_job("local").serve
    deployment = app._bound_deployment
    assert deployment.num_replicas == local.num_replicas
    assert deployment.init_args[0] == local.model
    assert deployment.init_kwargs["max_request_bytes"] == local.max_request_bytes


def test_build_app_args():
    from pcd_ray.serve.app import build_app

    app = build_app({"checkpoint": "s3://bucket/run/export", "overrides": ["serve.num_replicas=2"]})
    assert app._bound_deployment.init_args[0] == ModelSpec(checkpoint="s3://bucket/run/export")
    assert app._bound_deployment.num_replicas == 2
    for bad in ({}, {"confg": "local"}, {"config": "local", "overrides": "serve.port=1"}):
        with pytest.raises(ValidationError):
            build_app(bad)


# ------------------------------------------------------------------------------------- slow: real Serve
def _no_5xx(response):
    assert response.status_code < 500, f"{response.request.method} {response.request.url}: {response.status_code}"


def _image(seed: int, size=(40, 30), fmt="PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    """A pcd-micro random-init export served through run_serve, and the same export loaded here."""
    import httpx
    from ray import serve

    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model
    from pcd_ray.serve.app import run_serve
    from pcd_ray.storage import Storage

    storage = Storage(StorageConfig(root=str(tmp_path_factory.mktemp("serve"))))
    base = load_model(ModelSpec(name="pcd-micro"))
    uri = export_model(base.model.state_dict(), base.model_cfg, base.preprocess_cfg, storage, "export",
                       meta={"run": "test-serve"})
    job = JobConfig(storage=storage.cfg, serve=ServeConfig(
        model=ModelSpec(checkpoint="export"), port=free_port(), max_request_bytes=MAX_BYTES,
        max_image_pixels=MAX_PIXELS))
    url = run_serve(job, storage, blocking=False)
    direct = load_model(ModelSpec(checkpoint=uri))
    direct.model.eval()
    client = httpx.Client(base_url=url, timeout=60, event_hooks={"response": [_no_5xx]})
    try:
        yield SimpleNamespace(url=url, uri=uri, client=client, direct=direct)
    finally:
        client.close()
        serve.shutdown()


def _direct_texts(direct, texts) -> np.ndarray:
    import torch

    with torch.no_grad():
        emb = direct.model.encode_text(direct.tokenizer(texts))
        return torch.nn.functional.normalize(emb, dim=-1).numpy()


def _direct_images(direct, images: list[bytes]) -> np.ndarray:
    import torch
    from PIL import Image

    with torch.no_grad():
        batch = torch.stack([direct.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        return torch.nn.functional.normalize(direct.model.encode_image(batch), dim=-1).numpy()


def _error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    text = json.dumps(body)
    for word in words:
        assert word in text, f"{word!r} not in {body}"


@pytest.mark.slow
def test_healthz_and_model_info(server):
    assert server.client.get("/healthz").json() == {"status": "ok"}
    info = server.client.get("/model").json()
    assert info["source"] == f"export {server.uri}"
    assert info["embed_dim"] == 32 and info["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert info["meta"] == {"run": "test-serve"}
    assert info["limits"]["max_request_bytes"] == MAX_BYTES and info["limits"]["max_image_pixels"] == MAX_PIXELS


@pytest.mark.slow
def test_embed_matches_direct_model(server):
    texts = ["a red circle", "The first image shows a larger animal, while the second shows a smaller one."]
    images = [_image(0), _image(1, size=(17, 50)), _image(2, fmt="JPEG")]
    r = server.client.post("/embed", json={"texts": texts, "images": [_b64(b) for b in images]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 32 and body["model"] == f"export {server.uri}"
    np.testing.assert_allclose(body["text_embeddings"], _direct_texts(server.direct, texts), atol=1e-5)
    np.testing.assert_allclose(body["image_embeddings"], _direct_images(server.direct, images), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(body["image_embeddings"], axis=1), 1.0, atol=1e-5)

    only_text = server.client.post("/embed", json={"texts": texts[:1]}).json()
    assert only_text["image_embeddings"] == [] and len(only_text["text_embeddings"]) == 1
    # A data URL is accepted as well as bare base64.
    data_url = server.client.post("/embed", json={"images": ["data:image/png;base64," + _b64(images[0])]}).json()
    np.testing.assert_allclose(data_url["image_embeddings"], body["image_embeddings"][:1], atol=1e-6)


@pytest.mark.slow
def test_difference_matches_direct_model(server):
    a, b = _image(3), _image(4)
    texts = [f"the first image is more {w}" for w in ("red", "blue", "round", "square", "large")]
    r = server.client.post("/difference", json={"image_a": _b64(a), "image_b": _b64(b), "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    emb_a, emb_b = _direct_images(server.direct, [a, b])
    d = (emb_a - emb_b) / np.linalg.norm(emb_a - emb_b)
    expected = _direct_texts(server.direct, texts) @ d
    np.testing.assert_allclose(body["scores"], expected, atol=1e-5)
    assert body["best_index"] == int(np.argmax(body["scores"])) and body["best_text"] == texts[body["best_index"]]

    # Order matters: swapping the images flips the difference direction.
    swapped = server.client.post("/difference", json={"image_a": _b64(b), "image_b": _b64(a), "texts": texts}).json()
    np.testing.assert_allclose(swapped["scores"], -np.asarray(body["scores"]), atol=1e-5)
    # Identical images: no direction, all scores 0 (not NaN, which JSON cannot carry).
    same = server.client.post("/difference", json={"image_a": _b64(a), "image_b": _b64(a), "texts": texts})
    assert same.status_code == 200 and same.json()["scores"] == [0.0] * len(texts)


@pytest.mark.slow
def test_bad_base64_is_400_naming_the_field(server):
    r = server.client.post("/embed", json={"images": [_b64(_image(0)), "not base64 !!"]})
    _error(r, 400, "invalid_base64", "images[1]")
    r = server.client.post("/difference", json={"image_a": _b64(_image(0)), "image_b": "%%%", "texts": ["x"]})
    _error(r, 400, "invalid_base64", "image_b")


@pytest.mark.slow
def test_bad_images_are_422_naming_the_field(server):
    garbage = _b64(b"\x89PNG but not really an image" * 10)
    _error(server.client.post("/embed", json={"images": [garbage]}), 422, "invalid_image", "images[0]")
    _error(server.client.post("/difference", json={"image_a": garbage, "image_b": _b64(_image(0)), "texts": ["x"]}),
           422, "invalid_image", "image_a")
    too_big = _b64(_image(5, size=(80, 80)))  # 6400 pixels > MAX_PIXELS, a few KB on the wire
    _error(server.client.post("/embed", json={"images": [_b64(_image(0)), too_big]}), 422, "images[1]",
           f"limit of {MAX_PIXELS} pixels")


@pytest.mark.slow
def test_schema_errors_are_422_with_fastapi_detail(server):
    r = server.client.post("/difference", json={"image_a": "eA==", "image_b": "eA=="})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "texts"] and err["type"] == "missing"
    r = server.client.post("/embed", json={"texts": ["a"], "text": ["b"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "text"]
    _error(server.client.post("/embed", json={}), 422, "nothing to embed")
    _error(server.client.post("/embed", json={"texts": ["a"] * (MAX_ITEMS + 1)}), 422, "texts")
    _error(server.client.post("/embed", content=b"{not json", headers={"content-type": "application/json"}),
           422, "json_invalid")
    assert server.client.get("/embed").status_code == 405


@pytest.mark.slow
def test_oversize_body_is_413(server):
    big = {"texts": ["x" * 1000] * 100}  # ~100 KB > MAX_BYTES, otherwise valid
    _error(server.client.post("/embed", json=big), 413, "request_too_large", str(MAX_BYTES))

    # Chunked upload (no Content-Length): the real size is counted as it arrives.
    def chunks():
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i:i + 8192]

    r = server.client.post("/embed", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _error(r, 413, "request_too_large")
    # The server is still healthy after refusing.
    assert server.client.get("/healthz").status_code == 200
