"""Ordered image pairs: which two images each difference sentence will describe.

As in the paper, N images of one split are sampled first, then ordered random pairs (i, j), i != j, among them;
order matters because the text describes image i relative to image j. At scale the pairs are drawn by Ray tasks,
never listed on the driver:

- the budget ``num_pairs`` (capped by ``max_pairs_per_image`` per first image) is spread evenly: every sampled image
  is the first image of ``budget // n`` pairs, and a seeded choice of ``budget % n`` images of one more;
- each task takes a fixed range of first images and draws their partners without replacement from the other n - 1
  images with ``default_rng([seed, task index])``, so the pairs depend only on the images, the config and the seed,
  not on the number of workers, and no pair can occur twice (its first image's task is the only one that draws it);
- a pair's id depends only on its two image ids, so it keeps its id across runs, seeds and configs, and downstream
  artifacts (diffs, rejects) can be joined, resumed or deduplicated on it.

The driver holds the sampled images' ids and captions (columns only, no image bytes: tens of MB for a million
images) and ships them to the tasks once through the object store.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pcd_ray.config import JobConfig
    from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["pair_id", "image_id_a", "image_id_b", "caption_a", "caption_b", "attributes_a", "attributes_b"]


def pair_id(image_id_a: str, image_id_b: str) -> str:
    """Stable id of the ordered pair (a, b): "p-" + 16 hex digits of sha1; (b, a) gets a different id."""
    # NUL cannot occur in an id, so ("ab", "c") and ("a", "bc") cannot collide by concatenation.
    digest = hashlib.sha1(f"{image_id_a}\0{image_id_b}".encode()).hexdigest()
    return "p-" + digest[:16]


def pairs_per_anchor(n: int, num_pairs: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """How many pairs each of n images is the first image of: [n] int64 summing to min(num_pairs, n * cap).

    Raises ValueError if num_pairs exceeds the n(n-1) ordered pairs.
    """
    possible = n * (n - 1)
    if num_pairs > possible:
        raise ValueError(
            f"num_pairs={num_pairs} exceeds the {possible} ordered pairs of {n} images "
            f"({n} x {n - 1}); lower pairs.num_pairs or raise pairs.num_images"
        )
    per_image = min(cap or n - 1, n - 1)
    total = min(num_pairs, n * per_image)
    counts = np.full(n, total // n, dtype=np.int64)
    counts[rng.choice(n, size=total % n, replace=False)] += 1
    return counts


def draw_partners(first: int, counts: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Partners of first images first, first+1, ...: for image i, counts[k] distinct j != i. -> (i [P], j [P])."""
    a, b = [], []
    for k, m in enumerate(counts.tolist()):
        if m == 0:
            continue
        i = first + k
        # Draw from the n - 1 other images: index >= i shifts by one, so i itself is never drawn.
        j = rng.choice(n - 1, size=m, replace=False)
        a.append(np.full(m, i, dtype=np.int64))
        b.append(j + (j >= i))
    if not a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(a), np.concatenate(b).astype(np.int64)


def _pairs_task(batch: dict[str, np.ndarray], images, counts: np.ndarray, anchors_per_task: int, seed: int):
    """Ray Data UDF: task indices -> the pair rows of their first images."""
    import pyarrow as pa

    n = images.num_rows
    ids = images.column("image_id")
    out = []
    for task in batch["id"].tolist():
        first = task * anchors_per_task
        i, j = draw_partners(first, counts[first : first + anchors_per_task], n, np.random.default_rng([seed, task]))
        ai, bj = pa.array(i), pa.array(j)
        id_a, id_b = ids.take(ai), ids.take(bj)
        out.append(
            pa.table(
                {
                    "pair_id": pa.array(
                        [pair_id(x, y) for x, y in zip(id_a.to_pylist(), id_b.to_pylist())], pa.string()
                    ),
                    "image_id_a": id_a,
                    "image_id_b": id_b,
                    "caption_a": images.column("caption").take(ai),
                    "caption_b": images.column("caption").take(bj),
                    "attributes_a": images.column("attributes").take(ai).cast(pa.string()),
                    "attributes_b": images.column("attributes").take(bj).cast(pa.string()),
                }
            )
        )
    return pa.concat_tables(out)


