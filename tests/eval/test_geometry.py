"""Difference distances and analogy accuracy on hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from pcd_ray.eval.geometry import analogy_accuracy, difference_distances


def test_distances_by_hand():
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    # normalise(t0 - t1) = (1, -1)/sqrt2. A comparative along it: forward 0, reverse 2; along (1, 0): 1 - 1/sqrt2.
    res = difference_distances(t, {(0, 1): np.array([3.0, -3.0])})
    assert res["forward"] == pytest.approx(0.0) and res["reverse"] == pytest.approx(2.0) and res["num_pairs"] == 1
    res = difference_distances(t, {(0, 1): np.array([1.0, 0.0]), (1, 0): np.array([1.0, 0.0])})
    # (0,1): 1 - 1/sqrt2; (1,0): normalise(t1 - t0) = (-1, 1)/sqrt2, cos = -1/sqrt2 -> 1 + 1/sqrt2. Mean 1.
    assert res["forward"] == pytest.approx(1.0) and res["reverse"] == pytest.approx(1.0)
    # Per-pair forwards 1 -/+ 1/sqrt2: sample std 1 (ddof=1), over sqrt(2) pairs.
    assert res["forward_stderr"] == pytest.approx(1 / np.sqrt(2))
    assert difference_distances(t, {})["forward"] is None


def test_analogy_on_additive_embeddings_is_perfect_and_on_random_is_near_chance():
    rng = np.random.default_rng(0)
    U, V, D = 3, 4, 16
    grid = np.array([(u, v) for u in range(U) for v in range(V) for _ in range(3)])
    # Orthonormal factor directions: every image u + v has the same norm (sqrt 5), so the unit embeddings keep the
    # additive structure and ĝ(a) - ĝ(b) + ĝ(c) is exactly D's direction.
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    fu, fv = q[:U] * 2, q[U : U + V]
    images = fu[grid[:, 0]] + fv[grid[:, 1]]
    classes = fu[:, None, :] + fv[None, :, :]
    res = analogy_accuracy(images, grid, classes, seeds=[0, 1], per_seed=40)
    assert res["text"]["accuracy"] == 100.0 and res["image"]["accuracy"] == 100.0
    assert res["chance_text"] == pytest.approx(100 / 12)
    noise = analogy_accuracy(
        rng.normal(size=images.shape), grid, rng.normal(size=classes.shape), seeds=[0, 1, 2], per_seed=200
    )
    assert noise["text"]["accuracy"] < 25 and noise["text"]["stderr"] is not None
