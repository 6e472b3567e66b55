"""Readers for the image-caption datasets users have, into the ``images`` artifact (plus ``image_rejects``).

Sources (``DataConfig.source``), local or s3://, all streamed through Ray Data tasks:

- ``coco``: a COCO captions JSON and its image folder. The JSON is metadata (about 20 MB for train2014) and is parsed
  on the driver; image bytes are only ever read by the tasks.
- ``cub``: CUB-200-2011 (``CUB_200_2011/{images.txt,train_test_split.txt,images/}``) with Reed et al.'s captions
  (``cvpr2016_cub/text_c10/<class>/<image>.txt``, ten per image). The lists are read on the driver; caption files
  and images by the tasks. Image ids are the paths relative to ``images/``, as the CUB evaluation set names them.
- ``webdataset``: tar shards as img2dataset writes them (``<key>.jpg``, ``<key>.txt``, ``<key>.json``), one task per
  shard. We read the tar stream ourselves instead of with ``ray.data.read_webdataset``: that reader aborts the whole
  job on one truncated shard (tarfile.ReadError), where a job over thousands of shards must keep the samples read so
  far and record the shard as a reject row.
- ``parquet``: rows with a caption and image bytes (or a Hugging Face ``{bytes, path}`` struct) or an image URI,
  read with ``ray.data.read_parquet``.
- ``folder``: an image folder and a captions file (CSV/TSV via ``ray.data.read_csv`` with the caption read as
  binary, so one non-UTF-8 caption rejects its row instead of failing the file; JSON lines via ``read_json``).

Every input row ends in exactly one artifact: ``images`` (image_id, split, caption, image bytes as stored, attributes
null, source) or ``image_rejects`` (image_id, source, reason, detail), with the reasons in ``REASONS``. Image bytes
are checked by decoding them (the header's size first, so a bomb is rejected before its pixels are allocated) and
stored unchanged. A source marks a row it could not read by setting its ``reason`` and ``detail`` columns; the
checks raise ``RejectError``; ``pcd_ray.sink`` writes, commits and counts both artifacts.

    make_images_artifact(job, storage)   # the data stage: job.data.source -> job.data.output + job.data.rejects
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import re
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from pcd_ray.sink import RejectError

if TYPE_CHECKING:
    from pcd_ray.config import JobConfig
    from pcd_ray.storage import Storage

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["image_id", "split", "caption", "image", "attributes", "source"]
REJECT_COLUMNS = ["image_id", "source", "reason", "detail"]
REASONS = (
    "no_caption",
    "empty_caption",
    "caption_not_utf8",
    "caption_too_long",
    "missing_image",
    "image_too_large",
    "image_too_small",
    "corrupt_image",
    "corrupt_shard",
    "unknown_image_id",
)
# The columns every source produces before the checks; reason (a code of REASONS) and detail are set when reading
# already failed.
CANDIDATE_COLUMNS = ["image_id", "split", "caption", "image", "source", "reason", "detail"]


# ------------------------------------------------------------------------------------------------ the checks
def _caption(value: Any, max_chars: int) -> str:
    """The caption with whitespace runs (newlines in .txt members) made one space; raises RejectError."""
    if value is None:
        raise RejectError("no_caption", "no caption")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RejectError("caption_not_utf8", str(e)) from None
    text = " ".join(str(value).split())
    if not text:
        raise RejectError("empty_caption", "the caption is only whitespace")
    if len(text) > max_chars:
        raise RejectError("caption_too_long", f"{len(text)} characters, over the limit of {max_chars}")
    return text


def _check_image(data: Any, cfg) -> None:
    """Raises RejectError unless ``data`` is an image within ``cfg``'s (DataConfig) limits."""
    from pcd_ray.data.images import decode_image

    if data is None:
        raise RejectError("missing_image", "no image in the row")
    data = bytes(data)
    if len(data) > cfg.max_image_bytes:
        raise RejectError("image_too_large", f"{len(data)} bytes, over the limit of {cfg.max_image_bytes}")
    width, height = decode_image(data, max_pixels=cfg.max_image_pixels).size  # ImageDecodeError is a RejectError
    if min(width, height) < cfg.min_image_side:
        raise RejectError(
            "image_too_small", f"image is {width}x{height}, under the minimum side of {cfg.min_image_side} pixels"
        )


