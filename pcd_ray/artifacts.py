"""Named artifacts between stages: Parquet datasets committed by a manifest.

An artifact is a directory ``<uri>/`` holding Parquet shards under ``data/<attempt>/`` and ``_manifest.json``, which
lists the committed shards with their row counts, the artifact kind, the config that made it and the stage summary.
The manifest is written last and atomically, so a reader sees either the previous committed artifact or the new
one: shards of a writer that died are never listed, hence never read. Old attempts are deleted after a commit.

Stages declare the columns they need (``SCHEMAS``) and a read fails with the missing column names and the URI.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pcd_ray.storage import Storage, join

MANIFEST = "_manifest.json"

SCHEMAS: dict[str, list[str]] = {
    # image: PNG/JPEG bytes; attributes: JSON object (synthetic set) or null.
    "images": ["image_id", "split", "caption", "image", "attributes"],
    "pairs": ["pair_id", "image_id_a", "image_id_b", "caption_a", "caption_b"],
    "diffs": ["pair_id", "text", "raw", "engine", "prompt_version"],
    "rejects": ["pair_id", "raw", "reason"],
    "embeddings": ["image_id", "model", "embedding"],
}


class ArtifactError(RuntimeError):
    """An artifact is missing, uncommitted, of the wrong kind, or lacks columns a stage needs."""


def manifest_uri(storage: Storage, uri: str) -> str:
    return join(storage.resolve(uri), MANIFEST)


def read_manifest(storage: Storage, uri: str, kind: str | None = None) -> dict[str, Any]:
    path = manifest_uri(storage, uri)
    if not storage.exists(path):
        raise ArtifactError(f"{storage.resolve(uri)}: no committed artifact here (missing {MANIFEST}); "
                            f"run the stage that writes it first")
    manifest = storage.read_json(path)
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(f"{storage.resolve(uri)}: expected a {kind!r} artifact, found {manifest.get('kind')!r}")
    return manifest


def exists(storage: Storage, uri: str) -> bool:
    return storage.exists(manifest_uri(storage, uri))


def _check_columns(kind: str, columns: list[str], uri: str) -> None:
    missing = [c for c in SCHEMAS.get(kind, []) if c not in columns]
    if missing:
        raise ArtifactError(f"{uri}: {kind} artifact lacks required columns {missing} (has {columns})")


def _new_attempt() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _commit(storage: Storage, uri: str, kind: str, attempt: str, files: list[str], config: Any,
            summary: dict | None) -> dict[str, Any]:
    import pyarrow.parquet as pq

    base = storage.resolve(uri)
    entries, columns = [], None
    for f in files:
        fs, path = storage.fs(f)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
            if columns is None:
                columns = meta.schema.to_arrow_schema().names
        entries.append({"path": f[len(base.rstrip("/")) + 1:], "rows": meta.num_rows})
    columns = columns or []
    if files:
        _check_columns(kind, columns, base)
    manifest = {
        "kind": kind,
        "attempt": attempt,
        "num_rows": sum(e["rows"] for e in entries),
        "columns": columns,
        "files": entries,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config,
        "summary": summary or {},
    }
    storage.write_json(join(base, MANIFEST), manifest)
    # Only after the commit: drop attempts the manifest no longer names.
    for d in storage.listdir(join(base, "data")):
        if not d.rstrip("/").endswith(attempt):
            storage.rm(d)
    return manifest


def write_dataset(ds, storage: Storage, uri: str, kind: str, *, config: Any = None,
                  summary: dict | None = None, rows_per_file: int | None = None) -> dict[str, Any]:
    """Write a Ray Dataset as a committed artifact (replacing any previous one); returns the manifest."""
    attempt = _new_attempt()
    staging = join(storage.resolve(uri), "data", attempt)
    fs, path = storage.arrow_fs(staging)
    kwargs = {"min_rows_per_file": rows_per_file} if rows_per_file else {}
    ds.write_parquet(path, filesystem=fs, **kwargs)
    files = [f for f in storage.find(staging) if f.endswith(".parquet")]
    return _commit(storage, uri, kind, attempt, files, config, summary)


def write_table(table, storage: Storage, uri: str, kind: str, *, config: Any = None,
                summary: dict | None = None) -> dict[str, Any]:
    """Write a pyarrow Table (driver-side, small artifacts) as a committed artifact."""
    import io

    import pyarrow.parquet as pq

    _check_columns(kind, table.column_names, storage.resolve(uri))
    attempt = _new_attempt()
    shard = join(storage.resolve(uri), "data", attempt, "part-00000.parquet")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(shard, buf.getvalue())
    return _commit(storage, uri, kind, attempt, [shard], config, summary)


def update_summary(storage: Storage, uri: str, **fields: Any) -> dict[str, Any]:
    """Add fields to a committed artifact's summary (a lazy Ray Data pipeline knows its wall time only after the
    write); rewrites the manifest atomically with the same shard list. Returns the new manifest."""
    manifest = read_manifest(storage, uri)
    manifest["summary"].update(fields)
    storage.write_json(manifest_uri(storage, uri), manifest)
    return manifest


def files(storage: Storage, uri: str, kind: str) -> list[str]:
    manifest = read_manifest(storage, uri, kind)
    _check_columns(kind, manifest["columns"], storage.resolve(uri))
    return [join(storage.resolve(uri), *e["path"].split("/")) for e in manifest["files"]]


def read_dataset(storage: Storage, uri: str, kind: str, columns: list[str] | None = None):
    """The committed shards of an artifact as a Ray Dataset."""
    import ray.data

    paths = files(storage, uri, kind)
    if not paths:
        raise ArtifactError(f"{storage.resolve(uri)}: the {kind} artifact is empty")
    fs, _ = storage.arrow_fs(paths[0])
    return ray.data.read_parquet([storage.fs(p)[1] for p in paths], filesystem=fs, columns=columns)


def read_table(storage: Storage, uri: str, kind: str, columns: list[str] | None = None, filters=None):
    """The committed shards of an artifact as one pyarrow Table (driver-side; small artifacts only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in files(storage, uri, kind):
        fs, path = storage.fs(p)
        with fs.open(path, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns, filters=filters))
    if not tables:
        raise ArtifactError(f"{storage.resolve(uri)}: the {kind} artifact is empty")
    return pa.concat_tables(tables)
