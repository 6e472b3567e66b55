"""Difference accuracy on labelled datasets (the default ``fixed`` protocol: selections by name), labelled zero-shot
and template ensembles. tests/eval/test_protocol.py pins each protocol's choices to the authors' code."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fixtures import AWA2_ALL_PREDICATES, write_awa2, write_cifar100, write_cub, write_flowers102

from pcd_ray.eval.class_difference import (
    awa2_text,
    class_difference_accuracy,
    class_indices,
    draw_pairs,
    read_pair_texts,
)
from pcd_ray.eval.dataset_suite import read_comparatives
from pcd_ray.eval.datasets import DatasetError, read_dataset
from pcd_ray.eval.protocol import CIFAR_LARGER, CIFAR_SMALLER, FIXED
from pcd_ray.eval.templates import ensemble, template_sets
from pcd_ray.eval.zeroshot import class_embeddings, labelled_zeroshot
from pcd_ray.storage import Storage

LARGER, SMALLER = FIXED.size.first.sentence, FIXED.size.second.sentence


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, per_class=3)
    return read_dataset(Storage(), "cifar100", str(root), "test")


def size_embeddings(ds):
    """Large animals at (1, 0), small ones at (0, 1), the rest at (1, 1)."""
    large, small = class_indices(ds, CIFAR_LARGER), class_indices(ds, CIFAR_SMALLER)
    return np.stack([[1.0, 0.0] if c in large else [0.0, 1.0] if c in small else [1.0, 1.0] for c in ds.labels])


def test_cifar_size_sign_test(cifar):
    emb = size_embeddings(cifar)
    oracle = lambda texts: np.asarray([[1.0, -1.0] if t == LARGER else [-1.0, 1.0] for t in texts])  # noqa: E731
    res = class_difference_accuracy(cifar, emb, oracle, "size", seeds=[0, 1, 2])
    # 24 images of the 8 size classes, all of them drawn (fewer than 100): every large-small pair, 12 x 12.
    assert res["accuracy"] == 100.0 and res["stderr"] == 0.0 and res["pairs_per_seed"] == [144, 144, 144]
    assert res["num_texts"] == 2 and res["chance"] == 50.0 and res["protocol"] == "fixed"
    assert res["selection"] == {"larger": list(CIFAR_LARGER), "smaller": list(CIFAR_SMALLER)}
    # A text encoder that always says "larger" is right exactly on the pairs with the large one first, one that
    # always says "smaller" on the others; the draw order decides how many, not a balancing rule.
    always = {w: (lambda texts, v=v: np.tile(v, (len(texts), 1))) for w, v in (("l", [1.0, -1.0]), ("s", [-1.0, 1.0]))}
    larger = class_difference_accuracy(cifar, emb, always["l"], "size", seeds=[0, 1])["per_seed"]
    smaller = class_difference_accuracy(cifar, emb, always["s"], "size", seeds=[0, 1])["per_seed"]
    assert [a + b for a, b in zip(larger, smaller)] == pytest.approx([100.0, 100.0])
    for seed, acc in zip([0, 1], larger):
        _, texts = draw_pairs(cifar, "size", FIXED, seed)
        assert acc == pytest.approx(100.0 * np.mean([t == LARGER for t in texts]))
    # The reversed encoder is always wrong.
    flipped = lambda texts: -oracle(texts)  # noqa: E731
    assert class_difference_accuracy(cifar, emb, flipped, "size", seeds=[0])["accuracy"] == 0.0


def test_selections_are_by_name(cifar, tmp_path):
    assert [cifar.classes[c] for c in class_indices(cifar, ["Camel", "aquarium_fish"])] == ["camel", "aquarium fish"]
    with pytest.raises(DatasetError, match=r"classes \['tiger'\] not found"):
        class_indices(cifar, ["camel", "tiger"])
    # Flowers102: a fixture without the yellow classes cannot run the colour test, and says which are missing.
    write_flowers102(tmp_path, ["bolero deep blue", "grape hyacinth", "stemless gentian", "balloon flower"])
    flowers = read_dataset(Storage(), "flowers102", str(tmp_path), "test")
    res = class_difference_accuracy(
        flowers, np.ones((len(flowers), 2)), lambda t: np.ones((len(t), 2)), "colour", seeds=[0]
    )
    assert res["accuracy"] is None and res["pairs_per_seed"] == [0]  # no yellow images in this split


def test_awa2_sentences_leave_out_the_dropped_predicates(tmp_path):
    write_awa2(tmp_path, predicates=AWA2_ALL_PREDICATES)
    ds = read_dataset(Storage(), "awa2", str(tmp_path), "all")
    columns = [ds.attribute_names.index(p) for p in ("black", "white", "furry", "stripes")]
    # grizzly bear (black, furry, smart) vs killer whale (black, white, swims, smart):
    assert awa2_text(ds, 1, 2, columns, FIXED.attributes.template) == (
        "The first image has attributes of furry, while the second image has attributes of white"
    )
    # dalmatian (black, white, furry) vs antelope (white, furry): nothing the other has that it lacks stays empty.
    assert awa2_text(ds, 3, 0, columns, FIXED.attributes.template) == (
        "The first image has attributes of black, while the second image has attributes of "
    )
    seen = []
    res = class_difference_accuracy(
        ds,
        np.random.default_rng(0).normal(size=(len(ds), 4)),
        lambda t: seen.extend(t) or np.ones((len(t), 4)),
        "attributes",
        seeds=[0, 1],
    )
    # 12 images, 3 per class: every pair of two classes, 66 - 4 * 3.
    assert res["pairs_per_seed"] == [54, 54] and 0 <= res["accuracy"] <= 100
    assert any("swims" in t for t in seen) and any("smart" in t for t in seen)  # neither is a dropped predicate
    # Without the 16 predicates it drops, the set is not AwA2's: an error naming them, not sentences that keep them.
    small = tmp_path / "small"
    write_awa2(small)
    with pytest.raises(DatasetError, match=r"predicates \['smelly', 'tunnels'.*not found among its 6 predicates"):
        class_difference_accuracy(
            read_dataset(Storage(), "awa2", str(small), "all"),
            np.ones((12, 4)),
            lambda t: np.ones((len(t), 4)),
            "attributes",
            seeds=[0],
        )


def test_llm_pair_texts_from_a_file(tmp_path):
    write_cub(tmp_path)
    ds = read_dataset(Storage(), "cub", str(tmp_path), "test")
    a, b, c = ds.image_ids[:3]
    rows = [
        {"image_a": a, "image_b": b, "text": "The first bird is darker."},
        {"image_a": b, "image_b": c, "text": "The first bird is lighter."},
        {"image_a": a, "image_b": "not/in/split.jpg", "text": "x"},
    ]
    path = tmp_path / "diffs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pair_rows, skipped = read_pair_texts(Storage(), str(path), ds)
    assert skipped == 1 and len(pair_rows) == 2
    emb = np.zeros((len(ds), 2))
    emb[0], emb[1], emb[2] = [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]
    # Pair (a, b): ĝa - ĝb = (-1, 1)/sqrt2; pair (b, c): (1, -1)/sqrt2. "darker" -> (-1, 1), "lighter" -> (1, 1).
    encode = lambda t: np.asarray([[-1.0, 1.0] if "darker" in s else [1.0, 1.0] for s in t])  # noqa: E731
    res = class_difference_accuracy(ds, emb, encode, "llm", seeds=[0], pair_rows=pair_rows)
    # (a, b): cos > 0, correct; (b, c): (1, -1)·(1, 1) = 0, not > 0, wrong.
    assert res["accuracy"] == 50.0 and res["pairs_per_seed"] == [2]
    bad = tmp_path / "bad.csv"
    bad.write_text("image_a,text\nx,y\n")
    with pytest.raises(DatasetError, match=r"bad.csv: lacks columns \['image_b'\]"):
        read_pair_texts(Storage(), str(bad), ds)


def test_comparatives_file_by_class_name(tmp_path, cifar):
    path = tmp_path / "comparatives.csv"
    path.write_text("class_i,class_j,text\ncamel,lion,a camel is humped\nlion,camel,a lion has a mane\n")
    comps = read_comparatives(Storage(), str(path), cifar)
    assert comps == {(1, 4): "a camel is humped", (4, 1): "a lion has a mane"}
    path.write_text("class_i,class_j,text\ncamel,unicorn,x\n")
    with pytest.raises(DatasetError, match=r"comparatives.csv: .*\['unicorn'\] not found"):
        read_comparatives(Storage(), str(path), cifar)


def test_template_ensembles_and_labelled_zeroshot():
    assert [t("forest") for t in ensemble("eurosat")] == [
        "a centered satellite photo of forest.",
        "a centered satellite photo of a forest.",
        "a centered satellite photo of the forest.",
    ]
    assert len(ensemble("cifar100")) == 18 and len(ensemble("awa2")) == 80 and len(ensemble("synthetic")) == 7
    assert [t("cat") for t in template_sets("cub", ["paper"])["paper"]] == ["This is a photo of a cat"]
    with pytest.raises(ValueError, match="unknown template set"):
        template_sets("cub", ["fancy"])
    # Two templates per class: the class embedding is the normalised mean of the normalised prompt embeddings.
    vecs = {"a x": [2.0, 0.0], "b x": [0.0, 5.0], "a y": [0.0, 0.0001], "b y": [0.0, 3.0]}
    emb = class_embeddings(
        lambda ts: np.asarray([vecs[t] for t in ts]), ["x", "y"], [lambda c: f"a {c}", lambda c: f"b {c}"]
    )
    np.testing.assert_allclose(emb, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]], atol=1e-9)
    res = labelled_zeroshot(np.array([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), np.array([0, 1, 1]), np.eye(2), ["x", "y"])
    assert res["accuracy"] == pytest.approx(200 / 3) and res["confusion"] == [[1, 0], [1, 1]]
    assert res["top_confused"] == [["y", "x", 1]] and res["chance"] == 50.0
