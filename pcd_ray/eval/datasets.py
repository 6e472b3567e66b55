"""Readers for the paper's evaluation datasets in their standard on-disk layouts, from a local or s3:// root.

Nothing downloads: each reader expects the layout torchvision (or the dataset's authors) unpack, under ``root``:

| kind | layout under root | split |
|---|---|---|
| cifar100 | ``cifar-100-python/{train,test,meta}`` (python pickles) | the file's (train, test) |
| flowers102 | ``flowers-102/jpg/image_00001.jpg``, ``imagelabels.mat``, ``setid.mat`` | setid (train, val, test) |
| cub | ``CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}`` | the file's |
| eurosat | ``eurosat/2750/<Class>/<Class>_<n>.jpg`` (torchvision) | seeded 90/10 (train, test) |
| sun397 | ``SUN397/ClassName.txt``, ``SUN397/<l>/<class>[/<sub>]/*.jpg`` (torchvision) | seeded 90/10 |
| awa2 | ``Animals_with_Attributes2/{classes,predicates,testclasses}.txt``, ``predicate-matrix-binary.txt``, |
|      | ``JPEGImages/<class>/*.jpg`` | all, or test (the 10 test classes) |
| coco | ``annotations/captions_<split>.json``, ``<split>/<file_name>`` | the file name's (val2014, ...) |

A missing file or a malformed one raises ``DatasetError`` naming the path. Images are listed in the driver (ids and
URIs only); their bytes are read inside Ray Data tasks (``to_dataset``), so a large set never passes through the
driver (CIFAR-100 is the exception: its pixels live in one pickle, and 10k PNGs of 32x32 are small).
"""

from __future__ import annotations

import io
import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pcd_ray.storage import Storage, join

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
TEST_FRACTION = 0.1
KINDS = ("cifar100", "flowers102", "cub", "eurosat", "sun397", "awa2", "coco")


class DatasetError(RuntimeError):
    """A dataset is missing or malformed; the message names the path."""


@dataclass
class LabelledSet:
    """One split of a dataset, in a fixed order (sorted image ids).

    ``labels[i]`` indexes ``classes`` (display names used in prompts); exactly one of ``uris`` (one file per image)
    and ``images`` (encoded bytes) is set. AwA2 adds its class-attribute matrix, COCO its captions.
    """

    kind: str
    root: str
    split: str
    classes: list[str]
    image_ids: list[str]
    labels: np.ndarray
    uris: list[str] | None = None
    images: list[bytes] | None = None
    captions: list[list[str]] | None = None
    class_attributes: np.ndarray | None = None  # [k, a] 0/1
    attribute_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, keep: np.ndarray) -> LabelledSet:
        keep = np.asarray(keep, dtype=np.int64)
        pick = lambda xs: None if xs is None else [xs[i] for i in keep]  # noqa: E731
        return LabelledSet(
            self.kind,
            self.root,
            self.split,
            self.classes,
            pick(self.image_ids),
            self.labels[keep],
            pick(self.uris),
            pick(self.images),
            pick(self.captions),
            self.class_attributes,
            self.attribute_names,
            dict(self.meta),
        )

    def to_dataset(self, storage: Storage, rows_per_block: int = 1000):
        """A Ray Dataset with ``image_id`` and ``image`` (bytes), read in Ray tasks."""
        import ray.data

        blocks = max(1, math.ceil(len(self) / rows_per_block))
        if self.images is not None:
            return ray.data.from_items(
                [{"image_id": i, "image": b} for i, b in zip(self.image_ids, self.images)], override_num_blocks=blocks
            )
        items = [{"image_id": i, "uri": u} for i, u in zip(self.image_ids, self.uris)]
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _ReadBytes(storage), batch_format="pyarrow"
        )


