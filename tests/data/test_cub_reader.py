"""The ``cub`` source on a tiny CUB-200-2011 tree with Reed et al.'s captions, written here: the images of one split
with a caption from their file, every other image of the split and every caption file naming no image as a reject
row with its reason, image ids equal to the CUB evaluation set's (local and s3://)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from pcd_ray import artifacts
from pcd_ray.config import JobConfig
from pcd_ray.data.readers import _cub_caption, make_images_artifact
from pcd_ray.eval.datasets import read_cub
from pcd_ray.storage import Storage

SIZE = (24, 20)  # over data.min_image_side (16)
ALBATROSS, LAYSAN = "001.Black_footed_Albatross", "002.Laysan_Albatross"


def _jpeg(colour: str, size=SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def _captions(number: int) -> bytes:
    return "".join(f"caption {k} of bird {number}: a bird with a white belly.\n" for k in range(10)).encode()


# number: (class, is_train, image bytes or None (no file), caption file bytes or None (no file))
IMAGES = {
    1: (ALBATROSS, False, _jpeg("red"), _captions(1)),
    2: (ALBATROSS, True, _jpeg("red"), _captions(2)),  # train: not read for the test split
    3: (ALBATROSS, False, _jpeg("blue"), None),
    4: (LAYSAN, False, _jpeg("blue"), b"\n   \n\n"),
    5: (LAYSAN, False, None, _captions(5)),
    6: (LAYSAN, False, _jpeg("green", (8, 8)), _captions(6)),
    7: (LAYSAN, False, _jpeg("green"), b"\n  second line first: a grey bird.  \n" + _captions(7)),
    8: (LAYSAN, False, _jpeg("grey"), "un oiseau gris, caf\u00e9\n".encode("latin-1")),
}
ORPHAN = f"{LAYSAN}/Laysan_Albatross_0099_99"  # a caption file whose image images.txt does not list


def rel(number: int) -> str:
    cls = IMAGES[number][0]
    return f"{cls}/{cls.split('.', 1)[1]}_{number:04d}_{number}.jpg"


def write_tree(root: Path) -> None:
    """CUB_200_2011/ (lists, labels, class names, images/) and cvpr2016_cub/text_c10/ under ``root``."""
    base, text = root / "CUB_200_2011", root / "cvpr2016_cub" / "text_c10"
    for n, (_cls, _, image, captions) in IMAGES.items():
        if image is not None:
            (base / "images" / rel(n)).parent.mkdir(parents=True, exist_ok=True)
            (base / "images" / rel(n)).write_bytes(image)
        if captions is not None:
            (text / rel(n)).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
            (text / rel(n)).with_suffix(".txt").write_bytes(captions)
    (text / f"{ORPHAN}.txt").write_bytes(_captions(99))
    (base / "images.txt").write_text("".join(f"{n} {rel(n)}\n" for n in IMAGES))
    (base / "train_test_split.txt").write_text("".join(f"{n} {int(v[1])}\n" for n, v in IMAGES.items()))
    (base / "image_class_labels.txt").write_text(
        "".join(f"{n} {[ALBATROSS, LAYSAN].index(v[0]) + 1}\n" for n, v in IMAGES.items())
    )
    (base / "classes.txt").write_text(f"1 {ALBATROSS}\n2 {LAYSAN}\n")


def _run(root: str, cub: dict) -> tuple[dict, dict[str, dict], dict[str, dict], Storage]:
    """-> (images manifest, {image_id: image row}, {image_id: reject row}, storage)"""
    job = JobConfig.model_validate({"storage": {"root": root}, "data": {"source": "cub", "cub": cub}})
    storage = Storage(job.storage)
    manifest = make_images_artifact(job, storage)
    images = {r["image_id"]: r for r in artifacts.read_table(storage, "images", "images").to_pylist()}
    rejects = {r["image_id"]: r for r in artifacts.read_table(storage, "image_rejects", "image_rejects").to_pylist()}
    assert manifest["summary"]["rows_in"] == len(images) + len(rejects) and manifest["complete"]
    return manifest, images, rejects, storage


def test_cub_test_split_with_reed_captions(ray_local, tmp_path):
    write_tree(tmp_path / "cub")
    manifest, images, rejects, _ = _run(str(tmp_path / "run"), {"root": str(tmp_path / "cub")})
    assert set(images) == {rel(1), rel(7)}
    assert images[rel(1)]["caption"] == "caption 0 of bird 1: a bird with a white belly."
    assert images[rel(7)]["caption"] == "second line first: a grey bird."  # blank lines are not captions
    assert {r["split"] for r in images.values()} == {"test"} and images[rel(1)]["image"] == IMAGES[1][2]
    assert {i: r["reason"] for i, r in rejects.items()} == {
        rel(3): "no_caption",
        rel(4): "empty_caption",
        rel(5): "missing_image",
        rel(6): "image_too_small",
        rel(8): "caption_not_utf8",
        ORPHAN: "unknown_image_id",
    }
    assert rejects[rel(3)]["detail"].endswith(str(Path(rel(3)).with_suffix(".txt")) + ")")
    assert rejects[ORPHAN]["source"].endswith(f"text_c10/{ORPHAN}.txt") and "images.txt" in rejects[ORPHAN]["detail"]
    assert manifest["summary"]["rejected_by_reason"] == {
        "caption_not_utf8": 1,
        "empty_caption": 1,
        "image_too_small": 1,
        "missing_image": 1,
        "no_caption": 1,
        "unknown_image_id": 1,
    }
    # The evaluation set's ids: every test image is written or rejected under the id eval gives it.
    cub = read_cub(Storage(), str(tmp_path / "cub"), "test", 0)
    assert set(cub.image_ids) == set(images) | {i for i in rejects if i != ORPHAN}

    _, train, train_rejects, _ = _run(str(tmp_path / "run-train"), {"root": str(tmp_path / "cub"), "split": "train"})
    assert set(train) == {rel(2)} and {i: r["reason"] for i, r in train_rejects.items()} == {ORPHAN: "unknown_image_id"}
    assert train[rel(2)]["split"] == "train"


def test_cub_on_s3_with_random_captions(ray_local, tmp_path, s3_root):
    write_tree(tmp_path / "cub")
    storage = Storage()
    for f in sorted(p for p in (tmp_path / "cub").rglob("*") if p.is_file()):
        storage.write_bytes(f"{s3_root}/cub/{f.relative_to(tmp_path / 'cub').as_posix()}", f.read_bytes())
    cub = {"root": f"{s3_root}/cub", "caption": "random", "seed": 3}
    _, images, rejects, _ = _run(f"{s3_root}/run", cub)
    assert set(images) == {rel(1), rel(7)} and rejects[ORPHAN]["reason"] == "unknown_image_id"
    for n in (1, 7):
        lines = [ln.strip() for ln in IMAGES[n][3].decode().splitlines() if ln.strip()]
        assert images[rel(n)]["caption"] in lines
        assert images[rel(n)]["caption"] == _cub_caption(
            IMAGES[n][3], "x", JobConfig.model_validate({"data": {"source": "cub", "cub": cub}}).data.cub, str(n)
        )
    assert images[rel(1)]["image"] == IMAGES[1][2]


def test_caption_pick_first_or_seeded():
    cfg = JobConfig.model_validate({"data": {"source": "cub", "cub": {"root": "x"}}}).data.cub
    data = _captions(1)
    assert _cub_caption(data, "f.txt", cfg, "1") == "caption 0 of bird 1: a bird with a white belly."
    picks = {}
    for seed in range(20):
        rnd = cfg.model_copy(update={"caption": "random", "seed": seed})
        picks[seed] = _cub_caption(data, "f.txt", rnd, "1")
        assert picks[seed] == _cub_caption(data, "f.txt", rnd, "1")  # the same for the same seed and image
    assert len(set(picks.values())) > 3  # different seeds pick different captions
    rnd = cfg.model_copy(update={"caption": "random", "seed": 0})
    assert len({_cub_caption(data, "f.txt", rnd, str(n)) for n in range(1, 21)}) > 3  # and different images


def test_cub_missing_or_malformed_fails_before_any_artifact(ray_local, tmp_path):
    write_tree(tmp_path / "cub")
    job = JobConfig.model_validate(
        {"storage": {"root": str(tmp_path / "run")}, "data": {"source": "cub", "cub": {"root": str(tmp_path / "cub")}}}
    )
    storage = Storage(job.storage)
    split = tmp_path / "cub" / "CUB_200_2011" / "train_test_split.txt"
    good = split.read_text()
    split.write_text(good.replace("1 0\n", "1\n"))
    with pytest.raises(ValueError, match=r"train_test_split.txt, line 1: expected"):
        make_images_artifact(job, storage)
    split.write_text(good.replace("1 0\n", ""))
    with pytest.raises(ValueError, match=r"train_test_split.txt: 1 images of images.txt have no line"):
        make_images_artifact(job, storage)
    split.write_text(good)
    for f in (tmp_path / "cub" / "cvpr2016_cub").rglob("*.txt"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"text_c10: no caption files"):
        make_images_artifact(job, storage)
    (tmp_path / "cub" / "CUB_200_2011" / "images.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images.txt: missing \(CUB image list\)"):
        make_images_artifact(job, storage)
    assert not artifacts.exists(storage, "images") and not artifacts.exists(storage, "image_rejects")
