"""The comparatives stage: for the evaluation sets' class pairs, a sentence on how class i looks different from class j.

Comparative prompting and the difference distances (eval) need, per class pair (i, j), a text saying how class i
differs from class j. This stage asks the ``generate`` section's engine for them, with the sampling and filter of
that section and a versioned class prompt (``comparatives.prompt_version``, ``prompts.CLASS_PROMPTS``), for:

- each dataset of ``eval.datasets`` that has classes (COCO has none), by the class names eval reads it with;
- the synthetic set's comparative tasks (``synthetic/kind``, ``synthetic/size``, ``synthetic/size+colour``) when
  ``eval.images`` is set: each class is an attribute prototype (``rule.class_prototype``), which the rule engine
  words ground-truth sentences for. The rule engine knows nothing of real classes: with it, real datasets are
  skipped (an error when ``comparatives.datasets`` names them).

Which pairs: ``select: all`` is every ordered pair; ``confused`` is the ``num_pairs`` class pairs that the first model
of ``eval.models`` confuses most on the set's evaluated images, in both orders (the paper's choice), from its
zero-shot confusion matrix with the paper's template, computed with eval's own code (the image embeddings are kept
under ``<output>/_confusion/``). Eval's ``paper`` protocol then picks the same pairs for that model.

The pairs become rows shaped like the pairs artifact's (``pair_id`` ``<dataset>/<i>/<j>``, caption_a and caption_b the
class names, attributes_a and attributes_b the synthetic prototypes, plus the indices i and j) and go through the
generate stage's machinery (``job.generate_rows``): the same actor pool, engine, filter, fault handling and sink, so
the ``comparatives`` artifact (dataset, class_i, class_j, i, j, text, raw, engine, prompt_version, pair_id) and the
``comparative_rejects`` artifact (raw and reason instead of text) hold every pair exactly once, are committed as they
go, and are resumed by a re-run with the same settings and pairs (``identity``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from pcd_ray.config import ConfigError, GenerateConfig, JobConfig
from pcd_ray.eval.job import COMPARATIVES_KIND
from pcd_ray.eval.synthetic_suite import SYNTHETIC
from pcd_ray.storage import Storage, join

log = logging.getLogger(__name__)

COLUMNS = ["dataset", "class_i", "class_j", "i", "j", "text", "raw", "engine", "prompt_version", "pair_id"]
REJECT_COLUMNS = ["dataset", "class_i", "class_j", "i", "j", "raw", "reason", "engine", "prompt_version", "pair_id"]
REJECTS_KIND = "comparative_rejects"
CONFUSION_DIR = "_confusion"
"""Under the comparatives artifact: the first model's image embeddings that ``select: confused`` was computed from."""
EPS = 1e-12

Pair = tuple[int, int]


@dataclass
class ClassSet:
    """One classification problem whose class pairs get comparatives."""

    name: str
    """The rows' ``dataset``: an eval.datasets name, or ``synthetic/<task>``."""
    classes: list[str]
    """Class names in eval's order (a dataset's display names; the synthetic task's labels)."""
    task: str | None = None
    """The synthetic set's task; None for an eval dataset."""
    prototypes: list[dict] | None = None
    """Per class the synthetic prototype's attributes (what the rule engine words); None for real classes."""
    labelled: Any = None
    """The dataset's evaluated split (``eval.datasets.LabelledSet``), for ``select: confused``."""


def pair_id(dataset: str, i: int, j: int) -> str:
    return f"{dataset}/{i}/{j}"


def engine_settings(cfg: GenerateConfig) -> dict[str, Any]:
    """The generate settings that decide a comparative's text. The rule engine words class pairs by their indices
    alone, so only its name (and the filter) matter; an LLM's model, sampling and seed matter too."""
    c = cfg.model_dump(mode="json")
    keys = ("engine", "filter") if cfg.engine == "rule" else ("engine", "llm", "sampling", "seed", "filter")
    return {k: c[k] for k in keys if k in c}