def check_batch(batch, cfg):
    """map_batches UDF: candidate rows -> the same rows with ``caption`` decoded and ``reason``/``detail`` set for
    rows that cannot be used (null for good rows); ``cfg`` is the DataConfig with the limits."""
    import pyarrow as pa

    rows = batch.to_pylist()
    ids, captions, reasons, details = [], [], [], []
    for r in rows:
        caption, reason, detail = None, r["reason"], r["detail"]
        if reason is None:
            try:
                caption = _caption(r["caption"], cfg.max_caption_chars)
                _check_image(r["image"], cfg)
            except RejectError as e:
                reason, detail = e.reason, e.detail
        image_id = r["image_id"]
        if image_id is None and r["image"] is not None:
            image_id = "sha1-" + hashlib.sha1(bytes(r["image"])).hexdigest()[:20]
        ids.append(image_id if image_id is not None else f"row-{r['source']}")
        captions.append(caption)
        reasons.append(reason)
        details.append(detail or None)
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "caption": pa.array(captions, pa.string()),
            "image": pa.array([None if r["image"] is None else bytes(r["image"]) for r in rows], pa.binary()),
            "attributes": pa.nulls(len(rows), pa.string()),
            "source": pa.array([r["source"] for r in rows], pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "detail": pa.array(details, pa.string()),
        }
    )


def _candidates(columns: dict[str, list]):
    import pyarrow as pa

    n = len(columns["source"])
    types = {
        "image_id": pa.string(),
        "split": pa.string(),
        "caption": pa.binary(),
        "image": pa.binary(),
        "source": pa.string(),
        "reason": pa.string(),
        "detail": pa.string(),
    }
    out = {}
    for c in CANDIDATE_COLUMNS:
        values = columns.get(c, [None] * n)
        if c == "caption":
            values = [v.encode() if isinstance(v, str) else v for v in values]
        out[c] = pa.array(values, types[c])
    return pa.table(out)


def fetch_images(batch, storage, uri_column: str = "uri"):
    """map_batches UDF: read each row's image bytes from its URI (missing or unreadable -> missing_image); rows
    whose ``reason`` is already set are passed on unread."""
    t = batch
    n = t.num_rows
    reasons = t.column("reason").to_pylist() if "reason" in t.column_names else [None] * n
    details = t.column("detail").to_pylist() if "detail" in t.column_names else [None] * n
    images = []
    for k, uri in enumerate(t.column(uri_column).to_pylist()):
        image = None
        if reasons[k] is None and uri is None:
            reasons[k], details[k] = "missing_image", "no image URI"
        elif reasons[k] is None:
            try:
                image = storage.read_bytes(uri)
            except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
                reasons[k], details[k] = "missing_image", f"{type(e).__name__}: {uri}"
        images.append(image)
    cols = {c: t.column(c).to_pylist() for c in t.column_names if c not in ("image", "reason", "detail", uri_column)}
    cols.setdefault("source", t.column(uri_column).to_pylist())
    return _candidates({**cols, "image": images, "reason": reasons, "detail": details})


# ------------------------------------------------------------------------------------------------- sources
def _blocks(table, rows_per_task: int):
    import ray.data

    slices = [table.slice(k, rows_per_task) for k in range(0, max(table.num_rows, 1), rows_per_task)]
    return ray.data.from_arrow(slices)


