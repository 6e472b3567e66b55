"""Difference accuracy on labelled datasets (PAPER.md section 4): the sign test on image pairs whose difference
sentence follows from their classes (AwA2, CIFAR-100 size, Flowers102 colour) or is given per pair (CUB: LLM
differences written by the generate stage, read from a file).

Every selection is by class and attribute *name*: the authors' scripts index attribute columns 1-based on a 0-based
matrix and their Flowers class ids do not match their own comments; names make the selection checkable, and a name
the dataset lacks is an error naming it (docs/EVAL.md lists the selections).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from pcd_ray.eval.datasets import DatasetError, LabelledSet
from pcd_ray.eval.difference import pair_scores, summarize

CIFAR_SIZE = {"larger": ["camel", "leopard", "lion", "wolf"], "smaller": ["hamster", "rabbit", "shrew", "squirrel"]}
CIFAR_SIZE_TEXT = "The first image shows a {w} animal than the second image."
FLOWERS_COLOUR = {"blue": ["bolero deep blue", "grape hyacinth", "stemless gentian", "balloon flower"],
                  "yellow": ["yellow iris", "buttercup", "common dandelion", "sunflower"]}
FLOWERS_COLOUR_TEXT = "The first image shows a {a} flower, while the second image shows a {b} flower."
# AwA2's 85 predicates minus the ones a photo cannot show (behaviour, diet, habitat, character): colours, patterns,
# skin, shape and body parts stay.
AWA2_VISUAL = ["black", "white", "blue", "brown", "gray", "orange", "red", "yellow", "patches", "spots", "stripes",
               "furry", "hairless", "toughskin", "big", "small", "bulbous", "lean", "flippers", "hands", "hooves",
               "pads", "paws", "longleg", "longneck", "tail", "chewteeth", "meatteeth", "buckteeth", "strainteeth",
               "horns", "claws", "tusks", "bipedal", "quadrapedal"]
AWA2_TEXT = "The first image has attributes of {a}, while the second image has attributes of {b}"
TASKS = {"cifar100": "size", "flowers102": "colour", "awa2": "attributes"}
"""Dataset kind -> its class-derived difference task; any dataset with a ``differences`` file runs "llm" (CUB)."""


def _key(name: str) -> str:
    return name.lower().replace("_", " ").replace("+", " ").strip()


def class_indices(ds: LabelledSet, names: Sequence[str]) -> list[int]:
    """Indices of classes by name (case, '_' and '+' ignored); DatasetError names every missing one."""
    index = {_key(c): k for k, c in enumerate(ds.classes)}
    missing = [n for n in names if _key(n) not in index]
    if missing:
        raise DatasetError(f"{ds.root}: classes {missing} not found among its {len(ds.classes)} classes")
    return [index[_key(n)] for n in names]


def balanced_group_pairs(labels: np.ndarray, group_a: Sequence[int], group_b: Sequence[int], n: int,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n ordered pairs, one image of each group, half with the group-a image first (direction +1), half after."""
    a = np.flatnonzero(np.isin(labels, group_a))
    b = np.flatnonzero(np.isin(labels, group_b))
    if not len(a) or not len(b):
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64)
    first, second = rng.choice(a, size=n), rng.choice(b, size=n)
    direction = np.where(np.arange(n) < (n + 1) // 2, 1, -1)
    rng.shuffle(direction)
    pairs = np.where((direction > 0)[:, None], np.stack([first, second], 1), np.stack([second, first], 1))
    return pairs.astype(np.int64), direction


def awa2_text(ds: LabelledSet, i: int, j: int, visual: Sequence[int]) -> str | None:
    """The paper's sentence for classes i then j from visual attributes only; None when they agree on all."""
    m, names = ds.class_attributes, ds.attribute_names
    a = [names[k] for k in visual if m[i, k] and not m[j, k]]
    b = [names[k] for k in visual if m[j, k] and not m[i, k]]
    if not a and not b:
        return None
    return AWA2_TEXT.format(a=", ".join(a) or "none", b=", ".join(b) or "none")


def _draw(ds: LabelledSet, task: str, n: int, rng: np.random.Generator,
          pair_rows: list[tuple[str, str, str]] | None) -> tuple[np.ndarray, list[str]]:
    """(pairs [m, 2], one sentence per pair) for one seed."""
    if task == "size":
        large, small = class_indices(ds, CIFAR_SIZE["larger"]), class_indices(ds, CIFAR_SIZE["smaller"])
        pairs, d = balanced_group_pairs(ds.labels, large, small, n, rng)
        return pairs, [CIFAR_SIZE_TEXT.format(w="larger" if x > 0 else "smaller") for x in d]
    if task == "colour":
        blue, yellow = class_indices(ds, FLOWERS_COLOUR["blue"]), class_indices(ds, FLOWERS_COLOUR["yellow"])
        pairs, d = balanced_group_pairs(ds.labels, blue, yellow, n, rng)
        return pairs, [FLOWERS_COLOUR_TEXT.format(a="blue" if x > 0 else "yellow", b="yellow" if x > 0 else "blue")
                       for x in d]
    if task == "attributes":
        if ds.class_attributes is None:
            raise DatasetError(f"{ds.root}: no class-attribute matrix (AwA2 layout expected)")
        visual = [ds.attribute_names.index(a) for a in AWA2_VISUAL if a in ds.attribute_names]
        present = np.unique(ds.labels)
        texts = {(i, j): awa2_text(ds, i, j, visual) for i in present for j in present if i != j}
        eligible = [k for k, t in texts.items() if t is not None]
        if not eligible:
            return np.zeros((0, 2), dtype=np.int64), []
        members = {c: np.flatnonzero(ds.labels == c) for c in present}
        picks = [eligible[k] for k in rng.integers(len(eligible), size=n)]
        pairs = np.asarray([(rng.choice(members[i]), rng.choice(members[j])) for i, j in picks], dtype=np.int64)
        return pairs, [texts[p] for p in picks]
    if task == "llm":
        if not pair_rows:
            return np.zeros((0, 2), dtype=np.int64), []
        row = {x: k for k, x in enumerate(ds.image_ids)}
        take = rng.permutation(len(pair_rows))[:n]
        return (np.asarray([(row[pair_rows[k][0]], row[pair_rows[k][1]]) for k in take], dtype=np.int64),
                [pair_rows[k][2] for k in take])
    raise ValueError(f"unknown difference task {task!r} (known: {sorted(TASKS.values()) + ['llm']})")


def read_pair_texts(storage, uri: str, ds: LabelledSet) -> tuple[list[tuple[str, str, str]], int]:
    """Rows (image_a, image_b, text) of a .jsonl/.csv/.parquet file; ids are the dataset's image ids (relative
    paths). Returns (rows whose images are in the split, rows skipped). DatasetError for a bad file."""
    table = read_rows(storage, uri, ["image_a", "image_b", "text"])
    known = set(ds.image_ids)
    rows = [(r["image_a"], r["image_b"], r["text"]) for r in table
            if r["image_a"] in known and r["image_b"] in known and r["image_a"] != r["image_b"] and r["text"]]
    return rows, len(table) - len(rows)


def read_rows(storage, uri: str, columns: list[str]) -> list[dict]:
    """A small table file (.jsonl, .csv, .parquet) as dict rows; DatasetError names the file and lacking columns."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    uri = storage.resolve(uri)
    if not storage.exists(uri):
        raise DatasetError(f"{uri}: missing")
    data = pa.BufferReader(storage.read_bytes(uri))
    try:
        if uri.endswith(".parquet"):
            table = pq.read_table(data)
        elif uri.endswith(".csv"):
            table = pcsv.read_csv(data)
        elif uri.endswith((".jsonl", ".json")):
            table = pjson.read_json(data)
        else:
            raise DatasetError(f"{uri}: unknown format (expected .jsonl, .csv or .parquet)")
    except pa.ArrowInvalid as e:
        raise DatasetError(f"{uri}: unreadable ({e})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetError(f"{uri}: lacks columns {missing} (has {table.column_names})")
    return table.select(columns).to_pylist()


def class_difference_accuracy(ds: LabelledSet, image_emb: np.ndarray, encode_texts: Callable[[list[str]], np.ndarray],
                              task: str, *, seeds: Sequence[int], pairs_per_seed: int,
                              pair_rows: list[tuple[str, str, str]] | None = None) -> dict:
    """The sign test over seeds on a labelled dataset.

    Args:
        ds, image_emb: the split and its raw image embeddings [n, D] in ``ds`` order.
        task: "size" (CIFAR-100), "colour" (Flowers102), "attributes" (AwA2), "llm" (pair_rows, e.g. CUB).
        pair_rows: for "llm", (image_a, image_b, text) rows (``read_pair_texts``).

    Returns {"task", "chance": 50, "accuracy", "stderr", "per_seed", "pairs_per_seed", "num_texts"} (percent);
    accuracy None when no pair could be drawn.
    """
    draws = {s: _draw(ds, task, pairs_per_seed, np.random.default_rng([s, 7]), pair_rows) for s in seeds}
    distinct = sorted({t for _, texts in draws.values() for t in texts})
    emb = np.asarray(encode_texts(distinct), dtype=np.float64) if distinct else np.zeros((0, 1))
    row = {t: k for k, t in enumerate(distinct)}
    per_seed = []
    for s in seeds:
        pairs, texts = draws[s]
        if not len(pairs):
            per_seed.append(None)
            continue
        scores = pair_scores(np.asarray(image_emb, dtype=np.float64), pairs, emb[[row[t] for t in texts]])
        per_seed.append(float(100.0 * np.mean(scores > 0)))
    mean, stderr = summarize(per_seed)
    return {"task": task, "chance": 50.0, "accuracy": mean, "stderr": stderr, "per_seed": per_seed,
            "pairs_per_seed": [len(draws[s][0]) for s in seeds], "num_texts": len(distinct)}