def stage_config(job: JobConfig) -> dict[str, Any]:
    """What the stage's outputs are made by (its provenance record): the section and ``engine_settings``."""
    return {**job.comparatives.model_dump(mode="json"), "generate": engine_settings(job.generate)}


def requested(job: JobConfig) -> tuple[list[str], bool]:
    """The evaluation sets to write comparatives for (``synthetic`` and eval.datasets names), and whether
    ``comparatives.datasets`` names them (else: every set eval evaluates). Raises ConfigError for unknown names."""
    c, e = job.comparatives, job.eval
    every = ([SYNTHETIC] if e.images is not None else []) + list(e.datasets)
    if c.datasets is None:
        return every, False
    unknown = [n for n in c.datasets if n not in every]
    if unknown:
        hint = " (synthetic needs eval.images)" if SYNTHETIC in unknown else ""
        raise ConfigError(f"comparatives.datasets: {unknown} are not evaluation sets of this job{hint}; known: {every}")
    return list(dict.fromkeys(c.datasets)), True


def synthetic_sets() -> list[ClassSet]:
    """The synthetic set's comparative tasks, each class as its prototype."""
    from pcd_ray.eval.synthetic_suite import COMPARATIVE_TASKS, TASKS, class_label, comparatives_name, task_classes
    from pcd_ray.generate.rule import class_prototype

    return [
        ClassSet(
            comparatives_name(task),
            [class_label(task, c) for c in task_classes(task)],
            task,
            [class_prototype(dict(zip(TASKS[task], c))) for c in task_classes(task)],
        )
        for task in COMPARATIVE_TASKS
    ]


def class_sets(job: JobConfig, storage: Storage) -> tuple[list[ClassSet], dict[str, str]]:
    """(the class sets to write comparatives for, {set skipped: why}). A set the engine cannot describe or without
    classes is skipped with a warning when every set was asked for, and a ConfigError when named."""
    from pcd_ray.eval.datasets import read_dataset

    names, named = requested(job)
    sets: list[ClassSet] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == SYNTHETIC:
            sets += synthetic_sets()
            continue
        dcfg = job.eval.datasets[name]
        why = None
        if job.generate.engine == "rule":
            why = (
                "the rule engine words only the synthetic set's classes (from their attributes); real classes need "
                "an LLM engine (generate.engine: transformers or vllm)"
            )
        elif dcfg.kind == "coco":
            why = "a COCO set has captions, not classes"
        if why is None:
            ds = read_dataset(storage, dcfg.kind, dcfg.root, dcfg.split, seed=dcfg.seed, max_images=dcfg.max_images)
            if len(ds.classes) < 2:
                why = f"it has {len(ds.classes)} class(es)"
            else:
                sets.append(ClassSet(name, list(ds.classes), labelled=ds))
                continue
        if named:
            raise ConfigError(f"comparatives.datasets names {name!r}, but {why}")
        log.warning("comparatives: %s skipped: %s", name, why)
        skipped[name] = why
    if not sets:
        reasons = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "the job evaluates no set"
        raise ConfigError(f"comparatives: no class pairs to write ({reasons})")
    return sets, skipped


def all_pairs(k: int) -> list[Pair]:
    return [(i, j) for i in range(k) for j in range(k) if i != j]


