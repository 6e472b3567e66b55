"""Every task of the evaluation on the synthetic set, from one model's stored image embeddings.

Classification tasks are attribute tuples: ``kind``, ``colour``, ``size`` (the zero-shot tasks) and the 18-class
``size+colour`` grid, whose many similar classes give comparative prompting real confusions to fix and the analogy
test its two factors. Comparatives ("how class i differs from class j") come from the comparatives artifact
(``pcd-ray comparatives``: rows of dataset ``synthetic/<task>``, class names as ``class_label`` writes them), where the
rule engine words them for two class prototypes that differ only in the task's attributes; a task without
comparatives skips comparative prompting and its difference distances.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from pcd_ray.config import EvalConfig
from pcd_ray.data import attributes as A
from pcd_ray.eval import templates as T
from pcd_ray.eval.protocol import comparative_alpha
from pcd_ray.eval.protocol import get as get_protocol

TASKS: dict[str, tuple[str, ...]] = {
    "kind": ("kind",),
    "colour": ("colour",),
    "size": ("size",),
    "size+colour": ("size", "colour"),
}
VALUES = {"kind": A.KINDS, "colour": list(A.COLOURS), "size": A.SIZES}
COMPARATIVE_TASKS = ("kind", "size", "size+colour")
ANALOGY_TASK = "size+colour"
SYNTHETIC = "synthetic"
"""The synthetic set's name among evaluation sets (and in ``comparatives.datasets``)."""
Pair = tuple[int, int]


def task_classes(task: str) -> list[tuple]:
    return list(itertools.product(*(VALUES[a] for a in TASKS[task])))


def class_label(task: str, values: tuple) -> str:
    """'circle', 'red shape', 'large shape', 'large red shape': the zero-shot label texts, composed."""
    named = dict(zip(TASKS[task], values))
    words = [named[a] for a in ("size", "colour") if a in named]
    return " ".join(words + [named.get("kind", "shape")])


def task_labels(task: str, attrs: list[dict]) -> np.ndarray:
    index = {c: k for k, c in enumerate(task_classes(task))}
    return np.asarray([index[tuple(a[x] for x in TASKS[task])] for a in attrs], dtype=np.int64)


def comparatives_name(task: str) -> str:
    """The ``dataset`` of a task's rows in the comparatives artifact."""
    return f"{SYNTHETIC}/{task}"


def task_comparatives(task: str, rows: list[dict]) -> dict[Pair, str]:
    """(class_i, class_j, text) rows by class label -> {(i, j): text} in the task's class order; empty texts are
    left out. Raises ValueError naming labels that are not classes of the task."""
    index = {class_label(task, c): k for k, c in enumerate(task_classes(task))}
    unknown = sorted({n for r in rows for n in (r["class_i"], r["class_j"]) if n not in index})
    if unknown:
        raise ValueError(
            f"comparatives of {comparatives_name(task)}: {unknown} are not classes of the task "
            f"(classes: {sorted(index)})"
        )
    return {(index[r["class_i"]], index[r["class_j"]]): r["text"] for r in rows if r["text"]}


def _ensemble_zeroshot(image_emb, attrs, encode) -> dict:
    from pcd_ray.eval.zeroshot import class_embeddings, labelled_zeroshot

    templates = T.ensemble("synthetic")
    tasks = {}
    for task in A.ZEROSHOT_TASKS:
        classes = task_classes(task)
        emb = class_embeddings(encode, [class_label(task, c) for c in classes], templates)
        tasks[task] = labelled_zeroshot(image_emb, task_labels(task, attrs), emb, ["/".join(c) for c in classes])
    accs = [t["accuracy"] for t in tasks.values()]
    return {
        "templates": f"open_clip SIMPLE_IMAGENET_TEMPLATES ({len(templates)})",
        "tasks": tasks,
        "mean_accuracy": float(np.mean(accs)),
        "mean_chance": float(np.mean([t["chance"] for t in tasks.values()])),
    }


def evaluate_synthetic(
    image_emb: np.ndarray,
    attrs: list[dict],
    captions: list[str],
    encode: Callable[[list[str]], np.ndarray],
    cfg: EvalConfig,
    comparatives: dict[str, dict[Pair, str]] | None = None,
) -> dict:
    """{"difference", "zeroshot", "zeroshot_ensemble", "comparative", "geometry", "retrieval"} for one model.

    ``comparatives``: per task of ``COMPARATIVE_TASKS`` its {(i, j): text} (``task_comparatives``); a task without
    any is left out of "comparative" and of the geometry's "distances" (the analogy test needs none)."""
    from pcd_ray.eval.comparative import comparative_prompting
    from pcd_ray.eval.difference import difference_accuracy
    from pcd_ray.eval.geometry import analogy_accuracy, difference_distances
    from pcd_ray.eval.retrieval import caption_retrieval, conditioned_retrieval
    from pcd_ray.eval.zeroshot import class_embeddings, zeroshot_accuracy

    out: dict = {
        "difference": {
            mode: difference_accuracy(
                image_emb, attrs, encode, seeds=cfg.seeds, pairs_per_attribute=cfg.pairs_per_attribute, mode=mode
            )
            for mode in ("hard", "easy")
        },
        "zeroshot": zeroshot_accuracy(image_emb, attrs, encode),
    }
    if "ensemble" in cfg.templates:
        out["zeroshot_ensemble"] = _ensemble_zeroshot(image_emb, attrs, encode)
    paper = T.paper()
    alpha = comparative_alpha(cfg.comparative, get_protocol(cfg.protocol))
    comparative, distances = {}, {}
    for task in COMPARATIVE_TASKS:
        comps = (comparatives or {}).get(task)
        if not comps:
            continue
        names = [class_label(task, c) for c in task_classes(task)]
        class_emb = class_embeddings(encode, names, paper)
        cc = cfg.comparative
        comparative[task] = comparative_prompting(
            image_emb,
            task_labels(task, attrs),
            class_emb,
            names,
            lambda i, j, c=comps: c.get((i, j)),
            encode,
            alpha=alpha,
            n_pairs=cc.num_pairs,
            alphas=cc.alphas,
            holdout_fraction=cc.holdout_fraction,
            seed=cfg.seeds[0],
        )
        pairs = sorted(comps)
        text_emb = np.asarray(encode([comps[p] for p in pairs]))
        distances[task] = difference_distances(class_emb, dict(zip(pairs, text_emb)))
    if comparative:
        out["comparative"] = comparative
    classes = task_classes(ANALOGY_TASK)
    grid_emb = class_embeddings(encode, [class_label(ANALOGY_TASK, c) for c in classes], paper)
    u, v = (len(VALUES[a]) for a in TASKS[ANALOGY_TASK])
    labels = task_labels(ANALOGY_TASK, attrs)
    out["geometry"] = {
        "distances": distances,
        "analogy": {
            "task": ANALOGY_TASK,
            **analogy_accuracy(
                image_emb,
                np.stack([labels // v, labels % v], 1),
                grid_emb.reshape(u, v, -1),
                seeds=cfg.seeds,
                per_seed=cfg.analogies_per_seed,
            ),
        },
    }
    caption_emb = np.asarray(encode(list(captions)))
    out["retrieval"] = {
        "captions": caption_retrieval(image_emb, caption_emb, np.arange(len(captions)), cfg.retrieval_k),
        "conditioned": conditioned_retrieval(
            image_emb, attrs, encode, ks=cfg.retrieval_k, seeds=cfg.seeds, queries_per_seed=cfg.conditioned_queries
        ),
    }
    return out
