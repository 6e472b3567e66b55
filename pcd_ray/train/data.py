"""The training dataset: artifacts joined by ids, decoded and tokenised on Ray Data CPU workers.

    pairs ⋈ diffs (pair_id) ⋈ images (image_id_a) ⋈ images (image_id_b)  ->  decode + open_clip preprocess + tokenise

Train workers receive ready tensors from ``get_dataset_shard``: pixels ``image_a``/``image_b`` [3, H, W] float32,
token ids ``diff_tokens``/``caption_tokens`` [context_length] int64. Heavy work (PNG decoding, resizing,
tokenising) runs in Ray Data tasks on CPU workers, so on a cluster it scales on CPU nodes while GPUs train.
``data: captions`` (base pretraining) reads image-caption rows of the images artifact instead.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from pcd_ray import artifacts
from pcd_ray.config import ModelSpec, TrainConfig
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
    for src, dst in (("text", "diff_tokens"), ("caption_a", "caption_tokens")):
        if src in batch:
            out[dst] = tokenizer([str(t) for t in batch[src]]).numpy()
    return out


def joined_pairs(cfg: TrainConfig, storage: Storage):
    """pairs ⋈ diffs ⋈ images(a) ⋈ images(b): one row per kept difference sentence, with both images' bytes."""
    pairs = artifacts.read_dataset(storage, cfg.pairs, "pairs",
                                   columns=["pair_id", "image_id_a", "image_id_b", "caption_a"])
    diffs = artifacts.read_dataset(storage, cfg.diffs, "diffs", columns=["pair_id", "text"])
    n = max(1, cfg.scaling.num_workers * 2)
    ds = diffs.join(pairs, "inner", num_partitions=n, on=("pair_id",))
    images = artifacts.read_dataset(storage, cfg.images, "images", columns=["image_id", "image"])
    for side in ("a", "b"):
        ds = ds.join(images.rename_columns({"image_id": f"image_id_{side}", "image": f"image_{side}"}),
                     "inner", num_partitions=n, on=(f"image_id_{side}",))
    return ds.select_columns(["pair_id", "text", "caption_a", "image_a", "image_b"])


def caption_rows(cfg: TrainConfig, storage: Storage, split: str = "train"):
    """Image-caption rows of one split, named like the pair columns the loop reads (image_a, caption_a)."""
    ds = artifacts.read_dataset(storage, cfg.images, "images", columns=["image_id", "split", "image", "caption"])
    ds = ds.filter(lambda row: row["split"] == split)
    return ds.rename_columns({"image": "image_a", "caption": "caption_a"}).select_columns(["image_a", "caption_a"])


def build_train_dataset(cfg: TrainConfig, storage: Storage):
    """The Ray Dataset the train workers iterate: tensors ready for the model (see module docstring)."""
    ds = caption_rows(cfg, storage) if cfg.data == "captions" else joined_pairs(cfg, storage)
    # The light rows (bytes + text) are kept in memory once; decoded pixels are recomputed per epoch, streaming.
    ds = ds.materialize()
    rows = ds.count()
    if rows < cfg.batch_size:
        raise ValueError(f"training set has {rows} rows, fewer than one global batch ({cfg.batch_size})")
    ds = ds.random_shuffle(seed=cfg.seed)
    ds = ds.map_batches(preprocess_batch_fn, batch_size=256, num_cpus=1,
                        fn_kwargs={"spec_json": cfg.model.model_dump_json(),
                                   "storage_json": storage.portable_cfg().model_dump_json()})
    return ds, rows
