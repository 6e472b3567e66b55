"""The scores the API returns, from unit-norm embeddings (numpy only, no model): docs/METHOD.md, "Loss" and
"Evaluation".

Inputs are L2-normalised rows (text t [n, D], images e [m, D]); outputs are float64 numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pcd_ray.vectors import difference_direction, normalise

EPS = 1e-12


def difference_scores(text_emb: np.ndarray, emb_a: np.ndarray, emb_b: np.ndarray) -> np.ndarray:
    """cos(t_k, normalise(e_a - e_b)) for text [n, D] and image [D] embeddings -> [n].

    Identical images give d = 0 and scores 0 (the floor keeps NaN out of the JSON).
    """
    d, _ = difference_direction(emb_a, emb_b, eps=EPS, normalised=True, dtype=np.float64)
    return np.asarray(text_emb, dtype=np.float64) @ d


def rank_scores(text_emb: np.ndarray, image_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order images [m, D] along the difference text t [D] -> (order [m] most first, scores [m] in input order).

    score_i = mean_j t . (e_i - e_j) = t . e_i - t . mean(e). Sorting by it is the order the paper's pairwise test
    implies: cos(t, normalise(e_i - e_j)) > 0  <=>  t . e_i > t . e_j, so it is consistent for every pair at once.
    A stable sort keeps request order on ties.
    """
    proj = np.asarray(image_emb, dtype=np.float64) @ np.asarray(text_emb, dtype=np.float64)
    scores = proj - proj.mean()
    return np.argsort(-scores, kind="stable"), scores


def comparative_class_embeddings(
    class_emb: np.ndarray, comparatives: Sequence[tuple[int, int]], comparative_emb: np.ndarray, alpha: float
) -> np.ndarray:
    """Comparative prompting (docs/METHOD.md, "Evaluation") -> class embeddings h [C, D], unit rows.

    class_emb: t_c [C, D]; comparatives: distinct ordered pairs (i, j), one per row of comparative_emb d_ij [K, D],
    the text describing how class i differs from class j. For each class j named as ``second``:
    h_j = normalise(alpha * t_j + (1 - alpha) * mean over its pairs of (t_i - d_ij)); other classes keep t_j.
    The formula itself is the evaluation's (``pcd_ray.eval.comparative``), so served and evaluated predictions agree.
    Raises ValueError on a count mismatch, a repeated pair or a class index out of range.
    """
    from pcd_ray.eval.comparative import comparative_embeddings

    if len(comparatives) != len(comparative_emb):
        raise ValueError(f"{len(comparatives)} comparatives but {len(comparative_emb)} comparative embeddings")
    if len(set(comparatives)) != len(comparatives):
        raise ValueError(f"repeated comparative pair in {list(comparatives)}")
    n = len(class_emb)
    bad = [(i, j) for i, j in comparatives if not (0 <= i < n and 0 <= j < n)]
    if bad:
        raise ValueError(f"comparatives {bad} name a class outside 0..{n - 1}")
    return comparative_embeddings(class_emb, dict(zip(comparatives, comparative_emb)), alpha)


def classify_scores(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """cos(g(x), h_c) for one unit image embedding [D] and class embeddings [C, D] -> [C]."""
    return normalise(class_emb, eps=EPS, dtype=np.float64) @ np.asarray(image_emb, dtype=np.float64)
