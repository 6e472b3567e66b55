"""Dataset readers on fixtures in each standard layout, written here: COCO captions, webdataset shards (also from
s3://), Parquet (bytes, Hugging Face structs, URIs) and an image folder with a captions file. Every input row must
land once, in images or in image_rejects with its reason; the checks' limits come from the data section."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pcd_ray import artifacts
from pcd_ray.config import ConfigError, DataConfig, JobConfig, load_job
from pcd_ray.data.readers import REASONS, _candidates, _expand_braces, check_batch, make_images_artifact
from pcd_ray.storage import Storage

SIZE = (24, 20)  # over data.min_image_side (16)


def _jpeg(colour: str, size=SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


GOOD = _jpeg("red")
CORRUPT = GOOD[: len(GOOD) // 3]  # a truncated JPEG: the header parses, the pixels do not
NOT_UTF8 = b"caf\xe9 au lait"  # latin-1


def _run(tmp_path: Path, data: dict) -> tuple[dict, dict[str, dict], dict[str, str]]:
    """-> (images manifest, {image_id: image row}, {image_id or source: reject reason})"""
    job = JobConfig.model_validate({"storage": {"root": str(tmp_path / "run")}, "data": data})
    storage = Storage(job.storage)
    manifest = make_images_artifact(job, storage)
    images = {r["image_id"]: r for r in artifacts.read_table(storage, "images", "images").to_pylist()}
    rejects = artifacts.read_table(storage, "image_rejects", "image_rejects").to_pylist()
    by_id = {(r["image_id"] if not r["image_id"].startswith("row-") else r["source"]): r["reason"] for r in rejects}
    assert manifest["summary"]["rows_in"] == len(images) + len(rejects)
    assert manifest["summary"]["rejected"] == len(rejects) and manifest["complete"]
    for img in images.values():
        assert Image.open(io.BytesIO(img["image"])).size == SIZE and img["caption"]
    return manifest, images, by_id


def test_coco_captions_and_image_folder(ray_local, tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    files = {1: GOOD, 2: CORRUPT, 3: GOOD, 5: GOOD, 6: _jpeg("red", (1, 1)), 7: GOOD}  # 4 has no file
    for i, data in files.items():
        (root / "train2014" / f"COCO_train2014_{i:012d}.jpg").write_bytes(data)
    meta = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in (1, 2, 3, 4, 5, 6, 7)],
        "annotations": [
            {"id": 11, "image_id": 1, "caption": "A dog on a red couch."},
            {"id": 10, "image_id": 1, "caption": "  The first\ncaption.  "},  # lowest id: chosen by "first"
            {"id": 20, "image_id": 2, "caption": "A broken picture."},
            {"id": 30, "image_id": 3, "caption": "   "},
            {"id": 40, "image_id": 4, "caption": "No file for this one."},
            {"id": 60, "image_id": 6, "caption": "A tracking pixel."},
            {"id": 70, "image_id": 7, "caption": "scraped page text " * 12_000},  # ~200 KB
            {"id": 90, "image_id": 99, "caption": "An image the images list does not have."},
        ],  # 5 has no caption
    }
    (root / "captions_train2014.json").write_text(json.dumps(meta))
    manifest, images, rejects = _run(
        tmp_path,
        {
            "source": "coco",
            "coco": {"annotations": str(root / "captions_train2014.json"), "images": str(root / "train2014")},
        },
    )
    assert list(images) == ["coco-1"] and images["coco-1"]["caption"] == "The first caption."
    assert images["coco-1"]["split"] == "train" and images["coco-1"]["attributes"] is None
    assert rejects == {
        "coco-2": "corrupt_image",
        "coco-3": "empty_caption",
        "coco-4": "missing_image",
        "coco-5": "no_caption",
        "coco-6": "image_too_small",
        "coco-7": "caption_too_long",
        "coco-99": "unknown_image_id",
    }
    assert manifest["summary"]["rejected_by_reason"] == {
        "caption_too_long": 1,
        "corrupt_image": 1,
        "empty_caption": 1,
        "image_too_small": 1,
        "missing_image": 1,
        "no_caption": 1,
        "unknown_image_id": 1,
    }
    storage = Storage(JobConfig.model_validate({"storage": {"root": str(tmp_path / "run")}}).storage)
    unknown = next(
        r
        for r in artifacts.read_table(storage, "image_rejects", "image_rejects").to_pylist()
        if r["reason"] == "unknown_image_id"
    )
    assert unknown["source"].endswith("captions_train2014.json#annotation-90") and "99" in unknown["detail"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _img2dataset_shards(d: Path) -> None:
    """Two good shards in img2dataset's layout and a third cut off mid-member."""
    d.mkdir(parents=True, exist_ok=True)

    def sample(key, jpg, txt):
        out = [] if jpg is None else [(f"{key}.jpg", jpg)]
        out += [(f"{key}.txt", txt), (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]
        return out

    _tar(
        d / "00000.tar",
        sample("000000000", GOOD, b"a red square on grey")
        + sample("000000001", CORRUPT, b"bad")
        + sample("000000002", GOOD, NOT_UTF8),
    )
    _tar(
        d / "00001.tar",
        sample("000010000", None, b"caption without image")
        + sample("000010001", GOOD, b"")
        + sample("000010002", GOOD, "a caf\u00e9 photo".encode()),
    )
    _tar(d / "full.tar", sample("000020000", GOOD, b"kept before the damage") + sample("000020001", GOOD, b"lost"))
    with tarfile.open(d / "full.tar") as tf:
        second = next(m.offset for m in tf.getmembers() if m.name.startswith("000020001"))
    data = (d / "full.tar").read_bytes()
    (d / "00002.tar").write_bytes(data[: second + 700])  # cut inside the second sample's image
    (d / "full.tar").unlink()


def _check_webdataset(images, rejects, shard_prefix: str):
    assert set(images) == {"000000000", "000010002", "000020000"}
    assert images["000010002"]["caption"] == "a caf\u00e9 photo"
    assert images["000000000"]["source"].endswith("00000.tar#000000000")
    damaged = {k: v for k, v in rejects.items() if k.startswith(shard_prefix)}
    assert list(damaged.values()) == ["corrupt_shard"] and list(damaged)[0].endswith("00002.tar")
    assert {k: v for k, v in rejects.items() if k not in damaged} == {
        "000000001": "corrupt_image",
        "000000002": "caption_not_utf8",
        "000010000": "missing_image",
        "000010001": "empty_caption",
    }


def test_webdataset_shards_local_brace_range(ray_local, tmp_path):
    _img2dataset_shards(tmp_path / "shards")
    _, images, rejects = _run(
        tmp_path, {"source": "webdataset", "webdataset": {"shards": str(tmp_path / "shards" / "{00000..00002}.tar")}}
    )
    _check_webdataset(images, rejects, str(tmp_path))


def test_webdataset_shards_on_s3(ray_local, tmp_path, s3_root):
    _img2dataset_shards(tmp_path / "shards")
    storage = Storage()
    for f in sorted((tmp_path / "shards").iterdir()):
        storage.write_bytes(f"{s3_root}/shards/{f.name}", f.read_bytes())
    job_root = f"{s3_root}/run"
    job = JobConfig.model_validate(
        {
            "storage": {"root": job_root},
            "data": {"source": "webdataset", "webdataset": {"shards": f"{s3_root}/shards/*.tar"}},
        }
    )
    storage = Storage(job.storage)
    manifest = make_images_artifact(job, storage)
    images = {r["image_id"]: r for r in artifacts.read_table(storage, "images", "images").to_pylist()}
    rejects = {
        (r["image_id"] if not r["image_id"].startswith("row-") else r["source"]): r["reason"]
        for r in artifacts.read_table(storage, "image_rejects", "image_rejects").to_pylist()
    }
    _check_webdataset(images, rejects, "s3://")
    assert manifest["summary"]["images"] == 3


def test_parquet_with_bytes_structs_and_uris(ray_local, tmp_path):
    t = pa.table(
        {
            "key": ["a", "b", "c", "d"],
            "text": ["one red image", None, "a corrupt one", "the fourth"],
            "img": [GOOD, GOOD, CORRUPT, GOOD],
        }
    )
    pq.write_table(t, tmp_path / "bytes.parquet")
    _, images, rejects = _run(
        tmp_path / "b",
        {
            "source": "parquet",
            "parquet": {
                "paths": str(tmp_path / "bytes.parquet"),
                "caption_column": "text",
                "image_column": "img",
                "id_column": "key",
            },
        },
    )
    assert set(images) == {"a", "d"} and rejects == {"b": "no_caption", "c": "corrupt_image"}

    hf = pa.table(
        {
            "caption": ["hf style", "hf too"],
            "image": [{"bytes": GOOD, "path": "x.jpg"}, {"bytes": _jpeg("blue"), "path": "y.jpg"}],
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    _, images, rejects = _run(tmp_path / "h", {"source": "parquet", "parquet": {"paths": str(tmp_path / "hf.parquet")}})
    assert len(images) == 2 and not rejects and all(i.startswith("sha1-") for i in images)

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.jpg").write_bytes(GOOD)
    uris = pa.table({"caption": ["by uri", "missing file"], "path": ["x.jpg", "nope.jpg"]})
    pq.write_table(uris, tmp_path / "uris.parquet")
    _, images, rejects = _run(
        tmp_path / "u",
        {
            "source": "parquet",
            "parquet": {
                "paths": str(tmp_path / "uris.parquet"),
                "image_column": None,
                "uri_column": "path",
                "uri_root": str(tmp_path / "imgs"),
            },
        },
    )
    assert list(images) == [str(tmp_path / "imgs" / "x.jpg")]
    assert list(rejects.values()) == ["missing_image"]


def test_folder_with_csv_and_jsonl_captions(ray_local, tmp_path):
    d = tmp_path / "folder"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.jpg").write_bytes(GOOD)
    (d / "b.jpg").write_bytes(CORRUPT)
    (d / "c.jpg").write_bytes(GOOD)
    with open(d / "captions.csv", "wb") as f:
        f.write(b"file_name,caption\nsub/a.jpg,a red image\nb.jpg,corrupt\nc.jpg," + NOT_UTF8 + b"\nmissing.jpg,gone\n")
    _, images, rejects = _run(
        tmp_path / "csv", {"source": "folder", "folder": {"root": str(d), "captions": str(d / "captions.csv")}}
    )
    assert list(images) == ["sub/a.jpg"] and images["sub/a.jpg"]["caption"] == "a red image"
    assert rejects == {"b.jpg": "corrupt_image", "c.jpg": "caption_not_utf8", "missing.jpg": "missing_image"}

    (d / "captions.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [{"path": "sub/a.jpg", "text": "from jsonl", "split": "test"}, {"path": "c.jpg", "text": ""}]
        )
        + "\n"
    )
    _, images, rejects = _run(
        tmp_path / "jsonl",
        {
            "source": "folder",
            "folder": {
                "root": str(d),
                "captions": str(d / "captions.jsonl"),
                "file_column": "path",
                "caption_column": "text",
                "split_column": "split",
            },
        },
    )
    assert images["sub/a.jpg"]["split"] == "test" and rejects == {"c.jpg": "empty_caption"}


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no data.coco section"):
        load_job("local", ["data.source=coco"])
    with pytest.raises(ConfigError, match="exactly one of image_column and uri_column"):
        load_job("local", ["data.source=parquet", "data.parquet.paths=x", "data.parquet.uri_column=u"])
    assert _expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]


def test_missing_dataset_names_the_path(ray_local, tmp_path):
    job = JobConfig.model_validate(
        {
            "storage": {"root": str(tmp_path)},
            "data": {"source": "webdataset", "webdataset": {"shards": str(tmp_path / "none-*.tar")}},
        }
    )
    with pytest.raises(FileNotFoundError, match="none-"):
        make_images_artifact(job, Storage(job.storage))


def _checked(rows: list[dict], **limits) -> list[tuple[str | None, str | None]]:
    """(reason, detail) per candidate row after ``check_batch`` with these DataConfig limits (no Ray)."""
    cols = {c: [r.get(c) for r in rows] for c in ("image_id", "split", "caption", "image", "source")}
    out = check_batch(_candidates(cols), DataConfig(**limits)).to_pylist()
    return [(r["reason"], r["detail"]) for r in out]


def test_limits_come_from_the_data_section():
    """A long caption and a tiny image are rejects with their reason codes under the defaults, and kept when the
    limits allow them; a caption at the limit is kept."""
    rows = [
        {"image_id": "long", "caption": "x" * 1001, "image": GOOD, "source": "s"},
        {"image_id": "limit", "caption": "x" * 1000, "image": GOOD, "source": "s"},
        {"image_id": "tiny", "caption": "a pixel", "image": _jpeg("red", (1, 1)), "source": "s"},
        {"image_id": "narrow", "caption": "a strip", "image": _jpeg("red", (200, 15)), "source": "s"},
    ]
    reasons = _checked(rows)
    assert [r for r, _ in reasons] == ["caption_too_long", None, "image_too_small", "image_too_small"]
    assert reasons[0][1] == "1001 characters, over the limit of 1000"
    assert reasons[3][1] == "image is 200x15, under the minimum side of 16 pixels"
    assert _checked(rows, max_caption_chars=2000, min_image_side=1) == [(None, None)] * 4
    assert _checked(rows, max_image_bytes=100)[1][0] == "image_too_large"
    assert {r for r, _ in reasons if r} <= set(REASONS)
