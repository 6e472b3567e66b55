"""The eval stage: models x evaluation sets -> stored embeddings -> every task's numbers -> report files.

Per model and set, the image tower runs in a Ray Data actor pool (``embed_images``; GPU actors on a cluster) and its
output is committed as an ``embeddings`` artifact under ``<output>/embeddings/<model>/<set>``; the metrics are then
computed in the driver from that stored table (plain numpy, chunked where it grows with n^2), so a 100k-image test
set is one Ray Data job plus a table read. Prompts and sentences are few and distinct and are encoded in the driver.
Every model sees the same images in the same order and the same seeds, hence the same pairs and sentences: the
numbers compare models, not samples.

Comparative prompting and the difference distances read their class comparatives from the comparatives artifact
(``eval.comparatives``, written by ``pcd-ray comparatives``): a dataset's rows by its name, the synthetic set's by
``synthetic/<task>``. A dataset's own ``comparatives`` file takes precedence; a set without comparatives skips those
tasks. The report names the artifact and the commit it read.
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
from pcd_ray.eval.protocol import get as get_protocol
from pcd_ray.eval.synthetic_suite import SYNTHETIC
from pcd_ray.storage import Storage, join

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 5  # embedding errors quoted in the report; the count is always complete
COMPARATIVES_KIND = "comparatives"
"""The kind of the comparatives artifact (``pcd-ray comparatives`` writes it, eval reads it)."""


class TextCache:
    """A model's text encoder that encodes each distinct text once (tasks share prompts; captions repeat)."""

    def __init__(self, encode):
        self.encode = encode
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            self.cache.update(zip(new, self.encode(new)))
        return np.stack([self.cache[t] for t in texts]) if len(texts) else self.encode([])


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
    """(Dataset of image_id + image, sorted image ids, attrs per id, captions per id, rows without attributes).

    Raises ArtifactError for a missing artifact, ValueError when no image of the split has attributes.
    """
    from ray.data.expressions import col

    ds = artifacts.read_dataset(
        storage, cfg.images, "images", columns=["image_id", "split", "image", "attributes", "caption"]
    )
    ds = ds.filter(expr=col("split") == cfg.split)
    meta = _collect(ds.select_columns(["image_id", "attributes", "caption"]))
    rows = meta.to_pylist() if meta is not None else []
    attrs = {r["image_id"]: _parse_attributes(r["attributes"]) for r in rows}
    captions = {r["image_id"]: r["caption"] or "" for r in rows}
    ids = sorted(i for i, a in attrs.items() if a is not None)
    if not ids:
        raise ValueError(
            f"{storage.resolve(cfg.images)}: no images of split {cfg.split!r} with attributes "
            f"({len(rows)} rows in the split); difference accuracy needs the synthetic set's attributes"
        )
    return ds.select_columns(["image_id", "image"]), ids, attrs, captions, len(rows) - len(ids)


def stored_embeddings(
    ds, ids: list, spec: ModelSpec, uri: str, cfg: EvalConfig, storage: Storage
) -> tuple[np.ndarray, list[int], list[str]]:
    """Embed ``ds`` into the embeddings artifact at ``uri`` and read it back.

    Returns (embeddings [m, D] float32 in ``ids`` order, positions in ``ids`` that were embedded, error strings).
    """
    from pcd_ray.embed.images import embed_images

    t0 = time.time()
    embedded = embed_images(
        ds, spec, storage, batch_size=cfg.batch_size, num_actors=cfg.num_actors, num_gpus=cfg.num_gpus
    )
    artifacts.write_dataset(embedded, storage, uri, "embeddings", config=spec.model_dump(mode="json"))
    table = artifacts.read_table(storage, uri, "embeddings", columns=["image_id", "embedding", "error"])
    artifacts.update_summary(storage, uri, rows=table.num_rows, elapsed_s=round(time.time() - t0, 2))
    # Column-wise (no per-float Python objects): a 100k x 768 table converts in about two seconds.
    ok = table.column("embedding").is_valid().to_numpy(zero_copy_only=False)
    errors = [
        f"{i}: {e}"
        for i, e in zip(table.filter(~ok).column("image_id").to_pylist(), table.filter(~ok).column("error").to_pylist())
    ]
    good = table.filter(ok)
    flat = good.column("embedding").combine_chunks().flatten().to_numpy() if good.num_rows else np.zeros(0)
    matrix = flat.reshape(good.num_rows, -1).astype(np.float32, copy=False)
    row = {i: k for k, i in enumerate(good.column("image_id").to_pylist())}
    kept = [k for k, i in enumerate(ids) if i in row]
    return matrix[[row[ids[k]] for k in kept]], kept, errors


