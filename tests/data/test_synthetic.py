"""The synthetic attribute dataset: determinism, attribute/caption/pixel consistency, and the Ray job."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pcd_ray import artifacts
from pcd_ray.config import JobConfig
from pcd_ray.data import attributes as A
from pcd_ray.data.images import decode_image
from pcd_ray.data.synthetic import BACKGROUND, RADIUS, make_example, make_images, render
from pcd_ray.storage import Storage

SIZE = 64


def _shape_mask(img) -> np.ndarray:
    """Pixels clearly off the grey background [H, W] (noise is ~4 levels; the darkest colour is ~45 levels off)."""
    px = np.asarray(img, dtype=np.int16)
    return np.abs(px - BACKGROUND).max(axis=2) > 30


def test_same_seed_and_index_gives_identical_bytes():
    a, b = make_example(0, "train", 17, SIZE), make_example(0, "train", 17, SIZE)
    assert a == b
    assert make_example(0, "train", 18, SIZE)["image"] != a["image"]
    assert make_example(1, "train", 17, SIZE)["image"] != a["image"]
    # Train and test draw from independent streams: test image 17 is not train image 17.
    assert make_example(0, "test", 17, SIZE)["image"] != a["image"]


def test_render_consumes_rng_deterministically():
    attrs = {
        "kind": "square",
        "colour": "red",
        "size": "medium",
        "brightness": "bright",
        "count": 2,
        "position": "left",
    }
    one = np.asarray(render(attrs, SIZE, np.random.default_rng(5)))
    two = np.asarray(render(attrs, SIZE, np.random.default_rng(5)))
    assert np.array_equal(one, two)
    assert not np.array_equal(one, np.asarray(render(attrs, SIZE, np.random.default_rng(6))))


def test_caption_label_and_attributes_agree():
    """A caption may leave attributes out, but every word it says about the image is true."""
    vocab = {"size": A.SIZES, "brightness": A.BRIGHTNESS, "colour": list(A.COLOURS)}
    mentioned = {k: 0 for k in (*vocab, "position")}
    for i in range(300):
        row = make_example(3, "train", i, SIZE)
        attrs = json.loads(row["attributes"])
        assert set(attrs) == {"kind", "colour", "size", "brightness", "count", "position"}
        assert row["label"] == attrs["kind"]
        assert row["image_id"] == f"syn-train-{i:06d}"
        cap, n = row["caption"], attrs["count"]
        words = cap.split()
        head = "a" if n == 1 else A.COUNT_WORDS[n]
        assert f" {head} " in f" {cap} ", (cap, attrs)
        assert any(w.rstrip("s") in (attrs["kind"], "shape") for w in words), (cap, attrs)
        for key, values in vocab.items():
            said = [v for v in values if v in words]
            assert said in ([], [attrs[key]]), (cap, attrs)
            mentioned[key] += bool(said)
        wheres = [w for w in A.WHERE.values() if w in cap]
        assert wheres in ([], [A.WHERE[attrs["position"]]]), (cap, attrs)
        mentioned["position"] += bool(wheres)
    # Loose captions: each attribute named often, but not always (about CAPTION_MENTION of the time).
    for key, count in mentioned.items():
        assert 0.45 * 300 < count < 0.75 * 300, (key, count)


def test_images_decode_at_the_right_size_with_shapes_in_their_third():
    for i in range(120):
        row = make_example(0, "test", i, SIZE)
        img = decode_image(row["image"])
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        attrs = json.loads(row["attributes"])
        mask = _shape_mask(img)
        assert mask.any(), row["caption"]
        centroid_x = np.nonzero(mask)[1].mean()
        third = A.POSITIONS.index(attrs["position"])
        assert third * SIZE / 3 <= centroid_x <= (third + 1) * SIZE / 3, (row["caption"], centroid_x)


def test_size_classes_are_separated_in_pixels():
    """Single shapes: the largest 'small' covers fewer pixels than the smallest 'medium', and so on, per kind."""
    areas: dict[tuple[str, str], list[int]] = {}
    rng = np.random.default_rng(0)
    for kind in A.KINDS:
        for size in A.SIZES:
            for _ in range(15):
                attrs = {
                    "kind": kind,
                    "colour": "blue",
                    "size": size,
                    "brightness": "dark",
                    "count": 1,
                    "position": "center",
                }
                areas.setdefault((kind, size), []).append(int(_shape_mask(render(attrs, SIZE, rng)).sum()))
    for kind in A.KINDS:
        assert max(areas[kind, "small"]) < min(areas[kind, "medium"]), kind
        assert max(areas[kind, "medium"]) < min(areas[kind, "large"]), kind
    # Small shapes stay legible at 64 px: at least 4 px of radius.
    assert RADIUS["small"][0] * 64 >= 4


def test_brightness_scales_the_colour():
    rng = np.random.default_rng(1)
    for brightness, (lo, hi) in {"dark": (0.40, 0.60), "bright": (0.90, 1.05)}.items():
        for colour, rgb in A.COLOURS.items():
            attrs = {
                "kind": "square",
                "colour": colour,
                "size": "large",
                "brightness": brightness,
                "count": 1,
                "position": "right",
            }
            px = np.asarray(render(attrs, SIZE, rng), dtype=np.float64)
            inside = px[_shape_mask(px.astype(np.uint8))]
            channel = int(np.argmax(rgb))
            ratio = np.median(inside[:, channel]) / rgb[channel]
            assert lo <= ratio <= hi, (brightness, colour, ratio)


def _job(root: str, num_train: int, num_test: int, rows_per_shard: int = 2000) -> JobConfig:
    return JobConfig.model_validate(
        {
            "storage": {"root": root},
            "data": {
                "synthetic": {
                    "num_train": num_train,
                    "num_test": num_test,
                    "image_size": SIZE,
                    "seed": 7,
                    "rows_per_shard": rows_per_shard,
                }
            },
        }
    )


def test_make_images_writes_a_reproducible_artifact(ray_local, tmp_path):
    job = _job(str(tmp_path), num_train=60, num_test=25, rows_per_shard=20)
    storage = Storage(job.storage)
    manifest = make_images(job, storage)
    assert manifest["kind"] == "images" and manifest["num_rows"] == 85
    assert manifest["config"]["synthetic"]["num_train"] == 60
    assert manifest["summary"]["num_images"] == 85 and manifest["summary"]["wall_s"] > 0
    # The summary with the wall time is what the committed manifest holds.
    assert artifacts.read_manifest(storage, "images", "images")["summary"] == manifest["summary"]

    table = artifacts.read_table(storage, "images", "images")
    assert set(table.column_names) == {"image_id", "split", "caption", "image", "attributes", "label"}
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert len(rows) == 85
    assert sorted(r["split"] for r in rows.values()).count("train") == 60
    # Any shard reproduces alone: a row equals the same image made outside the job.
    for image_id, split, index in [
        ("syn-train-000000", "train", 0),
        ("syn-train-000059", "train", 59),
        ("syn-test-000024", "test", 24),
    ]:
        assert rows[image_id] == make_example(7, split, index, SIZE)


@pytest.mark.integration
def test_nine_thousand_images_are_fast(ray_local, tmp_path):
    job = _job(str(tmp_path), num_train=8000, num_test=1000)
    start = time.time()
    manifest = make_images(job, Storage(job.storage))
    assert manifest["num_rows"] == 9000
    assert time.time() - start < 30
