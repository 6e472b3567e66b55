"""Training on precomputed image embeddings is training with the image tower online, when the tower is frozen.

The paper's setting (only the text transformer trains) lets `pcd-ray embed` run the image tower once and training
read its artifact. That is only sound if a step on the artifact's embeddings gives the loss and the text-tower
gradients a step on the pixels gives: same pairs, same model, the train stage's own preprocessing
(``preprocess_batch_fn``), the PairEncoder and the loss the train loop runs.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pcd_ray import artifacts
from pcd_ray.config import GenerateConfig, JobConfig, LossConfig, ModelSpec
from pcd_ray.data.pairs import pair_id
from pcd_ray.data.synthetic import make_example
from pcd_ray.storage import Storage

pytestmark = pytest.mark.integration

NUM_IMAGES, BATCH = 24, 16


def _export_seeded_micro(storage: Storage, uri: str) -> None:
    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model

    torch.manual_seed(0)
    lm = load_model(ModelSpec(name="pcd-micro"))
    export_model(lm.model.state_dict(), lm.model_cfg, lm.preprocess_cfg, storage, uri)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    """An images artifact, a pcd-micro export, its embeddings artifact (run_embed) and one batch of pairs with
    their rule-engine difference sentences, as raw rows (image bytes and stored embeddings side by side)."""
    from pcd_ray.embed.job import run_embed
    from pcd_ray.generate.rule import RuleEngine

    root = str(tmp_path_factory.mktemp("precomputed"))
    job = JobConfig.model_validate(
        {"storage": {"root": root}, "embed": {"model": {"checkpoint": "base/export"}, "batch_size": 8}}
    )
    storage = Storage(job.storage)
    images = pa.Table.from_pylist([make_example(0, "train", i, 32) for i in range(NUM_IMAGES)])
    artifacts.write_table(images, storage, "images", "images")
    _export_seeded_micro(storage, "base/export")
    assert run_embed(job, storage)["embedded"] == NUM_IMAGES

    stored = artifacts.read_table(storage, "embeddings", "embeddings", columns=["image_id", "embedding"])
    emb = dict(zip(stored.column("image_id").to_pylist(), stored.column("embedding").to_pylist()))
    rows = {r["image_id"]: r for r in images.to_pylist()}
    rng = np.random.default_rng(0)
    ids = sorted(rows)
    a = [ids[i] for i in rng.choice(NUM_IMAGES, BATCH, replace=False)]
    b = [ids[(ids.index(x) + 1 + int(rng.integers(NUM_IMAGES - 1))) % NUM_IMAGES] for x in a]
    pids = [pair_id(x, y) for x, y in zip(a, b)]
    texts = RuleEngine(GenerateConfig()).generate(
        {
            "pair_id": np.array(pids),
            "attributes_a": np.array([rows[x]["attributes"] for x in a]),
            "attributes_b": np.array([rows[y]["attributes"] for y in b]),
        }
    )
    assert all(texts) and all(json.loads(rows[x]["attributes"]) for x in a)
    common = {"text": np.array(texts, dtype=object), "caption_a": np.array([rows[x]["caption"] for x in a], object)}
    pixels = {
        "image_a": np.array([rows[x]["image"] for x in a], object),
        "image_b": np.array([rows[y]["image"] for y in b], object),
        **common,
    }
    precomputed = {
        "emb_a": np.array([emb[x] for x in a], object),
        "emb_b": np.array([emb[y] for y in b], object),
        **common,
    }
    return job, storage, pixels, precomputed


def _tensors(raw: dict, job: JobConfig, storage: Storage) -> dict[str, torch.Tensor]:
    """Rows -> the tensors a train worker receives, through the train stage's own Ray Data UDF."""
    from pcd_ray.train.data import preprocess_batch_fn

    out = preprocess_batch_fn(
        raw, spec_json=job.embed.model.model_dump_json(), storage_json=storage.portable_cfg().model_dump_json()
    )
    return {k: torch.from_numpy(v) for k, v in out.items()}


def _step(module, model, batch: dict[str, torch.Tensor], loss_cfg: LossConfig, precomputed: bool):
    """One forward + backward as the train loop runs it (world_size 1): (loss outputs, gradients by name)."""
    from pcd_ray.model.loss import compute_loss

    a, b = ("emb_a", "emb_b") if precomputed else ("image_a", "image_b")
    keys = (
        [a]
        + ([b, "diff_tokens"] if loss_cfg.diff_weight else [])
        + (["caption_tokens"] if loss_cfg.clip_weight else [])
    )
    module.zero_grad(set_to_none=True)
    feats = module({k: batch[k] for k in keys})
    scale = feats["logit_scale"] if "logit_scale" in feats else model.logit_scale
    out = compute_loss(feats, loss_cfg, logit_scale=scale, rank=0, world_size=1)
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize(
    "loss",
    [{}, {"clip_weight": 1.0}, {"diff_weight": 0.0, "clip_weight": 1.0}],
    ids=["paper-default", "diff+clip", "clip-only"],
)
def test_precomputed_embeddings_give_the_online_loss_and_gradients(prepared, loss):
    from pcd_ray.model.factory import load_model
    from pcd_ray.model.pair_encoder import PairEncoder
    from pcd_ray.model.trainable import image_tower_frozen, select_trainable

    job, storage, pixels, precomputed = prepared
    loss_cfg = LossConfig(**loss)
    model = load_model(job.embed.model, storage).model
    trainable = select_trainable(model, "text_transformer")
    assert image_tower_frozen(model) and trainable
    module = PairEncoder(model, image_frozen=True).train()  # train mode, as the loop runs it

    online, g_online = _step(module, model, _tensors(pixels, job, storage), loss_cfg, precomputed=False)
    stored, g_stored = _step(module, model, _tensors(precomputed, job, storage), loss_cfg, precomputed=True)

    assert torch.isfinite(online["loss"]) and online["loss"].item() > 0
    for key in ("loss", "diff_loss", "clip_loss", "global_loss"):
        torch.testing.assert_close(stored[key], online[key], rtol=1e-5, atol=1e-6, msg=key)
    # Only the text transformer trains, and it gets the same gradient from either input.
    assert g_online.keys() == g_stored.keys() == {f"clip.{n}" for n in trainable}
    assert any(g.abs().max() > 0 for g in g_online.values())
    for name, grad in g_online.items():
        torch.testing.assert_close(g_stored[name], grad, rtol=1e-4, atol=1e-6, msg=name)
