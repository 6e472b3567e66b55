"""The training dataset: artifacts joined by ids, decoded and tokenised on Ray Data CPU workers.

    pairs ⋈ diffs (pair_id) ⋈ images (image_id_a) ⋈ images (image_id_b)  ->  decode + open_clip preprocess + tokenise

Train workers receive ready tensors from ``get_dataset_shard``: pixels ``image_a``/``image_b`` [3, H, W] float32
(or, when the image tower is frozen, its embeddings ``emb_a``/``emb_b`` [D] float32, computed once per image as
the paper does), token ids ``diff_tokens``/``caption_tokens`` [context_length] int64. Heavy work (PNG decoding,
resizing, tokenising) runs in Ray Data tasks on CPU workers, so on a cluster it scales on CPU nodes while GPUs train.
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


def _image_values(cfg: TrainConfig, storage: Storage, precomputed: bool, split: str = "train"):
    """image_id + one value column per image: PNG bytes ("image"), or the frozen tower's embedding ("embedding"):
    read from ``cfg.embeddings`` (written once by ``pcd-ray embed``) when set, else computed here by a Ray Data
    actor pool -- once per image either way, not once per pair and epoch in the train loop. ``split`` is the split
    caption rows come from (``data: captions``)."""
    if cfg.embeddings and not precomputed:
        log.warning(
            "train.embeddings=%s is not used: the image tower runs on pixels (trainable=%s, image_features=%s)",
            cfg.embeddings,
            cfg.trainable,
            cfg.image_features,
        )
    if precomputed and cfg.embeddings:
        return _precomputed_embeddings(cfg, storage, split), "embedding"
    images = artifacts.read_dataset(storage, cfg.images, "images", columns=["image_id", "image"])
    if not precomputed:
        return images, "image"
    from pcd_ray.embed.job import embed_split

    embedded, rejected = embed_split(images, cfg.model, storage, batch_size=256, num_actors=1, init_seed=cfg.seed)
    failed = rejected.take(3)
    if failed:
        raise ImageDecodeError(
            f"{storage.resolve(cfg.images)}: {rejected.count()} images that do not decode, e.g. "
            f"{failed}: the images artifact is damaged"
        )
    return embedded.select_columns(["image_id", "embedding"]), "embedding"


def _model_identity(spec: ModelSpec, storage: Storage) -> dict:
    """What makes two specs the same weights: a checkpoint (its resolved URI) overrides name and pretrained."""
    if spec.checkpoint:
        return {"checkpoint": storage.resolve(spec.checkpoint)}
    return {"name": spec.name, "pretrained": spec.pretrained}


def _precomputed_embeddings(cfg: TrainConfig, storage: Storage, split: str):
    """The ``embeddings`` artifact at ``cfg.embeddings`` as a Dataset (image_id, embedding), after checking that it
    holds this run's model's embeddings of this run's images, one for every image the run needs.

    Raises ArtifactError when it is missing or unfinished, ValueError when it was made with another model or from
    other images, or lacks (or rejected) an image the pairs (captions: the split's images) need.
    """
    uri = storage.resolve(cfg.embeddings)
    manifest = artifacts.read_manifest(storage, cfg.embeddings, "embeddings")
    if manifest.get("complete") is False:
        raise artifacts.ArtifactError(
            f"{uri}: the embeddings artifact is unfinished (its writer stopped); re-run `pcd-ray embed`"
        )
    made_by = manifest.get("config") or {}
    if "model" not in made_by or "input" not in made_by:
        raise ValueError(
            f"{uri}: not written by `pcd-ray embed` (its manifest records no embed config); "
            f"train.embeddings must name the output of an embed section"
        )
    # Relative URIs of the embed section resolve against this job's storage root, as train.model's do.
    spec = ModelSpec.model_validate(made_by["model"])
    used, wanted = _model_identity(spec, storage), _model_identity(cfg.model, storage)
    if not (spec.checkpoint or spec.pretrained):
        raise ValueError(
            f"{uri}: embeddings of a randomly initialised {spec.name} (embed.model names no checkpoint "
            f"or pretrained weights), which is not the image tower training initialises; embed a "
            f"checkpoint, or set train.embeddings=null"
        )
    if used != wanted:
        raise ValueError(
            f"{uri}: embeddings of model {used} (embed.model, source {manifest.get('model')!r}), but "
            f"train.model is {wanted}: a frozen image tower must be the one training uses. Re-run "
            f"`pcd-ray embed` with embed.model equal to train.model, or set train.embeddings=null to "
            f"embed at the start of training"
        )
    images = storage.resolve(cfg.images)
    attempt = artifacts.read_manifest(storage, cfg.images, "images").get("attempt")
    if storage.resolve(made_by["input"]) != images or manifest.get("input_attempt") != attempt:
        raise ValueError(
            f"{uri}: embeddings of {storage.resolve(made_by['input'])} (commit "
            f"{manifest.get('input_attempt')}), but train.images is {images} (commit {attempt}): the "
            f"images changed since they were embedded; re-run `pcd-ray embed`"
        )
    _check_coverage(cfg, storage, split)
    log.info(
        "train: image embeddings from %s (%d images, model %s, written by pcd-ray embed)",
        uri,
        manifest["num_rows"],
        manifest.get("model"),
    )
    return artifacts.read_dataset(storage, cfg.embeddings, "embeddings", columns=["image_id", "embedding"])


def _needed_image_ids(cfg: TrainConfig, storage: Storage, split: str):
    """Distinct image ids training joins on: both images of every pair, or the split's images (``data: captions``).
    Read shard by shard, ids only: the driver holds one id per image, never the pairs."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if cfg.data == "captions":
        table = artifacts.read_table(
            storage, cfg.images, "images", columns=["image_id"], filters=[("split", "==", split)]
        )
        return pc.unique(table.column("image_id").combine_chunks().cast(pa.string()))
    seen = [pa.array([], pa.string())]
    for path in artifacts.files(storage, cfg.pairs, "pairs"):
        fs, p = storage.fs(path)
        with fs.open(p, "rb") as fh:
            t = pq.read_table(fh, columns=["image_id_a", "image_id_b"])
        seen.append(
            pc.unique(
                pa.concat_arrays([t.column(c).combine_chunks().cast(pa.string()) for c in ("image_id_a", "image_id_b")])
            )
        )
    return pc.unique(pa.concat_arrays(seen))


def _check_coverage(cfg: TrainConfig, storage: Storage, split: str) -> None:
    """Every image id training needs has exactly one embedding; else ValueError naming ids and why they lack one
    (an inner join would otherwise drop their pairs silently)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pcd_ray.embed.job import rejects_uri

    uri = storage.resolve(cfg.embeddings)
    have = artifacts.read_table(storage, cfg.embeddings, "embeddings", columns=["image_id"]).column("image_id")
    have = have.combine_chunks().cast(pa.string())
    if pc.count_distinct(have).as_py() != len(have):
        raise ValueError(
            f"{uri}: {len(have) - pc.count_distinct(have).as_py()} duplicate image ids; the images "
            f"artifact it was made from must have unique ids"
        )
    needed = _needed_image_ids(cfg, storage, split)
    missing = needed.filter(pc.invert(pc.is_in(needed, value_set=have)))
    if not len(missing):
        return
    why: dict[str, str] = {}
    if artifacts.exists(storage, rejects_uri(cfg.embeddings)):
        rej = artifacts.read_table(
            storage, rejects_uri(cfg.embeddings), "image_rejects", columns=["image_id", "reason", "detail"]
        )
        rej = rej.filter(pc.is_in(rej.column("image_id").cast(pa.string()), value_set=missing))
        why = {r["image_id"]: f"rejected: {r['reason']}: {r['detail']}" for r in rej.to_pylist()}
    ids = missing.to_pylist()
    examples = "; ".join(f"{i} ({why.get(i, 'not in the artifact')})" for i in ids[:5])
    needer = f"the {split!r} images" if cfg.data == "captions" else f"the pairs at {storage.resolve(cfg.pairs)}"
    raise ValueError(
        f"{uri}: {len(ids)} image(s) {needer} need have no embedding ({len(why)} rejected by "
        f"`pcd-ray embed`, {len(ids) - len(why)} never embedded -- check embed.split and embed.input), "
        f"e.g. {examples}"
    )


def joined_pairs(cfg: TrainConfig, storage: Storage, precomputed: bool):
    """pairs ⋈ diffs ⋈ images(a) ⋈ images(b): one row per kept difference sentence, with both images' bytes
    (``image_a``/``image_b``) or embeddings (``emb_a``/``emb_b``)."""
    pairs = artifacts.read_dataset(
        storage, cfg.pairs, "pairs", columns=["pair_id", "image_id_a", "image_id_b", "caption_a"]
    )
    diffs = artifacts.read_dataset(storage, cfg.diffs, "diffs", columns=["pair_id", "text"])
    n = max(1, cfg.scaling.num_workers * 2)
    ds = diffs.join(pairs, "inner", num_partitions=n, on=("pair_id",))
    images, value = _image_values(cfg, storage, precomputed)
    prefix = "emb" if precomputed else "image"
    for side in ("a", "b"):
        ds = ds.join(
            images.rename_columns({"image_id": f"image_id_{side}", value: f"{prefix}_{side}"}),
            "inner",
            num_partitions=n,
            on=(f"image_id_{side}",),
        )
    return ds.select_columns(["pair_id", "text", "caption_a", f"{prefix}_a", f"{prefix}_b"])


def caption_rows(cfg: TrainConfig, storage: Storage, precomputed: bool, split: str = "train"):
    """Image-caption rows of one split, named like the pair columns the loop reads (image_a or emb_a, caption_a)."""
    columns = ["image_id", "split", "caption"] + ([] if precomputed else ["image"])
    ds = artifacts.read_dataset(storage, cfg.images, "images", columns=columns)
    ds = ds.filter(lambda row: row["split"] == split)
    if not precomputed:  # the bytes are in the same rows: no join
        return ds.rename_columns({"image": "image_a", "caption": "caption_a"}).select_columns(["image_a", "caption_a"])
    embeddings, _ = _image_values(cfg, storage, precomputed, split)
    ds = ds.join(embeddings, "inner", num_partitions=max(1, cfg.scaling.num_workers * 2), on=("image_id",))
    return ds.rename_columns({"embedding": "emb_a", "caption": "caption_a"}).select_columns(["emb_a", "caption_a"])


def shuffled_per_epoch(ds, seed: int):
    """A global shuffle with a new order every epoch: Ray Data seeds each execution (one per epoch, as the train
    workers iterate their shards once per epoch) with (seed, execution index)."""
    from ray.data import RandomSeedConfig

    return ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def start_at_epoch(ds, epoch: int) -> None:
    """Make the next execution of ``ds`` draw epoch ``epoch``'s order (a resumed run starting mid-way).

    Sets Ray Data's per-dataset execution counter, a private field (ray 2.60; tests/train/test_epoch_shuffle.py
    pins the behaviour). Ray Train's split coordinator copies the dataset's context, counter included.
    """
    ds.context._execution_idx = epoch


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
    fn = {"spec_json": cfg.model.model_dump_json(), "storage_json": storage.portable_cfg().model_dump_json()}
    if cfg.epochs > 1 and rows * _ready_row_bytes(ds, fn) <= CACHE_BYTES:
        ds = ds.map_batches(preprocess_batch_fn, batch_size=256, num_cpus=1, fn_kwargs=fn).materialize()
        return shuffled_per_epoch(ds, cfg.seed), rows, precomputed
    ds = shuffled_per_epoch(ds, cfg.seed)
    return ds.map_batches(preprocess_batch_fn, batch_size=256, num_cpus=1, fn_kwargs=fn), rows, precomputed


CACHE_BYTES = 2 * 1024**3
"""A training set of several epochs whose model-ready tensors take at most this much is preprocessed once and kept in
Ray's object store; each epoch then only reshuffles it instead of decoding every image again (the demo's base
pretraining: 16,000 images of 64 px, 0.8 GB). Measuring a row costs one small Ray task at start-up. Larger ones (a
real dataset's pixels) stream: decoded and preprocessed again every epoch, overlapping the training. The
preprocessing is deterministic, so both give the same tensors."""


def _ready_row_bytes(ds, fn_kwargs: dict) -> int:
    """Bytes of one row after preprocessing, measured on the first row (in a Ray task, like the rest)."""
    batch = ds.limit(1).map_batches(preprocess_batch_fn, batch_size=1, num_cpus=1, fn_kwargs=fn_kwargs).take_batch(1)
    return sum(np.asarray(v).nbytes for v in batch.values())
