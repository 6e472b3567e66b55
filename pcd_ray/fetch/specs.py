"""What ``pcd-ray fetch`` downloads: each dataset's files, where their contents land, and how a fetch is checked.

A dataset is a few named parts (COCO's annotations, train2014 and val2014 images; CUB's images and captions), each a
list of sources. A source is one file at its publisher's URL, with the checksum the publisher (or torchvision, which
pins them) gives, and how its contents reach the layout of ``pcd_ray/eval/datasets.py`` and
``pcd_ray/data/readers.py``: an archive extracted into a folder of the dataset root (optionally only the members
matching some patterns), or a file copied as is. ``expect`` lists the paths a part must have produced; a part whose
archive lacks one of them fails before anything is committed.

Where no checksum is published (COCO, AwA2, the Reed et al. captions), the spec says so: those downloads are checked
against the server's Content-Length and by extracting them, and the sha256 of what was downloaded is recorded in the
target's fetch manifest either way. Sizes are the publishers' approximate figures, shown by ``--list``; they are not
checked (the server's Content-Length is).

Nothing here imports more than the standard library: the CLI builds its parser from these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class Source:
    """One downloaded file and how it is unpacked.

    ``name`` is the file's name in the cache (and what ``--base-url`` appends); ``unpack`` is ``tar`` (any
    compression), ``zip`` or ``file`` (copied to ``into/name``). Members are written under ``into`` with their
    archive paths; ``members`` (fnmatch patterns on those paths, ``*`` crossing folders) keeps only the matching ones.
    """

    name: str
    url: str
    unpack: Literal["tar", "zip", "file"]
    md5: str | None = None
    sha256: str | None = None
    approx_bytes: int | None = None
    into: str = ""
    members: tuple[str, ...] = ()
    checksum_note: str = ""
    """Why there is no checksum, where there is none."""

    @property
    def checksum(self) -> tuple[str, str] | None:
        """(algorithm, expected hex digest), sha256 preferred."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None


@dataclass(frozen=True)
class Part:
    sources: tuple[Source, ...]
    expect: tuple[str, ...]
    """Paths (relative to the dataset root) the part must produce."""
    description: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    homepage: str
    terms: str
    """Where the dataset's terms of use are stated (users accept them by fetching)."""
    parts: dict[str, Part]
    reader: str
    """How the job files read it."""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def approx_bytes(self) -> int | None:
        sizes = [s.approx_bytes for p in self.parts.values() for s in p.sources]
        return None if any(b is None for b in sizes) else sum(sizes)

    def select(self, only: list[str] | None) -> list[str]:
        """Part names in spec order; ``only`` must name parts of this dataset. Raises KeyError naming the bad one."""
        if not only:
            return list(self.parts)
        unknown = [p for p in only if p not in self.parts]
        if unknown:
            raise KeyError(f"{self.name} has no part {unknown[0]!r} (parts: {', '.join(self.parts)})")
        return [p for p in self.parts if p in only]


_NO_CHECKSUM = (
    "{who} publishes no checksum: the size is checked against the server's Content-Length and the "
    "archive by extracting it; the sha256 of the download goes into the fetch manifest"
)

_COCO_IMAGES = "http://images.cocodataset.org/zips"

