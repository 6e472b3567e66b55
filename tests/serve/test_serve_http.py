"""The v1 API over real HTTP: a finetuned pcd-micro export served by Ray Serve on 127.0.0.1, queried with httpx.

Answers must equal what the same export computes directly in this process, and rank synthetic images by size far
beyond chance; bad input must be the right 4xx with a message, never a 5xx (the clients fail any test on a 5xx).
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import MAX_BYTES, MAX_PIXELS, TOKEN, b64, noise_png, order_concordance, synthetic_by_size

from pcd_ray.serve import scoring
from pcd_ray.serve.schemas import MAX_ITEMS

pytestmark = pytest.mark.integration


def _texts(direct, texts) -> np.ndarray:
    import torch

    with torch.no_grad():
        emb = direct.model.encode_text(direct.tokenizer(texts))
        return torch.nn.functional.normalize(emb, dim=-1).numpy()


def _images(direct, images: list[bytes]) -> np.ndarray:
    import torch
    from PIL import Image

    with torch.no_grad():
        batch = torch.stack([direct.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        return torch.nn.functional.normalize(direct.model.encode_image(batch), dim=-1).numpy()


def _error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    text = json.dumps(body)
    for word in words:
        assert word in text, f"{word!r} not in {body}"
    return body


# ------------------------------------------------------------------------------------------- the endpoints
def test_healthz_docs_and_model_info(server):
    from pcd_ray import provenance
    from pcd_ray.storage import Storage

    assert server.anon.get("/healthz").json() == {"status": "ok"}  # probes need no token
    paths = server.anon.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/difference", "/v1/rank", "/v1/classify", "/v1/model", "/healthz"} <= set(paths)
    assert "requestBody" in paths["/v1/rank"]["post"]
    assert server.anon.get("/docs").status_code == 200
    info = server.client.get("/v1/model").json()
    # The id is the one pipelines record for the export (the sha256 of its weights file), and names the model.
    wid = provenance.weights_id(Storage(), server.uri)
    assert len(wid) == 16 and info["weights_id"] == wid
    assert info["name"] == f"{_last_two(server.uri)}@{wid}"
    assert info["embed_dim"] == 32 and info["device"] == "cpu" and info["batching"] is True
    # Auth is on and the caller holds the token: the detail (server path, training meta) is there.
    assert info["detail"]["source"] == f"export {server.uri}" and info["detail"]["meta"]["run"] == "test-serve"
    assert info["limits"]["max_request_bytes"] == MAX_BYTES and info["limits"]["max_image_pixels"] == MAX_PIXELS


def _last_two(uri: str) -> str:
    return "/".join(uri.rstrip("/").split("/")[-2:])


def test_embed_matches_direct_model(server):
    texts = ["a red circle", "The first image shows larger shapes than the second one."]
    images = [noise_png(0), noise_png(1, size=(17, 50)), noise_png(2, fmt="JPEG")]
    r = server.client.post("/v1/embed", json={"texts": texts, "images": [b64(b) for b in images]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 32 and body["model"] == server.client.get("/v1/model").json()["name"]
    assert str(server.uri) not in r.text
    np.testing.assert_allclose(body["text_embeddings"], _texts(server.direct, texts), atol=1e-5)
    np.testing.assert_allclose(body["image_embeddings"], _images(server.direct, images), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(body["image_embeddings"], axis=1), 1.0, atol=1e-5)

    only_text = server.client.post("/v1/embed", json={"texts": texts[:1]}).json()
    assert only_text["image_embeddings"] == [] and len(only_text["text_embeddings"]) == 1
    data_url = server.client.post("/v1/embed", json={"images": ["data:image/png;base64," + b64(images[0])]}).json()
    np.testing.assert_allclose(data_url["image_embeddings"], body["image_embeddings"][:1], atol=1e-6)


def test_concurrent_requests_are_batched_without_mixing_answers(server):
    """Requests arriving together share forward passes; each must still get exactly its own embeddings."""
    texts = [f"{n} large red circles on the left" for n in range(24)]
    images = [noise_png(10 + k) for k in range(8)]

    def one(k: int) -> dict:
        body = {"texts": [texts[k]]} if k < len(texts) else {"images": [b64(images[k - len(texts)])]}
        r = server.client.post("/v1/embed", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, range(len(texts) + len(images))))
    np.testing.assert_allclose(
        [o["text_embeddings"][0] for o in out[: len(texts)]], _texts(server.direct, texts), atol=1e-5
    )
    np.testing.assert_allclose(
        [o["image_embeddings"][0] for o in out[len(texts) :]], _images(server.direct, images), atol=1e-5
    )


def test_difference_matches_direct_model(server):
    a, b = noise_png(3), noise_png(4)
    texts = [f"the first image is more {w}" for w in ("red", "blue", "round", "square", "large")]
    r = server.client.post("/v1/difference", json={"image_a": b64(a), "image_b": b64(b), "texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    emb_a, emb_b = _images(server.direct, [a, b])
    d = (emb_a - emb_b) / np.linalg.norm(emb_a - emb_b)
    np.testing.assert_allclose(body["scores"], _texts(server.direct, texts) @ d, atol=1e-5)
    assert body["best_index"] == int(np.argmax(body["scores"])) and body["best_text"] == texts[body["best_index"]]
    # Order matters: swapping the images flips the difference direction.
    swapped = server.client.post("/v1/difference", json={"image_a": b64(b), "image_b": b64(a), "texts": texts})
    np.testing.assert_allclose(swapped.json()["scores"], -np.asarray(body["scores"]), atol=1e-5)
    # Identical images: no direction, all scores 0 (not NaN, which JSON cannot carry).
    same = server.client.post("/v1/difference", json={"image_a": b64(a), "image_b": b64(a), "texts": texts})
    assert same.status_code == 200 and same.json()["scores"] == [0.0] * len(texts)


def test_rank_orders_held_out_synthetic_images_by_size(server):
    """60 held-out images (20 small, 20 medium, 20 large, shuffled) ranked by "larger" and by "smaller".

    A random order puts 50% +- 6% of the differently sized pairs right (P(>= 70%) is about 5e-4); the finetuned
    export must put >= 70% right in both directions (jointly about 1e-7 by chance) and order the three class means
    strictly in both directions."""
    images, sizes = synthetic_by_size(20)
    perm = np.random.default_rng(0).permutation(len(images))
    images, sizes = [images[k] for k in perm], [sizes[k] for k in perm]
    encoded = [b64(x) for x in images]
    emb = _images(server.direct, images)
    for attribute, sign in (("larger", 1), ("smaller", -1)):
        r = server.client.post("/v1/rank", json={"images": encoded, "attribute": attribute})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == f"The first image shows {attribute} objects than the second image."
        assert sorted(body["order"]) == list(range(len(images)))
        values = [sign * s for s in sizes]
        assert order_concordance(body["order"], values) >= 0.7, (attribute, body["order"])
        means = [np.mean([sc for sc, v in zip(body["scores"], values) if v == c]) for c in sorted(set(values))]
        assert means[0] < means[1] < means[2], (attribute, means)
        # The scores are the direct model's: t . e_i minus its mean.
        order, expected = scoring.rank_scores(_texts(server.direct, [body["text"]])[0], emb)
        np.testing.assert_allclose(body["scores"], expected, atol=1e-5)

    # A template of "{attribute}" uses the text verbatim; braces elsewhere in a template are plain text.
    r = server.client.post(
        "/v1/rank", json={"images": encoded[:3], "attribute": "the first is {larger}", "template": "{x} {attribute}"}
    )
    assert r.status_code == 200 and r.json()["text"] == "{x} the first is {larger}"


def test_classify_with_and_without_comparatives(server):
    image = noise_png(7)
    labels = ["small shape", "medium shape", "large shape"]
    comparatives = [
        {
            "first": "large shape",
            "second": "small shape",
            "text": "The first image shows larger shapes than the second one.",
        },
        {
            "first": "medium shape",
            "second": "small shape",
            "text": "The shapes in the first image are bigger than in the second image.",
        },
    ]
    body = {"image": b64(image), "labels": labels, "comparatives": comparatives, "alpha": 0.5}
    r = server.client.post("/v1/classify", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    (x,) = _images(server.direct, [image])
    t = _texts(server.direct, [f"This is a photo of a {label}" for label in labels])
    d = _texts(server.direct, [c["text"] for c in comparatives])
    # The paper's formula by hand: only "small shape" (class 0) has comparatives.
    s0 = ((t[2] - d[0]) + (t[1] - d[1])) / 2
    h = t.astype(np.float64).copy()
    h[0] = 0.5 * t[0] + 0.5 * s0
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    np.testing.assert_allclose(out["scores"], h @ x, atol=1e-5)
    np.testing.assert_allclose(out["zero_shot_scores"], t @ x, atol=1e-5)
    np.testing.assert_allclose(out["scores"][1:], out["zero_shot_scores"][1:], atol=1e-6)
    assert out["index"] == int(np.argmax(out["scores"])) and out["label"] == labels[out["index"]]

    # The same labels again: their prompts come from the replica's text cache (one replica in this app).
    before = server.client.get("/v1/model").json()["text_cache"]
    plain = server.client.post("/v1/classify", json={"image": b64(image), "labels": labels}).json()
    after = server.client.get("/v1/model").json()["text_cache"]
    assert after["hits"] - before["hits"] == len(labels) and after["misses"] == before["misses"]
    np.testing.assert_allclose(plain["scores"], plain["zero_shot_scores"], atol=1e-6)
    np.testing.assert_allclose(plain["scores"], out["zero_shot_scores"], atol=1e-6)


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_or_wrong_token_is_401(server):
    body = {"texts": ["a"]}
    r = server.anon.post("/v1/embed", json=body)
    _error(r, 401, "unauthorized", "missing bearer token")
    assert r.headers["www-authenticate"] == "Bearer"
    _error(
        server.anon.post("/v1/embed", json=body, headers={"authorization": "Bearer wrong"}), 401, "invalid bearer token"
    )
    _error(server.anon.post("/v1/embed", json=body, headers={"authorization": f"Basic {TOKEN}"}), 401, "missing")
    _error(server.anon.get("/v1/model"), 401, "unauthorized")
    assert server.anon.post("/v1/embed", json=body, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_bad_base64_is_400_naming_the_field(server):
    r = server.client.post("/v1/embed", json={"images": [b64(noise_png(0)), "not base64 !!"]})
    _error(r, 400, "invalid_base64", "images[1]")
    r = server.client.post("/v1/difference", json={"image_a": b64(noise_png(0)), "image_b": "%%%", "texts": ["x"]})
    _error(r, 400, "invalid_base64", "image_b")
    _error(server.client.post("/v1/classify", json={"image": "@@", "labels": ["a", "b"]}), 400, "image")


def test_corrupt_and_oversize_images_are_422_naming_the_field(server):
    garbage = b64(b"\x89PNG but not really an image" * 10)
    _error(server.client.post("/v1/embed", json={"images": [garbage]}), 422, "invalid_image", "images[0]")
    _error(
        server.client.post("/v1/difference", json={"image_a": garbage, "image_b": b64(noise_png(0)), "texts": ["x"]}),
        422,
        "invalid_image",
        "image_a",
    )
    truncated = b64(noise_png(1)[:200])
    _error(
        server.client.post("/v1/rank", json={"images": [b64(noise_png(0)), truncated], "attribute": "larger"}),
        422,
        "invalid_image",
        "images[1]",
    )
    too_big = b64(noise_png(5, size=(80, 80)))  # 6400 pixels > MAX_PIXELS, a few KB on the wire
    _error(
        server.client.post("/v1/embed", json={"images": [b64(noise_png(0)), too_big]}),
        422,
        "images[1]",
        f"limit of {MAX_PIXELS} pixels",
    )


def test_schema_errors_are_422_with_the_field(server):
    r = server.client.post("/v1/difference", json={"image_a": "eA==", "image_b": "eA=="})
    (err,) = _error(r, 422)["detail"]
    assert err["loc"] == ["body", "texts"] and err["type"] == "missing" and "input" not in err
    r = server.client.post("/v1/embed", json={"texts": ["a"], "text": ["b"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "text"]
    _error(server.client.post("/v1/embed", json={}), 422, "nothing to embed")
    _error(server.client.post("/v1/embed", json={"texts": ["a"] * (MAX_ITEMS + 1)}), 422, "texts")
    _error(
        server.client.post("/v1/embed", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        "json_invalid",
    )
    _error(
        server.client.post(
            "/v1/rank", json={"images": ["eA==", "eA=="], "attribute": "larger", "template": "no placeholder"}
        ),
        422,
        "{attribute}",
    )
    _error(server.client.post("/v1/rank", json={"images": ["eA=="], "attribute": "larger"}), 422, "images")
    _error(server.client.post("/v1/classify", json={"image": "eA==", "labels": ["a", "a"]}), 422, "repeated")
    _error(
        server.client.post(
            "/v1/classify",
            json={"image": "eA==", "labels": ["a", "b"], "comparatives": [{"first": "a", "second": "c", "text": "x"}]},
        ),
        422,
        "comparatives[0]",
        "not in labels",
    )
    _error(server.client.post("/v1/classify", json={"image": "eA==", "labels": ["a", "b"], "alpha": 1.5}), 422, "alpha")
    assert server.client.get("/v1/embed").status_code == 405


def test_oversize_body_is_413(server):
    big = {"texts": ["x" * 1000] * (MAX_BYTES // 1000 + 10)}  # over MAX_BYTES, otherwise valid
    _error(server.client.post("/v1/embed", json=big), 413, "request_too_large", str(MAX_BYTES))

    # Chunked upload (no Content-Length): the real size is counted as it arrives.
    def chunks():
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = server.client.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    _error(r, 413, "request_too_large")
    assert server.client.get("/healthz").status_code == 200  # still healthy after refusing
