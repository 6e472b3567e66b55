"""``pcd-ray embed``: the frozen image tower run once over the images artifact, as the paper does.

    images (image_id, split, image)  --Ray Data actor pool (embed/images.py; GPU actors on a cluster)-->
        embeddings (image_id, model, embedding list<float32>)  +  <output>_rejects (image_id, source, reason, detail)

The actors' output streams into Parquet shards written by Ray tasks (``artifacts.Appender`` + ``put_shard``, the
readers' pattern): no embedding passes through the driver and nothing is held in the object store for the whole
set. Every input row ends in exactly one of the two artifacts, checked before the stage returns. Besides the
section's config (what ``pipeline.Stage.up_to_date`` compares) the embeddings manifest records the model's source
string, ``embed_dim``, and which commit of which images artifact was embedded; training reads the artifact only
when its own model and images match (``train/data.py``).

``embed_split`` is the same embed-then-split-errors step for the train stage's inline path (no artifact written).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from typing import Any

from pcd_ray.config import ModelSpec
from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

EMBEDDING_COLUMNS = ["image_id", "model", "embedding"]
REJECT_COLUMNS = ["image_id", "source", "reason", "detail"]
REJECT_SOURCE = "embed"


def rejects_uri(output: str) -> str:
    """Where the rejects of an embeddings artifact live: beside it, ``<output>_rejects``."""
    return output.rstrip("/") + "_rejects"


def _reason(error: str) -> str:
    """ImageEmbedder's error text -> a reason code, the readers' codes where they mean the same (data/readers.py)."""
    if error == "missing image bytes":
        return "missing_image"
    if error.startswith("preprocess failed"):
        return "preprocess_failed"
    if "over the limit" in error or "too large" in error:
        return "image_too_large"
    return "corrupt_image"


def split_rows(batch):
    """One batch of ``embed_images`` output -> (embedded rows [EMBEDDING_COLUMNS], reject rows [REJECT_COLUMNS]).

    A row is rejected exactly when its ``error`` is set; every row lands in one of the two tables.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.is_null(batch.column("error"))
    good = batch.filter(ok).select(EMBEDDING_COLUMNS)
    bad = batch.filter(pc.invert(ok))
    errors = bad.column("error").to_pylist()
    rejects = pa.table({
        "image_id": bad.column("image_id").cast(pa.string()),
        "source": pa.array([REJECT_SOURCE] * bad.num_rows, pa.string()),
        "reason": pa.array([_reason(e) for e in errors], pa.string()),
        "detail": pa.array(errors, pa.string()),
    })
    return good, rejects


def _embedded_part(batch):
    return split_rows(batch)[0]


def _rejected_part(batch):
    return split_rows(batch)[1]


def embed_split(ds, spec: ModelSpec, storage: Storage, *, batch_size: int = 256, num_actors: int = 1,
                num_gpus: float = 0, num_cpus: float | None = None, init_seed: int | None = None):
    """Embed every row of ``ds`` (image_id + image bytes) once; returns (embedded, rejected) Datasets.

    The image tower runs once (its output is materialised); both results are views of that one pass, split by
    ``split_rows``. Used by the train stage when no embeddings artifact is configured.
    """
    from pcd_ray.embed.images import embed_images

    out = embed_images(ds, spec, storage, batch_size=batch_size, num_actors=num_actors, num_gpus=num_gpus,
                       num_cpus=num_cpus, init_seed=init_seed).materialize()
    return (out.map_batches(_embedded_part, batch_format="pyarrow", batch_size=None),
            out.map_batches(_rejected_part, batch_format="pyarrow", batch_size=None))