DATASETS: dict[str, DatasetSpec] = {
    d.name: d
    for d in [
        DatasetSpec(
            name="coco",
            title="COCO 2014 captions, train2014/val2014 images and the Karpathy split",
            homepage="https://cocodataset.org/#download",
            terms="https://cocodataset.org/#termsofuse",
            parts={
                "annotations": Part(
                    sources=(
                        Source(
                            "annotations_trainval2014.zip",
                            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                            "zip",
                            approx_bytes=241 * MiB,
                            members=("annotations/captions_*.json",),
                            checksum_note=_NO_CHECKSUM.format(who="COCO"),
                        ),
                        Source(
                            "caption_datasets.zip",
                            "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                            "zip",
                            approx_bytes=36 * MiB,
                            into="annotations",
                            members=("dataset_coco.json",),
                            checksum_note=_NO_CHECKSUM.format(who="The Karpathy split's page"),
                        ),
                    ),
                    expect=(
                        "annotations/captions_train2014.json",
                        "annotations/captions_val2014.json",
                        "annotations/dataset_coco.json",
                    ),
                    description="captions_{train,val}2014.json and the Karpathy split (dataset_coco.json)",
                ),
                "train2014": Part(
                    sources=(
                        Source(
                            "train2014.zip",
                            f"{_COCO_IMAGES}/train2014.zip",
                            "zip",
                            approx_bytes=13 * GiB,
                            checksum_note=_NO_CHECKSUM.format(who="COCO"),
                        ),
                    ),
                    expect=("train2014",),
                    description="82,783 training images",
                ),
                "val2014": Part(
                    sources=(
                        Source(
                            "val2014.zip",
                            f"{_COCO_IMAGES}/val2014.zip",
                            "zip",
                            approx_bytes=6 * GiB,
                            checksum_note=_NO_CHECKSUM.format(who="COCO"),
                        ),
                    ),
                    expect=("val2014",),
                    description="40,504 validation images",
                ),
            },
            reader="data.coco: {annotations: <root>/annotations/captions_train2014.json, images: <root>/train2014}; "
            "eval: {kind: coco, root: <root>, split: val2014}",
        ),
        DatasetSpec(
            name="cifar100",
            title="CIFAR-100 (python version)",
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
            terms="https://www.cs.toronto.edu/~kriz/cifar.html",
            parts={
                "all": Part(
                    sources=(
                        Source(
                            "cifar-100-python.tar.gz",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "tar",
                            md5="eb9058c3a382ffc7106e4002c42a8d85",
                            approx_bytes=161 * MiB,
                        ),
                    ),
                    expect=("cifar-100-python/meta", "cifar-100-python/train", "cifar-100-python/test"),
                )
            },
            reader="eval: {kind: cifar100, root: <root>}",
        ),
        DatasetSpec(
            name="flowers102",
            title="Oxford 102 Flowers",
            homepage="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            terms="https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
            parts={
                "all": Part(
                    sources=(
                        Source(
                            "102flowers.tgz",
                            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",
                            "tar",
                            md5="52808999861908f626f3c1f4e79d11fa",
                            approx_bytes=329 * MiB,
                            into="flowers-102",
                        ),
                        Source(
                            "imagelabels.mat",
                            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/imagelabels.mat",
                            "file",
                            md5="e0620be6f572b9609742df49c70aed4d",
                            approx_bytes=502,
                            into="flowers-102",
                        ),
                        Source(
                            "setid.mat",
                            "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/setid.mat",
                            "file",
                            md5="a5357ecc9cb78c4bef273ce3793fc85c",
                            approx_bytes=15_000,
                            into="flowers-102",
                        ),
                    ),
                    expect=("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
                )
            },
            reader="eval: {kind: flowers102, root: <root>, split: test}",
        ),
        DatasetSpec(
            name="eurosat",
            title="EuroSAT (RGB)",
            homepage="https://github.com/phelber/eurosat",
            terms="https://github.com/phelber/eurosat",
            parts={
                "all": Part(
                    # torchvision's pinned copy: the authors' own host no longer serves the archive reliably.
                    sources=(
                        Source(
                            "EuroSAT.zip",
                            "https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                            "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
                            "zip",
                            md5="c8fa014336c82ac7804f0398fcb19387",
                            approx_bytes=90 * MiB,
                            into="eurosat",
                        ),
                    ),
                    expect=("eurosat/2750",),
                )
            },
            reader="eval: {kind: eurosat, root: <root>}",
        ),
        DatasetSpec(
            name="sun397",
            title="SUN397",
            homepage="https://vision.princeton.edu/projects/2010/SUN/",
            terms="https://vision.princeton.edu/projects/2010/SUN/",
            parts={
                "all": Part(
                    sources=(
                        Source(
                            "SUN397.tar.gz",
                            "http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz",
                            "tar",
                            md5="8ca2778205c41d23104230ba66911c7a",
                            approx_bytes=37 * GiB,
                        ),
                    ),
                    expect=("SUN397/ClassName.txt",),
                )
            },
            reader="eval: {kind: sun397, root: <root>}",
        ),
        DatasetSpec(
            name="awa2",
            title="Animals with Attributes 2",
            homepage="https://cvml.ista.ac.at/AwA2/",
            terms="https://cvml.ista.ac.at/AwA2/",
            parts={
                "all": Part(
                    sources=(
                        Source(
                            "AwA2-data.zip",
                            "https://cvml.ista.ac.at/AwA2/AwA2-data.zip",
                            "zip",
                            approx_bytes=13 * GiB,
                            checksum_note=_NO_CHECKSUM.format(who="AwA2"),
                        ),
                    ),
                    expect=(
                        "Animals_with_Attributes2/classes.txt",
                        "Animals_with_Attributes2/predicates.txt",
                        "Animals_with_Attributes2/predicate-matrix-binary.txt",
                        "Animals_with_Attributes2/testclasses.txt",
                        "Animals_with_Attributes2/JPEGImages",
                    ),
                )
            },
            reader="eval: {kind: awa2, root: <root>, split: test}",
        ),
        DatasetSpec(
            name="cub",
            title="CUB-200-2011 with the Reed et al. (CVPR 2016) captions",
            homepage="https://www.vision.caltech.edu/datasets/cub_200_2011/",
            terms="https://www.vision.caltech.edu/datasets/cub_200_2011/ and https://github.com/reedscot/cvpr2016",
            parts={
                "images": Part(
                    # torchvision has no CUB; this md5 is the one dataset loaders pin for the CaltechDATA archive.
                    sources=(
                        Source(
                            "CUB_200_2011.tgz",
                            "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz",
                            "tar",
                            md5="97eceeb196236b17998738112f37df78",
                            approx_bytes=1100 * MiB,
                        ),
                    ),
                    expect=(
                        "CUB_200_2011/images.txt",
                        "CUB_200_2011/image_class_labels.txt",
                        "CUB_200_2011/train_test_split.txt",
                        "CUB_200_2011/classes.txt",
                        "CUB_200_2011/images",
                    ),
                    description="CUB_200_2011/ (images, labels, split)",
                ),
                "captions": Part(
                    # The authors' Google Drive file (github.com/reedscot/cvpr2016); only the text captions are kept,
                    # not the Torch feature files beside them.
                    sources=(
                        Source(
                            "cvpr2016_cub.tar.gz",
                            "https://drive.usercontent.google.com/download?id=0B0ywwgffWnLLZW9uVHNjb2JmNlE"
                            "&resourcekey=0-8y2UVmBHAlG26HafWYNoFQ&export=download&confirm=t",
                            "tar",
                            members=("cvpr2016_cub/text_c10/*.txt",),
                            checksum_note=_NO_CHECKSUM.format(who="The Reed et al. release"),
                        ),
                    ),
                    expect=("cvpr2016_cub/text_c10",),
                    description="cvpr2016_cub/text_c10/<class>/<image>.txt, ten captions per image",
                ),
            },
            reader="data.cub: {root: <root>}; eval: {kind: cub, root: <root>}",
            notes=(
                "Google Drive may refuse a download (quota, or a page instead of the file). Then download the file "
                "in a browser and put it in the cache as <cache>/cub/cvpr2016_cub.tar.gz: a complete file there is "
                "used as it is.",
            ),
        ),
    ]
}


def get(name: str) -> DatasetSpec:
    """Raises KeyError naming the known datasets."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]