def read_comparatives_artifact(cfg: EvalConfig, storage: Storage) -> tuple[dict[str, list[dict]], dict | None]:
    """The comparatives artifact's rows by dataset, and what the report says of it: {"uri", "commit", "rows",
    "complete", "sets": {set: pairs read}} ("commit" None when there is none at the URI; None when
    ``eval.comparatives`` is null)."""
    if cfg.comparatives is None:
        return {}, None
    uri = storage.resolve(cfg.comparatives)
    if not artifacts.exists(storage, uri):
        log.warning(
            "eval: no comparatives artifact at %s (pcd-ray comparatives writes it); comparative prompting and "
            "the difference distances run only for datasets with their own comparatives file",
            uri,
        )
        return {}, {"uri": uri, "commit": None, "rows": 0, "complete": None, "sets": {}}
    manifest = artifacts.read_manifest(storage, uri, COMPARATIVES_KIND)
    if not manifest.get("complete", True):
        log.warning(
            "eval: the comparatives artifact at %s is incomplete (a comparatives run was stopped); reading the "
            "%d rows it committed",
            uri,
            manifest["num_rows"],
        )
    table = artifacts.read_table(storage, uri, COMPARATIVES_KIND, columns=["dataset", "class_i", "class_j", "text"])
    by_dataset: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_dataset.setdefault(row["dataset"], []).append(row)
    return by_dataset, {
        "uri": uri,
        "commit": manifest.get("attempt"),
        "rows": table.num_rows,
        "complete": manifest.get("complete", True),
        "sets": {},
    }


def _read_inputs(
    name: str, dcfg, ds, storage: Storage, artifact_rows: list[dict] | None, artifact: dict | None
) -> dict:
    """Files a dataset's tasks need, read once for every model (pair texts, comparatives)."""
    from pcd_ray.eval.dataset_suite import read_comparatives
    from pcd_ray.eval.pair_texts import load_pair_texts

    out: dict = {}
    if dcfg.differences:
        texts = load_pair_texts(storage, dcfg.differences, ds)
        out["pair_rows"], out["differences_source"] = texts.rows, texts.source
        log.info(
            "eval %s: %d difference sentences from %s %s (%d rows not in the split skipped)",
            name,
            len(texts.rows),
            texts.source["kind"],
            texts.source["uri"],
            texts.skipped,
        )
    if dcfg.comparatives:
        out["comparatives"] = read_comparatives(storage, dcfg.comparatives, ds)
        out["comparatives_source"] = storage.resolve(dcfg.comparatives)
    elif artifact_rows:
        out["comparatives"] = read_comparatives(storage, artifact["uri"], ds, rows=artifact_rows)
        out["comparatives_source"] = artifact["uri"]
        artifact["sets"][name] = len(out["comparatives"])
    return out


def _synthetic_comparatives(by_dataset: dict[str, list[dict]], artifact: dict | None) -> dict:
    """{task: {(i, j): text}} of the synthetic set's comparative tasks that the artifact has rows for."""
    from pcd_ray.eval.synthetic_suite import COMPARATIVE_TASKS, comparatives_name, task_comparatives

    out = {}
    for task in COMPARATIVE_TASKS:
        comps = task_comparatives(task, by_dataset.get(comparatives_name(task), []))
        if comps:
            out[task] = comps
            artifact["sets"][comparatives_name(task)] = len(comps)
    return out


def evaluate_model(name: str, spec: ModelSpec, sets: dict, cfg: EvalConfig, storage: Storage) -> dict:
    """One model's entry of the report (see ``report.py``); ``sets`` is what ``run_eval`` read."""
    from pcd_ray.eval.dataset_suite import evaluate_dataset
    from pcd_ray.eval.synthetic_suite import evaluate_synthetic
    from pcd_ray.model.factory import load_model

    loaded = load_model(spec, storage)
    loaded.model.eval()
    encode = TextCache(functools.partial(loaded.encode_texts, batch_size=cfg.batch_size))
    entry: dict = {"source": loaded.source, "spec": spec.model_dump(mode="json"), "datasets": {}, "timings_s": {}}
    for set_name, s in sets.items():
        t0 = time.time()
        uri = join(storage.resolve(cfg.output), "embeddings", name, set_name)
        log.info(
            "eval %s/%s: embedding %d images (%d actors), then scoring", name, set_name, len(s["ids"]), cfg.num_actors
        )
        emb, kept, errors = stored_embeddings(s["ray"], s["ids"], spec, uri, cfg, storage)
        if not kept:
            raise RuntimeError(
                f"eval {name}/{set_name}: no image could be embedded (first errors: {errors[:MAX_ERRORS_KEPT]})"
            )
        t_embed = time.time() - t0
        if set_name == SYNTHETIC:
            kept_ids = [s["ids"][k] for k in kept]
            result = evaluate_synthetic(
                emb,
                [s["attrs"][i] for i in kept_ids],
                [s["captions"][i] for i in kept_ids],
                encode,
                cfg,
                s["comparatives"],
            )
            entry.update(
                result,
                num_embedded=len(kept),
                embedding_errors=len(errors),
                errors=errors[:MAX_ERRORS_KEPT],
                embeddings=uri,
            )
        else:
            ds = s["set"].subset(np.asarray(kept))
            result = evaluate_dataset(ds, emb, encode, s["cfg"], cfg, storage, s["inputs"])
            entry["datasets"][set_name] = {
                **result,
                "num_embedded": len(kept),
                "embedding_errors": len(errors),
                "errors": errors[:MAX_ERRORS_KEPT],
                "embeddings": uri,
            }
        entry["timings_s"][set_name] = {"embed": round(t_embed, 2), "score": round(time.time() - t0 - t_embed, 2)}
    return entry


