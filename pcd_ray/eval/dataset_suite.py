"""Every task of the evaluation on one labelled dataset (CIFAR-100, CUB, EuroSAT, Flowers102, SUN397, AwA2, COCO),
from one model's stored image embeddings.

- zero-shot with each configured template set;
- difference accuracy where the paper defines it (CIFAR-100 size, Flowers102 colour, AwA2 attributes, and any
  dataset with a ``differences`` file: CUB's LLM sentences);
- comparative prompting and difference geometry when a ``comparatives`` file names class pairs;
- caption retrieval on COCO-style data.

Prompts, sentences, selections, pair sampling and alpha follow ``eval.protocol`` (``protocol.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pcd_ray.config import EvalConfig, EvalDatasetConfig
from pcd_ray.eval.datasets import DatasetError, LabelledSet
from pcd_ray.storage import Storage


def read_comparatives(
    storage: Storage, uri: str, ds: LabelledSet, rows: list[dict] | None = None
) -> dict[tuple[int, int], str]:
    """How class i differs from class j, by ``ds``'s class indices: {(i, j): text} from (class_i, class_j, text)
    rows by class name, read from the file at ``uri``, or given as ``rows`` (the comparatives artifact's rows of this
    dataset; ``uri`` is the artifact's, for messages). Empty texts are left out; DatasetError names unknown
    classes."""
    from pcd_ray.eval.class_difference import class_indices, read_rows

    if rows is None:
        rows = read_rows(storage, uri, ["class_i", "class_j", "text"])
    names = sorted({r["class_i"] for r in rows} | {r["class_j"] for r in rows})
    try:
        index = dict(zip(names, class_indices(ds, names)))
    except DatasetError as e:
        raise DatasetError(f"{storage.resolve(uri)}: {e}") from None
    return {(index[r["class_i"]], index[r["class_j"]]): r["text"] for r in rows if r["text"]}


def evaluate_dataset(
    ds: LabelledSet,
    image_emb: np.ndarray,
    encode: Callable[[list[str]], np.ndarray],
    dcfg: EvalDatasetConfig,
    cfg: EvalConfig,
    storage: Storage,
    inputs: dict | None = None,
) -> dict:
    """One model's entry for one dataset. ``inputs`` carries files already read (pair texts, comparatives)."""
    from pcd_ray.eval import protocol as P
    from pcd_ray.eval import templates as T
    from pcd_ray.eval.class_difference import TASKS, class_difference_accuracy
    from pcd_ray.eval.comparative import comparative_prompting
    from pcd_ray.eval.geometry import difference_distances
    from pcd_ray.eval.retrieval import caption_retrieval
    from pcd_ray.eval.zeroshot import class_embeddings, labelled_zeroshot

    inputs = inputs or {}
    protocol = P.get(cfg.protocol)
    out: dict = {"kind": ds.kind, "root": ds.root, "split": ds.split, "num_images": len(ds)}
    if ds.kind == "coco":
        caps = [c for cs in ds.captions for c in cs]
        owner = np.repeat(np.arange(len(ds)), [len(cs) for cs in ds.captions])
        out["retrieval"] = {"captions": caption_retrieval(image_emb, np.asarray(encode(caps)), owner, cfg.retrieval_k)}
        return out
    out["zeroshot"] = {
        name: labelled_zeroshot(image_emb, ds.labels, class_embeddings(encode, ds.classes, tmpl), ds.classes)
        for name, tmpl in T.template_sets(ds.kind, list(cfg.templates), protocol.zeroshot_template).items()
    }
    task = "llm" if dcfg.differences else TASKS.get(ds.kind)
    if task:
        out["difference"] = class_difference_accuracy(
            ds, image_emb, encode, task, seeds=cfg.seeds, protocol=protocol, pair_rows=inputs.get("pair_rows")
        )
    comps = inputs.get("comparatives")
    if comps:
        class_emb = class_embeddings(encode, ds.classes, T.paper(protocol.zeroshot_template))
        cc = cfg.comparative
        out["comparative"] = comparative_prompting(
            image_emb,
            ds.labels,
            class_emb,
            ds.classes,
            lambda i, j: comps.get((i, j)),
            encode,
            alpha=P.comparative_alpha(cc, protocol),
            n_pairs=cc.num_pairs,
            alphas=cc.alphas,
            holdout_fraction=cc.holdout_fraction,
            seed=cfg.seeds[0],
        )
        order = sorted(comps)
        prompts = np.asarray(encode([protocol.geometry_template.format(label=c) for c in ds.classes]))
        out["geometry"] = {
            "template": protocol.geometry_template,
            "distances": difference_distances(
                prompts,
                dict(zip(order, np.asarray(encode([comps[p] for p in order])))),
                unit_prompts=protocol.geometry_unit_prompts,
            ),
        }
    return out