def confused_pairs(job: JobConfig, storage: Storage, sets: list[ClassSet]) -> tuple[dict[str, list[Pair]], dict]:
    """Per set the ``num_pairs`` class pairs the first eval model confuses most, both orders; and per set those
    pairs as [class_i, class_j, confusions] (the summary's record).

    Eval's own code throughout: its stored image embeddings of the set's evaluated images, the paper's template
    for the class embeddings, the confusion matrix, and ``comparative.most_confused_pairs``.
    """
    import numpy as np

    from pcd_ray.eval import templates as T
    from pcd_ray.eval.comparative import most_confused_pairs
    from pcd_ray.eval.job import TextCache, load_split, stored_embeddings
    from pcd_ray.eval.synthetic_suite import task_labels
    from pcd_ray.eval.zeroshot import class_embeddings, confusion_matrix
    from pcd_ray.model.factory import load_model
    from pcd_ray.vectors import normalise

    e, c = job.eval, job.comparatives
    model, spec = next(iter(e.models.items()))
    loaded = load_model(spec, storage)
    loaded.model.eval()
    encode = TextCache(functools.partial(loaded.encode_texts, batch_size=e.batch_size))
    base = join(storage.resolve(c.output), CONFUSION_DIR, model)

    def embedded(ds, ids, where: str):
        log.info("comparatives: embedding %d images of %s with %s to find its confused classes", len(ids), where, model)
        emb, kept, errors = stored_embeddings(ds, ids, spec, join(base, where), e, storage)
        if not kept:
            raise RuntimeError(
                f"comparatives: no image of {where} could be embedded by {model} (first errors: {errors[:5]})"
            )
        return emb, kept

    synthetic = None
    pairs: dict[str, list[Pair]] = {}
    picked: dict[str, list[list]] = {}
    for s in sets:
        if s.task is not None:
            if synthetic is None:  # one embedding of the split serves every task
                ds, ids, attrs, _, _ = load_split(e, storage)
                emb, kept = embedded(ds, ids, SYNTHETIC)
                synthetic = emb, [attrs[ids[k]] for k in kept]
            emb, labels = synthetic[0], task_labels(s.task, synthetic[1])
        else:
            emb, kept = embedded(s.labelled.to_dataset(storage), s.labelled.image_ids, s.name)
            labels = s.labelled.labels[np.asarray(kept, dtype=np.int64)]
        class_emb = class_embeddings(encode, s.classes, T.paper())
        pred = np.argmax(normalise(emb, eps=EPS, dtype=np.float64) @ class_emb.T, axis=1)
        cm = confusion_matrix(labels, pred, len(s.classes))
        top = most_confused_pairs(cm, c.num_pairs)
        if len(top) < c.num_pairs:
            log.warning(
                "comparatives: %s: %s confuses only %d class pair(s) on %d images", s.name, model, len(top), len(labels)
            )
        pairs[s.name] = [p for a, b in top for p in ((a, b), (b, a))]
        picked[s.name] = [[s.classes[a], s.classes[b], int(cm[a, b] + cm[b, a])] for a, b in top]
    return pairs, picked


