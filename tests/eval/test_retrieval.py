"""Recall@k and difference-conditioned retrieval on fixed embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from pcd_ray.data.attributes import eval_sentence
from pcd_ray.eval.retrieval import best_correct_rank, caption_retrieval, conditioned_retrieval, recall_at_k


def test_ranks_and_recall_by_hand():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    # Caption 0 points at image 0 exactly; caption 1 lies between images 1 and 2 but nearer image 2 (wrong top-1);
    # caption 2 belongs to image 2 and is closest to it. cos(caption 1, image 1) = 0.857 < 0.970 (image 2).
    captions = np.array([[1.0, 0.0], [0.6, 1.0], [0.6, 0.8]])
    ranks = best_correct_rank(captions, images, [np.array([0]), np.array([1]), np.array([2])])
    assert ranks.tolist() == [0, 1, 0]
    assert recall_at_k(ranks, [1, 2]) == {"R@1": pytest.approx(200 / 3), "R@2": 100.0}
    res = caption_retrieval(images, captions, np.array([0, 1, 2]), [1, 2])
    assert res["text_to_image"]["R@1"] == pytest.approx(200 / 3)
    # Image 1's only caption (caption 1) ranks first among captions for image 1: cos 0.857 vs 0.8 and 0.
    assert res["image_to_text"]["R@1"] == 100.0
    # Excluding a candidate and queries without a correct answer.
    r = best_correct_rank(
        captions,
        images,
        [np.array([0]), np.array([], dtype=int), np.array([1])],
        exclude=[np.array([], dtype=int), np.array([], dtype=int), np.array([2])],
    )
    assert r.tolist() == [0, -1, 0]
    assert recall_at_k(r, [1]) == {"R@1": 100.0}


def test_tied_captions_do_not_push_the_correct_item_down():
    images = np.array([[1.0, 0.0], [1.0, 0.0]])
    captions = np.array([[1.0, 0.0], [1.0, 0.0]])  # the same caption text for both images
    res = caption_retrieval(images, captions, np.array([0, 1]), [1])
    assert res["text_to_image"]["R@1"] == 100.0 and res["image_to_text"]["R@1"] == 100.0


def test_conditioned_retrieval_with_an_oracle_geometry():
    """Images on a line by size rank: ĝ(larger) - ĝ(A) points along +e_size, and the oracle text encoder maps
    'larger' sentences to +e_size, 'smaller' to -e_size: the text-conditioned query finds a larger image of the
    same kind and colour at rank 1, the image-only query cannot."""
    sizes = ["small", "medium", "large"]
    attrs = [
        {"kind": k, "colour": "red", "size": s, "brightness": "bright", "count": 1}
        for k in ("circle", "square")
        for s in sizes
        for _ in range(2)
    ]
    kind_axis = {"circle": np.array([0, 0, 1.0]), "square": np.array([0, 0, -1.0])}
    emb = np.stack([np.array([1.0, 0.25 * sizes.index(a["size"]), 0.0]) * 4 + kind_axis[a["kind"]] for a in attrs])

    def encode(texts):
        out = []
        for t in texts:
            out.append([0, 1.0 if t == eval_sentence("size", 1, 0) else -1.0, 0])
        return np.asarray(out)

    res = conditioned_retrieval(emb, attrs, encode, ks=[1], seeds=[0, 1], queries_per_seed=12, attributes=["size"])
    assert res["text"]["R@1"]["accuracy"] == 100.0
    # Image only: the nearest other image is the duplicate of the same size, never a larger/smaller one.
    assert res["image"]["R@1"]["accuracy"] == 0.0
    # 8 images have a larger (and 8 a smaller) same-kind image; 12 queries // 2 directions = 6 drawn per direction.
    assert res["queries_per_seed"] == [12, 12]
