"""Difference accuracy on hand-made embeddings whose right answer is known."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pcd_ray.data.attributes import EVAL_TEMPLATES, ORDERED, compare, eval_sentence, sample_attributes
from pcd_ray.eval.difference import difference_accuracy, pair_scores, sample_pairs, summarize

ATTRS = list(ORDERED)  # size, brightness, count


@pytest.fixture(scope="module")
def attrs() -> list[dict]:
    rng = np.random.default_rng(123)
    return [sample_attributes(rng) for _ in range(300)]


def oracle_images(attrs: list[dict]) -> np.ndarray:
    """[n, 4]: the ranks of size/brightness/count plus a filler that gives every image the same norm.

    With equal norms, normalise(a) - normalise(b) is proportional to the rank difference, so the sign of its
    projection on an attribute's axis is exactly the attribute's comparison.
    """
    r = np.array([[ORDERED[k].index(a[k]) for k in ATTRS] for a in attrs], dtype=np.float64)
    return np.concatenate([r, np.sqrt(20.0 - (r**2).sum(1, keepdims=True))], axis=1)


def sentence_table(sign: int = 1) -> dict[str, np.ndarray]:
    """Every held-out sentence -> the unit vector of its attribute, pointing with (sign=1) or against its direction."""
    table = {}
    for k, attr in enumerate(ATTRS):
        for direction in (1, -1):
            for t in range(len(EVAL_TEMPLATES[attr])):
                v = np.zeros(4)
                v[k] = sign * direction
                table[eval_sentence(attr, direction, t)] = v
    return table


def lookup(table):
    return lambda texts: np.stack([table[t] for t in texts])


@pytest.mark.parametrize("mode", ["hard", "easy"])
def test_oracle_scores_100_and_reversed_scores_0(attrs, mode):
    images = oracle_images(attrs)
    right = difference_accuracy(images, attrs, lookup(sentence_table(+1)), seeds=[0, 1, 2], mode=mode)
    wrong = difference_accuracy(images, attrs, lookup(sentence_table(-1)), seeds=[0, 1, 2], mode=mode)
    for attr in ATTRS:
        assert right["attributes"][attr]["accuracy"] == 100.0
        assert wrong["attributes"][attr]["accuracy"] == 0.0
        assert min(right["attributes"][attr]["pairs_per_seed"]) > 0
    assert right["overall"]["accuracy"] == 100.0 and right["overall"]["stderr"] == 0.0
    assert wrong["overall"]["accuracy"] == 0.0
    assert right["mode"] == mode and right["chance"] == 50.0 and right["seeds"] == [0, 1, 2]


def test_random_text_encoder_scores_about_chance(attrs):
    rng = np.random.default_rng(7)
    images = rng.normal(size=(len(attrs), 64))
    cache: dict[str, np.ndarray] = {}

    def random_encoder(texts):
        return np.stack([cache.setdefault(t, rng.normal(size=64)) for t in texts])

    res = difference_accuracy(images, attrs, random_encoder, seeds=range(5), pairs_per_attribute=1000)
    assert sum(res["overall"]["pairs_per_seed"]) == 15000
    # 15,000 (correlated) pairs: the standard error is well below a point; 4 points is a loose bound.
    assert abs(res["overall"]["accuracy"] - 50.0) < 4.0


def test_images_ignored_by_the_model_score_chance(attrs):
    """An image tower that ignores the images (random embeddings) cannot beat chance even with perfect texts."""
    images = np.random.default_rng(3).normal(size=(len(attrs), 4))
    res = difference_accuracy(images, attrs, lookup(sentence_table(+1)), seeds=range(5), pairs_per_attribute=1000)
    assert abs(res["overall"]["accuracy"] - 50.0) < 4.0


def test_text_without_direction_scores_exactly_half_thanks_to_balancing(attrs):
    """A text encoder that always says "larger" is right on exactly the pairs drawn as "larger": half of them.

    Without direction balancing (e.g. pairs kept in sampling order) this would be far from 50.
    """
    images = oracle_images(attrs)
    always_larger = lambda texts: np.tile([1.0, 0.0, 0.0, 0.0], (len(texts), 1))  # noqa: E731
    res = difference_accuracy(
        images, attrs, always_larger, attributes=["size"], seeds=[0, 1, 2, 3], pairs_per_attribute=400
    )
    assert res["attributes"]["size"]["per_seed"] == [50.0] * 4


@pytest.mark.parametrize(
    "mode,n_images,num_pairs", [("hard", 300, 500), ("hard", 12, 500), ("easy", 300, 500), ("easy", 300, 10)]
)
def test_sampled_pairs_are_valid_distinct_and_balanced(attrs, mode, n_images, num_pairs):
    subset = attrs[:n_images]
    for attr in ATTRS:
        pairs, directions, available = sample_pairs(subset, attr, num_pairs, np.random.default_rng(0), mode)
        assert len(pairs) == min(num_pairs, available) > 0
        unordered = {tuple(sorted(p)) for p in pairs.tolist()}
        assert len(unordered) == len(pairs), "a pair was drawn twice"
        for (a, b), d in zip(pairs.tolist(), directions.tolist()):
            assert a != b
            assert compare(subset[a], subset[b], attr) == d, "direction must describe a relative to b"
            if mode == "easy":
                assert all(subset[a][k] == subset[b][k] for k in subset[a] if k != attr)
        ups = int(np.sum(directions == 1))
        assert abs(ups - (len(pairs) - ups)) <= 1, "directions must be balanced"


@pytest.mark.parametrize("mode", ["hard", "easy"])
def test_available_pairs_match_brute_force(attrs, mode):
    subset = attrs[:80]
    for attr in ATTRS:
        brute = sum(
            1
            for a, b in itertools.combinations(subset, 2)
            if a[attr] != b[attr] and (mode == "hard" or all(a[k] == b[k] for k in a if k != attr))
        )
        _, _, available = sample_pairs(subset, attr, 5, np.random.default_rng(0), mode)
        assert available == brute


def test_hard_sampler_is_uniform_over_differing_pairs():
    """Skewed classes (5 small, 10 medium, 85 large): 50 of the 1325 differing pairs are small-medium (3.8%).

    Drawing the first image uniformly instead would give that combination only ~1.1%.
    """
    base = sample_attributes(np.random.default_rng(0))
    attrs = [dict(base, size=s) for s in ["small"] * 5 + ["medium"] * 10 + ["large"] * 85]
    combos = []
    for seed in range(20):  # 300 pairs < 1325 / 2: the rejection sampler, not the enumeration
        pairs, _, available = sample_pairs(attrs, "size", 300, np.random.default_rng(seed), "hard")
        combos += [frozenset((attrs[a]["size"], attrs[b]["size"])) for a, b in pairs.tolist()]
    assert available == 1325
    freq = combos.count(frozenset(("small", "medium"))) / len(combos)
    assert abs(freq - 50 / 1325) < 0.012


def test_hard_pairs_let_other_attributes_vary(attrs):
    pairs, _, _ = sample_pairs(attrs, "size", 500, np.random.default_rng(1), "hard")
    differ = [attrs[a]["colour"] != attrs[b]["colour"] for a, b in pairs.tolist()]
    assert 0.6 < np.mean(differ) < 0.95  # 6 colours: about 5/6 of random pairs differ in colour


def test_easy_mode_reports_fewer_pairs_when_few_exist(attrs):
    res = difference_accuracy(
        oracle_images(attrs), attrs, lookup(sentence_table()), seeds=[0, 1], pairs_per_attribute=10_000, mode="easy"
    )
    for attr in ATTRS:
        entry = res["attributes"][attr]
        assert entry["pairs_per_seed"] == [entry["available_pairs"]] * 2
        assert 0 < entry["available_pairs"] < 10_000


def test_each_distinct_text_is_encoded_once_and_runs_are_deterministic(attrs):
    calls: list[list[str]] = []
    table = sentence_table()

    def encoder(texts):
        calls.append(list(texts))
        return lookup(table)(texts)

    images = np.random.default_rng(0).normal(size=(len(attrs), 4))
    first = difference_accuracy(images, attrs, encoder, seeds=[0, 1])
    second = difference_accuracy(images, attrs, encoder, seeds=[0, 1])
    assert len(calls) == 2 and len(calls[0]) == len(set(calls[0]))
    assert set(calls[0]) <= set(table) and len(calls[0]) == len(table)  # both directions, all wordings used
    assert first == second
    other = difference_accuracy(images, attrs, encoder, seeds=[2, 3])
    assert other["overall"]["per_seed"] != first["overall"]["per_seed"]


def test_identical_embeddings_get_no_credit():
    images = np.ones((2, 3))
    assert pair_scores(images, np.array([[0, 1]]), np.array([[1.0, 0.0, 0.0]]))[0] == 0.0


def test_attribute_without_variation_yields_no_pairs_not_an_error():
    attrs = [dict(sample_attributes(np.random.default_rng(i)), size="small") for i in range(20)]
    res = difference_accuracy(np.random.default_rng(0).normal(size=(20, 4)), attrs, lookup(sentence_table()), seeds=[0])
    assert res["attributes"]["size"]["accuracy"] is None and res["attributes"]["size"]["available_pairs"] == 0
    assert res["overall"]["accuracy"] is not None  # brightness and count still count


def test_bad_inputs_raise_clear_errors(attrs):
    with pytest.raises(ValueError, match="n = len"):
        difference_accuracy(np.zeros((3, 4)), attrs, lookup(sentence_table()))
    with pytest.raises(ValueError, match="image 1: size='huge'"):
        sample_pairs([attrs[0], dict(attrs[1], size="huge")], "size", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="mode"):
        sample_pairs(attrs, "size", 1, np.random.default_rng(0), "medium")


def test_summarize_mean_and_standard_error():
    mean, se = summarize([40.0, 50.0, 60.0])
    assert mean == 50.0 and se == pytest.approx(10.0 / np.sqrt(3))
    assert summarize([70.0]) == (70.0, None)
    assert summarize([None, None]) == (None, None)