def pair_rows(sets: list[ClassSet], pairs: dict[str, list[Pair]]):
    """The class pairs as a pyarrow Table of pairs-like rows (what ``generate_rows`` reads)."""
    import pyarrow as pa

    rows = []
    for s in sets:
        attrs = [json.dumps(a, sort_keys=True) for a in s.prototypes] if s.prototypes is not None else None
        for i, j in pairs[s.name]:
            rows.append(
                {
                    "pair_id": pair_id(s.name, i, j),
                    "caption_a": s.classes[i],
                    "caption_b": s.classes[j],
                    "attributes_a": attrs[i] if attrs else None,
                    "attributes_b": attrs[j] if attrs else None,
                    "i": i,
                    "j": j,
                }
            )
    schema = pa.schema(
        [
            ("pair_id", pa.string()),
            ("caption_a", pa.string()),
            ("caption_b", pa.string()),
            ("attributes_a", pa.string()),
            ("attributes_b", pa.string()),
            ("i", pa.int64()),
            ("j", pa.int64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


def with_classes(table, classes: dict[str, list[str]]):
    """map_batches (tasks): the actor's output rows with dataset, class_i, class_j, i and j, read off the pair id."""
    import pyarrow as pa

    parts = [p.rsplit("/", 2) for p in table.column("pair_id").to_pylist()]
    names, i, j = [p[0] for p in parts], [int(p[1]) for p in parts], [int(p[2]) for p in parts]
    columns = {
        "dataset": pa.array(names, pa.string()),
        "class_i": pa.array([classes[d][k] for d, k in zip(names, i)], pa.string()),
        "class_j": pa.array([classes[d][k] for d, k in zip(names, j)], pa.string()),
        "i": pa.array(i, pa.int64()),
        "j": pa.array(j, pa.int64()),
    }
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def identity(rows, job: JobConfig) -> dict[str, Any]:
    """What makes two runs' outputs interchangeable (only then does a run resume the other's rows): the same class
    pairs, prompt and text settings."""
    digest = hashlib.sha1(json.dumps(rows.sort_by("pair_id").to_pylist(), sort_keys=True).encode()).hexdigest()
    return {"pairs": digest, "prompt_version": job.comparatives.prompt_version, **engine_settings(job.generate)}


def run_comparatives(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Write the ``comparatives`` and ``comparative_rejects`` artifacts for the job's evaluation sets, resuming a
    stopped run; returns the summary.

    Summary keys: those of generate (pairs_in, written, rejected, rejected_by_reason, engine, prompt_version, model,
    tokens, rates, skipped, processed, resumed, complete), plus select, datasets {set: {"classes", "pairs"}},
    skipped_datasets {set: why}, confused {set: [[class_i, class_j, confusions]]} (select: confused), comparatives
    and rejects (URIs).
    Raises ConfigError for sets the engine cannot describe (named in comparatives.datasets), nothing to write, or a
    prompt version that is not a class prompt; DatasetError for a missing dataset; EngineFailure as generate does.
    """
    import ray.data

    from pcd_ray.generate.job import check_engine_model, engine_fields, generate_rows
    from pcd_ray.generate.prompts import CLASS_PROMPTS
    from pcd_ray.runtime import init_ray
    from pcd_ray.sink import Output

    c = job.comparatives
    if c is None:
        raise ConfigError("the job has no comparatives section")
    if c.prompt_version not in CLASS_PROMPTS:
        raise ConfigError(
            f"comparatives.prompt_version {c.prompt_version!r} is not a class prompt; known: {list(CLASS_PROMPTS)}"
        )
    cfg = job.generate.model_copy(update={"prompt_version": c.prompt_version})
    check_engine_model(cfg, storage)
    sets, skipped = class_sets(job, storage)
    init_ray(job.ray)
    if c.select == "confused":
        pairs, picked = confused_pairs(job, storage, sets)
    else:
        pairs, picked = {s.name: all_pairs(len(s.classes)) for s in sets}, None
    rows = pair_rows(sets, pairs)
    log.info(
        "comparatives: %d class pairs of %s (%s), engine %s, prompt %s",
        rows.num_rows,
        ", ".join(s.name for s in sets),
        c.select,
        cfg.engine,
        c.prompt_version,
    )
    classes = {s.name: s.classes for s in sets}

    def fields(t) -> dict[str, Any]:
        out = {
            "pairs_in": rows.num_rows,
            "written": t.kept,
            **engine_fields(t, cfg),
            "select": c.select,
            "datasets": {s.name: {"classes": len(s.classes), "pairs": len(pairs[s.name])} for s in sets},
            "skipped_datasets": skipped,
        }
        if picked is not None:
            out["confused"] = picked
        return {**out, "comparatives": storage.resolve(c.output), "rejects": storage.resolve(c.rejects)}

    return generate_rows(
        ray.data.from_arrow(rows),
        cfg,
        storage,
        label="comparatives",
        unit="class pair",
        kept=Output(c.output, COMPARATIVES_KIND, COLUMNS),
        rejected=Output(c.rejects, REJECTS_KIND, REJECT_COLUMNS),
        config={"comparatives": c.model_dump(mode="json"), "generate": cfg.model_dump(mode="json")},
        identity=identity(rows, job),
        expected=rows.num_rows,
        summary=fields,
        then=lambda out: out.map_batches(with_classes, fn_args=(classes,), batch_format="pyarrow", batch_size=None),
    )
