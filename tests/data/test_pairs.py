"""Pair sampling: stable ids, ordered pairs without self pairs or duplicates, determinism, the num_images step."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pcd_ray import artifacts
from pcd_ray.config import JobConfig
from pcd_ray.data.pairs import draw_partners, pair_id, pairs_per_anchor, sample_pairs
from pcd_ray.data.synthetic import make_example
from pcd_ray.storage import Storage


def _images_table(num_train: int, num_test: int, reverse: bool = False) -> pa.Table:
    rows = [make_example(0, "train", i, 32) for i in range(num_train)]
    rows += [make_example(0, "test", i, 32) for i in range(num_test)]
    return pa.Table.from_pylist(rows[::-1] if reverse else rows)


def _setup(root, num_train=40, num_test=10, reverse=False, **pairs) -> tuple[JobConfig, Storage]:
    job = JobConfig.model_validate({"storage": {"root": str(root)}, "pairs": pairs})
    storage = Storage(job.storage)
    artifacts.write_table(_images_table(num_train, num_test, reverse), storage, "images", "images")
    return job, storage


def _sorted(t: pa.Table) -> pa.Table:
    return t.sort_by("pair_id")


def _ids_by_pair(t: pa.Table) -> dict[tuple[str, str], str]:
    return {(r["image_id_a"], r["image_id_b"]): r["pair_id"] for r in t.to_pylist()}


def test_pair_id_is_a_function_of_the_ordered_image_ids():
    assert pair_id("img-1", "img-2") == "p-" + hashlib.sha1(b"img-1\0img-2").hexdigest()[:16]
    assert pair_id("img-1", "img-2") == pair_id("img-1", "img-2")
    assert pair_id("img-1", "img-2") != pair_id("img-2", "img-1")
    assert pair_id("ab", "c") != pair_id("a", "bc")


def test_budget_is_spread_evenly_and_capped():
    counts = pairs_per_anchor(10, 23, None, np.random.default_rng(0))
    assert counts.sum() == 23 and set(counts.tolist()) == {2, 3} and (counts == 3).sum() == 3
    assert pairs_per_anchor(10, 23, 1, np.random.default_rng(0)).tolist() == [1] * 10  # the cap wins
    assert pairs_per_anchor(4, 12, None, np.random.default_rng(0)).tolist() == [3] * 4  # every ordered pair
    with pytest.raises(ValueError, match="exceeds the 12 ordered pairs"):
        pairs_per_anchor(4, 13, None, np.random.default_rng(0))


def test_partners_are_distinct_never_self_and_scale_without_enumerating():
    i, j = draw_partners(0, np.full(4, 3), 4, np.random.default_rng(0))
    assert sorted(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(4) for b in range(4) if a != b]
    n = 1_000_000  # a million images: drawing 5 partners for 2000 of them touches no O(n) structure
    i, j = draw_partners(5000, np.full(2000, 5), n, np.random.default_rng(1))
    assert len(i) == 10_000 and (i != j).all() and len(set(zip(i.tolist(), j.tolist()))) == 10_000
    assert i.min() == 5000 and i.max() == 6999 and j.max() < n


def test_pairs_artifact(ray_local, tmp_path):
    job, storage = _setup(tmp_path, num_pairs=300, seed=3)
    manifest = sample_pairs(job, storage)
    assert manifest["kind"] == "pairs" and manifest["num_rows"] == 300
    assert manifest["summary"]["possible_pairs"] == 40 * 39 and manifest["summary"]["unique_pair_ids"]
    t = artifacts.read_table(storage, "pairs", "pairs")
    assert t.column_names == [
        "pair_id",
        "image_id_a",
        "image_id_b",
        "caption_a",
        "caption_b",
        "attributes_a",
        "attributes_b",
    ]
    images = {r["image_id"]: r for r in artifacts.read_table(storage, "images", "images").to_pylist()}
    seen = set()
    for row in t.to_pylist():
        a, b = images[row["image_id_a"]], images[row["image_id_b"]]
        assert row["image_id_a"] != row["image_id_b"]
        assert a["split"] == b["split"] == "train"  # test images stay unseen
        assert (row["caption_a"], row["caption_b"]) == (a["caption"], b["caption"])
        assert (row["attributes_a"], row["attributes_b"]) == (a["attributes"], b["attributes"])
        assert row["pair_id"] == pair_id(row["image_id_a"], row["image_id_b"])
        seen.add((row["image_id_a"], row["image_id_b"]))
    assert len(seen) == 300
    # The budget is spread over the first images: 300 / 40 -> 7 or 8 each.
    assert set(Counter(t["image_id_a"].to_pylist()).values()) == {7, 8}


def test_cap_and_many_tasks(ray_local, tmp_path):
    job, storage = _setup(tmp_path, num_pairs=1000, max_pairs_per_image=3, anchors_per_task=7, seed=1)
    manifest = sample_pairs(job, storage)
    assert manifest["num_rows"] == 120 and manifest["summary"]["max_pairs_per_image"] == 3
    t = artifacts.read_table(storage, "pairs", "pairs")
    assert set(Counter(t["image_id_a"].to_pylist()).values()) == {3}
    assert len(set(t["pair_id"].to_pylist())) == 120


def test_pairs_are_deterministic_and_ids_stable_across_configs(ray_local, tmp_path):
    job, storage = _setup(tmp_path / "a", num_pairs=200, seed=0)
    sample_pairs(job, storage)
    first = _sorted(artifacts.read_table(storage, "pairs", "pairs"))
    sample_pairs(job, storage)
    assert _sorted(artifacts.read_table(storage, "pairs", "pairs")).equals(first)
    # Shard order of the images artifact does not matter, nor how many tasks draw the pairs.
    job_r, storage_r = _setup(tmp_path / "b", reverse=True, num_pairs=200, seed=0)
    sample_pairs(job_r, storage_r)
    assert _sorted(artifacts.read_table(storage_r, "pairs", "pairs")).equals(first)
    # Another seed draws other pairs, but a pair drawn by both has the same id.
    job2 = job.model_copy(update={"pairs": job.pairs.model_copy(update={"seed": 1})})
    sample_pairs(job2, storage)
    other = artifacts.read_table(storage, "pairs", "pairs")
    ids1, ids2 = _ids_by_pair(first), _ids_by_pair(other)
    assert set(ids1) != set(ids2)
    common = set(ids1) & set(ids2)
    assert common and all(ids1[k] == ids2[k] for k in common)


def test_num_images_samples_images_first(ray_local, tmp_path):
    job, storage = _setup(tmp_path, num_images=8, num_pairs=56, seed=2)
    manifest = sample_pairs(job, storage)
    assert manifest["summary"]["images_sampled"] == 8 and manifest["summary"]["possible_pairs"] == 56
    t = artifacts.read_table(storage, "pairs", "pairs")
    used = set(t["image_id_a"].to_pylist()) | set(t["image_id_b"].to_pylist())
    assert len(used) == 8 and all(u.startswith("syn-train-") for u in used)
    # All 56 ordered pairs of the 8 images: each image is first 7 times and second 7 times.
    assert sorted(t["image_id_a"].to_pylist()) == sorted(t["image_id_b"].to_pylist())


def test_bad_requests_fail_clearly(ray_local, tmp_path):
    job, storage = _setup(tmp_path, num_images=5, num_pairs=21)
    with pytest.raises(ValueError, match="num_pairs=21 exceeds the 20 ordered pairs"):
        sample_pairs(job, storage)
    job, storage = _setup(tmp_path, num_images=41, num_pairs=5)
    with pytest.raises(ValueError, match="num_images=41 exceeds the 40 images"):
        sample_pairs(job, storage)
    job, storage = _setup(tmp_path, split="val", num_pairs=5)
    with pytest.raises(ValueError, match=r"no images of split 'val' \(splits present: \['test', 'train'\]\)"):
        sample_pairs(job, storage)


def test_duplicate_image_ids_are_an_error(tmp_path):
    job = JobConfig.model_validate({"storage": {"root": str(tmp_path)}, "pairs": {"num_pairs": 2}})
    storage = Storage(job.storage)
    table = _images_table(3, 0)
    artifacts.write_table(pa.concat_tables([table, table.slice(0, 1)]), storage, "images", "images")
    with pytest.raises(ValueError, match="duplicate image_id values, e.g. \\['syn-train-000000'\\]"):
        sample_pairs(job, storage)