def _read_split(job, storage):
    """The images of pairs.split (id, caption, attributes: no image bytes), sorted by image_id (shard order must
    not change the sample)."""
    import pyarrow.compute as pc

    from pcd_ray import artifacts

    cfg = job.pairs
    table = artifacts.read_table(
        storage,
        cfg.input,
        "images",
        columns=["image_id", "split", "caption", "attributes"],
        filters=[("split", "==", cfg.split)],
    )
    if table.num_rows == 0:
        splits = artifacts.read_table(storage, cfg.input, "images", columns=["split"]).column("split").unique()
        raise ValueError(
            f"{storage.resolve(cfg.input)}: no images of split {cfg.split!r} "
            f"(splits present: {sorted(s for s in splits.to_pylist() if s is not None)})"
        )
    table = table.sort_by("image_id")
    ids = table.column("image_id")
    if ids.null_count:
        raise ValueError(f"{storage.resolve(cfg.input)}: {ids.null_count} images have a null image_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)
        dups = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise ValueError(
            f"{storage.resolve(cfg.input)}: duplicate image_id values, e.g. {dups}; pair ids would not be unique"
        )
    return table.select(["image_id", "caption", "attributes"])


def sample_pairs(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Sample ``job.pairs.num_pairs`` ordered pairs of ``job.pairs.split`` images; write the pairs artifact.

    Returns the artifact's manifest. Deterministic in (images artifact, pairs config). Raises ValueError when the
    split is empty, image ids repeat, num_images exceeds the split, or num_pairs exceeds the possible pairs;
    ArtifactError when the images artifact is missing or lacks columns.
    """
    import pyarrow as pa
    import ray.data

    from pcd_ray import artifacts
    from pcd_ray.runtime import init_ray

    cfg = job.pairs
    start = time.time()
    table = _read_split(job, storage)
    rng = np.random.default_rng([cfg.seed, 0])
    num_split = table.num_rows
    if cfg.num_images is not None:
        if cfg.num_images > num_split:
            raise ValueError(
                f"pairs.num_images={cfg.num_images} exceeds the {num_split} images of split "
                f"{cfg.split!r} in {storage.resolve(cfg.input)}"
            )
        chosen = np.sort(rng.choice(num_split, size=cfg.num_images, replace=False))
        table = table.take(pa.array(chosen))
    n = table.num_rows
    if n < 2:
        raise ValueError(f"split {cfg.split!r} of {storage.resolve(cfg.input)} has {n} image(s); a pair needs two")
    counts = pairs_per_anchor(n, cfg.num_pairs, cfg.max_pairs_per_image, rng)
    init_ray(job.ray)
    num_tasks = -(-n // cfg.anchors_per_task)
    ds = ray.data.range(num_tasks, override_num_blocks=num_tasks).map_batches(
        _pairs_task,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"images": table, "counts": counts, "anchors_per_task": cfg.anchors_per_task, "seed": cfg.seed},
    )
    summary = {
        "split": cfg.split,
        "images_in_split": num_split,
        "images_sampled": n,
        "possible_pairs": n * (n - 1),
        "num_pairs": int(counts.sum()),
        "max_pairs_per_image": int(counts.max()),
        # The generate stage's exactly-once check relies on this (ids are sha1 of distinct ordered id pairs).
        "unique_pair_ids": True,
    }
    manifest = artifacts.write_dataset(
        ds, storage, cfg.output, "pairs", config=cfg.model_dump(mode="json"), summary=summary
    )
    if manifest["num_rows"] != summary["num_pairs"]:
        raise RuntimeError(f"pairs: wrote {manifest['num_rows']} rows, expected {summary['num_pairs']}")
    manifest = artifacts.update_summary(storage, cfg.output, wall_s=round(time.time() - start, 3))
    log.info(
        "pairs: %d ordered pairs among %d of %d %s images -> %s",
        manifest["num_rows"],
        n,
        num_split,
        cfg.split,
        storage.resolve(cfg.output),
    )
    return manifest
