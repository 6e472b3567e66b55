"""``pcd-ray fetch`` end to end against a local file server: each dataset's stand-in archives become the layout the
real readers read (pcd_ray/eval/datasets.py), the manifest records what was downloaded, and a re-run does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fetch_archives import (
    AWA2_CLASSES,
    BUILDERS,
    CIFAR_NAMES,
    CUB_CLASSES,
    FLOWER_NAMES,
    caption,
    coco_captions,
    cub_images,
    sha256,
    with_checksums,
)

from pcd_ray.cli import main
from pcd_ray.eval.datasets import read_dataset
from pcd_ray.fetch import specs
from pcd_ray.storage import Storage


def fetch_cli(server, dataset: str, to, cache, *extra: str) -> int:
    return main(
        ["fetch", dataset, "--to", str(to), "--base-url", server.url, "--cache", str(cache), "--no-progress", *extra]
    )


def serve(server, monkeypatch, dataset: str) -> dict[str, bytes]:
    """Serve the dataset's stand-ins; the registry's published md5s become theirs."""
    files = BUILDERS[dataset]()
    server.files.update(files)
    monkeypatch.setitem(specs.DATASETS, dataset, with_checksums(dataset, files))
    return files


def check_manifest(to: Path, dataset: str, files: dict[str, bytes], parts: list[str]) -> dict:
    manifest = json.loads((to / f"_fetch_{dataset}.json").read_text())
    assert sorted(manifest["parts"]) == sorted(parts)
    for part in parts:
        for src in manifest["parts"][part]["sources"]:
            assert src["sha256"] == sha256(files[src["name"]])
            assert src["bytes"] == len(files[src["name"]])
            published = next(
                s for p in specs.DATASETS[dataset].parts.values() for s in p.sources if s.name == src["name"]
            ).md5
            assert src["checksum"] == "md5 verified" if published else src["checksum"].startswith("none published")
    assert not list(to.glob(".fetch-staging-*"))
    return manifest


# (dataset, split read back, number of images in it, class names of the reader)
CASES = [
    ("cifar100", "test", 4, [n.replace("_", " ") for n in CIFAR_NAMES]),
    ("flowers102", "test", 3, None),
    ("eurosat", "train", 27, None),
    ("sun397", "test", 2, ["abbey", "apartment building outdoor", "bedroom"]),
    ("awa2", "test", 3, [c.replace("+", " ") for c in AWA2_CLASSES]),
]


@pytest.mark.parametrize("dataset,split,num,classes", CASES, ids=[c[0] for c in CASES])
def test_fetched_layout_is_what_the_reader_reads(server, monkeypatch, tmp_path, capsys, dataset, split, num, classes):
    files = serve(server, monkeypatch, dataset)
    to, cache = tmp_path / "datasets" / dataset, tmp_path / "cache"
    assert fetch_cli(server, dataset, to, cache) == 0
    ds = read_dataset(Storage(), dataset, str(to), split)
    assert len(ds) == num
    if classes is not None:
        assert ds.classes == classes
    if dataset == "flowers102":
        assert [ds.classes[k] for k in ds.labels] == FLOWER_NAMES
    if ds.uris is not None:  # the image bytes are the archive's, unchanged
        assert all(Path(u).read_bytes()[:2] == b"\xff\xd8" for u in ds.uris)
    manifest = check_manifest(to, dataset, files, ["all"])
    assert manifest["complete"] is True
    # Again: nothing is downloaded, nothing changes.
    served = len(server.requests)
    assert fetch_cli(server, dataset, to, cache) == 0
    assert "already fetched" in capsys.readouterr().out
    assert len(server.requests) == served
    assert json.loads((to / f"_fetch_{dataset}.json").read_text()) == manifest


def test_cub_images_and_reed_captions(server, monkeypatch, tmp_path):
    files = serve(server, monkeypatch, "cub")
    to = tmp_path / "cub"
    assert fetch_cli(server, "cub", to, tmp_path / "cache") == 0
    ds = read_dataset(Storage(), "cub", str(to), "test")
    assert len(ds) == 6 and ds.classes == [c.split(".", 1)[1].replace("_", " ") for c in CUB_CLASSES]
    # The layout the CUB pipeline source reads: CUB_200_2011/images/<p> and cvpr2016_cub/text_c10/<p>.txt.
    for p, _, _ in cub_images():
        assert (to / "CUB_200_2011" / "images" / p).is_file()
        lines = (to / "cvpr2016_cub" / "text_c10" / (p[:-4] + ".txt")).read_text().splitlines()
        assert lines == [caption(p, j) for j in range(10)]
    # Only the captions of the release are kept, not its Torch files.
    assert not list((to / "cvpr2016_cub").rglob("*.t7"))
    assert sorted(p.name for p in (to / "cvpr2016_cub").iterdir()) == ["text_c10"]
    manifest = check_manifest(to, "cub", files, ["images", "captions"])
    assert manifest["parts"]["captions"]["files"] == 12


def test_coco_parts_one_at_a_time(server, monkeypatch, tmp_path, capsys):
    files = serve(server, monkeypatch, "coco")
    to, cache = tmp_path / "coco", tmp_path / "cache"
    assert fetch_cli(server, "coco", to, cache, "--only", "annotations,val2014") == 0
    assert sorted(server.names()) == ["annotations_trainval2014.zip", "caption_datasets.zip", "val2014.zip"]
    ds = read_dataset(Storage(), "coco", str(to), "val2014")
    expected = coco_captions("val2014", 100, 4)
    assert ds.image_ids == [im["file_name"] for im in expected["images"]]
    assert ds.captions[0] == [f"val2014 picture 0 take {j}" for j in range(5)]
    assert sorted(p.name for p in (to / "annotations").iterdir()) == [
        "captions_train2014.json",
        "captions_val2014.json",
        "dataset_coco.json",
    ]  # no instances_*.json
    assert not (to / "train2014").exists()
    assert check_manifest(to, "coco", files, ["annotations", "val2014"])["complete"] is False

    # Without --only: only the missing part is downloaded; the train captions then read with their images.
    server.requests.clear()
    assert fetch_cli(server, "coco", to, cache) == 0
    assert server.names() == ["train2014.zip"]
    assert len(read_dataset(Storage(), "coco", str(to), "train2014")) == 3
    assert check_manifest(to, "coco", files, ["annotations", "train2014", "val2014"])["complete"] is True
    assert "already fetched" not in capsys.readouterr().out
    assert fetch_cli(server, "coco", to, cache, "--only", "val2014") == 0
    assert "already fetched" in capsys.readouterr().out


def test_s3_target(server, monkeypatch, tmp_path, s3_root, capsys):
    files = serve(server, monkeypatch, "cifar100")
    to = f"{s3_root}/datasets/cifar100"
    assert fetch_cli(server, "cifar100", to, tmp_path / "cache") == 0
    storage = Storage()
    ds = read_dataset(storage, "cifar100", to, "train")
    assert len(ds) == 8 and ds.classes == [n.replace("_", " ") for n in CIFAR_NAMES]
    manifest = storage.read_json(f"{to}/_fetch_cifar100.json")
    assert manifest["parts"]["all"]["sources"][0]["sha256"] == sha256(files["cifar-100-python.tar.gz"])
    assert sorted(u.rsplit("/", 1)[-1] for u in storage.find(to)) == ["_fetch_cifar100.json", "meta", "test", "train"]
    assert not list((tmp_path / "cache").rglob(".fetch-staging-*"))  # the local staging folder is gone
    assert fetch_cli(server, "cifar100", to, tmp_path / "cache") == 0
    assert "already fetched" in capsys.readouterr().out
    assert len(server.requests) == 1