def read_coco(cfg, data_cfg, storage):
    """COCO captions JSON + image folder -> candidate rows: one per image in the JSON's images[], plus an
    ``unknown_image_id`` row per annotation naming an image that images[] does not list."""
    import pyarrow as pa

    from pcd_ray.storage import join

    meta = storage.read_json(cfg.annotations)
    if not isinstance(meta, dict) or "images" not in meta or "annotations" not in meta:
        raise ValueError(
            f"{storage.resolve(cfg.annotations)}: not a COCO captions file (needs images[] and annotations[])"
        )
    by_image: dict[int, list[tuple[int, str]]] = {}
    for ann in meta["annotations"]:
        by_image.setdefault(ann["image_id"], []).append((ann.get("id", 0), ann.get("caption")))
    rows: dict[str, list] = {c: [] for c in ("image_id", "caption", "uri", "source", "reason", "detail")}

    def add(image_id, caption, uri, source, reason=None, detail=None):
        for c, v in zip(rows, (image_id, caption, uri, source, reason, detail)):
            rows[c].append(v)

    for img in meta["images"]:
        anns = sorted(by_image.pop(img["id"], []), key=lambda a: a[0])
        if not anns:
            caption = None
        elif cfg.caption == "first":
            caption = anns[0][1]
        else:
            caption = anns[int(np.random.default_rng([cfg.seed, int(img["id"])]).integers(len(anns)))][1]
        uri = join(storage.resolve(cfg.images), *img["file_name"].split("/"))
        add(f"coco-{img['id']}", caption, uri, uri)
    annotations = storage.resolve(cfg.annotations)
    for image_id, anns in by_image.items():  # what is left names no image of images[]
        for ann_id, caption in sorted(anns, key=lambda a: a[0]):
            add(
                f"coco-{image_id}",
                caption,
                None,
                f"{annotations}#annotation-{ann_id}",
                "unknown_image_id",
                f"annotation {ann_id} names image id {image_id}, which images[] does not list",
            )
    table = pa.table(
        {
            "split": pa.array([cfg.split] * len(rows["uri"]), pa.string()),
            **{c: pa.array(v, pa.string()) for c, v in rows.items()},
        }
    )
    return _blocks(table, data_cfg.rows_per_task).map_batches(
        fetch_images, fn_args=(storage,), batch_format="pyarrow", batch_size=None
    )


CUB_DIR = "CUB_200_2011"
CUB_CAPTIONS = ("cvpr2016_cub", "text_c10")
"""Where Reed et al.'s archive puts the captions under the CUB root: ``<class folder>/<image stem>.txt``."""


def _cub_list(storage, uri: str, what: str) -> list[tuple[str, str]]:
    """(first field, rest of the line) of every non-empty line of a CUB list file; errors name the file."""
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: missing ({what})")
    rows = []
    for k, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{uri}, line {k}: expected '<image number> <value>', got {line!r}")
        rows.append((parts[0], parts[1].strip()))
    return rows


