"""The synthetic attribute dataset: procedural shape images whose captions and differences are known exactly.

Each image shows ``count`` shapes (1-3) that share one kind, colour, size and brightness, placed in the horizontal
third named by ``position``. The attribute classes are drawn so a small CLIP can tell them apart:

* size: radius as a fraction of the image side, in disjoint ranges with clear gaps (small 0.07-0.09, medium
  0.12-0.14, large 0.17-0.20); a small shape is still >= 4 px in radius at 64 px, so its kind stays recognisable.
* brightness: the colour is scaled by 0.45-0.55 (dark) or 0.95-1.0 (bright).
* kind: squares and triangles are scaled to roughly the area of a circle of the same radius, so "large" means the
  same amount of colour whatever the kind.

Determinism: image ``i`` of a split draws everything (attributes, caption wording, jitter, noise) from
``np.random.default_rng([seed, SPLIT_KEYS[split], i])``. Any shard therefore reproduces alone, and the test set does
not change when ``num_train`` does.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pcd_ray.data import attributes as A
from pcd_ray.data.images import encode_png

if TYPE_CHECKING:
    from pcd_ray.config import JobConfig
    from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

SPLIT_KEYS = {"train": 0, "test": 1}
"""Part of every image's seed, so train and test images come from independent streams."""

RADIUS = {"small": (0.07, 0.09), "medium": (0.12, 0.14), "large": (0.17, 0.20)}
"""Shape radius as a fraction of the image side, per size class (disjoint, with gaps between classes)."""

BRIGHTNESS_SCALE = {"dark": (0.45, 0.55), "bright": (0.95, 1.0)}
"""Multiplier on the colour's full-brightness RGB, per brightness class."""

BACKGROUND = 128
NOISE_STD = 4.0
"""Grey level of the background and the std of the pixel noise added to the whole image (0-255 units)."""

SUPERSAMPLE = 4
"""Shapes are drawn at this multiple of the size and downsampled: anti-aliased edges keep small kinds legible."""

_SQUARE_HALF = math.sqrt(math.pi) / 2  # half side of a square with a circle's area (~0.886 r)
_TRIANGLE_R = 1.4  # circumradius of the triangle in units of r (~81% of the circle's area, and it still fits)


def _half_extent(kind: str, r: float) -> tuple[float, float]:
    """(half width, half height) of a shape's bounding box, for keeping shapes inside the image."""
    if kind == "circle":
        return r, r
    if kind == "square":
        return _SQUARE_HALF * r, _SQUARE_HALF * r
    R = _TRIANGLE_R * r
    return R * math.sqrt(3) / 2, 0.75 * R


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        h = _SQUARE_HALF * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif kind == "triangle":
        # Upward equilateral triangle with its bounding box centred on (cx, cy).
        R = _TRIANGLE_R * r
        hw, hh = R * math.sqrt(3) / 2, 0.75 * R
        draw.polygon([(cx, cy - hh), (cx + hw, cy + hh), (cx - hw, cy + hh)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r} (known: {A.KINDS})")


def _centres(attrs: A.Attributes, size: int, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Shape centres in pixels: around the axis of the ``position`` third, stacked vertically.

    Stacked shapes spread over 75-100% of the height and alternate left/right of the axis by their half width (a
    zig-zag): three large shapes have diameters that add up to more than the image height, and the zig-zag keeps
    neighbours apart, so each shape's outline, its kind and its size stay visible. Large shapes are wider than a
    third, so they may reach into the next one; the shapes' centroid stays in their own.
    """
    n = attrs["count"]
    hw, hh = _half_extent(attrs["kind"], r)
    third = A.POSITIONS.index(attrs["position"])
    axis = (third + 0.5) * size / 3
    slack = max(size / 6 - hw, 0.0)  # how far the shape can move and stay inside its third
    x0 = axis + rng.uniform(-0.5, 0.5) * slack
    top, room = hh, size - 2 * hh
    if n == 1:
        ys = [top + room * rng.uniform(0.2, 0.8)]
    else:
        span = room * rng.uniform(0.75, 1.0)
        start = top + rng.uniform(0.0, room - span)
        ys = [start + span * k / (n - 1) for k in range(n)]
    # The first and third shape go to the outer side of a left or right third, so the clip at the image's edge keeps
    # the shapes' centroid inside the third.
    zig = (hw if n > 1 else 0.0) * (-1 if attrs["position"] == "left" else 1)
    out = []
    for k, y in enumerate(ys):
        x = x0 + (zig if k % 2 == 0 else -zig)
        out.append((float(np.clip(x, hw, size - hw)), float(np.clip(y, hh, size - hh))))
    return out


def render(attrs: A.Attributes, size: int, rng: np.random.Generator):
    """Draw one image of the given attributes -> PIL RGB image of ``size`` x ``size`` pixels.

    Consumes ``rng`` (radius, brightness, placement, noise), so the same generator state gives the same pixels.
    Raises KeyError / ValueError for attributes outside the vocabulary of ``pcd_ray.data.attributes``.
    """
    from PIL import Image, ImageDraw

    lo, hi = RADIUS[attrs["size"]]
    r = rng.uniform(lo, hi) * size
    scale = rng.uniform(*BRIGHTNESS_SCALE[attrs["brightness"]])
    fill = tuple(int(round(c * scale)) for c in A.COLOURS[attrs["colour"]])
    centres = _centres(attrs, size, r, rng)

    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(img)
    for cx, cy in centres:
        _draw_shape(draw, attrs["kind"], cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, fill)
    img = img.resize((size, size), Image.Resampling.BOX)

    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that image ``index`` of ``split`` draws everything from."""
    return np.random.default_rng([seed, SPLIT_KEYS[split], index])


def make_example(seed: int, split: str, index: int, size: int) -> dict[str, Any]:
    """One row of the images artifact: image_id, split, caption, image (PNG bytes), attributes (JSON), label."""
    rng = image_rng(seed, split, index)
    attrs = A.sample_attributes(rng)
    text = A.caption(attrs, rng)
    img = render(attrs, size, rng)
    return {
        "image_id": f"syn-{split}-{index:06d}",
        "split": split,
        "caption": text,
        "image": encode_png(img),
        "attributes": json.dumps(attrs, sort_keys=True),
        "label": attrs["kind"],
    }


def _schema():
    import pyarrow as pa

    # Explicit types: a column of PNGs must be binary in every shard, never inferred as an object tensor.
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("split", pa.string()),
            ("caption", pa.string()),
            ("image", pa.binary()),
            ("attributes", pa.string()),
            ("label", pa.string()),
        ]
    )


