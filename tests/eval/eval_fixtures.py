"""Tiny datasets in their standard on-disk layouts (a few images each), written by the tests themselves."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np

CIFAR_NAMES = ["apple", "camel", "hamster", "leopard", "lion", "rabbit", "shrew", "squirrel", "wolf", "aquarium_fish"]
EUROSAT = ["AnnualCrop", "Forest", "SeaLake"]
SUN = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bedroom"]
AWA2_CLASSES = ["antelope", "grizzly+bear", "killer+whale", "dalmatian"]
AWA2_PREDICATES = ["black", "white", "furry", "swims", "stripes", "smart"]
AWA2_MATRIX = [
    [0, 1, 1, 0, 0, 0],  # antelope: white, furry
    [1, 0, 1, 0, 0, 1],  # grizzly bear: black, furry (smart: not visual)
    [1, 1, 0, 1, 0, 1],  # killer whale: black, white (swims, smart: not visual)
    [1, 1, 1, 0, 0, 0],
]  # dalmatian: black, white, furry
AWA2_ALL_PREDICATES = (
    "black white blue brown gray orange red yellow patches spots stripes furry hairless toughskin big small bulbous "
    "lean flippers hands hooves pads paws longleg longneck tail chewteeth meatteeth buckteeth strainteeth horns claws "
    "tusks smelly flys hops swims tunnels walks fast slow strong weak muscle bipedal quadrapedal active inactive "
    "nocturnal hibernate agility fish meat plankton vegetation insects forager grazer hunter scavenger skimmer stalker "
    "newworld oldworld arctic coastal desert bush plains forest fields jungle mountains ocean ground water tree cave "
    "fierce timid smart group solitary nestspot domestic"
).split()
"""AwA2's 85 predicates in predicates.txt order."""
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def image_bytes(seed: int, size: int = 24, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def _img(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed))


def write_cifar100(root: Path, per_class: int = 2) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    (base / "meta").write_bytes(pickle.dumps({b"fine_label_names": [n.encode() for n in CIFAR_NAMES]}))
    for split, offset in (("train", 0), ("test", 1000)):
        labels = [c for c in range(len(CIFAR_NAMES)) for _ in range(per_class)]
        data = np.random.default_rng(offset).integers(0, 255, (len(labels), 3072), dtype=np.uint8)
        files = [f"{CIFAR_NAMES[c]}_s_{offset + k:06d}.png".encode() for k, c in enumerate(labels)]
        (base / split).write_bytes(pickle.dumps({b"data": data, b"fine_labels": labels, b"filenames": files}))


def write_flowers102(root: Path, names: list[str], per_class: int = 2) -> list[int]:
    """Images of the named classes (torchvision's class order); returns each image's 1-based label."""
    from scipy.io import savemat
    from torchvision.datasets import Flowers102

    base = root / "flowers-102"
    labels = [Flowers102.classes.index(n) + 1 for n in names for _ in range(per_class)]
    for k in range(len(labels)):
        _img(base / "jpg" / f"image_{k + 1:05d}.jpg", k)
    savemat(base / "imagelabels.mat", {"labels": np.asarray(labels)})
    ids = np.arange(1, len(labels) + 1)
    savemat(base / "setid.mat", {"trnid": ids[::2], "valid": ids[1::4], "tstid": ids[1::2]})
    return labels


def write_cub(root: Path, per_class: int = 2) -> None:
    base = root / "CUB_200_2011"
    images, labels, split = [], [], []
    n = 0
    for c, folder in enumerate(CUB_CLASSES):
        for k in range(per_class * 2):
            n += 1
            rel = f"{folder}/{folder.split('.')[1]}_{n:04d}_{k}.jpg"
            _img(base / "images" / rel, n)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {c + 1}")
            split.append(f"{n} {int(k % 2 == 0)}")
    base.mkdir(parents=True, exist_ok=True)
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("\n".join(f"{c + 1} {f}" for c, f in enumerate(CUB_CLASSES)) + "\n")


def write_eurosat(root: Path, per_class: int = 10) -> None:
    for c, name in enumerate(EUROSAT):
        for k in range(per_class):
            _img(root / "eurosat" / "2750" / name / f"{name}_{k + 1}.jpg", 100 * c + k)


def write_sun397(root: Path, per_class: int = 10) -> None:
    base = root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(SUN) + "\n")
    for c, key in enumerate(SUN):
        for k in range(per_class):
            _img(base / key.strip("/") / f"sun_{c}{k:04d}.jpg", 200 * c + k)


def write_awa2(root: Path, per_class: int = 3, predicates: list[str] = AWA2_PREDICATES) -> None:
    """``predicates``: the predicate list written; a column named like one of ``AWA2_PREDICATES`` takes its values
    from ``AWA2_MATRIX``, any other is 0."""
    base = root / "Animals_with_Attributes2"
    base.mkdir(parents=True)
    col = {p: k for k, p in enumerate(AWA2_PREDICATES)}
    matrix = [[r[col[p]] if p in col else 0 for p in predicates] for r in AWA2_MATRIX]
    (base / "classes.txt").write_text("".join(f"\t{k + 1}\t{c}\n" for k, c in enumerate(AWA2_CLASSES)))
    (base / "predicates.txt").write_text("".join(f"\t{k + 1}\t{p}\n" for k, p in enumerate(predicates)))
    (base / "predicate-matrix-binary.txt").write_text("\n".join(" ".join(map(str, r)) for r in matrix) + "\n")
    (base / "testclasses.txt").write_text("killer+whale\ndalmatian\n")
    for c, name in enumerate(AWA2_CLASSES):
        for k in range(per_class):
            _img(base / "JPEGImages" / name / f"{name}_{10001 + k}.jpg", 300 * c + k)


def write_coco(root: Path, n: int = 4) -> None:
    images = [{"id": 100 + k, "file_name": f"COCO_val2014_{100 + k:012d}.jpg"} for k in range(n)]
    anns = [
        {"id": 1000 + 2 * k + j, "image_id": 100 + k, "caption": f"picture number {k} variant {j}"}
        for k in range(n)
        for j in range(2)
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    for k, im in enumerate(images):
        _img(root / "val2014" / im["file_name"], 400 + k)


def make_export(storage, uri: str, seed: int) -> str:
    """A pcd-micro export with random weights drawn from ``seed``."""
    import torch

    from pcd_ray.config import ModelSpec
    from pcd_ray.model.export import export_model
    from pcd_ray.model.factory import load_model

    torch.manual_seed(seed)
    loaded = load_model(ModelSpec(name="pcd-micro"))
    return export_model(
        loaded.model.state_dict(), loaded.model_cfg, loaded.preprocess_cfg, storage, uri, meta={"seed": seed}
    )
