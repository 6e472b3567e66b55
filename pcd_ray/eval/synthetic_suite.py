"""Every task of the evaluation on the synthetic set, from one model's stored image embeddings.

Classification tasks are attribute tuples: ``kind``, ``colour``, ``size`` (the zero-shot tasks) and the 18-class
``size+colour`` grid, whose many similar classes give comparative prompting real confusions to fix and the analogy
test its two factors. Comparatives ("how class i differs from class j") are written by the generate stage's rule
engine (``attributes.difference_sentence``) for two prototypes that differ only in the task's attributes.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from pcd_ray.config import EvalConfig
from pcd_ray.data import attributes as A
from pcd_ray.eval import templates as T

TASKS: dict[str, tuple[str, ...]] = {"kind": ("kind",), "colour": ("colour",), "size": ("size",),
                                     "size+colour": ("size", "colour")}
VALUES = {"kind": A.KINDS, "colour": list(A.COLOURS), "size": A.SIZES}
PROTOTYPE = {"kind": "circle", "colour": "red", "size": "medium", "brightness": "bright", "count": 1,
             "position": "center"}
COMPARATIVE_TASKS = ("kind", "size", "size+colour")
ANALOGY_TASK = "size+colour"


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


def comparative_text(task: str) -> Callable[[int, int], str]:
    """(i, j) -> the rule engine's sentence for a class-i prototype against a class-j prototype."""
    classes = task_classes(task)

    def text(i: int, j: int) -> str:
        a = {**PROTOTYPE, **dict(zip(TASKS[task], classes[i]))}
        b = {**PROTOTYPE, **dict(zip(TASKS[task], classes[j]))}
        return A.difference_sentence(a, b, np.random.default_rng([i, j]))

    return text


def _ensemble_zeroshot(image_emb, attrs, encode) -> dict:
    from pcd_ray.eval.zeroshot import class_embeddings, labelled_zeroshot

    templates = T.ensemble("synthetic")
    tasks = {}
    for task in A.ZEROSHOT_TASKS:
        classes = task_classes(task)
        emb = class_embeddings(encode, [class_label(task, c) for c in classes], templates)
        tasks[task] = labelled_zeroshot(image_emb, task_labels(task, attrs), emb, ["/".join(c) for c in classes])
    accs = [t["accuracy"] for t in tasks.values()]
    return {"templates": f"open_clip SIMPLE_IMAGENET_TEMPLATES ({len(templates)})", "tasks": tasks,
            "mean_accuracy": float(np.mean(accs)), "mean_chance": float(np.mean([t["chance"] for t in tasks.values()]))}


def evaluate_synthetic(image_emb: np.ndarray, attrs: list[dict], captions: list[str],
                       encode: Callable[[list[str]], np.ndarray], cfg: EvalConfig) -> dict:
    """{"difference", "zeroshot", "zeroshot_ensemble", "comparative", "geometry", "retrieval"} for one model."""
    from pcd_ray.eval.comparative import comparative_prompting
    from pcd_ray.eval.difference import difference_accuracy
    from pcd_ray.eval.geometry import analogy_accuracy, difference_distances
    from pcd_ray.eval.retrieval import caption_retrieval, conditioned_retrieval
    from pcd_ray.eval.zeroshot import class_embeddings, zeroshot_accuracy

    out: dict = {
        "difference": {mode: difference_accuracy(image_emb, attrs, encode, seeds=cfg.seeds,
                                                 pairs_per_attribute=cfg.pairs_per_attribute, mode=mode)
                       for mode in ("hard", "easy")},
        "zeroshot": zeroshot_accuracy(image_emb, attrs, encode),
    }
    if "ensemble" in cfg.templates:
        out["zeroshot_ensemble"] = _ensemble_zeroshot(image_emb, attrs, encode)
    paper = T.paper()
    comparative, distances = {}, {}
    for task in COMPARATIVE_TASKS:
        classes = task_classes(task)
        names = [class_label(task, c) for c in classes]
        class_emb = class_embeddings(encode, names, paper)
        write = comparative_text(task)
        cc = cfg.comparative
        comparative[task] = comparative_prompting(image_emb, task_labels(task, attrs), class_emb, names, write, encode,
                                                  alpha=cc.alpha, n_pairs=cc.num_pairs, alphas=cc.alphas,
                                                  holdout_fraction=cc.holdout_fraction, seed=cfg.seeds[0])
        pairs = [(i, j) for i in range(len(classes)) for j in range(len(classes)) if i != j]
        texts = [write(i, j) for i, j in pairs]
        distances[task] = difference_distances(class_emb, dict(zip(pairs, np.asarray(encode(texts)))))
    out["comparative"] = comparative
    classes = task_classes(ANALOGY_TASK)
    grid_emb = class_embeddings(encode, [class_label(ANALOGY_TASK, c) for c in classes], paper)
    u, v = (len(VALUES[a]) for a in TASKS[ANALOGY_TASK])
    labels = task_labels(ANALOGY_TASK, attrs)
    out["geometry"] = {"distances": distances,
                       "analogy": {"task": ANALOGY_TASK,
                                   **analogy_accuracy(image_emb, np.stack([labels // v, labels % v], 1),
                                                      grid_emb.reshape(u, v, -1), seeds=cfg.seeds,
                                                      per_seed=cfg.analogies_per_seed)}}
    caption_emb = np.asarray(encode(list(captions)))
    out["retrieval"] = {
        "captions": caption_retrieval(image_emb, caption_emb, np.arange(len(captions)), cfg.retrieval_k),
        "conditioned": conditioned_retrieval(image_emb, attrs, encode, ks=cfg.retrieval_k, seeds=cfg.seeds,
                                             queries_per_seed=cfg.conditioned_queries)}
    return out