def _cub_caption(data: bytes, uri: str, cfg, number: str) -> str:
    """One of the captions of an image's caption file (one a line); raises RejectError."""
    try:
        lines = [ln.strip() for ln in data.decode("utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise RejectError("caption_not_utf8", f"{uri}: {e}") from None
    if not lines:
        raise RejectError("empty_caption", f"{uri} has no caption (every line is blank)")
    if cfg.caption == "first":
        return lines[0]
    return lines[int(np.random.default_rng([cfg.seed, int(number)]).integers(len(lines)))]


def _cub_rows(batch, cfg, storage):
    """map_batches UDF: CUB rows -> candidate rows, each with the caption picked from its image's caption file
    (a missing file: ``no_caption``) and its image bytes."""
    import pyarrow as pa

    t = batch
    reasons, details = t.column("reason").to_pylist(), t.column("detail").to_pylist()
    captions = []
    for k, (uri, number) in enumerate(zip(t.column("caption_uri").to_pylist(), t.column("number").to_pylist())):
        caption = None
        if reasons[k] is None:
            try:
                caption = _cub_caption(storage.read_bytes(uri), uri, cfg, number)
            except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
                reasons[k], details[k] = "no_caption", f"no caption file ({type(e).__name__}: {uri})"
            except RejectError as e:
                reasons[k], details[k] = e.reason, e.detail
        captions.append(caption)
    return fetch_images(
        pa.table(
            {
                **{c: t.column(c) for c in ("image_id", "split", "uri", "source")},
                "caption": pa.array([None if c is None else c.encode() for c in captions], pa.binary()),
                "reason": pa.array(reasons, pa.string()),
                "detail": pa.array(details, pa.string()),
            }
        ),
        storage,
    )


def read_cub(cfg, data_cfg, storage):
    """CUB-200-2011 + Reed et al.'s captions -> candidate rows: one per image of ``cfg.split``
    (train_test_split.txt), plus an ``unknown_image_id`` row per caption file naming no image of images.txt.

    Raises FileNotFoundError / ValueError naming the file when a list or the caption folder is missing or malformed.
    """
    import pyarrow as pa

    from pcd_ray.storage import join

    root = storage.resolve(cfg.root)
    base, text = join(root, CUB_DIR), join(root, *CUB_CAPTIONS)
    images = _cub_list(storage, join(base, "images.txt"), "CUB image list")
    split_uri = join(base, "train_test_split.txt")
    is_train = dict(_cub_list(storage, split_uri, "CUB train/test split"))
    numbers = [n for n, _ in images]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"{join(base, 'images.txt')}: image numbers repeat")
    bad = [f"{n} {v}" for n, v in is_train.items() if v not in ("0", "1")]
    unsplit = [n for n in numbers if n not in is_train]
    if bad or unsplit:
        raise ValueError(
            f"{split_uri}: "
            + (
                f"values must be 0 or 1, got e.g. {bad[:3]}"
                if bad
                else f"{len(unsplit)} images of images.txt have no line, e.g. {unsplit[:3]}"
            )
        )
    stems = {f: posixpath.splitext(f[len(text) + 1 :])[0] for f in storage.find(text) if f.endswith(".txt")}
    if not stems:
        raise FileNotFoundError(f"{text}: no caption files (<class>/<image>.txt, Reed et al.'s text_c10)")
    # Against every image, whatever the split: a caption file whose image is not in images.txt names no image of
    # the dataset at all.
    named = {posixpath.splitext(rel)[0] for _, rel in images}
    wanted = "1" if cfg.split == "train" else "0"
    rows: dict[str, list] = {c: [] for c in ("image_id", "number", "uri", "caption_uri", "source", "reason", "detail")}

    def add(*values):
        for c, v in zip(rows, values):
            rows[c].append(v)

    for number, rel in images:
        if is_train[number] == wanted:
            uri = join(base, "images", *rel.split("/"))
            add(rel, number, uri, join(text, *posixpath.splitext(rel)[0].split("/")) + ".txt", uri, None, None)
    in_split = len(rows["uri"])
    for f, stem in stems.items():
        if stem not in named:
            add(
                stem,
                None,
                None,
                None,
                f,
                "unknown_image_id",
                f"caption file names image {stem!r}, which {join(base, 'images.txt')} does not list",
            )
    log.info(
        "cub: %d %s images of %d, %d caption files naming no image",
        in_split,
        cfg.split,
        len(images),
        len(rows["uri"]) - in_split,
    )
    table = pa.table(
        {
            "split": pa.array([cfg.split] * len(rows["uri"]), pa.string()),
            **{c: pa.array(v, pa.string()) for c, v in rows.items()},
        }
    )
    return _blocks(table, data_cfg.rows_per_task).map_batches(
        _cub_rows, fn_args=(cfg, storage), batch_format="pyarrow", batch_size=None
    )


def _expand_braces(pattern: str) -> list[str]:
    """webdataset's shard notation: "shards-{00000..00099}.tar" -> 100 names (zero padding kept)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for k in range(int(lo), int(hi) + 1) for x in _expand_braces(f"{head}{k:0{width}d}{tail}")]


def list_shards(spec: str | list[str], storage) -> list[str]:
    """Shard URIs from a directory, glob, brace range or list. Raises FileNotFoundError when none match."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        for pattern in _expand_braces(s):
            uri = storage.resolve(pattern)
            fs, path = storage.fs(uri)
            if any(ch in path for ch in "*?["):
                prefix = uri[: len(uri) - len(path)] if "://" in uri else ""
                out += [prefix + p for p in sorted(fs.glob(path))]
            elif fs.isdir(path):
                out += [f for f in storage.find(uri) if f.endswith(".tar")]
            elif fs.exists(path):
                out.append(uri)
    if not out:
        raise FileNotFoundError(f"no webdataset shards match {spec!r}")
    return sorted(dict.fromkeys(out))


def _tar_samples(stream, shard: str, cfg) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into samples by key (img2dataset writes a sample's members together)."""
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = posixpath.basename(info.name)
            k, _, ext = base.partition(".")
            k = posixpath.join(posixpath.dirname(info.name), k)
            if key is not None and k != key:
                yield _sample(key, members, shard, cfg)
                members = {}
            key = k
            members[ext.lower()] = tar.extractfile(info).read()
    if key is not None:
        yield _sample(key, members, shard, cfg)


def _sample(key: str, members: dict[str, bytes], shard: str, cfg) -> dict[str, Any]:
    image = next((members[e] for e in cfg.image_members if e in members), None)
    return {
        "image_id": key,
        "split": cfg.split,
        "caption": members.get(cfg.caption_member),
        "image": image,
        "source": f"{shard}#{key}",
        "reason": None if image is not None else "missing_image",
        "detail": None if image is not None else "no image member",
    }


def read_webdataset_shards(batch, storage, cfg, rows_per_block: int):
    """map_batches UDF (generator): shard URIs -> candidate rows, a block at a time; a corrupt shard keeps the
    samples read before the damage and adds one ``corrupt_shard`` row."""
    for shard in batch["shard"].tolist():
        rows: list[dict[str, Any]] = []
        fs, path = storage.fs(shard)
        try:
            with fs.open(path, "rb") as f:
                for sample in _tar_samples(f, shard, cfg):
                    rows.append(sample)
                    if len(rows) >= rows_per_block:
                        yield _candidates({c: [r[c] for r in rows] for c in CANDIDATE_COLUMNS})
                        rows = []
        except (tarfile.TarError, EOFError, OSError) as e:
            log.warning("webdataset: %s is damaged after %d samples: %s", shard, len(rows), e)
            rows.append(
                {
                    "image_id": None,
                    "split": cfg.split,
                    "caption": None,
                    "image": None,
                    "source": shard,
                    "reason": "corrupt_shard",
                    "detail": f"{type(e).__name__}: {e}",
                }
            )
        if rows:
            yield _candidates({c: [r[c] for r in rows] for c in CANDIDATE_COLUMNS})


def read_webdataset(cfg, data_cfg, storage):
    import ray.data

    shards = list_shards(cfg.shards, storage)
    log.info("webdataset: %d shards", len(shards))
    return ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards)).map_batches(
        read_webdataset_shards, fn_args=(storage, cfg, data_cfg.rows_per_task), batch_size=1, batch_format="numpy"
    )


