"""Zero-shot accuracy with encoders whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from pcd_ray.data.attributes import ZEROSHOT_TASKS, ZEROSHOT_TEMPLATE, sample_attributes
from pcd_ray.eval.zeroshot import confusion_matrix, prompts, zeroshot_accuracy

# One block of dimensions per task, one dimension per class.
SLOTS = {(task, c): k for k, (task, c) in enumerate((t, c) for t, cs in ZEROSHOT_TASKS.items() for c in cs)}


@pytest.fixture(scope="module")
def attrs() -> list[dict]:
    rng = np.random.default_rng(5)
    return [sample_attributes(rng) for _ in range(600)]


def oracle_images(attrs) -> np.ndarray:
    """[n, classes]: a one-hot per task of the image's class, scaled differently per image (raw, unnormalised)."""
    out = np.zeros((len(attrs), len(SLOTS)))
    for i, a in enumerate(attrs):
        for task in ZEROSHOT_TASKS:
            out[i, SLOTS[task, str(a[task])]] = 1.0
    return out * np.random.default_rng(0).uniform(0.5, 3.0, size=(len(attrs), 1))


def oracle_text(texts):
    """The prompt of class c of task t -> the unit vector of (t, c) (prompt texts are unique per class)."""
    by_prompt = {
        p: SLOTS[task, c] for task, ps in prompts(ZEROSHOT_TASKS).items() for c, p in zip(ZEROSHOT_TASKS[task], ps)
    }
    out = np.zeros((len(texts), len(SLOTS)))
    for k, t in enumerate(texts):
        out[k, by_prompt[t]] = 1.0
    return out


def test_oracle_is_perfect_with_diagonal_confusion(attrs):
    res = zeroshot_accuracy(oracle_images(attrs), attrs, oracle_text)
    assert res["template"] == ZEROSHOT_TEMPLATE
    for task, classes in ZEROSHOT_TASKS.items():
        entry = res["tasks"][task]
        assert entry["accuracy"] == 100.0
        assert entry["classes"] == list(classes)
        assert entry["chance"] == pytest.approx(100.0 / len(classes))
        cm = np.asarray(entry["confusion"])
        assert cm.shape == (len(classes), len(classes)) and cm.sum() == len(attrs)
        assert np.count_nonzero(cm - np.diag(np.diag(cm))) == 0
    assert res["mean_accuracy"] == 100.0


def test_constant_text_encoder_scores_about_chance(attrs):
    res = zeroshot_accuracy(oracle_images(attrs), attrs, lambda texts: np.ones((len(texts), len(SLOTS))))
    for entry in res["tasks"].values():
        cm = np.asarray(entry["confusion"])
        assert cm[:, 1:].sum() == 0, "ties go to the first class"
        # Uniform classes over 600 images: the first class's share is chance within a few points.
        assert abs(entry["accuracy"] - entry["chance"]) < 6.0
    assert abs(res["mean_accuracy"] - res["mean_chance"]) < 4.0


def test_prompts_use_the_template_and_are_encoded_in_one_call(attrs):
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return oracle_text(texts)

    zeroshot_accuracy(oracle_images(attrs), attrs, encoder)
    assert len(calls) == 1
    assert "This is a photo of a red shape" in calls[0] and "This is a photo of a triangle" in calls[0]
    assert len(calls[0]) == sum(len(c) for c in ZEROSHOT_TASKS.values())


def test_images_without_a_known_class_are_skipped_and_counted(attrs):
    subset = attrs[:10] + [None, dict(attrs[0], colour="magenta")]
    images = np.concatenate([oracle_images(attrs[:10]), np.ones((2, len(SLOTS)))])
    res = zeroshot_accuracy(images, subset, oracle_text)
    assert res["tasks"]["colour"]["skipped"] == 2 and res["tasks"]["colour"]["num_images"] == 10
    assert res["tasks"]["kind"]["skipped"] == 1
    assert res["tasks"]["colour"]["accuracy"] == 100.0


def test_custom_tasks_and_shape_errors(attrs):
    tasks = {"kind": {"circle": "round thing", "square": "boxy thing"}}
    res = zeroshot_accuracy(
        oracle_images(attrs), attrs, lambda t: np.eye(2, len(SLOTS))[: len(t)], tasks=tasks, template="a {label}"
    )
    assert list(res["tasks"]) == ["kind"] and res["tasks"]["kind"]["chance"] == 50.0
    assert res["tasks"]["kind"]["num_images"] == sum(a["kind"] in ("circle", "square") for a in attrs)
    with pytest.raises(ValueError, match="n = len"):
        zeroshot_accuracy(np.zeros((2, 3)), attrs, oracle_text)
    with pytest.raises(ValueError, match="rows for"):
        zeroshot_accuracy(oracle_images(attrs), attrs, lambda t: np.zeros((1, len(SLOTS))))


def test_confusion_matrix_counts():
    cm = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