def read_sets(cfg: EvalConfig, storage: Storage) -> tuple[dict, dict]:
    """Every evaluation set, read once: ({set name: what evaluate_model needs}, the report's data section)."""
    from pcd_ray.eval.datasets import read_dataset

    sets: dict = {}
    by_dataset, artifact = read_comparatives_artifact(cfg, storage)
    data: dict = {"datasets": {}, "comparatives": artifact}
    if cfg.images is not None:
        ds, ids, attrs, captions, unlabelled = load_split(cfg, storage)
        log.info(
            "eval: %d %s images from %s (%d without attributes skipped)",
            len(ids),
            cfg.split,
            storage.resolve(cfg.images),
            unlabelled,
        )
        sets[SYNTHETIC] = {
            "ray": ds,
            "ids": ids,
            "attrs": attrs,
            "captions": captions,
            "comparatives": _synthetic_comparatives(by_dataset, artifact),
        }
        data.update(
            images=storage.resolve(cfg.images),
            split=cfg.split,
            num_images=len(ids),
            skipped_without_attributes=unlabelled,
        )
    for name, dcfg in cfg.datasets.items():
        ds = read_dataset(storage, dcfg.kind, dcfg.root, dcfg.split, seed=dcfg.seed, max_images=dcfg.max_images)
        log.info("eval: %s: %d %s images, %d classes from %s", name, len(ds), dcfg.split, len(ds.classes), ds.root)
        inputs = _read_inputs(name, dcfg, ds, storage, by_dataset.get(name), artifact)
        sets[name] = {"ray": ds.to_dataset(storage), "ids": ds.image_ids, "set": ds, "cfg": dcfg, "inputs": inputs}
        data["datasets"][name] = {
            "kind": dcfg.kind,
            "root": ds.root,
            "split": dcfg.split,
            "seed": dcfg.seed,
            "num_images": len(ds),
            "num_classes": len(ds.classes),
            "comparatives": inputs.get("comparatives_source"),
            "differences": inputs.get("differences_source"),
        }
    return sets, data


def run_eval(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Evaluate every model of ``job.eval.models`` on every set and write the report to ``job.eval.output``.

    Raises ArtifactError (no images artifact), DatasetError (a missing or malformed dataset, naming the path),
    ValueError (no attributed images in the split), RuntimeError (a model embedded nothing), and load errors of a
    model spec.
    """
    from pcd_ray.data.attributes import ORDERED, ZEROSHOT_TEMPLATE
    from pcd_ray.eval.report import write_report
    from pcd_ray.runtime import init_ray

    cfg = job.eval
    init_ray(job.ray)
    t0 = time.time()
    sets, data = read_sets(cfg, storage)
    models = {name: evaluate_model(name, spec, sets, cfg, storage) for name, spec in cfg.models.items()}
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": data,
        "settings": {
            "seeds": list(cfg.seeds),
            "pairs_per_attribute": cfg.pairs_per_attribute,
            "protocol": get_protocol(cfg.protocol).summary(),
            "attributes": list(ORDERED),
            "zeroshot_template": ZEROSHOT_TEMPLATE,
            "config": cfg.model_dump(mode="json"),
        },
        "baseline": next(iter(cfg.models)),
        "models": models,
        "output": storage.resolve(cfg.output),
        "elapsed_s": round(time.time() - t0, 2),
    }
    paths = write_report(report, storage, cfg.output)
    log.info("eval: report written to %s", paths["md"])
    _write_metrics(report, job, storage)
    return report


def _write_metrics(report: dict, job: JobConfig, storage: Storage) -> None:
    """Every number of the report as TensorBoard scalars (and W&B / MLflow when train.metrics names them), one tag
    per model and result, in the eval output directory beside report.md."""
    from pcd_ray.metrics import MetricsWriter, numeric_leaves, tensorboard_command

    with MetricsWriter(job.eval.output, job.train.metrics, storage, name="eval") as writer:
        for name, entry in report["models"].items():
            writer.scalars(0, numeric_leaves(entry), prefix=f"eval/{name}")
    log.info("eval: metrics for TensorBoard: %s", tensorboard_command(storage.resolve(job.eval.output)))
