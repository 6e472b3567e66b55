"""Ordered image pairs: which two images each difference sentence will describe.

As in the paper, N images of one split are sampled first, then ordered random pairs (i, j), i != j, among them;
order matters because the text describes image i relative to image j. A pair's id depends only on its two image ids,
so the same pair keeps its id across runs, seeds and configs, and downstream artifacts (diffs, rejects) can be joined
or deduplicated on it.

This sampler runs on the driver: it holds one split's ids and captions (tens of MB for COCO-sized sets).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["pair_id", "image_id_a", "image_id_b", "caption_a", "caption_b", "attributes_a", "attributes_b"]


def pair_id(image_id_a: str, image_id_b: str) -> str:
    """Stable id of the ordered pair (a, b): "p-" + 16 hex digits of sha1; (b, a) gets a different id."""
    # NUL cannot occur in an id, so ("ab", "c") and ("a", "bc") cannot collide by concatenation.
    digest = hashlib.sha1(f"{image_id_a}\0{image_id_b}".encode()).hexdigest()
    return "p-" + digest[:16]


def sample_ordered_pairs(num_items: int, num_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``num_pairs`` distinct ordered pairs (i, j), i != j, of ``range(num_items)`` -> (i [P], j [P]) int64 arrays.

    Each pair is a code in [0, n(n-1)): code // (n-1) is i, and code % (n-1) is j with i skipped, so drawing codes
    without replacement gives no self pairs and no duplicates, in O(num_pairs) memory even when n(n-1) is huge.
    Raises ValueError if num_pairs exceeds n(n-1).
    """
    possible = num_items * (num_items - 1)
    if num_pairs > possible:
        raise ValueError(f"num_pairs={num_pairs} exceeds the {possible} ordered pairs of {num_items} images "
                         f"({num_items} x {num_items - 1}); lower pairs.num_pairs or raise pairs.num_images")
    codes = rng.choice(possible, size=num_pairs, replace=False)
    i = codes // (num_items - 1)
    j = codes % (num_items - 1)
    j = j + (j >= i)
    return i.astype(np.int64), j.astype(np.int64)


def _read_split(job, storage):
    """The images of pairs.split, sorted by image_id (shard order must not change the sample)."""
    import pyarrow.compute as pc

    from pcd_ray import artifacts

    cfg = job.pairs
    table = artifacts.read_table(storage, cfg.input, "images", columns=["image_id", "split", "caption", "attributes"],
                                 filters=[("split", "==", cfg.split)])
    if table.num_rows == 0:
        splits = artifacts.read_table(storage, cfg.input, "images", columns=["split"]).column("split").unique()
        raise ValueError(f"{storage.resolve(cfg.input)}: no images of split {cfg.split!r} "
                         f"(splits present: {sorted(s for s in splits.to_pylist() if s is not None)})")
    table = table.sort_by("image_id")
    ids = table.column("image_id")
    if ids.null_count:
        raise ValueError(f"{storage.resolve(cfg.input)}: {ids.null_count} images have a null image_id")
    if pc.count_distinct(ids).as_py() != table.num_rows:
        counts = pc.value_counts(ids)
        dups = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][:5]
        raise ValueError(f"{storage.resolve(cfg.input)}: duplicate image_id values, e.g. {dups}; "
                         f"pair ids would not be unique")
    return table


def sample_pairs(job, storage) -> dict[str, Any]:
    """Sample ``job.pairs.num_pairs`` ordered pairs of ``job.pairs.split`` images; write the pairs artifact.

    Returns the artifact's manifest. Deterministic in (images artifact, pairs config). Raises ValueError when the
    split is empty, image ids repeat, num_images exceeds the split, or num_pairs exceeds the possible pairs;
    ArtifactError when the images artifact is missing or lacks columns.
    """
    import pyarrow as pa

    from pcd_ray import artifacts

    cfg = job.pairs
    start = time.time()
    table = _read_split(job, storage)
    rng = np.random.default_rng(cfg.seed)
    num_split = table.num_rows
    if cfg.num_images is not None:
        if cfg.num_images > num_split:
            raise ValueError(f"pairs.num_images={cfg.num_images} exceeds the {num_split} images of split "
                             f"{cfg.split!r} in {storage.resolve(cfg.input)}")
        chosen = np.sort(rng.choice(num_split, size=cfg.num_images, replace=False))
        table = table.take(pa.array(chosen))
    if table.num_rows < 2:
        raise ValueError(f"split {cfg.split!r} of {storage.resolve(cfg.input)} has {table.num_rows} image(s); "
                         f"a pair needs two")
    i, j = sample_ordered_pairs(table.num_rows, cfg.num_pairs, rng)

    ids = table.column("image_id").to_pylist()
    a, b = pa.array(i), pa.array(j)
    out = pa.table({
        "pair_id": pa.array([pair_id(ids[x], ids[y]) for x, y in zip(i.tolist(), j.tolist())], pa.string()),
        "image_id_a": table.column("image_id").take(a),
        "image_id_b": table.column("image_id").take(b),
        "caption_a": table.column("caption").take(a),
        "caption_b": table.column("caption").take(b),
        "attributes_a": table.column("attributes").take(a).cast(pa.string()),
        "attributes_b": table.column("attributes").take(b).cast(pa.string()),
    })
    summary = {
        "split": cfg.split,
        "images_in_split": num_split,
        "images_sampled": table.num_rows,
        "possible_pairs": table.num_rows * (table.num_rows - 1),
        "num_pairs": out.num_rows,
        "wall_s": round(time.time() - start, 3),
    }
    manifest = artifacts.write_table(out, storage, cfg.output, "pairs", config=cfg.model_dump(mode="json"),
                                     summary=summary)
    log.info("pairs: %d ordered pairs among %d of %d %s images -> %s", out.num_rows, table.num_rows, num_split,
             cfg.split, storage.resolve(cfg.output))
    return manifest
