"""Dataset readers on tiny fixtures in each dataset's standard layout; clear errors naming the path."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from eval_fixtures import (
    AWA2_CLASSES,
    CIFAR_NAMES,
    CUB_CLASSES,
    write_awa2,
    write_cifar100,
    write_coco,
    write_cub,
    write_eurosat,
    write_flowers102,
    write_sun397,
)

from pcd_ray.config import StorageConfig
from pcd_ray.eval.datasets import DatasetError, read_dataset, seeded_test_mask
from pcd_ray.storage import Storage

FLOWERS = ["bolero deep blue", "grape hyacinth", "sunflower", "buttercup"]


def test_cifar100(tmp_path):
    write_cifar100(tmp_path)
    ds = read_dataset(Storage(), "cifar100", str(tmp_path), "test")
    assert ds.classes[1] == "camel" and ds.classes[-1] == "aquarium fish"
    assert len(ds) == 2 * len(CIFAR_NAMES) and ds.uris is None and len(ds.images) == len(ds)
    assert ds.image_ids == sorted(ds.image_ids)
    for i, label in zip(ds.image_ids, ds.labels):  # fixture file names start with their class name
        assert i.startswith(CIFAR_NAMES[label])
    assert ds.images[0][:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DatasetError, match=r"cifar-100-python/meta: missing \(CIFAR-100 meta\)"):
        read_dataset(Storage(), "cifar100", str(tmp_path / "nowhere"), "test")
    (tmp_path / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": []}))
    with pytest.raises(DatasetError, match="not a CIFAR-100 python pickle"):
        read_dataset(Storage(), "cifar100", str(tmp_path), "test")


def test_flowers102_uses_torchvision_class_names_and_setid(tmp_path):
    labels = write_flowers102(tmp_path, FLOWERS)
    ds = read_dataset(Storage(), "flowers102", str(tmp_path), "test")
    assert len(ds.classes) == 102 and ds.classes[0] == "pink primrose"
    assert ds.image_ids == [f"image_{k:05d}.jpg" for k in range(2, 9, 2)]  # tstid = 2, 4, 6, 8
    assert [ds.classes[c] for c in ds.labels] == FLOWERS  # image 2k has class k (two per class)
    assert [int(c) + 1 for c in ds.labels] == labels[1::2]
    assert ds.uris[0].endswith("flowers-102/jpg/image_00002.jpg")
    with pytest.raises(DatasetError, match="split must be one of"):
        read_dataset(Storage(), "flowers102", str(tmp_path), "holdout")


def test_cub(tmp_path):
    write_cub(tmp_path)
    test = read_dataset(Storage(), "cub", str(tmp_path), "test")
    train = read_dataset(Storage(), "cub", str(tmp_path), "train")
    assert test.classes == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert len(test) == len(train) == 2 * len(CUB_CLASSES) and not set(test.image_ids) & set(train.image_ids)
    for i, label in zip(test.image_ids, test.labels):
        assert i.startswith(CUB_CLASSES[label])
    (tmp_path / "CUB_200_2011" / "classes.txt").unlink()
    with pytest.raises(DatasetError, match=r"CUB_200_2011/classes.txt: missing \(class names\)"):
        read_dataset(Storage(), "cub", str(tmp_path), "test")


def test_eurosat_seeded_90_10_split(tmp_path):
    write_eurosat(tmp_path)
    test = read_dataset(Storage(), "eurosat", str(tmp_path), "test", seed=0)
    train = read_dataset(Storage(), "eurosat", str(tmp_path), "train", seed=0)
    assert test.classes == ["annual crop land", "forest", "lake or sea"]  # CLIP's names, ImageFolder order
    assert len(test) == 3 and len(train) == 27 and not set(test.image_ids) & set(train.image_ids)
    assert read_dataset(Storage(), "eurosat", str(tmp_path), "test", seed=0).image_ids == test.image_ids
    assert read_dataset(Storage(), "eurosat", str(tmp_path), "test", seed=1).image_ids != test.image_ids
    assert seeded_test_mask(30, 0).sum() == 3
    with pytest.raises(DatasetError, match="eurosat/2750: no images"):
        read_dataset(Storage(), "eurosat", str(tmp_path / "empty"), "test")


def test_sun397_nested_classes(tmp_path):
    write_sun397(tmp_path)
    ds = read_dataset(Storage(), "sun397", str(tmp_path), "train", seed=3)
    assert ds.classes == ["abbey", "apartment building outdoor", "bedroom"]
    assert len(ds) == 27
    for i, label in zip(ds.image_ids, ds.labels):
        assert i.rsplit("/", 1)[0] == ["a/abbey", "a/apartment_building/outdoor", "b/bedroom"][label]
    stray = tmp_path / "SUN397" / "z" / "zoo"
    stray.mkdir(parents=True)
    (stray / "x.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="folder 'z/zoo' is not a class"):
        read_dataset(Storage(), "sun397", str(tmp_path), "test")


def test_awa2_attributes_and_test_classes(tmp_path):
    write_awa2(tmp_path)
    ds = read_dataset(Storage(), "awa2", str(tmp_path), "all")
    assert ds.classes == [c.replace("+", " ") for c in AWA2_CLASSES] and len(ds) == 12
    assert ds.class_attributes.shape == (4, 6) and ds.attribute_names[3] == "swims"
    test = read_dataset(Storage(), "awa2", str(tmp_path), "test")
    assert sorted({test.classes[c] for c in test.labels}) == ["dalmatian", "killer whale"]
    (tmp_path / "Animals_with_Attributes2" / "predicate-matrix-binary.txt").write_text("0 1\n")
    with pytest.raises(DatasetError, match=r"predicate-matrix-binary.txt: shape \(1, 2\), expected \(4, 6\)"):
        read_dataset(Storage(), "awa2", str(tmp_path), "all")


def test_coco_captions(tmp_path):
    write_coco(tmp_path)
    ds = read_dataset(Storage(), "coco", str(tmp_path), "val2014")
    assert len(ds) == 4 and ds.captions[1] == ["picture number 1 variant 0", "picture number 1 variant 1"]
    assert ds.uris[0].endswith("val2014/COCO_val2014_000000000100.jpg")
    with pytest.raises(DatasetError, match="captions_train2014.json: missing"):
        read_dataset(Storage(), "coco", str(tmp_path), "train2014")


def test_max_images_and_unknown_kind(tmp_path):
    write_eurosat(tmp_path)
    ds = read_dataset(Storage(), "eurosat", str(tmp_path), "train", max_images=5)
    assert len(ds) == 5 and ds.image_ids == sorted(ds.image_ids)
    with pytest.raises(DatasetError, match="unknown dataset kind 'imagenet'"):
        read_dataset(Storage(), "imagenet", str(tmp_path), "test")


def test_reads_from_s3(tmp_path, s3_root):
    write_cub(tmp_path)
    storage = Storage(StorageConfig(root=s3_root))
    storage.put_dir(tmp_path, "data")
    ds = read_dataset(storage, "cub", "data", "test")
    assert ds.root == f"{s3_root}/data/CUB_200_2011" and len(ds) == 6
    assert storage.read_bytes(ds.uris[0]) == (tmp_path / "CUB_200_2011" / "images" / ds.image_ids[0]).read_bytes()
    with pytest.raises(DatasetError, match=f"{s3_root}/missing/CUB_200_2011/images.txt: missing"):
        read_dataset(storage, "cub", "missing", "test")


def test_to_dataset_reads_bytes_in_ray(ray_local, tmp_path):
    write_sun397(tmp_path, per_class=2)
    ds = read_dataset(Storage(), "sun397", str(tmp_path), "train")
    rows = sorted(ds.to_dataset(Storage(), rows_per_block=2).take_all(), key=lambda r: r["image_id"])
    assert [r["image_id"] for r in rows] == ds.image_ids
    assert rows[0]["image"] == (tmp_path / "SUN397" / ds.image_ids[0]).read_bytes()
    assert np.all([len(r["image"]) > 100 for r in rows])
