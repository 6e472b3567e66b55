"""Difference accuracy on labelled datasets (docs/METHOD.md, "Evaluation"): the sign test on image pairs whose
difference sentence follows from their classes (AwA2, CIFAR-100 size, Flowers102 colour) or is given per pair (CUB:
LLM differences written by the generate stage, read from a file or its diffs artifact, ``pair_texts.py``).

Every choice (sentences, class and predicate selections, pair sampling and its sizes, the standard error) is the
evaluation protocol's (``protocol.py``). ``fixed`` selects classes and predicates by *name*, and a name the dataset
lacks is an error naming it; ``paper`` selects them by the authors' numeric ids, as their code does, after checking
that each id holds the class or predicate it is known to hold in the dataset's standard order (so a reordered or
partial class list is an error, not a silently different selection). docs/EVAL.md lists both selections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pcd_ray.eval.datasets import DatasetError, LabelledSet
from pcd_ray.eval.difference import pair_scores
from pcd_ray.eval.protocol import FIXED, AttributeTask, GroupTask, Protocol, ordered_pairs, sample_images

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


def _by_position(what: str, have: Sequence[str], ids: Sequence[int], names: Sequence[str], root: str) -> list[int]:
    """``ids`` after checking that each holds its expected name in ``have``; DatasetError lists every mismatch."""
    wrong = [
        f"{i} ({n!r}, found {have[i]!r})" if i < len(have) else f"{i} ({n!r}, out of range)"
        for i, n in zip(ids, names)
        if i >= len(have) or _key(have[i]) != _key(n)
    ]
    if wrong:
        raise DatasetError(
            f"{root}: the authors' {what} ids select by position in the standard order, which this "
            f"list of {len(have)} does not follow: {', '.join(wrong)}"
        )
    return list(ids)


def group_classes(ds: LabelledSet, task: GroupTask) -> list[list[int]]:
    """Each group's class indices in ``ds``: by the authors' ids (``paper``) or by name."""
    return [
        class_indices(ds, g.classes) if g.ids is None else _by_position("class", ds.classes, g.ids, g.classes, ds.root)
        for g in task.groups
    ]


def attribute_columns(ds: LabelledSet, task: AttributeTask) -> list[int]:
    """The attribute-matrix columns the sentences use: every predicate but the dropped ones."""
    names = ds.attribute_names
    if task.dropped_ids is not None:
        drop = set(_by_position("predicate", names, task.dropped_ids, task.dropped, ds.root))
    else:
        missing = [n for n in task.dropped if n not in names]
        if missing:
            raise DatasetError(f"{ds.root}: predicates {missing} not found among its {len(names)} predicates")
        drop = {names.index(n) for n in task.dropped}
    return [k for k in range(len(names)) if k not in drop]


def attribute_rows(ds: LabelledSet, task: AttributeTask) -> dict[int, int]:
    """Class index -> the matrix row its sentences read, for the classes of the split.

    ``sorted_position``: the authors' loader labels a split's images by their class's position among the split's
    class folders, sorted, and reads the 50-row matrix (classes.txt order) at that label. The split's classes are the
    ones its images have (all of them, unless ``max_images`` drops a whole class)."""
    present = [int(c) for c in np.unique(ds.labels)]
    if task.rows == "class":
        return {c: c for c in present}
    folders = sorted(present, key=lambda c: ds.classes[c].replace(" ", "+"))  # AwA2's folder names join with '+'
    return {c: k for k, c in enumerate(folders)}


def awa2_text(ds: LabelledSet, row_i: int, row_j: int, columns: Sequence[int], template: str) -> str:
    """The sentence for matrix rows i (first image) then j, over ``columns``; an empty side stays empty, as the
    authors' sentences do."""
    m, names = ds.class_attributes, ds.attribute_names
    a = [names[k] for k in columns if m[row_i, k] and not m[row_j, k]]
    b = [names[k] for k in columns if m[row_j, k] and not m[row_i, k]]
    return template.format(a=", ".join(a), b=", ".join(b))


def _group_draw(ds: LabelledSet, task: GroupTask, protocol: Protocol, seed: int) -> tuple[np.ndarray, list[str]]:
    group = np.full(len(ds.classes), -1)
    for g, classes in enumerate(group_classes(ds, task)):
        group[classes] = g
    candidates = np.flatnonzero(group[ds.labels] >= 0)
    first, second = ordered_pairs(candidates[sample_images(len(candidates), protocol.images_per_seed, seed)])
    g1, g2 = group[ds.labels[first]], group[ds.labels[second]]
    keep = g1 != g2
    return np.stack([first[keep], second[keep]], 1), [task.groups[g].sentence for g in g1[keep]]


def _attribute_draw(
    ds: LabelledSet, task: AttributeTask, protocol: Protocol, seed: int
) -> tuple[np.ndarray, list[str]]:
    if ds.class_attributes is None:
        raise DatasetError(f"{ds.root}: no class-attribute matrix (AwA2 layout expected)")
    rows, columns = attribute_rows(ds, task), attribute_columns(ds, task)
    first, second = ordered_pairs(sample_images(len(ds), protocol.images_per_seed, seed))
    keep = ds.labels[first] != ds.labels[second]
    first, second = first[keep], second[keep]
    texts: dict[tuple[int, int], str] = {}
    for i, j in zip(ds.labels[first], ds.labels[second]):
        if (i, j) not in texts:
            texts[i, j] = awa2_text(ds, rows[i], rows[j], columns, task.template)
    return np.stack([first, second], 1), [texts[i, j] for i, j in zip(ds.labels[first], ds.labels[second])]


