"""Zero-shot classification: does finetuning keep CLIP's ordinary image-text matching? (docs/METHOD.md, "Evaluation")

Each task is a closed set of classes with a label text per class; the prompt is the paper's template
("This is a photo of a {label}", the authors' ``run_zero_shot``; on labelled datasets the evaluation protocol's
``zeroshot_template``, ``protocol.py``); an image is assigned the class whose prompt embedding has the highest cosine
with the image embedding. On the synthetic set the tasks are attributes (kind, colour, size: ``ZEROSHOT_TASKS``).
Accuracies are percentages; chance is 100 / number of classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pcd_ray.data.attributes import ZEROSHOT_TASKS, ZEROSHOT_TEMPLATE, zeroshot_label
from pcd_ray.vectors import normalise

EPS = 1e-12


def prompts(tasks: Mapping[str, Mapping[str, str]], template: str = ZEROSHOT_TEMPLATE) -> dict[str, list[str]]:
    """task -> one prompt per class, in the task's class order."""
    return {task: [template.format(label=label) for label in classes.values()] for task, classes in tasks.items()}


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[k, k] int64 counts, rows = true class, columns = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (true, pred), 1)
    return cm


def zeroshot_accuracy(
    image_emb: np.ndarray,
    attrs: Sequence[dict | None],
    encode_texts: Callable[[list[str]], np.ndarray],
    tasks: Mapping[str, Mapping[str, str]] = ZEROSHOT_TASKS,
    template: str = ZEROSHOT_TEMPLATE,
) -> dict:
    """Per task accuracy by argmax cosine, with chance level and confusion matrix.

    Args:
        image_emb: [n, D] raw image embeddings, row i belongs to attrs[i].
        attrs: per image the attribute dict; an image whose value for a task is not one of the task's classes
            (or whose attrs is None) is left out of that task and counted in ``skipped``.
        encode_texts: list of k prompts -> [k, D] text embeddings; called once with every task's prompts.
        tasks: task -> {class value -> label text}; template: the prompt with a ``{label}`` slot.

    Returns ``{"template", "tasks": {task: {"accuracy", "chance", "classes", "confusion", "num_images",
    "skipped"}}, "mean_accuracy", "mean_chance"}``; accuracy is None for a task without images; confusion rows are
    true classes, columns predicted (ints, JSON-ready). Ties go to the first class (a constant text encoder
    therefore predicts the first class everywhere and scores that class's frequency, i.e. about chance).
    Raises ValueError when shapes disagree.
    """
    image_emb = np.asarray(image_emb, dtype=np.float64)
    if image_emb.ndim != 2 or len(image_emb) != len(attrs):
        raise ValueError(f"image_emb must be [n, D] with n = len(attrs) = {len(attrs)}, got {image_emb.shape}")
    task_prompts = prompts(tasks, template)
    flat = [p for ps in task_prompts.values() for p in ps]
    text_emb = np.asarray(encode_texts(flat), dtype=np.float64)
    if len(text_emb) != len(flat):
        raise ValueError(f"encode_texts returned {len(text_emb)} rows for {len(flat)} prompts")
    text_emb = normalise(text_emb, eps=EPS)
    images = normalise(image_emb, eps=EPS)

    out: dict = {"template": template, "tasks": {}}
    offset = 0
    for task, classes in tasks.items():
        names = [str(c) for c in classes]
        index = {c: k for k, c in enumerate(names)}
        rows, true = [], []
        for i, a in enumerate(attrs):
            label = zeroshot_label(a, task) if a is not None and task in a else None
            if label in index:
                rows.append(i)
                true.append(index[label])
        t = text_emb[offset : offset + len(names)]
        offset += len(names)
        entry = {
            "classes": names,
            "chance": 100.0 / len(names),
            "num_images": len(rows),
            "skipped": len(attrs) - len(rows),
        }
        if rows:
            pred = np.argmax(images[rows] @ t.T, axis=1)
            true_arr = np.asarray(true)
            entry["accuracy"] = float(100.0 * np.mean(pred == true_arr))
            entry["confusion"] = confusion_matrix(true_arr, pred, len(names)).tolist()
        else:
            entry["accuracy"] = None
            entry["confusion"] = np.zeros((len(names), len(names)), dtype=np.int64).tolist()
        out["tasks"][task] = entry
    scored = [e for e in out["tasks"].values() if e["accuracy"] is not None]
    out["mean_accuracy"] = float(np.mean([e["accuracy"] for e in scored])) if scored else None
    out["mean_chance"] = float(np.mean([e["chance"] for e in scored])) if scored else None
    return out


# ---------------------------------------------------------------------------------------- labelled datasets
def class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray],
    classnames: Sequence[str],
    templates: Sequence[Callable[[str], str]],
) -> np.ndarray:
    """[k, D] unit class embeddings: per class the normalised mean of its normalised template embeddings
    (open_clip's ``build_zero_shot_classifier``); one template gives that prompt's unit embedding."""
    texts = [t(c) for c in classnames for t in templates]
    emb = np.asarray(encode_texts(texts), dtype=np.float64)
    if len(emb) != len(texts):
        raise ValueError(f"encode_texts returned {len(emb)} rows for {len(texts)} prompts")
    emb = normalise(emb, eps=EPS).reshape(len(classnames), len(templates), -1).mean(axis=1)
    return normalise(emb, eps=EPS)


def top_confused(confusion: np.ndarray, classes: Sequence[str], n: int = 5) -> list[list]:
    """The n largest off-diagonal cells as [true class, predicted class, count], largest first."""
    cm = np.asarray(confusion).copy()
    np.fill_diagonal(cm, 0)
    flat = np.argsort(-cm, axis=None, kind="stable")[:n]
    return [[classes[i], classes[j], int(cm[i, j])] for i, j in zip(*np.unravel_index(flat, cm.shape)) if cm[i, j] > 0]


def labelled_zeroshot(
    image_emb: np.ndarray,
    labels: np.ndarray,
    class_emb: np.ndarray,
    classes: Sequence[str],
    *,
    max_confusion_classes: int = 20,
) -> dict:
    """Argmax-cosine accuracy (%) of unit ``class_emb`` [k, D] on raw images [n, D] with labels [n].

    Returns {"accuracy", "chance", "num_images", "num_classes", "top_confused", "confusion" (only for
    k <= max_confusion_classes: a 397-class matrix does not belong in a report)}.
    """
    pred = np.argmax(normalise(image_emb, eps=EPS, dtype=np.float64) @ class_emb.T, axis=1)
    cm = confusion_matrix(np.asarray(labels), pred, len(classes))
    out = {
        "accuracy": float(100.0 * np.mean(pred == labels)),
        "chance": 100.0 / len(classes),
        "num_images": int(len(labels)),
        "num_classes": len(classes),
        "top_confused": top_confused(cm, classes),
    }
    if len(classes) <= max_confusion_classes:
        out["confusion"] = cm.tolist()
    return out