class _ReadBytes:
    """uri -> image bytes; an unreadable file becomes a null image (the embedder reports it as an error row)."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __call__(self, batch):
        import pyarrow as pa

        data = []
        for uri in batch.column("uri").to_pylist():
            try:
                data.append(self.storage.read_bytes(uri))
            except OSError:
                data.append(None)
        return pa.table({"image_id": batch.column("image_id"), "image": pa.array(data, type=pa.binary())})


# ---------------------------------------------------------------------------------------------------- helpers
def _need(storage: Storage, uri: str, what: str) -> str:
    if not storage.exists(uri):
        raise DatasetError(f"{uri}: missing ({what})")
    return uri


def _lines(storage: Storage, uri: str, what: str) -> list[list[str]]:
    """Whitespace-split non-empty lines of a text file."""
    text = storage.read_text(_need(storage, uri, what))
    return [ln.split() for ln in text.splitlines() if ln.strip()]


def _images_below(storage: Storage, uri: str) -> list[str]:
    files = [f for f in storage.find(uri) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DatasetError(f"{uri}: no images ({'/'.join(IMAGE_EXTENSIONS)}) found")
    return files


def seeded_test_mask(n: int, seed: int, fraction: float = TEST_FRACTION) -> np.ndarray:
    """A seeded split of n (sorted) items: True for the ``fraction`` held out as test (at least one)."""
    perm = np.random.default_rng(seed).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[perm[: max(1, math.ceil(fraction * n))]] = True
    return mask


def _split_seeded(ds: LabelledSet, split: str, seed: int) -> LabelledSet:
    if split not in ("train", "test"):
        raise DatasetError(f"{ds.root}: split must be 'train' or 'test' (seeded 90/10), got {split!r}")
    mask = seeded_test_mask(len(ds), seed)
    return ds.subset(np.flatnonzero(mask if split == "test" else ~mask))


def _sorted_set(kind, root, split, classes, ids, labels, uris=None, **kw) -> LabelledSet:
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    ds = LabelledSet(
        kind,
        root,
        split,
        classes,
        list(ids),
        np.asarray(labels, dtype=np.int64),
        list(uris) if uris is not None else None,
        **kw,
    )
    return ds.subset(order)


# ---------------------------------------------------------------------------------------------------- readers
def read_cifar100(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    from PIL import Image

    from pcd_ray.data.images import encode_png

    base = join(root, "cifar-100-python")
    if split not in ("train", "test"):
        raise DatasetError(f"{base}: split must be 'train' or 'test', got {split!r}")
    try:
        meta = pickle.loads(storage.read_bytes(_need(storage, join(base, "meta"), "CIFAR-100 meta")), encoding="bytes")
        raw = pickle.loads(
            storage.read_bytes(_need(storage, join(base, split), f"CIFAR-100 {split}")), encoding="bytes"
        )
        names = [n.decode() for n in meta[b"fine_label_names"]]
        data = np.asarray(raw[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = list(raw[b"fine_labels"])
        files = [f.decode() for f in raw.get(b"filenames", [f"{split}_{i:05d}.png".encode() for i in range(len(data))])]
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise DatasetError(f"{base}: not a CIFAR-100 python pickle ({type(e).__name__}: {e})") from None
    if len(labels) != len(data):
        raise DatasetError(f"{join(base, split)}: {len(data)} images but {len(labels)} labels")
    images = [encode_png(Image.fromarray(x, "RGB")) for x in data]
    return _sorted_set("cifar100", base, split, [n.replace("_", " ") for n in names], files, labels, images=images)


def read_flowers102(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    base = join(root, "flowers-102")
    keys = {"train": "trnid", "val": "valid", "test": "tstid"}
    if split not in keys:
        raise DatasetError(f"{base}: split must be one of {sorted(keys)}, got {split!r}")
    try:
        labels = loadmat(
            io.BytesIO(storage.read_bytes(_need(storage, join(base, "imagelabels.mat"), "labels"))), squeeze_me=True
        )["labels"]
        ids = np.atleast_1d(
            loadmat(io.BytesIO(storage.read_bytes(_need(storage, join(base, "setid.mat"), "splits"))), squeeze_me=True)[
                keys[split]
            ]
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{base}: malformed imagelabels.mat / setid.mat ({type(e).__name__}: {e})") from None
    labels = np.atleast_1d(labels)
    if ids.max() > len(labels):
        raise DatasetError(f"{base}/setid.mat: image id {ids.max()} but only {len(labels)} labels")
    names = [f"image_{int(i):05d}.jpg" for i in ids]
    return _sorted_set(
        "flowers102",
        base,
        split,
        list(Flowers102.classes),
        names,
        [int(labels[int(i) - 1]) - 1 for i in ids],
        [join(base, "jpg", n) for n in names],
    )


def read_cub(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    base = join(root, "CUB_200_2011")
    if split not in ("train", "test"):
        raise DatasetError(f"{base}: split must be 'train' or 'test', got {split!r}")
    try:
        paths = {r[0]: r[1] for r in _lines(storage, join(base, "images.txt"), "image list")}
        label = {r[0]: int(r[1]) - 1 for r in _lines(storage, join(base, "image_class_labels.txt"), "labels")}
        is_train = {r[0]: r[1] == "1" for r in _lines(storage, join(base, "train_test_split.txt"), "split")}
        classes = [
            r[1].split(".", 1)[-1].replace("_", " ")
            for r in sorted(_lines(storage, join(base, "classes.txt"), "class names"), key=lambda r: int(r[0]))
        ]
    except (IndexError, ValueError) as e:
        raise DatasetError(f"{base}: malformed CUB metadata ({type(e).__name__}: {e})") from None
    keep = [i for i in paths if i in label and is_train.get(i) == (split == "train")]
    ids = [paths[i] for i in keep]
    return _sorted_set(
        "cub", base, split, classes, ids, [label[i] for i in keep], [join(base, "images", p) for p in ids]
    )


def read_eurosat(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    from pcd_ray.eval.templates import EUROSAT_CLASSNAMES

    base = join(root, "eurosat", "2750")
    files = _images_below(storage, base)
    rel = [f[len(base) + 1 :] for f in files]
    folders = sorted({r.split("/")[0] for r in rel})
    index = {c: k for k, c in enumerate(folders)}  # torchvision's ImageFolder order
    ds = _sorted_set(
        "eurosat",
        base,
        split,
        [EUROSAT_CLASSNAMES.get(c, c) for c in folders],
        rel,
        [index[r.split("/")[0]] for r in rel],
        files,
    )
    return _split_seeded(ds, split, seed)


def read_sun397(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    base = join(root, "SUN397")
    keys = [r[0] for r in _lines(storage, join(base, "ClassName.txt"), "class list")]
    index = {k.strip("/"): n for n, k in enumerate(keys)}
    classes = [" ".join(k.strip("/").split("/")[1:]).replace("_", " ") for k in keys]
    ids, labels, uris = [], [], []
    for f in _images_below(storage, base):
        rel = f[len(base) + 1 :]
        cls = rel.rsplit("/", 1)[0]
        if cls not in index:
            raise DatasetError(f"{f}: folder {cls!r} is not a class of {join(base, 'ClassName.txt')}")
        ids.append(rel), labels.append(index[cls]), uris.append(f)
    return _split_seeded(_sorted_set("sun397", base, split, classes, ids, labels, uris), split, seed)


def read_awa2(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    base = join(root, "Animals_with_Attributes2")
    if split not in ("all", "test"):
        raise DatasetError(f"{base}: split must be 'all' or 'test' (the 10 test classes), got {split!r}")
    try:
        folders = [r[1] for r in sorted(_lines(storage, join(base, "classes.txt"), "classes"), key=lambda r: int(r[0]))]
        predicates = [
            r[1]
            for r in sorted(_lines(storage, join(base, "predicates.txt"), "attribute names"), key=lambda r: int(r[0]))
        ]
        matrix = np.asarray(
            _lines(storage, join(base, "predicate-matrix-binary.txt"), "attribute matrix"), dtype=np.int64
        )
    except (IndexError, ValueError) as e:
        raise DatasetError(f"{base}: malformed AwA2 metadata ({type(e).__name__}: {e})") from None
    if matrix.shape != (len(folders), len(predicates)):
        raise DatasetError(
            f"{join(base, 'predicate-matrix-binary.txt')}: shape {matrix.shape}, expected "
            f"{(len(folders), len(predicates))} (classes x predicates)"
        )
    wanted = set(folders)
    if split == "test":
        wanted = {r[0] for r in _lines(storage, join(base, "testclasses.txt"), "test classes")}
    index = {c: k for k, c in enumerate(folders)}
    ids, labels, uris = [], [], []
    for f in _images_below(storage, join(base, "JPEGImages")):
        rel = f[len(join(base, "JPEGImages")) + 1 :]
        cls = rel.split("/")[0]
        if cls not in index:
            raise DatasetError(f"{f}: folder {cls!r} is not a class of {join(base, 'classes.txt')}")
        if cls in wanted:
            ids.append(rel), labels.append(index[cls]), uris.append(f)
    return _sorted_set(
        "awa2",
        base,
        split,
        [c.replace("+", " ") for c in folders],
        ids,
        labels,
        uris,
        class_attributes=matrix,
        attribute_names=predicates,
    )


def read_coco(storage: Storage, root: str, split: str, seed: int) -> LabelledSet:
    ann_uri = _need(storage, join(root, "annotations", f"captions_{split}.json"), "COCO captions")
    try:
        ann = json.loads(storage.read_text(ann_uri))
        files = {im["id"]: im["file_name"] for im in ann["images"]}
        caps: dict[Any, list[str]] = {}
        for a in ann["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{ann_uri}: not a COCO captions file ({type(e).__name__}: {e})") from None
    keep = sorted(i for i in files if caps.get(i))
    ids = [files[i] for i in keep]
    return _sorted_set(
        "coco",
        root,
        split,
        [],
        ids,
        np.zeros(len(ids)),
        [join(root, split, f) for f in ids],
        captions=[caps[i] for i in keep],
    )


READERS: dict[str, Callable[[Storage, str, str, int], LabelledSet]] = {
    "cifar100": read_cifar100,
    "flowers102": read_flowers102,
    "cub": read_cub,
    "eurosat": read_eurosat,
    "sun397": read_sun397,
    "awa2": read_awa2,
    "coco": read_coco,
}


def read_dataset(
    storage: Storage, kind: str, root: str, split: str, *, seed: int = 0, max_images: int | None = None
) -> LabelledSet:
    """Read one split; ``max_images`` keeps a seeded random subset (in id order). Raises DatasetError."""
    if kind not in READERS:
        raise DatasetError(f"unknown dataset kind {kind!r} (known: {', '.join(KINDS)})")
    root = storage.resolve(root)
    ds = READERS[kind](storage, root, split, seed)
    if not len(ds):
        raise DatasetError(f"{ds.root}: no images in split {split!r}")
    if max_images is not None and len(ds) > max_images:
        keep = np.sort(np.random.default_rng([seed, 1]).choice(len(ds), size=max_images, replace=False))
        ds = ds.subset(keep)
    return ds
