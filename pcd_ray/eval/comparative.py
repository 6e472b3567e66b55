"""Comparative prompting (docs/METHOD.md, "Evaluation"): move a class's text embedding using texts that say how it
differs from the classes it is confused with.

With unit class embeddings t_c and unit comparative embeddings d_ij (how class i differs from class j):

    s_j = mean over (i, j) in P_j of (t_i - d_ij)          h_j = normalise(alpha * t_j + (1 - alpha) * s_j)

classes without comparatives keep t_j; an image is assigned argmax_c cos(g(x), h_c). alpha = 1 is plain zero-shot.
The class prompt and alpha are the evaluation protocol's (``protocol.py``: "This is a photo of a {label}" and 0.9,
the authors' eval script's ``run_comparative`` and its ``--alpha`` default), unless the job sets alpha.

Two pair-selection protocols (not to be confused with ``eval.protocol``) choose which pairs get comparatives:

- ``paper``: the n most-confused class pairs of the model's own zero-shot confusion matrix on the evaluated images
  (the paper admits this is no longer strictly zero-shot: the test labels pick the pairs);
- ``heldout``: the pairs are picked on a seeded selection split and accuracy is measured on the other images only.

Each reports accuracy on the full set and on the confused-class subset (images whose true class is in a chosen
pair), before (alpha = 1) and after, plus a sweep over alpha.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pcd_ray.eval.zeroshot import confusion_matrix
from pcd_ray.vectors import normalise

EPS = 1e-12
Pair = tuple[int, int]


def most_confused_pairs(confusion: np.ndarray, n: int, allowed: Callable[[int, int], bool] | None = None) -> list[Pair]:
    """The n unordered class pairs (i < j) with the most confusions cm[i, j] + cm[j, i] (> 0), largest first; ties
    go to the smaller (i, j). ``allowed`` filters pairs (e.g. those a comparatives file covers)."""
    cm = np.asarray(confusion)
    sym = cm + cm.T
    i, j = np.triu_indices(len(cm), k=1)
    order = np.lexsort((j, i, -sym[i, j]))
    out = []
    for k in order:
        if sym[i[k], j[k]] <= 0 or len(out) == n:
            break
        if allowed is None or allowed(int(i[k]), int(j[k])):
            out.append((int(i[k]), int(j[k])))
    return out


def comparative_embeddings(class_emb: np.ndarray, comparatives: dict[Pair, np.ndarray], alpha: float) -> np.ndarray:
    """[k, D] unit class embeddings h (module formula); ``comparatives`` maps ordered (i, j) to d_ij (normalised
    here)."""
    t = normalise(class_emb, eps=EPS, dtype=np.float64)
    h = t.copy()
    by_target: dict[int, list[np.ndarray]] = {}
    for (i, j), d in comparatives.items():
        by_target.setdefault(j, []).append(t[i] - normalise(d, eps=EPS, dtype=np.float64))
    for j, terms in by_target.items():
        h[j] = alpha * t[j] + (1.0 - alpha) * np.mean(terms, axis=0)
    return normalise(h, eps=EPS)


def _accuracy(images: np.ndarray, labels: np.ndarray, h: np.ndarray) -> tuple[float | None, np.ndarray]:
    if not len(labels):
        return None, np.zeros(0, dtype=np.int64)
    pred = np.argmax(images @ h.T, axis=1)
    return float(100.0 * np.mean(pred == labels)), pred


def _pick(images, labels, t, select_idx, n_pairs, available) -> tuple[list[Pair], np.ndarray]:
    """The most-confused pairs (with comparatives) on the select_idx images, and that confusion matrix."""
    _, pred = _accuracy(images[select_idx], labels[select_idx], t)
    cm = confusion_matrix(labels[select_idx], pred, len(t))
    return most_confused_pairs(cm, n_pairs, allowed=lambda i, j: (i, j) in available or (j, i) in available), cm


def _protocol(images, labels, t, pairs, cm, select_idx, test_idx, comp_emb, alpha, alphas, classes) -> dict:
    """Score the chosen pairs' comparatives on the test_idx images."""
    comps = {p: comp_emb[p] for a, b in pairs for p in ((a, b), (b, a)) if p in comp_emb}
    confused = sorted({c for p in pairs for c in p})
    x, y = images[test_idx], labels[test_idx]
    sub = np.isin(y, confused)

    def scores(a: float) -> dict:
        h = comparative_embeddings(t, comps, a)
        full, pred = _accuracy(x, y, h)
        part, _ = _accuracy(x[sub], y[sub], h)
        return {"full": full, "confused": part, "pred": pred}

    before, after = scores(1.0), scores(alpha)
    sweep = [scores(a) for a in alphas]

    def sub_confusion(pred: np.ndarray) -> list[list[int]]:
        # Rows: true confused class; columns: predicted confused class, then "any other class".
        k = len(confused)
        out = np.zeros((k, k + 1), dtype=np.int64)
        col = {c: n for n, c in enumerate(confused)}
        for yt, yp in zip(y[sub], pred[sub]):
            out[col[yt], col.get(yp, k)] += 1
        return out.tolist()

    return {
        "pairs": [[classes[a], classes[b], int(cm[a, b] + cm[b, a])] for a, b in pairs],
        "num_comparatives": len(comps),
        "num_select": int(len(select_idx)),
        "num_test": int(len(test_idx)),
        "num_confused_images": int(sub.sum()),
        "zeroshot": {"full": before["full"], "confused": before["confused"]},
        "comparative": {"full": after["full"], "confused": after["confused"]},
        "sweep": {
            "alphas": list(alphas),
            "full": [s["full"] for s in sweep],
            "confused": [s["confused"] for s in sweep],
        },
        "confusion_classes": [classes[c] for c in confused] + ["other"],
        "confusion_before": sub_confusion(before["pred"]),
        "confusion_after": sub_confusion(after["pred"]),
    }