def _render_batch(batch: dict[str, np.ndarray], *, seed: int, num_train: int, size: int):
    """map_batches UDF: global row ids [n] -> pyarrow Table of those images (ids below num_train are train)."""
    import pyarrow as pa

    rows = []
    for gid in batch["id"].tolist():
        split, index = ("train", gid) if gid < num_train else ("test", gid - num_train)
        rows.append(make_example(seed, split, index, size))
    return pa.Table.from_pylist(rows, schema=_schema())


def make_images(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """Generate the synthetic images artifact at ``job.data.output``; returns its manifest.

    A Ray Data job: one block per ``rows_per_shard`` images, rendered in parallel tasks, written as Parquet.
    """
    import ray.data

    from pcd_ray import artifacts
    from pcd_ray.runtime import init_ray

    cfg = job.data.synthetic
    init_ray(job.ray)
    start = time.time()
    total = cfg.num_train + cfg.num_test
    ds = ray.data.range(total, override_num_blocks=max(1, math.ceil(total / cfg.rows_per_shard)))
    ds = ds.map_batches(
        _render_batch,
        fn_kwargs={"seed": cfg.seed, "num_train": cfg.num_train, "size": cfg.image_size},
        batch_size=cfg.rows_per_shard,
        udf_modifying_row_count=False,
    )
    summary = {"num_train": cfg.num_train, "num_test": cfg.num_test, "num_images": total, "image_size": cfg.image_size}
    manifest = artifacts.write_dataset(
        ds,
        storage,
        job.data.output,
        "images",
        config=job.data.model_dump(mode="json"),
        summary=summary,
        rows_per_file=cfg.rows_per_shard,
    )
    # Drawn images are never bad, but the data stage always leaves both of its outputs, so what reads (and
    # records) image_rejects finds an empty artifact rather than none.
    import pyarrow as pa

    artifacts.write_table(
        pa.table({c: pa.array([], pa.string()) for c in ("image_id", "source", "reason", "detail")}),
        storage,
        job.data.rejects,
        "image_rejects",
        config=job.data.model_dump(mode="json"),
    )
    wall = time.time() - start
    manifest = artifacts.update_summary(
        storage, job.data.output, wall_s=round(wall, 3), images_per_s=round(total / max(wall, 1e-9), 1)
    )
    log.info(
        "synthetic: %d images (%d train, %d test) in %.1f s -> %s",
        total,
        cfg.num_train,
        cfg.num_test,
        wall,
        storage.resolve(job.data.output),
    )
    return manifest
