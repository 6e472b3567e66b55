"""The training dataset: artifacts joined by ids, decoded and tokenised on Ray Data CPU workers.

    pairs ⋈ diffs (pair_id) ⋈ images (image_id_a) ⋈ images (image_id_b)  ->  decode + open_clip preprocess + tokenise

Train workers receive ready tensors from ``get_dataset_shard``: pixels ``image_a``/``image_b`` [3, H, W] float32
(or, when the image tower is frozen, its embeddings ``emb_a``/``emb_b`` [D] float32, computed once per image as
the paper does), token ids ``diff_tokens``/``caption_tokens`` [context_length] int64. Heavy work (PNG decoding, resizing,
tokenising) runs in Ray Data tasks on CPU workers, so on a cluster it scales on CPU nodes while GPUs train.
``data: captions`` (base pretraining) reads image-caption rows of the images artifact instead.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from pcd_ray import artifacts
from pcd_ray.config import ModelSpec, TrainConfig
from pcd_ray.data.images import ImageDecodeError
from pcd_ray.model.trainable import trains_image_tower
from pcd_ray.storage import Storage

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _processors(spec_json: str, storage_json: str):
    """(transform, tokenizer) per worker process, built once: Ray reuses worker processes across tasks and epochs,
    so after the first epoch no batch pays for building them (an actor pool would be rebuilt every epoch)."""
    from pcd_ray.config import StorageConfig
    from pcd_ray.model.factory import load_processors
    from pcd_ray.runtime import quiet_worker_logs

    quiet_worker_logs()
    spec = ModelSpec.model_validate_json(spec_json)
    preprocess, tokenizer, _ = load_processors(spec, Storage(StorageConfig.model_validate_json(storage_json)))
    return preprocess, tokenizer


def preprocess_batch_fn(batch: dict[str, np.ndarray], *, spec_json: str, storage_json: str) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: image bytes -> pixels with the model's own open_clip transform, texts -> token ids.

    A corrupt image raises ImageDecodeError naming its index: the images artifact is written by a stage that
    already rejected undecodable images, so one here means the artifact is damaged and training must not go on.
    """
    from pcd_ray.data.images import preprocess_batch

    preprocess, tokenizer = _processors(spec_json, storage_json)
    out: dict[str, np.ndarray] = {}
    for key in ("image_a", "image_b"):
        if key in batch:
            out[key] = preprocess_batch(list(batch[key]), preprocess).numpy()
    for key in ("emb_a", "emb_b"):
        if key in batch:
            out[key] = np.stack([np.asarray(e, dtype=np.float32) for e in batch[key]])
    for src, dst in (("text", "diff_tokens"), ("caption_a", "caption_tokens")):
        if src in batch:
            out[dst] = tokenizer([str(t) for t in batch[src]]).numpy()
    return out


def image_features_precomputed(cfg: TrainConfig) -> bool:
    """Whether training reads precomputed image embeddings instead of pixels (``image_features``)."""
    if cfg.image_features == "auto":
        return not trains_image_tower(cfg.trainable)  # the paper: frozen tower -> embed every image once
    return cfg.image_features == "precomputed"


def _image_values(cfg: TrainConfig, storage: Storage, precomputed: bool):
    """image_id + one value column per image: PNG bytes ("image"), or the frozen tower's embedding ("embedding"),
    computed once here by a Ray Data actor pool instead of once per pair and epoch in the train loop."""
    images = artifacts.read_dataset(storage, cfg.images, "images", columns=["image_id", "image"])
    if not precomputed:
        return images, "image"
    from ray.data.expressions import col

    from pcd_ray.embed.images import embed_images

    emb = embed_images(images, cfg.model, storage, batch_size=256, num_actors=1).materialize()
    failed = emb.filter(expr=col("error").is_not_null())
    if failed.count():
        raise ImageDecodeError(f"{storage.resolve(cfg.images)}: images that do not decode, e.g. "
                               f"{failed.take(3)}: the images artifact is damaged")
    return emb.select_columns(["image_id", "embedding"]), "embedding"


def joined_pairs(cfg: TrainConfig, storage: Storage, precomputed: bool):
    """pairs ⋈ diffs ⋈ images(a) ⋈ images(b): one row per kept difference sentence, with both images' bytes
    (``image_a``/``image_b``) or embeddings (``emb_a``/``emb_b``)."""
    pairs = artifacts.read_dataset(storage, cfg.pairs, "pairs",
                                   columns=["pair_id", "image_id_a", "image_id_b", "caption_a"])
    diffs = artifacts.read_dataset(storage, cfg.diffs, "diffs", columns=["pair_id", "text"])
    n = max(1, cfg.scaling.num_workers * 2)
    ds = diffs.join(pairs, "inner", num_partitions=n, on=("pair_id",))
    images, value = _image_values(cfg, storage, precomputed)
    prefix = "emb" if precomputed else "image"
    for side in ("a", "b"):
        ds = ds.join(images.rename_columns({"image_id": f"image_id_{side}", value: f"{prefix}_{side}"}),
                     "inner", num_partitions=n, on=(f"image_id_{side}",))
    return ds.select_columns(["pair_id", "text", "caption_a", f"{prefix}_a", f"{prefix}_b"])


def caption_rows(cfg: TrainConfig, storage: Storage, precomputed: bool, split: str = "train"):
    """Image-caption rows of one split, named like the pair columns the loop reads (image_a or emb_a, caption_a)."""
    columns = ["image_id", "split", "caption"] + ([] if precomputed else ["image"])
    ds = artifacts.read_dataset(storage, cfg.images, "images", columns=columns)
    ds = ds.filter(lambda row: row["split"] == split)
    if not precomputed:  # the bytes are in the same rows: no join
        return ds.rename_columns({"image": "image_a", "caption": "caption_a"}).select_columns(["image_a", "caption_a"])
    embeddings, _ = _image_values(cfg, storage, precomputed)
    ds = ds.join(embeddings, "inner", num_partitions=max(1, cfg.scaling.num_workers * 2), on=("image_id",))
    return ds.rename_columns({"embedding": "emb_a", "caption": "caption_a"}).select_columns(["emb_a", "caption_a"])


def build_train_dataset(cfg: TrainConfig, storage: Storage):
    """(Ray Dataset the train workers iterate -- tensors ready for the model, rows, precomputed image features?)."""
    precomputed = image_features_precomputed(cfg)
    if cfg.data == "captions":
        ds = caption_rows(cfg, storage, precomputed)
    else:
        ds = joined_pairs(cfg, storage, precomputed)
    # The light rows (bytes or embeddings + text) are kept in memory once; pixels and tokens are recomputed per
    # epoch, streaming.
    ds = ds.materialize()
    rows = ds.count()
    if rows < cfg.batch_size:
        raise ValueError(f"training set has {rows} rows, fewer than one global batch ({cfg.batch_size})")
    ds = ds.random_shuffle(seed=cfg.seed)
    ds = ds.map_batches(preprocess_batch_fn, batch_size=256, num_cpus=1,
                        fn_kwargs={"spec_json": cfg.model.model_dump_json(),
                                   "storage_json": storage.portable_cfg().model_dump_json()})
    return ds, rows, precomputed
