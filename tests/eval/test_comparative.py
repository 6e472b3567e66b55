"""Comparative prompting on 3 classes with known vectors: the formula, the pair choice, both protocols."""

from __future__ import annotations

import numpy as np
import pytest

from pcd_ray.eval.comparative import comparative_embeddings, comparative_prompting, most_confused_pairs


def unit(*v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def polar(deg: float) -> np.ndarray:
    return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg)), 0.0])


# Class 0 at 0 degrees, class 1 at 36.87 degrees (0.8, 0.6): close, hence confused; class 2 far away.
T = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
D01 = unit(0.2, -0.6, 0.0)  # "how class 0 differs from class 1" = normalise(t0 - t1), at -71.57 degrees


def test_formula_by_hand():
    h = comparative_embeddings(T, {(0, 1): D01}, alpha=0.5)
    # Only class 1 has a comparative (i=0, j=1): h1 = normalise(0.5 t1 + 0.5 (t0 - d01)).
    # t0 - d01 = (1 - 0.31623, 0.94868, 0) = (0.68377, 0.94868, 0); 0.5 (t1 + that) = (0.74189, 0.77434, 0).
    np.testing.assert_allclose(h[1], unit(0.74189, 0.77434, 0.0), atol=1e-4)
    np.testing.assert_allclose(h[0], T[0])  # classes without comparatives keep t_j
    np.testing.assert_allclose(h[2], T[2])
    np.testing.assert_allclose(comparative_embeddings(T, {(0, 1): D01}, alpha=1.0), T)  # alpha 1 = zero-shot
    # Two comparatives for one class are averaged: s_1 = mean(t0 - d01, t2 - d21).
    d21 = unit(-0.8, -0.6, 1.0)
    h2 = comparative_embeddings(T, {(0, 1): D01, (2, 1): d21}, alpha=0.0)
    np.testing.assert_allclose(h2[1], unit(*((T[0] - D01 + T[2] - d21) / 2)))


def test_predictions_flip_where_the_boundary_moves():
    # h1 moves to 46.2 degrees, so the 0/1 boundary moves from 18.4 to 23.1 degrees: an image of class 0 at 20
    # degrees is predicted 1 by plain zero-shot and 0 with the comparative.
    h = comparative_embeddings(T, {(0, 1): D01}, alpha=0.5)
    x = np.stack([polar(20), polar(40), polar(10), [0.0, 0.1, 1.0]])
    assert np.argmax(x @ T.T, 1).tolist() == [1, 1, 0, 2]
    assert np.argmax(x @ h.T, 1).tolist() == [0, 1, 0, 2]


def test_most_confused_pairs_order_ties_and_filter():
    cm = np.array([[5, 3, 0, 1], [2, 5, 0, 0], [0, 4, 5, 0], [0, 0, 1, 5]])
    # Symmetric confusions: (0,1)=5, (1,2)=4, (0,3)=1, (2,3)=1, others 0.
    assert most_confused_pairs(cm, 3) == [(0, 1), (1, 2), (0, 3)]
    assert most_confused_pairs(cm, 10) == [(0, 1), (1, 2), (0, 3), (2, 3)]  # zero-confusion pairs never chosen
    assert most_confused_pairs(cm, 2, allowed=lambda i, j: (i, j) != (0, 1)) == [(1, 2), (0, 3)]


def test_comparative_prompting_paper_and_heldout_protocols():
    # 4 images per class: class 0 at 10 and 20 degrees (twice each), class 1 at 40 degrees, class 2 on the z axis.
    images = np.stack([polar(10), polar(20), polar(10), polar(20)] + [polar(40)] * 4 + [[0, 0.1, 1.0]] * 4)
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4)
    asked = []

    def text(i, j):
        return {(0, 1): "zero vs one", (1, 0): "one vs zero"}.get((i, j))

    def encode(texts):
        asked.append(list(texts))
        return np.stack([D01 if t == "zero vs one" else -D01 for t in texts])

    res = comparative_prompting(
        images,
        labels,
        T,
        ["zero", "one", "two"],
        text,
        encode,
        alpha=0.5,
        n_pairs=3,
        alphas=[1.0, 0.5],
        holdout_fraction=0.5,
        seed=0,
    )
    paper = res["protocols"]["paper"]
    # Only (0, 1) is confused (the two 20-degree images); no other pair has confusions or comparatives.
    assert paper["pairs"] == [["zero", "one", 2]] and paper["num_comparatives"] == 2
    assert paper["zeroshot"] == {"full": pytest.approx(100 * 10 / 12), "confused": pytest.approx(100 * 6 / 8)}
    # Both directions: h1 moves to 46.2 deg and h0 to -9.4 deg; the 0/1 boundary stays at 18.4 deg (symmetric
    # exact comparatives), so the 20-degree images stay wrong.
    assert paper["comparative"] == paper["zeroshot"]
    assert paper["sweep"]["confused"][0] == paper["zeroshot"]["confused"]
    assert paper["confusion_classes"] == ["zero", "one", "other"]
    assert paper["confusion_before"] == [[2, 2, 0], [0, 4, 0]]
    assert asked == [["zero vs one", "one vs zero"]]  # only the chosen pairs' sentences are encoded, once
    held = res["protocols"]["heldout"]
    assert held["num_select"] == 6 and held["num_test"] == 6
    assert held["zeroshot"]["full"] is not None


def test_one_sided_comparative_fixes_the_confused_images():
    images = np.stack([polar(20)] * 2 + [polar(40)] * 2 + [[0, 0, 1.0]] * 2)
    labels = np.array([0, 0, 1, 1, 2, 2])
    res = comparative_prompting(
        images,
        labels,
        T,
        ["a", "b", "c"],
        lambda i, j: "d" if (i, j) == (0, 1) else None,
        lambda texts: np.stack([D01] * len(texts)),
        alpha=0.5,
        n_pairs=1,
        alphas=[0.5],
    )
    p = res["protocols"]["paper"]
    assert p["zeroshot"] == {"full": pytest.approx(200 / 3), "confused": 50.0}
    assert p["comparative"] == {"full": 100.0, "confused": 100.0}
    assert p["confusion_after"] == [[2, 0, 0], [0, 2, 0]]