def comparative_prompting(
    image_emb: np.ndarray,
    labels: np.ndarray,
    class_emb: np.ndarray,
    classes: Sequence[str],
    comparative_text: Callable[[int, int], str | None],
    encode_texts: Callable[[list[str]], np.ndarray],
    *,
    alpha: float,
    n_pairs: int = 3,
    alphas: Sequence[float] = (),
    holdout_fraction: float = 0.5,
    seed: int = 0,
) -> dict:
    """Both protocols (module docstring) for one classification task.

    Args:
        image_emb: [n, D] raw image embeddings; labels: [n] true class indices; class_emb: [k, D] class embeddings.
        comparative_text: (i, j) -> sentence describing how class i differs from class j, or None when none exists.
        encode_texts: sentences -> [m, D]; called once, with the comparatives of the pairs the protocols picked.
        alpha: the formula's weight; alphas: the sweep; holdout_fraction: share of images that pick pairs in the
            ``heldout`` protocol (seeded by ``seed``).

    Returns {"alpha", "n_pairs", "protocols": {"paper": ..., "heldout": ...}} (accuracies in %).
    """
    images = normalise(image_emb, eps=EPS, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    t = normalise(class_emb, eps=EPS, dtype=np.float64)
    k = len(classes)
    texts = {(i, j): comparative_text(i, j) for i in range(k) for j in range(k) if i != j}
    texts = {p: s for p, s in texts.items() if s}
    everything = np.arange(len(labels))
    perm = np.random.default_rng([seed, 11]).permutation(len(labels))
    n_sel = int(round(holdout_fraction * len(labels)))
    splits = {"paper": (everything, everything), "heldout": (np.sort(perm[:n_sel]), np.sort(perm[n_sel:]))}
    picks = {name: _pick(images, labels, t, sel, n_pairs, texts) for name, (sel, _) in splits.items()}
    needed = sorted({p for pairs, _ in picks.values() for a, b in pairs for p in ((a, b), (b, a)) if p in texts})
    emb = np.asarray(encode_texts([texts[p] for p in needed]), dtype=np.float64) if needed else np.zeros((0, 1))
    comp_emb = {p: emb[n] for n, p in enumerate(needed)}
    return {
        "alpha": alpha,
        "n_pairs": n_pairs,
        "protocols": {
            name: _protocol(images, labels, t, *picks[name], sel, test, comp_emb, alpha, alphas, classes)
            for name, (sel, test) in splits.items()
        },
    }
