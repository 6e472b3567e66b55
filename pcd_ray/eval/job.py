"""The eval stage: images artifact + models -> difference accuracy (hard, easy), zero-shot, report files.

Per model: the image tower runs in a Ray Data actor pool (``embed_images``), the embeddings come back to the driver
ordered by image_id, the (few, distinct) prompts are encoded in the driver, and the scoring is plain numpy. Every
model sees the same images in the same order and the same seeds, hence the same pairs and sentences: the numbers
compare models, not samples.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import numpy as np

from pcd_ray import artifacts
from pcd_ray.config import EvalConfig, JobConfig, ModelSpec
from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 5  # embedding errors quoted in the report; the count is always complete


def _collect(ds):
    """A (small) Dataset as one pyarrow Table in the driver."""
    import pyarrow as pa
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables) if tables else None


def _parse_attributes(raw: Any) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def load_split(cfg: EvalConfig, storage: Storage):
    """(Dataset of the split's image_id + image, sorted image ids, attrs per id, rows without attributes).

    Raises ArtifactError for a missing artifact, ValueError when no image of the split has attributes.
    """
    from ray.data.expressions import col

    ds = artifacts.read_dataset(storage, cfg.images, "images", columns=["image_id", "split", "image", "attributes"])
    ds = ds.filter(expr=col("split") == cfg.split)
    meta = _collect(ds.select_columns(["image_id", "attributes"]))
    rows = meta.to_pylist() if meta is not None else []
    attrs = {r["image_id"]: _parse_attributes(r["attributes"]) for r in rows}
    ids = sorted(i for i, a in attrs.items() if a is not None)
    if not ids:
        raise ValueError(f"{storage.resolve(cfg.images)}: no images of split {cfg.split!r} with attributes "
                         f"({len(rows)} rows in the split); difference accuracy needs the synthetic set's attributes")
    return ds.select_columns(["image_id", "image"]), ids, attrs, len(rows) - len(ids)


def evaluate_model(name: str, spec: ModelSpec, ds, ids: list, attrs: dict, cfg: EvalConfig,
                   storage: Storage) -> dict:
    """One model's entry of the report (see ``report.py``)."""
    from pcd_ray.embed.images import embed_images
    from pcd_ray.eval.difference import difference_accuracy
    from pcd_ray.eval.zeroshot import zeroshot_accuracy
    from pcd_ray.model.factory import load_model

    t0 = time.time()
    log.info("eval %s: embedding %d images (%d actors)", name, len(ids), cfg.num_actors)
    table = _collect(embed_images(ds, spec, storage, batch_size=cfg.batch_size, num_actors=cfg.num_actors,
                                  num_gpus=cfg.num_gpus))
    rows = table.to_pylist() if table is not None else []
    emb = {r["image_id"]: r["embedding"] for r in rows if r["embedding"] is not None}
    errors = [f"{r['image_id']}: {r['error']}" for r in rows if r["embedding"] is None]
    kept = [i for i in ids if i in emb]  # sorted by image_id, the order every model shares
    if not kept:
        raise RuntimeError(f"eval {name}: no image could be embedded (first errors: {errors[:MAX_ERRORS_KEPT]})")
    image_emb = np.asarray([emb[i] for i in kept], dtype=np.float32)
    image_attrs = [attrs[i] for i in kept]
    t_embed = time.time() - t0

    log.info("eval %s: scoring difference accuracy and zero-shot", name)
    loaded = load_model(spec, storage)
    loaded.model.eval()
    encode = functools.partial(loaded.encode_texts, batch_size=cfg.batch_size)
    difference = {mode: difference_accuracy(image_emb, image_attrs, encode, seeds=cfg.seeds,
                                            pairs_per_attribute=cfg.pairs_per_attribute, mode=mode)
                  for mode in ("hard", "easy")}
    zeroshot = zeroshot_accuracy(image_emb, image_attrs, encode)
    hard = difference["hard"]["overall"]["accuracy"]
    log.info("eval %s: hard difference accuracy %s, zero-shot mean %s", name,
             "n/a" if hard is None else f"{hard:.1f}%",
             "n/a" if zeroshot["mean_accuracy"] is None else f"{zeroshot['mean_accuracy']:.1f}%")
    return {"source": loaded.source, "spec": spec.model_dump(mode="json"), "num_embedded": len(kept),
            "embedding_errors": len(errors), "errors": errors[:MAX_ERRORS_KEPT],
            "difference": difference, "zeroshot": zeroshot,
            "timings_s": {"embed": round(t_embed, 2), "score": round(time.time() - t0 - t_embed, 2)}}


def run_eval(job: JobConfig, storage: Storage) -> dict:
    """Evaluate every model of ``job.eval.models`` and write the report to ``job.eval.output``; returns the report.

    Raises ArtifactError (no images artifact), ValueError (no attributed images in the split), RuntimeError (a
    model embedded nothing), and load errors of a model spec.
    """
    from pcd_ray.data.attributes import ORDERED, ZEROSHOT_TEMPLATE
    from pcd_ray.eval.report import write_report
    from pcd_ray.runtime import init_ray

    cfg = job.eval
    init_ray(job.ray)
    t0 = time.time()
    ds, ids, attrs, unlabelled = load_split(cfg, storage)
    log.info("eval: %d %s images from %s (%d without attributes skipped)", len(ids), cfg.split,
             storage.resolve(cfg.images), unlabelled)
    models = {name: evaluate_model(name, spec, ds, ids, attrs, cfg, storage) for name, spec in cfg.models.items()}
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"images": storage.resolve(cfg.images), "split": cfg.split, "num_images": len(ids),
                 "skipped_without_attributes": unlabelled},
        "settings": {"seeds": list(cfg.seeds), "pairs_per_attribute": cfg.pairs_per_attribute,
                     "attributes": list(ORDERED), "zeroshot_template": ZEROSHOT_TEMPLATE,
                     "config": cfg.model_dump(mode="json")},
        "baseline": next(iter(cfg.models)),
        "models": models,
        "output": storage.resolve(cfg.output),
        "elapsed_s": round(time.time() - t0, 2),
    }
    paths = write_report(report, storage, cfg.output)
    log.info("eval: report written to %s", paths["md"])
    return report