def draw_pairs(
    ds: LabelledSet, task: str, protocol: Protocol, seed: int, pair_rows: list[tuple[str, str, str]] | None = None
) -> tuple[np.ndarray, list[str]]:
    """One seed's pairs of ``ds`` rows [m, 2] (first image, second image) and one sentence per pair."""
    if task in ("size", "colour"):
        return _group_draw(ds, getattr(protocol, task), protocol, seed)
    if task == "attributes":
        return _attribute_draw(ds, protocol.attributes, protocol, seed)
    if task == "llm":
        if not pair_rows:
            return np.zeros((0, 2), dtype=np.int64), []
        row = {x: k for k, x in enumerate(ds.image_ids)}
        take = sample_images(len(pair_rows), protocol.llm_pairs_per_seed, seed)
        return (
            np.asarray([(row[pair_rows[k][0]], row[pair_rows[k][1]]) for k in take], dtype=np.int64),
            [pair_rows[k][2] for k in take],
        )
    raise ValueError(f"unknown difference task {task!r} (known: {sorted(TASKS.values()) + ['llm']})")


def selection(ds: LabelledSet, task: str, protocol: Protocol) -> dict:
    """What the task selects in ``ds`` under ``protocol``, by name, for the report: the classes of each group, or
    the dropped predicates and which class's matrix row each class's sentences read."""
    if task in ("size", "colour"):
        t = getattr(protocol, task)
        return {g.name: [ds.classes[c] for c in cs] for g, cs in zip(t.groups, group_classes(ds, t))}
    if task == "attributes" and ds.class_attributes is not None:
        t = protocol.attributes
        kept = set(attribute_columns(ds, t))
        return {
            "dropped_predicates": [n for k, n in enumerate(ds.attribute_names) if k not in kept],
            "attribute_rows": {ds.classes[c]: ds.classes[r] for c, r in attribute_rows(ds, t).items()},
        }
    return {}


def seed_summary(per_seed: Sequence[float | None], ddof: int) -> tuple[float | None, float | None]:
    """(mean, standard error) over the seeds that have a value; the standard error is std(ddof) / sqrt(n), None
    unless n > ddof (``difference.summarize`` is the ddof = 1 case)."""
    vals = np.asarray([v for v in per_seed if v is not None], dtype=np.float64)
    if not len(vals):
        return None, None
    stderr = float(vals.std(ddof=ddof) / np.sqrt(len(vals))) if len(vals) > ddof else None
    return float(vals.mean()), stderr


def read_pair_texts(storage, uri: str, ds: LabelledSet) -> tuple[list[tuple[str, str, str]], int]:
    """Rows (image_a, image_b, text) of a .jsonl/.csv/.parquet file; ids are the dataset's image ids (relative
    paths). Returns (rows whose images are in the split, rows skipped). DatasetError for a bad file."""
    table = read_rows(storage, uri, ["image_a", "image_b", "text"])
    known = set(ds.image_ids)
    rows = [
        (r["image_a"], r["image_b"], r["text"])
        for r in table
        if r["image_a"] in known and r["image_b"] in known and r["image_a"] != r["image_b"] and r["text"]
    ]
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


def class_difference_accuracy(
    ds: LabelledSet,
    image_emb: np.ndarray,
    encode_texts: Callable[[list[str]], np.ndarray],
    task: str,
    *,
    seeds: Sequence[int],
    protocol: Protocol = FIXED,
    pair_rows: list[tuple[str, str, str]] | None = None,
) -> dict:
    """The sign test over seeds on a labelled dataset.

    Args:
        ds, image_emb: the split and its raw image embeddings [n, D] in ``ds`` order.
        task: "size" (CIFAR-100), "colour" (Flowers102), "attributes" (AwA2), "llm" (pair_rows, e.g. CUB).
        protocol: the evaluation protocol: sentences, selections, pair sampling, standard error.
        pair_rows: for "llm", (image_a, image_b, text) rows (``read_pair_texts``).

    Returns {"task", "protocol", "selection", "chance": 50, "accuracy", "stderr", "per_seed", "pairs_per_seed",
    "num_texts"} (percent); accuracy None when no pair could be drawn. DatasetError when a selection does not
    resolve in ``ds``.
    """
    draws = {s: draw_pairs(ds, task, protocol, s, pair_rows) for s in seeds}
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
    mean, stderr = seed_summary(per_seed, protocol.stderr_ddof)
    return {
        "task": task,
        "protocol": protocol.name,
        "selection": selection(ds, task, protocol),
        "chance": 50.0,
        "accuracy": mean,
        "stderr": stderr,
        "per_seed": per_seed,
        "pairs_per_seed": [len(draws[s][0]) for s in seeds],
        "num_texts": len(distinct),
    }