def _parquet_rows(batch, cfg, storage):
    """map_batches UDF: user Parquet rows -> candidate rows (image bytes in place, or fetched from their URI)."""
    import pyarrow as pa

    from pcd_ray.storage import join

    t = batch
    n = t.num_rows
    caption = t.column(cfg.caption_column).to_pylist()
    split = t.column(cfg.split_column).to_pylist() if cfg.split_column else [cfg.split] * n
    ids = t.column(cfg.id_column).to_pylist() if cfg.id_column else [None] * n
    ids = [None if i is None else str(i) for i in ids]
    if cfg.image_column:
        raw = t.column(cfg.image_column).to_pylist()
        # Hugging Face datasets store an image as {"bytes": ..., "path": ...}.
        images = [r.get("bytes") if isinstance(r, dict) else r for r in raw]
        sources = [f"{cfg.image_column}[{k}]" for k in range(n)]
        return _candidates({"image_id": ids, "split": split, "caption": caption, "image": images, "source": sources})
    uris = [
        None
        if u is None
        else (storage.resolve(join(cfg.uri_root, u)) if cfg.uri_root and "://" not in u else storage.resolve(u))
        for u in t.column(cfg.uri_column).to_pylist()
    ]
    ids = [i if i is not None or u is None else u for i, u in zip(ids, uris)]
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "split": pa.array(split, pa.string()),
            "caption": pa.array([c.encode() if isinstance(c, str) else c for c in caption], pa.binary()),
            "uri": pa.array(uris, pa.string()),
        }
    )
    return fetch_images(table, storage)