def write_shards(batch, storage: Storage, embeddings_dir: str, rejects_dir: str):
    """map_batches UDF: embed_images output -> an embeddings shard and a rejects shard; one row of names and counts
    (plus the model source and embedding width, which the driver records in the manifest)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pcd_ray.artifacts import put_shard

    good, bad = split_rows(batch)
    dim = 0
    if good.num_rows:
        lengths = pc.list_value_length(good.column("embedding"))
        dim = int(pc.max(lengths).as_py())
        if pc.min(lengths).as_py() != dim:
            raise RuntimeError(f"embeddings of different widths in one batch ({pc.min(lengths).as_py()}..{dim})")
    return pa.table({
        "embeddings": [put_shard(storage, good, embeddings_dir) if good.num_rows else ""],
        "embeddings_rows": [good.num_rows],
        "rejects": [put_shard(storage, bad, rejects_dir) if bad.num_rows else ""],
        "rejects_rows": [bad.num_rows],
        "reasons": [json.dumps(Counter(bad.column("reason").to_pylist()))],
        "model": [good.column("model")[0].as_py() if good.num_rows else ""],
        "embed_dim": [dim],
    })


class _Progress:
    """A progress bar in a terminal; a log line every 30 s otherwise (job logs, CI)."""

    def __init__(self, total: int):
        self.total, self.t0, self.last, self.done = total, time.time(), time.time(), 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True)

    def update(self, n: int, rejected: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(rejected=rejected)
        elif time.time() - self.last >= 30:
            self.last = time.time()
            log.info("embed: %d/%d images (%.1f%%), %d rejected, %.1f images/s", self.done, self.total,
                     100 * self.done / max(self.total, 1), rejected, self.done / max(time.time() - self.t0, 1e-9))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _input(cfg, storage: Storage):
    """(Dataset of image_id + image bytes of the configured split, its row count, the images manifest)."""
    import pyarrow.compute as pc

    from pcd_ray import artifacts

    manifest = artifacts.read_manifest(storage, cfg.input, "images")
    ds = artifacts.read_dataset(storage, cfg.input, "images", columns=["image_id", "split", "image"])
    if cfg.split is None:
        return ds, int(manifest["num_rows"]), manifest
    from ray.data.expressions import col

    splits = artifacts.read_table(storage, cfg.input, "images", columns=["split"]).column("split")
    rows = int(pc.sum(pc.equal(splits, cfg.split)).as_py() or 0)
    if rows == 0:
        present = sorted(s for s in splits.unique().to_pylist() if s is not None)
        raise ValueError(f"{storage.resolve(cfg.input)}: no images of split {cfg.split!r} "
                         f"(embed.split; splits present: {present})")
    return ds.filter(expr=col("split") == cfg.split), rows, manifest


def run_embed(job, storage: Storage) -> dict[str, Any]:
    """Embed ``job.embed.input`` into ``job.embed.output`` (+ its rejects); returns the summary.

    The summary (also in both manifests): rows (input rows), embedded, rejected, rejected_by_reason, model (source
    string), embed_dim, wall_s, images_per_s. Raises ArtifactError when the images artifact is missing, ValueError
    when the split is empty, FileNotFoundError / RuntimeError when the model cannot be loaded, and RuntimeError if
    the rows written do not add up to the rows read.
    """
    from pcd_ray import artifacts
    from pcd_ray.embed.images import embed_images
    from pcd_ray.model.factory import load_processors
    from pcd_ray.runtime import init_ray

    cfg = job.embed
    init_ray(job.ray)
    start = time.time()
    # Reads only the model's config: a wrong model fails here, before any actor starts.
    embed_dim = int(load_processors(cfg.model, storage)[2]["embed_dim"])
    ds, rows_in, images_manifest = _input(cfg, storage)
    config = cfg.model_dump(mode="json")
    embeddings = artifacts.Appender(storage, cfg.output, "embeddings", columns=EMBEDDING_COLUMNS, config=config,
                                    identity=None, resume=False)
    rejects = artifacts.Appender(storage, rejects_uri(cfg.output), "image_rejects", columns=REJECT_COLUMNS,
                                 config=config, identity=None, resume=False)
    log.info("embed: %d images of %s (split %s) with %s on %d actor(s) x %g GPU -> %s", rows_in,
             storage.resolve(cfg.input), cfg.split or "all", cfg.model.checkpoint or cfg.model.name, cfg.num_actors,
             cfg.num_gpus_per_actor, embeddings.base)
    out = embed_images(ds, cfg.model, storage, batch_size=cfg.batch_size, num_actors=cfg.num_actors,
                       num_gpus=cfg.num_gpus_per_actor, num_cpus=cfg.num_cpus_per_actor)
    out = out.map_batches(write_shards, fn_args=(storage, embeddings.staging, rejects.staging),
                          batch_format="pyarrow", batch_size=None)
    by_reason: Counter = Counter()
    source = None
    progress = _Progress(rows_in)
    try:
        for row in out.iter_rows():
            if row["embeddings"]:
                embeddings.add(row["embeddings"], row["embeddings_rows"])
                source = source or row["model"]
                if row["embed_dim"] != embed_dim:
                    raise RuntimeError(f"embed: the model wrote {row['embed_dim']}-wide embeddings, its config "
                                       f"says embed_dim={embed_dim}")
            if row["rejects"]:
                rejects.add(row["rejects"], row["rejects_rows"])
            by_reason.update(json.loads(row["reasons"]))
            progress.update(row["embeddings_rows"] + row["rejects_rows"], rejects.total_rows)
    finally:
        progress.close()
    wall = time.time() - start
    embedded, rejected = embeddings.total_rows, rejects.total_rows
    if embedded + rejected != rows_in:  # nothing silently lost (or doubled by a retried task)
        raise RuntimeError(f"embed: read {rows_in} images of {storage.resolve(cfg.input)} but wrote {embedded} "
                           f"embeddings + {rejected} rejects; the artifacts were left uncommitted")
    summary = {"rows": rows_in, "embedded": embedded, "rejected": rejected,
               "rejected_by_reason": dict(sorted(by_reason.items())), "split": cfg.split, "model": source,
               "embed_dim": embed_dim, "num_actors": cfg.num_actors, "num_gpus_per_actor": cfg.num_gpus_per_actor,
               "wall_s": round(wall, 3), "images_per_s": round(rows_in / max(wall, 1e-9), 1)}
    # What training checks before it uses the artifact (train/data.py): which images, which commit of them.
    embeddings.manifest.update(model=source, embed_dim=embed_dim, input=storage.resolve(cfg.input),
                               input_attempt=images_manifest.get("attempt"))
    rejects.commit(summary, complete=True)
    embeddings.commit(summary, complete=True)
    log.info("embed: %d images embedded, %d rejected %s in %.1f s (%.1f images/s) -> %s", embedded, rejected,
             summary["rejected_by_reason"], wall, summary["images_per_s"], embeddings.base)
    return summary
