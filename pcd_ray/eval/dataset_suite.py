"""Every task of the evaluation on one labelled dataset (CIFAR-100, CUB, EuroSAT, Flowers102, SUN397, AwA2, COCO),
from one model's stored image embeddings.

- zero-shot with each configured template set;
- difference accuracy where the paper defines it (CIFAR-100 size, Flowers102 colour, AwA2 attributes, and any
  dataset with a ``differences`` file: CUB's LLM sentences);
- comparative prompting and difference geometry when a ``comparatives`` file names class pairs;
- caption retrieval on COCO-style data.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pcd_ray.config import EvalConfig, EvalDatasetConfig
from pcd_ray.eval.datasets import DatasetError, LabelledSet
from pcd_ray.storage import Storage


def read_comparatives(storage: Storage, uri: str, ds: LabelledSet) -> dict[tuple[int, int], str]:
    """(class_i, class_j, text) rows by class name -> {(i, j): text}; DatasetError names unknown classes."""
    from pcd_ray.eval.class_difference import class_indices, read_rows

    rows = read_rows(storage, uri, ["class_i", "class_j", "text"])
    names = sorted({r["class_i"] for r in rows} | {r["class_j"] for r in rows})
    try:
        index = dict(zip(names, class_indices(ds, names)))
    except DatasetError as e:
        raise DatasetError(f"{storage.resolve(uri)}: {e}") from None
    return {(index[r["class_i"]], index[r["class_j"]]): r["text"] for r in rows if r["text"]}


def evaluate_dataset(ds: LabelledSet, image_emb: np.ndarray, encode: Callable[[list[str]], np.ndarray],
                     dcfg: EvalDatasetConfig, cfg: EvalConfig, storage: Storage,
                     inputs: dict | None = None) -> dict:
    """One model's entry for one dataset. ``inputs`` carries files already read (pair texts, comparatives)."""
    from pcd_ray.eval import templates as T
    from pcd_ray.eval.class_difference import TASKS, class_difference_accuracy
    from pcd_ray.eval.comparative import comparative_prompting
    from pcd_ray.eval.geometry import difference_distances
    from pcd_ray.eval.retrieval import caption_retrieval
    from pcd_ray.eval.zeroshot import class_embeddings, labelled_zeroshot

    inputs = inputs or {}
    out: dict = {"kind": ds.kind, "root": ds.root, "split": ds.split, "num_images": len(ds)}
    if ds.kind == "coco":
        caps = [c for cs in ds.captions for c in cs]
        owner = np.repeat(np.arange(len(ds)), [len(cs) for cs in ds.captions])
        out["retrieval"] = {"captions": caption_retrieval(image_emb, np.asarray(encode(caps)), owner,
                                                          cfg.retrieval_k)}
        return out
    out["zeroshot"] = {name: labelled_zeroshot(image_emb, ds.labels, class_embeddings(encode, ds.classes, tmpl),
                                               ds.classes)
                       for name, tmpl in T.template_sets(ds.kind, list(cfg.templates)).items()}
    task = "llm" if dcfg.differences else TASKS.get(ds.kind)
    if task:
        out["difference"] = class_difference_accuracy(ds, image_emb, encode, task, seeds=cfg.seeds,
                                                      pairs_per_seed=cfg.pairs_per_attribute,
                                                      pair_rows=inputs.get("pair_rows"))
    comps = inputs.get("comparatives")
    if comps:
        class_emb = class_embeddings(encode, ds.classes, T.paper())
        cc = cfg.comparative
        out["comparative"] = comparative_prompting(image_emb, ds.labels, class_emb, ds.classes,
                                                   lambda i, j: comps.get((i, j)), encode, alpha=cc.alpha,
                                                   n_pairs=cc.num_pairs, alphas=cc.alphas,
                                                   holdout_fraction=cc.holdout_fraction, seed=cfg.seeds[0])
        order = sorted(comps)
        out["geometry"] = {"distances": difference_distances(
            class_emb, dict(zip(order, np.asarray(encode([comps[p] for p in order])))))}
    return out