def read_parquet_source(cfg, data_cfg, storage):
    import ray.data

    paths = [cfg.paths] if isinstance(cfg.paths, str) else list(cfg.paths)
    resolved = [storage.resolve(p) for p in paths]
    fs, _ = storage.arrow_fs(resolved[0])
    columns = [c for c in (cfg.caption_column, cfg.image_column, cfg.uri_column, cfg.id_column, cfg.split_column) if c]
    ds = ray.data.read_parquet([storage.fs(p)[1] for p in resolved], filesystem=fs, columns=columns)
    return ds.map_batches(
        _parquet_rows, fn_args=(cfg, storage), batch_format="pyarrow", batch_size=data_cfg.rows_per_task
    )


def _folder_rows(batch, cfg, storage):
    import pyarrow as pa

    from pcd_ray.storage import join

    t = batch
    n = t.num_rows
    root = storage.resolve(cfg.root)
    files = [None if f is None else str(f) for f in t.column(cfg.file_column).to_pylist()]
    split = t.column(cfg.split_column).to_pylist() if cfg.split_column else [cfg.split] * n
    table = pa.table(
        {
            "image_id": pa.array(files, pa.string()),
            "split": pa.array(split, pa.string()),
            "caption": pa.array(
                [c.encode() if isinstance(c, str) else c for c in t.column(cfg.caption_column).to_pylist()], pa.binary()
            ),
            "uri": pa.array([None if f is None else join(root, *f.split("/")) for f in files], pa.string()),
        }
    )
    return fetch_images(table, storage)


def read_folder(cfg, data_cfg, storage):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray.data

    uri = storage.resolve(cfg.captions)
    fs, path = storage.arrow_fs(uri)
    if uri.endswith((".jsonl", ".json")):
        ds = ray.data.read_json(path, filesystem=fs)  # newline-delimited (pyarrow's JSON reader)
    elif uri.endswith((".csv", ".tsv")):
        ds = ray.data.read_csv(
            path,
            filesystem=fs,
            parse_options=pacsv.ParseOptions(delimiter="\t" if uri.endswith(".tsv") else ","),
            # Binary, not string: a caption that is not UTF-8 becomes a reject row instead of failing the file.
            convert_options=pacsv.ConvertOptions(
                column_types={cfg.caption_column: pa.binary(), cfg.file_column: pa.string()}
            ),
        )
    else:
        raise ValueError(f"{uri}: captions file must be .csv, .tsv or .jsonl")
    return ds.map_batches(
        _folder_rows, fn_args=(cfg, storage), batch_format="pyarrow", batch_size=data_cfg.rows_per_task
    )


SOURCES = {
    "coco": read_coco,
    "cub": read_cub,
    "webdataset": read_webdataset,
    "parquet": read_parquet_source,
    "folder": read_folder,
}


# ------------------------------------------------------------------------------------------------- the job
def read_images(job, storage) -> dict[str, Any]:
    """Read ``job.data``'s real dataset into the images artifact (and image_rejects); returns the images manifest.

    Summary keys: source, rows_in, images, rejected, rejected_by_reason, wall_s, images_per_s.
    Raises ValueError / FileNotFoundError naming the path when the dataset is missing or not of the declared kind.
    """
    from pcd_ray.runtime import init_ray
    from pcd_ray.sink import Output, Sink

    data = job.data
    init_ray(job.ray)
    # The source first: a missing dataset fails before either artifact is touched.
    ds = SOURCES[data.source](getattr(data, data.source), data, storage)
    sink = Sink(
        storage,
        "data",
        unit="image",
        kept=Output(data.output, "images", IMAGE_COLUMNS),
        rejected=Output(data.rejects, "image_rejects", REJECT_COLUMNS),
        config=data.model_dump(mode="json"),
    )
    sink.run(
        ds,
        lambda rows: rows.map_batches(check_batch, fn_args=(data,), batch_format="pyarrow", batch_size=None),
        summary=lambda t: {
            "source": data.source,
            "rows_in": t.kept + t.rejected,
            "images": t.kept,
            "images_per_s": round(t.per_s(t.kept), 1),
        },
    )
    return sink.kept.manifest


def make_images_artifact(job: JobConfig, storage: Storage) -> dict[str, Any]:
    """The data stage: the synthetic set, or a real dataset through the readers above."""
    if job.data.source == "synthetic":
        from pcd_ray.data.synthetic import make_images

        return make_images(job, storage)
    return read_images(job, storage)
