"""Tiny stand-ins for the published files, built with the same names and inner layouts (top folders, file formats)
as the real archives, so that what ``pcd-ray fetch`` makes of them must be readable by the real readers."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import tarfile
import zipfile

import numpy as np

from pcd_ray.fetch import specs

CIFAR_NAMES = ["apple", "aquarium_fish", "maple_tree", "wolf"]
EUROSAT = ["AnnualCrop", "Forest", "SeaLake"]
SUN = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]
AWA2_CLASSES = ["antelope", "grizzly+bear", "killer+whale"]
AWA2_PREDICATES = ["black", "white", "furry", "swims"]
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
FLOWER_NAMES = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]


def jpeg(seed: int, size: int = 16) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folders = sorted({"/".join(n.split("/")[:k]) for n in files for k in range(1, n.count("/") + 1)})
        for d in folders:  # real archives list their folders too
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def with_checksums(name: str, files: dict[str, bytes]) -> specs.DatasetSpec:
    """The dataset's spec with each published md5 replaced by the md5 of these stand-ins (files without a
    published checksum stay without one)."""
    spec = specs.get(name)
    parts = {}
    for part_name, part in spec.parts.items():
        sources = tuple(
            dataclasses.replace(s, md5=md5(files[s.name])) if s.md5 and s.name in files else s for s in part.sources
        )
        parts[part_name] = dataclasses.replace(part, sources=sources)
    return dataclasses.replace(spec, parts=parts)


# ---------------------------------------------------------------------------------------------------- datasets
def cifar100() -> dict[str, bytes]:
    members = {
        "cifar-100-python/meta": pickle.dumps(
            {b"fine_label_names": [n.encode() for n in CIFAR_NAMES], b"coarse_label_names": [b"fruit"]}
        )
    }
    for split, n in (("train", 8), ("test", 4)):
        labels = [k % len(CIFAR_NAMES) for k in range(n)]
        data = np.random.default_rng(n).integers(0, 255, (n, 3072), dtype=np.uint8)
        members[f"cifar-100-python/{split}"] = pickle.dumps(
            {b"data": data, b"fine_labels": labels, b"filenames": [f"{split}_{k}.png".encode() for k in range(n)]}
        )
    return {"cifar-100-python.tar.gz": tar_gz(members)}


def flowers102() -> dict[str, bytes]:
    """Two images of each of FLOWER_NAMES (labels 1, 2, 3); test ids are the even image numbers."""
    from scipy.io import savemat

    labels = [c + 1 for c in range(len(FLOWER_NAMES)) for _ in range(2)]
    images = {f"jpg/image_{k + 1:05d}.jpg": jpeg(k) for k in range(len(labels))}

    def mat(obj) -> bytes:
        buf = io.BytesIO()
        savemat(buf, obj)
        return buf.getvalue()

    ids = np.arange(1, len(labels) + 1)
    return {
        "102flowers.tgz": tar_gz(images),
        "imagelabels.mat": mat({"labels": np.asarray(labels)}),
        "setid.mat": mat({"trnid": ids[0::2], "valid": ids[0::2], "tstid": ids[1::2]}),
    }


def eurosat() -> dict[str, bytes]:
    return {
        "EuroSAT.zip": zip_bytes(
            {f"2750/{c}/{c}_{k + 1}.jpg": jpeg(10 * i + k) for i, c in enumerate(EUROSAT) for k in range(10)}
        )
    }


def sun397() -> dict[str, bytes]:
    members = {"SUN397/ClassName.txt": ("\n".join(SUN) + "\n").encode(), "SUN397/README.txt": b"SUN397\n"}
    for i, key in enumerate(SUN):
        for k in range(4):
            members[f"SUN397{key}/sun_{i}{k:04d}.jpg"] = jpeg(100 + 10 * i + k)
    return {"SUN397.tar.gz": tar_gz(members)}


def awa2() -> dict[str, bytes]:
    base = "Animals_with_Attributes2"
    matrix = [[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    members = {
        f"{base}/classes.txt": "".join(f"\t{k + 1}\t{c}\n" for k, c in enumerate(AWA2_CLASSES)).encode(),
        f"{base}/predicates.txt": "".join(f"\t{k + 1}\t{p}\n" for k, p in enumerate(AWA2_PREDICATES)).encode(),
        f"{base}/predicate-matrix-binary.txt": "\n".join(" ".join(map(str, r)) for r in matrix).encode(),
        f"{base}/testclasses.txt": b"killer+whale\n",
    }
    for i, c in enumerate(AWA2_CLASSES):
        for k in range(3):
            members[f"{base}/JPEGImages/{c}/{c}_{10001 + k}.jpg"] = jpeg(200 + 10 * i + k)
    return {"AwA2-data.zip": zip_bytes(members)}


def cub_images() -> list[tuple[str, int, bool]]:
    """(image path, 0-based class, is_train) of the stand-in CUB: four images per class, two of them train."""
    out = []
    for c, folder in enumerate(CUB_CLASSES):
        for k in range(4):
            out.append((f"{folder}/{folder.split('.', 1)[1]}_{c:02d}{k:02d}_{1000 + k}.jpg", c, k % 2 == 0))
    return out


def caption(path: str, j: int) -> str:
    return f"bird {path.rsplit('/', 1)[-1][:-4].lower()} description {j}"


def cub() -> dict[str, bytes]:
    images = cub_images()
    base = "CUB_200_2011"
    members = {
        f"{base}/images.txt": "".join(f"{n + 1} {p}\n" for n, (p, _, _) in enumerate(images)).encode(),
        f"{base}/image_class_labels.txt": "".join(f"{n + 1} {c + 1}\n" for n, (_, c, _) in enumerate(images)).encode(),
        f"{base}/train_test_split.txt": "".join(f"{n + 1} {int(t)}\n" for n, (_, _, t) in enumerate(images)).encode(),
        f"{base}/classes.txt": "".join(f"{k + 1} {c}\n" for k, c in enumerate(CUB_CLASSES)).encode(),
        "attributes.txt": b"1 has_bill_shape::curved\n",
    }
    for n, (p, _, _) in enumerate(images):
        members[f"{base}/images/{p}"] = jpeg(300 + n)
    # The captions release also holds Torch feature files and word-level text beside text_c10's .txt files.
    reed = {
        f"cvpr2016_cub/text_c10/{p[:-4]}.txt": "".join(caption(p, j) + "\n" for j in range(10)).encode()
        for p, _, _ in images
    }
    reed.update({f"cvpr2016_cub/text_c10/{c}.t7": b"\x00torch" for c in CUB_CLASSES})
    reed.update({f"cvpr2016_cub/images/{c}.t7": b"\x00torch" for c in CUB_CLASSES})
    reed["cvpr2016_cub/allclasses.txt"] = ("\n".join(CUB_CLASSES) + "\n").encode()
    return {"CUB_200_2011.tgz": tar_gz(members), "cvpr2016_cub.tar.gz": tar_gz(reed)}


def coco_captions(split: str, first_id: int, n: int) -> dict:
    images = [{"id": first_id + k, "file_name": f"COCO_{split}_{first_id + k:012d}.jpg"} for k in range(n)]
    anns = [
        {"id": 10 * (first_id + k) + j, "image_id": first_id + k, "caption": f"{split} picture {k} take {j}"}
        for k in range(n)
        for j in range(5)
    ]
    return {"images": images, "annotations": anns}


def coco() -> dict[str, bytes]:
    caps = {"train2014": coco_captions("train2014", 1, 3), "val2014": coco_captions("val2014", 100, 4)}
    annotations = {f"annotations/captions_{s}.json": json.dumps(c).encode() for s, c in caps.items()}
    annotations["annotations/instances_val2014.json"] = b'{"images": [], "annotations": [], "categories": []}'
    karpathy = {
        "dataset_coco.json": json.dumps(
            {"images": [{"filename": im["file_name"], "split": "test"} for im in caps["val2014"]["images"]]}
        ).encode(),
        "dataset_flickr8k.json": b'{"images": []}',
    }
    out = {"annotations_trainval2014.zip": zip_bytes(annotations), "caption_datasets.zip": zip_bytes(karpathy)}
    for split, c in caps.items():
        out[f"{split}.zip"] = zip_bytes({f"{split}/{im['file_name']}": jpeg(im["id"]) for im in c["images"]})
    return out


BUILDERS = {
    "cifar100": cifar100,
    "flowers102": flowers102,
    "eurosat": eurosat,
    "sun397": sun397,
    "awa2": awa2,
    "cub": cub,
    "coco": coco,
}
