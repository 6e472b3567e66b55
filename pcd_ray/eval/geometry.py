"""Geometry of the embedding space (docs/METHOD.md, "Evaluation"): do class-prompt differences point where comparative
texts point, and does image arithmetic land on the right class?

- Difference distances, per class pair (i, j) with comparative T_ij (how i differs from j):
  forward = 1 - cos(normalise(t_i - t_j), normalise(f(T_ij)))   (lower is better)
  reverse = 1 - cos(normalise(t_j - t_i), normalise(f(T_ij)))   (higher is better)
  Pair by pair reverse = 2 - forward (the paper's CIFAR-100 numbers, 1.04/0.96 and 0.92/1.08, obey it too); both
  are reported because the paper reports both. t are the class prompts' embeddings (the protocol's prompt, "A photo
  of a {label}"), unit before the difference (``fixed``) or as the text tower returns them (``paper``: the
  authors' script subtracts raw embeddings, so the longer one dominates the direction).
- Analogy accuracy on a two-factor class grid (class = (u, v), e.g. (size, colour)): for classes A = (u1, v1),
  B = (u2, v1), C = (u2, v2) the answer is D = (u1, v2). With images a, b, c of A, B, C,
  q = ĝ(a) - ĝ(b) + ĝ(c) (unit image embeddings); ``text``: the class prompt nearest to q is D's;
  ``image``: the image nearest to q (a, b, c excluded) belongs to D.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pcd_ray.eval.difference import summarize
from pcd_ray.vectors import difference_direction, normalise

EPS = 1e-12


def difference_distances(
    class_emb: np.ndarray, comparatives: dict[tuple[int, int], np.ndarray], *, unit_prompts: bool = True
) -> dict:
    """Mean forward / reverse distance over the comparative pairs, with standard errors over pairs.

    ``unit_prompts``: normalise the class embeddings before taking their difference (False: as given)."""
    t = normalise(class_emb, eps=EPS, dtype=np.float64) if unit_prompts else np.asarray(class_emb, dtype=np.float64)
    pairs = sorted(comparatives)
    if not pairs:
        return {"forward": None, "reverse": None, "forward_stderr": None, "reverse_stderr": None, "num_pairs": 0}
    d = normalise(np.stack([comparatives[p] for p in pairs]), eps=EPS, dtype=np.float64)
    first, second = np.asarray(pairs).T
    diff, _ = difference_direction(t[first], t[second], eps=EPS, normalised=True, dtype=np.float64)
    fwd = 1.0 - np.sum(diff * d, axis=1)
    rev = 1.0 + np.sum(diff * d, axis=1)
    se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None  # noqa: E731
    return {
        "forward": float(fwd.mean()),
        "reverse": float(rev.mean()),
        "forward_stderr": se(fwd),
        "reverse_stderr": se(rev),
        "num_pairs": len(pairs),
    }


def analogy_accuracy(
    image_emb: np.ndarray, grid: np.ndarray, class_emb: np.ndarray, *, seeds: Sequence[int], per_seed: int
) -> dict:
    """Analogy accuracy (%) over seeds.

    Args:
        image_emb: [n, D] raw image embeddings.
        grid: [n, 2] int factor indices (u, v) per image.
        class_emb: [U, V, D] class prompt embeddings of every (u, v) combination.
        per_seed: analogies drawn per seed (A, B, C classes uniform among valid ones, images uniform in each).

    Returns {"text": {...}, "image": {...}, "chance_text", "chance_image"} with accuracy/stderr/per_seed entries.
    """
    g = normalise(image_emb, eps=EPS, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.int64)
    U, V = class_emb.shape[:2]
    t = normalise(class_emb.reshape(U * V, -1), eps=EPS, dtype=np.float64)
    cell = grid[:, 0] * V + grid[:, 1]
    members = {c: np.flatnonzero(cell == c) for c in range(U * V)}
    res = {"text": [], "image": []}
    for seed in seeds:
        rng = np.random.default_rng([seed, 13])
        hits_t, hits_i = [], []
        tries = 0
        while len(hits_t) < per_seed and tries < 20 * per_seed:
            tries += 1
            u1, u2 = rng.choice(U, 2, replace=False)
            v1, v2 = rng.choice(V, 2, replace=False)
            A, B, C, D = u1 * V + v1, u2 * V + v1, u2 * V + v2, u1 * V + v2
            if any(len(members[x]) == 0 for x in (A, B, C)):
                continue
            a, b, c = rng.choice(members[A]), rng.choice(members[B]), rng.choice(members[C])
            q = g[a] - g[b] + g[c]
            hits_t.append(int(np.argmax(t @ q)) == D)
            sims = g @ q
            sims[[a, b, c]] = -np.inf
            hits_i.append(cell[int(np.argmax(sims))] == D)
        res["text"].append(float(100 * np.mean(hits_t)) if hits_t else None)
        res["image"].append(float(100 * np.mean(hits_i)) if hits_i else None)
    out = {}
    for k, vals in res.items():
        mean, stderr = summarize(vals)
        out[k] = {"accuracy": mean, "stderr": stderr, "per_seed": vals}
    out["chance_text"] = 100.0 / (U * V)
    out["chance_image"] = float(100.0 * np.mean([np.mean(cell == c) for c in range(U * V)]))
    out["per_seed_requested"] = per_seed
    return out
