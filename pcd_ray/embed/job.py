"""``pcd-ray embed``: the frozen image tower run once over the images artifact, as the paper does.

    images (image_id, split, image)  --Ray Data actor pool (embed/images.py; GPU actors on a cluster)-->
        embeddings (image_id, model, embedding list<float32>)  +  <output>_rejects (image_id, source, reason, detail)

The actors' output streams into Parquet shards written by Ray tasks (``pcd_ray.sink``, as the data and generate
stages do): no embedding passes through the driver and nothing is held in the object store for the whole set.
Every input row ends in exactly one of the two artifacts, checked before the stage returns. Besides the section's
config the embeddings manifest records the model's source string, ``embed_dim``, and which commit of which images
artifact was embedded; training reads the artifact only when its own model and images match (``train/data.py``).

``embed_split`` is the same embed-then-split step for the train stage's inline path (no artifact written).
"""

from __future__ import annotations

import logging
from typing import Any

from pcd_ray.config import JobConfig, ModelSpec
from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

EMBEDDING_COLUMNS = ["image_id", "model", "embedding"]
REJECT_COLUMNS = ["image_id", "source", "reason", "detail"]
REJECT_SOURCE = "embed"


def rejects_uri(output: str) -> str:
    """Where the rejects of an embeddings artifact live: beside it, ``<output>_rejects``."""
    return output.rstrip("/") + "_rejects"


def split_rows(batch):
    """One batch of ``embed_images(..., reasons=True)`` output -> (embedded rows [EMBEDDING_COLUMNS], reject rows
    [REJECT_COLUMNS]).

    A row is rejected exactly when its ``reason`` is set; every row lands in one of the two tables.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    ok = pc.is_null(batch.column("reason"))
    bad = batch.filter(pc.invert(ok))
    rejects = pa.table(
        {
            "image_id": bad.column("image_id").cast(pa.string()),
            "source": pa.array([REJECT_SOURCE] * bad.num_rows, pa.string()),
            "reason": bad.column("reason"),
            "detail": bad.column("error"),
        }
    )
    return batch.filter(ok).select(EMBEDDING_COLUMNS), rejects


def _embedded_part(batch):
    return split_rows(batch)[0]


def _rejected_part(batch):
    return split_rows(batch)[1]


def embed_split(
    ds,
    spec: ModelSpec,
    storage: Storage,
    *,
    batch_size: int = 256,
    num_actors: int = 1,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    init_seed: int | None = None,
):
    """Embed every row of ``ds`` (image_id + image bytes) once; returns (embedded, rejected) Datasets.

    The image tower runs once (its output is materialised); both results are views of that one pass, split by
    ``split_rows``. Used by the train stage when no embeddings artifact is configured.
    """
    from pcd_ray.embed.images import embed_images

    out = embed_images(
        ds,
        spec,
        storage,
        batch_size=batch_size,
        num_actors=num_actors,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        init_seed=init_seed,
        reasons=True,
    ).materialize()
    return (
        out.map_batches(_embedded_part, batch_format="pyarrow", batch_size=None),
        out.map_batches(_rejected_part, batch_format="pyarrow", batch_size=None),
    )


def block_stats(batch, embed_dim: int) -> dict[str, Any]:
    """Per-block stats (run in the write tasks): the model's source string. Raises RuntimeError when an embedding
    is not ``embed_dim`` wide, before the block is written."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(batch.column("embedding"))
    wrong = {w for w in (pc.min(lengths).as_py(), pc.max(lengths).as_py()) if w is not None} - {embed_dim}
    if wrong:
        raise RuntimeError(
            f"embed: the model wrote {min(wrong)}-wide embeddings, its config says embed_dim={embed_dim}"
        )
    embedded = batch.filter(pc.is_valid(batch.column("embedding")))
    return {"model": embedded.column("model")[0].as_py() if embedded.num_rows else ""}


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
        raise ValueError(
            f"{storage.resolve(cfg.input)}: no images of split {cfg.split!r} (embed.split; splits present: {present})"
        )
    return ds.filter(expr=col("split") == cfg.split), rows, manifest


def run_embed(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Embed ``job.embed.input`` into ``job.embed.output`` (+ its rejects); returns the summary.

    The summary (also in both manifests): rows (input rows), embedded, rejected, rejected_by_reason, model (source
    string), embed_dim, wall_s, images_per_s. Raises ArtifactError when the images artifact is missing, ValueError
    when the split is empty, FileNotFoundError / RuntimeError when the model cannot be loaded, and RuntimeError if
    the rows written do not add up to the rows read (the artifacts are then left incomplete).
    """
    import functools

    from pcd_ray.embed.images import embed_images
    from pcd_ray.model.factory import load_processors
    from pcd_ray.runtime import init_ray
    from pcd_ray.sink import Output, Sink

    cfg = job.embed
    init_ray(job.ray)
    # Reads only the model's config: a wrong model fails here, before any actor starts.
    embed_dim = int(load_processors(cfg.model, storage)[2]["embed_dim"])
    ds, rows_in, images_manifest = _input(cfg, storage)
    sink = Sink(
        storage,
        "embed",
        unit="image",
        kept=Output(cfg.output, "embeddings", EMBEDDING_COLUMNS),
        rejected=Output(rejects_uri(cfg.output), "image_rejects", REJECT_COLUMNS),
        config=cfg.model_dump(mode="json"),
    )
    log.info(
        "embed: %d images of %s (split %s) with %s on %d actor(s) x %g GPU -> %s",
        rows_in,
        storage.resolve(cfg.input),
        cfg.split or "all",
        cfg.model.checkpoint or cfg.model.name,
        cfg.num_actors,
        cfg.num_gpus_per_actor,
        sink.kept.base,
    )

    def model(t) -> str | None:
        return (t.stats.get("model") or [None])[0]

    return sink.run(
        ds,
        lambda rows: embed_images(
            rows,
            cfg.model,
            storage,
            batch_size=cfg.batch_size,
            num_actors=cfg.num_actors,
            num_gpus=cfg.num_gpus_per_actor,
            num_cpus=cfg.num_cpus_per_actor,
            reasons=True,
        ),
        expected=rows_in,
        split=split_rows,
        stats=functools.partial(block_stats, embed_dim=embed_dim),
        summary=lambda t: {
            "rows": rows_in,
            "embedded": t.kept,
            "split": cfg.split,
            "model": model(t),
            "embed_dim": embed_dim,
            "num_actors": cfg.num_actors,
            "num_gpus_per_actor": cfg.num_gpus_per_actor,
            "images_per_s": round(t.per_s(rows_in), 1),
        },
        # What training checks before it uses the artifact (train/data.py): which model, which commit of which images.
        manifest=lambda t: {
            "model": model(t),
            "embed_dim": embed_dim,
            "input": storage.resolve(cfg.input),
            "input_attempt": images_manifest.get("attempt"),
        },
    )
