"""Constants and helpers of the serve tests (imported by conftest.py and the test modules).

``train_micro_export`` finetunes a pcd-micro with the pipeline's own pieces (the synthetic images and rule-engine
difference sentences, the paper's loss ``pc_clip_loss``, ``export_model``) at the smallest size whose answers are
meaningful: about 40 s on one idle CPU core, after which it ranks synthetic images by size far better than chance.
"""

from __future__ import annotations

import base64
import io
import json
import socket

import numpy as np

from pcd_ray.config import LossConfig, ModelSpec

MAX_BYTES = 512 * 1024  # small enough to exceed cheaply, large enough for 60 test images in one request
MAX_PIXELS = 64 * 64
TOKEN_ENV = "PCD_TEST_SERVE_TOKEN"
TOKEN = "test-token-7d1f0c"
IMAGE_SIZE = 32  # pcd-micro's input size: rendering at it skips a resize


def train_micro_export(storage, uri: str, *, num_images: int = 1500, steps: int = 300, seed: int = 0) -> str:
    """Finetune a random-init pcd-micro on synthetic pairs (difference loss + caption loss), export it; -> URI."""
    import torch

    # One thread: the matrices are tiny (width 32), and a second thread only adds synchronisation, which costs
    # most when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(storage, uri, num_images, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(storage, uri: str, num_images: int, steps: int, seed: int) -> str:
    import torch
    from PIL import Image

    from pcd_ray.data import attributes as A
    from pcd_ray.data.synthetic import make_example
    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model
    from pcd_ray.model.loss.reference import pc_clip_loss

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = [make_example(seed, "train", i, IMAGE_SIZE) for i in range(num_images)]
    attrs = [json.loads(r["attributes"]) for r in rows]
    lm = load_model(ModelSpec(name="pcd-micro"))
    pixels = torch.stack([lm.preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
    model, tok = lm.model, lm.tokenizer
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    cfg = LossConfig(diff_weight=1.0, clip_weight=1.0)
    batch = 128
    model.train()
    for _ in range(steps):
        a, b, c = (rng.integers(num_images, size=batch) for _ in range(3))
        texts = [A.difference_sentence(attrs[i], attrs[j], rng) for i, j in zip(a, b)]
        features = {
            "image_a": model.encode_image(pixels[a]),
            "image_b": model.encode_image(pixels[b]),
            "diff_text": model.encode_text(tok(texts)),
            "image": model.encode_image(pixels[c]),
            "caption": model.encode_text(tok([rows[i]["caption"] for i in c])),
        }
        loss = pc_clip_loss(features, cfg, logit_scale=model.logit_scale, rank=0, world_size=1)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return export_model(
        model.state_dict(), lm.model_cfg, lm.preprocess_cfg, storage, uri, meta={"run": "test-serve", "steps": steps}
    )


def noise_png(seed: int, size=(40, 30), fmt="PNG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_5xx(response):
    assert response.status_code < 500, f"{response.request.method} {response.request.url}: {response.status_code}"


def synthetic_by_size(per_size: int, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """Held-out (test split) synthetic images with one shape each, ``per_size`` of each size class, interleaved.

    -> (PNG bytes, size class 0 small / 1 medium / 2 large). One shape per image: the count also changes how much
    colour an image holds, which a model this small mixes up with size.
    """
    from pcd_ray.data import attributes as A
    from pcd_ray.data.synthetic import make_example

    found: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    index = 0
    while min(len(v) for v in found.values()) < per_size:
        row = make_example(seed, "test", index, IMAGE_SIZE)
        attrs = json.loads(row["attributes"])
        size = A.SIZES.index(attrs["size"])
        if attrs["count"] == 1 and len(found[size]) < per_size:
            found[size].append(row["image"])
        index += 1
    images = [found[s][k] for k in range(per_size) for s in (0, 1, 2)]
    return images, [s for _ in range(per_size) for s in (0, 1, 2)]


def order_concordance(order: list[int], values: list[int]) -> float:
    """Fraction of pairs with different ``values`` that ``order`` (most first) puts the larger value first.

    0.5 for a random order; with 20 items per class its standard deviation is about 0.06.
    """
    pos = np.empty(len(order))
    pos[np.asarray(order)] = np.arange(len(order))
    v = np.asarray(values)
    i, j = np.triu_indices(len(v), 1)
    differ = v[i] != v[j]
    return float(np.mean(((pos[i] < pos[j]) == (v[i] > v[j]))[differ]))
